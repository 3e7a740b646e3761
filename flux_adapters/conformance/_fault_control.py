"""The fault-control protocol, the recorder's side: ask a sandbox to misbehave on request.

Failures a live service will not produce on request (402, 429, 5xx, an unreadable 200,
moderation, a job that fails or never ends) are recorded against a sandbox that produces them
when told to. Any sandbox can be told, in two requests on the base URL it is recorded at
(without a trailing ``/v1``, as every recorded URL)::

    POST   {base_url}/__flux/faults   {"status": 429, "retry_after": 7}
    DELETE {base_url}/__flux/faults

The POST's body is the scenario's emulator `Fault`, its fields that differ from their defaults
(`build_fault_body`). The sandbox applies it to every submit (the paid request: the call, or a
job's POST) until the DELETE, and answers:

- 2xx: armed; the scenario is recorded;
- 422: it cannot produce that fault; the scenario is not recorded, and the run says so by id;
- anything else, or no answer: the scenario fails (its sandbox refused or broke).

A recording run first sends the DELETE, as a probe: a 2xx means the sandbox speaks the protocol;
any other answer (a 404, 405 or 501) or none means it does not, and every fault scenario is
reported "not recorded" with that reason. After each fault scenario the DELETE clears the fault. No request of
the protocol carries the recording key (the fault endpoint needs none), and none is recorded in
a cassette. The emulator speaks it at ``/<prefix>/__flux/faults``; docs/validating-a-provider.md
shows a sandbox that does in under 40 lines.

The meaning of each answer is decided by pure functions (`probe_problem`, `arming`); `FaultControl`
only sends.
"""

from __future__ import annotations

import json
import time
from typing import Final, Literal

import httpx
from attrs import frozen

from flux_adapters import errors
from flux_adapters._transport import bounded_by, send_within
from flux_adapters.emulator._faults import FAULTS_PATH, Fault, build_fault_body

__all__ = ["Arming", "FaultControl", "arming", "probe_problem"]

Arming = Literal["armed", "cannot", "refused"]
_TIMEOUT: Final = 10.0
DEADLINE: Final = 30.0
"""The longest one request of the protocol may take, answer included: a sandbox that drips its
answer a byte at a time, each within `_TIMEOUT`, is given up then."""
ANSWER_BYTES: Final = 64 * 1024
"""The most of an answer that is read: the sandbox's words are cut to `_MESSAGE_CHARS` anyway."""
_MESSAGE_CHARS: Final = 200
_WHO: Final = "the fault-control protocol"


def _said(data: bytes) -> str:
    """The sandbox's own words (its JSON ``message`` or ``detail``, else its text), cut short."""
    text = data.decode("utf-8", errors="replace")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        body = None
    text = text[: _MESSAGE_CHARS * 4]
    if isinstance(body, dict):
        inner = body.get("error")
        source = inner if isinstance(inner, dict) else body
        for key in ("message", "detail"):
            if isinstance(source.get(key), str):
                text = source[key]
                break
    return " ".join(text.split())[:_MESSAGE_CHARS]


def probe_problem(url: str, status: int | None, failure: str = "") -> str:
    """Why the sandbox at *url* does not speak the protocol, from its answer to the probe.

    Empty when it does (a 2xx). *status* is ``None`` when there was no answer (*failure* says why).
    """
    if status is None:
        return f"DELETE {url} got no answer ({failure})"
    if 200 <= status < 300:
        return ""
    return f"DELETE {url} answered {status}: it does not speak the fault-control protocol"


def arming(status: int) -> Arming:
    """What the answer to a POST of a fault means: armed, cannot produce it, or refused."""
    if 200 <= status < 300:
        return "armed"
    return "cannot" if status == 422 else "refused"


@frozen
class FaultControl:
    """The protocol spoken to one base URL, over *http* (never with the recording key)."""

    base_url: str
    http: httpx.Client

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + FAULTS_PATH

    @property
    def shown(self) -> str:
        """`url` as messages show it: without a password the base URL may carry."""
        url = httpx.URL(self.url)
        return str(url.copy_with(userinfo=b"")) if url.userinfo else self.url

    def _send(self, method: str, body: object = None) -> tuple[int, bytes]:
        """Send one request of the protocol: its status and the start of its answer.

        Bounded whatever the sandbox does: the whole exchange within `DEADLINE` (a sandbox that
        drips its answer is given up), at most `ANSWER_BYTES` of the answer read (an endless one
        is not read whole), no redirect followed (the key-less request stays on this host).

        Raises:
            httpx.HTTPError: No answer.
            errors.Timeout: No answer within `DEADLINE`.
        """
        ends = time.monotonic() + DEADLINE
        request = self.http.build_request(
            method,
            self.url,
            json=body,
            # Raw bytes, so that a compressed answer cannot grow past the cap as it is read.
            headers={"Accept-Encoding": "identity", "Connection": "close"},
            timeout=_TIMEOUT,
        )
        data = b""
        with bounded_by(ends, _WHO, DEADLINE):
            response = send_within(self.http, request, ends, _WHO, DEADLINE)
            try:
                for chunk in response.iter_raw():
                    data += chunk
                    if len(data) >= ANSWER_BYTES or time.monotonic() >= ends:
                        break
            finally:
                response.close()
        return response.status_code, data[:ANSWER_BYTES]

    def probe(self) -> str:
        """Clear any fault armed before; empty when the sandbox speaks the protocol, else why not."""
        try:
            status, _ = self._send("DELETE")
        except (httpx.HTTPError, errors.FluxError) as exc:
            return probe_problem(self.shown, None, f"{type(exc).__name__}: {str(exc)[:100]}")
        return probe_problem(self.shown, status)

    def arm(self, fault: Fault) -> tuple[Arming, str]:
        """Ask for *fault* on the next submits: how the sandbox took it, and in what words.

        Raises:
            httpx.HTTPError: No answer (the scenario's failure).
            errors.Timeout: No answer within `DEADLINE` (the scenario's failure).
        """
        body = build_fault_body(fault)
        status, data = self._send("POST", body)
        said = _said(data)
        words = f"POST {self.shown} {body} answered {status}"
        return arming(status), words + (f": {said}" if said else "")

    def clear(self) -> str:
        """Clear the armed fault; empty when the sandbox confirmed it, else what went wrong."""
        try:
            status, _ = self._send("DELETE")
        except (httpx.HTTPError, errors.FluxError) as exc:
            return (
                f"DELETE {self.shown} got no answer ({type(exc).__name__}); the fault may be armed"
            )
        if 200 <= status < 300:
            return ""
        return f"DELETE {self.shown} answered {status}; the fault may be armed"
