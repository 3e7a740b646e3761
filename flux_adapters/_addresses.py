"""Where a URL the provider gave may lead: public addresses only, unless the operator says so.

A hostile or compromised provider chooses the URLs the library then fetches by itself: result
images, polling URLs, and every redirect from them. Left alone, a GET would go to loopback, a
private network, or the cloud's metadata service (169.254.169.254): a request forgery from the
gateway's host. So such a URL may lead only to public addresses (``ipaddress``'s
``is_global``, not multicast, IPv4 inside IPv6 judged as the IPv4 address it carries).

Trusted without a check (`guard_for` gives no guard):

- a provider whose configured base URL's host is itself a non-public address (a literal IP,
  or ``localhost``): the emulator on 127.0.0.1, a reseller on the internal network;
- a provider configured with ``allow_private_urls`` (the operator's opt-out);
- a URL at the base URL's own host and port: that is where the operator sends the key.

The check is made where a connection is opened, after the name is resolved, on the addresses
then connected to (`GUARDED`, read by ``flux_adapters._bounded``'s network backends and the
aiohttp driver's connector): a name that resolves to a public address for one look and a private
one for the next (DNS rebinding) gains nothing. Where the library cannot reach the connection (a
caller's ``http_client``, an HTTP proxy, which resolves the name itself), the name is resolved
beforehand and checked (`Target.check_resolved`): best effort, since the proxy or the
connection resolves it again. Literal IP hosts are refused before anything is sent, everywhere.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Final
from urllib.parse import urlsplit

from flux_adapters._display import escape_controls, toml_key
from flux_adapters.errors import AddressRefused

__all__ = ["GUARDED", "Guard", "Target", "address_kind", "guard_for", "strict"]

GUARDED: contextvars.ContextVar[Target | None] = contextvars.ContextVar(
    "flux_guarded", default=None
)
"""The provider-given URL being fetched in this context (``None``: a URL the operator trusts)."""

_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED: Final = ipaddress.IPv4Network("100.64.0.0/10")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _embedded(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address *ip* carries, where packets to it reach that address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_kind(address: str) -> str | None:
    """What kind of non-public address *address* (an IP, as text) is; ``None`` when public.

    Text that is no IP address is refused too ("not an IP address"): a resolver that answers
    with one is not to be trusted.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address.partition("%")[0]  # an IPv6 zone ("fe80::1%eth0")
        )
    except ValueError:
        return "not an IP address"
    inside = ""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded(ip)
        if embedded is not None:
            ip, inside = embedded, " (IPv4 inside IPv6)"
    if ip.is_unspecified:
        kind = "unspecified (0.0.0.0 or ::)"
    elif ip.is_loopback:
        kind = "loopback"
    elif ip.is_link_local:
        kind = "link-local (where cloud metadata services answer)"
    elif ip.is_multicast:
        kind = "multicast"
    elif isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        kind = "shared (carrier-grade NAT)"
    elif isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        kind = "private network (IPv6 site-local)"  # fec0::/10: deprecated, ipaddress says global
    elif ip.is_private:
        kind = "private network"
    elif ip.is_reserved or not ip.is_global:
        kind = "reserved or special-purpose"
    else:
        return None
    return kind + inside


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _trusted_host(host: str) -> bool:
    """Whether a base URL at *host* is itself non-public: a literal such address, or localhost."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    return _literal(host) and address_kind(host) is not None


_UNREADABLE_PORT: Final = -1
"""The port of a URL whose port ``urlsplit`` refuses but a sender may read (`_origin`)."""


def _origin(url: str) -> tuple[str, int | None] | None:
    """Host (lower case, no brackets) and port (the scheme's default if none) of *url*.

    ``None`` when it has no host. A port ``urlsplit`` refuses ("+8080", " 8080", "８０８０") is
    read by ``int()``, as httpx and yarl read it, and they send there: it is then
    `_UNREADABLE_PORT`, never the base URL's own port.

    Raises:
        ValueError: ``urlsplit`` cannot read *url* (its host is unknown here).
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return None
    try:
        port = parts.port
    except ValueError:
        return host, _UNREADABLE_PORT
    return host, port if port is not None else _DEFAULT_PORTS.get(parts.scheme.lower())


class Guard:
    """The check of one provider's URLs: made once per configured provider.

    Args:
        provider: The provider id (for messages).
        base_url: The configured base URL: its host and port are trusted.
        scrub: Removes the client's keys from a message (a URL may carry one).
        hint: What a refusal's message says to do instead of naming the provider's
            ``allow_private_urls`` (for URLs whose provider is not known, `strict`).
    """

    __slots__ = ("_base", "hint", "provider", "scrub")

    def __init__(
        self, provider: str, base_url: str, scrub: Callable[[str], str], hint: str = ""
    ) -> None:
        self.provider = provider
        self.scrub = scrub
        self.hint = hint
        try:
            self._base = _origin(base_url)
        except ValueError:
            self._base = None

    def target(self, url: str, what: str) -> Target | None:
        """The check to make for a fetch of *url* (*what*: "result", "polling"...).

        ``None``: nothing to check at connect time (the base URL's own host and port, a public
        literal IP, or a URL with no host, which cannot be sent at all).

        Raises:
            AddressRefused: *url*'s host is a literal non-public IP address, or cannot be read
                (where a sender, reading it otherwise, would go is unknown).
        """
        try:
            found = _origin(url)
        except ValueError:
            raise Target(self, "?", None, what).refused("unreadable") from None
        if found is None or found == self._base:
            return None
        host, port = found
        if port == _UNREADABLE_PORT:
            port = None
        if _literal(host):
            kind = address_kind(host)
            if kind is not None:
                raise Target(self, host, port, what).refused(kind)
            return None
        return Target(self, host, port, what)


class Target:
    """One provider-given URL's host, to be checked where its connection is opened."""

    __slots__ = ("guard", "host", "port", "what")

    def __init__(self, guard: Guard, host: str, port: int | None, what: str) -> None:
        self.guard = guard
        self.host = host
        self.port = port
        self.what = what

    def refused(self, kind: str) -> AddressRefused:
        """The error for this host leading to an address of *kind*."""
        guard = self.guard
        shown = self.host if ":" not in self.host else f"[{self.host}]"
        if self.port is not None:
            shown = f"{shown}:{self.port}"
        shown = escape_controls(guard.scrub(shown))[:200]
        where = (
            "has a host that cannot be read (a sender reading it otherwise could go anywhere)"
            if kind == "unreadable"
            else f"leads to a {kind} address ({shown})"
        )
        allow = guard.hint or (
            "A provider may only lead the library to public addresses unless its base_url is "
            "itself private; to allow it, set allow_private_urls = true in "
            f"[provider.{toml_key(guard.provider)}] (ProviderSettings(allow_private_urls=True))"
        )
        return AddressRefused(
            f"the {self.what} URL it gave {where}; nothing was sent there. {allow}",
            provider=guard.provider,
            host=shown,
            reason=kind,
        )

    def check(self, addresses: Iterable[str]) -> None:
        """Refuse unless every one of *addresses* (what the host resolved to) is public.

        Every one, not only the first: a name answering with a public and a private address
        would be connected to the second when the first fails.

        Raises:
            AddressRefused: One is not public.
        """
        for address in addresses:
            kind = address_kind(address)
            if kind is not None:
                raise self.refused(kind)

    def check_resolved(self) -> None:
        """Resolve the host and `check` its addresses, where the connection cannot be reached.

        Best effort: the connection (or a proxy) resolves the name again. A name that does not
        resolve here is left to fail where it is sent.

        Raises:
            AddressRefused: An address is not public.
        """
        try:
            found = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        self.check(str(info[4][0]) for info in found)

    async def acheck_resolved(self) -> None:
        """Async twin of `check_resolved`."""
        import asyncio

        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            return
        self.check(str(info[4][0]) for info in found)


def strict(provider: str, hint: str, scrub: Callable[[str], str] | None = None) -> Guard:
    """The guard of URLs a provider gave that is not known (or not said): nothing is trusted.

    No base URL, so no host is trusted; literal and resolved non-public addresses are refused.
    *scrub*: a client's removal of its keys (default: of key-shaped text only).
    """
    if scrub is None:
        from flux_adapters._redact import redact  # the key-shaped text of any provider

        scrub = redact
    return Guard(provider, "", scrub, hint)


def guard_for(
    provider: str, base_url: str, scrub: Callable[[str], str], allow_private_urls: bool
) -> Guard | None:
    """The guard of a provider at *base_url*; ``None`` when its URLs are trusted as they are."""
    if allow_private_urls:
        return None
    try:
        base = _origin(base_url)
    except ValueError:
        base = None
    if base is not None and _trusted_host(base[0]):
        return None
    return Guard(provider, base_url, scrub)
