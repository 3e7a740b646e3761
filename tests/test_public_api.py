import flux_adapters
from flux_adapters import errors


def test_all_names_are_exported_and_nothing_else() -> None:
    public = sorted(
        name for name in vars(flux_adapters) if not name.startswith("_") or name == "__version__"
    )
    # Submodules imported as a side effect are not part of the curated surface.
    modules = {"client", "limits", "providers", "request", "result", "wire"}
    assert sorted(flux_adapters.__all__) == sorted(set(public) - modules)


def test_the_contract_names_exist() -> None:
    assert flux_adapters.PROVIDERS.keys() == {"laozhang", "apiyi", "apiyi-multipart", "aimlapi"}
    assert issubclass(errors.RequestError, errors.FluxError)
    assert issubclass(errors.RequestError, ValueError)
    assert issubclass(errors.ProviderError, errors.FluxError)
    assert issubclass(errors.AllProvidersFailed, errors.FluxError)


def test_every_error_is_listed_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        if name != "Violation":
            assert name in doc, name
