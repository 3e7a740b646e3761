"""Nimbus against the flux-adapters conformance suite: the only test file it needs."""

from pathlib import Path

from nimbus_flux import NimbusAdapter

from flux_adapters.conformance import ConformanceSuite


class TestNimbus(ConformanceSuite):
    adapter = NimbusAdapter()
    cassettes = Path(__file__).parent / "cassettes" / "nimbus"
    credentials_env = "NIMBUS_API_KEY"  # read only when recording
