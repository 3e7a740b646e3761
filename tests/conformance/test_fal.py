"""fal against its recorded cassettes (recorded against the emulator: see each cassette)."""

from pathlib import Path

from flux_adapters.conformance import ConformanceSuite
from flux_adapters.providers.fal import FalAdapter


class TestFal(ConformanceSuite):
    adapter = FalAdapter()
    cassettes = Path(__file__).resolve().parents[2] / "cassettes" / "fal"
    credentials_env = "FAL_API_KEY"
