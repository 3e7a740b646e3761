"""fal.ai's queue: submit to an app, poll its status, fetch the result, cancel if it is late.

Documents: https://docs.fal.ai/documentation/model-apis/inference/queue (the queue API) and
fal's generated endpoint types (https://github.com/fal-ai/fal-js, ``libs/client/src/types/
endpoints.ts``) for the FLUX.2 apps' fields; prices from each app's page
(``https://fal.ai/models/<app>/llms.txt``).

Wire shape: ``POST {base}/<app>`` (``https://queue.fal.run/fal-ai/flux-2-pro/edit``) with JSON
and ``Authorization: Key <key>``; the answer is ``{request_id, status_url, response_url,
cancel_url}``. ``GET status_url`` answers ``{status: IN_QUEUE | IN_PROGRESS | COMPLETED,
queue_position}``; once ``COMPLETED``, ``GET response_url`` gives the app's output
(``{images: [{url, content_type, width, height}], seed}``) or the error the app failed with.
``PUT cancel_url`` cancels a request that has not finished.

Quirks:
- An edit has its own app (``.../edit``) and takes ``image_urls`` (URLs or data URIs); the status
  and result URLs leave that sub-path out, so they are followed as returned.
- Field names differ from BFL's: ``image_size`` (``{width, height}`` or a preset name),
  ``guidance_scale``, ``num_inference_steps``; ``safety_tolerance`` is a *string* "1".."5".
- "Server errors (HTTP 500+) are never charged ... invalid inputs (HTTP 422) may still be
  charged" (https://fal.ai/docs/documentation/model-apis/faq.md).
- FLUX.2 [klein] and FLUX.1 Kontext are offered here as edits only (the apps this library knows
  take images); Kontext takes one ``image_url``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from flux_adapters.limits import (
    IMAGE_KINDS,
    MB,
    MEGAPIXEL,
    ImageRule,
    IntRange,
    ModelLimits,
    NumberRange,
    RatioRule,
    SizeRule,
)
from flux_adapters.prices import PerMegapixel, Price

__all__ = ["LIMITS", "PRICES"]

_QUEUE: Final = "https://docs.fal.ai/documentation/model-apis/inference/queue"
_TYPES: Final = (
    "https://github.com/fal-ai/fal-js/blob/381105e138b85502b528fb8f6c16d909e30e462a/"
    "libs/client/src/types/endpoints.ts"
)

# fal documents no per-image byte limit; these are the limits of the BFL upstream of its
# BFL-hosted tiers, the same the resellers document.
_IMAGES: Final = ImageRule(
    kinds=frozenset(IMAGE_KINDS),
    max_bytes=20 * MB,
    max_pixels=20_000_000,
    formats=frozenset({"png", "jpeg", "webp"}),
)
# ImageSize {width, height} carries no grid in fal's types; the BFL-hosted tiers render on
# BFL's (multiples of 16, at least 64 px, at most 4 MP), so that grid is enforced.
_SIZES: Final = SizeRule(multiple=16, min_side=64, max_pixels=4 * MEGAPIXEL)
_PRESETS: Final = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "3:4": "portrait_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}
_PRESET_RATIOS: Final = RatioRule(narrowest=(9, 16), widest=(16, 9), presets=_PRESETS)
# Kontext's aspect_ratio enum, sent as it is.
_KONTEXT_RATIOS: Final = RatioRule(
    narrowest=(9, 21),
    widest=(21, 9),
    presets={r: r for r in ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")},
)


def _bfl_hosted(model: str, *, flex: bool = False) -> ModelLimits:
    return ModelLimits(
        provider="fal",
        model=model,
        wire_model=f"fal-ai/{model}",
        edit_wire_model=f"fal-ai/{model}/edit",
        # fal's types set no maximum for these apps; third-party copies of its pages say 9 (pro)
        # and 10 (max). They are BFL-hosted, and BFL's API takes 8: a ninth image risks a 422,
        # which fal may charge, so 8 is offered until fal documents more.
        images=IntRange(0, 8),
        sizes=_SIZES,
        ratios=_PRESET_RATIOS,
        image=_IMAGES,
        seed=IntRange(0),
        safety_tolerance=IntRange(1, 5),  # sent as the string "1".."5"
        steps=IntRange(1, 50) if flex else None,  # num_inference_steps (BFL's bounds)
        guidance=NumberRange(1.5, 10) if flex else None,  # guidance_scale (BFL's bounds)
        prompt_upsampling=False,
        output_formats=("jpeg", "png"),
        source=f"{_TYPES} (Flux2ProEditInput, Flux2FlexEditInput); {_QUEUE}",
    )


def _klein(model: str, size: str) -> ModelLimits:
    return ModelLimits(
        provider="fal",
        model=model,
        wire_model=f"fal-ai/flux-2/klein/{size}/edit",
        images=IntRange(1, 4),  # "A maximum of 4 images are allowed"
        sizes=_SIZES,
        ratios=_PRESET_RATIOS,
        image=_IMAGES,
        seed=IntRange(0),
        safety_tolerance=None,  # Flux2Klein4bEditInput has no safety_tolerance
        prompt_upsampling=False,
        output_formats=("jpeg", "png", "webp"),
        source=f"{_TYPES} (Flux2Klein4bEditInput); {_QUEUE}",
    )


def _kontext(model: str, app: str) -> ModelLimits:
    return ModelLimits(
        provider="fal",
        model=model,
        wire_model=app,
        images=IntRange(1, 1),  # one image_url
        sizes=None,
        ratios=_KONTEXT_RATIOS,
        image=_IMAGES,
        seed=IntRange(0),
        safety_tolerance=IntRange(1, 6),  # sent as the string "1".."6"
        prompt_upsampling=False,
        output_formats=("jpeg", "png"),
        source=f"{_TYPES} (FluxKontextInput); {_QUEUE}",
    )


LIMITS: Final[Mapping[str, ModelLimits]] = {
    "flux-2-pro": _bfl_hosted("flux-2-pro"),
    "flux-2-max": _bfl_hosted("flux-2-max"),
    "flux-2-flex": _bfl_hosted("flux-2-flex", flex=True),
    "flux-2-klein-4b": _klein("flux-2-klein-4b", "4b"),
    "flux-2-klein-9b": _klein("flux-2-klein-9b", "9b"),
    "flux-kontext-pro": _kontext("flux-kontext-pro", "fal-ai/flux-pro/kontext"),
    "flux-kontext-max": _kontext("flux-kontext-max", "fal-ai/flux-pro/kontext/max"),
}


def _price(first: float, extra: float, app: str) -> PerMegapixel:
    # "first output MP + per extra MP of input and output, rounded up"
    source = f"https://fal.ai/models/fal-ai/{app}/llms.txt"
    return PerMegapixel(
        usd_first=first, usd_extra=extra, usd_input=extra, source=source, as_of="2026-11-22"
    )


PRICES: Final[Mapping[str, Price]] = {
    "flux-2-pro": _price(0.03, 0.015, "flux-2-pro/edit"),
    "flux-2-max": _price(0.07, 0.03, "flux-2-max/edit"),
    "flux-2-flex": _price(0.05, 0.05, "flux-2-flex/edit"),
}
"""fal's documented per-megapixel prices (the edit apps' pages; text-to-image has no inputs)."""
