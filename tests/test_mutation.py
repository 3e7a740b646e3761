"""The mutation harness: the five deliberate bugs of issue 10 are killed at every provider, naming
the scenario and the first difference; and the harness's own rules (a mutant that changes nothing
survives, an adapter that raises is handled, the table adds up)."""

from __future__ import annotations

import functools
import io
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from pixelforge_flux import PixelforgeAdapter

from flux_adapters.cli import main
from flux_adapters.conformance.mutation import (
    Baseline,
    Mutant,
    MutantResult,
    ProviderScore,
    baseline,
    judge,
    mutants_for,
    mutate,
    render,
    score,
    score_all,
)
from flux_adapters.conformance.runner import Verdict, run_scenario
from flux_adapters.conformance.scenarios import SCENARIOS, by_id
from flux_adapters.limits import ModelLimits, Plan
from flux_adapters.providers import BUILT_IN, AnyAdapter, get_adapter
from flux_adapters.providers.laozhang import LaozhangAdapter
from flux_adapters.request import EditRequest
from flux_adapters.wire import HttpRequest

ROOT = Path(__file__).resolve().parent.parent
PIXELFORGE = ROOT / "examples" / "pixelforge" / "tests" / "cassettes" / "pixelforge"
PROVIDERS = [*BUILT_IN, "pixelforge"]
JOB_PROVIDERS = ["bfl", "fal"]


def folder(provider: str) -> Path:
    return PIXELFORGE if provider == "pixelforge" else ROOT / "cassettes" / provider


def adapter_of(provider: str) -> AnyAdapter:
    return PixelforgeAdapter() if provider == "pixelforge" else get_adapter(provider)


@functools.cache
def prepared(provider: str) -> tuple[Baseline, tuple[Mutant, ...]]:
    """The real adapter's verdicts and its mutants, made once per test session."""
    base = baseline(adapter_of(provider), folder(provider))
    return base, mutants_for(base)


def the_mutant(provider: str, operator: str, site: str) -> Mutant:
    _, mutants = prepared(provider)
    found = [m for m in mutants if m.operator == operator and m.site == site]
    assert len(found) == 1, [(m.operator, m.site) for m in mutants if m.operator == operator]
    return found[0]


def killed(provider: str, mutant: Mutant) -> MutantResult:
    base, _ = prepared(provider)
    result = judge(mutate(base.adapter, mutant), mutant, base)
    assert result.status == "killed", result
    # The verdict names the scenario, then says what differed.
    assert result.detail.startswith(f"{result.scenario}: "), result.detail
    return result


# The other usual credential convention: Authorization: Bearer where the provider wants x-key
# (BFL), x-key where it wants Authorization (with its scheme: Bearer, or fal's Key).
CREDENTIAL = {
    "laozhang": "Authorization: Bearer [redacted] -> x-key: [redacted]",
    "apiyi": "Authorization: Bearer [redacted] -> x-key: [redacted]",
    "apiyi-multipart": "Authorization: Bearer [redacted] -> x-key: [redacted]",
    "aimlapi": "Authorization: Bearer [redacted] -> x-key: [redacted]",
    "bfl": "x-key: [redacted] -> Authorization: Bearer [redacted]",
    "fal": "Authorization: Key [redacted] -> x-key: [redacted]",
    "pixelforge": "Authorization: Bearer [redacted] -> x-key: [redacted]",
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_key_under_the_other_convention_is_killed(provider: str) -> None:
    result = killed(provider, the_mutant(provider, "auth-header", CREDENTIAL[provider]))
    assert ": the request does not match the recording: credential differs: sent " in result.detail


@pytest.mark.parametrize("provider", BUILT_IN)
def test_safety_tolerance_renamed_is_killed(provider: str) -> None:
    # Killed once a scenario sets safety_tolerance (safety-tolerance-lowest and -highest are
    # being recorded on main); until then no scenario sends the field, and this fails.
    result = killed(
        provider, the_mutant(provider, "rename-field", "safety_tolerance -> safetyTolerance")
    )
    assert "safetyTolerance" in result.detail


def test_pixelforge_takes_no_safety_tolerance_so_it_has_no_such_site() -> None:
    # Its limits refuse the setting before anything is sent: there is no field to misname.
    assert PixelforgeAdapter.limits["flux-2-pro"].safety_tolerance is None
    _, mutants = prepared("pixelforge")
    assert not [m for m in mutants if "safety_tolerance" in m.path]


# Where each provider's wire carries the output's width and height: the explicit-size scenario
# sends them (768x512), except at apiyi, whose JSON dialect takes an aspect ratio only
# (kontext-aspect-ratio, 16:9); and what the first difference must mention.
SIZE = {
    "laozhang": ("width/height", "explicit-size", ("JSON body differs", "height", "768")),
    "apiyi": ("aspect_ratio (W:H)", "kontext-aspect-ratio", ("aspect_ratio", "9:16")),
    "apiyi-multipart": ("width/height", "explicit-size", ("multipart body differs", "768")),
    "aimlapi": ("image_size.width/height", "explicit-size", ("image_size.height", "768")),
    "bfl": ("width/height", "explicit-size", ("JSON body differs", "height", "768")),
    "fal": ("image_size.width/height", "explicit-size", ("image_size.height", "768")),
    "pixelforge": ("canvas.w/h", "explicit-size", ("canvas.h", "768")),
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_width_and_height_swapped_are_killed(provider: str) -> None:
    site, scenario, mentions = SIZE[provider]
    result = killed(provider, the_mutant(provider, "swap-size", site))
    assert result.scenario == scenario
    assert all(words in result.detail for words in mentions), result.detail


def test_a_polling_url_rebuilt_on_the_base_host_is_killed_at_bfl() -> None:
    result = killed(
        "bfl", the_mutant("bfl", "job-url-rebuilt", "poll URL rebuilt on the base host")
    )
    assert "the request was not recorded: GET https://api.bfl.ai/v1/get_result?id=" in result.detail


def test_fals_polling_url_is_on_its_base_host_so_a_rebuilt_one_is_killed_by_its_path() -> None:
    # fal answers its status URL on the queue's own origin: rebuilt there, it is the same URL
    # (an equivalent mutant, not made). Rebuilt from the submit URL, it loses fal's /requests/.
    _, mutants = prepared("fal")
    assert not [m for m in mutants if m.site == "poll URL rebuilt on the base host"]
    result = killed(
        "fal",
        the_mutant("fal", "job-url-rebuilt", "poll URL rebuilt from the submit URL and the job id"),
    )
    assert "the request was not recorded: GET https://queue.fal.run/fal-ai/" in result.detail


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_polling_or_submit_url_returned_as_the_image_is_killed(provider: str) -> None:
    site = (
        "the polling URL as the image"
        if provider in JOB_PROVIDERS
        else "the submit URL as the image"
    )
    result = killed(provider, the_mutant(provider, "non-image-result", site))
    # Its "download" is no exchange the cassette holds.
    assert ": the request does not match the recording: " in result.detail


def test_sites_come_from_what_the_adapter_builds() -> None:
    _, mutants = prepared("laozhang")
    dropped = {m.site for m in mutants if m.operator == "drop-field"}
    # Every field a scenario sends, and those only the probes send (no scenario sets them).
    assert {
        "model",
        "prompt",
        "n",
        "input_image",
        "input_image_8",
        "seed",
        "aspect_ratio",
    } <= dropped
    assert {"safety_tolerance", "prompt_upsampling", "size"} <= dropped
    by_site = {m.site: m for m in mutants if m.operator == "drop-field"}
    assert "seed-and-format" in by_site["seed"].exercised
    assert "text-to-image" not in by_site["seed"].exercised
    operators = {m.operator for m in mutants}
    assert "part-name" not in operators  # laozhang sends JSON
    assert {m.operator for m in prepared("apiyi-multipart")[1]} >= {"part-name", "drop-reference"}
    fal = {m.operator for m in prepared("fal")[1]}
    assert {"drop-cancel", "job-url-rebuilt", "method"} <= fal


def test_a_mutant_that_changes_nothing_survives() -> None:
    nothing = Mutant(
        provider="laozhang",
        operator="drop-field",
        site="a field laozhang never sends",
        role="submit",
        path=("no_such_field",),
    )
    outcome = score(LaozhangAdapter(), folder("laozhang"), mutants=[nothing])
    assert (outcome.mutants, outcome.killed, outcome.survived) == (1, 0, 1)
    [result] = outcome.results
    assert result.status == "survived"
    assert result.took_effect is False
    assert result.why_it_survived() == "no scenario sends it (only the harness's probe requests do)"


def test_the_wrapper_without_a_mutant_gives_the_real_verdicts() -> None:
    for provider in ("laozhang", "bfl"):
        base, _ = prepared(provider)
        watched = mutate(base.adapter, None)
        assert type(watched) is not type(base.adapter)
        for scenario, verdict in zip(base.scenarios, base.verdicts, strict=True):
            replayed = judge_one(watched, scenario.id, base)
            assert (replayed.outcome, replayed.detail) == (verdict.outcome, verdict.detail)


def judge_one(adapter: AnyAdapter, scenario_id: str, base: Baseline) -> Verdict:
    return run_scenario(adapter, by_id(scenario_id), base.cassettes, base.deviations)


class RaisesOnSeed(LaozhangAdapter):
    """An adapter that crashes building any request with a seed."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        if request.seed is not None:
            raise RuntimeError("seed handling is broken")
        return super().build_request(request, plan, base_url)


def test_a_mutant_whose_build_raises_is_killed_where_the_suite_reports_the_failure() -> None:
    base, _ = prepared("laozhang")
    mutant = Mutant(provider="laozhang", operator="drop-field", site="seed", role="submit")
    result = judge(RaisesOnSeed(), mutant, base)
    assert result.status == "killed"
    assert result.scenario == "seed-and-format"
    assert result.detail.startswith("seed-and-format: raised RequestError")
    assert "RuntimeError" in result.detail
    assert result.took_effect is None  # not made by mutate(): nothing counted


class LimitsThatRaise(LaozhangAdapter):
    """The suite itself raises on this one: its limits cannot be read."""

    @property
    def limits(self) -> Mapping[str, ModelLimits]:  # type: ignore[override]
        raise RuntimeError("no limits today")


def test_the_suite_raising_is_recorded_and_never_ends_the_run() -> None:
    base, _ = prepared("laozhang")
    mutant = Mutant(provider="laozhang", operator="drop-field", site="everything", role="submit")
    result = judge(LimitsThatRaise(), mutant, base)
    assert result.status == "survived"  # the suite never judged it: no kill
    assert "RuntimeError: no limits today" in result.error
    assert result.why_it_survived().startswith("the suite raised instead of judging: ")
    # A baseline that cannot be run is the score's problem, not an exception.
    outcome = score(LimitsThatRaise(), folder("laozhang"))
    assert outcome.results == ()
    assert "RuntimeError: no limits today" in outcome.problem
    assert not outcome.reached


class LocalAdapter(LaozhangAdapter):
    pass


def test_score_all_scores_in_workers_and_here_what_a_worker_cannot_take(tmp_path: Path) -> None:
    # No cassette folders: each provider is scored (here or in a worker) to "nothing to judge
    # with", so this is quick.
    unpicklable = LocalAdapter()
    unpicklable.reason = lambda: None  # type: ignore[attr-defined]  # a lambda does not pickle
    targets: list[tuple[AnyAdapter, Path]] = [
        (get_adapter("apiyi"), tmp_path / "apiyi"),
        (unpicklable, tmp_path / "laozhang"),
    ]
    scores = score_all(targets, workers=2)
    assert [s.provider for s in scores] == ["apiyi", "laozhang"]
    # No cassette: nothing sent is ever compared, so no mutant is called a survivor either.
    assert all(s.mutants == 0 for s in scores)
    assert all(
        s.problem == f"no mutant can be judged: there are no cassettes at {tmp_path / s.provider}"
        for s in scores
    )


def result_of(status: str, operator: str = "drop-field") -> MutantResult:
    mutant = Mutant(provider="p", operator=operator, site="seed", role="submit", path=("seed",))
    return MutantResult(mutant=mutant, status=status, scenario="s" if status == "killed" else "")  # type: ignore[arg-type]


def test_the_table_adds_up() -> None:
    first = ProviderScore(
        provider="first", results=(*[result_of("killed")] * 19, result_of("survived"))
    )
    second = ProviderScore(provider="second", results=(result_of("killed"), result_of("survived")))
    empty = ProviderScore(provider="empty", results=(), problem="the real adapter could not be run")
    text = render([first, second, empty], seconds=1.5)
    rows = re.findall(r"^\| `?([\w-]+)`? \| (\d+) \| (\d+) \| (\d+) \| ([^|]+) \|$", text, re.M)
    assert rows == [
        ("first", "20", "19", "1", "95.0 %"),
        ("second", "2", "1", "1", "50.0 % (below target)"),
        ("empty", "0", "0", "0", "n/a (below target)"),
        ("all", "22", "20", "2", "90.9 %"),
    ]
    for _, mutants, killed_, survived, _ in rows:
        assert int(mutants) == int(killed_) + int(survived)
    assert first.reached
    assert not second.reached
    assert not empty.reached
    assert "3 provider(s) in 1.5 s" in text
    assert "- `empty`: the real adapter could not be run" in text
    assert text.count("drop-field `seed`") == 2  # every survivor listed, with operator and site


def test_the_cli_prints_the_table_writes_it_and_exits_0_at_the_target(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "flux_adapters", "conformance", "--mutate",
        "--adapter", "pixelforge_flux:PixelforgeAdapter",
        "--cassettes", str(PIXELFORGE.parent), "--report-dir", str(tmp_path),
    ]  # fmt: skip
    environment = os.environ | {"PYTHONPATH": str(ROOT / "examples" / "pixelforge")}
    finished = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "| `pixelforge` |" in finished.stdout
    assert "Survivors (1):" in finished.stdout
    assert (tmp_path / "mutation.md").read_text() in finished.stdout


def test_mutate_does_not_go_with_record() -> None:
    err = io.StringIO()
    assert main(["conformance", "--mutate", "--record"], out=io.StringIO(), err=err) == 2
    assert "--mutate replays" in err.getvalue()


def test_every_scenario_is_judged_or_said_why_not() -> None:
    base, _ = prepared("bfl")
    judged = {scenario.id for scenario, _ in base.judged}
    skipped = {v.scenario: v.outcome for v in base.verdicts if v.scenario not in judged}
    assert judged | set(skipped) == {s.id for s in SCENARIOS}
    assert set(skipped.values()) <= {"not-applicable", "unrecorded"}
