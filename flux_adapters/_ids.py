"""The ids the library knows by name, as types a type checker can hold you to.

``mypy --strict`` then flags ``model="flux-2-por"`` and ``FluxClient("laozang")`` before they
run. At run time the same values are checked again (a typo is a `RequestError` or a
`ConfigurationError` naming the nearest id), since not every caller is type-checked.

Provider ids are of two kinds. The built-in ones are a fixed set, `ProviderId`. A provider a
package installs (an entry point in ``flux_adapters.providers``) or code registers
(``register_provider``) is known only at run time, so no type can list it: it is given as a
`ProviderName`, a ``str`` marked "I mean a registered provider" (``ProviderName("nimbus")``), or
as its adapter object. A plain ``str`` variable is not accepted where a provider id is expected,
so a misspelt literal cannot slip through as "maybe registered"; a name read from configuration
is wrapped once, where it is read, and checked when the client is built.

This module imports nothing heavy: ``from flux_adapters import ModelId`` stays cheap.
"""

from __future__ import annotations

from typing import Literal, NewType, TypeAlias

__all__ = ["ModelId", "ProviderId", "ProviderName", "Routing"]

ModelId: TypeAlias = Literal[
    "flux-2-pro",
    "flux-2-max",
    "flux-2-flex",
    "flux-2-klein-4b",
    "flux-2-klein-9b",
    "flux-kontext-pro",
    "flux-kontext-max",
]
"""A canonical FLUX model id (Black Forest Labs' own), as ``flux_adapters.MODELS`` lists them."""

ProviderId: TypeAlias = Literal["laozhang", "apiyi", "apiyi-multipart", "aimlapi", "bfl", "fal"]
"""The id of a provider this library ships (``flux_adapters.providers.BUILT_IN``)."""

ProviderName = NewType("ProviderName", str)
"""The id of a provider registered at run time (an installed package's, or
``register_provider``'s): ``ProviderName("nimbus")``. Checked against the registry, in any
case, when a client is built; ``register_provider`` returns one."""

Routing: TypeAlias = Literal["ordered", "cheapest"]
"""How a client with several providers orders them (``flux_adapters.routing.RoutingPolicy``)."""
