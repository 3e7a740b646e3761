"""flux-adapters: one provider-neutral FLUX image edit request, translated for each API reseller.

Build an `EditRequest`, send it with `FluxClient` (or `AsyncFluxClient`) to ``laozhang``,
``apiyi``, ``apiyi-multipart``, ``aimlapi``, ``bfl`` or ``fal``; each provider's limits for the
model are checked before anything is sent, and every error is a subclass of `errors.FluxError`.
`ModelId` and `ProviderId` are the ids as ``Literal`` types (``mypy --strict`` flags a typo);
`ProviderName` names a provider registered at run time. `ImageLike` is one image as
``EditRequest(images=...)`` takes it (a URL, a path, bytes, a binary file, a Pillow image).

Names are loaded on first use (PEP 562), so ``import flux_adapters`` costs almost nothing and a
script that only builds and checks requests never imports httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from flux_adapters._version import __version__

if TYPE_CHECKING:
    from flux_adapters import errors
    from flux_adapters._flows import check
    from flux_adapters._ids import ModelId, ProviderId, ProviderName
    from flux_adapters.client import AsyncFluxClient, FluxClient
    from flux_adapters.errors import Violation
    from flux_adapters.limits import ModelLimits
    from flux_adapters.providers import PROVIDERS, get_adapter, register_provider
    from flux_adapters.request import MODELS, EditRequest, ImageLike
    from flux_adapters.result import Attempt, ConversionWarning, EditResult, ResultImage, Usage

_EXPORTS = {
    "MODELS": "flux_adapters.request",
    "PROVIDERS": "flux_adapters.providers",
    "AsyncFluxClient": "flux_adapters.client",
    "Attempt": "flux_adapters.result",
    "ConversionWarning": "flux_adapters.result",
    "EditRequest": "flux_adapters.request",
    "EditResult": "flux_adapters.result",
    "FluxClient": "flux_adapters.client",
    "ImageLike": "flux_adapters.request",
    "ModelId": "flux_adapters._ids",
    "ModelLimits": "flux_adapters.limits",
    "ProviderId": "flux_adapters._ids",
    "ProviderName": "flux_adapters._ids",
    "ResultImage": "flux_adapters.result",
    "Usage": "flux_adapters.result",
    "Violation": "flux_adapters.errors",
    "check": "flux_adapters._flows",
    "get_adapter": "flux_adapters.providers",
    "register_provider": "flux_adapters.providers",
}

__all__ = [
    "MODELS",
    "PROVIDERS",
    "AsyncFluxClient",
    "Attempt",
    "ConversionWarning",
    "EditRequest",
    "EditResult",
    "FluxClient",
    "ImageLike",
    "ModelId",
    "ModelLimits",
    "ProviderId",
    "ProviderName",
    "ResultImage",
    "Usage",
    "Violation",
    "__version__",
    "check",
    "errors",
    "get_adapter",
    "register_provider",
]


def __getattr__(name: str) -> object:
    if name == "errors":
        return importlib.import_module("flux_adapters.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flux_adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
