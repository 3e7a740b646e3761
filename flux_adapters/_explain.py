"""Render an `HttpRequest` as the provider would receive it, for ``flux-adapters explain``.

The key is shown where the adapter sends it (``Authorization: Bearer``, ``x-key``, a query
parameter), as ``[redacted]``; images are abbreviated to their start, kind and size, so the
output stays readable and never holds a whole image.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx

from flux_adapters._bodies import json_segments, segments_length
from flux_adapters._drivers import refuse_headers, unsendable
from flux_adapters._flows import adapter_built, as_request, first_request
from flux_adapters.request import DataUrlImage, EditRequest, FileImage
from flux_adapters.wire import HttpRequest, ImageValue, JsonBody, MultipartBody

if TYPE_CHECKING:
    from flux_adapters.limits import Plan
    from flux_adapters.providers import AnyAdapter, KeyAuth

__all__ = ["as_data", "render", "sendable"]


def sendable(adapter: AnyAdapter, request: EditRequest, plan: Plan, base_url: str) -> HttpRequest:
    """The request *adapter* sends first, as a client would send it.

    Raises:
        RequestError: What a client would raise before sending it: the adapter failed to build
            it, or built something other than a request, headers that are not (name, value)
            pairs of sendable text, a URL httpx cannot send (a line break in it) or a JSON body
            that is not JSON.
    """
    built = adapter_built(adapter, request, first_request, adapter, request, plan, base_url)
    outgoing = as_request(built, adapter, request)
    try:
        headers = dict(outgoing.headers)
    except (TypeError, ValueError) as exc:
        raise unsendable(adapter.name, str, exc, "flux-adapters") from None
    refuse_headers(headers.items(), adapter.name, str, "flux-adapters")
    try:  # as the client's httpx_request finds them: rendered, they would look sendable
        httpx.URL(outgoing.url)
        if isinstance(outgoing.body, JsonBody):
            json_segments(outgoing.body)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise unsendable(adapter.name, str, exc, "flux-adapters") from None
    return outgoing


def _size(byte_count: int) -> str:
    return (
        f"{byte_count / 1024:.1f} KB"
        if byte_count < 1024 * 1024
        else f"{byte_count / 1024 / 1024:.1f} MB"
    )


def _image(value: ImageValue) -> str:
    image = value.image
    info = image.info
    source = f" from {image.path.name}" if isinstance(image, FileImage) else ""
    dimensions = f"{info.width}x{info.height} " if info.width else ""
    if value.bare:
        head = "<plain base64>"
    elif isinstance(image, DataUrlImage):
        head = image.data_url[: image.payload_offset + 12]
    else:
        head = f"data:{info.media_type};base64,"
    return f"{head}… <{dimensions}{info.format}, {_size(info.byte_size)}{source}>"


def render(request: HttpRequest, auth: KeyAuth) -> str:
    """The request line, headers and body; the key, sent as *auth* says, redacted.

    Images are abbreviated to their start, kind and size.
    """
    if auth.header is None:
        joiner = "&" if "?" in request.url else "?"
        lines = [f"{request.method} {request.url}{joiner}{auth.describe()[1:]}"]
    else:
        lines = [f"{request.method} {request.url}", auth.describe()]
    lines += [f"{name}: {value}" for name, value in request.headers]
    body = request.body
    if isinstance(body, JsonBody):
        lines += [
            "Content-Type: application/json",
            f"Content-Length: {segments_length(json_segments(body))}",
            "",
            json.dumps(body.map_values(_image), indent=2, ensure_ascii=False),
        ]
    elif isinstance(body, MultipartBody):
        lines += ["Content-Type: multipart/form-data; boundary=<random>", ""]
        lines += [f"--<boundary>  {name}={value}" for name, value in body.fields]
        lines += [
            f'--<boundary>  {part.name}  (file "{part.filename}", {part.image.info.media_type}, '
            f"{_size(part.image.info.byte_size)})"
            for part in body.files
        ]
    return "\n".join(lines)


def as_data(request: HttpRequest, auth: KeyAuth) -> dict[str, object]:
    """The same as `render`, as JSON data: method, URL, headers, and the body.

    A JSON body is the object sent, images abbreviated as in `render`; a multipart body is
    ``{"fields": [[name, value], ...], "files": [{"name", "filename", "media_type", "bytes"}]}``.
    """
    url = request.url
    headers = [[name, value] for name, value in request.headers]
    redacted = auth.describe()
    if auth.header is None:
        url += ("&" if "?" in url else "?") + redacted[1:]
    else:
        name, _, value = redacted.partition(": ")
        headers.insert(0, [name, value])
    body: object = None
    if isinstance(request.body, JsonBody):
        headers.append(["Content-Type", "application/json"])
        body = request.body.map_values(_image)
    elif isinstance(request.body, MultipartBody):
        headers.append(["Content-Type", "multipart/form-data; boundary=<random>"])
        body = {
            "fields": [[name, value] for name, value in request.body.fields],
            "files": [
                {
                    "name": part.name,
                    "filename": part.filename,
                    "media_type": part.image.info.media_type,
                    "bytes": part.image.info.byte_size,
                }
                for part in request.body.files
            ],
        }
    return {"method": request.method, "url": url, "headers": headers, "body": body}
