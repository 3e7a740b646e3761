"""What ``mypy --strict`` must accept: the ways to name a provider known only at run time, the
images people have in hand, and what results and errors tell.

Never run; part of the project's own mypy run.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import httpx
from PIL import Image

from flux_adapters import (
    MODELS,
    EditRequest,
    EditResult,
    FluxClient,
    ImageLike,
    ModelId,
    ProviderId,
    ProviderName,
    check,
    errors,
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


def images_in_hand(path: Path, photo: Image.Image) -> list[EditRequest]:
    one: ImageLike = photo
    with path.open("rb") as stream:
        from_file = EditRequest(prompt="a robot", model="flux-2-pro", images=[stream, one])
    return [
        from_file,
        EditRequest(prompt="a robot", model="flux-2-pro", images=path),  # one image on its own
        EditRequest(prompt="a robot", model="flux-2-pro", images=io.BytesIO(b"...")),
        EditRequest(prompt="a robot", model="flux-2-pro", images=photo),
        EditRequest(prompt="a robot", model="flux-2-pro", images=b"\x89PNG..."),
        EditRequest(
            prompt="a robot",
            model="flux-2-pro",
            images=[photo, b"...", bytearray(b"..."), "https://example.com/a.png", path],
        ),
    ]


def what_results_and_errors_tell(client: FluxClient, request: EditRequest) -> str:
    try:
        result: EditResult = client.edit(request)
    except errors.ProviderError as error:
        request_id: str | None = error.request_id
        headers: Mapping[str, str] = error.response_headers
        return f"{request_id} {headers.get('retry-after')}"
    except errors.ClientClosedError:
        return "closed"
    image = result.images[0]
    kind: str | None = image.format
    media: str | None = image.media_type
    try:
        image.save("scene.png")
    except errors.ExtensionMismatch as mismatch:
        image.save(mismatch.suggested)
    return json.dumps(result.to_dict()) + f"{kind} {media} {result.request_id}"
