"""Which providers to use, in what order, at what price: from a TOML file and the environment.

Switching provider, or to a failover list, is a configuration change, not a code change:
``FluxClient.from_env()`` reads this and builds the client. The file is ``flux-adapters.toml``
in the working directory, or the path in ``$FLUX_CONFIG``; environment variables override it::

    providers = ["aimlapi", "laozhang"]      # failover order        ($FLUX_PROVIDERS="aimlapi,laozhang")
    routing = "cheapest"                     # or "ordered"          ($FLUX_ROUTING)
    max_cost_usd = 0.05                      # budget per call       ($FLUX_MAX_COST_USD)
    unknown_price = "allow"                  # with max_cost_usd: "allow" or "refuse"
    failover_on_ambiguous = false            # see flux_adapters.routing
    timeout = 300                            # seconds               ($FLUX_TIMEOUT)
    job_deadline = 600                       # seconds a whole job at bfl or fal may take ($FLUX_JOB_DEADLINE)
    state_url = "redis://localhost:6379/0"   # shared state, docs/scaling.md ($FLUX_STATE_URL)
    state_fallback = "none"                  # Redis down: "none" fails closed, "local" falls back ($FLUX_STATE_FALLBACK)
    budget_usd = 50                          # a cumulative budget, shared through the state
    budget_period = "day"                    # "day" (UTC) or "total"
    budget_scope = "client:default"          # who shares the budget (the default scope)

    [provider.laozhang]
    api_key_env = "LAOZHANG_API_KEY"         # the variable holding the key (the default)
    base_url = "https://api.laozhang.ai"     # $LAOZHANG_BASE_URL overrides
    priority = 1                             # lower first, for routing = "ordered"
    timeout = 240
    rate_per_minute = 60                     # its key's rate limit, shared through the state
    allow_private_urls = false               # true: its result/polling URLs may lead to private addresses

    [provider.aimlapi.prices]
    "flux-2-pro" = { usd_first = 0.03, usd_extra = 0.015, usd_input = 0.015 }   # per megapixel
    [provider.laozhang.prices]
    "flux-2-max" = { usd = 0.07 }                                                 # per call

Keys are never written in the file (a ``api_key`` entry is refused): name the variable instead.
A configured provider whose key variable is unset or empty is skipped, with a warning on the
``flux_adapters`` logger, as long as another one has a key (`with_keys`); with none, the error
names every variable to set.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar, get_args

import attrs
from attrs import field, frozen

from flux_adapters._display import SHOWN_CHARS, render_value, short_path, toml_key
from flux_adapters._files import read_text_file
from flux_adapters._ids import Routing
from flux_adapters._options import base_url_for, check_base_url
from flux_adapters._redact import shown_state_url
from flux_adapters.errors import ConfigurationError
from flux_adapters.prices import MEGAPIXEL, PerCall, PerMegapixel, Price
from flux_adapters.providers import canonical_name

__all__ = [
    "DEFAULT_PATH",
    "Config",
    "ProviderSettings",
    "base_url_for",
    "key_variable",
    "load_config",
    "missing_keys",
    "with_keys",
]

DEFAULT_PATH: Final = Path("flux-adapters.toml")

_SECONDS: Final = "seconds above 0 and at most 86400"


@frozen(kw_only=True)
class _FileShape:
    """The top level of the file, as TOML types (`flux_adapters._schema` checks it)."""

    providers: list[str] | None = None
    routing: str | None = None
    max_cost_usd: float | None = field(default=None, metadata={"expected": "dollars, a number"})
    unknown_price: str | None = None
    failover_on_ambiguous: bool | None = None
    timeout: float | None = field(default=None, metadata={"expected": _SECONDS})
    job_deadline: float | None = field(default=None, metadata={"expected": _SECONDS})
    state_url: str | None = field(
        default=None, metadata={"expected": "'local' or redis://..."}, repr=shown_state_url
    )
    state_fallback: str | None = None
    budget_usd: float | None = field(default=None, metadata={"expected": "dollars, a number"})
    budget_period: str | None = None
    budget_scope: str | None = None
    provider: dict[str, object] = field(
        factory=dict, metadata={"expected": "[provider.NAME] sections"}
    )


@frozen(kw_only=True)
class _ProviderShape:
    """One ``[provider.NAME]`` section."""

    api_key_env: str | None = field(
        default=None, metadata={"expected": "the name of an environment variable"}
    )
    base_url: str | None = field(default=None, metadata={"expected": "an http(s) URL"})
    priority: int | None = None
    timeout: float | None = field(default=None, metadata={"expected": _SECONDS})
    rate_per_minute: float | None = field(
        default=None, metadata={"expected": "requests a minute, a number"}
    )
    allow_private_urls: bool | None = None
    prices: dict[str, object] = field(
        factory=dict, metadata={"expected": "a table of model = price"}
    )


@frozen(kw_only=True)
class _PriceShape:
    """One price: ``{ usd = ... }`` or ``{ usd_first = ..., usd_extra = ..., usd_input = ... }``.

    A per-megapixel price takes ``pixels_per_mp`` too, where the provider's megapixel is not a
    million pixels (fal's is 1048576, 1024 x 1024).
    """

    usd: float | None = None
    usd_first: float | None = None
    usd_extra: float | None = None
    usd_input: float | None = None
    pixels_per_mp: int | None = None


@frozen(kw_only=True)
class ProviderSettings:
    """One provider as configured.

    Attributes:
        name: Provider id.
        api_key_env: The environment variable holding its key (``None``: ``<PREFIX>_API_KEY``).
        base_url: Its base URL (``None``: ``$<PREFIX>_BASE_URL`` or the real one).
        priority: Lower is tried first under ``routing = "ordered"``.
        timeout: Seconds to wait for its answer.
        prices: Price overrides by canonical model id.
        rate_per_minute: Requests a minute its key may send, counted in the shared state
            (`flux_adapters.state`) by every client and worker using that key.
        allow_private_urls: Let the URLs it gives (results, polling URLs, their redirects)
            lead to non-public addresses (loopback, private networks, link-local). Off by
            default, unless its base URL's host is itself such an address (docs/routing.md).
    """

    name: str
    api_key_env: str | None = None
    base_url: str | None = None
    priority: int | None = None
    timeout: float | None = None
    prices: Mapping[str, Price] = {}
    rate_per_minute: float | None = None
    allow_private_urls: bool = False


def by_priority(settings: Sequence[ProviderSettings | None]) -> list[int]:
    """The indexes of *settings* in the order ``routing = "ordered"`` tries them.

    A given ``priority`` first, lower before higher, then the providers without one; ties as
    listed.
    """

    def key(n: int) -> tuple[bool, int, int]:
        priority = getattr(settings[n], "priority", None)
        return (priority is None, priority or 0, n)

    return sorted(range(len(settings)), key=key)


@frozen(kw_only=True)
class Config:
    """Everything ``from_env`` needs to build a client."""

    providers: tuple[ProviderSettings, ...]
    routing: Routing = "ordered"
    max_cost_usd: float | None = None
    unknown_price: str = "allow"
    failover_on_ambiguous: bool = False
    timeout: float | None = None
    job_deadline: float | None = None
    timeout_overrides: bool = False
    source: str = "environment"
    state_url: str | None = field(default=None, repr=shown_state_url)
    state_fallback: str = "none"
    budget_usd: float | None = None
    budget_period: str = "total"
    budget_scope: str = "client:default"

    @property
    def prices(self) -> dict[tuple[str, str], Price]:
        """Every price override, keyed by (provider, model)."""
        return {(p.name, model): price for p in self.providers for model, price in p.prices.items()}


NO_PROVIDERS: Final = "no providers configured"
"""How the error for a configuration naming no provider begins (the CLI adds its flag)."""


def _fail(where: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"{where}: {message}")


def _number(value: object, where: str) -> float:
    from flux_adapters._options import is_number

    if not is_number(value) or value < 0:
        raise _fail(where, f"must be a finite number >= 0, not {str(value)[:40]!r}")
    return float(value)


def _seconds(value: object, where: str) -> float:
    from flux_adapters._options import MAX_SECONDS, is_number

    if not is_number(value) or not 0 < value <= MAX_SECONDS:
        raise _fail(
            where,
            f"must be seconds above 0 and at most {MAX_SECONDS:.0f}, not {str(value)[:40]!r}",
        )
    return float(value)


def _variable_name(value: str | None, where: str) -> str | None:
    from flux_adapters._options import check_variable_name

    return None if value is None else check_variable_name(value, f"{where}: api_key_env")


_T = TypeVar("_T")


def _shaped(data: object, shape: type[_T], where: str, what: str) -> _T:
    """*data* as *shape*: every unknown key and every value of the wrong type, in one error."""
    from flux_adapters._schema import Unstructured, structure

    if not isinstance(data, dict):
        raise _fail(where, f"must be {what}, not {type(data).__name__}")
    try:
        return structure(data, shape)
    except Unstructured as error:
        problems = [
            f"unknown keys {problem.value}; known: {problem.expected}"
            if problem.kind == "unknown"
            else str(problem)
            for problem in error.problems
        ]
        raise _fail(where, "; ".join(problems)) from None


def _price(value: object, where: str) -> Price:
    shape = _shaped(
        value,
        _PriceShape,
        where,
        "a table such as { usd = 0.03 } or { usd_first = ..., usd_extra = ... }",
    )
    given = {name for name in attrs.fields_dict(_PriceShape) if getattr(shape, name) is not None}
    if given == {"usd"}:
        return PerCall(usd=_number(shape.usd, where), source=where)
    per_mp = {"usd_first", "usd_extra", "usd_input", "pixels_per_mp"}
    if {"usd_first", "usd_extra"} <= given <= per_mp:
        unit = MEGAPIXEL if shape.pixels_per_mp is None else shape.pixels_per_mp
        if type(unit) is not int or not 1 <= unit <= 10**9:
            raise _fail(where, f"pixels_per_mp must be a whole number from 1 to 10^9, not {unit!r}")
        return PerMegapixel(
            usd_first=_number(shape.usd_first, where),
            usd_extra=_number(shape.usd_extra, where),
            usd_input=_number(shape.usd_input or 0.0, where),
            source=where,
            pixels_per_mp=unit,
        )
    raise _fail(
        where,
        f"price keys {sorted(given)} do not go together; use usd, or usd_first/usd_extra/usd_input"
        " (and pixels_per_mp)",
    )


def _provider(given: str, table: object, origin: str) -> ProviderSettings:
    where = f"{origin} [provider.{toml_key(given)}]"
    try:
        name = canonical_name(given)
    except ConfigurationError as error:
        raise _fail(where, str(error)) from None
    if isinstance(table, dict) and "api_key" in table:
        raise _fail(
            where,
            "keys are never read from the file; set api_key_env to the variable that holds it",
        )
    shape = _shaped(table, _ProviderShape, where, "a table")
    return ProviderSettings(
        name=name,
        api_key_env=_variable_name(shape.api_key_env, where),
        base_url=None
        if shape.base_url is None
        else check_base_url(shape.base_url, f"{where} base_url"),
        priority=shape.priority,
        timeout=None if shape.timeout is None else _seconds(shape.timeout, f"{where} timeout"),
        prices=_prices(name, shape.prices, where),
        rate_per_minute=None
        if shape.rate_per_minute is None
        else _rate(shape.rate_per_minute, f"{where} rate_per_minute"),
        allow_private_urls=bool(shape.allow_private_urls),
    )


def _prices(provider: str, given: Mapping[str, object], where: str) -> dict[str, Price]:
    """The ``[provider.NAME.prices]`` table: a price for each model *provider* offers.

    A price no request can meet (a misspelt model, one the provider does not offer) would be
    taken and never used; it is refused here, where the file gives it.
    """
    from flux_adapters._options import did_you_mean
    from flux_adapters.providers import get_adapter
    from flux_adapters.request import MODELS

    prices: dict[str, Price] = {}
    for model, price in given.items():
        here = f"{where}.prices.{toml_key(model)}"
        if model not in MODELS:
            hint = did_you_mean(model, MODELS) if len(model) <= 64 else ""
            raise _fail(here, f"not a FLUX model id{hint}")
        if model not in get_adapter(provider).limits:
            raise _fail(here, f"{provider} does not offer it; no request would use this price")
        prices[model] = _price(price, here)
    return prices


def _rate(value: object, where: str) -> float:
    from flux_adapters._options import check_rate_per_minute

    return check_rate_per_minute(_number(value, where), where)


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read the configuration file (if any) and let the environment override it.

    Args:
        path: The TOML file; default ``$FLUX_CONFIG``, else ``flux-adapters.toml`` if present.
        environ: The environment to read (default ``os.environ``).

    Raises:
        ConfigurationError: The file or a variable is invalid, or no provider is configured.
    """
    env = os.environ if environ is None else environ
    try:
        chosen = (
            Path(path)
            if path is not None
            else Path(env["FLUX_CONFIG"])
            if env.get("FLUX_CONFIG")
            else None
        )
    except TypeError:  # bytes, or not a path at all
        raise ConfigurationError(
            f"config= must be a path (str or os.PathLike), not {type(path).__name__}"
        ) from None
    data: object = {}
    origin = "environment"
    if chosen is not None or DEFAULT_PATH.exists():
        file = chosen or DEFAULT_PATH
        # Escaped (a NUL, or a name that is not valid UTF-8) and cut to its end: a $FLUX_CONFIG
        # of 5,000 characters made a message of 5,000. It begins every message about the file,
        # which its reader has to find: a deep path is kept whole up to 4 lines' worth.
        shown = short_path(str(file), 4 * SHOWN_CHARS)
        try:
            text = read_text_file(file, limit=1024 * 1024)
            bom = text.startswith("\ufeff")  # Notepad's "UTF-8 with BOM"
            data = {} if bom else tomllib.loads(text)
        except FileNotFoundError:
            raise _fail(shown, "no such file") from None
        except OSError as exc:
            raise _fail(shown, f"cannot be read ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, RecursionError) as exc:
            raise _fail(shown, f"not valid TOML ({str(exc)[:200]})") from None
        except ValueError as exc:  # os.open: an embedded NUL; UnicodeDecodeError: not UTF-8
            why = (
                "is not UTF-8 text"
                if isinstance(exc, UnicodeDecodeError)
                else "is not a usable path"
            )
            raise _fail(shown, why) from None
        if bom:
            raise _fail(
                shown,
                "starts with a byte order mark (BOM), which TOML does not allow; save it as "
                "UTF-8 without BOM",
            )
        origin = shown
    shape = _shaped(data, _FileShape, origin, "a table")
    configured: dict[str, ProviderSettings] = {}
    for given, table in shape.provider.items():
        one = _provider(given, table, origin)
        if one.name in configured:
            raise _fail(
                origin, f"[provider.{toml_key(one.name)}] is given twice (names ignore case)"
            )
        configured[one.name] = one

    names = shape.providers
    listed = f"{origin} providers"
    if env.get("FLUX_PROVIDERS"):
        names = [name.strip() for name in env["FLUX_PROVIDERS"].split(",") if name.strip()]
        listed = "$FLUX_PROVIDERS"
        if not names:
            raise ConfigurationError(
                f"$FLUX_PROVIDERS names no provider ({render_value(env['FLUX_PROVIDERS'])}); "
                "give ids separated by commas, e.g. laozhang,apiyi"
            )
    if names is None:
        names = list(configured)
    if not names:
        raise ConfigurationError(
            f"{NO_PROVIDERS}: set FLUX_PROVIDERS or providers = [...] in flux-adapters.toml"
        )
    ids: list[str] = []
    for name in names:
        try:
            ids.append(canonical_name(name))
        except ConfigurationError as error:
            raise _fail(listed, str(error)) from None
    twice = sorted({name for name in ids if ids.count(name) > 1})
    if twice:
        raise ConfigurationError(
            f"{listed} lists {', '.join(twice)} more than once (names ignore case)"
        )
    settings = [configured.get(name) or ProviderSettings(name=name) for name in ids]
    ordered = [settings[n] for n in by_priority(settings)]

    # A value the file gives is taken as given, even "": an empty routing, unknown_price,
    # state_fallback, state_url or budget_scope there is refused, not read as the default.
    # An empty variable is an unset one (FLUX_ROUTING= in a shell script).
    routing = env.get("FLUX_ROUTING") or _given(shape.routing, "ordered")
    if routing not in get_args(Routing):
        where = "$FLUX_ROUTING" if env.get("FLUX_ROUTING") else origin
        raise _fail(where, f"routing must be 'ordered' or 'cheapest', not {routing!r:.40}")
    budget = env.get("FLUX_MAX_COST_USD") or shape.max_cost_usd
    budget_from = "$FLUX_MAX_COST_USD" if env.get("FLUX_MAX_COST_USD") else f"{origin} max_cost_usd"
    timeout = env.get("FLUX_TIMEOUT") or shape.timeout
    timeout_from = "$FLUX_TIMEOUT" if env.get("FLUX_TIMEOUT") else f"{origin} timeout"
    job_deadline = job_deadline_from_env(env)
    if job_deadline is None and shape.job_deadline is not None:
        job_deadline = _seconds(shape.job_deadline, f"{origin} job_deadline")
    unknown_price = _given(shape.unknown_price, "allow")
    if unknown_price not in ("allow", "refuse"):
        raise _fail(origin, f"unknown_price must be 'allow' or 'refuse', not {unknown_price!r}")
    ambiguous = bool(shape.failover_on_ambiguous)
    if shape.budget_period not in (None, "day", "total"):
        raise _fail(
            origin, f"budget_period must be 'day' or 'total', not {shape.budget_period!r:.40}"
        )
    fallback = env.get("FLUX_STATE_FALLBACK") or _given(shape.state_fallback, "none")
    if fallback not in ("none", "local"):
        where = "$FLUX_STATE_FALLBACK" if env.get("FLUX_STATE_FALLBACK") else origin
        raise _fail(where, f"state_fallback must be 'none' or 'local', not {fallback!r:.40}")
    from flux_adapters.state import check_url

    if shape.state_url is not None:
        check_url(shape.state_url, f"{origin} state_url")
    if env.get("FLUX_STATE_URL"):
        check_url(env["FLUX_STATE_URL"], "$FLUX_STATE_URL")
    state_url = env.get("FLUX_STATE_URL") or shape.state_url
    if shape.budget_scope is not None:
        from flux_adapters.state import check_scope

        try:
            check_scope(shape.budget_scope)
        except ConfigurationError as error:
            raise _fail(f"{origin} budget_scope", str(error)) from None
    if shape.budget_usd is not None:
        from flux_adapters._options import is_number

        budget_usd = shape.budget_usd
        if not (is_number(budget_usd) and 0 <= budget_usd <= 1e9):
            raise _fail(origin, f"budget_usd must be dollars from 0 to 1e9, not {budget_usd!r:.40}")
    _note_unused(shape, origin, listed_by_file=listed != "$FLUX_PROVIDERS", ids=ids)
    if budget is None and shape.unknown_price is not None:
        _unused(f"{origin} unknown_price", "max_cost_usd (or $FLUX_MAX_COST_USD)")
    return Config(
        providers=tuple(ordered),
        routing=routing,  # type: ignore[arg-type]
        max_cost_usd=None
        if budget is None
        else _number(_as_float(budget, budget_from), budget_from),
        unknown_price=str(unknown_price),
        failover_on_ambiguous=ambiguous,
        timeout=None
        if timeout is None
        else _seconds(_as_float(timeout, timeout_from), timeout_from),
        timeout_overrides=bool(env.get("FLUX_TIMEOUT")),
        job_deadline=job_deadline,
        source=origin,
        state_url=state_url,
        state_fallback=fallback,
        budget_usd=None if shape.budget_usd is None else float(shape.budget_usd),
        budget_period=shape.budget_period or "total",
        budget_scope=_given(shape.budget_scope, "client:default"),
    )


def timeouts(
    config: Config, providers: Sequence[ProviderSettings]
) -> tuple[float | None, tuple[ProviderSettings, ...]]:
    """The client's ``timeout=`` for *config*, and *providers* with the timeout each one gets.

    ``$FLUX_TIMEOUT`` overrides the file, every provider's own ``timeout`` too; the file's
    top-level ``timeout`` is the default of the providers whose section gives none.
    """
    if config.timeout is None or config.timeout_overrides:
        return config.timeout, tuple(providers)
    return None, tuple(
        settings if settings.timeout is not None else attrs.evolve(settings, timeout=config.timeout)
        for settings in providers
    )


def _unused(what: str, needs: str) -> None:
    import logging

    from flux_adapters._log import note

    # Names of settings and providers only: nothing here to scrub.
    note(logging.WARNING, "unused-setting", str, "%s has no effect without %s", what, needs)


def _note_unused(shape: _FileShape, origin: str, *, listed_by_file: bool, ids: list[str]) -> None:
    """Warn of what the file gives that nothing will read: a setting that works with another.

    A section for a provider the file's own ``providers`` leaves out is one too (with
    ``$FLUX_PROVIDERS`` choosing among the sections, those it leaves out are expected).
    """
    if shape.budget_usd is None:
        for name in ("budget_period", "budget_scope"):
            if getattr(shape, name) is not None:
                _unused(f"{origin} {name}", "budget_usd")
    if listed_by_file and shape.providers is not None:
        for given in shape.provider:
            name = canonical_name(given)
            if name not in ids:
                _unused(
                    f"{origin} [provider.{toml_key(given)}]",
                    f"{name} in providers = [...] (it lists {', '.join(ids)})",
                )


def key_variable(settings: ProviderSettings) -> str:
    """The environment variable that holds the key of *settings*' provider.

    Its ``api_key_env``, else ``<PREFIX>_API_KEY`` (``APIYI_API_KEY`` for both apiyi dialects).
    """
    from flux_adapters.providers import get_adapter

    return settings.api_key_env or f"{get_adapter(settings.name).env_prefix}_API_KEY"


def missing_keys(
    providers: Sequence[ProviderSettings], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Each of *providers* whose key variable is unset or empty, with the name of that variable."""
    env = os.environ if environ is None else environ
    found = {settings.name: key_variable(settings) for settings in providers}
    return {name: variable for name, variable in found.items() if not env.get(variable)}


def no_key_error(missing: Mapping[str, str]) -> ConfigurationError:
    """The error for providers of which none has a key: every variable to set, and for whom."""
    if len(missing) == 1:
        [(name, variable)] = missing.items()
        return ConfigurationError(f"no API key for {name}: set {variable}")
    needs: dict[str, list[str]] = {}
    for name, variable in missing.items():
        needs.setdefault(variable, []).append(name)
    wanted = ", ".join(f"{variable} ({', '.join(names)})" for variable, names in needs.items())
    return ConfigurationError(f"no API key for any of the providers: set {wanted}")


def with_keys(
    providers: Sequence[ProviderSettings], environ: Mapping[str, str] | None = None
) -> tuple[ProviderSettings, ...]:
    """*providers* without those that have no key, each skipped with a warning logged.

    Raises:
        ConfigurationError: None of them has a key (the message names every variable).
    """
    import logging

    from flux_adapters._log import note

    missing = missing_keys(providers, environ)
    if missing and len(missing) == len(providers):
        raise no_key_error(missing)
    for name, variable in missing.items():
        # The name of a variable, never its value: nothing here to scrub.
        note(logging.WARNING, "no-key", str, "%s skipped: no API key (set %s)", name, variable)
    return tuple(settings for settings in providers if settings.name not in missing)


def job_deadline_from_env(env: Mapping[str, str] | None = None) -> float | None:
    """``$FLUX_JOB_DEADLINE`` in seconds, or ``None`` when it is not set.

    Raises:
        ConfigurationError: It is not a number of seconds above 0 and at most a day.
    """
    value = (os.environ if env is None else env).get("FLUX_JOB_DEADLINE")
    if not value:
        return None
    return _seconds(_as_float(value, "$FLUX_JOB_DEADLINE"), "$FLUX_JOB_DEADLINE")


def _given(value: str | None, default: str) -> str:
    return default if value is None else value


def _as_float(value: object, name: str) -> object:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigurationError(
                f"{name} must be a number, not {render_value(value)}"
            ) from None
    return value
