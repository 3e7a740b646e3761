"""apiyi against its recorded cassettes (recorded against the emulator: see each cassette)."""

from pathlib import Path

from flux_adapters.conformance import ConformanceSuite
from flux_adapters.providers.apiyi import ApiyiAdapter


class TestApiyi(ConformanceSuite):
    adapter = ApiyiAdapter()
    cassettes = Path(__file__).resolve().parents[2] / "cassettes" / "apiyi"
    credentials_env = "APIYI_API_KEY"
