"""Provider limits as data, and the one check that enforces them.

Each provider module declares one `ModelLimits` row per model it offers, citing the document the
numbers come from. `check` compares an `EditRequest` with one row and reports *every* violation;
`plan` does the same and, when nothing is violated, returns the `Plan` the adapter translates:
the wire model id, the size in the form the provider takes, and any conversion the caller allowed.

Nothing is rounded, truncated or dropped quietly: a setting the provider cannot take exactly is a
violation unless the request has ``allow_conversions=True``, in which case the nearest form the
provider takes is used and reported as a `ConversionWarning`.

A message that advises what to pass instead names the request's arguments as Python does:
``allow_conversions=True``, ``aspect_ratio="7:4"``, ``width/height`` (the pair). The command
line rewrites exactly these spellings into its flags (``flux_adapters.cli``), so keep to them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final, Literal, TypeAlias

from attrs import field, frozen

from flux_adapters._display import render_value
from flux_adapters._files import format_name
from flux_adapters.errors import RequestError, Violation
from flux_adapters.request import DataUrlImage, EditRequest, FileImage, ImageInput, UrlImage
from flux_adapters.result import ConversionWarning

__all__ = [
    "IMAGE_KINDS",
    "ImageKind",
    "ImageRule",
    "IntRange",
    "ModelLimits",
    "NumberRange",
    "Plan",
    "RatioRule",
    "SizeRule",
    "image_kind",
    "plan",
]

ImageKind: TypeAlias = Literal["url", "data_url", "file", "bytes"]
IMAGE_KINDS: Final[tuple[ImageKind, ...]] = ("url", "data_url", "file", "bytes")

MB: Final = 1024 * 1024
MEGAPIXEL: Final = 1024 * 1024
# Where a provider only takes a ratio, it renders about one megapixel (laozhang's Kontext table).
_CONVERSION_PIXELS: Final = MEGAPIXEL


@frozen
class IntRange:
    """Whole numbers from ``low`` to ``high`` (inclusive); ``high=None`` means no upper bound."""

    low: int
    high: int | None = None

    def __contains__(self, value: object) -> bool:
        return (
            isinstance(value, int)
            and self.low <= value
            and (self.high is None or value <= self.high)
        )

    def __str__(self) -> str:
        return f"{self.low}..{self.high}" if self.high is not None else f">= {self.low}"


@frozen
class NumberRange:
    """Numbers from ``low`` to ``high`` inclusive."""

    low: float
    high: float

    def __contains__(self, value: object) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.low:g}..{self.high:g}"


@frozen(kw_only=True)
class SizeRule:
    """Explicit output sizes a provider takes: a grid, side bounds and a pixel ceiling."""

    multiple: int
    min_side: int
    max_side: int | None = None
    max_pixels: int | None = None

    def describe(self) -> str:
        """The rule as a phrase, e.g. ``"multiples of 32 from 512 to 2048"``."""
        upper = f" to {self.max_side}" if self.max_side else ""
        text = f"multiples of {self.multiple} from {self.min_side}{upper} px"
        if self.max_pixels:
            text += f", at most {self.max_pixels / MEGAPIXEL:g} MP"
        return text

    def fits(self, width: int, height: int) -> bool:
        """Whether ``width x height`` is on the grid and within every bound."""
        return not any(self.violations(width, height, "size"))

    def within_bounds(self, width: int, height: int) -> bool:
        """Whether ``width x height`` is within the side bounds and the pixel ceiling (grid aside)."""
        sides_fit = all(
            self.min_side <= side and (self.max_side is None or side <= self.max_side)
            for side in (width, height)
        )
        return sides_fit and (self.max_pixels is None or width * height <= self.max_pixels)

    def nearest(self, width: int, height: int) -> tuple[tuple[int, int], ...]:
        """The valid sizes nearest to ``width x height``: the one below and the one above.

        Below: each side rounded down to the grid; above: each side rounded up. Each is kept
        within the side bounds and, past the pixel ceiling, scaled down to it (keeping its shape).
        Sizes that still do not fit, and ``width x height`` itself, are left out: empty when no
        size near it is valid.
        """
        grid = self.multiple
        if grid <= 0 or max(width, height) > 10**9 or min(width, height) <= 0:
            return ()  # a hand-made rule or size past any real image: no suggestion
        lowest = -(-self.min_side // grid) * grid
        highest = None if self.max_side is None else self.max_side // grid * grid

        def side(value: int, up: bool) -> int:
            snapped = max(lowest, -(-value // grid) * grid if up else value // grid * grid)
            return snapped if highest is None else min(snapped, highest)

        found: list[tuple[int, int]] = []
        for up in (False, True):
            across, down = side(width, up), side(height, up)
            if self.max_pixels is not None and across * down > self.max_pixels:
                scale = math.sqrt(self.max_pixels / (across * down))
                across = max(lowest, int(across * scale) // grid * grid)
                down = max(lowest, int(down * scale) // grid * grid)
            candidate = (across, down)
            if self.fits(*candidate) and candidate != (width, height) and candidate not in found:
                found.append(candidate)
        return tuple(found)

    def violations(self, width: int, height: int, name: str) -> Iterable[tuple[str, str]]:
        """Yield ``(message, value)`` for each way ``width x height`` breaks the rule."""
        for side, value in (("width", width), ("height", height)):
            if value % self.multiple:
                yield (
                    f"{side} is not a multiple of {self.multiple}",
                    f"{side} {render_value(value)}",
                )
            if value < self.min_side or (self.max_side is not None and value > self.max_side):
                yield f"{side} is out of range", f"{side} {render_value(value)}"
        pixels = width * height
        if self.max_pixels is not None and pixels > self.max_pixels:
            yield (
                "the image has too many pixels",
                f"{name} {render_value(width)}x{render_value(height)} = {_megapixels(pixels)}",
            )


@frozen(kw_only=True)
class RatioRule:
    """Aspect ratios a provider takes.

    Attributes:
        narrowest: The tallest ratio accepted, e.g. ``(3, 7)``.
        widest: The widest ratio accepted, e.g. ``(7, 3)``.
        presets: When set, only these ratios are accepted, each sent as the named preset.
    """

    narrowest: tuple[int, int]
    widest: tuple[int, int]
    presets: Mapping[str, str] | None = None

    def describe(self) -> str:
        """The rule as a phrase."""
        if self.presets is not None:
            return "one of " + ", ".join(self.presets)
        return f"from {self.narrowest[0]}:{self.narrowest[1]} to {self.widest[0]}:{self.widest[1]}"

    def accepts(self, width: int, height: int) -> bool:
        """Whether the ratio ``width:height`` is accepted."""
        if width <= 0 or height <= 0:
            return False
        if self.presets is not None:
            return self.preset(width, height) is not None
        # narrowest <= width/height <= widest, multiplied out: exact for whole numbers of any
        # size, where float division would round or overflow.
        (low_w, low_h), (high_w, high_h) = self.narrowest, self.widest
        return low_w * height <= width * low_h and width * high_h <= high_w * height

    def preset(self, width: int, height: int) -> str | None:
        """The preset the ratio ``width:height`` is sent as, or ``None`` when it is none of them.

        Ratios are compared in lowest terms: a preset listed as ``"21:9"`` is the ratio 7:3.
        """
        if self.presets is None or width <= 0 or height <= 0:
            return None
        wanted = _ratio_text(width, height)
        for ratio, name in self.presets.items():
            across, _, down = ratio.partition(":")
            usable = across.isdigit() and down.isdigit() and int(across) > 0 and int(down) > 0
            if usable and _ratio_text(int(across), int(down)) == wanted:
                return name
        return None


@frozen(kw_only=True)
class ImageRule:
    """What each reference image must be.

    Attributes:
        kinds: How images may be given: a URL the provider fetches, a data URL, a local file or
            bytes (the last three are "local": checked here from their headers).
        max_bytes: Largest local image, in bytes.
        max_pixels: Most pixels in a local image.
        formats: Accepted formats of local images.
        max_total_pixels: Most pixels in all local images of one call together, when limited
            (a URL's size is unknown here: it is left out).
    """

    kinds: frozenset[ImageKind]
    max_bytes: int
    max_pixels: int
    formats: frozenset[str]
    max_total_pixels: int | None = None


@frozen(kw_only=True)
class ModelLimits:
    """What one provider documents about one model. Data, not code.

    Attributes:
        provider: Provider id, e.g. ``"aimlapi"``.
        model: Canonical model id, e.g. ``"flux-2-pro"``.
        wire_model: The model id sent on the wire.
        edit_wire_model: The id sent when the request has images, if it differs.
        images: How many reference images one call takes.
        sizes: Explicit sizes the provider takes, or ``None`` when it takes none.
        size_string: Whether a ``size: "WxH"`` field exists beside width/height.
        ratios: Aspect ratios it takes, or ``None`` when it takes none.
        image: What each reference image must be.
        prompt_max_chars: Longest prompt in characters, when limited.
        seed: Accepted seeds.
        safety_tolerance: Accepted moderation levels, or ``None`` when the field does not exist.
        steps: Accepted inference steps, or ``None`` when the model has no such setting.
        guidance: Accepted guidance, or ``None`` when the model has no such setting.
        prompt_upsampling: Whether the setting exists.
        output_formats: Accepted output formats.
        source: The document the numbers come from.
    """

    provider: str
    model: str
    wire_model: str
    edit_wire_model: str | None = None
    images: IntRange
    sizes: SizeRule | None
    size_string: bool = False
    ratios: RatioRule | None
    image: ImageRule
    prompt_max_chars: int | None = None
    seed: IntRange = IntRange(0)
    safety_tolerance: IntRange | None
    steps: IntRange | None = None
    guidance: NumberRange | None = None
    prompt_upsampling: bool
    output_formats: tuple[str, ...]
    source: str = field(repr=False)


@frozen(kw_only=True)
class Plan:
    """A request that fits a provider's limits, resolved into what the adapter sends.

    Attributes:
        limits: The row the request was checked against.
        wire_model: The model id to send.
        dimensions: Output ``(width, height)`` to send, if any.
        size_string: Send ``dimensions`` as ``"WxH"`` rather than width and height.
        ratio: Output aspect ratio to send as ``(w, h)``, if any.
        preset: Named size preset to send, if any.
        warnings: Conversions made because the request allowed them.
    """

    limits: ModelLimits
    wire_model: str
    dimensions: tuple[int, int] | None = None
    size_string: bool = False
    ratio: tuple[int, int] | None = None
    preset: str | None = None
    warnings: tuple[ConversionWarning, ...] = ()

    @property
    def ratio_text(self) -> str | None:
        """``ratio`` written ``"W:H"``."""
        return None if self.ratio is None else f"{self.ratio[0]}:{self.ratio[1]}"


def image_kind(image: ImageInput) -> ImageKind:
    """How *image* is given: ``"url"``, ``"data_url"``, ``"file"`` or ``"bytes"``."""
    if isinstance(image, UrlImage):
        return "url"
    if isinstance(image, DataUrlImage):
        return "data_url"
    if isinstance(image, FileImage):
        return "file"
    return "bytes"


def _ratio_text(width: int, height: int) -> str:
    divisor = math.gcd(width, height) or 1
    return f"{render_value(width // divisor)}:{render_value(height // divisor)}"


def _megapixels(pixels: int) -> str:
    # A float division that could overflow only past any real image; say so instead of raising.
    if pixels > 10**15:
        return "more than 10^9 MP"
    return f"{pixels / MEGAPIXEL:.2f} MP"


def plan(request: EditRequest, limits: ModelLimits) -> Plan:
    """Resolve *request* against *limits*.

    A request that fits is resolved once per shape: the plan depends only on what `_plan_key`
    collects, so a later request of the same shape gets the same (immutable) plan without
    being evaluated again. A request that does not fit is evaluated every time.

    Raises:
        RequestError: With every violation, when the request does not fit.
    """
    key = _plan_key(request, limits)
    if key is not None:
        known = _PLANS.get(id(limits))
        if known is not None and known[0] is limits:
            found = known[1].get(key)
            if found is not None:
                return found
    violations, resolved = _evaluate(request, limits)
    if violations:
        raise RequestError(violations, provider=limits.provider, model=limits.model)
    assert resolved is not None
    if key is not None:
        _remember(limits, key, resolved)
    return resolved


_PLANS: dict[int, tuple[ModelLimits, dict[tuple[object, ...], Plan]]] = {}
"""Plans of requests that fit, by limits row (its id; the row is kept, so the id stays its own)
and `_plan_key`. Bounded: a table past its size starts again empty."""
_MOST_ROWS: Final = 64
_MOST_PLANS: Final = 256


def _plan_key(request: EditRequest, limits: ModelLimits) -> tuple[object, ...] | None:
    """Everything of *request* that `_evaluate` reads, but the values that fit or not alone.

    ``None`` when the request cannot share a plan: a subclass of `EditRequest` (its properties
    may say anything), a seed out of range or a prompt too long (evaluated, to say so). The seed
    and the prompt are otherwise left out: once they fit, they change nothing in the plan. Of
    a local image, what its checks read (kind, format, size, pixels); of a URL, its kind.
    """
    if type(request) is not EditRequest:
        return None
    seed = request.seed
    if seed is not None and seed not in limits.seed:
        return None
    cap = limits.prompt_max_chars
    if cap is not None and len(request.prompt) > cap:
        return None
    images = request.images
    return (
        request.model,
        request.width,
        request.height,
        request.size,
        request.aspect_ratio,
        request.output_format,
        request.safety_tolerance,
        request.steps,
        request.guidance,
        request.prompt_upsampling,
        request.allow_conversions,
        tuple([_image_key(image) for image in images]) if images else (),
    )


def _image_key(image: ImageInput) -> tuple[object, ...]:
    if isinstance(image, UrlImage):
        return ("url",)
    info = image.info
    return (image_kind(image), info.format, info.byte_size, info.width, info.height)


def _remember(limits: ModelLimits, key: tuple[object, ...], resolved: Plan) -> None:
    known = _PLANS.get(id(limits))
    if known is None or known[0] is not limits:
        if len(_PLANS) >= _MOST_ROWS:
            _PLANS.clear()
        known = _PLANS[id(limits)] = (limits, {})
    table = known[1]
    if len(table) >= _MOST_PLANS:
        table.clear()
    table[key] = resolved


class _Found:
    """Collects violations, each stamped with the row's source."""

    def __init__(self, limits: ModelLimits) -> None:
        self.limits = limits
        self.items: list[Violation] = []

    def add(self, name: str, message: str, limit: str, value: object) -> None:
        shown = value if type(value) is str else render_value(value)
        self.items.append(Violation(name, message, limit, shown, self.limits.source))


def _evaluate(
    request: EditRequest, limits: ModelLimits
) -> tuple[tuple[Violation, ...], Plan | None]:
    found = _Found(limits)
    provider = limits.provider
    if request.model != limits.model:
        found.add("model", f"this row is for {limits.model}", limits.model, request.model)
    _check_images(request, limits, found)
    if limits.prompt_max_chars is not None and len(request.prompt) > limits.prompt_max_chars:
        found.add(
            "prompt",
            "is too long",
            f"at most {limits.prompt_max_chars} characters",
            f"{len(request.prompt)} characters",
        )
    if request.seed is not None and request.seed not in limits.seed:
        found.add("seed", "is out of range", str(limits.seed), request.seed)
    if request.output_format is not None and request.output_format not in limits.output_formats:
        found.add(
            "output_format",
            f"is not offered by {provider}",
            " / ".join(limits.output_formats),
            request.output_format,
        )
    _check_setting(found, "safety_tolerance", request.safety_tolerance, limits.safety_tolerance)
    _check_setting(found, "steps", request.steps, limits.steps)
    _check_setting(found, "guidance", request.guidance, limits.guidance)
    if request.prompt_upsampling is not None and not limits.prompt_upsampling:
        found.add(
            "prompt_upsampling",
            f"{provider} has no such setting for {limits.model}",
            "not settable",
            request.prompt_upsampling,
        )
    geometry = _resolve_geometry(request, limits, found)
    if found.items:
        return tuple(found.items), None
    wire_model = (
        limits.edit_wire_model if request.images and limits.edit_wire_model else limits.wire_model
    )
    return (), Plan(
        limits=limits,
        wire_model=wire_model,
        dimensions=geometry.dimensions,
        size_string=geometry.size_string,
        ratio=geometry.ratio,
        preset=geometry.preset,
        warnings=geometry.warnings,
    )


def _check_setting(
    found: _Found, name: str, value: float | None, allowed: IntRange | NumberRange | None
) -> None:
    if value is None:
        return
    if allowed is None:
        found.add(
            name,
            f"{found.limits.provider} has no such setting for {found.limits.model}",
            "not settable",
            value,
        )
    elif value not in allowed:
        found.add(name, "is out of range", str(allowed), value)


def _check_images(request: EditRequest, limits: ModelLimits, found: _Found) -> None:
    count, allowed = len(request.images), limits.images
    if count not in allowed:
        if count == 0:
            found.add(
                "images",
                f"{limits.provider} needs reference images for this call",
                f"{allowed.low} or more",
                0,
            )
        else:
            found.add("images", "too many reference images", f"{allowed} images", count)
    rule = limits.image
    total = 0
    for index, image in enumerate(request.images):
        name = f"images[{index}]"
        shown = image.describe()  # each message names the image: which of five is at fault?
        kind = image_kind(image)
        if kind not in rule.kinds:
            found.add(
                name,
                f"{limits.provider} cannot take an image given as {kind.replace('_', ' ')} "
                f"({shown})",
                " / ".join(sorted(rule.kinds)),
                shown,
            )
        if isinstance(image, UrlImage):
            continue  # the provider fetches it; nothing here can be checked before sending
        info = image.info
        if info.format not in rule.formats:
            what = (
                f"is a {format_name(info.format)} image"
                if info.format is not None
                else "is not in any image format known here"
            )
            found.add(
                name,
                f"{shown} {what}, which {limits.provider} does not accept; it takes "
                + ", ".join(sorted(rule.formats)),
                " / ".join(sorted(rule.formats)),
                format_name(info.format) if info.format else "unrecognised data",
            )
            continue
        if info.byte_size > rule.max_bytes:
            found.add(
                name,
                f"{shown} is too large",
                f"at most {rule.max_bytes / MB:g} MB",
                f"{info.byte_size / MB:.1f} MB",
            )
        if info.pixels is None:
            found.add(
                name,
                f"{shown} has an unreadable {format_name(info.format)} header",
                f"a valid {info.format} header",
                shown,
            )
        elif info.pixels > rule.max_pixels:
            found.add(
                name,
                f"{shown} has too many pixels",
                f"at most {rule.max_pixels / 1_000_000:g} MP",
                f"{info.width}x{info.height}",
            )
        else:
            total += info.pixels
    if rule.max_total_pixels is not None and total > rule.max_total_pixels:
        found.add(
            "images",
            f"the reference images of one call have too many pixels together for "
            f"{limits.provider}'s {limits.model}",
            f"at most {rule.max_total_pixels / MEGAPIXEL:g} MP in all",
            _megapixels(total),
        )


@frozen(kw_only=True)
class _Geometry:
    dimensions: tuple[int, int] | None = None
    size_string: bool = False
    ratio: tuple[int, int] | None = None
    preset: str | None = None
    warnings: tuple[ConversionWarning, ...] = ()


def _resolve_geometry(request: EditRequest, limits: ModelLimits, found: _Found) -> _Geometry:
    dimensions, ratio = request.dimensions, request.ratio
    if dimensions is not None:
        return _resolve_dimensions(request, dimensions, limits, found)
    if ratio is not None:
        return _resolve_ratio(request, ratio, limits, found)
    return _Geometry()


def _resolve_dimensions(
    request: EditRequest, dimensions: tuple[int, int], limits: ModelLimits, found: _Found
) -> _Geometry:
    width, height = dimensions
    name = "size" if request.size is not None else "width/height"
    if limits.sizes is not None:
        return _resolve_on_grid(request, name, dimensions, limits, limits.sizes, found)
    ratio_rule = limits.ratios
    if ratio_rule is None:
        found.add(
            name,
            f"{limits.provider} takes no output size for {limits.model}",
            "no size setting",
            f"{render_value(width)}x{render_value(height)}",
        )
        return _Geometry()
    ratio_text = _ratio_text(width, height)
    if not request.allow_conversions:
        found.add(
            name,
            f"{limits.provider} takes only an aspect ratio for {limits.model}; "
            f'pass aspect_ratio="{ratio_text}" or allow_conversions=True',
            f"aspect ratio {ratio_rule.describe()}",
            f"{render_value(width)}x{render_value(height)}",
        )
        return _Geometry()
    if not ratio_rule.accepts(width, height):
        found.add(name, "its aspect ratio is out of range", ratio_rule.describe(), ratio_text)
        return _Geometry()
    warning = ConversionWarning(
        field=name,
        requested=f"{render_value(width)}x{render_value(height)}",
        sent=f"aspect_ratio {ratio_text}",
        message=f"{limits.provider} takes only an aspect ratio for {limits.model}; "
        "it picks the pixel size",
    )
    return _ratio_geometry(ratio_rule, ratio_text, (warning,))


def _resolve_on_grid(
    request: EditRequest,
    name: str,
    dimensions: tuple[int, int],
    limits: ModelLimits,
    rule: SizeRule,
    found: _Found,
) -> _Geometry:
    """An explicit size at a provider that takes explicit sizes: as asked, or the nearest.

    Off the grid but within the bounds, with ``allow_conversions``: the nearest valid size is
    sent instead (the one below on a tie), with a warning. Otherwise every broken rule is a
    violation, the last one naming the nearest valid sizes.
    """
    width, height = dimensions
    as_string = request.size is not None and limits.size_string
    broken = list(rule.violations(width, height, name))
    if not broken:
        return _Geometry(dimensions=dimensions, size_string=as_string)
    nearest = rule.nearest(width, height)
    if request.allow_conversions and nearest and rule.within_bounds(width, height):
        sent = min(nearest, key=lambda size: abs(size[0] - width) + abs(size[1] - height))
        warning = ConversionWarning(
            field=name,
            requested=f"{render_value(width)}x{render_value(height)}",
            sent=f"{sent[0]}x{sent[1]}",
            message=f"{limits.provider} takes sizes in {rule.describe()} for {limits.model}; "
            "sent the nearest valid size",
        )
        return _Geometry(dimensions=sent, size_string=as_string, warnings=(warning,))
    if nearest:
        message, value = broken[-1]
        shown = " or ".join(f"{across}x{down}" for across, down in nearest)
        broken[-1] = (f"{message}; nearest valid: {shown}", value)
    for message, value in broken:
        found.add(name, message, rule.describe(), value)
    return _Geometry()


def _ratio_geometry(
    rule: RatioRule, ratio_text: str, warnings: tuple[ConversionWarning, ...] = ()
) -> _Geometry:
    width, height = ratio_text.split(":")
    if rule.presets is not None:
        preset = rule.preset(int(width), int(height))
        assert preset is not None  # the rule accepted the ratio
        return _Geometry(preset=preset, warnings=warnings)
    return _Geometry(ratio=(int(width), int(height)), warnings=warnings)


def _resolve_ratio(
    request: EditRequest, ratio: tuple[int, int], limits: ModelLimits, found: _Found
) -> _Geometry:
    rule = limits.ratios
    given = f"{render_value(ratio[0])}:{render_value(ratio[1])}"
    if rule is not None and rule.accepts(*ratio):
        return _ratio_geometry(rule, _ratio_text(*ratio))
    sizes = limits.sizes
    if sizes is None or (rule is not None and rule.presets is None):
        # The provider takes ratios, just not this one, or takes no size at all.
        limit = rule.describe() if rule is not None else "no size setting"
        found.add("aspect_ratio", "is not accepted", limit, given)
        return _Geometry()
    found_size = _size_for_ratio(ratio, sizes)
    if not request.allow_conversions:
        example = (
            f" (e.g. {found_size[0]}x{found_size[1]} for {given})"
            if found_size is not None and sizes.fits(*found_size)
            else ""
        )
        if rule is None:
            message = (
                f"{limits.provider} takes explicit sizes for {limits.model}, no aspect ratio; pass"
            )
            accepted = ""
        else:  # presets: these ratios are sent by name, any other shape as a size
            message = (
                f"is not one of {limits.provider}'s aspect-ratio presets for {limits.model} "
                f"({', '.join(rule.presets or ())}); pass one of them,"
            )
            accepted = f"aspect ratio {rule.describe()}, or sizes in "
        found.add(
            "aspect_ratio",
            f"{message} width/height{example} or allow_conversions=True",
            accepted + sizes.describe(),
            given,
        )
        return _Geometry()
    if found_size is None or not sizes.fits(*found_size):
        found.add(
            "aspect_ratio", "has no size within the provider's range", sizes.describe(), given
        )
        return _Geometry()
    width, height = found_size
    warning = ConversionWarning(
        field="aspect_ratio",
        requested=given,
        sent=f"{render_value(width)}x{render_value(height)}",
        message=f"{limits.provider} takes explicit sizes for {limits.model}; "
        f"the nearest size on its grid is {width / height:.3f}:1",
    )
    return _Geometry(dimensions=(width, height), warnings=(warning,))


def _size_for_ratio(ratio: tuple[int, int], rule: SizeRule) -> tuple[int, int] | None:
    """Return the grid size nearest to one megapixel at *ratio*, clamped into *rule*'s sides.

    ``None`` when the ratio is too extreme to compute in floating point (EditRequest bounds its
    terms, so only a hand-made ratio gets here).
    """
    if ratio[0] <= 0 or ratio[1] <= 0:
        return None
    try:
        exact_width = math.sqrt(_CONVERSION_PIXELS * ratio[0] / ratio[1])
        exact_height = exact_width * ratio[1] / ratio[0]
    except OverflowError:
        return None
    if not (math.isfinite(exact_width) and math.isfinite(exact_height)):
        return None

    def on_grid(value: float) -> int:
        snapped = max(rule.multiple, round(value / rule.multiple) * rule.multiple)
        lowest = math.ceil(rule.min_side / rule.multiple) * rule.multiple
        snapped = max(snapped, lowest)
        if rule.max_side is not None:
            snapped = min(snapped, rule.max_side // rule.multiple * rule.multiple)
        return snapped

    return on_grid(exact_width), on_grid(exact_height)
