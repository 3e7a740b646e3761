"""`EditRequest`, the image inputs and `Violation` are frozen attrs classes from their first use on.

Importing them does not import attrs (`flux_adapters._lazy_attrs` makes each an attrs class when
it is first used), so each test here runs in a fresh interpreter, where the use under test is the
class's first: whatever a caller does first (build one, unpickle one, ask attrs or cattrs about
the class, subclass it, look at its signature) sees the attrs class it was written as.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

from flux_adapters import EditRequest
from flux_adapters.errors import RequestError, Violation
from flux_adapters.request import FileImage, UrlImage

PNG = Path(__file__).parent.parent / "examples" / "assets" / "greenhouse.png"


def _fresh(code: str) -> str:
    """Run *code* in a fresh interpreter (attrs not imported yet); its stdout."""
    prelude = (
        "import sys\nfrom flux_adapters import EditRequest\n"
        "from flux_adapters.errors import RequestError, Violation\n"
        "from flux_adapters.request import ImageInfo, UrlImage, FileImage\n"
        "assert 'attrs' not in sys.modules and 'attr' not in sys.modules, 'imported attrs'\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    return finished.stdout


def test_attrs_and_cattrs_see_the_fields_before_any_instance_is_built() -> None:
    out = _fresh(
        """
        import attrs, cattrs
        print(attrs.has(EditRequest), attrs.has(Violation), attrs.has(UrlImage))
        print([f.name for f in attrs.fields(Violation)])
        print(attrs.fields(EditRequest).images.default, attrs.fields(EditRequest).prompt.kw_only)
        made = cattrs.Converter().structure(
            {"field": "seed", "message": "m", "limit": "l", "value": "v"}, Violation
        )
        print(repr(made))
        print(cattrs.Converter().unstructure(made)["source"])
        """
    )
    assert out.splitlines() == [
        "True True True",
        "['field', 'message', 'limit', 'value', 'source']",
        "() True",
        "Violation(field='seed', message='m', limit='l', value='v', source=None)",
        "None",
    ]


def test_the_first_request_built_is_a_frozen_attrs_value() -> None:
    out = _fresh(
        """
        import attrs, pickle
        request = EditRequest(prompt="x", model="flux-2-pro", images=["https://e.com/a.png"])
        print(repr(request))
        print(request == EditRequest(prompt="x", model="flux-2-pro", images="https://e.com/a.png"))
        print(hash(request) == hash(pickle.loads(pickle.dumps(request))))
        try:
            request.seed = 1
        except attrs.exceptions.FrozenInstanceError:
            print("frozen")
        print(attrs.evolve(request, seed=3).seed, request.seed)
        try:
            attrs.evolve(request, seed=-1)  # evolve builds again: the rules still hold
        except RequestError as error:
            print(error.violations[0].field)
        print(attrs.asdict(request)["images"])
        """
    )
    assert out.splitlines() == [
        "EditRequest(prompt='x', model='flux-2-pro', images=(UrlImage(url='https://e.com/a.png'),),"
        " width=None, height=None, size=None, aspect_ratio=None, seed=None, output_format=None,"
        " safety_tolerance=None, prompt_upsampling=None, steps=None, guidance=None,"
        " allow_conversions=False)",
        "True",
        "True",
        "frozen",
        "3 None",
        "seed",
        "({'url': 'https://e.com/a.png'},)",
    ]


def test_values_pickled_elsewhere_unpickle_as_the_first_use(tmp_path: Path) -> None:
    request = EditRequest(prompt="x", model="flux-2-pro", images=[PNG], seed=7)
    image = request.images[0]
    assert isinstance(image, FileImage)
    error = RequestError([Violation("seed", "is too large", "at most 9", "10")], provider="apiyi")
    (tmp_path / "values.pickle").write_bytes(pickle.dumps((request, error, image)))
    out = _fresh(
        f"""
        import pickle
        request, error, image = pickle.loads(open({str(tmp_path / "values.pickle")!r}, "rb").read())
        print(repr(error.violations[0]))
        print(request.seed, request.images[0] is image, image.info.format, error.provider)
        print(str(error).splitlines()[-1])
        print(image == FileImage(path=image.path, info=image.info), repr(image.info))
        print(request == EditRequest(prompt="x", model="flux-2-pro", images=[image.path], seed=7))
        """
    )
    lines = out.splitlines()
    assert (
        lines[0]
        == "Violation(field='seed', message='is too large', limit='at most 9', value='10', source=None)"
    )
    assert lines[1] == "7 True png apiyi"
    assert lines[2] == str(error).splitlines()[-1]
    assert lines[3] == f"True {image.info!r}"
    assert lines[4] == "True"


def test_signature_subclasses_and_threads_see_the_attrs_class() -> None:
    out = _fresh(
        """
        import inspect, threading, attrs
        print(inspect.signature(Violation))
        print(Violation.__match_args__)

        @attrs.frozen
        class Graded(Violation):
            grade: int = 0

        print(repr(Graded("f", "m", "l", "v", grade=2)))
        made, start = [], threading.Barrier(8)

        def build():
            start.wait()
            made.append(UrlImage("https://e.com/a.png"))

        threads = [threading.Thread(target=build) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(len(made), len(set(made)))
        """
    )
    assert out.splitlines() == [
        "(field: 'str', message: 'str', limit: 'str', value: 'str', source: 'str | None' = None)"
        " -> None",
        "('field', 'message', 'limit', 'value', 'source')",
        "Graded(field='f', message='m', limit='l', value='v', source=None, grade=2)",
        "8 1",
    ]


@pytest.mark.parametrize(
    "value",
    [
        EditRequest(prompt="x", model="flux-2-pro"),
        Violation("a", "b", "c", "d", "e"),
        UrlImage("https://e.com/a.png"),
    ],
    ids=type,
)
def test_instances_are_immutable(value: object) -> None:
    kind = type(value)
    assert attrs.has(kind)
    for name in ("prompt", "field", "url", "anything"):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(value, name, "changed")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        delattr(value, attrs.fields(kind)[0].name)
