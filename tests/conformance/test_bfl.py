"""bfl against its recorded cassettes (recorded against the emulator: see each cassette)."""

from pathlib import Path

from flux_adapters.conformance import ConformanceSuite
from flux_adapters.providers.bfl import BflAdapter


class TestBfl(ConformanceSuite):
    adapter = BflAdapter()
    cassettes = Path(__file__).resolve().parents[2] / "cassettes" / "bfl"
    credentials_env = "BFL_API_KEY"
