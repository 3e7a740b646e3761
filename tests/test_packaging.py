"""What installing the package gives: its metadata, its README on an index page, the extras.

A missing extra is simulated in a subprocess: a finder placed first on ``sys.meta_path`` fails
each import of a blocked top-level module as Python does when it is not installed (``No module
named 'vcr'``, with ``name='vcr'``, also for ``from vcr.serializers import ...``).
`.ci/package-check` checks the same in a real environment built from the wheel, without extras.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import flux_adapters
from flux_adapters import errors
from flux_adapters._extras import FEATURES, PROVIDED_BY, SHARED, extra_imports, missing_extra

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPOSITORY = "https://github.com/flux-adapters/flux-adapters"
EXIT_CONFIG = 5  # flux_adapters/cli.py: configuration, including a missing optional extra


def _normalized(requirement: str) -> str:
    """The package name of a requirement, normalized as PEP 503 says (``PyYAML`` -> ``pyyaml``)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


_BLOCKER = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def _run(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter where the *blocked* modules are not installed."""
    return subprocess.run(
        [sys.executable, "-c", f"BLOCKED = {set(blocked)!r}\n{_BLOCKER}\n{code}"],
        capture_output=True,
        text=True,
        timeout=120,  # a guard that let `emulate` start would otherwise serve for ever
        cwd=ROOT,
    )


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
    assert set(extras) == {"fast", "emulator", "cli", "conformance", "gateway", "redis", "fsspec"}
    tools = {"ruff", "mypy", "build", "hypothesis", "types-pyyaml", "openai"}
    for extra, requirements in extras.items():
        assert not tools & {_normalized(r) for r in requirements}, extra
    dev = {_normalized(r) for r in PYPROJECT["dependency-groups"]["dev"]}
    assert tools <= dev
    assert (
        "flux-adapters[fast,emulator,cli,conformance,gateway,redis,fsspec]"
        in PYPROJECT["dependency-groups"]["dev"]
    )


def test_the_extras_table_matches_pyproject() -> None:
    """`PROVIDED_BY` names, for each extra, exactly the packages pyproject.toml installs with it."""
    declared = {
        extra: {_normalized(requirement) for requirement in requirements}
        for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items()
    }
    known: dict[str, set[str]] = {}
    for distribution, extra in PROVIDED_BY.values():
        known.setdefault(extra, set()).add(_normalized(distribution))
    for extra, modules in SHARED.items():
        known.setdefault(extra, set()).update(_normalized(PROVIDED_BY[m][0]) for m in modules)
    assert known == declared
    assert set(FEATURES) == set(declared)


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


# -- a missing extra -----------------------------------------------------------------------------


def test_a_missing_extra_module_becomes_a_flux_error_with_the_install_hint() -> None:
    with pytest.raises(errors.MissingExtraError) as caught, extra_imports():
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")
    error = caught.value
    assert isinstance(error, errors.FluxError)
    assert isinstance(error, ModuleNotFoundError)  # `except ImportError` keeps working
    assert (error.name, error.distribution, error.extra) == ("uvicorn", "uvicorn", "emulator")
    assert str(error) == (
        "the emulator needs uvicorn, which is not installed; "
        "install it with: pip install 'flux-adapters[emulator]'"
    )
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_the_hint_names_the_package_when_its_module_is_named_otherwise() -> None:
    error = missing_extra(ModuleNotFoundError("No module named 'vcr'", name="vcr"))
    assert error is not None
    assert "needs vcrpy (module vcr)" in str(error)
    assert "pip install 'flux-adapters[conformance]'" in str(error)


@pytest.mark.parametrize(
    "name",
    [
        "httpx",  # a core dependency: a broken installation, not an extra
        "PIL.WebPImagePlugin",  # Pillow is there, without one of its parts
        None,
    ],
)
def test_any_other_missing_module_passes_through_unchanged(name: str | None) -> None:
    original = ModuleNotFoundError(f"No module named {name!r}", name=name)
    with pytest.raises(ModuleNotFoundError) as caught, extra_imports():
        raise original
    assert caught.value is original


def test_the_error_pickles_with_what_it_carries() -> None:
    error = missing_extra(ModuleNotFoundError("No module named 'PIL'", name="PIL"))
    assert error is not None
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is errors.MissingExtraError
    assert (copy.name, copy.distribution, copy.extra, str(copy)) == (
        "PIL",
        "pillow",
        "emulator",
        str(error),
    )


@pytest.mark.parametrize("module", ["starlette", "uvicorn", "PIL", "python_multipart"])
def test_the_emulator_without_its_extra_says_what_to_install(module: str) -> None:
    code = (
        "from flux_adapters import errors\n"
        "from flux_adapters.emulator import Fault, run_emulator\n"  # importable without the extra
        "try:\n"
        "    with run_emulator():\n"
        "        print('started')\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, errors.FluxError), exc.name)\n"
        "    print(exc)\n"
    )
    result = _run(code, blocked=(module,))
    assert result.returncode == 0, result.stderr
    kind, line = result.stdout.splitlines()
    assert kind == f"MissingExtraError True {module}"
    assert line.endswith("install it with: pip install 'flux-adapters[emulator]'")
    assert PROVIDED_BY[module][0] in line


def test_the_emulator_images_module_without_pillow_says_what_to_install() -> None:
    result = _run("import flux_adapters.emulator.images", blocked=("PIL",))
    assert result.returncode == 1
    assert result.stderr.rstrip().splitlines()[-1] == (
        "flux_adapters.errors.MissingExtraError: the emulator needs pillow (module PIL), which is "
        "not installed; install it with: pip install 'flux-adapters[emulator]'"
    )


def test_the_conformance_suite_without_pytest_says_what_to_install() -> None:
    result = _run("from flux_adapters.conformance import ConformanceSuite", blocked=("pytest",))
    assert result.returncode == 1
    last = result.stderr.rstrip().splitlines()[-1]
    assert last == (
        "flux_adapters.errors.MissingExtraError: the conformance suite needs pytest, which is not "
        "installed; install it with: pip install 'flux-adapters[conformance]'"
    )


def _cli(*argv: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return _run(f"from flux_adapters.cli import main; sys.exit(main({list(argv)!r}))", blocked)


def test_emulate_without_the_extra_ends_with_the_hint_and_status_5() -> None:
    result = _cli("emulate", "--port", "0", blocked=("starlette",))
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""  # no banner: nothing listened
    assert result.stderr == (
        "flux-adapters: MissingExtraError: the emulator needs starlette, which is not installed; "
        "install it with: pip install 'flux-adapters[emulator]'\n"
    )


@pytest.mark.parametrize(
    "module", ["starlette", "uvicorn", "python_multipart", "prometheus_client"]
)
def test_serve_without_the_extra_names_the_gateway_extra_and_ends_with_5(module: str) -> None:
    """A module the emulator extra installs too is still named as the gateway's to install."""
    result = _cli("serve", "--port", "0", "--no-auth", blocked=(module,))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stdout == ""  # no banner: nothing listened
    named = "" if module == PROVIDED_BY[module][0] else f" (module {module})"
    assert result.stderr == (
        f"flux-adapters: MissingExtraError: the gateway needs {PROVIDED_BY[module][0]}{named}, "
        "which is not installed; install it with: pip install 'flux-adapters[gateway]'\n"
    )


@pytest.mark.parametrize("module", ["vcr", "yaml"])
def test_conformance_without_the_extra_ends_with_the_hint_and_status_5(
    module: str, tmp_path: Path
) -> None:
    """Not one failed scenario per cassette: the run stops, naming what to install."""
    result = _cli("conformance", "-p", "laozhang", "--report-dir", str(tmp_path), blocked=(module,))
    assert result.returncode == EXIT_CONFIG, result.stdout
    assert result.stderr.splitlines() == [
        f"flux-adapters: MissingExtraError: the conformance suite needs {PROVIDED_BY[module][0]} "
        f"(module {module}), which is not installed; "
        "install it with: pip install 'flux-adapters[conformance]'"
    ]
    assert not (tmp_path / "conformance.md").exists()


def test_the_cli_says_the_same_for_a_module_no_guard_caught(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux_adapters import cli

    def run(*args: object) -> int:
        raise ModuleNotFoundError("No module named 'rich'", name="rich")

    monkeypatch.setattr(cli, "_run", run)
    assert cli.main(["models"]) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        "flux-adapters: MissingExtraError: the live progress display needs rich, which is not "
        "installed; install it with: pip install 'flux-adapters[cli]'\n"
    )


def test_the_cli_asks_for_a_reinstall_when_a_core_module_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux_adapters import cli

    def run(*args: object) -> int:
        raise ModuleNotFoundError("No module named 'cattrs'", name="cattrs")

    monkeypatch.setattr(cli, "_run", run)
    assert cli.main(["models"]) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        "flux-adapters: No module named 'cattrs'; reinstall flux-adapters\n"
    )


def test_the_speed_ups_and_the_display_fall_back_silently() -> None:
    """The `fast` and `cli` extras are optional for real: nothing fails or warns without them."""
    code = (
        "import io\n"
        "from flux_adapters import cli\n"
        "from flux_adapters._bodies import _b64encode\n"
        "from flux_adapters import AsyncFluxClient\n"
        "client = AsyncFluxClient('laozhang', api_key='test-key')\n"
        "print(_b64encode()(b'flux').decode(), client.driver, type(client._driver.http._transport).__name__)\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "print(cli.main(['models'], out, err), 'laozhang' in out.getvalue(), repr(err.getvalue()))\n"
    )
    result = _run(code, blocked=("pybase64", "aiohttp", "rich"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Zmx1eA== httpx AsyncHTTPTransport", "0 True ''"]
    assert result.stderr == ""


# -- the command line's version ------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == f"flux-adapters {flux_adapters.__version__}\n"
