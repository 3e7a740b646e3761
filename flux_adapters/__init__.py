"""flux-adapters: one provider-neutral FLUX image edit request, translated for each API reseller.

Build an `EditRequest`, send it with `FluxClient` (or `AsyncFluxClient`) to ``laozhang``,
``apiyi``, ``apiyi-multipart`` or ``aimlapi``; each provider's limits for the model are checked
before anything is sent, and every error is a subclass of `errors.FluxError`.
"""

from flux_adapters import errors
from flux_adapters._flows import check
from flux_adapters._version import __version__
from flux_adapters.client import AsyncFluxClient, FluxClient
from flux_adapters.errors import Violation
from flux_adapters.limits import ModelLimits
from flux_adapters.providers import PROVIDERS, get_adapter
from flux_adapters.request import MODELS, EditRequest
from flux_adapters.result import Attempt, ConversionWarning, EditResult, ResultImage, Usage

__all__ = [
    "MODELS",
    "PROVIDERS",
    "AsyncFluxClient",
    "Attempt",
    "ConversionWarning",
    "EditRequest",
    "EditResult",
    "FluxClient",
    "ModelLimits",
    "ResultImage",
    "Usage",
    "Violation",
    "__version__",
    "check",
    "errors",
    "get_adapter",
]
