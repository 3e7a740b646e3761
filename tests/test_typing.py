"""``mypy --strict`` catches the mistakes people make with this API, and accepts its examples.

tests/typing/bad_calls.py holds a wrong model id, wrong provider ids and arguments of the wrong
type, each marked ``# error: <code>``: mypy must report exactly those. The README's Python
examples, put together in one module, must type-check clean.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "typing" / "bad_calls.py"
MARK = re.compile(r"#\s*error:\s*([a-z-]+)\s*$")
REPORTED = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def mypy(*files: Path) -> list[str]:
    """The error lines of ``mypy --strict`` (with the project's settings) on *files*."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--no-error-summary",
            "--show-error-codes",
            "--no-pretty",
            *map(str, files),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr  # 2: mypy itself failed
    return [line for line in done.stdout.splitlines() if ": error: " in line]


def expected_errors(path: Path) -> set[tuple[int, str]]:
    return {
        (number, found.group(1))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if (found := MARK.search(line))
    }


def reported(lines: list[str], name: str) -> set[tuple[int, str]]:
    found = set()
    for line in lines:
        match = REPORTED.match(line)
        assert match, line
        if Path(match["file"]).name == name:
            found.add((int(match["line"]), match["code"]))
    return found


def readme_examples() -> str:
    """Every ```python block of README.md, in order, as one module (later blocks use earlier
    names, as a reader does)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 5
    return "\n\n".join(blocks)


def test_mypy_rejects_wrong_ids_and_wrong_argument_types_and_accepts_the_readme(
    tmp_path: Path,
) -> None:
    examples = tmp_path / "readme_examples.py"
    examples.write_text(readme_examples())
    lines = mypy(BAD, examples)
    expected = expected_errors(BAD)
    assert len(expected) >= 10
    codes = {code for _, code in expected}
    assert {"arg-type", "list-item", "call-arg"} <= codes
    assert reported(lines, BAD.name) == expected
    assert reported(lines, examples.name) == set(), "\n".join(lines)


def test_the_project_mypy_run_leaves_the_bad_file_out() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert "exclude = ['^tests/typing/bad_']" in text
