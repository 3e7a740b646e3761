"""The conformance suite: scenarios, recorded cassettes, and the base class providers subclass.

- `SCENARIOS` (``scenarios``): what every adapter is checked for, with stable ids.
- `run_scenario`, `record`, `write_report` (``runner``): replay with the network blocked,
  record again (emulator, live provider, or any base URL), and the provider x scenario report.
- `scan_for_secrets`, `RecordingFailed`: what a recording run checks before it replaces any
  cassette (every scenario passed, no secret in any form), and what it raises when not.
- `ConformanceSuite` (``suite``): subclass it in one test module (needs pytest).

Install the ``conformance`` extra (pytest, vcrpy, PyYAML); without it, replaying or recording
raises `errors.MissingExtraError`, which says what to install. See docs/validating-a-provider.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flux_adapters.conformance.runner import (
    RecordingFailed,
    Verdict,
    record,
    run_scenario,
    scan_for_secrets,
    write_report,
)
from flux_adapters.conformance.scenarios import SCENARIOS, Scenario

if TYPE_CHECKING:
    from flux_adapters.conformance.suite import ConformanceSuite

__all__ = [
    "SCENARIOS",
    "ConformanceSuite",
    "RecordingFailed",
    "Scenario",
    "Verdict",
    "record",
    "run_scenario",
    "scan_for_secrets",
    "write_report",
]


def __getattr__(name: str) -> object:
    if name == "ConformanceSuite":  # imports pytest: only when a test module asks for it
        from flux_adapters.conformance.suite import ConformanceSuite

        return ConformanceSuite
    raise AttributeError(f"module 'flux_adapters.conformance' has no attribute {name!r}")
