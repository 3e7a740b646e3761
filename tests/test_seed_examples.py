"""Every example request in the provider documents (../shared/seeds), reproduced from an EditRequest.

Each case gives the document's own request (method, path, content type, body fields and values,
copied from the example) and the provider-neutral request that must produce it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from flux_adapters import EditRequest, ModelId
from flux_adapters._flows import resolve
from flux_adapters.wire import HttpRequest, JsonBody, MultipartBody
from tests.conftest import call_adapter, image_bytes

BASES = {
    "laozhang": "https://api.laozhang.ai",
    "apiyi": "https://api.apiyi.com",
    "apiyi-multipart": "https://api.apiyi.com",
    "aimlapi": "https://api.aimlapi.com",
}

ROBOT_PROMPT = (
    "Use image 1 as the red robot, image 2 as the greenhouse background, and image 3 as the skateboard. "
    "Create one coherent scene: the robot rides the yellow skateboard in front of the turquoise greenhouse. "
    "Preserve the white scarf, orange door, purple wheels, and black star sticker."
)
ROBOT_URLS = [
    "https://example.com/source_1_red_robot.png",
    "https://example.com/source_2_glass_greenhouse.png",
    "https://example.com/source_3_yellow_skateboard.png",
]
BLEND_URLS = [
    "https://static.apiyi.com/apiyi-logo.png",
    "https://images.unsplash.com/photo-1762138012600-2ab523f8b35a",
]
TREX_PROMPT = (
    "Combine the images so the T-Rex is wearing a business suit, sitting in a cozy small café, "
    "drinking from the mug. Blur the background slightly to create a bokeh effect."
)
TREX_URLS = [
    "https://raw.githubusercontent.com/aimlapi/api-docs/main/reference-files/t-rex.png",
    "https://raw.githubusercontent.com/aimlapi/api-docs/main/reference-files/blue-mug.jpg",
]


@attrs.frozen
class Example:
    """One example request from a seed document."""

    seed: str
    where: str
    provider: str
    path: str
    content_type: str
    expected: Callable[[Path], dict[str, object]]
    request: Callable[[Path], EditRequest]


def local(tmp: Path, name: str) -> Path:
    """A local PNG like the documents' source_1_red_robot.png, made on the fly."""
    path = tmp / name
    if not path.exists():
        path.write_bytes(image_bytes(48 + len(name), 32, "PNG", color="blue"))
    return path


def data_url_of(path: Path) -> str:
    # As the documents do it: `base64 < file | tr -d '\n'`, or base64.b64encode(path.read_bytes()).
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


LOCAL_ROBOTS = [
    "source_1_red_robot.png",
    "source_2_glass_greenhouse.png",
    "source_3_yellow_skateboard.png",
]

EXAMPLES = [
    Example(
        "000 laozhang edit",
        "Single-Image Edit cURL",
        "laozhang",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Keep the same main subject. Change the background to a clean pale blue studio backdrop and preserve the original lighting.",
            "input_image": "https://example.com/source.png",
            "width": 1792,
            "height": 1024,
            "output_format": "png",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="Keep the same main subject. Change the background to a clean pale blue studio backdrop and preserve the original lighting.",
            images=["https://example.com/source.png"],
            width=1792,
            height=1024,
            output_format="png",
        ),
    ),
    Example(
        "000 laozhang edit",
        "Multi-Image Edit cURL",
        "laozhang",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": ROBOT_PROMPT,
            "input_image": ROBOT_URLS[0],
            "input_image_2": ROBOT_URLS[1],
            "input_image_3": ROBOT_URLS[2],
            "width": 1792,
            "height": 1024,
            "output_format": "png",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt=ROBOT_PROMPT,
            images=ROBOT_URLS,
            width=1792,
            height=1024,
            output_format="png",
        ),
    ),
    Example(
        "000 laozhang edit",
        "Local Multi-Image Edit cURL (data URLs)",
        "laozhang",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Combine the three provided reference images into one coherent new image.",
            "input_image": data_url_of(local(tmp, LOCAL_ROBOTS[0])),
            "input_image_2": data_url_of(local(tmp, LOCAL_ROBOTS[1])),
            "input_image_3": data_url_of(local(tmp, LOCAL_ROBOTS[2])),
            "width": 1792,
            "height": 1024,
            "output_format": "png",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="Combine the three provided reference images into one coherent new image.",
            images=[local(tmp, name) for name in LOCAL_ROBOTS],
            width=1792,
            height=1024,
            output_format="png",
        ),
    ),
    Example(
        "000 laozhang edit",
        "Python flux_edit(image_urls=...)",
        "laozhang",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Use image 1 as the subject, image 2 as the background, and image 3 as the prop. Fuse them into one coherent scene.",
            "input_image": "https://example.com/image1.png",
            "width": 1792,
            "height": 1024,
            "output_format": "png",
            "input_image_2": "https://example.com/image2.png",
            "input_image_3": "https://example.com/image3.png",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="Use image 1 as the subject, image 2 as the background, and image 3 as the prop. Fuse them into one coherent scene.",
            images=[f"https://example.com/image{n}.png" for n in (1, 2, 3)],
            width=1792,
            height=1024,
            output_format="png",
        ),
    ),
    Example(
        "001 laozhang overview",
        "Flux 2 Text-to-Image cURL",
        "laozhang",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "A ruby red retro robot riding a yellow skateboard in front of a turquoise glass greenhouse, clean product illustration style",
            "n": 1,
            "size": "1792x1024",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="A ruby red retro robot riding a yellow skateboard in front of a turquoise glass greenhouse, clean product illustration style",
            size="1792x1024",
        ),
    ),
    Example(
        "001 laozhang overview",
        "Python generate_flux_image(size='1024x1024')",
        "laozhang",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "A cinematic product photo of a transparent smart speaker on a marble table",
            "n": 1,
            "size": "1024x1024",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="A cinematic product photo of a transparent smart speaker on a marble table",
            size="1024x1024",
        ),
    ),
    Example(
        "001 laozhang overview",
        "Multi-Image Processing Quick Start",
        "laozhang",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Use image 1 as the red robot, image 2 as the greenhouse background, and image 3 as the skateboard. Create one fused scene.",
            "input_image": ROBOT_URLS[0],
            "input_image_2": ROBOT_URLS[1],
            "input_image_3": ROBOT_URLS[2],
            "width": 1792,
            "height": 1024,
            "output_format": "png",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="Use image 1 as the red robot, image 2 as the greenhouse background, and image 3 as the skateboard. Create one fused scene.",
            images=ROBOT_URLS,
            width=1792,
            height=1024,
            output_format="png",
        ),
    ),
    Example(
        "003 apiyi JSON",
        "Playground cURL",
        "apiyi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Naturally blend these two images",
            "input_image": "https://static.apiyi.com/apiyi-logo.png",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro", prompt="Naturally blend these two images", images=BLEND_URLS[:1]
        ),
    ),
    Example(
        "003 apiyi JSON",
        "two images, seed, jpeg (cURL, Python requests, OpenAI SDK extra_body, fetch)",
        "apiyi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Naturally blend these two images",
            "input_image": BLEND_URLS[0],
            "input_image_2": BLEND_URLS[1],
            "seed": 42,
            "output_format": "jpeg",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="Naturally blend these two images",
            images=BLEND_URLS,
            seed=42,
            output_format="jpeg",
        ),
    ),
    Example(
        "003 apiyi JSON",
        "three images cURL",
        "apiyi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "The person from image 1 is petting the cat from image 2, the bird from image 3 is next to them",
            "input_image": "https://example.com/person.jpg",
            "input_image_2": "https://example.com/cat.jpg",
            "input_image_3": "https://example.com/bird.jpg",
            "seed": 42,
            "output_format": "jpeg",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="The person from image 1 is petting the cat from image 2, the bird from image 3 is next to them",
            images=[f"https://example.com/{name}.jpg" for name in ("person", "cat", "bird")],
            seed=42,
            output_format="jpeg",
        ),
    ),
    Example(
        "003 apiyi JSON",
        "Kontext cURL",
        "apiyi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-kontext-pro",
            "prompt": "Convert this architectural photo into a pencil sketch style, preserve all structural details",
            "input_image": "https://your-oss.example.com/architecture.jpg",
        },
        lambda tmp: EditRequest(
            model="flux-kontext-pro",
            prompt="Convert this architectural photo into a pencil sketch style, preserve all structural details",
            images=["https://your-oss.example.com/architecture.jpg"],
        ),
    ),
    Example(
        "003 apiyi JSON",
        "local base64 cURL (jq)",
        "apiyi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Stylize image 1 as an oil painting",
            "input_image": data_url_of(local(tmp, "person.png")),
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="Stylize image 1 as an oil painting",
            images=[local(tmp, "person.png")],
        ),
    ),
    Example(
        "003 apiyi JSON",
        "Python to_data_url + URL",
        "apiyi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "flux-2-pro",
            "prompt": "Place the person from image 1 into the scene from image 2",
            "input_image": data_url_of(local(tmp, "person.png")),
            "input_image_2": "https://your-oss.example.com/scene.jpg",
        },
        lambda tmp: EditRequest(
            model="flux-2-pro",
            prompt="Place the person from image 1 into the scene from image 2",
            images=[local(tmp, "person.png"), "https://your-oss.example.com/scene.jpg"],
        ),
    ),
    Example(
        "004 aimlapi",
        "JavaScript fetch",
        "aimlapi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "blackforestlabs/flux-2-pro-edit",
            "prompt": TREX_PROMPT,
            "image_urls": TREX_URLS,
        },
        lambda tmp: EditRequest(model="flux-2-pro", prompt=TREX_PROMPT, images=TREX_URLS),
    ),
    Example(
        "004 aimlapi",
        "Python requests and second JS example (guidance_scale 19)",
        "aimlapi",
        "/v1/images/generations",
        "application/json",
        lambda tmp: {
            "model": "blackforestlabs/flux-2-pro-edit",
            "prompt": TREX_PROMPT,
            "image_urls": TREX_URLS,
            "guidance_scale": 19,
        },
        lambda tmp: EditRequest(
            model="flux-2-pro", prompt=TREX_PROMPT, images=TREX_URLS, guidance=19
        ),
    ),
]

MULTIPART_EXAMPLES = [
    # (seed, where, model, prompt, size, file names in order)
    (
        "OpenAI SDK images.edit, three files",
        "flux-2-pro",
        "Place the person from image 1 into the scene from image 2, applying the color palette of image 3, keep lighting consistent",
        "1536x1024",
        ["person.png", "scene.png", "style.png"],
    ),
    (
        "cURL -F image[]=@... x3",
        "flux-2-pro",
        "Place the person from image 1 into the scene from image 2, color palette from image 3",
        "1536x1024",
        ["person.png", "scene.png", "style.png"],
    ),
    (
        "Node FormData, two files",
        "flux-2-pro",
        "Replace the top of the person from image 1 with the one from image 2",
        "1024x1024",
        ["person.png", "outfit.png"],
    ),
    (
        "OpenAI SDK images.edit, one file (Kontext)",
        "flux-kontext-max",
        "Replace 'joy' with 'BFL' on the sign, keep all other text and layout unchanged",
        "1024x1024",
        ["photo.png"],
    ),
]


def build(provider: str, request: EditRequest) -> HttpRequest:
    adapter = call_adapter(provider)
    return adapter.build_request(request, resolve(adapter, request), BASES[provider])


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.provider}: {e.where}")
def test_json_examples_are_reproduced(example: Example, tmp_path: Path) -> None:
    wire = build(example.provider, example.request(tmp_path))
    assert wire.method == "POST"
    assert wire.url == BASES[example.provider] + example.path
    assert isinstance(wire.body, JsonBody)  # sent as application/json
    assert wire.body.materialize() == example.expected(tmp_path)


@pytest.mark.parametrize(
    ("where", "model", "prompt", "size", "names"), MULTIPART_EXAMPLES, ids=lambda v: str(v)[:40]
)
def test_multipart_examples_are_reproduced(
    where: str, model: ModelId, prompt: str, size: str, names: list[str], tmp_path: Path
) -> None:
    files = [local(tmp_path, name) for name in names]
    wire = build(
        "apiyi-multipart", EditRequest(model=model, prompt=prompt, images=files, size=size)
    )
    assert (wire.method, wire.url) == ("POST", "https://api.apiyi.com/v1/images/edits")
    assert isinstance(wire.body, MultipartBody)
    assert dict(wire.body.fields) == {"model": model, "prompt": prompt, "size": size}
    # One repeated image[] part per file, in the order given ("image 1", "image 2", ...).
    assert [(part.name, part.filename) for part in wire.body.files] == [
        ("image[]", name) for name in names
    ]


def test_multipart_reference_listing_matches_our_field_vocabulary(tmp_path: Path) -> None:
    """The document's generated reference lists every form field; each is one we can send.

    It is a schema listing rather than a request (it sets size *and* width/height, and flex-only
    steps/guidance with a Kontext model), so it is compared field by field.
    """
    listed = {"model", "prompt", "image[]", "size", "width", "height", "seed", "safety_tolerance",
              "output_format", "steps", "guidance"}  # fmt: skip
    image = local(tmp_path, "example-file.png")
    by_size = build("apiyi-multipart", EditRequest(
        model="flux-2-flex", prompt="p", images=[image], size="1024x1024", seed=123,
        safety_tolerance=2, output_format="jpeg", steps=50, guidance=4.5,
    ))  # fmt: skip
    by_sides = build(
        "apiyi-multipart",
        EditRequest(model="flux-2-flex", prompt="p", images=[image], width=1056, height=1056),
    )
    sent: set[str] = set()
    for wire in (by_size, by_sides):
        assert isinstance(wire.body, MultipartBody)
        sent |= {name for name, _ in wire.body.fields} | {part.name for part in wire.body.files}
    assert sent == listed
    assert isinstance(by_size.body, MultipartBody)
    assert dict(by_size.body.fields) == {
        "model": "flux-2-flex", "prompt": "p", "size": "1024x1024", "seed": "123",
        "safety_tolerance": "2", "output_format": "jpeg", "steps": "50", "guidance": "4.5",
    }  # fmt: skip
