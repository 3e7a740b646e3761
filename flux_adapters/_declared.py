"""Checking the data an adapter declares, when it is loaded: limits, ``not_taken``, prices, auth.

An adapter may come from another package, so its data is user input: a row that cannot be one
(a negative count, a size that is not a whole number, a grid of 0) was taken, and failed later
as a bare ``TypeError`` or ``ZeroDivisionError`` inside a call, or let every request through.
A status declared "not taken" moves money: the router fails over on it, so a 2xx there would
pay twice. A price ranks providers under ``routing="cheapest"``: a negative or NaN one would put
the provider first (or break the sort). Each problem is a `ConfigurationError` that names the
adapter and the field.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Final

from flux_adapters._display import render_value, type_name
from flux_adapters._foreign import is_interruption
from flux_adapters._options import is_number
from flux_adapters.errors import ConfigurationError
from flux_adapters.limits import (
    IMAGE_KINDS,
    ImageRule,
    IntRange,
    ModelLimits,
    NumberRange,
    RatioRule,
    SizeRule,
)

__all__ = [
    "check_auth",
    "check_limits",
    "check_not_taken",
    "check_price",
    "check_prices",
    "check_usd_per_credit",
]

_NOT_TAKEN_STATUSES: Final = range(400, 600)
"""Statuses that may be declared not taken: refusals and server errors. A 1xx, 2xx or 3xx is no
refusal (an unreadable 2xx may have been billed), and no other status exists."""


def check_not_taken(adapter: str, value: object) -> None:
    """*value* (an adapter's ``not_taken``) as status -> the document saying it is not billed."""
    if value is None:
        return
    where = f"adapter {adapter}: not_taken"
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{where} must map each status to the document that says it is not billed, "
            f"not {type_name(value)}"
        )
    for status, document in _items(value, where):
        # An int, or an IntEnum member such as http.HTTPStatus.CONFLICT (the standard
        # library's name for a status); not any int subclass, whose equality could be its own.
        whole = type(status) is int or isinstance(status, enum.IntEnum)
        if not whole or status not in _NOT_TAKEN_STATUSES:
            raise ConfigurationError(
                f"{where} holds {render_value(status)}: only a 4xx or 5xx status (an int from "
                "400 to 599) can prove a job was not taken"
            )
        if not isinstance(document, str) or not document.strip():
            raise ConfigurationError(
                f"{where}[{status}] must cite the document that says so (a str), "
                f"not {render_value(document)}"
            )


def _items(value: Mapping[object, object], where: str) -> list[tuple[object, object]]:
    try:
        return list(value.items())
    except BaseException as exc:  # a mapping of another package's, failing in any way
        if is_interruption(exc):
            raise
        raise ConfigurationError(f"{where} could not be read ({type_name(exc)})") from exc


def _whole(value: object, least: int = 0) -> bool:
    return type(value) is int and value >= least


def _range(value: object, least: int = 0) -> str:
    if not isinstance(value, IntRange):
        return f"must be an IntRange, not {type_name(value)}"
    if not _whole(value.low, least) or not (value.high is None or _whole(value.high, value.low)):
        return f"must be whole numbers from {least} up, low <= high, not {render_value(value)}"
    return ""


def _sizes(value: object) -> str:
    if not isinstance(value, SizeRule):
        return f"must be a SizeRule or None, not {type_name(value)}"
    bounded = value.max_side is None or _whole(value.max_side, max(value.min_side, 1))
    if not (
        _whole(value.multiple, 1)
        and _whole(value.min_side, 1)
        and bounded
        and (value.max_pixels is None or _whole(value.max_pixels, 1))
    ):
        return (
            "must hold whole numbers above 0 (multiple, min_side, max_pixels) and a max_side "
            f"at least min_side, not {render_value(value)}"
        )
    return ""


def _ratios(value: object) -> str:
    if not isinstance(value, RatioRule):
        return f"must be a RatioRule or None, not {type_name(value)}"
    pairs: tuple[object, ...] = (value.narrowest, value.widest)
    if not all(
        isinstance(pair, tuple) and len(pair) == 2 and all(_whole(side, 1) for side in pair)
        for pair in pairs
    ):
        return f"must be ratios of whole numbers above 0, not {render_value(value)}"
    presets: object = value.presets
    if presets is not None and not (
        isinstance(presets, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in presets.items())
    ):
        return f"presets must map a ratio text to a preset name, not {render_value(presets)}"
    return ""


def _image(value: object) -> str:
    if not isinstance(value, ImageRule):
        return f"must be an ImageRule, not {type_name(value)}"
    kinds: object = value.kinds
    formats: object = value.formats
    if not (
        isinstance(kinds, frozenset | set | tuple)
        and set(kinds) <= set(IMAGE_KINDS)
        and _whole(value.max_bytes, 1)
        and _whole(value.max_pixels, 1)
        and (value.max_total_pixels is None or _whole(value.max_total_pixels, 1))
        and isinstance(formats, frozenset | set | tuple)
        and all(isinstance(name, str) for name in formats)
    ):
        return (
            f"must take kinds among {', '.join(IMAGE_KINDS)}, whole numbers above 0 "
            f"(max_bytes, max_pixels, max_total_pixels if set) and format names, "
            f"not {render_value(value)}"
        )
    return ""


def _numbers(value: object) -> str:
    if not isinstance(value, NumberRange):
        return f"must be a NumberRange or None, not {type_name(value)}"
    low: object = value.low
    high: object = value.high
    if not all(
        isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n)
        for n in (low, high)
    ) or not (low <= high):  # type: ignore[operator]
        return f"must be finite numbers, low <= high, not {render_value(value)}"
    return ""


def _row(model: str, row: ModelLimits) -> list[str]:
    """Every problem with one row of limits, as ``field: what is wrong``."""
    problems = {
        "images": _range(row.images),
        "seed": _range(row.seed),
        "sizes": "" if row.sizes is None else _sizes(row.sizes),
        "ratios": "" if row.ratios is None else _ratios(row.ratios),
        "image": _image(row.image),
        "safety_tolerance": "" if row.safety_tolerance is None else _range(row.safety_tolerance),
        "steps": "" if row.steps is None else _range(row.steps, 1),
        "guidance": "" if row.guidance is None else _numbers(row.guidance),
    }
    if row.model != model:
        problems["model"] = f"is {render_value(row.model)}, under the key {render_value(model)}"
    wire_model: object = row.wire_model
    if not (isinstance(wire_model, str) and wire_model):
        problems["wire_model"] = f"must be a non-empty str, not {render_value(row.wire_model)}"
    if row.prompt_max_chars is not None and not _whole(row.prompt_max_chars, 1):
        problems["prompt_max_chars"] = (
            f"must be a whole number above 0 or None, not {render_value(row.prompt_max_chars)}"
        )
    edit_wire_model: object = row.edit_wire_model
    if edit_wire_model is not None and not (isinstance(edit_wire_model, str) and edit_wire_model):
        problems["edit_wire_model"] = (
            f"must be a non-empty str or None, not {render_value(edit_wire_model)}"
        )
    source: object = row.source
    if not isinstance(source, str):
        problems["source"] = f"must cite the document (a str), not {render_value(source)}"
    formats: object = row.output_formats
    if not (
        isinstance(formats, tuple) and formats and all(isinstance(f, str) and f for f in formats)
    ):
        problems["output_formats"] = (
            f"must be a non-empty tuple of format names, not {render_value(formats)}"
        )
    texts: dict[str, object] = {
        "wire_model": row.wire_model,
        "edit_wire_model": row.edit_wire_model,
        "source": row.source,
        "output_formats": row.output_formats,
    }
    for name, text in texts.items():
        parts = text if isinstance(text, tuple) else (text,)
        if not problems.get(name) and any(
            isinstance(part, str) and not part.isprintable() for part in parts
        ):
            # Shown by `models` and `explain` on a terminal, and sent: a line break or an
            # escape sequence has no place in either.
            problems[name] = "holds control or other non-printable characters"
    return [f"{name} {problem}" for name, problem in problems.items() if problem]


def check_limits(adapter: str, limits: Mapping[object, object]) -> None:
    """*limits* (an adapter's) as canonical model id -> a usable `ModelLimits` row."""
    where = f"adapter {adapter}: limits"
    rows = _items(limits, where)
    if not rows:
        raise ConfigurationError(f"{where} offer no model; give one ModelLimits row per model")
    for model, row in rows:
        if not isinstance(model, str) or not model or not model.isprintable():
            # Shown by `models` and `explain` on a terminal as it is: a line break or an
            # escape sequence in it has no place there, as in the row's own texts.
            raise ConfigurationError(
                f"{where} are keyed by model id (printable str), not {render_value(model)}"
            )
        if not isinstance(row, ModelLimits):
            raise ConfigurationError(
                f"{where}[{model!r}] must be a ModelLimits, not {type_name(row)}"
            )
        try:
            problems = _row(model, row)
        except BaseException as exc:  # a value whose comparison or repr fails in its own way
            if is_interruption(exc):
                raise
            problems = [f"could not be read ({type_name(exc)})"]
        if problems:
            raise ConfigurationError(f"{where}[{model!r}]: " + "; ".join(problems))


def _amount(value: object) -> bool:
    return is_number(value) and value >= 0


def _megapixel(value: object) -> bool:
    return type(value) is int and 1 <= value <= 10**9


def check_price(price: object, where: str) -> None:
    """*price* as a `PerCall` or `PerMegapixel` of finite dollar amounts >= 0."""
    from flux_adapters.prices import PerCall, PerMegapixel

    # A subclass is taken only with its base's estimate: the estimate is what ranks providers
    # under routing="cheapest" and reserves a cumulative budget, and only the figures it reads
    # are checked here. One adding data of its own (a region, a contract id) is a price as any.
    if isinstance(price, PerCall) and type(price).estimate is PerCall.estimate:
        amounts: tuple[object, ...] = (price.usd,)
    elif isinstance(price, PerMegapixel) and type(price).estimate is PerMegapixel.estimate:
        amounts = (price.usd_first, price.usd_extra, price.usd_input)
    else:
        raise ConfigurationError(
            f"{where} must be a PerCall or PerMegapixel, not {type_name(price)}"
            + (" (whose estimate is its own)" if isinstance(price, PerCall | PerMegapixel) else "")
        )
    if not all(_amount(amount) for amount in amounts):
        raise ConfigurationError(
            f"{where} must hold dollar amounts, finite and >= 0, not {render_value(price)}"
        )
    if isinstance(price, PerMegapixel) and not _megapixel(price.pixels_per_mp):
        raise ConfigurationError(
            f"{where} must count a megapixel as a whole number of pixels from 1 to 10^9, "
            f"not {render_value(price.pixels_per_mp)}"
        )


def check_prices(adapter: str, prices: object, offered: Mapping[object, object]) -> None:
    """*prices* (an adapter's ``prices``) as model -> price, for models the adapter offers."""
    if prices is None:
        return
    where = f"adapter {adapter}: prices"
    if not isinstance(prices, Mapping):
        raise ConfigurationError(f"{where} must map a model id to a price, not {type_name(prices)}")
    for model, price in _items(prices, where):
        if not isinstance(model, str) or model not in offered:
            # A price no request can meet is never used: a typo that would pass in silence.
            raise ConfigurationError(
                f"{where} has a price for {render_value(model)}, a model its limits do not offer"
            )
        check_price(price, f"{where}[{model!r}]")


def check_usd_per_credit(adapter: str, value: object) -> None:
    """*value* (an adapter's ``usd_per_credit``) as ``None`` or a finite dollar amount >= 0."""
    if value is not None and not _amount(value):
        raise ConfigurationError(
            f"adapter {adapter}: usd_per_credit must be the dollars of one credit, a finite "
            f"number >= 0, not {render_value(value)}"
        )


def check_auth(adapter: str, value: object) -> None:
    """*value* (an adapter's ``auth``) as ``None`` (``BEARER``) or a `KeyAuth`."""
    from flux_adapters.providers import KeyAuth

    if value is not None and not isinstance(value, KeyAuth):
        raise ConfigurationError(
            f"adapter {adapter}: auth must be a flux_adapters.providers.KeyAuth, "
            f"not {type_name(value)}"
        )
