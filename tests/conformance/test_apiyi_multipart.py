"""apiyi-multipart against its recorded cassettes (recorded against the emulator: see each cassette)."""

from pathlib import Path

from flux_adapters.conformance import ConformanceSuite
from flux_adapters.providers.apiyi import ApiyiMultipartAdapter


class TestApiyiMultipart(ConformanceSuite):
    adapter = ApiyiMultipartAdapter()
    cassettes = Path(__file__).resolve().parents[2] / "cassettes" / "apiyi-multipart"
    credentials_env = "APIYI_API_KEY"
