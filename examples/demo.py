"""The main job, end to end and offline: edit two local images through a provider's API.

Starts the bundled emulator on a free loopback port, runs ``flux-adapters edit`` with the two
bundled images and a multi-image prompt against its laozhang dialect, checks the saved image,
and stops the emulator. Run with ``make demo``; no key and no internet needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from flux_adapters.emulator import run_emulator

HERE = Path(__file__).resolve().parent
OUTPUT = Path("out") / "demo.png"
PROMPT = (
    "Use image 1 as the red robot and image 2 as the turquoise greenhouse. "
    "Create one coherent scene: the robot stands in front of the greenhouse."
)


def main() -> int:
    with run_emulator() as emulator:
        print(
            f"emulator running at {emulator.url} (laozhang dialect at {emulator.base_url('laozhang')}/v1)"
        )
        environment = os.environ | {
            "LAOZHANG_API_KEY": "demo-key",
            "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
        }
        command = [
            sys.executable, "-m", "flux_adapters", "edit", PROMPT,
            "-i", str(HERE / "assets" / "robot.png"),
            "-i", str(HERE / "assets" / "greenhouse.png"),
            "--provider", "laozhang", "--size", "1280x768", "--format", "png", "--seed", "7",
            "-o", str(OUTPUT),
        ]  # fmt: skip
        print("$ flux-adapters edit ... -i examples/assets/robot.png -i examples/assets/greenhouse.png "
              f"--provider laozhang --size 1280x768 -o {OUTPUT}", flush=True)  # fmt: skip
        finished = subprocess.run(command, env=environment, check=False)
        if finished.returncode:
            return finished.returncode
        calls = emulator.calls("laozhang")
    with Image.open(OUTPUT) as picture:
        print(f"checked:  {OUTPUT} is a {picture.width}x{picture.height} {picture.format} image")
        if picture.size != (1280, 768):
            print("the image does not have the requested size", file=sys.stderr)
            return 1
    print(f"the emulator received {len(calls)} request(s) and has stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
