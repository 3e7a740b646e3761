"""Every ```python block of README.md and docs/ runs as written, against the bundled emulator.

The blocks of one document run in order in one namespace (a block may continue the one before
it, as a reader would type them into one session), in a temporary working folder holding the
images of examples/assets. Every built-in provider's ``<PREFIX>_API_KEY`` and
``<PREFIX>_BASE_URL`` point at an emulator on loopback, Nimbus's at its sandbox, and
``FLUX_PROVIDERS`` is ``aimlapi,laozhang``: ``FluxClient("laozhang")`` and
``FluxClient.from_env()`` work as the examples' comments say, with no key and no internet. A
block must run as a script does: a top-level ``await`` is a SyntaxError here as it is there.

A block that cannot run (a server in the foreground, an excerpt of a file) is marked in the
Markdown, among the HTML comments right above its fence, with
``<!-- doc-test: skip <reason> -->``. A mark without a reason, or one above no Python block,
fails, and so do more than a few of them. After each block, every image file in the working
folder must be the format its extension names (a JPEG saved as ``scene.png`` fails).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nimbus_flux.sandbox import Sandbox, run_sandbox

from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.providers import BUILT_IN, get_adapter

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
ASSETS = ROOT / "examples" / "assets"
PYTHON = {"python", "py", "python3"}
MOST_SKIPPED = 4  # an example that cannot run is one that no test keeps true: keep them few

# An opening fence (indented too: a block inside a list item) and the first word of its info.
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)")
_COMMENT = re.compile(r"^\s*<!--.*-->\s*$")
_MARK = re.compile(r"^\s*<!--\s*doc-test:(?P<body>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced Python block: where it is, its code, and the reason of its skip mark."""

    path: Path
    line: int  # the line of its opening fence, from 1
    code: str
    skip: str | None = None  # None: no mark; "": a mark that gives no reason

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:L{self.line}"


def _is_python(info: str) -> bool:
    return info.lower() in PYTHON


def _mark_above(lines: list[str], fence: int, path: Path) -> str | None:
    """The reason of the skip mark among the HTML comments right above line *fence*, if any."""
    above = fence - 1
    while above >= 0 and _COMMENT.match(lines[above]):
        mark = _MARK.match(lines[above])
        if mark is not None:
            words = mark["body"].strip()
            if words.split(" ", 1)[0] != "skip":
                raise AssertionError(f"{path.name}:{above + 1}: unknown doc-test mark {words!r}")
            return words.removeprefix("skip").strip()
        above -= 1
    return None


def extract(path: Path) -> list[Block]:
    """The Python blocks of *path*, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(opening["fence"]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.name}:{index + 1}: a code block that is never closed")
        if _is_python(opening["info"]):
            code = "\n".join(
                line.removeprefix(opening["indent"]) for line in lines[index + 1 : end]
            )
            blocks.append(Block(path, index + 1, code + "\n", _mark_above(lines, index, path)))
        index = end + 1
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in extract(path)]


def test_the_extractor_finds_every_block() -> None:
    # Counted a second way, so that a bug in `extract` cannot make the examples test vacuous.
    for path in DOCUMENTS:
        fences = re.findall(r"^\s*```(?:python|py|python3)\s*$", path.read_text(), re.MULTILINE)
        assert len([block for block in BLOCKS if block.path == path]) == len(fences), path.name
    assert len(BLOCKS) >= 30
    assert {block.path.name for block in BLOCKS} >= {
        "README.md",
        "index.md",
        "quickstart.md",
        "concepts.md",
        "routing.md",
        "emulator.md",
        "validating-a-provider.md",
    }


def test_every_skip_mark_gives_a_reason_and_stands_above_a_python_block() -> None:
    for path in DOCUMENTS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not _MARK.match(line):
                continue
            following = number  # the index of the line after the mark
            while following < len(lines) and _COMMENT.match(lines[following]):
                following += 1
            fence = _FENCE.match(lines[following]) if following < len(lines) else None
            where = (
                f"{path.name}:{number}: a doc-test mark must stand right above a ```python block"
            )
            assert fence is not None, where
            assert _is_python(fence["info"]), where
    unexplained = [block.id for block in BLOCKS if block.skip == ""]
    assert not unexplained, f"skip marks without a reason: {unexplained}"
    skipped = [block.id for block in BLOCKS if block.skip]
    assert len(skipped) <= MOST_SKIPPED, skipped


# --- running the blocks ------------------------------------------------------------------------

_MAGIC = {".png": (b"\x89PNG\r\n\x1a\n",), ".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",)}


def _misnamed_images(folder: Path) -> list[str]:
    """The image files under *folder* whose bytes are not the format their extension names."""
    wrong = []
    for path in sorted(folder.rglob("*")):
        suffix = path.suffix.lower()
        if not path.is_file() or suffix not in {*_MAGIC, ".webp"}:
            continue
        head = path.read_bytes()[:12]
        if suffix == ".webp":
            fits = head.startswith(b"RIFF") and head[8:12] == b"WEBP"
        else:
            fits = head.startswith(_MAGIC[suffix])
        if not fits:
            wrong.append(str(path.relative_to(folder)))
    return wrong


@dataclass
class _Run:
    """One document's run: its working folder, its namespace, and how far it got."""

    folder: Path
    namespace: dict[str, object] = field(default_factory=dict)
    done: int = 0  # how many of the document's blocks have run (or been skipped)
    failed: str | None = None  # the first of its blocks that raised


# A job answers one poll as pending, then ends (two by default): the examples still meet a
# pending job, and each job takes 1.25 s of the library's default polling instead of 2.4 s.
@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator(pending_polls=1) as running:
        yield running


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with run_sandbox(pending_polls=1) as running:
        yield running


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, _Run]:
    found = {}
    for path in DOCUMENTS:
        folder = tmp_path_factory.mktemp(path.stem)
        for image in ASSETS.glob("*.png"):  # robot.png and greenhouse.png, which examples name
            shutil.copy(image, folder / image.name)
        namespace: dict[str, object] = {"__name__": "__main__", "__file__": str(folder / "app.py")}
        found[path] = _Run(folder, namespace)
    return found


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, emulator: Emulator, sandbox: Sandbox) -> None:
    """Every provider's key and base URL, as the examples' comments say they are set."""
    for name in list(os.environ):
        if name.startswith("FLUX_") or name.endswith(("_API_KEY", "_BASE_URL")):
            monkeypatch.delenv(name)
    for provider in BUILT_IN:
        prefix = get_adapter(provider).env_prefix
        monkeypatch.setenv(f"{prefix}_API_KEY", "sk-doc-example")
        monkeypatch.setenv(f"{prefix}_BASE_URL", emulator.base_url(provider))
    monkeypatch.setenv("NIMBUS_API_KEY", "sandbox-key")
    monkeypatch.setenv("NIMBUS_BASE_URL", sandbox.url)
    monkeypatch.setenv("FLUX_PROVIDERS", "aimlapi,laozhang")  # as README.md's comment says


def _run(block: Block, run: _Run) -> None:
    code = compile(block.code, block.id, "exec")
    with contextlib.chdir(run.folder):
        exec(code, run.namespace)
    wrong = _misnamed_images(run.folder)
    assert not wrong, f"{block.id} saved images under another format's extension: {wrong}"


@pytest.mark.usefixtures("environment")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.id)
def test_example_runs(block: Block, runs: dict[Path, _Run]) -> None:
    if block.skip:
        pytest.skip(f"marked in {block.path.name}: {block.skip}")
    run = runs[block.path]
    document = [each for each in BLOCKS if each.path == block.path]
    position = document.index(block)
    # Selected alone (pytest -k), a block still gets the blocks before it, run first.
    for before in document[run.done : position]:
        if not before.skip and run.failed is None:
            try:
                _run(before, run)
            except Exception as exc:
                run.failed = before.id
                raise AssertionError(f"{before.id}, which {block.id} follows, failed") from exc
        run.done += 1
    if run.failed is not None:
        pytest.fail(f"{run.failed} failed, and {block.id} may continue it")
    run.done = position + 1
    try:
        _run(block, run)
    except BaseException:
        run.failed = block.id
        raise
