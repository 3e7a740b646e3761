"""A real `flux-adapters batch` process, killed with SIGKILL at random points and run again.

Each kill comes once the provider has received a random number of this run's requests (from
9, so that answers have come back too, to 30): always with the batch under way and requests in
flight, whatever the machine's speed.

At the end every job is saved exactly once or reported, the report parses line by line, and the
emulator's billing ledger shows no job done twice (no --resend-unconfirmed was given).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from flux_adapters._files import image_format
from flux_adapters.emulator import Fault, run_emulator

JOBS = 200


def command(source: Path, folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flux_adapters",
        "batch",
        str(source),
        "-o",
        str(folder),
        "-p",
        "laozhang",
        "--concurrency",
        "8",
    ]


def test_a_batch_killed_five_times_never_does_a_job_twice(tmp_path: Path) -> None:
    source, folder = tmp_path / "jobs.jsonl", tmp_path / "out"
    lines = [
        json.dumps({"id": f"job-{n:03d}", "prompt": f"crash job {n}", "size": "256x256", "seed": n})
        for n in range(JOBS)
    ]
    source.write_text("\n".join(lines) + "\n")
    rng = random.Random(20261122)
    with run_emulator() as emulator:
        emulator.inject("laozhang", Fault(delay=0.1))  # so that kills land with jobs in flight
        environment = os.environ | {
            "LAOZHANG_API_KEY": "test-key",
            "LAOZHANG_BASE_URL": emulator.base_url("laozhang"),
        }
        kills = []
        for _ in range(5):
            received, after = len(emulator.calls()), rng.randint(9, 30)
            process = subprocess.Popen(
                command(source, folder),
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 60
            while (
                len(emulator.calls()) < received + after
                and process.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            kills.append((after, len(emulator.billed())))
        emulator.clear_faults()  # no kill to land now: the rest of the jobs at full speed
        final = subprocess.run(
            command(source, folder), env=environment, capture_output=True, text=True, timeout=120
        )
        ledger = Counter(entry.prompt for entry in emulator.billed())

    assert kills[0][1] > 0, kills  # the first kill came with the batch under way
    assert len({billed for _, billed in kills}) > 1, kills  # and the later ones did work too
    assert "Traceback" not in final.stderr

    # The report parses line by line, whatever the kills tore.
    report = [json.loads(line) for line in (folder / "report.jsonl").read_text().splitlines()]
    last_run = {str(line["id"]): line for line in report[-JOBS:]}
    assert set(last_run) == {f"job-{n:03d}" for n in range(JOBS)}  # every job accounted for

    statuses = Counter(str(line["status"]) for line in last_run.values())
    assert set(statuses) <= {"ok", "skipped", "unconfirmed"}, statuses
    assert final.returncode == (8 if statuses["unconfirmed"] else 0), final.stdout

    # Saved exactly once: one image per saved job, no other file of its name, nothing partial.
    images = Counter(
        path.name.split(".")[0]
        for path in folder.iterdir()
        if path.suffix in (".png", ".jpeg", ".webp")
    )
    for name, line in last_run.items():
        if line["status"] == "unconfirmed":
            assert images[name] == 0, name
        else:
            assert images[name] == 1, name
            [file] = folder.glob(f"{name}.*")
            assert image_format(file.read_bytes()[:16]) is not None
    assert not [path for path in folder.iterdir() if path.suffix == ".part"]

    # No job was ever done (and billed) twice.
    assert max(ledger.values()) == 1, ledger.most_common(3)
    assert sum(ledger.values()) >= statuses["ok"] + statuses["skipped"]
