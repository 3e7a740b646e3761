"""The gateway called from Node with the official ``openai`` npm package.

The package is installed into ``.venv/node`` at the version ``tests/node/package-lock.json`` pins
(``npm ci`` by ``make install``, or by this test's fixture when it is missing: the only step that
needs the npm registry); the test itself talks to loopback only. Skipped, saying why, only when
Node or npm is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flux_adapters import AsyncFluxClient
from flux_adapters.emulator import Emulator, run_emulator
from flux_adapters.gateway import run_gateway
from tests.conftest import image_bytes

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / ".venv" / "node"
PINNED = Path(__file__).with_name("node")
SCRIPT = PINNED / "gateway_client.mjs"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="Node.js and npm are not installed: the official openai npm package cannot be run",
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The package as tests/node pins it: ``make install`` puts it there; else ``npm ci`` now."""
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.exists():
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(PINNED / name, NODE_DIR / name)
        done = subprocess.run(
            ["npm", "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"npm ci (tests/node) failed: {done.stderr[-2000:]}"
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


def test_the_openai_npm_package_generates_and_edits(
    node_modules: Path, emulator: Emulator, tmp_path: Path
) -> None:
    def make(only: tuple[str, ...] | None) -> AsyncFluxClient:
        return AsyncFluxClient(
            "laozhang", api_key="test-key", base_url=emulator.base_url("laozhang")
        )

    png = tmp_path / "in.png"
    png.write_bytes(image_bytes(64, 64))
    with run_gateway(files_dir=tmp_path / "files", clients=make) as gateway:
        key, _ = gateway.add_key()
        # An ES module finds packages from its own folder: run a copy beside node_modules.
        script = node_modules.parent / "gateway_client.mjs"
        script.write_text(SCRIPT.read_text())
        done = subprocess.run(
            ["node", str(script), gateway.url, key, str(png)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout)
        image = httpx.get(seen["url"])
    assert (seen["provider"], seen["attempts"]) == ("laozhang", "1")
    assert image.content.startswith(b"\xff\xd8") or image.content.startswith(b"\x89PNG")
    assert seen["edited_b64_length"] > 100
    assert seen["refused"] == {
        "status": 400,
        "code": "invalid_request",
        "type": "invalid_request_error",
    }
    assert [job.seed for job in emulator.billed("laozhang")][:1] == [11]
