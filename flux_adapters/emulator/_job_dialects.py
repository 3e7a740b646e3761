"""What BFL's and fal's queues accept, checked the way their documents describe, for the emulator.

Each dialect reads the JSON body of a submit and returns a `Submission` or the `Problem`s the
provider answers with a 422. Both speak FastAPI's validation shape, ``{"detail": [{"loc",
"msg", "type"}]}``: BFL's OpenAPI document answers ``HTTPValidationError``
(https://docs.bfl.ml/api-reference/utility/get-result.md), fal's model errors are "a ``detail``
array of typed error objects" with ``loc``, ``msg``, ``type`` (https://docs.fal.ai/errors).

The field vocabulary is written out here from each document: BFL's FLUX.2 and Kontext API
references (see `flux_adapters.providers.bfl`), fal's generated endpoint types
(``Flux2MaxEditInput``, ``Flux2FlexEditInput``, ``Flux2Klein4bEditInput``, ``FluxKontextInput``
in https://github.com/fal-ai/fal-js ``libs/client/src/types/endpoints.ts``). The numbers (image
counts, size grids, ranges, formats) come from the ``LIMITS`` rows of `flux_adapters.providers.bfl`
and `flux_adapters.providers.fal`, the rows the adapters use.

Like the other dialects, these are strict where the real services may be lenient: an unknown
field is refused, so that a client that sends one is caught here rather than silently ignored
there.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Mapping
from typing import Final

from attrs import frozen
from PIL import Image

from flux_adapters.emulator._dialects import (
    AIMLAPI_PRESETS,
    Job,
    _Check,
    _decode_image,
    _ratio_size,
    _reference,
)
from flux_adapters.emulator.images import placeholder
from flux_adapters.limits import MEGAPIXEL, ModelLimits, SizeRule
from flux_adapters.providers import bfl as bfl_data
from flux_adapters.providers import fal as fal_data

__all__ = ["FAL_APPS", "Problem", "Submission", "bfl", "fal"]

_IMAGE_FIELDS: Final = ("input_image", *(f"input_image_{n}" for n in range(2, 9)))
_URL: Final = re.compile(r"https?://\S+")
# BFL's webhook_url: "length 1-2083" (the Kontext API reference).
_WEBHOOK_URL_MAX: Final = 2083
# fal's image_size presets (the same names aimlapi mirrors) and the sizes they render.
FAL_PRESETS: Final = AIMLAPI_PRESETS
# Emulator choices where fal's types name a field without bounds: num_images (fal's apps commonly
# take 1..4), klein's num_inference_steps and Kontext's guidance_scale.
_NUM_IMAGES: Final = (1, 4)
_KLEIN_STEPS: Final = (1, 50)
_KONTEXT_GUIDANCE: Final = (1.0, 20.0)


@frozen
class Problem:
    """One entry of a 422's ``detail``: where, what, and the machine-readable kind."""

    loc: tuple[str | int, ...]
    msg: str
    type: str


@frozen(kw_only=True)
class Submission:
    """A submit the provider accepts: the job to render, and how its answer is shaped.

    Attributes:
        job: What to render.
        app: The BFL model path or the fal app id it was submitted to.
        family: fal's output shape: ``"bfl-hosted"`` (``{images, seed}``) or ``"fal-hosted"``
            (adds ``prompt``, ``has_nsfw_concepts``, ``timings``); ``"bfl"`` at BFL.
        num_images: Images to render (fal's ``num_images``).
        sync_mode: fal's ``sync_mode``: the images come back as data URIs, not URLs.
    """

    job: Job
    app: str
    family: str
    num_images: int = 1
    sync_mode: bool = False


class _Problems:
    """Collects the problems of one body."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, field: str | tuple[str | int, ...], msg: str, kind: str = "value_error") -> None:
        loc = (field,) if isinstance(field, str) else field
        self.items.append(Problem(("body", *loc), msg, kind))

    def take(self, check: _Check, field: str | tuple[str | int, ...]) -> None:
        """Move the messages the shared helpers of `_dialects` noted into *field*'s problems."""
        for message in check.problems:
            self.add(field, message)
        check.problems.clear()


def _unknown(body: Mapping[str, object], allowed: set[str], problems: _Problems) -> None:
    for key in body:
        if key not in allowed:
            problems.add(key, "Extra inputs are not permitted", "extra_forbidden")


def _prompt(body: Mapping[str, object], problems: _Problems) -> str:
    prompt = body.get("prompt")
    if "prompt" not in body:
        problems.add("prompt", "Field required", "missing")
    elif not isinstance(prompt, str):
        problems.add("prompt", "Input should be a valid string", "string_type")
    elif not prompt.strip():
        problems.add("prompt", "prompt must not be empty")
    else:
        return prompt
    return ""


def _integer(
    body: Mapping[str, object],
    name: str,
    problems: _Problems,
    low: int,
    high: int | None = None,
    *,
    within: str | None = None,
) -> int | None:
    if name not in body:
        return None
    value = body[name]
    field = (within, name) if within else name
    if not isinstance(value, int) or isinstance(value, bool):
        problems.add(field, "Input should be a valid integer", "int_type")
        return None
    if value < low:
        problems.add(field, f"Input should be greater than or equal to {low}", "greater_than_equal")
        return None
    if high is not None and value > high:
        problems.add(field, f"Input should be less than or equal to {high}", "less_than_equal")
        return None
    return value


def _number(
    body: Mapping[str, object], name: str, problems: _Problems, low: float, high: float
) -> None:
    if name not in body:
        return
    value = body[name]
    if not isinstance(value, int | float) or isinstance(value, bool):
        problems.add(name, "Input should be a valid number", "float_type")
    elif not low <= value <= high:
        problems.add(name, f"Input should be from {low:g} to {high:g}", "value_error")


def _boolean(body: Mapping[str, object], name: str, problems: _Problems) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        problems.add(name, "Input should be a valid boolean", "bool_type")
        return False
    return value


def _choice(
    body: Mapping[str, object], name: str, allowed: tuple[str, ...], default: str, p: _Problems
) -> str:
    value = body.get(name, default)
    if value not in allowed:
        quoted = ", ".join(f"'{item}'" for item in allowed)
        p.add(name, f"Input should be one of {quoted}; got {value!r}", "literal_error")
        return default
    return str(value)


def _sized(width: int, height: int, rule: SizeRule, field: str, problems: _Problems) -> bool:
    found = [message for message, _ in rule.violations(width, height, "size")]
    for message in found:
        problems.add(field, f"{message} ({width}x{height}; {rule.describe()})")
    return not found


def _model_size(reference: Image.Image | None, rule: SizeRule | None) -> tuple[int, int]:
    """The size a model picks when none is asked for: the first image's, on the provider's grid.

    BFL: "Omit them and the model picks the size"; fal's edit apps: ``auto``, "the size will be
    determined by the model", and klein "uses the input image size". Without an image: 1024x1024.
    """
    if reference is None:
        return 1024, 1024
    width, height = reference.size
    if rule is None:
        return _about_one_megapixel(width, height)
    scale = min(1.0, math.sqrt(rule.max_pixels / (width * height))) if rule.max_pixels else 1.0

    def on_grid(side: float) -> int:
        return max(rule.min_side, int(side * scale) // rule.multiple * rule.multiple)

    return on_grid(width), on_grid(height)


def _about_one_megapixel(width: int, height: int) -> tuple[int, int]:
    # Kontext: "All outputs are ~1MP total" (https://bfl.mintlify.app/kontext/kontext_text_to_image).
    exact = math.sqrt(MEGAPIXEL * width / height)
    return max(16, round(exact / 16) * 16), max(16, round(exact * height / width / 16) * 16)


def _job(
    provider: str,
    limits: ModelLimits,
    prompt: str,
    references: list[Image.Image],
    size: tuple[int, int],
    output_format: str,
    seed: int | None,
) -> Job:
    return Job(
        provider=provider,
        model=limits.model,
        prompt=prompt,
        references=tuple(references),
        width=size[0],
        height=size[1],
        output_format=output_format,
        seed=seed,
    )


# --- BFL ------------------------------------------------------------------------------------


def _bfl_image(
    value: object, field: str, limits: ModelLimits, problems: _Problems
) -> Image.Image | None:
    """A reference as BFL documents it: "Base64 encoded image or URL".

    A ``data:`` URL is neither: BFL's own SDK and examples send the bare base64 of the file, so
    the emulator refuses the prefix rather than guess that BFL strips it.
    """
    if not isinstance(value, str):
        problems.add(field, "Input should be a valid string", "string_type")
        return None
    if _URL.fullmatch(value):
        return placeholder(value)
    if value.startswith("data:"):
        problems.add(
            field,
            "must be a URL or base64 without a data: prefix (BFL: 'Base64 encoded image or URL')",
        )
        return None
    try:
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        problems.add(field, "is neither an http(s) URL nor valid base64")
        return None
    check = _Check()
    image = _decode_image(data, field, limits, check)
    problems.take(check, field)
    return image


def bfl(model: str, body: Mapping[str, object]) -> Submission | list[Problem]:
    """A submit to BFL's ``POST /v1/<model>`` (FLUX.2 and FLUX.1 Kontext)."""
    limits = bfl_data.LIMITS[model]
    problems = _Problems()
    allowed = {"prompt", "seed", "safety_tolerance", "output_format", "webhook_url"}
    allowed |= {"webhook_secret", *_IMAGE_FIELDS}
    allowed |= {"width", "height"} if limits.sizes is not None else set()
    allowed |= {"aspect_ratio"} if limits.ratios is not None else set()
    allowed |= {"prompt_upsampling"} if limits.prompt_upsampling else set()
    allowed |= {"steps"} if limits.steps is not None else set()
    allowed |= {"guidance"} if limits.guidance is not None else set()
    _unknown(body, allowed, problems)
    prompt = _prompt(body, problems)

    present = [name for name in _IMAGE_FIELDS if name in body]
    if present != list(_IMAGE_FIELDS[: len(present)]):
        problems.add(present[-1], "reference images must be numbered without gaps")
    most = limits.images.high or 0
    if len(present) > most:
        problems.add(present[most], f"{model} takes at most {most} reference images")
    decoded = [(name, _bfl_image(body[name], name, limits, problems)) for name in present[:most]]
    references = [image for _, image in decoded if image is not None]
    # FLUX.2 [pro]: "9MP total limit" of its references; a URL's placeholder is not counted,
    # as the library cannot count it before sending either.
    uploaded = sum(
        image.width * image.height
        for name, image in decoded
        if image is not None and not _URL.fullmatch(str(body[name]))
    )
    total = limits.image.max_total_pixels
    if total is not None and uploaded > total:
        problems.add(
            present[0],
            f"the reference images have {uploaded / MEGAPIXEL:.2f} MP together; "
            f"{model} takes at most {total / MEGAPIXEL:g} MP in all",
        )

    seed = _integer(body, "seed", problems, limits.seed.low)
    tolerance = limits.safety_tolerance
    if tolerance is not None:
        _integer(body, "safety_tolerance", problems, tolerance.low, tolerance.high)
    output_format = _choice(body, "output_format", limits.output_formats, "jpeg", problems)
    if "prompt_upsampling" in body:
        _boolean(body, "prompt_upsampling", problems)
    if limits.steps is not None:
        _integer(body, "steps", problems, limits.steps.low, limits.steps.high)
    if limits.guidance is not None:
        _number(body, "guidance", problems, limits.guidance.low, limits.guidance.high)
    if "webhook_url" in body:
        url = body["webhook_url"]
        if not isinstance(url, str) or not _URL.fullmatch(url) or len(url) > _WEBHOOK_URL_MAX:
            problems.add("webhook_url", "must be an http(s) URL of at most 2083 characters")
    if "webhook_secret" in body and not isinstance(body["webhook_secret"], str):
        problems.add("webhook_secret", "Input should be a valid string", "string_type")

    first = references[0] if references else None
    size = _model_size(first, limits.sizes)
    if limits.sizes is not None and ("width" in body or "height" in body):
        width = _integer(body, "width", problems, 1)
        height = _integer(body, "height", problems, 1)
        if "width" not in body or "height" not in body:
            problems.add(
                "width" if "width" not in body else "height", "width and height go together"
            )
        elif (
            width is not None
            and height is not None
            and _sized(width, height, limits.sizes, "width", problems)
        ):
            size = (width, height)
    if limits.ratios is not None:
        if "aspect_ratio" in body:
            check = _Check()
            size = _ratio_size(body["aspect_ratio"], limits, check) or size
            problems.take(check, "aspect_ratio")
        elif first is not None:
            size = _about_one_megapixel(*first.size)
    if problems.items:
        return problems.items
    job = _job("bfl", limits, prompt, references, size, output_format, seed)
    return Submission(job=job, app=model, family="bfl")


# --- fal ------------------------------------------------------------------------------------


def _fal_apps() -> dict[str, tuple[str, str]]:
    """Each fal app id of `fal.LIMITS`, with its model and the field family it takes."""
    apps: dict[str, tuple[str, str]] = {}
    for model, row in fal_data.LIMITS.items():
        if row.edit_wire_model is not None:
            apps[row.wire_model] = (model, "text")
            apps[row.edit_wire_model] = (model, "edit")
        elif row.sizes is None:
            apps[row.wire_model] = (model, "kontext")
        else:
            apps[row.wire_model] = (model, "klein")
    return apps


FAL_APPS: Final = _fal_apps()
"""fal app id -> (model, family): ``text`` and ``edit`` for the BFL-hosted tiers
(``Flux2MaxInput`` / ``Flux2MaxEditInput``, flex adding steps and guidance), ``klein``
(``Flux2Klein4bEditInput``), ``kontext`` (``FluxKontextInput``)."""

_FAL_FIELDS: Final = {
    "text": {"prompt", "image_size", "seed", "safety_tolerance", "output_format",
             "enable_safety_checker", "sync_mode"},
    "edit": {"prompt", "image_urls", "image_size", "seed", "safety_tolerance", "output_format",
             "enable_safety_checker", "sync_mode"},
    "klein": {"prompt", "image_urls", "image_size", "seed", "output_format",
              "enable_safety_checker", "sync_mode", "num_images", "num_inference_steps"},
    # FluxKontextInput has no enable_safety_checker.
    "kontext": {"prompt", "image_url", "aspect_ratio", "seed", "safety_tolerance", "output_format",
                "sync_mode", "num_images", "guidance_scale", "enhance_prompt"},
}  # fmt: skip


def _fal_images(
    body: Mapping[str, object], family: str, limits: ModelLimits, problems: _Problems
) -> list[Image.Image]:
    if family == "kontext":
        if "image_url" not in body:
            problems.add("image_url", "Field required", "missing")
            return []
        named: list[tuple[str | tuple[str | int, ...], object]] = [("image_url", body["image_url"])]
    elif family == "text":
        return []
    else:
        urls = body.get("image_urls")
        if "image_urls" not in body:
            problems.add("image_urls", "Field required", "missing")
            return []
        if not isinstance(urls, list):
            problems.add("image_urls", "Input should be a valid list", "list_type")
            return []
        # The edit apps need an image to edit, though the row (shared with text-to-image) says 0.
        low, high = max(1, limits.images.low), limits.images.high or 0
        if not low <= len(urls) <= high:
            problems.add(
                "image_urls", f"takes {low} to {high} images; got {len(urls)}", "value_error"
            )
            return []
        named = [(("image_urls", index), url) for index, url in enumerate(urls)]
    references = []
    for field, value in named:
        check = _Check()
        shown = field if isinstance(field, str) else f"{field[0]}[{field[1]}]"
        image = _reference(value, shown, limits, check)
        problems.take(check, field)
        if image is not None:
            references.append(image)
    return references


def _fal_size(
    body: Mapping[str, object],
    family: str,
    limits: ModelLimits,
    first: Image.Image | None,
    problems: _Problems,
) -> tuple[int, int]:
    if family == "kontext":
        if "aspect_ratio" not in body:
            return _about_one_megapixel(*first.size) if first else (1024, 1024)
        presets = limits.ratios.presets if limits.ratios and limits.ratios.presets else {}
        ratio = body["aspect_ratio"]
        if ratio not in presets:
            quoted = ", ".join(f"'{item}'" for item in presets)
            problems.add("aspect_ratio", f"Input should be one of {quoted}", "literal_error")
            return 1024, 1024
        width, height = (int(part) for part in str(ratio).split(":"))
        return _about_one_megapixel(width, height)
    # Flux2MaxInput: "Default value: landscape_4_3"; the edit apps: auto.
    default = "landscape_4_3" if family == "text" else "auto"
    value = body.get("image_size", default)
    if value == "auto" and family != "edit" and "image_size" in body:
        problems.add("image_size", "'auto' is only for the BFL-hosted edit apps", "literal_error")
    elif isinstance(value, str):
        if value in FAL_PRESETS:
            return FAL_PRESETS[value]
        if value != "auto":
            names = ", ".join([*FAL_PRESETS, "auto"] if family == "edit" else FAL_PRESETS)
            problems.add("image_size", f"Input should be one of {names} or {{width, height}}")
    elif isinstance(value, dict):
        if set(value) != {"width", "height"}:
            problems.add("image_size", "image_size must have exactly width and height")
        else:
            asked_width = _integer(value, "width", problems, 1, within="image_size")
            asked_height = _integer(value, "height", problems, 1, within="image_size")
            if (
                asked_width is not None
                and asked_height is not None
                and limits.sizes is not None
                and _sized(asked_width, asked_height, limits.sizes, "image_size", problems)
            ):
                return asked_width, asked_height
    else:
        problems.add("image_size", "image_size must be a preset name or {width, height}")
    return _model_size(first, limits.sizes)


def fal(app: str, body: Mapping[str, object]) -> Submission | list[Problem]:
    """A submit to fal's queue, ``POST https://queue.fal.run/<app>``."""
    model, family = FAL_APPS[app]
    limits = fal_data.LIMITS[model]
    problems = _Problems()
    allowed = set(_FAL_FIELDS[family])
    if family in ("text", "edit") and limits.steps is not None:
        allowed |= {"num_inference_steps", "guidance_scale"}  # Flux2FlexEditInput
    _unknown(body, allowed, problems)
    prompt = _prompt(body, problems)
    references = _fal_images(body, family, limits, problems)
    seed = _integer(body, "seed", problems, limits.seed.low)
    tolerance = limits.safety_tolerance
    if tolerance is not None and "safety_tolerance" in body:
        # A *string*: safety_tolerance?: "1" | "2" | "3" | "4" | "5" (Flux2MaxEditInput).
        accepted = tuple(str(level) for level in range(tolerance.low, (tolerance.high or 0) + 1))
        _choice(body, "safety_tolerance", accepted, accepted[0], problems)
    # Flux2Klein4bEditInput: output_format "Default value: png"; the others jpeg.
    default_format = "png" if family == "klein" else "jpeg"
    output_format = _choice(body, "output_format", limits.output_formats, default_format, problems)
    for name in ("enable_safety_checker", "enhance_prompt"):
        if name in body:
            _boolean(body, name, problems)
    sync_mode = _boolean(body, "sync_mode", problems)
    num_images = _integer(body, "num_images", problems, *_NUM_IMAGES) or 1
    if limits.steps is not None:
        _integer(body, "num_inference_steps", problems, limits.steps.low, limits.steps.high)
    elif family == "klein":
        _integer(body, "num_inference_steps", problems, *_KLEIN_STEPS)
    if limits.guidance is not None:
        _number(body, "guidance_scale", problems, limits.guidance.low, limits.guidance.high)
    elif family == "kontext":
        _number(body, "guidance_scale", problems, *_KONTEXT_GUIDANCE)
    size = _fal_size(body, family, limits, references[0] if references else None, problems)
    if problems.items:
        return problems.items
    job = _job("fal", limits, prompt, references, size, output_format, seed)
    shape = "bfl-hosted" if family in ("text", "edit") else "fal-hosted"
    return Submission(job=job, app=app, family=shape, num_images=num_images, sync_mode=sync_mode)
