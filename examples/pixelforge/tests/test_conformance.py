"""PixelForge against the flux-adapters conformance suite: the only test file it needs."""

from pathlib import Path

from pixelforge_flux import PixelforgeAdapter

from flux_adapters.conformance import ConformanceSuite


class TestPixelforge(ConformanceSuite):
    adapter = PixelforgeAdapter()
    cassettes = Path(__file__).parent / "cassettes" / "pixelforge"
    credentials_env = "PIXELFORGE_API_KEY"  # read only when recording
