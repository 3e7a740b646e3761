"""What ``mypy --strict`` must accept: the ways to name a provider known only at run time.

Never run; part of the project's own mypy run.
"""

from __future__ import annotations

import os

import httpx

from flux_adapters import (
    MODELS,
    EditRequest,
    FluxClient,
    ModelId,
    ProviderId,
    ProviderName,
    check,
    get_adapter,
    register_provider,
)


def names_on_purpose(http: httpx.Client) -> list[FluxClient]:
    built_in: ProviderId = "apiyi-multipart"
    model: ModelId = MODELS[0]
    request = EditRequest(prompt="a robot", model=model)
    check(request, built_in)
    check(request, ProviderName("nimbus"))  # an installed provider package, by its id
    registered = register_provider("pixelforge", "pixelforge:PixelForgeAdapter")
    from_configuration = ProviderName(os.environ.get("PROVIDER", "laozhang"))
    return [
        FluxClient(built_in, http_client=http, timeout=httpx.Timeout(30.0), max_retries=2),
        FluxClient(ProviderName("nimbus")),
        FluxClient(registered),
        FluxClient(from_configuration),
        FluxClient(get_adapter("nimbus")),  # the adapter object: checked when looked up
        FluxClient(providers=["laozhang", ProviderName("nimbus")], routing="cheapest"),
        FluxClient("laozhang").with_options(timeout=5, max_retries=1),
    ]
