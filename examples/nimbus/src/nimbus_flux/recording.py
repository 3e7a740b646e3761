"""Record the conformance suite's failure scenarios against Nimbus's sandbox.

    NIMBUS_API_KEY=sandbox-key python -m nimbus_flux.recording \\
        --base-url http://127.0.0.1:8766 --cassettes examples/nimbus/tests/cassettes

``flux-adapters conformance --record --base-url`` records what a server answers when nothing
goes wrong. The scenarios whose failure only a server that misbehaves on purpose produces (402,
429, 503, an unreadable 200, moderation, and the ways a job ends without an image) it leaves
unrecorded, since a live provider does not fail on request. Nimbus's sandbox does: every task
sent under ``/sandbox/<outcome>`` ends that way (`nimbus_flux.sandbox.OUTCOMES`). This records
each such scenario against its outcome's base URL with the public
`flux_adapters.conformance.record`, so its cassettes are scrubbed, scanned and written (or
refused, replacing nothing) exactly as the command's are; the URLs in them are rewritten to
Nimbus's own, and each cassette says where it was recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

from flux_adapters.conformance import SCENARIOS, RecordingFailed, record
from nimbus_flux import NimbusAdapter

__all__ = ["FAILURES", "main"]

FAILURES: Final[Mapping[str, str]] = {
    "error-402": "no-credits",
    "error-429": "rate-limited",
    "error-5xx": "overloaded",
    "malformed-200": "malformed",
    "moderation": "prompt-blocked",
    "job-request-moderated": "blocked",
    "job-content-moderated": "blocked-output",
    "job-failed": "failed",
    "job-not-found": "expired",
    "job-deadline": "stuck",
}
"""Scenario id -> the sandbox outcome that produces its failure. A scenario the installed
flux-adapters does not have, or that does not apply to an asynchronous provider, is passed by."""


def main(argv: list[str] | None = None) -> int:
    """Record every failure scenario the sandbox can produce; 0 when all were recorded."""
    parser = argparse.ArgumentParser(
        prog="python -m nimbus_flux.recording",
        description="Record the conformance suite's failure scenarios against Nimbus's sandbox.",
    )
    parser.add_argument("--base-url", required=True, help="the sandbox, e.g. http://127.0.0.1:8766")
    parser.add_argument(
        "--cassettes", type=Path, required=True, help="the folder holding nimbus/<scenario>.yaml"
    )
    parser.add_argument("--key-env", default="NIMBUS_API_KEY", help="default: NIMBUS_API_KEY")
    arguments = parser.parse_args(argv)
    key = os.environ.get(arguments.key_env, "")
    if not key:
        print(
            f"nimbus recording: set ${arguments.key_env} (the sandbox takes any key)",
            file=sys.stderr,
        )
        return 2
    adapter = NimbusAdapter()
    base = arguments.base_url.rstrip("/")
    for scenario in SCENARIOS:
        outcome = FAILURES.get(scenario.id)
        if scenario.fault is None or outcome is None:
            continue  # recorded by flux-adapters conformance --record, or not producible here
        print(f"{scenario.id}: against {base}/sandbox/{outcome}", flush=True)
        try:
            verdicts = record(
                adapter,
                arguments.cassettes / adapter.name,
                api_key=key,
                base_url=f"{base}/sandbox/{outcome}",
                scenarios=[attrs.evolve(scenario, fault=None)],  # the sandbox is the fault
            )
        except RecordingFailed as failed:
            print(f"nimbus recording: {failed}", file=sys.stderr)
            return 1
        if not verdicts:
            print(f"  {scenario.id} does not apply to nimbus: not recorded")
    left = [s.id for s in SCENARIOS if s.fault is not None and s.id not in FAILURES]
    if left:
        print(f"no sandbox outcome for {', '.join(left)} (unsupported, or left unrecorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
