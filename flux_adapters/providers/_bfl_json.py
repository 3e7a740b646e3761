"""JSON fields of the Black Forest Labs API, which laozhang and apiyi forward under the same names.

BFL's FLUX.2 request takes the first reference image as ``input_image`` and the next ones as
``input_image_2`` .. ``input_image_8`` (https://docs.bfl.ai/flux_2/flux2_image_editing); both
resellers keep those names and the settings' names (``seed``, ``safety_tolerance``, ...).
"""

from __future__ import annotations

from typing import Final

from flux_adapters.limits import Plan
from flux_adapters.request import EditRequest
from flux_adapters.wire import JsonValue, json_image

__all__ = ["build_bfl_style_body", "image_field"]

_SETTINGS: Final = (
    "seed",
    "output_format",
    "safety_tolerance",
    "prompt_upsampling",
    "steps",
    "guidance",
)
"""The request's settings BFL's API takes under the same names, in the order they are sent."""


def image_field(index: int) -> str:
    """``input_image`` for the first image, then ``input_image_2`` .. ``input_image_8``."""
    return "input_image" if index == 0 else f"input_image_{index + 1}"


def build_bfl_style_body(
    request: EditRequest, plan: Plan, *, model: bool = True, bare: bool = False
) -> dict[str, JsonValue]:
    """The JSON fields of BFL's API: model, prompt, numbered images, settings.

    laozhang and apiyi take them all; BFL itself names the model in the path (*model* false)
    and takes local images as plain base64 (*bare*).
    """
    body: dict[str, JsonValue] = {"model": plan.wire_model} if model else {}
    body["prompt"] = request.prompt
    for index, image in enumerate(request.images):
        body[image_field(index)] = json_image(image, bare=bare)
    if plan.dimensions is not None:
        width, height = plan.dimensions
        if plan.size_string:
            body["size"] = f"{width}x{height}"
        else:
            body["width"], body["height"] = width, height
    if plan.ratio is not None:
        body["aspect_ratio"] = plan.ratio_text
    for key in _SETTINGS:  # those set, in this order
        value = getattr(request, key)
        if value is not None:
            body[key] = value
    return body
