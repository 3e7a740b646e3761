"""The documents say what the code does: generated tables match the limits data."""

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
