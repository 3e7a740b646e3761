"""The mutation harness: how many deliberately broken adapters the conformance suite catches.

A *mutant* is the real adapter behind a wrapper that gets one thing on the wire wrong and
delegates everything else (`mutate`): a field dropped, renamed or sent as another type; width and
height swapped; the references reversed or the last one dropped; the key in another header or
under another scheme, or allowed to other hosts; another endpoint path or method; a multipart
part renamed; a non-image returned as the result; and for job providers a job URL rebuilt instead
of used as returned, or the cancel left out. `OPERATORS` lists them.

Sites are derived from what the adapter really builds, never listed by hand (`mutants_for`): the
request of every scenario the real adapter passes, plus *probe* requests, built but never sent,
that set each setting its limits admit one at a time (seed, each output format, the safety
tolerance at both bounds, prompt upsampling, steps, guidance, a landscape and a portrait size,
the widest and the narrowest aspect ratio, the most references, a reference by URL). Every JSON
field, multipart part, size shape and reference container seen in any of those bodies is a site.
Job URLs, methods and answers come from one replay of the suite through a wrapper that alters
nothing. A site that only the probes reach is a setting no scenario sends: its mutants survive
and the report says why.

A mutant is *killed* when a scenario that the real adapter passes (or fails as a declared
deviation, or refuses as unsupported) gets another verdict with the mutant: another outcome, or
the same outcome with another detail (`judge`). Scenarios are tried in the suite's order, and
the first one that tells the mutant apart is kept with its verdict's detail, which names the
scenario and the first difference. An adapter that raises while building a request is killed
only when the suite reports that as a failure; when the suite itself raises, the mutant is not
counted as killed, the error is kept, and the run goes on.

`score` does one provider; `score_all` does several, one worker process each; `render` prints
the kill table and lists every survivor. ``flux-adapters conformance --mutate`` (``make
mutation``) runs it over the built-in providers; docs/conformance.md has the figures and
explains each survivor.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

import attrs
from attrs import field, frozen

from flux_adapters import errors
from flux_adapters._flows import first_request, is_job_adapter, resolve
from flux_adapters.conformance.runner import Verdict, read_deviations, run_scenario
from flux_adapters.conformance.scenarios import (
    REFERENCE_URLS,
    SCENARIOS,
    RaisesBeforeIO,
    Scenario,
    asset,
)
from flux_adapters.jobs import Done, Job, Pending
from flux_adapters.limits import Plan
from flux_adapters.providers import BEARER, Answer, AnyAdapter, KeyAuth
from flux_adapters.request import EditRequest, UrlImage
from flux_adapters.result import ResultImage
from flux_adapters.wire import (
    HttpRequest,
    HttpResponse,
    ImageValue,
    JsonBody,
    JsonValue,
    MultipartBody,
    Role,
)

__all__ = [
    "OPERATORS",
    "TARGET",
    "Baseline",
    "Mutant",
    "MutantResult",
    "ProviderScore",
    "baseline",
    "judge",
    "mutants_for",
    "mutate",
    "render",
    "score",
    "score_all",
]

TARGET: Final = 0.95
"""The kill rate every built-in provider must reach (issue 10)."""

OPERATORS: Final[Mapping[str, str]] = {
    "drop-field": "a JSON field or multipart text field is left out",
    "rename-field": "a field is sent under another name (camelCase, or capitalised)",
    "retype-field": "a value changes type: number or bool to text, numeric text to a number, "
    "a list to its first item",
    "swap-size": "width and height change places, in the shape the adapter sends them: two "
    "fields, WxH text, a W:H ratio, a landscape/portrait preset",
    "reverse-references": "the reference images are sent in reverse order",
    "drop-reference": "the last reference image is left out",
    "part-name": "a multipart file part is sent under another name",
    "auth-header": "the key goes in another header (Authorization <-> x-key), or in the other "
    "usual convention (Authorization: Bearer <-> x-key)",
    "auth-scheme": "the word before the key changes (Bearer -> Key, Key -> Bearer, none -> "
    "Bearer) or is left out",
    "auth-hosts": "the key may go to any host, or no longer to a host the adapter declares",
    "endpoint-path": "the submit goes to another path: the API version bumped, a segment appended",
    "method": "a request goes with another HTTP method (the submit, a poll, a fetch, a cancel)",
    "job-url-rebuilt": "a job's polling, result or cancel URL is rebuilt instead of used as "
    "returned: on the base host, or from the submit URL and the job id",
    "drop-cancel": "the job is never cancelled",
    "non-image-result": "the answer's image is the polling URL, the submit URL, or base64 of "
    "bytes that are no image",
}
"""Each mutation operator, and what its mutants get wrong."""

Status: TypeAlias = Literal["killed", "survived"]

_JUDGED: Final = frozenset({"pass", "deviation", "unsupported"})
"""The verdicts a mutant is judged against: what the real adapter does on purpose."""
_OTHER_METHOD: Final = {"POST": "PUT", "GET": "POST", "PUT": "POST", "DELETE": "POST"}
_PROBE_SIZES: Final = ((768, 512), (512, 768), (1024, 768), (768, 1024))
_NOT_AN_IMAGE: Final = base64.b64encode(b"<html><body>not an image</body></html>").decode()
_NUMBER: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_SIZE: Final = re.compile(r"([0-9]+)([x×X*])([0-9]+)")
_RATIO: Final = re.compile(r"([0-9]+):([0-9]+)")
_PRESET: Final = re.compile(r"(landscape|portrait)((?:_[a-z0-9]+)*)")
"""A size preset named by its orientation (``landscape_16_9``, ``portrait_4_3``)."""
_VERSION: Final = re.compile(r"/v([0-9]+)(?=/|$)")
_DIMENSIONS: Final = (("width", "height"), ("w", "h"))


@frozen(kw_only=True)
class Mutant:
    """One wire mutation of one adapter; plain data, so it crosses to a worker process.

    Attributes:
        provider: The adapter's name.
        operator: What kind of mutation, a key of `OPERATORS`.
        site: Where, in words: ``seed``, ``image_size.width/height``, ``poll: GET -> POST``.
        role: The exchange it alters (``submit``, a synchronous provider's call too; ``poll``,
            ``fetch``, ``cancel``), or ``None`` for the key and the answers.
        path: The field's path in a JSON body (``("image_size", "width")``; ``"[]"`` stands
            for each item of a list), or a multipart part's name.
        argument: What the operator needs besides: the new name or method, the shape, ...
        auth: The `KeyAuth` an ``auth-*`` mutant sends the key with.
        exercised: The scenarios whose exchanges the mutation changes, as far as the real
            adapter's requests and one replay show; empty when only the probes reach the site.
    """

    provider: str
    operator: str
    site: str
    role: Role | None = None
    path: tuple[str, ...] = ()
    argument: str = ""
    auth: KeyAuth | None = None
    exercised: tuple[str, ...] = field(default=(), eq=False)


@frozen(kw_only=True)
class MutantResult:
    """What the suite made of one mutant.

    Attributes:
        mutant: The mutant.
        status: ``"killed"`` or ``"survived"``.
        scenario: The first scenario whose verdict changed (killed only).
        detail: That verdict's detail: the scenario and the first difference (killed only).
        took_effect: Whether the mutation changed a request or an answer while the suite ran
            (``None`` when the adapter judged was not made by `mutate`).
        error: What the suite raised instead of giving a verdict, if it did (never a kill).
    """

    mutant: Mutant
    status: Status
    scenario: str = ""
    detail: str = ""
    took_effect: bool | None = None
    error: str = ""

    def why_it_survived(self) -> str:
        """For a survivor, why in a few words: no scenario reaches it, or none tells it apart."""
        if self.status == "killed":
            return ""
        if self.error:
            return f"the suite raised instead of judging: {self.error}"
        exercised = self.mutant.exercised
        if not exercised and not self.took_effect:
            if self.mutant.auth is not None:
                return "no request of any scenario goes to a host this changes"
            if self.mutant.role == "submit":
                return "no scenario sends it (only the harness's probe requests do)"
            return "no scenario reaches it"
        if not exercised:
            return "it changed an exchange, yet no verdict changed"
        shown = ", ".join(exercised[:3]) + (", ..." if len(exercised) > 3 else "")
        return f"it changes what {shown} send(s), yet no verdict changed"


@frozen(kw_only=True)
class ProviderScore:
    """The mutants of one provider and what became of each.

    Attributes:
        provider: The adapter's name.
        results: One per mutant, in the order they were made.
        seconds: How long the provider's run took (baseline, sites and every mutant).
        excluded: Scenarios the real adapter fails: no mutant is judged on them.
        problem: Why no mutant could be judged (the baseline itself could not be run).
    """

    provider: str
    results: tuple[MutantResult, ...]
    seconds: float = 0.0
    excluded: tuple[str, ...] = ()
    problem: str = ""

    @property
    def mutants(self) -> int:
        """How many mutants were made."""
        return len(self.results)

    @property
    def killed(self) -> int:
        """How many the suite killed."""
        return sum(result.status == "killed" for result in self.results)

    @property
    def survived(self) -> int:
        """How many it did not."""
        return self.mutants - self.killed

    @property
    def kill_rate(self) -> float | None:
        """``killed / mutants``, or ``None`` without mutants."""
        return self.killed / self.mutants if self.mutants else None

    @property
    def survivors(self) -> tuple[MutantResult, ...]:
        """The results of the mutants that survived."""
        return tuple(result for result in self.results if result.status == "survived")

    @property
    def reached(self) -> bool:
        """Whether the kill rate reached `TARGET`."""
        rate = self.kill_rate
        return not self.problem and rate is not None and rate >= TARGET


@frozen(kw_only=True)
class Baseline:
    """The real adapter's verdicts, which every mutant of it is judged against.

    Attributes:
        adapter: The real adapter.
        cassettes: Its cassette folder.
        deviations: Its declared deviations (scenario id -> reason).
        scenarios: The scenarios run.
        verdicts: The real adapter's verdict on each, in the same order.
    """

    adapter: AnyAdapter = field(eq=False)
    cassettes: Path
    deviations: Mapping[str, str]
    scenarios: tuple[Scenario, ...] = field(eq=False)
    verdicts: tuple[Verdict, ...]

    @property
    def judged(self) -> tuple[tuple[Scenario, Verdict], ...]:
        """The scenarios a mutant is judged on, with the real adapter's verdict."""
        return tuple(
            (scenario, verdict)
            for scenario, verdict in zip(self.scenarios, self.verdicts, strict=True)
            if verdict.outcome in _JUDGED
        )

    @property
    def exchanged(self) -> tuple[Scenario, ...]:
        """The judged scenarios that send requests (passed or deviated from a cassette)."""
        return tuple(
            scenario
            for scenario, verdict in self.judged
            if verdict.outcome != "unsupported" and not isinstance(scenario.expect, RaisesBeforeIO)
        )


def baseline(
    adapter: AnyAdapter,
    cassettes: Path,
    deviations: Mapping[str, str] | None = None,
    *,
    scenarios: Sequence[Scenario] = SCENARIOS,
) -> Baseline:
    """Run *scenarios* against the real *adapter*: what its mutants are judged against.

    Args:
        adapter: The real adapter.
        cassettes: Its cassette folder.
        deviations: Its deviations; by default those in *cassettes*/``deviations.toml``.
        scenarios: The scenarios to run (default: the whole suite).

    Raises:
        ConfigurationError: The deviations file cannot be read.
    """
    declared = read_deviations(cassettes) if deviations is None else dict(deviations)
    verdicts = tuple(run_scenario(adapter, s, cassettes, declared) for s in scenarios)
    return Baseline(
        adapter=adapter,
        cassettes=cassettes,
        deviations=declared,
        scenarios=tuple(scenarios),
        verdicts=verdicts,
    )


def mutate(adapter: AnyAdapter, mutant: Mutant | None) -> AnyAdapter:
    """*adapter* with *mutant* applied: a wrapper that alters one thing and delegates the rest.

    With ``None``, the wrapper alters nothing (the harness watches the suite's replays through
    it). Works for either kind of adapter: a synchronous provider's or a job provider's.
    """
    wrapper = (
        _MutatedJob(adapter, mutant) if is_job_adapter(adapter) else _MutatedCall(adapter, mutant)
    )
    return cast("AnyAdapter", wrapper)


def judge(mutated: AnyAdapter, mutant: Mutant, base: Baseline) -> MutantResult:
    """Run the suite against *mutated* until a verdict differs from *base*'s.

    Killed: a scenario the real adapter passes, deviates on or refuses as unsupported gets
    another outcome, or the same outcome with another detail; the first such scenario is kept
    with its verdict's detail. Survived: none does. The scenarios in ``mutant.exercised`` are
    tried first, then the others, each group in the suite's order. The suite raising is neither
    a verdict nor a kill: it is recorded (the first such error) and the next scenario is tried.
    """
    raised = ""
    # The scenarios that send what the mutant changes first: the same verdicts, found sooner.
    judged = sorted(base.judged, key=lambda pair: pair[0].id not in mutant.exercised)
    for scenario, before in judged:
        try:
            after = run_scenario(mutated, scenario, base.cassettes, base.deviations)
        except Exception as exc:  # the suite's own failure: never a kill, never the harness's end
            raised = raised or f"{scenario.id}: {type(exc).__name__}: {_clip(str(exc))}"
            continue
        if (after.outcome, after.detail) != (before.outcome, before.detail):
            return MutantResult(
                mutant=mutant,
                status="killed",
                scenario=scenario.id,
                detail=_named(scenario.id, after, before),
                took_effect=_took_effect(mutated),
            )
    return MutantResult(
        mutant=mutant, status="survived", took_effect=_took_effect(mutated), error=raised
    )


def score(
    adapter: AnyAdapter,
    cassettes: Path,
    deviations: Mapping[str, str] | None = None,
    *,
    mutants: Sequence[Mutant] | None = None,
) -> ProviderScore:
    """Make *adapter*'s mutants (or take *mutants*) and judge each against its baseline.

    Never raises for what the adapter or the suite does: a baseline that cannot be run is the
    score's ``problem``, a mutant that cannot be made or judged is a survivor with its error.
    """
    started = time.perf_counter()
    name = str(getattr(adapter, "name", type(adapter).__name__))
    try:
        base = baseline(adapter, cassettes, deviations)
        chosen = mutants_for(base) if mutants is None else tuple(mutants)
    except Exception as exc:  # the adapter under test, or its deviations file
        return ProviderScore(
            provider=name,
            results=(),
            seconds=time.perf_counter() - started,
            problem=f"the real adapter could not be run: {type(exc).__name__}: {_clip(str(exc))}",
        )
    excluded = tuple(v.scenario for v in base.verdicts if v.outcome == "fail")
    if not base.exchanged:
        # Nothing a mutant changes could be told apart: its "survival" would be no verdict at
        # all. Missing cassettes, or a real adapter that fails every scenario that sends.
        why = (
            f"there are no cassettes at {cassettes}"
            if not cassettes.is_dir()
            else "the real adapter passes no scenario that sends a request"
        )
        return ProviderScore(
            provider=name,
            results=(),
            seconds=time.perf_counter() - started,
            excluded=excluded,
            problem=f"no mutant can be judged: {why}",
        )
    results = []
    for mutant in chosen:
        try:
            mutated = mutate(adapter, mutant)
        except Exception as exc:
            results.append(
                MutantResult(
                    mutant=mutant,
                    status="survived",
                    error=f"could not be made: {type(exc).__name__}: {_clip(str(exc))}",
                )
            )
            continue
        results.append(judge(mutated, mutant, base))
    return ProviderScore(
        provider=name,
        results=tuple(results),
        seconds=time.perf_counter() - started,
        excluded=excluded,
    )


def score_all(
    targets: Sequence[tuple[AnyAdapter, Path]], *, workers: int | None = None
) -> list[ProviderScore]:
    """`score` each ``(adapter, cassette folder)`` of *targets*, one worker process each.

    *workers* caps the processes (default: one per CPU); with one, everything runs here. An
    adapter a worker cannot take (one that does not pickle) is scored in this process instead.
    """
    count = min(len(targets), workers or os.cpu_count() or 1)
    if count <= 1:
        return [score(adapter, cassettes) for adapter, cassettes in targets]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    scores = []
    # Fresh interpreters rather than forks: the caller may have threads running, which a fork
    # copies in whatever state they are in (Python 3.12 warns of it).
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=count, mp_context=spawn) as pool:
        futures = [pool.submit(score, adapter, cassettes) for adapter, cassettes in targets]
        for (adapter, cassettes), future in zip(targets, futures, strict=True):
            try:
                scores.append(future.result())
            except Exception:  # it did not reach a worker, or the worker died: score it here
                scores.append(score(adapter, cassettes))
    return scores


def render(scores: Sequence[ProviderScore], seconds: float | None = None) -> str:
    """The kill table (provider, mutants, killed, survived, kill rate) and every survivor."""
    mutants = sum(s.mutants for s in scores)
    killed = sum(s.killed for s in scores)
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [
        f"Mutation score: {mutants} mutant(s) of {len(scores)} provider(s){took}; "
        f"target {TARGET:.0%} per provider",
        "",
        "| provider | mutants | killed | survived | kill rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in scores:
        mark = "" if s.reached else " (below target)"
        lines.append(
            f"| `{s.provider}` | {s.mutants} | {s.killed} | {s.survived} | "
            f"{_rate(s.kill_rate)}{mark} |"
        )
    if len(scores) > 1:
        total = killed / mutants if mutants else None
        lines.append(f"| all | {mutants} | {killed} | {mutants - killed} | {_rate(total)} |")
    notes = [f"- `{s.provider}`: {s.problem}" for s in scores if s.problem]
    notes += [
        f"- `{s.provider}`: the real adapter fails {', '.join(s.excluded)}; not judged there"
        for s in scores
        if s.excluded
    ]
    if notes:
        lines += ["", "Not judged:", *notes]
    survivors = [(s.provider, r) for s in scores for r in s.survivors]
    lines += ["", f"Survivors ({len(survivors)}):" if survivors else "Survivors: none"]
    lines += [
        f"- `{provider}` {r.mutant.operator} `{r.mutant.site}`: {r.why_it_survived()}"
        for provider, r in survivors
    ]
    return "\n".join(lines) + "\n"


def mutants_for(base: Baseline) -> tuple[Mutant, ...]:
    """Every mutant of *base*'s adapter, one per operator and site (see the module docstring)."""
    adapter = base.adapter
    built = _built_requests(base)
    watcher = _observe(base)
    found = [
        *_body_mutants(adapter.name, built),
        *_auth_mutants(adapter),
        *_endpoint_mutants(adapter.name, built),
        *_job_mutants(adapter.name, watcher.exchanges, adapter.default_base_url),
        *_result_mutants(adapter.name, watcher.answers, is_job_adapter(adapter)),
    ]
    scenarios = [b for b in built if b.scenario is not None]
    real_auth = getattr(adapter, "auth", None) or BEARER
    unique: dict[Mutant, None] = {}
    for mutant in found:
        if mutant.role == "submit":
            hit = [
                b.scenario for b in scenarios if _edit_submit(mutant, b.http, b.request) != b.http
            ]
        elif mutant.auth is not None:
            hit = [
                seen.scenario
                for seen in watcher.exchanges
                if _auth_effect(real_auth, mutant.auth, seen.request.url, adapter.default_base_url)
            ]
        elif mutant.role is not None:
            hit = [
                seen.scenario
                for seen in watcher.exchanges
                if seen.role == mutant.role and seen.changed_by(mutant, adapter.default_base_url)
            ]
        else:
            hit = [scenario for scenario, _ in watcher.answers]
        exercised = tuple(dict.fromkeys(s for s in hit if s))
        unique.setdefault(attrs.evolve(mutant, exercised=exercised), None)
    return tuple(unique)


# --- the wrapper -------------------------------------------------------------------------------


class _Mutated:
    """The real adapter with one mutation (or none), counting what it changed and saw."""

    def __init__(self, real: AnyAdapter, mutant: Mutant | None) -> None:
        self._real: Any = real
        self._mutant = mutant
        self._base_url: str = real.default_base_url
        self._submit_url = ""
        self.effects = 0
        self.scenario = ""
        self.exchanges: list[_Exchange] = []
        self.answers: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never reached for the attributes set in __init__
            raise AttributeError(name)
        return getattr(self._real, name)

    @property
    def auth(self) -> KeyAuth | None:
        """The mutant's `KeyAuth`, or the real adapter's."""
        if self._mutant is not None and self._mutant.auth is not None:
            return self._mutant.auth
        found: KeyAuth | None = getattr(self._real, "auth", None)
        return found

    def parse_error(self, response: HttpResponse) -> errors.ProviderError:
        """The real adapter's."""
        found: errors.ProviderError = self._real.parse_error(response)
        return found

    def _changed(self, before: HttpRequest, after: HttpRequest) -> HttpRequest:
        if after != before:
            self.effects += 1
        return after

    def _submit(self, built: object, request: EditRequest, base_url: str) -> Any:
        self._base_url = base_url
        if not isinstance(built, HttpRequest):
            return built  # the real adapter's own mistake: the client reports it
        self._submit_url = built.url
        if self._mutant is not None:
            built = self._changed(built, _edit_submit(self._mutant, built, request))
        return self._sent("submit", built, None)

    def _job_request(self, role: Role, built: object, job: Job) -> Any:
        if not isinstance(built, HttpRequest):
            return built
        mutant = self._mutant
        if mutant is not None and mutant.role == role:
            built = self._changed(
                built, _edit_job(mutant, built, job, self._base_url, self._submit_url)
            )
        return self._sent(role, built, job)

    def _sent(self, role: Role, built: HttpRequest, job: Job | None) -> HttpRequest:
        self.exchanges.append(_Exchange(self.scenario, role, built, job, self._submit_url))
        mutant = self._mutant
        if mutant is not None and mutant.auth is not None:
            real = getattr(self._real, "auth", None) or BEARER
            if _auth_effect(real, mutant.auth, built.url, self._base_url):
                self.effects += 1
        return built

    def _answer(self, where: str, answer: object, job: Job | None) -> Any:
        self.answers.append((self.scenario, where))
        mutant = self._mutant
        if mutant is None or mutant.operator != "non-image-result":
            return answer
        if not isinstance(answer, Answer):
            return answer
        url = {
            "polling-url": job.poll_url if job is not None else None,
            "submit-url": self._submit_url,
        }.get(mutant.argument)
        if url:
            self.effects += 1
            return attrs.evolve(answer, images=(ResultImage(url=url),))
        if mutant.argument == "non-image-base64":
            self.effects += 1
            ResultImage(b64_json=_NOT_AN_IMAGE)  # refused, as the adapter's parse would be
        return answer


class _MutatedCall(_Mutated):
    """A synchronous provider's adapter, mutated."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """The real request, mutated."""
        built: HttpRequest = self._submit(
            self._real.build_request(request, plan, base_url), request, base_url
        )
        return built

    def parse_response(self, response: HttpResponse) -> Answer:
        """The real answer, mutated."""
        answer: Answer = self._answer("parse_response", self._real.parse_response(response), None)
        return answer


class _MutatedJob(_Mutated):
    """A job provider's adapter, mutated."""

    def build_submit(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """The real submit, mutated."""
        built: HttpRequest = self._submit(
            self._real.build_submit(request, plan, base_url), request, base_url
        )
        return built

    def parse_submit(self, response: HttpResponse) -> Any:
        """The real adapter's."""
        return self._real.parse_submit(response)

    def build_poll(self, job: Job) -> HttpRequest:
        """The real poll, mutated."""
        built: HttpRequest = self._job_request("poll", self._real.build_poll(job), job)
        return built

    def parse_poll(self, response: HttpResponse, job: Job) -> Pending | Done:
        """The real status; a finished job's answer mutated."""
        state = self._real.parse_poll(response, job)
        if isinstance(state, Done) and state.answer is not None:
            return attrs.evolve(state, answer=self._answer("parse_poll", state.answer, job))
        found: Pending | Done = state
        return found

    def build_fetch(self, job: Job) -> HttpRequest | None:
        """The real fetch, mutated."""
        built = self._real.build_fetch(job)
        return (
            None if built is None else cast("HttpRequest", self._job_request("fetch", built, job))
        )

    def parse_fetch(self, response: HttpResponse, job: Job) -> Answer:
        """The real answer, mutated."""
        answer: Answer = self._answer("parse_fetch", self._real.parse_fetch(response, job), job)
        return answer

    def build_cancel(self, job: Job) -> HttpRequest | None:
        """The real cancel, mutated (or left out)."""
        built = self._real.build_cancel(job)
        if built is None:
            return None
        if self._mutant is not None and self._mutant.operator == "drop-cancel":
            self.effects += 1
            return None
        return cast("HttpRequest", self._job_request("cancel", built, job))

    def job_failure(self, response: HttpResponse, job: Job) -> Any:
        """The real adapter's."""
        return self._real.job_failure(response, job)


def _took_effect(adapter: object) -> bool | None:
    return adapter.effects > 0 if isinstance(adapter, _Mutated) else None


def _auth_effect(real: KeyAuth, mutated: KeyAuth, url: str, base_url: str) -> bool:
    """Whether a request to *url* carries the key otherwise under *mutated* than under *real*."""
    sent, now = real.allows(url, base_url), mutated.allows(url, base_url)
    if sent != now:
        return True
    return sent and (real.header, real.scheme, real.query) != (
        mutated.header,
        mutated.scheme,
        mutated.query,
    )


# --- editing what an adapter built --------------------------------------------------------------

_Edit: TypeAlias = Callable[[Mutant, HttpRequest, EditRequest], HttpRequest]


def _edit_submit(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    """*built* (the submit or the call) with *mutant*'s change, when it is about the submit."""
    edit = _SUBMIT_EDITS.get(mutant.operator) if mutant.role == "submit" else None
    return built if edit is None else edit(mutant, built, request)


def _edit_job(
    mutant: Mutant, built: HttpRequest, job: Job, base_url: str, submit_url: str
) -> HttpRequest:
    """A poll, fetch or cancel with *mutant*'s change."""
    if mutant.operator == "method":
        return attrs.evolve(built, method=mutant.argument)
    if mutant.operator != "job-url-rebuilt":
        return built
    if mutant.argument == "submit-url" and submit_url:
        return attrs.evolve(built, url=f"{submit_url.rstrip('/')}/{job.id}")
    if mutant.argument == "base-host":
        try:
            parts, base = urlsplit(built.url), urlsplit(base_url)
        except ValueError:
            return built
        url = urlunsplit((base.scheme, base.netloc, parts.path, parts.query, parts.fragment))
        return attrs.evolve(built, url=url)
    return built


def _json(built: HttpRequest, value: JsonValue) -> HttpRequest:
    assert isinstance(value, dict)  # edits keep the root an object
    return attrs.evolve(built, body=JsonBody(value))


def _fields(built: HttpRequest, fields: Sequence[tuple[str, str]]) -> HttpRequest:
    assert isinstance(built.body, MultipartBody)
    return attrs.evolve(built, body=attrs.evolve(built.body, fields=tuple(fields)))


def _at(
    value: JsonValue, path: Sequence[str], change: Callable[[JsonValue], JsonValue]
) -> JsonValue:
    """*value* with ``change(node)`` at *path* (``"[]"``: each item of a list)."""
    if not path:
        return change(value)
    head, rest = path[0], path[1:]
    if head == "[]":
        return [_at(item, rest, change) for item in value] if isinstance(value, list) else value
    if not isinstance(value, dict) or head not in value:
        return value
    return {key: _at(item, rest, change) if key == head else item for key, item in value.items()}


def _in_parent(
    value: JsonValue,
    path: Sequence[str],
    change: Callable[[dict[str, JsonValue], str], dict[str, JsonValue]],
) -> JsonValue:
    """*value* with the object holding the field at *path* replaced by ``change(it, name)``."""
    key = path[-1]

    def edit(node: JsonValue) -> JsonValue:
        return change(node, key) if isinstance(node, dict) and key in node else node

    return _at(value, path[:-1], edit)


def _drop_field(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    body = built.body
    if isinstance(body, JsonBody):
        return _json(
            built,
            _in_parent(
                body.value,
                mutant.path,
                lambda node, key: {k: v for k, v in node.items() if k != key},
            ),
        )
    if isinstance(body, MultipartBody) and len(mutant.path) == 1:
        return _fields(built, [item for item in body.fields if item[0] != mutant.path[0]])
    return built


def _rename_field(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    body, new = built.body, mutant.argument
    if isinstance(body, JsonBody):
        return _json(
            built,
            _in_parent(
                body.value,
                mutant.path,
                lambda node, key: {new if k == key else k: v for k, v in node.items()},
            ),
        )
    if isinstance(body, MultipartBody) and len(mutant.path) == 1:
        return _fields(
            built, [(new if name == mutant.path[0] else name, v) for name, v in body.fields]
        )
    return built


def _retyped(value: JsonValue) -> JsonValue:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value) if "." in value else int(value)
    if isinstance(value, list) and value:
        return value[0]
    return value


def _retype_field(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    body = built.body
    if isinstance(body, JsonBody):
        return _json(built, _at(body.value, mutant.path, _retyped))
    return built  # multipart fields are all text: no type to change


def _swapped_text(text: str, shape: str) -> str:
    if shape == "size" and (match := _SIZE.fullmatch(text)):
        return f"{match[3]}{match[2]}{match[1]}"
    if shape == "ratio" and (match := _RATIO.fullmatch(text)):
        return f"{match[2]}:{match[1]}"
    if shape == "preset" and (match := _PRESET.fullmatch(text)):
        return ("portrait" if match[1] == "landscape" else "landscape") + match[2]
    return text


def _swap_size(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    body, shape = built.body, mutant.argument
    if shape.startswith("pair:"):
        first, second = shape.removeprefix("pair:").split("|")

        def swap(node: JsonValue) -> JsonValue:
            if not isinstance(node, dict) or first not in node or second not in node:
                return node
            return {
                k: node[second] if k == first else node[first] if k == second else v
                for k, v in node.items()
            }

        if isinstance(body, JsonBody):
            return _json(built, _at(body.value, mutant.path, swap))
        if isinstance(body, MultipartBody):
            given = dict(body.fields)
            if first in given and second in given:
                other = {first: given[second], second: given[first]}
                return _fields(built, [(n, other.get(n, v)) for n, v in body.fields])
        return built
    if isinstance(body, JsonBody):
        return _json(
            built,
            _at(
                body.value,
                mutant.path,
                lambda v: _swapped_text(v, shape) if isinstance(v, str) else v,
            ),
        )
    if isinstance(body, MultipartBody) and len(mutant.path) == 1:
        return _fields(
            built,
            [(n, _swapped_text(v, shape) if n == mutant.path[0] else v) for n, v in body.fields],
        )
    return built


def _reference_urls(request: EditRequest) -> frozenset[str]:
    return frozenset(image.url for image in request.images if isinstance(image, UrlImage))


def _is_reference(value: JsonValue, urls: frozenset[str]) -> bool:
    return isinstance(value, ImageValue) or (isinstance(value, str) and value in urls)


def _holds_reference(value: JsonValue, urls: frozenset[str]) -> bool:
    """A reference, or an object with one among its values (``{"url": ...}``)."""
    return _is_reference(value, urls) or (
        isinstance(value, dict) and any(_is_reference(item, urls) for item in value.values())
    )


def _references(
    mutant: Mutant, built: HttpRequest, request: EditRequest, *, drop: bool
) -> HttpRequest:
    body, urls = built.body, _reference_urls(request)
    if isinstance(body, MultipartBody) and mutant.argument == "files":
        files = body.files[:-1] if drop else body.files[::-1]
        return attrs.evolve(built, body=attrs.evolve(body, files=files))
    if not isinstance(body, JsonBody):
        return built

    def edit(node: JsonValue) -> JsonValue:
        if mutant.argument == "list" and isinstance(node, list):
            return node[:-1] if drop else node[::-1]
        if mutant.argument == "fields" and isinstance(node, dict):
            keys = [key for key, item in node.items() if _is_reference(item, urls)]
            if drop:
                return {k: v for k, v in node.items() if not keys or k != keys[-1]}
            moved = dict(zip(keys, [node[key] for key in reversed(keys)], strict=True))
            return {k: moved.get(k, v) for k, v in node.items()}
        return node

    return _json(built, _at(body.value, mutant.path, edit))


def _part_name(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    body = built.body
    if not isinstance(body, MultipartBody):
        return built
    files = tuple(
        attrs.evolve(part, name=mutant.argument) if part.name == mutant.path[0] else part
        for part in body.files
    )
    return attrs.evolve(built, body=attrs.evolve(body, files=files))


def _endpoint(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    try:
        parts = urlsplit(built.url)
    except ValueError:
        return built
    if mutant.argument == "version":
        path = _VERSION.sub(lambda m: f"/v{int(m[1]) + 1}", parts.path, count=1)
    else:
        path = parts.path.rstrip("/") + "/edit"
    return attrs.evolve(built, url=urlunsplit(parts._replace(path=path)))


def _method(mutant: Mutant, built: HttpRequest, request: EditRequest) -> HttpRequest:
    return attrs.evolve(built, method=mutant.argument)


_SUBMIT_EDITS: Final[Mapping[str, _Edit]] = {
    "drop-field": _drop_field,
    "rename-field": _rename_field,
    "retype-field": _retype_field,
    "swap-size": _swap_size,
    "reverse-references": lambda m, b, r: _references(m, b, r, drop=False),
    "drop-reference": lambda m, b, r: _references(m, b, r, drop=True),
    "part-name": _part_name,
    "endpoint-path": _endpoint,
    "method": _method,
}


# --- finding the sites ---------------------------------------------------------------------------


@frozen
class _Built:
    """A submit (or call) the real adapter built: for a scenario, or for a probe (``None``)."""

    scenario: str | None
    request: EditRequest
    http: HttpRequest


@frozen
class _Exchange:
    """A request the adapter built while the suite replayed *scenario*, and what it came from."""

    scenario: str
    role: Role
    request: HttpRequest
    job: Job | None
    submit_url: str

    def changed_by(self, mutant: Mutant, base_url: str) -> bool:
        """Whether *mutant* changes this poll, fetch or cancel (or leaves the cancel out)."""
        if mutant.operator == "drop-cancel":
            return self.role == "cancel"
        if self.job is None or mutant.role != self.role:
            return False
        return _edit_job(mutant, self.request, self.job, base_url, self.submit_url) != self.request


def _probes(adapter: AnyAdapter) -> list[EditRequest]:
    """One request per model and setting its limits admit, each setting on its own."""
    requests = []
    for model, limits in adapter.limits.items():
        least = [asset(1 + n % 3) for n in range(limits.images.low)]
        high = limits.images.high if limits.images.high is not None else 8
        variants: list[Mapping[str, object]] = [
            {},
            {"images": [asset(1 + n % 3) for n in range(min(high, 8))]},
            {"images": [REFERENCE_URLS[0], *least[1:]]},
            {
                "seed": limits.seed.low
                if limits.seed.high is not None and limits.seed.high < 42
                else max(limits.seed.low, 42)
            },
            *({"output_format": name} for name in limits.output_formats),
            *({"width": width, "height": height} for width, height in _PROBE_SIZES),
            *({"size": f"{width}x{height}"} for width, height in _PROBE_SIZES),
        ]
        if limits.safety_tolerance is not None:
            bounds = (limits.safety_tolerance.low, limits.safety_tolerance.high)
            variants += [{"safety_tolerance": bound} for bound in bounds if bound is not None]
        if limits.prompt_upsampling:
            variants.append({"prompt_upsampling": True})
        if limits.steps is not None:
            variants.append({"steps": limits.steps.low})
        if limits.guidance is not None:
            variants.append({"guidance": limits.guidance.low})
        if limits.ratios is not None:
            variants += [
                {"aspect_ratio": f"{a}:{b}"}
                for a, b in (limits.ratios.widest, limits.ratios.narrowest)
            ]
        for variant in variants:
            fields = {"images": least, **variant}
            try:
                probe = EditRequest(prompt="a probe of one setting", model=model, **fields)  # type: ignore[arg-type]
            except (errors.FluxError, TypeError, ValueError):
                continue
            requests.append(probe)
    return requests


def _built_requests(base: Baseline) -> list[_Built]:
    """The submits of the scenarios that exchange requests, then of the probes."""
    adapter = base.adapter
    made: list[tuple[str | None, EditRequest]] = []
    for scenario in base.exchanged:
        try:
            made.append((scenario.id, scenario.build(adapter)))
        except Exception:  # the suite reports it; nothing to learn from it here
            continue
    made += [(None, probe) for probe in _probes(adapter)]
    built = []
    for scenario_id, request in made:
        try:
            plan = resolve(adapter, request)
            http = first_request(adapter, request, plan, adapter.default_base_url)
        except Exception:  # a probe the limits refuse, or an adapter that cannot build it
            continue
        if isinstance(http, HttpRequest):
            built.append(_Built(scenario_id, request, http))
    return built


def _observe(base: Baseline) -> _Mutated:
    """Replay the scenarios that exchange requests through a wrapper that alters nothing."""
    watcher = mutate(base.adapter, None)
    assert isinstance(watcher, _Mutated)
    for scenario in base.exchanged:
        watcher.scenario = scenario.id
        try:
            run_scenario(cast("AnyAdapter", watcher), scenario, base.cassettes, base.deviations)
        except Exception:  # the suite's own failure: that scenario shows nothing
            continue
    return watcher


def _nodes(
    value: JsonValue, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], JsonValue]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, (*path, key))
    elif isinstance(value, list):
        for item in value:
            yield from _nodes(item, (*path, "[]"))


def _shown(path: Sequence[str]) -> str:
    text = ""
    for part in path:
        text += "[]" if part == "[]" else (f".{part}" if text else part)
    return text or "the body"


def _renamed(name: str) -> str:
    words = [word for word in re.split(r"[_-]", name) if word]
    if len(words) > 1:
        return words[0] + "".join(word[:1].upper() + word[1:] for word in words[1:])
    changed = name.capitalize() if name[:1].islower() else name.lower()
    return changed if changed != name else name + "_"


def _kind(value: JsonValue) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "numeric text" if _NUMBER.fullmatch(value) else "text"
    if isinstance(value, list):
        return "list"
    return "other"


_RETYPED: Final = {
    "number": "text",
    "bool": "text",
    "numeric text": "number",
    "list": "its first item",
}


def _text_shape(text: str) -> str:
    if _SIZE.fullmatch(text):
        return "size"
    if _RATIO.fullmatch(text):
        return "ratio"
    return "preset" if _PRESET.fullmatch(text) else ""


_SHAPES: Final = {"size": "WxH", "ratio": "W:H", "preset": "preset"}


_Site: TypeAlias = tuple[str, str, tuple[str, ...], str]
"""A request mutant before it is one: operator, site in words, path, argument."""


def _body_mutants(provider: str, built: Sequence[_Built]) -> list[Mutant]:
    """Field, type, size, reference and part mutants, for every site any built body has."""
    fields: dict[tuple[str, ...], dict[str, None]] = {}
    swaps: dict[tuple[tuple[str, ...], str], None] = {}
    references: dict[tuple[tuple[str, ...], str], int] = {}
    image_fields: dict[tuple[str, ...], dict[str, None]] = {}
    parts: dict[str, None] = {}

    def holds(path: tuple[str, ...], kind: str, count: int) -> None:
        references[(path, kind)] = max(references.get((path, kind), 0), count)

    for item in built:
        body, urls = item.http.body, _reference_urls(item.request)
        if isinstance(body, MultipartBody):
            names = [name for name, _ in body.fields]
            for name, text in body.fields:
                fields.setdefault((name,), {})
                if shape := _text_shape(text):
                    swaps.setdefault(((name,), shape), None)
            for first, second in _DIMENSIONS:
                if first in names and second in names:
                    swaps.setdefault(((), f"pair:{first}|{second}"), None)
            parts.update(dict.fromkeys(part.name for part in body.files))
            if body.files:
                holds((), "files", len(body.files))
            continue
        if not isinstance(body, JsonBody):
            continue
        for path, value in _nodes(body.value):
            if path and path[-1] != "[]":
                fields.setdefault(path, {})[_kind(value)] = None
                if isinstance(value, str) and (shape := _text_shape(value)):
                    swaps.setdefault((path, shape), None)
            if isinstance(value, dict):
                lower = {key.lower(): key for key in value}
                for first, second in _DIMENSIONS:
                    if first in lower and second in lower:
                        swaps.setdefault((path, f"pair:{lower[first]}|{lower[second]}"), None)
                keys = [key for key, item in value.items() if _is_reference(item, urls)]
                if keys and path[-1:] != ("[]",):  # not the {"url": ...} items of a list
                    holds(path, "fields", len(keys))
                    image_fields.setdefault(path, {}).update(dict.fromkeys(keys))
            if isinstance(value, list) and value and all(_holds_reference(v, urls) for v in value):
                holds(path, "list", len(value))
    sites: list[_Site] = [("drop-field", _shown(path), path, "") for path in fields]
    sites += [
        ("rename-field", f"{_shown(path)} -> {_renamed(path[-1])}", path, _renamed(path[-1]))
        for path in fields
    ]
    for path, kinds in fields.items():
        kind = next((kind for kind in kinds if kind in _RETYPED), None)
        if kind is not None:
            sites.append(("retype-field", f"{_shown(path)}: {kind} -> {_RETYPED[kind]}", path, ""))
    for path, shape in swaps:
        if shape.startswith("pair:"):
            prefix = f"{_shown(path)}." if path else ""
            site = prefix + shape.removeprefix("pair:").replace("|", "/")
        else:
            site = f"{_shown(path)} ({_SHAPES[shape]})"
        sites.append(("swap-size", site, path, shape))
    for (path, kind), most in references.items():
        if kind == "fields":
            names = list(image_fields[path])
            prefix = f"{_shown(path)}." if path else ""
            where = prefix + (names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}")
        else:
            where = "the file parts" if kind == "files" else f"{_shown(path)}[]"
        if most > 1:  # one reference has no order to get wrong
            sites.append(("reverse-references", where, path, kind))
        sites.append(("drop-reference", where, path, kind))
    for name in parts:
        new = name.removesuffix("[]") if name.endswith("[]") else f"{name}[]"
        sites.append(("part-name", f"file part {name} -> {new}", (name,), new))
    return [
        Mutant(provider=provider, operator=op, site=site, role="submit", path=path, argument=arg)
        for op, site, path, arg in sites
    ]


def _auth_mutants(adapter: AnyAdapter) -> list[Mutant]:
    """Another header, convention or scheme for the key; other hosts allowed to receive it."""
    auth = getattr(adapter, "auth", None) or BEARER
    made: list[tuple[str, str, KeyAuth]] = []
    if auth.header is not None:
        other = "x-key" if auth.header.lower() == "authorization" else "Authorization"
        made.append(("auth-header", f"{auth.header} -> {other}", attrs.evolve(auth, header=other)))
        convention = (
            KeyAuth(header="x-key", scheme=None, hosts=auth.hosts)
            if auth.header.lower() == "authorization"
            else KeyAuth(header="Authorization", scheme="Bearer", hosts=auth.hosts)
        )
        if convention != made[-1][2]:
            made.append(
                ("auth-header", f"{auth.describe()} -> {convention.describe()}", convention)
            )
        scheme = {"Bearer": "Key", "Key": "Bearer"}.get(auth.scheme or "", "Bearer")
        made.append(
            (
                "auth-scheme",
                f"{auth.scheme or 'none'} -> {scheme}",
                attrs.evolve(auth, scheme=scheme),
            )
        )
        if auth.scheme is not None:
            made.append(("auth-scheme", f"{auth.scheme} -> none", attrs.evolve(auth, scheme=None)))
    elif auth.query is not None:
        other = "api_key" if auth.query != "api_key" else "key"
        made.append(("auth-header", f"?{auth.query} -> ?{other}", attrs.evolve(auth, query=other)))
    # KeyAuth refuses "*" (and any pattern wider than one provider's domain) when it is made;
    # the mutant stands for any declaration that lets the key go too far, so it is set as is.
    leaky = attrs.evolve(auth)
    object.__setattr__(leaky, "hosts", ("*",))
    made.append(("auth-hosts", "any host may receive the key", leaky))
    made += [
        (
            "auth-hosts",
            f"{pattern} no longer receives the key",
            attrs.evolve(auth, hosts=tuple(h for h in auth.hosts if h != pattern)),
        )
        for pattern in auth.hosts
    ]
    return [
        Mutant(provider=adapter.name, operator=op, site=site, auth=new) for op, site, new in made
    ]


def _endpoint_mutants(provider: str, built: Sequence[_Built]) -> list[Mutant]:
    """Another path and another method for the submit (or the call)."""
    if not built:
        return []
    method = built[0].http.method.upper()
    other = _OTHER_METHOD.get(method, "POST")
    sites = []
    if all(_VERSION.search(urlsplit(item.http.url).path) for item in built):
        sites.append(("endpoint-path", "submit path: version bumped", "version"))
    sites += [
        ("endpoint-path", "submit path: /edit appended", "segment"),
        ("method", f"submit: {method} -> {other}", other),
    ]
    return [
        Mutant(provider=provider, operator=op, site=site, role="submit", argument=arg)
        for op, site, arg in sites
    ]


def _job_mutants(provider: str, exchanges: Sequence[_Exchange], base_url: str) -> list[Mutant]:
    """For each job exchange seen (poll, fetch, cancel): another method, a rebuilt URL.

    A rebuilt URL is a site only where it differs from the one returned in some exchange: a
    polling URL the provider answers on the base host, rebuilt there, is the same URL.
    """
    mutants = []
    roles: tuple[Role, ...] = ("poll", "fetch", "cancel")
    for role in roles:
        seen = [exchange for exchange in exchanges if exchange.role == role]
        if not seen:
            continue
        method = seen[0].request.method.upper()
        other = _OTHER_METHOD.get(method, "POST")
        candidates = [
            Mutant(
                provider=provider,
                operator="method",
                site=f"{role}: {method} -> {other}",
                role=role,
                argument=other,
            ),
            Mutant(
                provider=provider,
                operator="job-url-rebuilt",
                site=f"{role} URL rebuilt on the base host",
                role=role,
                argument="base-host",
            ),
            Mutant(
                provider=provider,
                operator="job-url-rebuilt",
                site=f"{role} URL rebuilt from the submit URL and the job id",
                role=role,
                argument="submit-url",
            ),
        ]
        mutants += [m for m in candidates if any(e.changed_by(m, base_url) for e in seen)]
        if role == "cancel":
            mutants.append(
                Mutant(provider=provider, operator="drop-cancel", site="the cancel", role=role)
            )
    return mutants


def _result_mutants(provider: str, answers: Sequence[tuple[str, str]], jobs: bool) -> list[Mutant]:
    """A non-image in place of each answer's image, where an answer was seen."""
    if not answers:
        return []
    kinds = ["polling-url"] if jobs else []
    kinds += ["submit-url", "non-image-base64"]
    shown = {
        "polling-url": "the polling URL as the image",
        "submit-url": "the submit URL as the image",
        "non-image-base64": "base64 of non-image bytes as the image",
    }
    return [
        Mutant(provider=provider, operator="non-image-result", site=shown[kind], argument=kind)
        for kind in kinds
    ]


# --- words ---------------------------------------------------------------------------------------


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _named(scenario: str, after: Verdict, before: Verdict) -> str:
    """The killing verdict's detail, always starting with the scenario's id."""
    if after.detail.startswith(f"{scenario}: "):
        return after.detail
    said = f": {after.detail}" if after.detail else ""
    return f"{scenario}: {after.outcome} (the real adapter: {before.outcome}){said}"


def _rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f} %"
