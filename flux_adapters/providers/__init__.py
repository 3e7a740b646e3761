"""The provider registry and the contract every adapter meets.

An adapter is pure: it turns an `EditRequest` (resolved into a `Plan` by the limits check) into
the HTTP exchanges that perform it, and their answers into an `Answer` or a typed error. It
never sends, sleeps, reads files or the environment, or logs. Two shapes exist:

- `Adapter`: a synchronous provider, one request and one answer (the resellers);
- `flux_adapters.jobs.JobAdapter`: an asynchronous one, submit -> poll -> fetch -> cancel, whose
  loop, waits and deadline the library owns (Black Forest Labs, fal).

Either declares how its key is sent and which hosts may receive it (`KeyAuth`), and may declare
statuses its provider's document says are not billed (``not_taken``), its prices (``prices``)
and the dollar value of its reported credits (``usd_per_credit``).

Providers come from three places, seen alike by every part of the library (clients,
``from_env``, the configuration file, ``check``, the command line, the conformance runner):
the built-in ones, the entry-point group ``flux_adapters.providers`` of installed packages, and
`register_provider`. Names are case-insensitive. Provider modules are imported only when used.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias
from urllib.parse import urlsplit

from attrs import field, frozen

from flux_adapters._display import printable, render_value, type_name
from flux_adapters._ids import ProviderId, ProviderName
from flux_adapters.errors import ConfigurationError, ProviderError
from flux_adapters.limits import ModelLimits, Plan
from flux_adapters.request import EditRequest
from flux_adapters.result import ResultImage, Usage
from flux_adapters.wire import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from flux_adapters.jobs import JobAdapter

__all__ = [
    "BEARER",
    "BUILT_IN",
    "ENTRY_POINT_GROUP",
    "PROVIDERS",
    "Adapter",
    "Answer",
    "AnyAdapter",
    "KeyAuth",
    "Provider",
    "ProviderId",
    "ProviderName",
    "canonical_name",
    "get_adapter",
    "provider_origin",
    "register_provider",
]

ENTRY_POINT_GROUP: Final = "flux_adapters.providers"
"""The entry-point group a provider package registers its adapter under (``name = "module:Class"``)."""

BUILT_IN: Final[Mapping[str, str]] = {
    "laozhang": "flux_adapters.providers.laozhang:LaozhangAdapter",
    "apiyi": "flux_adapters.providers.apiyi:ApiyiAdapter",
    "apiyi-multipart": "flux_adapters.providers.apiyi:ApiyiMultipartAdapter",
    "aimlapi": "flux_adapters.providers.aimlapi:AimlapiAdapter",
    "bfl": "flux_adapters.providers.bfl:BflAdapter",
    "fal": "flux_adapters.providers.fal:FalAdapter",
}
"""The providers this library ships: id -> ``module:Class`` of its adapter."""

_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _host_patterns(hosts: Iterable[str]) -> tuple[str, ...]:
    """*hosts* as a tuple of host patterns that stay within one provider's domain.

    Each is a host name (``api.bfl.ai``, ``localhost``) or ``*.`` before a name of two labels or
    more (``*.bfl.ai``). Nothing wider: a ``*`` alone, ``*.ai`` or ``bfl.*`` would send the key
    to hosts the provider does not own whenever an answer names one. A str is refused rather
    than read as a sequence: its characters, ``*`` among them, would each be a pattern.
    """
    why = "hosts must be a tuple of host names or '*.' patterns such as ('*.bfl.ai',)"
    if isinstance(hosts, str | bytes) or not isinstance(hosts, tuple | list | frozenset | set):
        raise ConfigurationError(f"KeyAuth: {why}, not {type_name(hosts)}")
    patterns = tuple(hosts)
    for pattern in patterns:
        name = pattern[2:] if isinstance(pattern, str) and pattern.startswith("*.") else pattern
        if not (
            isinstance(name, str)
            and _DNS_NAME.fullmatch(name.lower())
            and (name is pattern or "." in name)
        ):
            raise ConfigurationError(f"KeyAuth: {why}; not {render_value(pattern)}")
    return patterns


@frozen(kw_only=True)
class KeyAuth:
    """How an adapter's API key is sent, and which hosts may receive it.

    Attributes:
        header: The header that carries the key (``"Authorization"``, ``"x-key"``), or ``None``
            when a query parameter does.
        scheme: The word before the key in the header (``"Bearer"``, ``"Key"``, ``"Token"``),
            or ``None`` for the key alone.
        query: The query parameter that carries the key, instead of a header.
        hosts: Host patterns besides the base URL's own origin that may receive the key, for
            URLs the provider returns (``"*.bfl.ai"`` for polling URLs on regional hosts): over
            https, or over http when the base URL itself is http (an emulator). They are the
            provider's own hosts, so they apply only while the configured base URL's host is
            one of them: with a base URL at a reseller or a proxy (``https://bfl-proxy.test``),
            the key is that reseller's, and goes to the base URL's own origin only. A result or
            delivery URL never receives it: downloads carry none.
    """

    header: str | None = "Authorization"
    scheme: str | None = "Bearer"
    query: str | None = None
    hosts: tuple[str, ...] = field(default=(), converter=_host_patterns)

    def __attrs_post_init__(self) -> None:
        if (self.header is None) == (self.query is None):
            raise ConfigurationError("KeyAuth: give a header or a query parameter, one of them")
        words = [word for word in (self.header, self.scheme, self.query) if word is not None]
        if not all(re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", word) for word in words):
            raise ConfigurationError("KeyAuth: header, scheme and query must be plain tokens")

    def describe(self) -> str:
        """Where the key goes, with the key itself redacted: ``x-key: [redacted]``."""
        if self.header is None:
            return f"?{self.query}=[redacted]"
        return f"{self.header}: {self.scheme + ' ' if self.scheme else ''}[redacted]"

    def value(self, key: str) -> str:
        """The header value (or query value) that carries *key*."""
        return f"{self.scheme} {key}" if self.scheme and self.header else key

    def allows(self, url: str, base_url: str) -> bool:
        """Whether *url* may receive the key: *base_url*'s own origin, or a declared host.

        A declared host only while *base_url* is itself at one (`declares`): the provider's own
        API. Any other base URL (a reseller, a proxy) keeps its key to its own origin, whatever
        hosts the URLs it returns name.
        """
        try:
            theirs, mine = urlsplit(url), urlsplit(base_url)
            host = theirs.hostname or ""
            base_host = mine.hostname or ""
        except ValueError:
            return False
        if (theirs.scheme, theirs.netloc) == (mine.scheme, mine.netloc):
            return True
        # A declared host over https; over plain http only when the base URL is plain http too
        # (an emulator, a local proxy), where the key travels in the clear anyway.
        secure = theirs.scheme == "https" or theirs.scheme == mine.scheme == "http"
        return secure and self.declares(base_host) and self.declares(host)

    def declares(self, host: str) -> bool:
        r"""Whether *host* (lower case, as ``urlsplit`` gives it) is one of the declared hosts.

        Only a plain DNS name is matched: "evil.com\.bfl.ai" or "evil.com%2f.bfl.ai" end like a
        declared host, but a resolver need not read them as one of its names.
        """
        return _DNS_NAME.fullmatch(host) is not None and any(
            fnmatch.fnmatchcase(host, pattern.lower()) for pattern in self.hosts
        )


_DNS_NAME: Final = re.compile(
    r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
)
"""A host name of letters, digits and inner hyphens in dot-separated labels (lower case, as
``urlsplit`` gives it)."""

BEARER: Final = KeyAuth()
"""``Authorization: Bearer <key>`` to the base URL's origin only: an adapter's default."""


@frozen(kw_only=True)
class Answer:
    """A successful answer, parsed: the images and any usage the provider reported."""

    images: tuple[ResultImage, ...]
    usage: Usage | None = None


class Adapter(Protocol):
    """What the client needs from the adapter of a synchronous provider (one call).

    Optional data an adapter may also declare (read with ``getattr``, so older adapters keep
    working): ``auth`` (a `KeyAuth`; default `BEARER`), ``not_taken`` (status -> the document
    saying it is not billed), ``prices`` (model -> ``flux_adapters.prices.Price``),
    ``usd_per_credit`` (the dollar value of a credit in ``Usage.credits_used``, when the
    provider documents it), ``result_forms`` (``{"url"}``, ``{"url", "b64_json"}``).
    """

    @property
    def name(self) -> str:
        """Provider id, e.g. ``"laozhang"``."""

    @property
    def default_base_url(self) -> str:
        """The provider's real base URL, without ``/v1``."""

    @property
    def env_prefix(self) -> str:
        """Prefix of the environment variables read by the client: ``<PREFIX>_API_KEY``."""

    @property
    def limits(self) -> Mapping[str, ModelLimits]:
        """Canonical model id -> limits, for every model the provider offers."""

    def build_request(self, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
        """Return the request that performs *request* as resolved by *plan*."""

    def parse_response(self, response: HttpResponse) -> Answer:
        """Read a successful (2xx) answer.

        Raises:
            ResponseFormatError: The body is not the documented shape.
            ProviderError: The body reports an error despite the status.
        """

    def parse_error(self, response: HttpResponse) -> ProviderError:
        """Return the typed error for an error answer (status >= 300)."""


AnyAdapter: TypeAlias = "Adapter | JobAdapter"
"""Either kind of adapter: a synchronous provider's or an asynchronous one's."""

Provider: TypeAlias = "ProviderId | ProviderName | Adapter | JobAdapter"
"""What the clients take as a provider: a built-in id (`ProviderId`, checked by mypy), the id of
a provider registered at run time (`ProviderName`), or an adapter object."""


@frozen
class _Clash:
    """Several installed packages register one provider id: none of them is used."""

    origins: tuple[str, ...]


class _Registry:
    """Every provider known: built in, from installed packages' entry points, or registered.

    Each id is loaded under a lock of its own, reentrant: a provider package whose import is
    slow (or waits on a thread that loads another provider) holds up no other id, and one that
    loads another provider while it is imported, in the same thread, does not deadlock.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._targets: dict[str, tuple[object, str]] = {
            name: (target, "built in") for name, target in BUILT_IN.items()
        }
        self._loaded: dict[str, AnyAdapter] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._loading = threading.local()
        self._ignored: dict[str, str] = {}
        """Entry points not used, by id asked for (lower case) -> why (said when it is asked)."""
        self._scanned = False

    def _scan(self) -> None:
        """Read the installed packages' entry points once (their modules load only when used).

        Two packages that claim one id (in any case) make that id unusable, naming both: taking
        the first found would make the adapter, and so the billing rules, that serve the id
        depend on the order of ``sys.path``.
        """
        if self._scanned:
            return
        from importlib.metadata import entry_points

        unread: list[str] = []
        try:
            found = list(entry_points(group=ENTRY_POINT_GROUP))  # two threads may both read
        except Exception:
            # One installed package's entry_points.txt that cannot be parsed (a line without
            # "=", in any group) fails the whole reading, with a bare TypeError: every provider
            # of every other package would be unknown, and `models` would stop. Read them one
            # package at a time instead, leaving out (and naming) those that cannot be read.
            found = _entry_points_one_by_one(unread)
        claims: dict[str, dict[tuple[str, str], object]] = {}
        ignored: dict[str, str] = {}
        for point in found:
            name = point.name.strip().lower()
            # The package's own metadata: shown in messages and by `models`, so made printable.
            package = (
                printable(str(point.dist.name))
                if point.dist is not None
                else "an installed package"
            )
            if not _NAME.fullmatch(name):
                ignored[name] = (
                    f"the entry point {render_value(point.name)} of {render_value(package)} "
                    "is ignored: not a usable provider id (1 to 64 letters, digits, '.', '_' "
                    "or '-')"
                )
            elif name in BUILT_IN:
                ignored[name] = (
                    f"the entry point {name!r} of {render_value(package)} is ignored: "
                    f"{name!r} is built in, and the built-in provider is used"
                )
            else:
                # The same package and target seen twice (installed on two paths) is one claim.
                claims.setdefault(name, {}).setdefault((str(package), point.value), point)
        if ignored or unread:
            import logging

            from flux_adapters._log import note

            for why in [*ignored.values(), *unread]:
                note(logging.WARNING, "entry-point-ignored", str, "%s", why)
        with self._lock:
            self._ignored.update(ignored)
            for name, claimed in claims.items():
                if name in self._targets:  # register_provider() came first: it stays
                    continue
                origins = tuple(f"entry point of {package}" for package, _ in claimed)
                if len(claimed) == 1:
                    self._targets[name] = (next(iter(claimed.values())), origins[0])
                else:
                    packages = sorted(render_value(package) for package, _ in claimed)
                    self._targets[name] = (
                        _Clash(origins),
                        f"entry points of {', '.join(packages)}: a conflict",
                    )
            self._scanned = True

    def names(self) -> tuple[str, ...]:
        self._scan()
        return tuple(self._targets)

    def origin(self, name: str) -> str:
        self._scan()
        return self._targets[self.canonical(name)][1]

    def canonical(self, name: object) -> str:
        """*name* as a registered id (any case), or `ConfigurationError` with a suggestion."""
        if not issubclass(type(name), str):
            raise ConfigurationError(
                f"a provider id must be a str, not {type_name(name)} ({render_value(name)}); "
                f"known: {', '.join(self.names())}"
            )
        text = str.__str__(name).strip().lower()
        if text in BUILT_IN:
            return text
        self._scan()
        if text not in self._targets:
            raise ConfigurationError(self._unknown(str.__str__(name)))
        return text

    def _unknown(self, name: str) -> str:
        message = f"unknown provider {render_value(name)}"
        why = self._ignored.get(name.strip().lower())
        if why is not None:
            return f"{message}: {why}"
        known = self.names()
        if len(name) <= 64:  # difflib is quadratic; a long id resembles nothing anyway
            import difflib  # lazy: only a mistyped id pays for it

            close = difflib.get_close_matches(name.strip().lower(), known, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        return f"{message}; known: {', '.join(known)}"

    def get(self, name: object) -> AnyAdapter:
        canonical = self.canonical(name)
        adapter = self._loaded.get(canonical)
        if adapter is not None:
            return adapter
        with self._lock:
            lock = self._locks.setdefault(canonical, threading.RLock())
        with lock:
            adapter = self._loaded.get(canonical)
            if adapter is not None:
                return adapter
            loading: set[str] = self._loading.__dict__.setdefault("names", set())
            with self._lock:
                target, origin = self._targets[canonical]
            if canonical in loading:
                raise ConfigurationError(
                    f"provider {canonical!r} ({origin}) asks for itself while it is loaded"
                )
            loading.add(canonical)
            try:
                adapter = _load(canonical, target, origin)
            finally:
                loading.discard(canonical)
            with self._lock:
                if self._targets.get(canonical, (None,))[0] is target:  # not replaced meanwhile
                    self._loaded[canonical] = adapter
        return adapter

    def register(self, name: object, adapter: object, *, replace: bool) -> str:
        if not issubclass(type(name), str) or not _NAME.fullmatch(
            canonical := str.__str__(name).strip().lower()
        ):
            raise ConfigurationError(
                f"a provider id is 1 to 64 lower-case letters, digits, '.', '_' or '-' "
                f"(got {render_value(name)})"
            )
        if canonical in BUILT_IN:
            raise ConfigurationError(f"{canonical!r} is a built-in provider; choose another id")
        self._scan()
        with self._lock:
            if canonical in self._targets and not replace:
                origin = self._targets[canonical][1]
                raise ConfigurationError(
                    f"a provider {canonical!r} is already known ({origin}); pass replace=True"
                )
            self._targets[canonical] = (adapter, "register_provider()")
            self._loaded.pop(canonical, None)
        return canonical


def _entry_points_one_by_one(unread: list[str]) -> list[Any]:
    """The entry points of `ENTRY_POINT_GROUP`, read one installed package at a time.

    A package whose entry points cannot be read is left out, and why is added to *unread*.
    """
    from importlib.metadata import distributions

    found: list[Any] = []
    seen: set[str] = set()
    try:
        installed = list(distributions())
    except Exception as exc:
        unread.append(f"the installed packages cannot be listed ({type_name(exc)})")
        return found
    for dist in installed:
        try:
            package = printable(str(dist.name))
        except Exception:
            package = "an installed package"
        same = re.sub(r"[-_.]+", "-", package).lower()
        if same in seen:  # the first on sys.path, as entry_points() takes it
            continue
        seen.add(same)
        try:
            found += list(dist.entry_points.select(group=ENTRY_POINT_GROUP))
        except Exception as exc:
            unread.append(
                f"the entry points of {render_value(package)} cannot be read ({type_name(exc)}); "
                "its providers, if any, are not known"
            )
    return found


def _load(name: str, target: object, origin: str) -> AnyAdapter:
    """The adapter behind *target*: a ``module:Class`` text, an entry point, a class or object.

    Whatever the provider package's code raises while it is imported or built (an exception of
    its own outside ``Exception``, one whose text cannot be made) is a `ConfigurationError`;
    only an interruption (Ctrl-C, ``sys.exit``) goes on up as it is.
    """
    from flux_adapters._display import describe_exception
    from flux_adapters._foreign import is_interruption
    from flux_adapters._options import check_adapter

    if isinstance(target, _Clash):
        raise ConfigurationError(
            f"provider {name!r} is registered by more than one installed package "
            f"({'; '.join(target.origins)}); none of them is used: uninstall all but one"
        )
    try:
        if isinstance(target, str):
            module_name, _, attribute = target.partition(":")
            target = getattr(importlib.import_module(module_name), attribute)
        elif hasattr(target, "load") and hasattr(target, "group"):  # an entry point
            target = target.load()
        adapter = target() if isinstance(target, type) else target
    except ConfigurationError:
        raise
    except BaseException as exc:
        if is_interruption(exc):
            raise
        raise ConfigurationError(
            f"provider {name!r} ({origin}) could not be loaded: {describe_exception(exc)}"
        ) from exc
    checked = check_adapter(adapter)
    if getattr(checked, "name", None) != name:
        raise ConfigurationError(
            f"provider {name!r} ({origin}) names itself {render_value(getattr(checked, 'name', None))}"
        )
    return checked  # type: ignore[return-value]


_REGISTRY: Final = _Registry()


class _Providers(Mapping[str, str]):
    """A live view: provider id -> where it comes from."""

    def __getitem__(self, name: str) -> str:
        try:
            return _REGISTRY.origin(name)
        except ConfigurationError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY.names())

    def __len__(self) -> int:
        return len(_REGISTRY.names())

    def __contains__(self, name: object) -> bool:
        try:
            _REGISTRY.canonical(name)
        except ConfigurationError:
            return False
        return True

    def __repr__(self) -> str:
        return f"PROVIDERS({dict(self)!r})"


PROVIDERS: Final[Mapping[str, str]] = _Providers()
"""Every provider id known now -> where it comes from (``"built in"``, ``"entry point of
<package>"``, ``"register_provider()"``). Built-in ids come first."""


def get_adapter(name: str) -> AnyAdapter:
    """Return the adapter known as *name* (any case).

    Raises:
        ConfigurationError: No provider has that id (with a suggestion for a near miss), *name*
            is not a ``str`` at all, or a provider package's adapter cannot be loaded.
    """
    return _REGISTRY.get(name)


def canonical_name(name: object) -> ProviderName:
    """*name* as the id of a known provider (``"BFL "`` -> ``"bfl"``), typed for the clients.

    Raises:
        ConfigurationError: No provider has that id (with a suggestion for a near miss), or
            *name* is not a ``str``.
    """
    return ProviderName(_REGISTRY.canonical(name))


def provider_origin(name: str) -> str:
    """Where the provider *name* comes from: ``"built in"``, ``"entry point of <package>"``...

    Raises:
        ConfigurationError: No provider has that id.
    """
    return _REGISTRY.origin(name)


def register_provider(name: str, adapter: Any, *, replace: bool = False) -> ProviderName:
    """Make *adapter* known as *name*, for code that cannot ship entry-point metadata.

    *adapter* is an adapter object, its class, or ``"module:Class"``; it is loaded (and checked)
    when first used. Returns the id as stored (lower case), as a `ProviderName` that the
    clients' type signatures take (``FluxClient(register_provider("pixelforge", ...))``).

    Raises:
        ConfigurationError: *name* is not a usable id, is built in, or is taken (unless
            *replace*).
    """
    return ProviderName(_REGISTRY.register(name, adapter, replace=replace))
