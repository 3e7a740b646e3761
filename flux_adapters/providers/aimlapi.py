"""aimlapi.com (AI/ML API): FLUX.2 [pro] under its own model ids, references as ``image_urls``.

Documents: https://docs.aimlapi.com/api-references/image-models/flux/flux-2-pro-edit (edit) and
https://docs.aimlapi.com/api-references/image-models/flux/flux-2-pro (text-to-image); schemas in
https://github.com/aimlapi/api-docs (docs/api-references/image-models/flux/*.json).

Wire shape: ``POST {base}/v1/images/generations`` with JSON. Text-to-image uses the model id
``blackforestlabs/flux-2-pro``; an edit uses ``blackforestlabs/flux-2-pro-edit`` and lists its
references in ``image_urls`` ("URLs or local Base64 encoded images"). The answer is
``{"data": [{"url", "b64_json"}], "meta": {"usage": {...}}}``.

Quirks:
- ``image_urls`` takes 1 to 3 images (schema ``minItems: 1, maxItems: 3``), not BFL's 8.
- ``image_size`` is ``{"width", "height"}`` from 512 to 2048, "must be a multiple of 32" (not 16),
  or a preset name; the presets cover 1:1, 4:3, 3:4, 16:9 and 9:16, so those aspect ratios are
  sent as presets.
- ``prompt`` has ``maxLength: 4000``; ``seed`` has ``minimum: 1``.
- ``safety_tolerance`` is a *string*; the page says "1 being the most strict and 5 being the most
  permissive" while the JSON schema's enum runs to "6". We follow the page: "1" to "5".
- The document's own Python example sends ``"guidance_scale": 19``, which the pro-edit schema
  does not list; its sibling flux-2-edit schema takes ``guidance_scale`` 0 to 20. `guidance` is
  sent as ``guidance_scale`` within that range.
- ``meta.usage`` holds ``credits_used`` in the schema and ``tokens_used`` in the example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from flux_adapters.limits import (
    IMAGE_KINDS,
    MB,
    ImageRule,
    IntRange,
    ModelLimits,
    NumberRange,
    Plan,
    RatioRule,
    SizeRule,
)
from flux_adapters.providers._images_api import ImagesApiAnswers
from flux_adapters.request import EditRequest
from flux_adapters.wire import HttpRequest, JsonBody, JsonValue, json_image

__all__ = ["LIMITS", "AimlapiAdapter"]

_EDIT_DOC: Final = "https://docs.aimlapi.com/api-references/image-models/flux/flux-2-pro-edit"
_T2I_DOC: Final = "https://docs.aimlapi.com/api-references/image-models/flux/flux-2-pro"

# The preset names of the image_size enum, and the aspect ratio each renders.
_PRESETS: Final = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "3:4": "portrait_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}

LIMITS: Final[Mapping[str, ModelLimits]] = {
    "flux-2-pro": ModelLimits(
        provider="aimlapi",
        model="flux-2-pro",
        wire_model="blackforestlabs/flux-2-pro",
        edit_wire_model="blackforestlabs/flux-2-pro-edit",
        images=IntRange(0, 3),
        sizes=SizeRule(multiple=32, min_side=512, max_side=2048),
        ratios=RatioRule(narrowest=(9, 16), widest=(16, 9), presets=_PRESETS),
        # aimlapi documents no per-image byte limit; these are the BFL upstream's.
        image=ImageRule(
            kinds=frozenset(IMAGE_KINDS),
            max_bytes=20 * MB,
            max_pixels=20_000_000,
            formats=frozenset({"png", "jpeg", "webp"}),
        ),
        prompt_max_chars=4000,
        seed=IntRange(1),
        safety_tolerance=IntRange(1, 5),
        guidance=NumberRange(0, 20),
        prompt_upsampling=False,
        output_formats=("jpeg", "png", "webp"),
        source=f"{_EDIT_DOC} (API Schema); {_T2I_DOC}",
    ),
}


class AimlapiAdapter(ImagesApiAnswers):
    """Translate requests to and from aimlapi.com's image endpoint. Sends nothing itself."""

    name: ClassVar[str] = "aimlapi"
    default_base_url: ClassVar[str] = "https://api.aimlapi.com"
    env_prefix: ClassVar[str] = "AIMLAPI"
    limits: ClassVar[Mapping[str, ModelLimits]] = LIMITS
    # The answer schema has "data": [{"url", "b64_json"}]; the others document only "url".
    result_forms: ClassVar[frozenset[str]] = frozenset({"url", "b64_json"})

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """Return the one POST that performs *request*."""
        body: dict[str, JsonValue] = {"model": plan.wire_model, "prompt": request.prompt}
        if request.images:
            body["image_urls"] = [json_image(image) for image in request.images]
        if plan.dimensions is not None:
            body["image_size"] = {"width": plan.dimensions[0], "height": plan.dimensions[1]}
        elif plan.preset is not None:
            body["image_size"] = plan.preset
        settings: dict[str, JsonValue] = {
            "output_format": request.output_format,
            "seed": request.seed,
            "safety_tolerance": None
            if request.safety_tolerance is None
            else str(request.safety_tolerance),
            "guidance_scale": request.guidance,
        }
        body.update({key: value for key, value in settings.items() if value is not None})
        return HttpRequest(
            method="POST", url=f"{base_url}/v1/images/generations", body=JsonBody(body)
        )
