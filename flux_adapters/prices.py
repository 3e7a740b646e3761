"""Prices as data: what a call costs at each provider, with the source and date of every figure.

Two shapes, as providers bill: `PerCall` (laozhang prices each call) and `PerMegapixel` (the
Black Forest Labs formula: the first output megapixel, each further output megapixel, and each
input megapixel, each rounded up). Only figures a provider documents are built in; callers add
or override figures (``prices=`` on the client, or the configuration file). An adapter may ship
its provider's figures (its ``prices``), so a provider package brings its own. Where no figure
is known, `estimate` returns ``None`` and the cost is reported as unknown, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeAlias

from attrs import frozen

from flux_adapters.limits import Plan
from flux_adapters.request import EditRequest, UrlImage

__all__ = ["PRICES", "PerCall", "PerMegapixel", "Price", "estimate", "price_for"]

MEGAPIXEL: Final = 1_000_000
"""A megapixel where the provider does not say otherwise: a million pixels. fal counts 1024 x 1024
(`BINARY_MEGAPIXEL`), and says so by its examples; see `PerMegapixel.pixels_per_mp`."""
BINARY_MEGAPIXEL: Final = 1024 * 1024
"""fal's megapixel: "a 1024x1024 image will cost $0.05" at $0.05 per megapixel."""


@frozen(kw_only=True)
class PerCall:
    """A flat price per successful call (one image).

    Attributes:
        usd: US dollars per call.
        source: Where the figure comes from.
        as_of: The date of the source.
    """

    usd: float
    source: str = "configured"
    as_of: str = ""

    def estimate(self, request: EditRequest, plan: Plan) -> float:
        """The cost of one call."""
        return self.usd

    def describe(self) -> str:
        """The price in words."""
        return f"${self.usd:g} per call" + (f" (as of {self.as_of})" if self.as_of else "")


@frozen(kw_only=True)
class PerMegapixel:
    """Black Forest Labs' formula: first output MP, each further output MP, each input MP.

    Megapixels are rounded up, each of ``pixels_per_mp`` pixels. An output of unknown size (the
    provider decides) counts as one megapixel; a reference given by URL, whose size is unknown
    here, counts as one megapixel.

    Attributes:
        usd_first: US dollars for the first output megapixel.
        usd_extra: US dollars for each further output megapixel.
        usd_input: US dollars for each input megapixel.
        source: Where the figures come from.
        as_of: The date of the source.
        pixels_per_mp: Pixels in one billed megapixel: `MEGAPIXEL` (a million) unless the
            provider bills by another, as fal does by 1024 x 1024 (`BINARY_MEGAPIXEL`).
    """

    usd_first: float
    usd_extra: float
    usd_input: float = 0.0
    source: str = "configured"
    as_of: str = ""
    pixels_per_mp: int = MEGAPIXEL

    def describe(self) -> str:
        """The price in words."""
        text = f"${self.usd_first:g} first MP + ${self.usd_extra:g} per further MP"
        text += f" + ${self.usd_input:g} per input MP" if self.usd_input else ""
        unit = self.pixels_per_mp
        if unit != MEGAPIXEL:  # the MP a reader assumes; any other is said
            text += ", 1 MP = " + ("1024x1024" if unit == BINARY_MEGAPIXEL else f"{unit}") + " px"
        return text + (f" (as of {self.as_of})" if self.as_of else "")

    def estimate(self, request: EditRequest, plan: Plan) -> float:
        """The cost of one call of *request* as resolved by *plan*."""
        width_height = plan.dimensions
        unit = self.pixels_per_mp
        output = -(-width_height[0] * width_height[1] // unit) if width_height else 1
        inputs = 0
        for image in request.images:
            pixels = None if isinstance(image, UrlImage) else image.info.pixels
            inputs += -(-pixels // unit) if pixels else 1
        return self.usd_first + (max(output, 1) - 1) * self.usd_extra + inputs * self.usd_input


Price: TypeAlias = PerCall | PerMegapixel
_PRICE_TYPES: Final = (PerCall, PerMegapixel)
"""The kinds of `Price`, made once: ``PerCall | PerMegapixel`` makes a new union every call."""

_LAOZHANG: Final = (
    "https://docs.laozhang.ai/en/api-capabilities/flux-image-edit (Models and Pricing)"
)


def _laozhang(usd: float) -> PerCall:
    return PerCall(usd=usd, source=_LAOZHANG, as_of="2026-09-24")


PRICES: Final[Mapping[tuple[str, str], Price]] = {
    ("laozhang", "flux-2-pro"): _laozhang(0.03),
    ("laozhang", "flux-2-flex"): _laozhang(0.06),
    ("laozhang", "flux-2-max"): _laozhang(0.07),
    ("laozhang", "flux-kontext-pro"): _laozhang(0.035),
    ("laozhang", "flux-kontext-max"): _laozhang(0.07),
}
"""Built-in figures: only what the providers' own documents state. apiyi and aimlapi publish
no per-model figure in the documents this library follows; configure theirs if you know them."""


def price_for(
    provider: str,
    model: str,
    overrides: Mapping[tuple[str, str], Price] | None = None,
    shipped: Mapping[str, Price] | None = None,
) -> Price | None:
    """The price of *model* at *provider*, or ``None`` when none is known.

    In order: an override (the caller's), a figure built in here, the figure the provider's
    adapter ships (its ``prices``: model -> price; a provider package can ship its own).
    """
    key = (provider, model)
    if overrides and key in overrides:
        return overrides[key]
    price = PRICES.get(key)
    if price is None and isinstance(shipped, Mapping):
        price = shipped.get(model)
    return price if isinstance(price, _PRICE_TYPES) else None


def estimate(
    request: EditRequest,
    plan: Plan,
    overrides: Mapping[tuple[str, str], Price] | None = None,
    shipped: Mapping[str, Price] | None = None,
) -> float | None:
    """Estimated US dollars for sending *request* as *plan*; ``None`` when no price is known.

    *shipped* is the adapter's own ``prices`` (see `price_for`).
    """
    price = price_for(plan.limits.provider, plan.limits.model, overrides, shipped)
    return None if price is None else price.estimate(request, plan)
