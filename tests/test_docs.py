"""The documents say what the code does: generated tables match the limits data."""

import re
from pathlib import Path

import pytest

from flux_adapters._tables import rewrite

ROOT = Path(__file__).resolve().parent.parent
GENERATED = [
    ROOT / "README.md",
    ROOT / "docs" / "routing.md",
    *sorted((ROOT / "docs" / "providers").glob("*.md")),
]


@pytest.mark.parametrize("path", GENERATED, ids=lambda path: path.name)
def test_generated_tables_are_current(path: Path) -> None:
    text = path.read_text()
    assert "<!-- generated:" in text
    assert rewrite(text) == text, f"run `make docs` to regenerate the tables in {path.name}"


def test_every_provider_has_a_page() -> None:
    from flux_adapters.providers import BUILT_IN

    pages = {path.stem for path in (ROOT / "docs" / "providers").glob("*.md")}
    assert pages == set(BUILT_IN)


# Links from the docs site to files outside docs/ (examples, tests) point at the repository on
# GitHub, where the site's reader can follow them. `mkdocs build --strict` (make docs-build)
# checks the links between pages of docs/; this test checks the rest, offline, against this
# checkout. README.md's links are checked by tests/test_packaging.py.
REPOSITORY = "https://github.com/flux-adapters/flux-adapters/"
_REPOSITORY_LINK = re.compile(re.escape(REPOSITORY) + r"(?:blob|tree)/main/([^)\s#>\"'`]+)")
DOCUMENTS = sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_links_into_the_repository_name_files_that_exist(path: Path) -> None:
    targets = _REPOSITORY_LINK.findall(path.read_text())
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"{path.name} links to files this repository does not have: {missing}"
