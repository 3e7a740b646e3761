"""aimlapi against its recorded cassettes (recorded against the emulator: see each cassette)."""

from pathlib import Path

from flux_adapters.conformance import ConformanceSuite
from flux_adapters.providers.aimlapi import AimlapiAdapter


class TestAimlapi(ConformanceSuite):
    adapter = AimlapiAdapter()
    cassettes = Path(__file__).resolve().parents[2] / "cassettes" / "aimlapi"
    credentials_env = "AIMLAPI_API_KEY"
