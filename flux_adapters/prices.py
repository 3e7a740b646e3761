"""Prices as data: what a call costs at each provider, with the source and date of every figure.

Only figures a provider documents are listed; where none is known, `price_for` returns ``None``
and the cost is reported as unknown, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from attrs import frozen

__all__ = ["PRICES", "Price", "price_for"]


@frozen(kw_only=True)
class Price:
    """A per-call price.

    Attributes:
        provider: Provider id.
        model: Canonical model id.
        usd_per_call: US dollars charged per successful call (one image).
        source: Where the figure comes from.
        as_of: The date of the source.
    """

    provider: str
    model: str
    usd_per_call: float
    source: str
    as_of: str


_LAOZHANG: Final = (
    "https://docs.laozhang.ai/en/api-capabilities/flux-image-edit (Models and Pricing)"
)

PRICES: Final[Mapping[tuple[str, str], Price]] = {
    (price.provider, price.model): price
    for price in (
        Price(
            provider="laozhang",
            model="flux-2-pro",
            usd_per_call=0.03,
            source=_LAOZHANG,
            as_of="2026-09-24",
        ),
        Price(
            provider="laozhang",
            model="flux-2-flex",
            usd_per_call=0.06,
            source=_LAOZHANG,
            as_of="2026-09-24",
        ),
        Price(
            provider="laozhang",
            model="flux-2-max",
            usd_per_call=0.07,
            source=_LAOZHANG,
            as_of="2026-09-24",
        ),
        Price(
            provider="laozhang",
            model="flux-kontext-pro",
            usd_per_call=0.035,
            source=_LAOZHANG,
            as_of="2026-09-24",
        ),
        Price(
            provider="laozhang",
            model="flux-kontext-max",
            usd_per_call=0.07,
            source=_LAOZHANG,
            as_of="2026-09-24",
        ),
    )
}


def price_for(provider: str, model: str) -> Price | None:
    """The documented price of one call of *model* at *provider*, or ``None`` when unknown."""
    return PRICES.get((provider, model))
