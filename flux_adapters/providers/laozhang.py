"""laozhang.ai: FLUX.2 and FLUX.1 Kontext through one OpenAI-style JSON endpoint.

Documents: https://docs.laozhang.ai/en/api-capabilities/flux-image-edit (editing) and
https://docs.laozhang.ai/en/api-capabilities/flux-image-generation (generation
overview).

Wire shape: ``POST {base}/v1/images/generations`` with a JSON body. Reference images are string
fields ``input_image``, ``input_image_2`` .. ``input_image_8`` (public URL or data URL); without
them the call is text-to-image. The answer is ``data[0].url``, valid for about 10 minutes.

Quirks:
- Size is ``size: "WxH"`` or ``width`` + ``height``, "use this or width / height, not both";
  sides 64-2048 "preferably divisible by 16". We refuse off-grid sizes rather than let the
  provider adjust them unseen.
- Kontext takes no size, only ``aspect_ratio`` (the docs' ``extra_body.aspect_ratio``, which
  the OpenAI SDK merges into the top level of the body), "from 3:7 to 7:3", about 1 MP.
- The text-to-image parameter table lists ``n`` (only 1); the edit table does not. We send
  ``n: 1`` for text-to-image only, as each document's examples do.
- No ``steps``/``guidance`` are documented, even for flex; they are refused.
- "Do not use /v1/images/edits or multipart" for FLUX.2: its multipart endpoint takes one file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from flux_adapters.limits import (
    IMAGE_KINDS,
    MB,
    MEGAPIXEL,
    ImageRule,
    IntRange,
    ModelLimits,
    Plan,
    RatioRule,
    SizeRule,
)
from flux_adapters.providers._bfl_json import build_bfl_style_body
from flux_adapters.providers._images_api import ImagesApiAnswers
from flux_adapters.request import EditRequest
from flux_adapters.wire import HttpRequest, JsonBody

__all__ = ["LIMITS", "LaozhangAdapter"]

_EDIT_DOC: Final = "https://docs.laozhang.ai/en/api-capabilities/flux-image-edit"
_OVERVIEW_DOC: Final = "https://docs.laozhang.ai/en/api-capabilities/flux-image-generation"

# laozhang documents no per-image limit; these are the limits of the BFL API it forwards to
# (20 MB / 20 MP, png/jpeg/webp), the same apiyi documents for the same upstream.
_IMAGES: Final = ImageRule(
    kinds=frozenset(IMAGE_KINDS),
    max_bytes=20 * MB,
    max_pixels=20_000_000,
    formats=frozenset({"png", "jpeg", "webp"}),
)
_FLUX2_SIZES: Final = SizeRule(multiple=16, min_side=64, max_side=2048, max_pixels=4 * MEGAPIXEL)
_KONTEXT_RATIOS: Final = RatioRule(narrowest=(3, 7), widest=(7, 3))


def _flux2(model: str) -> ModelLimits:
    return ModelLimits(
        provider="laozhang",
        model=model,
        wire_model=model,
        images=IntRange(0, 8),
        sizes=_FLUX2_SIZES,
        size_string=True,
        ratios=None,
        image=_IMAGES,
        safety_tolerance=IntRange(0, 6),
        prompt_upsampling=True,
        output_formats=("jpeg", "png"),
        source=f"{_EDIT_DOC} (Parameters, Important Notes); {_OVERVIEW_DOC} (Parameter Details)",
    )


def _kontext(model: str) -> ModelLimits:
    return ModelLimits(
        provider="laozhang",
        model=model,
        wire_model=model,
        images=IntRange(0, 1),
        sizes=None,
        ratios=_KONTEXT_RATIOS,
        image=_IMAGES,
        safety_tolerance=IntRange(0, 6),
        prompt_upsampling=True,
        output_formats=("jpeg", "png"),
        source=f"{_OVERVIEW_DOC} (Legacy Flux Kontext Ratios, Important Notes)",
    )


LIMITS: Final[Mapping[str, ModelLimits]] = {
    "flux-2-pro": _flux2("flux-2-pro"),
    "flux-2-flex": _flux2("flux-2-flex"),
    "flux-2-max": _flux2("flux-2-max"),
    "flux-kontext-pro": _kontext("flux-kontext-pro"),
    "flux-kontext-max": _kontext("flux-kontext-max"),
}


class LaozhangAdapter(ImagesApiAnswers):
    """Translate requests to and from laozhang.ai's FLUX endpoint. Sends nothing itself."""

    name: ClassVar[str] = "laozhang"
    default_base_url: ClassVar[str] = "https://api.laozhang.ai"
    env_prefix: ClassVar[str] = "LAOZHANG"
    limits: ClassVar[Mapping[str, ModelLimits]] = LIMITS

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """Return the one POST that performs *request*."""
        body = build_bfl_style_body(request, plan)
        if not request.images:
            body["n"] = 1
        return HttpRequest(
            method="POST", url=f"{base_url}/v1/images/generations", body=JsonBody(body)
        )
