"""The documents say what the code does: generated tables, links, and the shown CLI examples."""

import os
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


# The shell examples whose output a page shows, run as written (the `flux-adapters` of the
# example is `main`) against the emulator, and their output compared with what the page shows.
# In a shown line, `...` stands for any text; a shown line that is only `...` (after its
# indentation and any `- `) stands for one or more lines.


def _blocks_after(path: Path, heading: str) -> tuple[str, str]:
    """The first ```sh block under *heading* in *path*, and the plain block that follows it."""
    text = path.read_text(encoding="utf-8").split(heading, 1)[1]
    command = text.split("```sh\n", 1)[1].split("\n```", 1)[0]
    shown = text.split("```sh\n", 1)[1].split("\n```", 1)[1].split("```\n", 1)[1]
    return command, shown.split("\n```", 1)[0]


def _argv(command: str, subcommand: str) -> list[str]:
    """The arguments of the example's ``flux-adapters <subcommand>`` line."""
    import shlex

    lines = command.replace("\\\n", " ").splitlines()
    (line,) = [line for line in lines if line.startswith(f"flux-adapters {subcommand} ")]
    return shlex.split(line)[1:]


def _matches(shown: str, printed: str) -> bool:
    """Whether *printed* is what *shown* shows, `...` standing for what a page leaves out."""
    patterns = []
    for line in shown.splitlines():
        if line.strip().removeprefix("- ") == "...":
            lead = re.escape(line[: line.index("...")])
            patterns.append(f"(?:{lead}[^\\n]*\\n)*{lead}[^\\n]*")
        else:
            patterns.append(".*?".join(re.escape(part) for part in line.split("...")))
    return re.fullmatch("\n".join(patterns) + "\n?", printed) is not None


def _cli(argv: list[str]) -> tuple[int, str, str]:
    import io

    from flux_adapters.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def example_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding the images the examples name, and no configuration."""
    import shutil

    for image in (ROOT / "examples" / "assets").glob("*.png"):
        shutil.copy(image, tmp_path / image.name)
    for name in list(os.environ):
        if name.startswith("FLUX_") or name.endswith(("_API_KEY", "_BASE_URL")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_check_example_of_the_cli_page_prints_what_it_shows(example_folder: Path) -> None:
    command, shown = _blocks_after(ROOT / "docs" / "cli.md", "## `flux-adapters check`")
    code, out, err = _cli(_argv(command, "check"))
    assert code == 2, err  # a provider refuses: exit 2, as the page says
    assert _matches(shown, out), f"docs/cli.md shows:\n{shown}\nthe command printed:\n{out}"


def test_the_edit_example_of_the_cli_page_prints_what_it_shows(
    example_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from flux_adapters.emulator import run_emulator

    command, shown = _blocks_after(ROOT / "docs" / "cli.md", "## `flux-adapters edit`")
    shown = re.sub(r"(?m)^time: +[0-9.]+ s$", "time:     ... s", shown)  # the time varies
    with run_emulator() as emulator:
        monkeypatch.setenv("LAOZHANG_API_KEY", "sk-doc-example")
        monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
        code, out, err = _cli(_argv(command, "edit"))
    assert code == 0, err
    assert _matches(shown, out), f"docs/cli.md shows:\n{shown}\nthe command printed:\n{out}"
    with Image.open(example_folder / "out" / "robot.png") as image:
        assert (image.format, image.size) == ("PNG", (1792, 1024))


def test_the_readme_emulator_example_makes_the_image_it_asks_for(
    example_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from flux_adapters.emulator import run_emulator

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    command = text.split("No key yet?", 1)[1].split("```sh\n", 1)[1].split("\n```", 1)[0]
    assert "LAOZHANG_BASE_URL=http://127.0.0.1:8000/laozhang" in command  # the emulator's path
    with run_emulator() as emulator:
        monkeypatch.setenv("LAOZHANG_API_KEY", "emulator-key")
        monkeypatch.setenv("LAOZHANG_BASE_URL", emulator.base_url("laozhang"))
        code, out, err = _cli(_argv(command, "edit"))
    assert code == 0, err
    assert "saved:    robot.png" in out
    with Image.open(example_folder / "robot.png") as image:  # the asset, replaced by the edit
        assert (image.format, image.size) == ("PNG", (1024, 768))


# docs/cli.md names the flags of each command under its own heading: each must be one of that
# command's (a flag renamed or removed leaves the page telling users to type an error), and
# each option a command takes must be named on the page (serve's, on the gateway page it links
# to), so that a new flag does not go unexplained.
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")


def _options(parser: object) -> list[tuple[str, ...]]:
    """The option strings of each option of *parser* and of its subcommands (``keys create``)."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    found = []
    for action in parser._actions:
        if action.option_strings and "--help" not in action.option_strings:
            found.append(tuple(action.option_strings))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _options(sub)
    return found


def _commands() -> dict[str, list[tuple[str, ...]]]:
    import argparse

    from flux_adapters.cli import _parser

    top = _parser()
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: _options(parser) for name, parser in commands.choices.items()}


def _cli_sections() -> dict[str, str]:
    """docs/cli.md's text under each ``## `flux-adapters <command>` `` heading."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    sections = {}
    for part in parts[1:]:
        heading = re.match(r"`flux-adapters (\w+)`", part)
        sections[heading[1] if heading else part.split("\n", 1)[0]] = part
    return sections


def test_every_flag_the_cli_page_names_is_one_its_command_takes() -> None:
    commands = {
        name: {flag for option in options for flag in option}
        for name, options in _commands().items()
    }
    every = set().union(*commands.values(), {"--version", "-h", "--help"})
    sections = _cli_sections()
    assert set(commands) <= set(sections), "a command without its section in docs/cli.md"
    wrong = []
    for heading, text in sections.items():
        # Under a command's heading its own flags (`models` tells of `explain` and `check` too).
        allowed = commands[heading] | commands["check"] if heading in commands else every
        wrong += [f"{heading}: {flag}" for flag in _FLAG.findall(text) if flag not in allowed]
    assert not wrong, f"docs/cli.md names flags its commands do not take: {wrong}"


def test_every_option_of_every_command_is_named_in_the_docs() -> None:
    sections = _cli_sections()
    gateway = (ROOT / "docs" / "gateway.md").read_text(encoding="utf-8")
    # `check` and `explain` take the request arguments of `edit`, which its section lists.
    shared = {"check": sections["edit"], "explain": sections["edit"], "serve": gateway}
    missing = []
    for name, options in _commands().items():
        named = set(_FLAG.findall(sections[name] + shared.get(name, "")))
        missing += ["/".join(option) for option in options if not named & set(option)]
    assert not missing, f"options that docs/cli.md (or docs/gateway.md) does not name: {missing}"


# The pages cite tests as evidence (docs/scaling.md's tables, "`tests/test_gateway.py::test_...`"):
# a test renamed or removed leaves a citation of nothing.
_CITED_TEST = re.compile(r"\b(test_[a-z0-9_]+)\b(?!\.py)")


def test_every_test_a_page_cites_exists() -> None:
    defined = set()
    suite = ROOT / "flux_adapters" / "conformance" / "suite.py"  # the tests a subclass inherits
    for source in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("examples/*/tests/**/*.py"), suite]:
        defined.update(
            re.findall(r"^\s*(?:async )?def (test_[a-z0-9_]+)", source.read_text(), re.M)
        )
    pages = [ROOT / "README.md", *DOCUMENTS]
    missing = [
        f"{page.relative_to(ROOT)}: {name}"
        for page in pages
        if page.name != "benchmarks.md"
        for name in _CITED_TEST.findall(page.read_text(encoding="utf-8"))
        if name not in defined and not name.endswith("_")  # `..._for_the_async_client_too`
    ]
    assert not missing, f"pages cite tests that do not exist: {missing}"


# A configuration file a page shows (`flux-adapters.toml`: routing.md, scaling.md) is read as
# the library reads one: a key renamed or a value it no longer takes fails here, not for a user
# who copied it. Package metadata (`[project...]`) and deviations files are other files.
def _configuration_blocks() -> list[tuple[str, str]]:
    found = []
    for page in [ROOT / "README.md", *DOCUMENTS]:
        for body in re.findall(r"```toml\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            if not re.search(r"^\s*\[(?:project|deviations)", body, re.M):
                found.append((str(page.relative_to(ROOT)), body))
    return found


def test_every_configuration_file_a_page_shows_is_read_as_written(tmp_path: Path) -> None:
    from flux_adapters.config import load_config

    blocks = _configuration_blocks()
    assert {page for page, _ in blocks} >= {"docs/routing.md", "docs/scaling.md"}
    for number, (page, body) in enumerate(blocks):
        path = tmp_path / f"{number}.toml"
        path.write_text(body, encoding="utf-8")
        loaded = load_config(path, environ={})
        assert loaded.providers, f"{page}: the file configures no provider"


# Every `flux-adapters ...` line of a page's shell examples is one the command's parser takes (a
# flag renamed, a value out of its range, an option put where it is not read). Parsed only,
# nothing run, in a folder holding the files they name; `[--json]` stands for an option.
def _command_lines() -> list[tuple[str, list[str]]]:
    import shlex

    found = []
    for page in [ROOT / "README.md", *DOCUMENTS]:
        if page.name == "benchmarks.md":
            continue
        text = page.read_text(encoding="utf-8")
        for body in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S):
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s#.*", "", line).strip()
                if line.startswith("#"):
                    continue
                match = re.search(r"(?:^|[\s;&|(])(?:\S*/)?flux-adapters (.*)", line)
                if match is None:
                    continue
                command = re.split(r" &| \||\s>", match[1])[0]
                argv = [word for word in shlex.split(command) if not word.startswith("[")]
                found.append((str(page.relative_to(ROOT)), argv))
    return found


def test_every_command_a_page_shows_is_one_the_parser_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux_adapters.cli import _parser, _UsageError

    lines = _command_lines()
    assert len(lines) >= 25
    monkeypatch.chdir(tmp_path)
    refused = []
    for page, argv in lines:
        for word in argv:  # the files a line names, so that the parser's own checks pass
            if re.fullmatch(r"[\w./-]+\.(?:png|jsonl)", word) and not word.startswith("/"):
                (tmp_path / word).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / word).touch()
        try:
            _parser().parse_args(argv)
        except (_UsageError, SystemExit) as error:
            refused.append(f"{page}: flux-adapters {' '.join(argv)}: {error}")
    assert not refused, "\n".join(refused)
