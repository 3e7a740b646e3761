"""The provider registry and the contract every adapter meets.

An adapter is pure: it turns an `EditRequest` (resolved into a `Plan` by the limits check) into
one `HttpRequest`, and an `HttpResponse` into an `Answer` or a typed error. It never sends,
sleeps, reads files or the environment, or logs. Provider modules are imported only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Final, Protocol

from attrs import frozen

from flux_adapters._display import render_value, type_name
from flux_adapters.errors import ConfigurationError, ProviderError
from flux_adapters.limits import ModelLimits, Plan
from flux_adapters.request import EditRequest
from flux_adapters.result import ResultImage, Usage
from flux_adapters.wire import HttpRequest, HttpResponse

__all__ = ["PROVIDERS", "Adapter", "Answer", "get_adapter"]

PROVIDERS: Final[Mapping[str, str]] = {
    "laozhang": "flux_adapters.providers.laozhang:LaozhangAdapter",
    "apiyi": "flux_adapters.providers.apiyi:ApiyiAdapter",
    "apiyi-multipart": "flux_adapters.providers.apiyi:ApiyiMultipartAdapter",
    "aimlapi": "flux_adapters.providers.aimlapi:AimlapiAdapter",
}
"""Provider id -> ``module:Class`` of its adapter."""


@frozen(kw_only=True)
class Answer:
    """A successful answer, parsed: the images and any usage the provider reported."""

    images: tuple[ResultImage, ...]
    usage: Usage | None = None


class Adapter(Protocol):
    """What the client needs from a provider adapter."""

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


_loaded: dict[str, Adapter] = {}


def get_adapter(name: str) -> Adapter:
    """Return the adapter registered as *name*.

    Raises:
        ConfigurationError: No provider has that id (or *name* is not a ``str`` at all).
    """
    given: object = name
    if type(given) is not str:
        # By the real type: an unhashable or hostile value never reaches the dict lookups.
        if not issubclass(type(given), str):
            raise ConfigurationError(
                f"a provider id must be a str, not {type_name(given)} ({render_value(given)}); "
                f"known: {', '.join(PROVIDERS)}"
            )
        name = str.__str__(given)  # a plain copy of a str subclass
    adapter = _loaded.get(name)
    if adapter is None:
        target = PROVIDERS.get(name)
        if target is None:
            raise ConfigurationError(_unknown_provider(name))
        module_name, class_name = target.split(":")
        adapter = getattr(importlib.import_module(module_name), class_name)()
        _loaded[name] = adapter
    return adapter


def _unknown_provider(name: str) -> str:
    message = f"unknown provider {render_value(name)}"
    if len(name) <= 64:  # difflib is quadratic; a long id resembles nothing anyway
        import difflib  # lazy: only a mistyped id pays for it

        close = difflib.get_close_matches(name.strip().lower(), PROVIDERS, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return f"{message}; known: {', '.join(PROVIDERS)}"
