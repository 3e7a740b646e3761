"""Reading providers' answers: the pieces the built-in adapters use, for adapters of your own.

An adapter in another package (see docs/validating-a-provider.md) reads its provider's answers
with these, so that it treats hostile or broken answers as the built-in adapters do: every
value checked for its kind before it is used, bodies cut to a bound before any pattern runs,
the provider's own words cut and redacted before they reach an error, and every failure a
`flux_adapters.errors.FluxError`.

Error answers (any status >= 300):

- `parse_error`: the typed error for an error answer in any common shape (OpenAI-style
  ``{"error": {"message", "code"}}``, ``{"message"}``, ``{"detail"}``, plain text, a gateway's
  HTML page), keeping the real status code. `flux_adapters.jobs.JobAdapterBase` uses it as its
  ``parse_error``; an adapter whose provider has codes of its own maps those first and leaves
  the rest to it.
- `retry_after`: seconds from a ``Retry-After`` header (seconds or an HTTP date), bounded.

Success answers:

- `parse_images`: an OpenAI-style ``{"data": [{"url"} | {"b64_json"}]}`` answer, for a reseller
  that speaks the OpenAI Images API.
- `json_object`, `required_text`, `required_url`, `number`, `words`: the fields of a JSON
  answer (a job's id, its polling URL, a progress figure, the provider's words on a failure).
- `url_problem`: what is wrong with a URL an answer gave (not http(s), no host, control
  characters), or ``""``.
- `unreadable`: the `flux_adapters.errors.ResponseFormatError` for an answer of the wrong shape,
  with a short redacted excerpt of the body.

All are pure: they read an `flux_adapters.wire.HttpResponse` (or a value from one) and never
send, sleep or log.
"""

from __future__ import annotations

from flux_adapters.providers._images_api import parse_error, parse_images, retry_after, url_problem
from flux_adapters.providers._job_answers import (
    json_object,
    number,
    required_text,
    required_url,
    unreadable,
    words,
)

__all__ = [
    "json_object",
    "number",
    "parse_error",
    "parse_images",
    "required_text",
    "required_url",
    "retry_after",
    "unreadable",
    "url_problem",
    "words",
]
