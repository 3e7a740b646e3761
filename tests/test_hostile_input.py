"""Any value for any EditRequest field, and for check(), is either accepted or a typed error.

The promise: bad input gets a `RequestError` (or, for a provider id, a `ConfigurationError`)
before anything is sent; an exception outside the `FluxError` tree is a bug. The properties
below throw "anything" at every field (huge ints, NaN, lone surrogates, bytes, nested
containers, generators that raise, objects whose dunders raise, paths to FIFOs and devices)
and run 10,000+ examples in every profile. The hand-written tests pin each raw exception the
properties found (TypeError, ValueError, OverflowError, UnicodeEncodeError, RecursionError,
binascii.Error) and the file cases that used to hang.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import io
import itertools
import json
import math
import os
import pickle
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_adapters import MODELS, PROVIDERS, EditRequest, ProviderName, check, get_adapter
from flux_adapters._bodies import StreamedJson, data_url, json_segments
from flux_adapters._flows import first_request, resolve
from flux_adapters.errors import ConfigurationError, FluxError, RequestError, Violation
from flux_adapters.limits import RatioRule, SizeRule, _size_for_ratio
from flux_adapters.request import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SAFETY_TOLERANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_URL_LENGTH,
    BytesImage,
    DataUrlImage,
    FileImage,
    ImageInfo,
    UrlImage,
)
from flux_adapters.wire import JsonBody, MultipartBody
from tests.conftest import image_bytes

PNG = image_bytes(8, 8)
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
URL = "https://example.com/ref.png"
FIELDS = (
    "prompt",
    "model",
    "images",
    "width",
    "height",
    "size",
    "aspect_ratio",
    "seed",
    "output_format",
    "safety_tolerance",
    "prompt_upsampling",
    "steps",
    "guidance",
    "allow_conversions",
)
VALID: dict[str, object] = {"prompt": "a red robot", "model": "flux-2-pro"}

# The promise is about rare inputs: 10,000 examples in all, in every profile (dev and ci).
HOSTILE = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
TIMEOUT = 5.0


# --- Places on disk: filled in once per module by the `places` fixture ----------------------

PLACES: dict[str, Path] = {}
PLACE_NAMES = (
    "image",
    "text",
    "empty",
    "missing",
    "directory",
    "fifo",
    "socket",
    "dev_null",
    "dev_zero",
    "symlink_loop",
    "dangling",
    "link_to_fifo",
    "not_a_directory",
    "long_name",
    "nul",
    "surrogate",
    "escaped_bytes",
)


@pytest.fixture(autouse=True, scope="module")
def places() -> Iterator[dict[str, Path]]:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "image.png").write_bytes(PNG)
        (root / "text.png").write_text("not an image")
        (root / "empty.png").write_bytes(b"")
        os.mkfifo(root / "fifo")
        os.symlink(root / "loop-b", root / "loop-a")
        os.symlink(root / "loop-a", root / "loop-b")
        os.symlink(root / "nowhere", root / "dangling")
        os.symlink(root / "fifo", root / "link-to-fifo")
        server = socket.socket(socket.AF_UNIX)
        socket_path = root / "sock"
        try:
            server.bind(str(socket_path))
        except OSError:  # the temporary folder's path is too long for AF_UNIX
            socket_path = Path("/dev/null")
        PLACES.update(
            image=root / "image.png",
            text=root / "text.png",
            empty=root / "empty.png",
            missing=root / "missing.png",
            directory=root,
            fifo=root / "fifo",
            socket=socket_path,
            dev_null=Path("/dev/null"),
            dev_zero=Path("/dev/zero"),
            symlink_loop=root / "loop-a",
            dangling=root / "dangling",
            link_to_fifo=root / "link-to-fifo",
            not_a_directory=root / "image.png" / "child.png",
            long_name=root / ("n" * 300 + ".png"),
            nul=root / "a\0b.png",
            surrogate=root / "\ud800.png",
            escaped_bytes=root / os.fsdecode(b"\xff\xfe.png"),
        )
        try:
            yield PLACES
        finally:
            server.close()
            PLACES.clear()


# --- Hostile objects --------------------------------------------------------------------------
#
# Most of "anything" is drawn from a corpus of factories (one draw picks one): Hypothesis costs
# about 0.4 ms per example here, and every extra draw adds to it; 10,000 examples must stay fast.

DUNDERS = (
    "__eq__",
    "__ne__",
    "__hash__",
    "__str__",
    "__repr__",
    "__format__",
    "__iter__",
    "__next__",
    "__len__",
    "__length_hint__",
    "__fspath__",
    "__bool__",
    "__index__",
    "__int__",
    "__float__",
    "__bytes__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__getitem__",
    "__contains__",
    "__mul__",
    "__truediv__",
    "__mod__",
    "__floordiv__",
    "__getattr__",
    "__getattribute__",
    "strip",
    "split",
    "lower",
    "startswith",
    "isascii",
    "encode",
    "decode",
    "bit_length",
)
EXCEPTIONS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    OverflowError,
    RecursionError,
    UnicodeError,
    StopIteration,
    binascii.Error,
)
# What a dunder may return instead of raising: wrong types, a huge int, a lone surrogate.
WRONG_RETURNS: tuple[Callable[[], object], ...] = (
    lambda: None,
    lambda: 5,
    lambda: b"bytes",
    lambda: "\ud800",
    lambda: 10**5000,
    lambda: -1,
    lambda: math.nan,
)
# A base and a value of it that would otherwise be valid somewhere.
BASES: tuple[tuple[type, object], ...] = (
    (object, None),
    (str, "flux-2-pro"),
    (str, "1024x768"),
    (str, "16:9"),
    (str, "png"),
    (str, URL),
    (str, PNG_DATA_URL),
    (str, "laozhang"),
    (int, 1024),
    (int, 5),
    (float, 3.5),
    (bytes, PNG),
    (list, [URL]),
    (tuple, (URL,)),
    (type(Path()), "image"),
)


def _raiser(error: type[Exception]) -> Callable[..., object]:
    def method(self: object, *args: object, **kwargs: object) -> object:
        raise error("hostile")

    return method


def _returner(make: Callable[[], object]) -> Callable[..., object]:
    def method(self: object, *args: object, **kwargs: object) -> object:
        return make()

    return method


@functools.cache
def hostile_class(
    base: int, dunders: tuple[str, ...], behaviour: int, class_property: bool
) -> type:
    """A subclass of ``BASES[base]`` whose *dunders* raise an exception or return a wrong value."""
    kind, _ = BASES[base]
    if behaviour < len(EXCEPTIONS):
        method = _raiser(EXCEPTIONS[behaviour])
    else:
        method = _returner(WRONG_RETURNS[behaviour - len(EXCEPTIONS)])
    namespace: dict[str, object] = dict.fromkeys(dunders, method)
    if class_property:
        namespace["__class__"] = property(_raiser(RuntimeError))
    return type(f"Hostile{kind.__name__.title()}", (kind,), namespace)


def hostile(base: int, dunders: tuple[str, ...], behaviour: int, class_property: bool) -> object:
    cls = hostile_class(base, dunders, behaviour, class_property)
    kind, value = BASES[base]
    try:
        return cls() if kind is object else cls(str(PLACES["image"]) if value == "image" else value)
    except Exception:  # the base's constructor ran an overridden method: use a plain object
        return hostile(0, dunders, behaviour, class_property)


BEHAVIOURS = len(EXCEPTIONS) + len(WRONG_RETURNS)
HOSTILE_RECIPES = [
    # Each dunder alone, raising or returning something wrong (behaviour rotates with the dunder).
    *(
        (base, (dunder,), behaviour, False)
        for base in range(len(BASES))
        for index, dunder in enumerate(DUNDERS)
        for behaviour in {0, (index + base) % BEHAVIOURS}
    ),
    # Every dunder at once, each behaviour; and a __class__ that raises.
    *(
        (base, DUNDERS, behaviour, False)
        for base in range(len(BASES))
        for behaviour in range(BEHAVIOURS)
    ),
    *((base, ("__eq__", "__hash__", "__repr__"), 0, True) for base in range(len(BASES))),
]


class HostileMeta(type):
    """A metaclass whose classes refuse every attribute lookup (``__name__``, ``__mro__``...)."""

    def __getattribute__(cls, name: str) -> object:
        raise RuntimeError(f"no {name}")


# Each with a value valid for some field, had the class behaved.
META_VALUES: tuple[tuple[type, object], ...] = tuple(
    (HostileMeta(f"Meta{base.__name__.title()}", (base,), {}), value)
    for base, value in (
        (object, None),
        (str, "flux-2-pro"),
        (str, URL),
        (int, 1024),
        (float, 2.5),
        (bytes, PNG),
        (list, [URL]),
    )
)


def meta_instance(index: int) -> object:
    cls, value = META_VALUES[index]
    return cls() if value is None else cls(value)


class PathLikeReturning:
    """A path-like whose ``__fspath__`` returns whatever it was given."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __fspath__(self) -> object:
        return self.value


def generator(items: list[object], error: type[Exception] | None) -> Iterator[object]:
    yield from items
    if error is not None:
        raise error("raised by a generator")


def released_memoryview(data: bytes) -> memoryview:
    view = memoryview(data)
    view.release()
    return view


def deep_list(depth: int) -> list[object]:
    nested: list[object] = []
    for _ in range(depth):
        nested = [nested]
    return nested


DEEP = deep_list(100_000)  # repr() of it raises RecursionError; built once, never changed


def with_surrogate(value: str, at: int, surrogate: str) -> str:
    at = at % (len(value) + 1)
    return value[:at] + surrogate + value[at:]


def encoded(path: Path) -> bytes:
    return str(path).encode("utf-8", "surrogatepass")  # even the path no encoder takes


def place(name: str) -> Path:
    return PLACES[name]


def _place_forms(name: str) -> list[Callable[[], object]]:
    return [
        functools.partial(place, name),
        lambda: str(place(name)),
        lambda: encoded(place(name)),
        lambda: PathLikeReturning(str(place(name))),
        lambda: PathLikeReturning(encoded(place(name))),
    ]


VALID_TEXTS = ("flux-2-pro", "1024x768", "16:9", "png", URL, PNG_DATA_URL, "a prompt", "aimlapi")
CORPUS: list[Callable[[], object]] = [
    *(functools.partial(hostile, *recipe) for recipe in HOSTILE_RECIPES),
    *(functools.partial(PathLikeReturning, make()) for make in WRONG_RETURNS[:-3]),
    lambda: PathLikeReturning(10**5000),
    *(form for name in PLACE_NAMES for form in _place_forms(name)),
    *(
        functools.partial(with_surrogate, text, at, surrogate)
        for text in VALID_TEXTS
        for at in (0, 3, 10_000)
        for surrogate in ("\ud800", "\udcff", "\udfff")
    ),
    *(functools.partial(meta_instance, index) for index in range(len(META_VALUES))),
    *(functools.partial(generator, [URL, PNG], error) for error in (None, *EXCEPTIONS)),
    lambda: generator([URL, hostile(1, DUNDERS, 0, False)], None),
    lambda: (place("fifo") for _ in range(3)),
    itertools.count,
    lambda: itertools.repeat(PNG),
    lambda: itertools.repeat(place("fifo")),
    lambda: 10**5000,
    lambda: -(10**5000),
    lambda: 10**4300,
    lambda: 2**63,
    lambda: 2**64,
    lambda: -(2**63) - 1,
    lambda: DEEP,
    lambda: [DEEP],
    lambda: {"a": DEEP},
    lambda: released_memoryview(PNG),
    lambda: memoryview(PNG)[::2],
    lambda: memoryview(PNG[:8]).cast("I"),
    lambda: bytearray(PNG),
    lambda: memoryview(PNG),
    lambda: b"",
    lambda: Decimal("NaN"),
    lambda: Decimal("1e5000"),
    lambda: Decimal("1024"),
    lambda: Fraction(1, 3),
    lambda: Fraction(1024),
    lambda: complex(1, 2),
    lambda: math.inf,
    lambda: -math.inf,
    lambda: math.nan,
    lambda: -0.0,
    lambda: 1e308,
    lambda: 5e-324,
    lambda: 1024.0,
    lambda: Ellipsis,
    lambda: NotImplemented,
    object,
    lambda: type,
    lambda: print,
    lambda: sys,
    lambda: type("Fresh", (), {})(),
    lambda: {URL},
    lambda: frozenset({URL}),
    lambda: {URL: URL},
    lambda: {}.keys(),
    lambda: range(3),
    lambda: "x" * 100_000,
    lambda: "\udcff" * 10_000,
    lambda: UrlImage(10**5000),  # type: ignore[arg-type]
    lambda: UrlImage("javascript:x"),
    lambda: UrlImage("https://exa\ud800mple.com/"),
    lambda: DataUrlImage("data:image/png;base64,@@@@", ImageInfo("png", 8, 8, 3), 22),
    lambda: DataUrlImage(5, 5, 5),  # type: ignore[arg-type]
    lambda: BytesImage("not bytes", ImageInfo("png", 8, 8, -1)),  # type: ignore[arg-type]
    lambda: BytesImage(PNG, ImageInfo("png", 10**5000, 8, -1)),
    lambda: FileImage.__new__(FileImage),  # no fields set: reading one raises
    lambda: FileImage(place("fifo"), ImageInfo("png", 8, 8, 1)),
    lambda: FileImage(hostile(14, ("__fspath__",), 0, False), ImageInfo("png", 8, 8, 1)),  # type: ignore[arg-type]
    lambda: FileImage("image.png", ImageInfo("png", 8, 8, 1)),  # type: ignore[arg-type]
]


class Make:
    """A recipe for a value, built by the test itself (`build`).

    Hypothesis inspects what a strategy returns (``isinstance``, which reads ``__class__``), so
    an object whose ``__getattribute__`` or ``__class__`` raises must not be returned to it.
    """

    def __init__(self, factory: Callable[[], object]) -> None:
        self.factory = factory

    def __repr__(self) -> str:
        return f"Make({self.factory!r})"


def build(value: object) -> object:
    """*value* with every `Make` recipe in it (in lists, tuples and dicts) built."""
    kind = type(value)
    if kind is Make:
        return value.factory()  # type: ignore[attr-defined]
    if kind is list:
        return [build(item) for item in value]  # type: ignore[attr-defined]
    if kind is tuple:
        return tuple(build(item) for item in value)  # type: ignore[attr-defined]
    if kind is dict:
        return {key: build(item) for key, item in value.items()}  # type: ignore[attr-defined]
    return value


def lazily(items: list[object]) -> Iterator[object]:
    for item in items:
        yield build(item)


corpus = st.sampled_from(CORPUS).map(Make)
text = st.text(
    st.sampled_from(
        # Where text handling breaks: controls, Unicode spaces and digits, astral characters and
        # lone surrogates (which st.characters() leaves out by default).
        "ax019:/.-_ \t\n\r\0\x1b\x7f\x85\xa0\u00e9\u2028\u0661\uff10\uff03\ufeff\U0001f916"
        "\ud800\udbff\udc80\udcff\udfff"
    ),
    max_size=6,
)
scalars: st.SearchStrategy[object] = st.one_of(
    corpus, st.integers(), st.floats(), text, st.binary(max_size=12)
)
CONTAINERS: tuple[Callable[[list[object]], object], ...] = (
    list,
    tuple,
    lambda items: Make(functools.partial(lazily, items)),  # a generator
    lambda items: dict(enumerate(items)),
)
containers = st.tuples(st.sampled_from(CONTAINERS), st.lists(scalars, max_size=3)).map(
    lambda shape_and_items: shape_and_items[0](shape_and_items[1])
)
anything = st.one_of(scalars, containers)

# Values near the valid ones for each field: the edges where parsing and bounds live.
IMAGE_EDGES = [
    PNG,
    URL,
    PNG_DATA_URL,
    "HTTPS://EXAMPLE.COM/A.PNG",
    "http://[",
    "http://",
    "https://:80/a.png",
    "https://exa mple.com/a.png",
    "https://example.com/a.png\n",
    "https://example.com:99999/a.png",
    "https://exa\uff03mple.com/a.png",
    "https://example.com/\u00e9.png",
    "https://example.com/\u2028.png",
    "javascript:alert(1)",
    "ftp://example.com/a.png",
    "https://example.com/" + "a" * MAX_URL_LENGTH,
    "data:image/png;base64,@@@@",
    "data:image/png;base64,iVBO\u00e9",
    "data:;base64,",
    "data:image/png;base64,AAA",
    "data:image/\u00e9;base64," + base64.b64encode(PNG).decode(),
    "DATA:image/png;base64," + base64.b64encode(PNG).decode(),
    "robot.png",
    b"GIF89a",
]
image_values = st.one_of(st.sampled_from(IMAGE_EDGES), corpus, anything)
near_valid: dict[str, st.SearchStrategy[object]] = {
    "prompt": st.one_of(text, st.sampled_from(["", "  ", b"a prompt", "x" * 5000])),
    "model": st.sampled_from([*MODELS, "FLUX-2-PRO", "flux-1-dev", "flux-2-pro\ud800"]),
    "images": st.one_of(
        st.lists(image_values, max_size=4),
        st.sampled_from(
            [
                lambda: [URL] * (MAX_IMAGES + 1),
                lambda: iter([PNG] * (MAX_IMAGES + 5)),
                lambda: (image for image in [URL, PNG, PNG_DATA_URL]),
                lambda: tuple(IMAGE_EDGES),
            ]
        ).map(Make),
        image_values,
    ),
    "width": st.integers(-2, MAX_SIDE + 2),
    "height": st.integers(-2, MAX_SIDE + 2),
    "size": st.one_of(
        st.builds("{}x{}".format, st.integers(-1, 10**7), st.integers(-1, 10**7)),
        st.sampled_from(["1" * 5000 + "x1", "١٠٢٤x768", "1024X768", "1024x768\n", "0x0", "x"]),
    ),
    "aspect_ratio": st.one_of(
        st.builds("{}:{}".format, st.integers(-1, 10**7), st.integers(-1, 10**7)),
        st.sampled_from(["1" * 5000 + ":1", "١٦:٩", "16/9", "0:1", ":"]),
    ),
    "seed": st.one_of(st.integers(-2, 2**64), st.sampled_from([MAX_SEED, MAX_SEED + 1, True])),
    "output_format": st.sampled_from(["jpeg", "png", "webp", "PNG", "gif", "png\ud800", b"png"]),
    "safety_tolerance": st.integers(-1, MAX_SAFETY_TOLERANCE + 1),
    "prompt_upsampling": st.sampled_from([None, True, False, 0, 1, "yes"]),
    "steps": st.integers(-1, MAX_STEPS + 1),
    "guidance": st.one_of(
        st.floats(), st.integers(-1, 200), st.sampled_from([MAX_GUIDANCE, MAX_GUIDANCE + 1e-9])
    ),
    "allow_conversions": st.sampled_from([True, False, None, 1, "true"]),
}
field_values = {name: st.one_of(near_valid[name], anything) for name in FIELDS}
# What the other fields hold while one, two or three are hostile: valid, or absent. Drawn in one
# step: each draw costs Hypothesis time, and 10,000 examples must stay fast.
GEOMETRIES: tuple[dict[str, object], ...] = (
    {},
    {"width": 1024, "height": 768},
    {"size": "1024x768"},
    {"aspect_ratio": "16:9"},
)
shapes = st.sampled_from(
    [
        (geometry, names)
        for geometry in GEOMETRIES
        for size in (1, 2, 3)
        for names in itertools.combinations(FIELDS, size)
    ]
)


@st.composite
def request_arguments(draw: st.DrawFn) -> dict[str, object]:
    geometry, names = draw(shapes)
    arguments = {**VALID, **geometry}
    for name in names:
        arguments[name] = draw(field_values[name])
    return arguments


# --- What every error must be -----------------------------------------------------------------


def assert_clear(error: FluxError) -> None:
    """A typed error a user can read, print, log and pickle."""
    message = str(error)
    message.encode("utf-8")  # printable anywhere: no lone surrogates
    assert message
    if isinstance(error, RequestError):
        assert error.violations
        for violation in error.violations:
            for text in (violation.field, violation.message, violation.limit, violation.value):
                assert type(text) is str
                text.encode("utf-8")
            assert len(violation.value) <= 100, violation.value
            assert violation.limit
    pickle.loads(pickle.dumps(error))


def send_everywhere(request: EditRequest) -> None:
    """Check *request* at every provider and, where it fits, build and encode the body."""
    for provider in PROVIDERS:
        found = check(request, ProviderName(provider))
        if found:
            assert_clear(RequestError(found, provider=provider, model=request.model))
            continue
        adapter = get_adapter(provider)
        wire = first_request(adapter, request, resolve(adapter, request), "https://api.example")
        body = wire.body
        if isinstance(body, JsonBody):
            json.loads(b"".join(StreamedJson(json_segments(body))))
        elif isinstance(body, MultipartBody):
            for _, value in body.fields:
                value.encode("utf-8")
            for part in body.files:
                image = part.image
                if isinstance(image, FileImage):
                    with image.open() as stream:
                        assert stream.read()
                else:
                    data_url(image)


# --- Properties: at least 10,000 examples in all --------------------------------------------


@settings(HOSTILE, max_examples=7_000)
@given(arguments=request_arguments())
def test_any_value_in_any_field_builds_or_raises_request_error(
    arguments: dict[str, object],
) -> None:
    arguments = {name: build(value) for name, value in arguments.items()}
    try:
        request = EditRequest(**arguments)  # type: ignore[arg-type]
    except RequestError as error:
        assert_clear(error)
        return
    send_everywhere(request)


@settings(HOSTILE, max_examples=3_000)
@given(
    request=st.one_of(request_arguments(), scalars),
    provider=st.one_of(
        st.sampled_from([*PROVIDERS, "LAOZHANG", "laozang", " aimlapi", "", "x" * 10_000]),
        near_valid["model"],
        scalars,
    ),
)
def test_check_takes_any_request_and_any_provider(request: object, provider: object) -> None:
    request, provider = build(request), build(provider)
    if type(request) is dict and "prompt" in request:
        try:
            request = EditRequest(**request)
        except RequestError as error:
            assert_clear(error)
            return
    try:
        found = check(request, provider)  # type: ignore[arg-type]
    except (RequestError, ConfigurationError) as error:
        assert_clear(error)
        if isinstance(error, RequestError):
            assert type(request) is not EditRequest
        else:
            assert type(provider) is not str or provider not in PROVIDERS
        return
    assert type(request) is EditRequest
    assert all(type(violation) is Violation for violation in found)


# --- Regressions: one per raw exception found, and the files that hung ------------------------


def refused(**arguments: object) -> list[Violation]:
    given_arguments = {**VALID, **arguments}
    with pytest.raises(RequestError) as caught:
        EditRequest(**given_arguments)  # type: ignore[arg-type]
    assert_clear(caught.value)
    return list(caught.value.violations)


def only(**arguments: object) -> Violation:
    [violation] = refused(**arguments)
    return violation


def test_type_error_not_a_list_of_images_is_a_violation() -> None:
    for value, kind in ((5, "int"), (3.5, "float"), (object(), "object")):
        violation = only(images=value)
        assert (violation.field, violation.message) == (
            "images",
            f"must be a list of images, not a {kind}",
        )
    assert only(images=None).message == "must be a list of images, not None; pass [] for none"
    assert "in order, not a set" in only(images={URL}).message
    assert "in order, not a dict" in only(images={URL: URL}).message


def test_type_error_path_like_returning_a_non_path_is_a_violation() -> None:
    violation = only(images=[PathLikeReturning(5)])
    assert violation.field == "images[0]"
    assert "__fspath__ failed: TypeError" in violation.message


def test_type_error_hostile_eq_and_hash_never_run() -> None:
    class Evil(str):
        def __eq__(self, other: object) -> bool:
            raise TypeError("no")

        def __hash__(self) -> int:
            raise TypeError("no")

        def strip(self, chars: str | None = None) -> str:
            raise TypeError("no")

    request = EditRequest(prompt=Evil("a cat"), model=Evil("flux-2-pro"))  # type: ignore[arg-type]
    # Replaced by plain copies: nothing downstream runs the subclass's methods.
    model: object = request.model  # typed a Literal: ask what it is at run time
    assert type(request.prompt) is str
    assert type(model) is str
    assert check(request, Evil("aimlapi")) == ()  # type: ignore[arg-type]


def test_value_error_huge_ints_are_bounded_and_rendered() -> None:
    for name in ("width", "height", "seed", "steps", "safety_tolerance", "guidance"):
        arguments: dict[str, object] = {name: 10**5000}
        if name in ("width", "height"):
            arguments = {"width": 10**5000, "height": 10**5000}
        violations = refused(**arguments)
        assert {v.field for v in violations} == (
            {"width", "height"} if name in ("width", "height") else {name}
        )
        assert all(v.value == "<int of about 5001 digits>" for v in violations)
    assert only(seed=MAX_SEED + 1).limit == f"0..{MAX_SEED}"
    assert EditRequest(**VALID, seed=MAX_SEED).seed == MAX_SEED  # type: ignore[arg-type]


def test_value_error_size_with_5000_digits_or_non_ascii_digits() -> None:
    for size in ("1" * 5000 + "x1", "١٠٢٤x٧٦٨", "1024x768\n"):
        violation = only(size=size)
        assert violation.message == f'must be written "WxH" with whole numbers from 1 to {MAX_SIDE}'
        assert len(violation.value) <= 80
    assert only(aspect_ratio="1" * 5000 + ":1").field == "aspect_ratio"


def test_value_error_released_memoryview_and_bad_urls() -> None:
    assert "cannot be read (ValueError" in only(images=[released_memoryview(PNG)]).message
    problems = {
        "http://[": "is not a valid URL",
        "https://example.com:99999/a.png": "is not a valid URL",
        "https://exa\uff03mple.com/a.png": "is not a valid URL",
        "https://exa mple.com/a.png": "contains whitespace or a control character at index 11",
        "https://example.com/a.png\r\n": "contains whitespace or a control character at index 25",
        "https://:80/a.png": "has no host",
        "https://example.com/" + "a" * MAX_URL_LENGTH: "is too long",
    }
    for url, problem in problems.items():
        violation = only(images=[url])
        assert violation.field == "images[0]"
        assert problem in violation.message, (url, violation.message)


def test_overflow_error_huge_and_non_finite_guidance() -> None:
    for value in (10**5000, float("inf"), float("-inf"), float("nan"), MAX_GUIDANCE + 1):
        assert only(guidance=value).message == "must be a finite number in range"
    assert EditRequest(**VALID, guidance=MAX_GUIDANCE).guidance == MAX_GUIDANCE  # type: ignore[arg-type]


def test_overflow_error_limits_arithmetic_survives_huge_values() -> None:
    rule = SizeRule(multiple=16, min_side=64, max_side=2048, max_pixels=4 * 1024 * 1024)
    found = list(rule.violations(10**5000, 10**5000, "size"))
    assert [message for message, _ in found][-1] == "the image has too many pixels"
    assert all(len(value) < 300 for _, value in found)
    ratios = RatioRule(narrowest=(3, 7), widest=(7, 3))
    assert not ratios.accepts(10**5000, 1)
    assert ratios.accepts(10**5000, 10**5000)
    assert not ratios.accepts(0, 0)
    assert _size_for_ratio((10**400, 1), rule) is None


def test_ratio_bounds_are_exact_not_rounded() -> None:
    # 7:3 is accepted and one part in a billion wider is not; float division blurred the edge.
    ratios = RatioRule(narrowest=(3, 7), widest=(7, 3))
    assert ratios.accepts(7 * 10**9, 3 * 10**9)
    assert not ratios.accepts(7 * 10**9 + 1, 3 * 10**9)


def test_unicode_encode_error_lone_surrogates_are_refused_with_their_index() -> None:
    prompt = "a robot holding \udcff a sign"
    violation = only(prompt=prompt)
    assert violation.field == "prompt"
    assert violation.message == "contains a lone surrogate at index 16 (invalid UTF-8?)"
    assert "\\udcff" in violation.value
    for name, value in (
        ("model", "flux-2-pro\ud800"),
        ("size", "1024x\ud800768"),
        ("aspect_ratio", "16:9\udfff"),
        ("output_format", "\udc80png"),
    ):
        violation = only(**{name: value})
        assert (violation.field, violation.message.split(" at ")[0]) == (
            name,
            "contains a lone surrogate",
        )
    url = only(images=["https://example.com/\udc80.png"])
    assert url.message.endswith("contains a lone surrogate at index 20 (invalid UTF-8?)")


def test_unicode_encode_error_bytes_text_is_told_to_be_decoded() -> None:
    violation = only(prompt=b"a red robot")
    assert violation.message == "must be text, not bytes; decode it first"
    assert only(model=b"flux-2-pro").message == "must be text, not bytes; decode it first"


def test_unicode_encode_error_unencodable_and_escaped_paths(places: dict[str, Path]) -> None:
    for name in ("surrogate", "escaped_bytes"):
        violation = only(images=[places[name]])
        assert "path has a lone surrogate" in violation.message
        assert "rename it" in violation.message
    assert "NUL" in only(images=[places["nul"]]).message


def test_recursion_error_deeply_nested_values_are_rendered_briefly() -> None:
    for name in ("model", "prompt", "size", "seed", "guidance"):
        violation = only(**{name: DEEP})
        assert violation.value.startswith("[[[")
        assert len(violation.value) <= 80
    assert only(images=[DEEP]).field == "images[0]"


def test_recursion_error_and_others_from_user_repr_are_contained() -> None:
    class Loud:
        def __repr__(self) -> str:
            return repr(self)  # RecursionError

    class Liar:
        def __repr__(self) -> str:
            return 5  # type: ignore[return-value]

    assert only(model=Loud()).value.startswith("<Loud instance at")
    assert only(model=Liar()).value.startswith("<Liar instance at")


def test_binascii_error_hand_built_data_url_is_checked_again() -> None:
    # Passed through unchecked, this one raised binascii.Error when a multipart upload decoded it.
    forged = DataUrlImage("data:image/png;base64,iVBORw0KG", ImageInfo("png", 8, 8, 3), 22)
    violation = only(images=[forged])
    assert violation.message.endswith("has a truncated base64 payload")
    forged = DataUrlImage("data:image/png;base64,@@@@", ImageInfo("png", 8, 8, 3), 22)
    assert only(images=[forged]).message.endswith("has invalid base64 data")
    # A hand-built input is re-derived from its source, so its claimed header cannot lie.
    lying = BytesImage(PNG, ImageInfo("png", 10**5000, 8, -1))
    [image] = EditRequest(**VALID, images=[lying]).images  # type: ignore[arg-type]
    assert isinstance(image, BytesImage)
    assert image.info == ImageInfo("png", 8, 8, len(PNG))


def test_generators_are_read_and_their_failures_reported() -> None:
    request = EditRequest(**VALID, images=(url for url in [URL, URL]))  # type: ignore[arg-type]
    assert len(request.images) == 2
    violation = only(images=generator([URL], ValueError))
    assert violation.field == "images"
    assert violation.message == (
        "could not be read: iterating it raised ValueError: raised by a generator"
    )
    endless = only(images=itertools.repeat(URL))
    assert endless.message == f"has more than {MAX_IMAGES} images"
    assert only(images=[URL] * (MAX_IMAGES + 1)).message == "too many images"


def test_subclass_values_are_stored_as_plain_values() -> None:
    class Seed(int):
        def __str__(self) -> str:
            raise RuntimeError("no")

    class Scale(float):
        def __repr__(self) -> str:
            raise RuntimeError("no")

    request = EditRequest(**VALID, seed=Seed(7), guidance=Scale(2.5), steps=Seed(20))  # type: ignore[arg-type]
    assert (type(request.seed), type(request.guidance), type(request.steps)) == (int, float, int)
    json.dumps([request.seed, request.guidance, request.steps])


def test_floats_and_bools_where_ints_belong() -> None:
    violation = only(width=1024.0, height=768)
    assert violation.message == "must be a whole number (int) of pixels, not float"
    assert violation.limit == f"1..{MAX_SIDE}"
    assert only(seed=True).message == f"must be a whole number (int) from 0 to {MAX_SEED}, not bool"


# --- Files that are not regular files ---------------------------------------------------------


def returns_quickly(action: Callable[[], object]) -> object:
    """Run *action* in a thread; fail (instead of hanging the suite) if it blocks."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(action())
        except BaseException as error:  # handed to the test thread below
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(TIMEOUT)
    assert not worker.is_alive(), f"blocked for more than {TIMEOUT} s"
    return outcome[0]


def refused_quickly(path: Path) -> Violation:
    outcome = returns_quickly(lambda: EditRequest(**VALID, images=[path]))  # type: ignore[arg-type]
    assert isinstance(outcome, RequestError), outcome
    assert_clear(outcome)
    [violation] = outcome.violations
    assert violation.field == "images[0]"
    return violation


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("fifo", "is a FIFO (named pipe), not a regular file"),
        ("link_to_fifo", "is a FIFO (named pipe), not a regular file"),
        ("dev_zero", "is a character device, not a regular file"),
        ("dev_null", "is a character device, not a regular file"),
        ("directory", "is a directory, not a regular file"),
        ("missing", "file not found"),
        ("dangling", "file not found"),
        ("not_a_directory", "is not a file path: a part of it is not a directory"),
        ("symlink_loop", "has a loop of symbolic links"),
        ("long_name", "path is too long"),
    ],
)
def test_only_regular_files_are_opened(places: dict[str, Path], name: str, problem: str) -> None:
    violation = refused_quickly(places[name])
    assert violation.message.endswith(problem), violation.message
    assert violation.limit


def test_a_socket_is_refused(places: dict[str, Path]) -> None:
    if not stat.S_ISSOCK(os.stat(places["socket"]).st_mode):
        pytest.skip("no UNIX socket could be bound in the temporary folder")
    assert refused_quickly(places["socket"]).message.endswith("is a socket, not a regular file")


def test_dev_stdin_is_refused_unless_it_is_a_regular_file() -> None:
    path = Path("/dev/stdin")
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        pytest.skip("no /dev/stdin here")
    outcome = returns_quickly(lambda: EditRequest(**VALID, images=[path]))  # type: ignore[arg-type]
    assert isinstance(outcome, EditRequest) if regular else isinstance(outcome, RequestError)


def test_a_file_swapped_for_a_fifo_before_sending_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(PNG)
    request = EditRequest(**VALID, images=[path])  # type: ignore[arg-type]
    [image] = request.images
    assert isinstance(image, FileImage)
    path.unlink()
    os.mkfifo(path)
    # The opener itself, as the client uses it for multipart uploads...
    outcome = returns_quickly(image.open)
    assert isinstance(outcome, RequestError)
    assert outcome.violations[0].message.endswith("is a FIFO (named pipe), not a regular file")
    # ...and the streamed JSON body every JSON provider sends.
    adapter = get_adapter("laozhang")
    body = first_request(adapter, request, resolve(adapter, request), "https://api.example").body
    assert isinstance(body, JsonBody)
    outcome = returns_quickly(lambda: b"".join(StreamedJson(json_segments(body))))
    assert isinstance(outcome, RequestError)
    assert_clear(outcome)


def test_a_file_swapped_for_a_device_link_before_sending_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(PNG)
    [image] = EditRequest(**VALID, images=[path]).images  # type: ignore[arg-type]
    assert isinstance(image, FileImage)
    path.unlink()
    path.symlink_to("/dev/zero")
    outcome = returns_quickly(image.open)
    assert isinstance(outcome, RequestError)
    assert "character device" in outcome.violations[0].message


def test_the_opener_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(PNG)
    [image] = EditRequest(**VALID, images=[path]).images  # type: ignore[arg-type]
    assert isinstance(image, FileImage)
    with image.open() as stream:
        assert stream.read() == PNG
    assert isinstance(stream, io.BufferedReader)


def test_an_unreadable_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Permissions do not stop root (CI), so the refusal the kernel gives others is made here.
    path = tmp_path / "secret.png"
    path.write_bytes(PNG)
    real_open = os.open

    def refuse(name: object, *args: object, **kwargs: object) -> int:
        if os.fsdecode(name) == str(path):  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    assert refused_quickly(path).message.endswith("cannot be read (permission denied)")


# --- check() and get_adapter() ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, 5, ["aimlapi"], {"a": 1}, b"aimlapi", 10**5000, DEEP],
    ids=["none", "int", "list", "dict", "bytes", "huge-int", "deep-list"],
)
def test_get_adapter_refuses_any_non_str(value: object) -> None:
    with pytest.raises(ConfigurationError, match="a provider id must be a str") as caught:
        get_adapter(value)  # type: ignore[arg-type]
    assert_clear(caught.value)
    assert len(str(caught.value)) < 300


def test_get_adapter_suggests_a_near_miss() -> None:
    with pytest.raises(ConfigurationError, match=r"did you mean 'laozhang'\?"):
        get_adapter("laozang")
    with pytest.raises(ConfigurationError) as caught:
        get_adapter("\ud800" * 10_000)
    assert_clear(caught.value)
    assert "did you mean" not in str(caught.value)


def test_check_refuses_what_is_not_a_request() -> None:
    with pytest.raises(RequestError) as caught:
        check({"prompt": "x", "model": "flux-2-pro"}, "aimlapi")  # type: ignore[arg-type]
    [violation] = caught.value.violations
    assert (violation.field, violation.message) == ("request", "must be an EditRequest, not dict")
    with pytest.raises(ConfigurationError):
        check(None, None)  # type: ignore[arg-type]


def test_violations_render_any_value_briefly() -> None:
    values: list[object] = [
        10**5000,
        b"\x00" * 10_000,
        "x" * 10_000,
        "\n\r\x1b[31m",
        DEEP,
        {i: i for i in range(1000)},
        math.nan,
    ]
    for value in values:
        violation = only(model=value)
        assert len(violation.value) <= 80
        assert violation.value.isprintable()


def test_an_os_error_with_no_specific_reason_is_still_a_violation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(PNG)

    def failing_open(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "open", failing_open)
    violation = only(images=[path])
    assert violation.message.endswith("cannot be read (Input/output error)")
