"""The optional extras: which module each one brings, and the error when one is missing.

``pyproject.toml`` lists each extra's packages; `PROVIDED_BY` says which importable module each
package provides, so that a failed import can name the extra to install. Every import that a
feature cannot do without (the emulator, the conformance suite) is written inside
`extra_imports`, which turns a missing module into `errors.MissingExtraError`::

    with extra_imports():
        from flux_adapters.emulator._server import build_server

The speed-ups of the ``fast`` extra (pybase64, aiohttp), the gateway's event loop and request
parser (uvloop, httptools, in the ``gateway`` extra) and the live display of the ``cli`` extra
(rich) are not needed by anything: their imports fall back silently when missing.

Nothing here is imported by ``import flux_adapters``; the error class is imported only when an
import has already failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from flux_adapters.errors import MissingExtraError

__all__ = ["FEATURES", "PROVIDED_BY", "SHARED", "extra_imports", "missing_extra"]

PROVIDED_BY: Final = {
    "starlette": ("starlette", "emulator"),
    "uvicorn": ("uvicorn", "emulator"),
    "PIL": ("pillow", "emulator"),
    "python_multipart": ("python-multipart", "emulator"),
    "anyio": ("anyio", "emulator"),
    "h11": ("h11", "emulator"),
    "pytest": ("pytest", "conformance"),
    "vcr": ("vcrpy", "conformance"),
    "yaml": ("PyYAML", "conformance"),
    "rich": ("rich", "cli"),
    "pybase64": ("pybase64", "fast"),
    "aiohttp": ("aiohttp", "fast"),
    "prometheus_client": ("prometheus-client", "gateway"),
    "uvloop": ("uvloop", "gateway"),
    "httptools": ("httptools", "gateway"),
    "redis": ("redis", "redis"),
    "fsspec": ("fsspec", "fsspec"),
}
"""Top-level module -> (the package on the index that provides it, the extra that installs it).

A module that several extras install is listed under the first; `SHARED` names the others.
tests/test_packaging.py checks that each extra in pyproject.toml lists exactly these packages."""

SHARED: Final = {"gateway": ("starlette", "uvicorn", "python_multipart")}
"""Extra -> modules of `PROVIDED_BY` that it installs too (the gateway serves with the emulator's
server stack, without Pillow)."""

FEATURES: Final = {
    "emulator": "the emulator",
    "conformance": "the conformance suite",
    "cli": "the live progress display",
    "fast": "the speed-ups",
    "gateway": "the gateway",
    "redis": "shared state in Redis (FLUX_STATE_URL)",
    "fsspec": "batch outputs at an fsspec URL",
}
"""What each extra is for, as the subject of the error message."""


def missing_extra(error: ModuleNotFoundError, extra: str | None = None) -> MissingExtraError | None:
    """The `MissingExtraError` that *error* stands for; ``None`` when it is no extra's module.

    Only a top-level module of `PROVIDED_BY` counts: ``No module named 'PIL.WebPImagePlugin'``
    says that Pillow is installed (without WebP), not that the extra is missing. Python names
    the top-level module when that is what is missing, even for ``from starlette.routing import``.
    *extra* names the extra to install when that one provides the module too (`SHARED`).
    """
    from flux_adapters.errors import MissingExtraError

    if isinstance(error, MissingExtraError):
        return error
    module = error.name or ""
    if module not in PROVIDED_BY:
        return None
    distribution, first = PROVIDED_BY[module]
    if extra is None or (extra != first and module not in SHARED.get(extra, ())):
        extra = first
    named = "" if module == distribution else f" (module {module})"
    return MissingExtraError(
        f"{FEATURES[extra]} needs {distribution}{named}, which is not installed; "
        f"install it with: pip install 'flux-adapters[{extra}]'",
        name=module,
        distribution=distribution,
        extra=extra,
    )


@contextmanager
def extra_imports(extra: str | None = None) -> Iterator[None]:
    """Raise `MissingExtraError` (with the install hint) for an extra's module missing in the block.

    *extra* is the extra the block's feature needs, for a module several extras install.

    Any other ``ModuleNotFoundError`` (a broken installation) passes through unchanged, and so
    does a `MissingExtraError` raised by an inner block.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc, extra)
        if missing is None or missing is exc:
            raise
        raise missing from exc
