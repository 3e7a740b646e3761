"""apiyi.com: FLUX.2 (pro / max / flex / klein) and FLUX.1 Kontext in two dialects.

Documents: https://docs.apiyi.com/api-capabilities/flux/image-edit (JSON) and the multipart
reference of ``/v1/images/edits`` (https://docs.apiyi.com/api-capabilities/flux/image-edit.md).

Wire shapes:
- ``apiyi``: ``POST {base}/v1/images/generations``, JSON, reference images in ``input_image`` ..
  ``input_image_8`` (URL or data URL); no images means text-to-image. Output size is set only by
  ``aspect_ratio``; without it the output matches the first input image.
- ``apiyi-multipart``: ``POST {base}/v1/images/edits``, ``multipart/form-data`` with one
  repeated ``image[]`` file part per reference image, in order ("the upload order becomes the
  index reference for image 1 / image 2 / image 3"), and text fields ``size`` or ``width`` +
  ``height``, ``seed``, ``safety_tolerance``, ``output_format``, ``steps``, ``guidance``.

Both answer ``data[0].url`` (no ``b64_json``), signed on delivery-eu/us.bfl.ai for 10 minutes.

Quirks:
- "FLUX.2 [pro/max/flex] up to 8, FLUX.2 [klein] up to 4, FLUX.1 Kontext supports 1 natively".
- "Each image <= 20MB or 20MP, formats png / jpg / webp".
- Multipart sizes: "min 64x64, max 4MP; dimensions must be multiples of 16".
- ``steps`` (1-50) and ``guidance`` (1.5-10) are "Only flux-2-flex".
- ``prompt_upsampling`` exists in the JSON dialect only; BFL gives FLUX.2 [klein] no upsampling
  control, so it is refused there.
- apiyi does not document the range of ``aspect_ratio``; we accept BFL's documented range for
  Kontext, 21:9 to 9:21, for every model.
- The multipart endpoint uploads files; an image given by URL is refused (download it, or use
  the ``apiyi`` JSON dialect, which passes the URL on).
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
    NumberRange,
    Plan,
    RatioRule,
    SizeRule,
)
from flux_adapters.providers._bfl_json import build_bfl_style_body
from flux_adapters.providers._images_api import ImagesApiAnswers
from flux_adapters.request import EditRequest, FileImage, UrlImage
from flux_adapters.wire import FilePart, HttpRequest, JsonBody, MultipartBody

__all__ = ["JSON_LIMITS", "MULTIPART_LIMITS", "ApiyiAdapter", "ApiyiMultipartAdapter"]

_JSON_DOC: Final = "https://docs.apiyi.com/api-capabilities/flux/image-edit"
_MULTIPART_DOC: Final = (
    "https://docs.apiyi.com/api-capabilities/flux/image-edit.md (POST /v1/images/edits)"
)

_FORMATS: Final = frozenset({"png", "jpeg", "webp"})
_JSON_IMAGES: Final = ImageRule(
    kinds=frozenset(IMAGE_KINDS), max_bytes=20 * MB, max_pixels=20_000_000, formats=_FORMATS
)
_UPLOADS: Final = ImageRule(
    kinds=frozenset({"data_url", "file", "bytes"}),
    max_bytes=20 * MB,
    max_pixels=20_000_000,
    formats=_FORMATS,
)
_RATIOS: Final = RatioRule(narrowest=(9, 21), widest=(21, 9))
_SIZES: Final = SizeRule(multiple=16, min_side=64, max_pixels=4 * MEGAPIXEL)

_MAX_IMAGES: Final = {
    "flux-2-pro": 8,
    "flux-2-max": 8,
    "flux-2-flex": 8,
    "flux-2-klein-9b": 4,
    "flux-2-klein-4b": 4,
    "flux-kontext-max": 1,
    "flux-kontext-pro": 1,
}


# "Only flux-2-flex": steps 1 <= x <= 50, guidance 1.5 <= x <= 10.
_FLEX_STEPS: Final = IntRange(1, 50)
_FLEX_GUIDANCE: Final = NumberRange(1.5, 10)


def _json_row(model: str, max_images: int) -> ModelLimits:
    return ModelLimits(
        provider="apiyi",
        model=model,
        wire_model=model,
        images=IntRange(0, max_images),
        sizes=None,
        ratios=_RATIOS,
        image=_JSON_IMAGES,
        safety_tolerance=IntRange(0, 6),
        prompt_upsampling="klein" not in model,
        output_formats=("jpeg", "png"),
        source=_JSON_DOC,
        steps=_FLEX_STEPS if model == "flux-2-flex" else None,
        guidance=_FLEX_GUIDANCE if model == "flux-2-flex" else None,
    )


def _multipart_row(model: str, max_images: int) -> ModelLimits:
    return ModelLimits(
        provider="apiyi-multipart",
        model=model,
        wire_model=model,
        images=IntRange(1, max_images),
        sizes=_SIZES,
        size_string=True,
        ratios=None,
        image=_UPLOADS,
        safety_tolerance=IntRange(0, 6),
        prompt_upsampling=False,
        output_formats=("jpeg", "png"),
        source=_MULTIPART_DOC,
        steps=_FLEX_STEPS if model == "flux-2-flex" else None,
        guidance=_FLEX_GUIDANCE if model == "flux-2-flex" else None,
    )


JSON_LIMITS: Final[Mapping[str, ModelLimits]] = {m: _json_row(m, n) for m, n in _MAX_IMAGES.items()}
MULTIPART_LIMITS: Final[Mapping[str, ModelLimits]] = {
    m: _multipart_row(m, n) for m, n in _MAX_IMAGES.items()
}


class ApiyiAdapter(ImagesApiAnswers):
    """Translate requests to and from apiyi.com's JSON FLUX endpoint. Sends nothing itself."""

    name: ClassVar[str] = "apiyi"
    default_base_url: ClassVar[str] = "https://api.apiyi.com"
    env_prefix: ClassVar[str] = "APIYI"
    limits: ClassVar[Mapping[str, ModelLimits]] = JSON_LIMITS

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """Return the one POST that performs *request*."""
        body = JsonBody(build_bfl_style_body(request, plan))
        return HttpRequest(method="POST", url=f"{base_url}/v1/images/generations", body=body)


class ApiyiMultipartAdapter(ImagesApiAnswers):
    """Translate requests to and from apiyi.com's multipart edit endpoint. Sends nothing itself."""

    name: ClassVar[str] = "apiyi-multipart"
    default_base_url: ClassVar[str] = "https://api.apiyi.com"
    env_prefix: ClassVar[str] = "APIYI"
    limits: ClassVar[Mapping[str, ModelLimits]] = MULTIPART_LIMITS

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """Return the one multipart POST that performs *request*."""
        fields: list[tuple[str, str]] = [("model", plan.wire_model), ("prompt", request.prompt)]
        if plan.dimensions is not None:
            width, height = plan.dimensions
            if plan.size_string:
                fields.append(("size", f"{width}x{height}"))
            else:
                fields += [("width", str(width)), ("height", str(height))]
        settings = {
            "seed": request.seed,
            "safety_tolerance": request.safety_tolerance,
            "output_format": request.output_format,
            "steps": request.steps,
            "guidance": request.guidance,
        }
        fields += [(key, str(value)) for key, value in settings.items() if value is not None]
        files = []
        for index, image in enumerate(request.images):
            if isinstance(image, UrlImage):  # pragma: no cover - the limits refuse URL images here
                raise TypeError("apiyi-multipart uploads local images only")
            name = (
                image.path.name
                if isinstance(image, FileImage)
                else f"image-{index + 1}.{image.info.format}"
            )
            files.append(FilePart("image[]", name, image))
        body = MultipartBody(fields=tuple(fields), files=tuple(files))
        return HttpRequest(method="POST", url=f"{base_url}/v1/images/edits", body=body)
