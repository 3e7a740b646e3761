import subprocess
import sys

import flux_adapters
from flux_adapters import errors
from flux_adapters.providers import BUILT_IN


def test_every_exported_name_resolves() -> None:
    for name in flux_adapters.__all__:
        assert getattr(flux_adapters, name) is not None, name
    assert sorted(dir(flux_adapters)) == sorted(flux_adapters.__all__)


def test_the_contract_names_exist() -> None:
    built_in = {"laozhang", "apiyi", "apiyi-multipart", "aimlapi", "bfl", "fal"}
    assert set(BUILT_IN) == built_in
    assert built_in <= flux_adapters.PROVIDERS.keys()  # and any installed provider package
    assert issubclass(errors.RequestError, errors.FluxError)
    assert issubclass(errors.RequestError, ValueError)
    assert issubclass(errors.ProviderError, errors.FluxError)
    assert issubclass(errors.AllProvidersFailed, errors.FluxError)


def test_every_error_is_listed_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        if name != "Violation":
            assert name in doc, name


def test_importing_the_package_loads_nothing_heavy() -> None:
    code = "import sys, flux_adapters; print(sorted(m for m in ('httpx', 'attrs', 'cattrs', 'imagesize') if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"


def test_building_and_checking_requests_never_imports_httpx() -> None:
    code = (
        "import sys; from flux_adapters import EditRequest, check; "
        "print(check(EditRequest(prompt='x', model='flux-2-pro', seed=0), 'aimlapi')[0].field, "
        "'httpx' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["seed", "False"]


def test_the_names_for_images_in_hand_and_their_errors_are_public_and_lazy() -> None:
    assert {"ImageLike", "EditResult", "ResultImage"} <= set(flux_adapters.__all__)
    assert {"ClientClosedError", "ExtensionMismatch"} <= set(errors.__all__)
    assert issubclass(errors.ClientClosedError, errors.ConfigurationError)
    assert issubclass(errors.ExtensionMismatch, errors.OutputError)
    code = (
        "import sys, flux_adapters; loaded = 'flux_adapters.request' in sys.modules; "
        "flux_adapters.ImageLike; print(loaded, 'flux_adapters.request' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "True"]
