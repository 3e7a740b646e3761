"""PixelForge: a fictional FLUX reseller with a wire format of its own (a worked example).

This package lives outside flux-adapters and is validated by the conformance suite from one test
module (tests/test_conformance.py); docs/validating-a-provider.md walks through it.

Wire shape: ``POST {base}/api/v2/render`` with JSON ``{"engine", "text", "references": [{"url"}
| {"data", "type"}], "canvas": {"w", "h"}, "seed", "format"}``; the answer is
``{"job", "outputs": [{"href"}]}``; errors are ``{"error_code", "message"}``.

Known quirk: a rate-limited render is a 429 that gives the wait in its body, in milliseconds
(``{"error_code": "rate_limited", "message", "retry_in_ms"}``), and sends no ``Retry-After``
header. This adapter does not read ``retry_in_ms`` yet, so its `errors.RateLimited` carries no
``retry_after``: the conformance scenario ``error-429`` fails on that, declared as a deviation
in tests/cassettes/pixelforge/deviations.toml.

Limits (from PixelForge's imaginary documentation): FLUX.2 [pro] only, up to 4 references,
canvases in multiples of 64 from 256 to 1536, png or jpeg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from attrs import frozen

from flux_adapters import errors
from flux_adapters.limits import IMAGE_KINDS, MB, ImageRule, IntRange, ModelLimits, Plan, SizeRule
from flux_adapters.providers import Answer
from flux_adapters.providers.answers import parse_error
from flux_adapters.request import EditRequest, UrlImage
from flux_adapters.result import ResultImage
from flux_adapters.wire import HttpRequest, HttpResponse, ImageValue, JsonBody, JsonValue

__all__ = ["PixelforgeAdapter"]

_DOC: Final = "https://docs.pixelforge.example/api/v2/render (fictional)"

LIMITS: Final[Mapping[str, ModelLimits]] = {
    "flux-2-pro": ModelLimits(
        provider="pixelforge",
        model="flux-2-pro",
        wire_model="flux-2-pro",
        images=IntRange(0, 4),
        sizes=SizeRule(multiple=64, min_side=256, max_side=1536),
        ratios=None,
        image=ImageRule(
            kinds=frozenset(IMAGE_KINDS),
            max_bytes=10 * MB,
            max_pixels=16_000_000,
            formats=frozenset({"png", "jpeg"}),
        ),
        safety_tolerance=None,
        prompt_upsampling=False,
        output_formats=("png", "jpeg"),
        source=_DOC,
    )
}


@frozen
class _Output:
    href: str


@frozen
class _Rendered:
    job: str
    outputs: list[_Output]


class PixelforgeAdapter:
    """Translate requests to and from PixelForge's render API. Sends nothing itself."""

    name: ClassVar[str] = "pixelforge"
    default_base_url: ClassVar[str] = "https://api.pixelforge.example"
    env_prefix: ClassVar[str] = "PIXELFORGE"
    limits: ClassVar[Mapping[str, ModelLimits]] = LIMITS

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """Return the one POST that renders *request*."""
        references: list[JsonValue] = []
        for image in request.images:
            if isinstance(image, UrlImage):
                references.append({"url": image.url})
            else:
                references.append({"data": ImageValue(image), "type": image.info.media_type})
        body: dict[str, JsonValue] = {"engine": plan.wire_model, "text": request.prompt}
        if references:
            body["references"] = references
        if plan.dimensions is not None:
            body["canvas"] = {"w": plan.dimensions[0], "h": plan.dimensions[1]}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.output_format is not None:
            body["format"] = request.output_format
        return HttpRequest(method="POST", url=f"{base_url}/api/v2/render", body=JsonBody(body))

    def parse_response(self, response: HttpResponse) -> Answer:
        """Read a successful answer."""
        import cattrs

        try:
            rendered = cattrs.Converter().structure(response.json(), _Rendered)
        except Exception as exc:  # not JSON, or not the documented shape
            raise errors.ResponseFormatError(
                "the answer is not PixelForge's documented shape", provider=self.name,
                status_code=response.status_code, excerpt=response.text()[:200],
            ) from exc  # fmt: skip
        if not rendered.outputs:
            raise errors.ResponseFormatError(
                "the answer holds no image", provider=self.name, status_code=response.status_code
            )
        return Answer(images=tuple(ResultImage(url=output.href) for output in rendered.outputs))

    def parse_error(self, response: HttpResponse) -> errors.ProviderError:
        """PixelForge's ``{"error_code", "message"}``, read like any common error shape."""
        return parse_error(self.name, response)
