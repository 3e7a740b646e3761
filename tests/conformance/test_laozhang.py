"""laozhang against its recorded cassettes (recorded against the emulator: see each cassette)."""

from pathlib import Path

from flux_adapters.conformance import ConformanceSuite
from flux_adapters.providers.laozhang import LaozhangAdapter


class TestLaozhang(ConformanceSuite):
    adapter = LaozhangAdapter()
    cassettes = Path(__file__).resolve().parents[2] / "cassettes" / "laozhang"
    credentials_env = "LAOZHANG_API_KEY"
