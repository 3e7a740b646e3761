"""`ConformanceSuite`: the base class a provider author subclasses in one test module.

    from pathlib import Path

    from flux_adapters.conformance import ConformanceSuite
    from my_reseller import MyResellerAdapter


    class TestMyReseller(ConformanceSuite):
        adapter = MyResellerAdapter()
        cassettes = Path(__file__).parent / "cassettes" / "my-reseller"
        credentials_env = "MY_RESELLER_API_KEY"   # read only when recording

Every scenario becomes one test: it passes; or is reported as ``xfail`` when it is a declared
deviation (which must still fail: the test fails the day it stops failing, so the declaration
gets removed); or is skipped with the reason when the provider verifiably does not support it,
when only a misbehaving server produces it and it was not recorded, or when it is about the
other kind of provider (the job scenarios at a provider that answers in one call). Nothing but
a real pass is reported as PASSED.

Deviations are declared in ``deviations.toml`` beside the cassettes (`read_deviations`), where
``flux-adapters conformance`` reads them too, so pytest and the CLI's report agree::

    [deviations]
    error-429 = "answers 503 instead of 429 when rate limited"

Needs the ``conformance`` extra (pytest and vcrpy); without it, importing this module raises
`errors.MissingExtraError`, which says what to install.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from flux_adapters._extras import extra_imports
from flux_adapters.conformance.runner import (
    credential_names,
    read_deviations,
    run_scenario,
    scan_for_secrets,
)
from flux_adapters.conformance.scenarios import SCENARIOS, Scenario
from flux_adapters.errors import ConfigurationError
from flux_adapters.providers import AnyAdapter

with extra_imports():
    import pytest

__all__ = ["ConformanceSuite"]


class ConformanceSuite:
    """Behaviour every provider adapter must show. Subclass once per provider.

    Attributes:
        adapter: The adapter under test.
        cassettes: The folder holding ``<scenario>.yaml`` for this provider.
        credentials_env: The variable holding the provider's key; read only when recording,
            and used to check that no cassette contains it.
        deviations: Scenario id -> why this provider deviates (expected to fail), besides
            those in ``deviations.toml`` beside the cassettes (these win on the same id).
    """

    adapter: ClassVar[AnyAdapter]
    cassettes: ClassVar[Path]
    credentials_env: ClassVar[str] = ""
    deviations: ClassVar[Mapping[str, str]] = {}

    @pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.id)
    def test_scenario(self, scenario: Scenario) -> None:
        """The scenario passes, is verifiably unsupported, or is a declared deviation."""
        try:
            verdict = run_scenario(self.adapter, scenario, self.cassettes, self._deviations())
        except ConfigurationError as error:  # the adapter's data, said without a traceback
            pytest.fail(f"the adapter cannot be used: {error}", pytrace=False)
        if verdict.outcome == "fail":
            pytest.fail(f"[{self.adapter.name}] {verdict.detail}", pytrace=False)
        if verdict.outcome == "deviation":
            pytest.xfail(f"deviation: {verdict.detail}")
        if verdict.outcome == "unsupported":
            pytest.skip(f"unsupported: {verdict.detail}")
        if verdict.outcome == "unrecorded":
            pytest.skip(verdict.detail)
        if verdict.outcome == "not-applicable":
            pytest.skip(f"not applicable: {verdict.detail}")

    def _deviations(self) -> Mapping[str, str]:
        return {**read_deviations(self.cassettes), **self.deviations}

    def test_unknown_deviations_are_refused(self) -> None:
        """A deviation must name a real scenario (a typo would otherwise hide nothing)."""
        known = {scenario.id for scenario in SCENARIOS}
        declared = self._deviations()  # the file's ids are checked as it is read
        assert set(declared) <= known, f"unknown scenario ids: {sorted(set(declared) - known)}"

    def test_translation_is_deterministic(self) -> None:
        """Building the same request twice gives the same wire request: no clocks, no randomness."""
        from flux_adapters._flows import first_request, resolve
        from flux_adapters.errors import RequestError

        for scenario in SCENARIOS:
            request = scenario.build(self.adapter)
            try:
                plan = resolve(self.adapter, request)
            except RequestError:
                continue
            base = self.adapter.default_base_url
            first = first_request(self.adapter, request, plan, base)
            second = first_request(self.adapter, request, plan, base)
            assert first == second, scenario.id

    def test_cassettes_hold_no_secrets(self) -> None:
        """No cassette holds a secret: see `scan_for_secrets` (the key itself when it is set)."""
        key = os.environ.get(self.credentials_env, "") if self.credentials_env else ""
        names = credential_names(self.adapter)
        assert scan_for_secrets(self.cassettes, [key], credentials=names) == []
