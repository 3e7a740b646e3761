"""Render an `HttpRequest` as the provider would receive it, for ``flux-adapters explain``.

The key is shown as ``[redacted]``; images are abbreviated to their start, kind and size, so the
output stays readable and never holds a whole image.
"""

from __future__ import annotations

import json

from flux_adapters._bodies import json_segments, segments_length
from flux_adapters.request import DataUrlImage, FileImage, LocalImage
from flux_adapters.wire import HttpRequest, JsonBody, MultipartBody

__all__ = ["render"]


def _size(byte_count: int) -> str:
    return (
        f"{byte_count / 1024:.1f} KB"
        if byte_count < 1024 * 1024
        else f"{byte_count / 1024 / 1024:.1f} MB"
    )


def _image(image: LocalImage) -> str:
    info = image.info
    source = f" from {image.path.name}" if isinstance(image, FileImage) else ""
    dimensions = f"{info.width}x{info.height} " if info.width else ""
    if isinstance(image, DataUrlImage):
        head = image.data_url[: image.payload_offset + 12]
    else:
        head = f"data:{info.media_type};base64,"
    return f"{head}… <{dimensions}{info.format}, {_size(info.byte_size)}{source}>"


def render(request: HttpRequest) -> str:
    """The request line, headers and body, with the key redacted and images abbreviated."""
    lines = [f"{request.method} {request.url}", "Authorization: Bearer [redacted]"]
    lines += [f"{name}: {value}" for name, value in request.headers]
    body = request.body
    if isinstance(body, JsonBody):
        lines += [
            "Content-Type: application/json",
            f"Content-Length: {segments_length(json_segments(body))}",
            "",
            json.dumps(body.map_images(_image), indent=2, ensure_ascii=False),
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
