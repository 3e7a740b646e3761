import json
import subprocess
import sys
from pathlib import Path

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


# What `from flux_adapters import EditRequest, FluxClient` (every example's first line) and
# building a request and a one-provider client must not load: what only sending, a result,
# several providers, prices, a configuration file, a batch, the emulator, the conformance suite
# or the command line needs (issue 13); nor, for the import alone, attrs (made attrs classes on
# first use, EditRequest and Violation need it only then: tests/test_value_classes.py). A name
# stands for the module and its submodules.
_NOT_FOR_THE_NAMED_IMPORT = (
    "asyncio",
    "attr",  # attrs' own package: EditRequest and Violation become attrs classes on first use
    "attrs",
    "cattrs",
    "rich",
    "tomllib",
    "difflib",
    "imagesize",
    "flux_adapters.routing",
    "flux_adapters.config",
    "flux_adapters.prices",
    "flux_adapters.jobs",
    "flux_adapters.result",
    "flux_adapters.limits",
    "flux_adapters.wire",
    "flux_adapters.providers",
    "flux_adapters._flows",
    "flux_adapters._bodies",
    "flux_adapters._download",
    "flux_adapters._transport",
    "flux_adapters._batch",
    "flux_adapters._journal",
    "flux_adapters.emulator",
    "flux_adapters.conformance",
    "flux_adapters.cli",
)
_NOT_FOR_BUILDING = (
    "asyncio",
    "cattrs",
    "rich",
    "tomllib",
    "difflib",
    "flux_adapters.routing",
    "flux_adapters.config",
    "flux_adapters.prices",
    "flux_adapters.jobs",
    "flux_adapters._flows",
    "flux_adapters._bodies",
    "flux_adapters._download",
    "flux_adapters._batch",
    "flux_adapters._journal",
    "flux_adapters.emulator",
    "flux_adapters.conformance",
    "flux_adapters.cli",
)

# Run first in each child: with click installed (as in the dev environment), `import httpx`
# loads click, rich and pygments for its own command line, which would hide a rich of ours. As
# where click is missing (a plain `pip install flux-adapters`), httpx then skips them.
_AS_WITHOUT_HTTPX_CLI = "import sys; sys.modules['click'] = None; import httpx; "


def _added(code: str) -> dict[str, list[str]]:
    """Each stage's new modules, after httpx: *code* prints ``json.dumps`` of what it finds."""
    finished = subprocess.run(
        [sys.executable, "-c", _AS_WITHOUT_HTTPX_CLI + code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    stages: dict[str, list[str]] = json.loads(finished.stdout)
    return stages


def _among(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_the_named_import_and_building_a_request_and_client_load_nothing_they_do_not_use() -> None:
    stages = _added(
        "import json; before = set(sys.modules); "
        "from flux_adapters import EditRequest, FluxClient; "
        "imported = sorted(set(sys.modules) - before); "
        "EditRequest(prompt='x', model='flux-2-pro'); FluxClient('laozhang', api_key='test-key'); "
        "built = sorted(set(sys.modules) - before); "
        "print(json.dumps({'imported': imported, 'built': built}))"
    )
    assert "flux_adapters.client" in stages["imported"]  # the child measured what it should
    assert "flux_adapters._log" in stages["imported"]  # FLUX_LOG applies on importing the client
    assert _among(stages["imported"], _NOT_FOR_THE_NAMED_IMPORT) == []
    assert "flux_adapters.providers.laozhang" in stages["built"]
    assert _among(stages["built"], _NOT_FOR_BUILDING) == []


def test_a_sync_edit_and_its_download_never_load_asyncio(tmp_path: Path) -> None:
    image = Path(__file__).parent.parent / "examples" / "assets" / "greenhouse.png"
    stages = _added(
        "import json, pathlib; from flux_adapters import EditRequest, FluxClient\n"
        f"png = pathlib.Path({str(image)!r}).read_bytes()\n"
        "def answer(request):  # the provider, then the image's host\n"
        "    if request.url.host == 'cdn.example.com':\n"
        "        return httpx.Response(200, content=png, headers={'content-type': 'image/png'})\n"
        "    return httpx.Response(200, json={'data': [{'url': 'https://cdn.example.com/1'}]})\n"
        "http = httpx.Client(transport=httpx.MockTransport(answer))\n"
        "with FluxClient('laozhang', api_key='test-key', http_client=http) as client:\n"
        "    result = client.edit(EditRequest(prompt='x', model='flux-2-pro'))\n"
        f"    saved = result.images[0].save({str(tmp_path / 'out.png')!r})\n"
        "print(json.dumps({'saved': [str(saved)], 'asyncio': sorted(m for m in sys.modules "
        "if m == 'asyncio' or m.startswith('asyncio.'))}))"
    )
    assert stages["saved"] == [str(tmp_path / "out.png")]
    assert (tmp_path / "out.png").read_bytes() == image.read_bytes()
    assert stages["asyncio"] == []
