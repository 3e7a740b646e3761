"""What installing the package gives: its metadata, and its README as a package index shows it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPOSITORY = "https://github.com/flux-adapters/flux-adapters"


def _normalized(requirement: str) -> str:
    """The package name of a requirement, normalized as PEP 503 says (``PyYAML`` -> ``pyyaml``)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


# -- metadata ------------------------------------------------------------------------------------


def test_the_license_ships_and_says_mit() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 flux-adapters developers" in text


def test_the_project_urls_point_at_the_repository_and_its_docs() -> None:
    urls = PYPROJECT["project"]["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Repository", "Issues", "Changelog"}
    assert urls["Documentation"] == "https://flux-adapters.github.io/flux-adapters/"
    assert all(url.startswith("https://") for url in urls.values())
    assert urls["Repository"] == REPOSITORY


def test_the_classifiers_name_every_python_the_package_claims() -> None:
    classifiers = PYPROJECT["project"]["classifiers"]
    minimum = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {minimum}" in classifiers
    assert "Programming Language :: Python :: 3.13" in classifiers
    assert "License :: OSI Approved :: MIT License" in classifiers


def test_user_extras_hold_no_development_tools() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras) == {"fast", "emulator", "cli", "conformance"}
    tools = {"ruff", "mypy", "build", "hypothesis", "types-pyyaml"}
    for extra, requirements in extras.items():
        assert not tools & {_normalized(r) for r in requirements}, extra
    dev = {_normalized(r) for r in PYPROJECT["dependency-groups"]["dev"]}
    assert tools <= dev
    assert "flux-adapters[fast,emulator,cli,conformance]" in PYPROJECT["dependency-groups"]["dev"]


# -- the README, as a package index shows it -----------------------------------------------------

_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)")  # [text](target) and ![alt](target)
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)  # [id]: target
_HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)""", re.IGNORECASE)


def _links(markdown: str) -> list[str]:
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"`[^`\n]*`", "", prose)  # inline code is no link
    return [
        *_LINK.findall(prose),
        *_REFERENCE.findall(prose),
        *_HTML.findall(prose),
    ]


def test_the_link_finder_sees_each_kind_of_link() -> None:
    sample = (
        "[a](docs/a.md) ![b](img.png) [c][ref] <a href='LICENSE'>d</a>\n"
        "[ref]: examples/x.py\n`[not](a-link.md)`\n```\n[nor](this.md)\n```\n"
    )
    assert sorted(_links(sample)) == ["LICENSE", "docs/a.md", "examples/x.py", "img.png"]


def test_every_readme_link_is_absolute() -> None:
    """A package index shows README.md away from the repository: a relative link breaks there."""
    links = _links((ROOT / "README.md").read_text())
    assert links, "no links found: the link pattern is broken"
    relative = [link for link in links if not link.startswith("https://")]
    assert relative == [], f"use {REPOSITORY}/blob/main/<path> instead of {relative}"


def test_every_readme_link_into_the_repository_names_a_file_that_exists() -> None:
    prefix = re.compile(rf"{re.escape(REPOSITORY)}/(blob|tree)/main/([^#?]+)")
    checked = 0
    for link in _links((ROOT / "README.md").read_text()):
        match = prefix.match(link)
        if match:
            kind, path = match.groups()
            target = ROOT / path
            exists = target.is_file() if kind == "blob" else target.is_dir()
            assert exists, link
            checked += 1
    assert checked >= 10
