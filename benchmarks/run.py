"""Benchmarks: flux-adapters side by side with hand-written httpx, in one run, on loopback.

    python benchmarks/run.py            # all comparisons
    python benchmarks/run.py b c        # some of them

Each comparison prints both measurements and their ratio against the issue's target:

  a  `from flux_adapters import EditRequest, FluxClient` (every example's first line) in a venv
     with the core dependencies only, vs `import httpx` in a venv with httpx alone (both made
     once under benchmarks/.cache, same versions as here), fresh interpreters in alternation
     (median of 31 each, wall time; CPU time alongside); also the lazy `import flux_adapters`,
     and `import httpx, attrs`
  b  FluxClient.edit (text-to-image) vs httpx.Client.post of the same JSON, per call
  c  an edit with three 1 MB local images as JSON data URLs vs the best of three hand-written
     httpx.Client versions (pybase64, the base64 spliced into JSON bytes; a generator, a list,
     one bytes), in rounds side by side: median and range, and CPU per call; the naive
     base64 + post(json=...) alongside
  d  eight 20 MB local images, as JSON data URLs and as multipart: time and peak memory above
     the process baseline, each in a fresh process (hand-written post(json=...) alongside)
  e  async, at 50, 200 and 500 requests in flight, requests per second and CPU per request: raw
     aiohttp, httpx on aiohttp, AsyncFluxClient's aiohttp driver (target >= 0.6x raw aiohttp);
     plain httpx.AsyncClient in several pool configurations, AsyncFluxClient's httpx driver
     (target >= the best of them). Each measurement in a fresh process.
  f  routing on the emulator: a failover client whose first provider answers vs a single-provider
     client, per call; and with the first provider down (503 after 1 s) once its breaker is open
  g  hostile answers: a 1 MB HTML error page (several shapes that made the old regexes quadratic)
     and a 100,000-deep nested JSON answer, each parsed into a typed error; worst time of each
  h  one-exchange FluxClient.edit (laozhang, text-to-image) per call, this tree vs the library
     as it was before jobs (commit BASELINE, or $FLUX_BENCH_BASELINE), each in its own process,
     alternated
  i  a BFL job, submit + 3 polls (2 pending, then ready), per call: FluxClient.edit vs the same
     four requests by hand with httpx.Client
  j  `flux-adapters batch` of 10,000 jobs (journal on), per job, vs the floor: aiohttp's raw
     POST + GET of the image + writing the file, as many in flight; fsyncs per job
  k  peak RSS of `flux-adapters batch` at 1,000 and at 100,000 jobs, each in a fresh process
  l  Redis-backed routing vs in-process, per call: FluxClient and AsyncFluxClient with two
     providers, cooldowns in the client vs in a redis-server on a Unix socket (state=), also
     with a cumulative budget; measured side by side, alternated; Redis commands per call
  m  the gateway's overhead per call: a 64x64 text-to-image POSTed to `flux-adapters serve`
     (fronting laozhang on the emulator; gateway key checked, image fetched and kept) and its
     image fetched from the gateway, vs the same POST to the emulator and its image fetched from
     the emulator, round by round in a random order; medians, the median of the paired
     differences (target <= 1.5 ms) and the ratio; beside it the same differences for
     benchmarks/hand_gateway.py, a minimal aiohttp gateway doing the same work by hand (and
     with its download overlapped with the answer). Each server in its own process
  n  the gateway's throughput at 50 and 200 concurrent clients (aiohttp, one connection each),
     requests per second, vs the same clients calling the emulator directly

The server (benchmarks/loopback_server.py) runs in its own process and discards bodies. Results
are also written to benchmarks/results/latest.json. Timings vary with the machine; run twice.

    python benchmarks/run.py --profile-async flux-aiohttp 200     # CPU per request + cProfile
    PYTHONPATH=/tmp/old python benchmarks/run.py --profile-async flux-aiohttp 200   # another tree

profiles one configuration of (e): aiohttp, httpx-aiohttp, flux-aiohttp, flux-httpx, httpx:N.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Final, cast

import httpx

from flux_adapters import AsyncFluxClient, EditRequest, FluxClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY = "bench-key"
BASELINE = "ec8badd"
"""The last commit before asynchronous providers (jobs) came in: the one-exchange baseline."""
RESULTS: dict[str, dict[str, Any]] = {}


def fake_png(path: Path, size: int, width: int = 2000, height: int = 1500) -> Path:
    """A file with a valid PNG header (read for the limits check) padded to *size* bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = (
        struct.pack(">I", len(ihdr))
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    head = b"\x89PNG\r\n\x1a\n" + chunk
    with path.open("wb") as out:
        out.write(head)
        out.write(os.urandom(size - len(head)))
    return path


@contextmanager
def loopback() -> Iterator[str]:
    server = subprocess.Popen(
        [sys.executable, str(HERE / "loopback_server.py")], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    try:
        yield f"http://127.0.0.1:{int(server.stdout.readline())}"
    finally:
        server.terminate()
        server.wait()


def report(
    key: str, title: str, rows: list[tuple[str, str]], ratio: float, target: str, ok: bool
) -> None:
    print(f"\n({key}) {title}")
    for label, value in rows:
        print(f"    {label:<46} {value}")
    print(f"    {'ratio':<46} {ratio:.2f}x   target {target}   {'PASS' if ok else 'MISS'}")
    RESULTS[key] = {
        "title": title,
        "rows": dict(rows),
        "ratio": round(ratio, 3),
        "target": target,
        "ok": ok,
    }


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


NAMED_IMPORT = "from flux_adapters import EditRequest, FluxClient"
"""What every example writes first: the import a user meets."""
READY_HTTPX = "import httpx; httpx.Client()"
READY_FLUX = (
    f"{NAMED_IMPORT}; EditRequest(prompt='a cat', model='flux-2-pro');"
    " FluxClient('laozhang', api_key='sk-bench')"
)
"""The import and the objects a first call builds before it sends (the client's pool is made)."""


def _venv_with(folder: Path, requirements: list[str]) -> Path | str:
    """The python of a venv in *folder* holding only *requirements*, made once; else why not.

    A venv is reused while its marker lists the same requirements, so a version change here
    makes it again.
    """
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    marker = folder / "requirements.done"
    wanted = "\n".join(requirements)
    if marker.exists() and marker.read_text() == wanted and python.exists():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True
    )
    if made.returncode != 0:
        return f"python -m venv failed: {made.stderr.strip()[-300:]}"
    try:
        installed = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *requirements,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return "pip install took over 10 minutes"
    if installed.returncode != 0:
        lines = [line for line in installed.stderr.splitlines() if "ERROR" in line]
        return f"pip could not install {' '.join(requirements)} ({(lines or ['?'])[-1].strip()})"
    marker.write_text(wanted)
    return python


def _import_venvs() -> tuple[str, str, str | None]:
    """Pythons for (httpx alone, flux-adapters with its core dependencies), and why not clean.

    Both venvs hold the versions installed here. The second sees this tree through a ``.pth``
    file (as an editable install does) and no extra; the tree is compiled to bytecode first, as
    pip compiles what it installs, so neither side compiles source while it is timed. When a
    venv cannot be made (no package index, say), both sides run in this interpreter instead.
    """
    version = sys.version.split()[0]
    pins = {name: metadata.version(name) for name in ("httpx", "attrs", "cattrs", "imagesize")}
    cache = HERE / ".cache" / f"import-venvs-py{version}"
    bare = _venv_with(cache / "httpx", [f"httpx=={pins['httpx']}"])
    core = _venv_with(cache / "core", [f"{name}=={pin}" for name, pin in pins.items()])
    if isinstance(bare, str) or isinstance(core, str):
        why = bare if isinstance(bare, str) else core
        return sys.executable, sys.executable, str(why)
    purelib = subprocess.run(
        [str(core), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "flux_adapters_tree.pth").write_text(f"{ROOT}\n")
    subprocess.run(
        [str(core), "-m", "compileall", "-q", str(ROOT / "flux_adapters")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(bare), str(core), None


def _children_cpu() -> float:
    """User and system seconds of every child process waited for so far; 0 where unknown."""
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return 0.0
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def bench_import(base: str) -> None:
    bare, core, unclean = _import_venvs()
    if unclean is not None:
        print(f"\n    NOTE: the baseline is not clean: {unclean}.")
        print("    Both sides run in this venv, where `import httpx` also loads what else is")
        print("    installed (with click installed, httpx's own CLI loads click, rich, pygments).")
    # (python, code): interpreter start-up, then the four imports, run in alternation.
    runs: dict[str, tuple[str, str]] = {
        "start": (bare, "pass"),
        "httpx": (bare, "import httpx"),
        "named": (core, NAMED_IMPORT),
        "lazy": (core, "import flux_adapters"),
        "floor": (core, "import httpx, attrs"),
        # Ready to send: the import and what a first call builds before it sends.
        "httpx ready": (bare, READY_HTTPX),
        "ready": (core, READY_FLUX),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as elsewhere:  # no `flux_adapters` folder on sys.path
        for _ in range(31):  # interleaved, so drift hits all alike
            for name, (python, code) in runs.items():
                used = _children_cpu()
                started = time.perf_counter()
                subprocess.run([python, "-I", "-c", code], check=True, cwd=elsewhere)
                samples[name].append(time.perf_counter() - started)
                cpu[name].append(_children_cpu() - used)
    start, httpx_alone, named, lazy, floor, httpx_ready, ready = (
        statistics.median(samples[name]) for name in runs
    )
    # CPU time moves less than wall time when other work shares the machine (it still counts
    # the caches and cores they share): the same runs, as a check on the headline.
    cpu_httpx, cpu_named, cpu_floor = (
        statistics.median(cpu[n]) for n in ("httpx", "named", "floor")
    )

    def shown(seconds: float) -> str:
        return f"{seconds * 1000:.1f} ms ({(seconds - start) * 1000:.1f} ms net)"

    venvs = (
        "both in this venv: NOT a clean baseline"
        if unclean
        else "httpx in a venv of its own, flux-adapters in one with its core dependencies"
    )
    report(
        "a",
        f"import time, fresh interpreters in alternation (median of 31); {venvs}",
        [
            ("import httpx", shown(httpx_alone)),
            (NAMED_IMPORT, shown(named)),
            (
                "import flux_adapters (names load on first use)",
                f"{shown(lazy)}, {lazy / httpx_alone:.2f}x",
            ),
            (
                "import httpx, attrs (the named import loads no attrs)",
                f"{shown(floor)}, {floor / httpx_alone:.2f}x",
            ),
            ("import httpx; httpx.Client()", shown(httpx_ready)),
            (
                "... + EditRequest(...) + FluxClient('laozhang', ...) (attrs loads here)",
                f"{shown(ready)}, {ready / httpx_ready:.2f}x (not a target: what a first call meets)",
            ),
            (
                "CPU time (user + system) of the same runs",
                f"import httpx {cpu_httpx * 1000:.1f} ms, the named import {cpu_named * 1000:.1f} "
                f"ms: {cpu_named / cpu_httpx:.2f}x (httpx, attrs: {cpu_floor / cpu_httpx:.2f}x)"
                if cpu_httpx > 0
                else "not measured on this system",
            ),
        ],
        named / httpx_alone,
        "<= 1.2x",
        named / httpx_alone <= 1.2,
    )


def per_call(function: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """Median over *rounds* of the mean seconds per call."""
    function()
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        means.append((time.perf_counter() - started) / calls)
    return statistics.median(means)


def side_by_side(
    first: Callable[[], object],
    second: Callable[[], object],
    calls: int,
    *,
    alternations: int = 3,
    rounds: int = 5,
) -> tuple[float, float]:
    """Median seconds per call of *first* and *second*, measured in alternation so drift hits both."""
    firsts, seconds = [], []
    for _ in range(alternations):
        firsts.append(per_call(first, calls, rounds))
        seconds.append(per_call(second, calls, rounds))
    return statistics.median(firsts), statistics.median(seconds)


def bench_text_to_image(base: str) -> None:
    prompt = "A ruby red retro robot riding a yellow skateboard"
    body = {"model": "flux-2-pro", "prompt": prompt, "n": 1, "size": "1024x1024"}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{base}/laozhang/v1/images/generations"
    with (
        httpx.Client() as http,
        FluxClient("laozhang", api_key=KEY, base_url=f"{base}/laozhang") as ours,
    ):

        def by_hand() -> object:
            response = http.post(url, json=body, headers=headers)
            response.raise_for_status()
            return response.json()["data"][0]["url"]

        def with_library() -> object:
            request = EditRequest(prompt=prompt, model="flux-2-pro", size="1024x1024")
            return ours.edit(request).images[0].url

        theirs, mine = side_by_side(by_hand, with_library, 300, alternations=7)
    report(
        "b",
        "text-to-image, per call (request built each call)",
        [
            ("httpx.Client.post(json=...)", f"{theirs * 1e6:.0f} us"),
            ("FluxClient.edit", f"{mine * 1e6:.0f} us"),
        ],
        mine / theirs,
        "<= 1.3x",
        mine / theirs <= 1.3,
    )


THREE_IMAGES_ROUNDS = 12
"""Rounds of (c): in each, every version makes `THREE_IMAGES_CALLS` edits in turn."""
THREE_IMAGES_CHOOSING = 4
"""The first rounds of (c), which choose the best version by hand; the others measure it.

Chosen and measured on the same rounds, the best of three versions that cost about the same
is whichever had the luckiest rounds: its median is biased low (the winner's curse), by about
as much as one version's median moves from run to run."""
THREE_IMAGES_CALLS = 20


def hand_written_json(
    http: httpx.Client, url: str, paths: list[Path], headers: dict[str, str]
) -> dict[str, Callable[[], object]]:
    """(c) written by hand with httpx.Client, as a skilled user would: each sends the library's
    exact body (same keys, same order, same bytes), with pybase64 when it is installed.

    - ``generator``: each file read and encoded as the body goes out, Content-Length from
      ``os.stat``: no second copy of anything, and the first bytes leave before the last file
      is read;
    - ``list``: the body as a list of byte strings (the base64 spliced in between the JSON
      text), sent as an iterator with its Content-Length;
    - ``bytes``: the same list joined into one ``bytes``;
    - ``naive``: ``base64.b64encode`` and ``json=`` (a str round trip), the reference of old.
    """
    b64encode: Callable[[bytes], bytes]
    try:
        from pybase64 import b64encode
    except ImportError:
        b64encode = base64.b64encode
    head = b'{"model":"flux-2-pro","prompt":"blend"'
    tail = b',"width":1024,"height":1024}'
    fields = [b',"input_image' + (b"_%d" % (n + 1) if n else b"") + b'":"' for n in range(3)]
    prefix = b"data:image/png;base64,"
    sent = {**headers, "Content-Type": "application/json"}

    def answer(response: httpx.Response) -> object:
        response.raise_for_status()
        return response.json()["data"][0]["url"]

    def parts() -> list[bytes]:
        body = [head]
        for field, path in zip(fields, paths, strict=True):
            body += [field + prefix, b64encode(path.read_bytes()), b'"']
        body.append(tail)
        return body

    def generator() -> object:
        sizes = [os.stat(path).st_size for path in paths]
        length = (
            len(head)
            + len(tail)
            + sum(
                len(field) + len(prefix) + 4 * -(-size // 3) + 1
                for field, size in zip(fields, sizes, strict=True)
            )
        )

        def body() -> Iterator[bytes]:
            yield head
            for field, path in zip(fields, paths, strict=True):
                yield field + prefix
                yield b64encode(path.read_bytes())
                yield b'"'
            yield tail

        return answer(
            http.post(url, content=body(), headers={**sent, "Content-Length": str(length)})
        )

    def in_list() -> object:
        body = parts()
        length = str(sum(map(len, body)))
        return answer(
            http.post(url, content=iter(body), headers={**sent, "Content-Length": length})
        )

    def in_bytes() -> object:
        return answer(http.post(url, content=b"".join(parts()), headers=sent))

    def naive() -> object:
        payload: dict[str, object] = {"model": "flux-2-pro", "prompt": "blend"}
        for index, path in enumerate(paths):
            field = "input_image" if index == 0 else f"input_image_{index + 1}"
            payload[field] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        payload |= {"width": 1024, "height": 1024}
        return answer(http.post(url, json=payload, headers=headers))

    return {"generator": generator, "list": in_list, "bytes": in_bytes, "naive": naive}


def interleaved(
    functions: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Per function, the mean wall and CPU seconds per call of each round; in each round every
    function runs *calls* times in turn, so drift hits all alike, in a new random order, so
    that none always follows another (the naive version leaves the allocator's heap grown)."""
    import random

    seen: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in functions}
    for function in functions.values():
        function()
    order = list(functions)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            function = functions[name]
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                function()
            seen[name][0].append((time.perf_counter() - wall) / calls)
            seen[name][1].append((time.process_time() - cpu) / calls)
    return seen


def bench_three_images(base: str, folder: Path) -> None:
    from flux_adapters import get_adapter
    from flux_adapters._bodies import StreamedJson, json_segments
    from flux_adapters._flows import first_request, resolve
    from flux_adapters.wire import JsonBody

    paths = [fake_png(folder / f"ref{n}.png", 1024 * 1024) for n in range(3)]
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{base}/laozhang/v1/images/generations"

    def request() -> EditRequest:
        return EditRequest(
            prompt="blend", model="flux-2-pro", images=paths, width=1024, height=1024
        )

    # Every version sends the same body: the library's, byte for byte (naive: the same JSON).
    adapter = get_adapter("laozhang")
    body = first_request(adapter, request(), resolve(adapter, request()), url).body
    assert isinstance(body, JsonBody)
    ours_sent = b"".join(StreamedJson(json_segments(body)))
    echo = httpx.MockTransport(
        lambda sent: httpx.Response(200, json={"data": [{"url": sent.read().decode()}]})
    )
    with httpx.Client(transport=echo) as recorder:
        for name, send in hand_written_json(recorder, url, paths, headers).items():
            theirs = send()
            assert isinstance(theirs, str), name
            if name == "naive":  # json.dumps spaces its separators: the same JSON, not bytes
                assert json.loads(theirs) == json.loads(ours_sent), name
            else:
                assert theirs.encode() == ours_sent, name
    with (
        httpx.Client() as http,
        FluxClient("laozhang", api_key=KEY, base_url=f"{base}/laozhang") as ours,
    ):
        by_hand = hand_written_json(http, url, paths, headers)

        def with_library() -> object:
            return ours.edit(request()).images[0].url

        seen = interleaved(
            {**by_hand, "flux": with_library}, THREE_IMAGES_CALLS, THREE_IMAGES_ROUNDS
        )
    choosing = {name: statistics.median(wall[:THREE_IMAGES_CHOOSING]) for name, (wall, _) in seen.items()}  # fmt: skip
    best = min(("generator", "list", "bytes"), key=choosing.__getitem__)
    seen = {
        name: (wall[THREE_IMAGES_CHOOSING:], cpu[THREE_IMAGES_CHOOSING:])
        for name, (wall, cpu) in seen.items()
    }
    walls = {name: statistics.median(wall) for name, (wall, _) in seen.items()}

    def shown(name: str) -> str:
        wall, cpu = seen[name]
        return (
            f"{walls[name] * 1000:.2f} ms ({min(wall) * 1000:.2f} to {max(wall) * 1000:.2f}), "
            f"CPU {statistics.median(cpu) * 1000:.2f} ms"
        )

    labels = {
        "generator": "by hand: generator body (pybase64)",
        "list": "by hand: list of bytes, as an iterator",
        "bytes": "by hand: one bytes body",
        "naive": "by hand: base64 + post(json=...) (naive)",
        "flux": "EditRequest + FluxClient.edit",
    }
    rows = [(labels[name] + (" *" if name == best else ""), shown(name)) for name in labels]
    cpus = {name: statistics.median(cpu) for name, (_, cpu) in seen.items()}
    rows.append(("CPU per call, ratio to the best (*)", f"{cpus['flux'] / cpus[best]:.2f}x"))
    ratio = walls["flux"] / walls[best]
    report(
        "c",
        "edit with three 1 MB local images as JSON data URLs, per call: median of "
        f"{THREE_IMAGES_ROUNDS - THREE_IMAGES_CHOOSING} rounds of {THREE_IMAGES_CALLS} (range), "
        f"CPU per call; the best by hand (*) chosen by {THREE_IMAGES_CHOOSING} rounds before",
        rows,
        ratio,
        "<= 1.0x the best by hand (*)",
        ratio <= 1.0,
    )
    RESULTS["c"]["measurements"] = {
        name: {
            "wall_ms": [round(w * 1000, 3) for w in wall],
            "cpu_ms": [round(c * 1000, 3) for c in cpu],
        }
        for name, (wall, cpu) in seen.items()
    }


_BIG_CHILD = """
import base64, json, sys, time
from pathlib import Path
import httpx
from flux_adapters import EditRequest, FluxClient
mode, base, folder = sys.argv[1:4]
paths = sorted(Path(folder).glob("big*.png"))
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
http = httpx.Client(timeout=120)
# Forked from the benchmark runner: reset the high-water mark inherited with its pages.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = status_mb("VmRSS")
started = time.perf_counter()
if mode == "hand-json":
    payload = {"model": "flux-2-pro", "prompt": "blend"}
    for i, p in enumerate(paths):
        payload["input_image" if i == 0 else f"input_image_{i + 1}"] = (
            "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode())
    http.post(base + "/laozhang/v1/images/generations", json=payload).raise_for_status()
else:
    provider = "laozhang" if mode == "json" else "apiyi-multipart"
    client = FluxClient(provider, api_key="test-key", base_url=f"{base}/{provider}", http_client=http)
    client.edit(EditRequest(prompt="blend", model="flux-2-pro", images=paths))
elapsed = time.perf_counter() - started
peak = status_mb("VmHWM")
print(json.dumps({"seconds": elapsed, "extra_mb": max(0.0, peak - baseline)}))
"""


def bench_big_images(base: str, folder: Path) -> None:
    for n in range(8):
        fake_png(folder / f"big{n}.png", 20_000_000, 4000, 5000)
    measured = {}
    for mode in ("json", "multipart", "hand-json"):
        runs = [
            json.loads(
                subprocess.run(
                    [sys.executable, "-c", _BIG_CHILD, mode, base, str(folder)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            for _ in range(3)
        ]
        measured[mode] = (
            statistics.median(r["seconds"] for r in runs),
            statistics.median(r["extra_mb"] for r in runs),
        )
    (js, jm), (ms, mm), (hs, hm) = measured["json"], measured["multipart"], measured["hand-json"]
    ok = js <= 0.3 and jm <= 50 and mm <= 50
    report(
        "d",
        "eight 20 MB local images (160 MB), fresh process each, median of 3",
        [
            ("JSON data URLs (laozhang)", f"{js:.2f} s, {jm:.0f} MB above baseline"),
            ("multipart image[] (apiyi-multipart)", f"{ms:.2f} s, {mm:.0f} MB above baseline"),
            ("hand-written httpx.post(json=...)", f"{hs:.2f} s, {hm:.0f} MB above baseline"),
        ],
        js / hs,
        "JSON <= 0.3 s and <= 50 MB; multipart <= 50 MB",
        ok,
    )


ASYNC_IN_FLIGHT = (50, 200, 500)
PLAIN_HTTPX_LIMITS = ("8", "16", "32", "100", "default")
"""Plain httpx.AsyncClient configurations tried (max_connections, all kept alive; or httpx's
own defaults: 100 connections, 20 kept alive); the best at each level is the baseline."""
ASYNC_LABELS = {
    "aiohttp": "raw aiohttp (ClientSession.post, .json())",
    "httpx-aiohttp": "httpx.AsyncClient(transport=AiohttpTransport())",
    "flux-aiohttp": "AsyncFluxClient, aiohttp driver (fast extra)",
    "flux-httpx": "AsyncFluxClient, httpx driver (no extra)",
}
_PROMPT = "A ruby red retro robot riding a yellow skateboard"
_BODY = {"model": "flux-2-pro", "prompt": _PROMPT, "n": 1, "size": "1024x1024"}


def _async_sender(config: str, base: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """An async function sending one request as *config* does, and one that closes it.

    Everything is made inside the running loop (aiohttp and httpx pools belong to it).
    """
    import inspect

    url = f"{base}/laozhang/v1/images/generations"
    headers = {"Authorization": f"Bearer {KEY}"}
    if config == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession()

        async def raw() -> None:
            async with session.post(url, json=_BODY, headers=headers) as response:
                response.raise_for_status()
                assert (await response.json())["data"][0]["url"]

        return raw, session.close
    if config == "httpx-aiohttp" or config.startswith("httpx:"):
        # The timeouts AsyncFluxClient has by default (a pool wait of 60 s, not httpx's 5 s, which
        # hundreds of requests waiting in httpcore's pool overrun).
        timeout = httpx.Timeout(connect=10.0, read=300.0, write=120.0, pool=60.0)
        if config == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            http = httpx.AsyncClient(transport=AiohttpTransport(), timeout=timeout)
        elif config == "httpx:default":
            http = httpx.AsyncClient(timeout=timeout)
        else:
            most = int(config.partition(":")[2])
            limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
            http = httpx.AsyncClient(limits=limits, timeout=timeout)

        async def by_hand() -> None:
            response = await http.post(url, json=_BODY, headers=headers)
            response.raise_for_status()
            assert response.json()["data"][0]["url"]

        return by_hand, http.aclose
    # AsyncFluxClient; a tree from before the drivers (benchmarks/run.py --profile-async with
    # PYTHONPATH) had httpx on aiohttp by default, and plain httpx without the extra.
    options: dict[str, Any] = {}
    has_driver = "driver" in inspect.signature(AsyncFluxClient).parameters
    if config == "flux-httpx":
        options = {"driver": "httpx"} if has_driver else {"http_client": httpx.AsyncClient()}
    elif has_driver:
        options = {"driver": "aiohttp"}
    client = AsyncFluxClient("laozhang", api_key=KEY, base_url=f"{base}/laozhang", **options)
    mine = options.get("http_client")

    async def library() -> None:
        result = await client.edit(
            EditRequest(prompt=_PROMPT, model="flux-2-pro", size="1024x1024")
        )
        assert result.images[0].url

    async def close() -> None:
        await client.aclose()
        if mine is not None:
            await mine.aclose()

    return library, close


async def _in_flight(send: Callable[[], Any], total: int, in_flight: int) -> tuple[float, float]:
    """Requests per second and CPU seconds per request, *in_flight* workers sending in turn."""
    each = max(1, total // in_flight)

    async def worker() -> None:
        for _ in range(each):
            await send()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    done = each * in_flight
    return done / (time.perf_counter() - wall), (time.process_time() - cpu) / done


def async_child(config: str, in_flight: int, total: int, base: str) -> dict[str, float]:
    """One measurement, in this (fresh) process: warm up, then *total* requests."""

    async def main() -> dict[str, float]:
        send, close = _async_sender(config, base)
        try:
            await _in_flight(send, max(2 * in_flight, 300), in_flight)  # pools, imports, caches
            rate, cpu = await _in_flight(send, total, in_flight)
        except Exception as exc:  # a configuration that collapses (a PoolTimeout): 0 req/s
            print(f"{config} at {in_flight}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {"rate": 0.0, "cpu_us": float("nan")}
        finally:
            await close()
        return {"rate": rate, "cpu_us": cpu * 1e6}

    return asyncio.run(main())


def _measure_async(config: str, in_flight: int, total: int, base: str) -> dict[str, float]:
    child = [
        sys.executable,
        str(HERE / "run.py"),
        "--async-child",
        config,
        str(in_flight),
        str(total),
        base,
    ]
    done = subprocess.run(child, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {config} at {in_flight} failed:\n{done.stderr}")
    return cast(dict[str, float], json.loads(done.stdout.splitlines()[-1]))


def bench_async(base: str, rounds: int = int(os.environ.get("FLUX_BENCH_ROUNDS", "3"))) -> None:
    """Each configuration at 50, 200 and 500 in flight, each measurement in a fresh process.

    Configurations alternate within a round, so drift on a shared machine hits all alike; the
    median of the rounds is shown. A worker per request in flight sends one request after
    another (a pool of N workers, as a batch runs), on one event loop.
    """
    configs = [
        "aiohttp",
        "httpx-aiohttp",
        "flux-aiohttp",
        *(f"httpx:{n}" for n in PLAIN_HTTPX_LIMITS),
        "flux-httpx",
    ]
    totals = {config: 4000 if "aiohttp" in config else 1500 for config in configs}
    seen: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for in_flight in ASYNC_IN_FLIGHT:
            for config in configs:
                measured = _measure_async(config, in_flight, totals[config], base)
                seen.setdefault((config, in_flight), []).append(measured)

    def median(config: str, in_flight: int, field: str) -> float:
        return statistics.median(m[field] for m in seen[(config, in_flight)])

    def cell(config: str, in_flight: int) -> str:
        rate, cpu = median(config, in_flight, "rate"), median(config, in_flight, "cpu_us")
        return f"{rate:6.0f} ({cpu / 1000:.2f} ms)" if rate else "failed"

    best_plain = {
        n: max(
            (f"httpx:{limit}" for limit in PLAIN_HTTPX_LIMITS), key=lambda c: median(c, n, "rate")
        )
        for n in ASYNC_IN_FLIGHT
    }
    print(
        "\n(e) async: requests per second by requests in flight (CPU per request), median of "
        f"{rounds} rounds"
    )
    print(f"    {'':<62}" + "".join(f"{n:>18}" for n in ASYNC_IN_FLIGHT))
    rows: list[tuple[str, str]] = []

    def line(label: str, cells: list[str]) -> None:
        print(f"    {label:<62}" + "".join(f"{value:>18}" for value in cells))
        rows.append((label, " | ".join(cells)))

    for config in ("aiohttp", "httpx-aiohttp", "flux-aiohttp"):
        line(ASYNC_LABELS[config], [cell(config, n) for n in ASYNC_IN_FLIGHT])
    fast = {
        n: median("flux-aiohttp", n, "rate") / median("aiohttp", n, "rate") for n in ASYNC_IN_FLIGHT
    }
    fast_cpu = {
        n: median("aiohttp", n, "cpu_us") / median("flux-aiohttp", n, "cpu_us")
        for n in ASYNC_IN_FLIGHT
    }
    line(
        "  ratio to raw aiohttp, req/s (target >= 0.6x)",
        [f"{fast[n]:.2f}x" for n in ASYNC_IN_FLIGHT],
    )
    line(
        "  ratio to raw aiohttp, CPU per request", [f"{fast_cpu[n]:.2f}x" for n in ASYNC_IN_FLIGHT]
    )
    line(
        "  httpx on aiohttp, ratio to raw aiohttp",
        [
            f"{median('httpx-aiohttp', n, 'rate') / median('aiohttp', n, 'rate'):.2f}x"
            for n in ASYNC_IN_FLIGHT
        ],
    )
    for limit in PLAIN_HTTPX_LIMITS:
        name = (
            "httpx defaults" if limit == "default" else f"max_connections={limit}, all kept alive"
        )
        line(
            f"plain httpx.AsyncClient, {name}", [cell(f"httpx:{limit}", n) for n in ASYNC_IN_FLIGHT]
        )
    line(
        "  best plain httpx",
        [best_plain[n].partition(":")[2] for n in ASYNC_IN_FLIGHT],
    )
    line(ASYNC_LABELS["flux-httpx"], [cell("flux-httpx", n) for n in ASYNC_IN_FLIGHT])
    plain = {
        n: median("flux-httpx", n, "rate") / median(best_plain[n], n, "rate")
        for n in ASYNC_IN_FLIGHT
    }
    line(
        "  ratio to the best plain httpx (target >= 1.0x)",
        [f"{plain[n]:.2f}x" for n in ASYNC_IN_FLIGHT],
    )
    worst_fast, worst_plain = min(fast.values()), min(plain.values())
    ok = worst_fast >= 0.6 and worst_plain >= 1.0
    print(
        f"    {'worst ratios':<62}aiohttp driver {worst_fast:.2f}x (>= 0.6x), httpx driver "
        f"{worst_plain:.2f}x (>= 1.0x)   {'PASS' if ok else 'MISS'}"
    )
    RESULTS["e"] = {
        "title": "async requests per second at 50, 200 and 500 in flight",
        "rows": dict(rows),
        "ratio": round(worst_fast, 3),
        "target": ">= 0.6x raw aiohttp (aiohttp driver); >= 1.0x the best plain httpx (httpx driver)",
        "ok": ok,
        "measurements": {
            f"{config}@{n}": [{k: round(v, 1) for k, v in m.items()} for m in seen[(config, n)]]
            for (config, n) in seen
        },
    }


def profile_async(config: str, in_flight: int, total: int) -> None:
    """CPU per request of *config* and its costliest functions (cProfile), on a fresh loopback.

    Run with ``PYTHONPATH`` pointing at another tree to profile that one (the flux configurations
    then use its defaults).
    """
    import cProfile
    import io
    import pstats

    with loopback() as base:

        async def main() -> None:
            send, close = _async_sender(config, base)
            try:
                await _in_flight(send, max(2 * in_flight, 300), in_flight)
                rate, cpu = await _in_flight(send, total, in_flight)
                profile = cProfile.Profile()
                profile.enable()
                await _in_flight(send, total, in_flight)
                profile.disable()
            finally:
                await close()
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out)
            stats.sort_stats("tottime").print_stats(15)
            calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
            print(
                f"{config} at {in_flight} in flight: {rate:.0f} req/s, {cpu * 1e6:.0f} us CPU per "
                f"request unprofiled; {calls / total:.0f} Python calls per request"
            )
            print(out.getvalue())

        asyncio.run(main())


@contextmanager
def server_process(command: list[str], probe: str, **popen: Any) -> Iterator[str]:
    """*command* (given ``{port}``, a free port) in its own process: its root, once *probe* answers."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [part.replace("{port}", str(port)) for part in command]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, **popen) as server:
        root = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(f"{root}{probe}")
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        try:
            yield root
        finally:
            server.terminate()
            server.wait()


@contextmanager
def emulator_process(*arguments: str) -> Iterator[str]:
    """`flux-adapters emulate` in its own process (so rendering does not share our GIL)."""
    command = [sys.executable, "-m", "flux_adapters", "emulate", "--port", "{port}", *arguments]
    with server_process(command, "/files/none") as root:
        yield root


def bench_routing() -> None:
    request = EditRequest(prompt="a robot", model="flux-2-pro", size="64x64")
    os.environ.update(LAOZHANG_API_KEY=KEY, APIYI_API_KEY=KEY)
    with emulator_process() as root:
        os.environ.update(LAOZHANG_BASE_URL=f"{root}/laozhang", APIYI_BASE_URL=f"{root}/apiyi")
        with (
            FluxClient("laozhang") as single,
            FluxClient(providers=["laozhang", "apiyi"]) as routed,
        ):
            alone, routing = side_by_side(
                lambda: single.edit(request), lambda: routed.edit(request), 100, alternations=5
            )
    with emulator_process("--fault", "laozhang:503,delay=1") as root:
        os.environ.update(LAOZHANG_BASE_URL=f"{root}/laozhang", APIYI_BASE_URL=f"{root}/apiyi")
        # apiyi takes only ratios: let it send 64x64 as 1:1, the same request to both clients.
        both = EditRequest(
            prompt="a robot", model="flux-2-pro", size="64x64", allow_conversions=True
        )
        with FluxClient("apiyi") as healthy, FluxClient(providers=["laozhang", "apiyi"]) as routed:
            started = time.perf_counter()
            routed.edit(both)  # laozhang answers 503 after 1 s: its breaker opens
            first = time.perf_counter() - started
            healthy_s = per_call(lambda: healthy.edit(both), 30)
            open_s = per_call(lambda: routed.edit(both), 30)
    report(
        "f",
        "routing on the emulator (64x64 edits), per call",
        [
            ("single-provider FluxClient (laozhang)", f"{alone * 1000:.2f} ms"),
            ("FluxClient(providers=[laozhang, apiyi])", f"{routing * 1000:.2f} ms"),
            ("first provider down: the call that opens its breaker", f"{first:.2f} s"),
            ("  then, breaker open: failover client", f"{open_s * 1000:.2f} ms"),
            (
                "  vs a single-provider client on apiyi",
                f"{healthy_s * 1000:.2f} ms ({open_s / healthy_s:.2f}x)",
            ),
        ],
        routing / alone,
        "<= 1.10x; no call waits for the provider that is down",
        routing / alone <= 1.10 and open_s < 0.5,
    )


def _worst_parse(parse: Callable[[], object], runs: int = 5) -> float:
    """The slowest of *runs* parses (each must end in a typed error), in seconds."""
    from flux_adapters import errors

    times = []
    for _ in range(runs):
        started = time.perf_counter()
        outcome = parse()
        times.append(time.perf_counter() - started)
        assert isinstance(outcome, errors.FluxError), outcome
    return max(times)


def bench_hostile_answers() -> None:
    from flux_adapters import errors, get_adapter
    from flux_adapters.providers import Adapter
    from flux_adapters.wire import HttpResponse

    adapter = cast(Adapter, get_adapter("laozhang"))  # a one-call provider
    size = 1024 * 1024
    pages = {
        "unclosed <title": b"<html><head><title>" + b"x" * size,
        "1 MB of tags": b"<html><body>" + b"<div class='a'>" * (size // 15),
        "'<' never closed": b"<!DOCTYPE html>" + b"<a " * (size // 3),
    }
    deep = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def error_of(status: int, body: bytes) -> Callable[[], object]:
        return lambda: adapter.parse_error(
            HttpResponse(status_code=status, headers={}, content=body)
        )

    def answer_of(body: bytes) -> Callable[[], object]:
        def parse() -> object:
            try:
                return adapter.parse_response(
                    HttpResponse(status_code=200, headers={}, content=body)
                )
            except errors.FluxError as error:
                return error

        return parse

    html = {name: _worst_parse(error_of(502, page)) for name, page in pages.items()}
    deep_answer = _worst_parse(answer_of(deep))
    deep_error = _worst_parse(error_of(500, deep))
    worst = max([*html.values(), deep_answer, deep_error])
    rows = [(f"1 MB HTML error page, {name}", f"{t * 1000:.2f} ms") for name, t in html.items()]
    rows += [
        ("100,000-deep JSON as a 200 answer", f"{deep_answer * 1000:.2f} ms"),
        ("100,000-deep JSON as a 500 error body", f"{deep_error * 1000:.2f} ms"),
    ]
    report("g", "hostile answers parsed into typed errors, worst of 5 runs", rows,
           worst / 0.050, "each < 50 ms (ratio: worst / 50 ms)", worst < 0.050)  # fmt: skip


def one_exchange_per_call(base: str, calls: int) -> float:
    """Median seconds per `FluxClient.edit` at laozhang (run in a child: see `bench_baseline`)."""
    prompt = "A ruby red retro robot riding a yellow skateboard"
    with FluxClient("laozhang", api_key=KEY, base_url=f"{base}/laozhang") as client:
        return per_call(
            lambda: client.edit(EditRequest(prompt=prompt, model="flux-2-pro", size="1024x1024")),
            calls,
        )


def bench_baseline(base: str) -> None:
    ref = os.environ.get("FLUX_BENCH_BASELINE", BASELINE)
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "flux_adapters"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            print(f"\n(h) skipped: commit {ref} is not in this clone ({archive.stderr.decode()})")
            return
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        child = [sys.executable, str(HERE / "run.py"), "--one-exchange", base, "300"]

        def measure(path: str) -> float:
            environment = os.environ | {"PYTHONPATH": path}
            done = subprocess.run(child, env=environment, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the child measuring {path} failed:\n{done.stderr}")
            seconds, origin = done.stdout.split()
            assert Path(origin).is_relative_to(path), f"measured {origin}, not the tree at {path}"
            return float(seconds)

        before, now = [], []
        for _ in range(9):  # alternated, each in a fresh process, so drift hits both alike
            before.append(measure(old))
            now.append(measure(str(ROOT)))
    was, mine = statistics.median(before), statistics.median(now)
    report(
        "h",
        "one-exchange FluxClient.edit per call: before jobs vs now (median of 9 processes)",
        [
            (f"before jobs (commit {ref})", f"{was * 1e6:.0f} us"),
            ("this tree", f"{mine * 1e6:.0f} us"),
        ],
        mine / was,
        "<= 1.05x",
        mine / was <= 1.05,
    )


def bench_job(base: str) -> None:
    from flux_adapters.jobs import Polling  # here: the baseline's child imports this module

    prompt = "A ruby red retro robot riding a yellow skateboard"
    headers = {"x-key": KEY}
    immediate = Polling(first=0, longest=0, jitter=0)  # the server decides: 2 pending, then ready
    with (
        httpx.Client() as http,
        FluxClient("bfl", api_key=KEY, base_url=f"{base}/bfl", polling=immediate) as ours,
    ):

        def by_hand() -> object:
            submitted = http.post(
                f"{base}/bfl/v1/flux-2-pro",
                json={"prompt": prompt, "width": 1024, "height": 1024},
                headers=headers,
            )
            submitted.raise_for_status()
            polling_url = submitted.json()["polling_url"]
            while True:
                polled = http.get(polling_url, headers=headers)
                polled.raise_for_status()
                status = polled.json()
                if status["status"] == "Ready":
                    return status["result"]["sample"]

        def with_library() -> object:
            request = EditRequest(prompt=prompt, model="flux-2-pro", width=1024, height=1024)
            return ours.edit(request).images[0].url

        assert by_hand() == with_library()
        theirs, mine = side_by_side(by_hand, with_library, 100, alternations=9)
    report(
        "i",
        "a BFL job (submit + 3 polls) per call, no waits between polls",
        [
            ("httpx.Client: post, then get until Ready", f"{theirs * 1e6:.0f} us"),
            ("FluxClient('bfl').edit", f"{mine * 1e6:.0f} us"),
        ],
        mine / theirs,
        "<= 1.3x",
        mine / theirs <= 1.3,
    )


_BATCH_CHILD = """
import asyncio, io, json, os, sys, time
from pathlib import Path
mode, base, folder, jobs, concurrency = sys.argv[1:6]
jobs, folder = int(jobs), Path(folder)
fsyncs = []
real_fsync = os.fsync
def counted(fd):
    fsyncs.append(fd)
    real_fsync(fd)
os.fsync = counted
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
async def floor():
    import aiohttp
    body = {"model": "flux-2-pro", "prompt": "a robot", "n": 1, "size": "1024x1024"}
    headers = {"Authorization": "Bearer bench-key"}
    numbers = iter(range(jobs))
    connector = aiohttp.TCPConnector(limit=int(concurrency))
    async with aiohttp.ClientSession(connector=connector) as session:
        async def work():
            for number in numbers:
                url = base + "/laozhang/v1/images/generations"
                async with session.post(url, json=body, headers=headers) as response:
                    response.raise_for_status()
                    answer = await response.json()
                async with session.get(answer["data"][0]["url"]) as response:
                    response.raise_for_status()
                    data = await response.read()
                with open(folder / "out" / f"{number:06d}.png", "wb") as out:
                    out.write(data)
        await asyncio.gather(*(work() for _ in range(int(concurrency))))
if mode == "floor":
    (folder / "out").mkdir()
    started, cpu_started = time.perf_counter(), time.process_time()
    asyncio.run(floor())
else:
    os.environ.update(LAOZHANG_API_KEY="bench-key", LAOZHANG_BASE_URL=base + "/laozhang")
    from flux_adapters.cli import main
    out = io.StringIO()
    started, cpu_started = time.perf_counter(), time.process_time()
    code = main(
        ["batch", str(folder / "jobs.jsonl"), "-o", str(folder / "out"), "-p", "laozhang",
         "--concurrency", concurrency, "--per-provider", concurrency, "--json"],
        out, io.StringIO(),
    )
    summary = json.loads(out.getvalue())
    assert code == 0 and summary["saved"] + summary["already_saved"] == jobs, (code, summary)
elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(json.dumps(
    {"seconds": elapsed, "cpu": cpu, "fsyncs": len(fsyncs), "peak_mb": status_mb("VmHWM")}
))
"""


def batch_child(
    mode: str,
    base: str,
    jobs: int,
    concurrency: int = 8,
    under: str | None = None,
    times: int = 1,
) -> dict[str, float]:
    """One batch of *jobs* (`flux-adapters batch`, or the aiohttp floor) in a fresh process.

    Its files go in a temporary folder under *under* (default: the system's temporary folder).
    With *times*, the batch is run that many times into the same folder, each in a fresh
    process (a rerun finds every job saved); the last run is measured.
    """
    with tempfile.TemporaryDirectory(dir=under) as scratch:
        lines = (
            json.dumps({"id": f"job-{n:06d}", "prompt": f"a robot, take {n}", "size": "1024x1024"})
            for n in range(jobs)
        )
        (Path(scratch) / "jobs.jsonl").write_text("\n".join(lines) + "\n")
        child = [sys.executable, "-c", _BATCH_CHILD, mode, base, scratch, str(jobs)]
        for _ in range(times):
            done = subprocess.run(
                [*child, str(concurrency)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"the {mode} batch child failed:\n{done.stderr}")
        return cast(dict[str, float], json.loads(done.stdout))


RAM_DISK: Final = "/dev/shm"
"""Where (j) measures again with no disk: creating a file on this VM's disk costs 30 to 1,000 us
(ext4 looking for an inode not deleted just before), alike for both sides, and swamps the rest."""


def bench_batch(base: str) -> None:
    jobs = 10_000
    places: dict[str, str | None] = {"disk": None}
    if os.path.isdir(RAM_DISK) and os.access(RAM_DISK, os.W_OK):
        places["RAM disk"] = RAM_DISK
    runs: dict[tuple[str, str], list[dict[str, float]]] = {
        (place, mode): [] for place in places for mode in ("floor", "cli")
    }
    for _ in range(3):  # alternated, each in a fresh process, so drift hits both alike
        for place, under in places.items():
            # Both sides in one parent folder: ext4 puts a folder's subfolders in its own block
            # group, and on this VM creating a file costs 20 us in one group and 600 us in the
            # next; two folders made apart in /tmp can land in either.
            with tempfile.TemporaryDirectory(dir=under) as parent:
                for mode in ("floor", "cli"):
                    runs[place, mode].append(batch_child(mode, base, jobs, under=parent))

    def per_job(place: str, mode: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[place, mode]) / jobs

    def line(place: str, mode: str) -> str:
        wall, cpu = per_job(place, mode, "seconds"), per_job(place, mode, "cpu")
        return f"{wall * 1e6:.0f} us ({cpu * 1e6:.0f} us of CPU)"

    rows = [
        ("floor: aiohttp POST + GET + write the file", line("disk", "floor")),
        ("flux-adapters batch jobs.jsonl -o out/", line("disk", "cli")),
        ("  fsyncs per job", f"{per_job('disk', 'cli', 'fsyncs'):.3f}"),
    ]
    if "RAM disk" in places:
        ratio = per_job("RAM disk", "cli", "seconds") / per_job("RAM disk", "floor", "seconds")
        rows += [
            (f"floor, files on {RAM_DISK}", line("RAM disk", "floor")),
            (f"flux-adapters batch, files on {RAM_DISK}", line("RAM disk", "cli")),
            (f"  ratio on {RAM_DISK}", f"{ratio:.2f}x"),
        ]
    mine = per_job("disk", "cli", "seconds") / per_job("disk", "floor", "seconds")
    report(
        "j",
        f"batch of {jobs:,} jobs (journal on, 8 in flight), per job, fresh process each, median of 3",
        rows,
        mine,
        "<= 1.3x",
        mine <= 1.3,
    )


def bench_batch_memory(base: str) -> None:
    small, large = (batch_child("cli", base, jobs)["peak_mb"] for jobs in (1_000, 100_000))
    # A rerun holds what the journal knew of each job of the first run until it comes up.
    again = batch_child("cli", base, 100_000, times=2)["peak_mb"]
    report(
        "k",
        "peak RSS of flux-adapters batch, fresh process each",
        [
            ("1,000 jobs", f"{small:.1f} MB"),
            ("100,000 jobs", f"{large:.1f} MB ({large - small:+.1f} MB)"),
            ("100,000 jobs again (every one saved)", f"{again:.1f} MB ({again - small:+.1f} MB)"),
        ],
        large / small,
        "<= +10 MB",
        large - small <= 10,
    )


@contextmanager
def gateway_process(emulator_root: str, folder: Path) -> Iterator[tuple[str, str]]:
    """`flux-adapters serve` in its own process, fronting laozhang on *emulator_root*.

    Yields its root URL and a gateway key (no budget, no rate limit: the checks a key with
    them adds are in-process dictionary work).
    """
    env = {
        **os.environ,
        "FLUX_PROVIDERS": "laozhang",
        "LAOZHANG_API_KEY": KEY,
        "LAOZHANG_BASE_URL": f"{emulator_root}/laozhang",
        "FLUX_GATEWAY_KEYS": str(folder / "keys.json"),
    }
    env.pop("FLUX_CONFIG", None)
    made = subprocess.run(
        [sys.executable, "-m", "flux_adapters", "keys", "create"],
        env=env, cwd=folder, capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = made.stdout.splitlines()[0]
    command = [sys.executable, "-m", "flux_adapters", "serve", "--port", "{port}",
               "--files-dir", str(folder / "files")]  # fmt: skip
    with server_process(
        command, "/healthz", env=env, cwd=folder, stderr=subprocess.DEVNULL
    ) as root:
        yield root, key


def hand_gateway_process(
    emulator_root: str, folder: Path, key: str, *flags: str
) -> AbstractContextManager[str]:
    """benchmarks/hand_gateway.py (the baseline of (m)) in its own process: its root URL."""
    command = [sys.executable, str(HERE / "hand_gateway.py"), emulator_root, "{port}",
               str(folder), key, *flags]  # fmt: skip
    return server_process(command, "/healthz")


def bench_gateway_overhead(calls: int = 400) -> None:
    import random

    body = {"model": "flux-2-pro", "prompt": "a robot", "width": 64, "height": 64}
    with (
        tempfile.TemporaryDirectory() as scratch,
        emulator_process() as emulator,
        gateway_process(emulator, Path(scratch)) as (gateway, key),
        hand_gateway_process(emulator, Path(scratch) / "hand", key) as hand,
        hand_gateway_process(emulator, Path(scratch) / "overlap", key, "--overlap") as overlap,
        httpx.Client() as client,
    ):

        def call(url: str, key: str) -> tuple[float, float]:
            started = time.perf_counter()
            answer = client.post(url, json=body, headers={"authorization": f"Bearer {key}"})
            posted = time.perf_counter()
            assert answer.status_code == 200, answer.text
            image = client.get(answer.json()["data"][0]["url"])
            assert image.status_code == 200
            return posted - started, time.perf_counter() - started

        ways = {
            "direct": (f"{emulator}/laozhang/v1/images/generations", KEY),
            "gateway": (f"{gateway}/v1/images/generations", key),
            "hand": (f"{hand}/v1/images/generations", key),
            "overlap": (f"{overlap}/v1/images/generations", key),
        }
        order = list(ways)
        rounds: list[dict[str, tuple[float, float]]] = []
        for n in range(20 + calls):  # 20 warm-up rounds: connections, first renders, imports
            random.shuffle(order)  # each round in a new order: no way always follows another
            times = {way: call(*ways[way]) for way in order}
            if n >= 20:
                rounds.append(times)

    def median(way: str, part: int) -> float:
        return statistics.median(r[way][part] for r in rounds)

    def added(way: str) -> list[float]:
        return [r[way][1] - r["direct"][1] for r in rounds]

    def shown(way: str) -> str:
        values = added(way)
        quartiles = statistics.quantiles(values, n=4)
        return (
            f"{statistics.median(values) * 1000:.2f} ms "
            f"({quartiles[0] * 1000:.2f} .. {quartiles[2] * 1000:.2f})"
        )

    gateway_added = statistics.median(added("gateway"))
    hand_added = statistics.median(added("hand"))
    report(
        "m",
        f"gateway overhead per call (64x64 text-to-image at laozhang, {calls} rounds, "
        "each in a random order)",
        [
            ("POST to the emulator (median)", f"{median('direct', 0) * 1000:.2f} ms"),
            ("POST to the gateway (median; it keeps the image)", f"{median('gateway', 0) * 1000:.2f} ms"),
            ("POST + GET image, emulator directly (median)", f"{median('direct', 1) * 1000:.2f} ms"),
            ("POST + GET image, through the gateway (median)", f"{median('gateway', 1) * 1000:.2f} ms"),
            ("added by the gateway, paired median (quartiles)", shown("gateway")),
            ("added by a hand-written aiohttp gateway, same work", shown("hand")),
            ("  the gateway's added time / the hand-written one's", f"{gateway_added / hand_added:.2f}x"),
            ("added by the hand-written one answering before it downloads", shown("overlap")),
        ],
        median("gateway", 1) / median("direct", 1),
        "<= 1.5 ms added at the median",
        gateway_added <= 0.0015,
    )  # fmt: skip


async def _hammer(url: str, headers: dict[str, str], clients: int, total: int) -> float:
    """Requests per second of *clients* concurrent aiohttp clients sending *total* POSTs."""
    import aiohttp

    body = {"model": "flux-2-pro", "prompt": "a robot", "width": 64, "height": 64}
    left = total
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, json=body, headers=headers) as answer:
                    assert answer.status == 200, await answer.text()
                    await answer.read()

        await asyncio.gather(*(one_client() for _ in range(min(clients, 20))))  # warm-up
        left = total
        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return total / (time.perf_counter() - started)


def bench_gateway_throughput(total: int = 2000) -> None:
    rows: list[tuple[str, str]] = []
    ratios = []
    with (
        tempfile.TemporaryDirectory() as scratch,
        emulator_process() as emulator,
        gateway_process(emulator, Path(scratch)) as (gateway, key),
    ):
        for clients in (50, 200):
            direct = asyncio.run(
                _hammer(
                    f"{emulator}/laozhang/v1/images/generations",
                    {"authorization": f"Bearer {KEY}"},
                    clients,
                    total,
                )
            )
            via = asyncio.run(
                _hammer(
                    f"{gateway}/v1/images/generations",
                    {"authorization": f"Bearer {key}"},
                    clients,
                    total,
                )
            )
            ratios.append(via / direct)
            rows.append((f"{clients} clients: emulator directly", f"{direct:.0f} req/s"))
            rows.append((f"{clients} clients: through the gateway", f"{via:.0f} req/s"))
    report(
        "n",
        f"gateway throughput, {total} text-to-image calls (64x64) per measurement",
        rows,
        min(ratios),
        "reported (no target in the issue)",
        True,
    )


def _redis_cpu(raw: Any) -> float:
    """CPU seconds the redis-server has used so far (user + system)."""
    cpu = raw.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _interleaved_pair(
    first: Callable[[], object], second: Callable[[], object], batch: int, batches: int
) -> tuple[list[float], list[float]]:
    """Seconds per call of *first* and *second*, in alternating batches (drift hits both)."""
    a: list[float] = []
    b: list[float] = []
    first()
    second()
    for _ in range(batches):
        for function, out in ((first, a), (second, b)):
            started = time.perf_counter()
            for _ in range(batch):
                function()
            out.append((time.perf_counter() - started) / batch)
    return a, b


def _spread(values: list[float]) -> str:
    """Median and range, in microseconds."""
    return (
        f"{statistics.median(values) * 1e6:.0f} us "
        f"({min(values) * 1e6:.0f}..{max(values) * 1e6:.0f})"
    )


def bench_shared_state(base: str) -> None:
    """(l) What keeping cooldowns (and a budget) in Redis adds to a call, vs in-process."""
    sys.path.insert(0, str(ROOT))
    from flux_adapters.prices import PerCall
    from tests.redis_server import redis_server

    providers: list[Any] = ["laozhang", "apiyi"]
    prices = {(p, "flux-2-pro"): PerCall(usd=0.0001) for p in providers}
    batches = int(os.environ.get("FLUX_BENCH_BATCHES", "21"))
    os.environ.update(LAOZHANG_API_KEY=KEY, APIYI_API_KEY=KEY)
    rows: list[tuple[str, str]] = []
    with redis_server() as server:
        raw: Any = server.client()
        # 1. On the emulator (64x64 images, as row f): what a call costs when a server works.
        small = EditRequest(prompt="a robot", model="flux-2-pro", size="64x64")
        with emulator_process() as root:
            os.environ.update(LAOZHANG_BASE_URL=f"{root}/laozhang", APIYI_BASE_URL=f"{root}/apiyi")
            with (
                FluxClient(providers=providers) as local,
                FluxClient(providers=providers, state=server.url) as shared,
            ):
                emu_local, emu_redis = _interleaved_pair(
                    lambda: local.edit(small), lambda: shared.edit(small), 20, batches
                )
        emulated = statistics.median(emu_redis) / statistics.median(emu_local)
        rows += [
            ("emulator: FluxClient, cooldowns in the client", _spread(emu_local)),
            (
                "emulator: FluxClient, state in Redis",
                f"{_spread(emu_redis)}  {emulated:.2f}x",
            ),
        ]
        # 2. On the loopback server (answers at once): the worst case for the ratio.
        request = EditRequest(prompt="a robot", model="flux-2-pro", size="1024x1024")
        os.environ.update(LAOZHANG_BASE_URL=f"{base}/laozhang", APIYI_BASE_URL=f"{base}/apiyi")
        with (
            FluxClient(providers=providers) as local,
            FluxClient(providers=providers, state=server.url) as shared,
            FluxClient(
                providers=providers, state=server.url, prices=prices, budget_usd=1e6
            ) as budget,
        ):
            loop_local, loop_redis = _interleaved_pair(
                lambda: local.edit(request), lambda: shared.edit(request), 50, batches
            )
            _, loop_budget = _interleaved_pair(
                lambda: local.edit(request), lambda: budget.edit(request), 50, batches // 2 + 1
            )
            # Stable measures: CPU per call, this process and the redis-server; round trips.
            cpu: dict[str, float] = {}
            for name, client in (("local", local), ("redis", shared), ("budget", budget)):
                server_before, started = _redis_cpu(raw), time.process_time()
                raw.config_resetstat()
                for _ in range(500):
                    client.edit(request)
                cpu[name] = (time.process_time() - started) / 500
                cpu[name + " server"] = (_redis_cpu(raw) - server_before) / 500
                stats = raw.info("commandstats")
                trips = sum(
                    v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
                )
                cpu[name + " trips"] = trips / 500
        loopback_ratio = statistics.median(loop_redis) / statistics.median(loop_local)

        async def async_pair() -> tuple[list[float], list[float]]:
            a_local: list[float] = []
            a_redis: list[float] = []
            async with (
                AsyncFluxClient(providers=providers) as mine,
                AsyncFluxClient(providers=providers, state=server.url) as theirs,
            ):
                await mine.edit(request)
                await theirs.edit(request)
                for _ in range(batches):
                    for client, out in ((mine, a_local), (theirs, a_redis)):
                        started = time.perf_counter()
                        for _ in range(50):
                            await client.edit(request)
                        out.append((time.perf_counter() - started) / 50)
            return a_local, a_redis

        async_local, async_redis = asyncio.run(async_pair())
        raw.close()
    async_ratio = statistics.median(async_redis) / statistics.median(async_local)
    rows += [
        ("loopback: FluxClient, cooldowns in the client", _spread(loop_local)),
        ("loopback: FluxClient, state in Redis", f"{_spread(loop_redis)}  {loopback_ratio:.2f}x"),
        (
            "loopback: FluxClient, Redis + budget_usd",
            f"{_spread(loop_budget)}  "
            f"{statistics.median(loop_budget) / statistics.median(loop_local):.2f}x",
        ),
        ("loopback: AsyncFluxClient, cooldowns in the client", _spread(async_local)),
        (
            "loopback: AsyncFluxClient, state in Redis",
            f"{_spread(async_redis)}  {async_ratio:.2f}x",
        ),
        (
            "CPU per call, client (in-process / Redis / +budget)",
            f"{cpu['local'] * 1e6:.0f} / {cpu['redis'] * 1e6:.0f} / {cpu['budget'] * 1e6:.0f} us",
        ),
        (
            "CPU per call, redis-server (Redis / +budget)",
            f"{cpu['redis server'] * 1e6:.0f} / {cpu['budget server'] * 1e6:.0f} us",
        ),
        (
            "Redis round trips per call (Redis / +budget)",
            f"{cpu['redis trips']:.2f} / {cpu['budget trips']:.2f}",
        ),
    ]
    report(
        "l",
        "Redis-backed routing vs in-process, per call (two providers; median, range)",
        rows,
        emulated,
        "<= 1.3x per call (emulator); loopback shown beside",
        emulated <= 1.3,
    )


_ROWS: Final[dict[str, Callable[[str, Path], None]]] = {
    "a": lambda base, _: bench_import(base),
    "b": lambda base, _: bench_text_to_image(base),
    "c": bench_three_images,
    "d": bench_big_images,
    "e": lambda base, _: bench_async(base),
    "f": lambda _, __: bench_routing(),
    "g": lambda _, __: bench_hostile_answers(),
    "h": lambda base, _: bench_baseline(base),
    "i": lambda base, _: bench_job(base),
    "j": lambda base, _: bench_batch(base),
    "k": lambda base, _: bench_batch_memory(base),
    "l": lambda base, _: bench_shared_state(base),
    "m": lambda _, __: bench_gateway_overhead(),
    "n": lambda _, __: bench_gateway_throughput(),
}
"""Each row of the docstring: its run, given the loopback server's URL and a scratch folder."""


def main(selected: list[str]) -> int:
    if selected[:1] == ["--one-exchange"]:  # the child of bench_baseline
        import flux_adapters

        print(one_exchange_per_call(selected[1], int(selected[2])), flux_adapters.__file__)
        return 0
    if selected[:1] == ["--async-child"]:  # a measurement of bench_async
        config, in_flight, total, base = selected[1:5]
        print(json.dumps(async_child(config, int(in_flight), int(total), base)))
        return 0
    if selected[:1] == ["--profile-async"]:  # CONFIG IN_FLIGHT [TOTAL]
        profile_async(selected[1], int(selected[2]), int(selected[3]) if selected[3:] else 3000)
        return 0
    chosen = selected or list(_ROWS)
    if chosen in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    unknown = [name for name in chosen if name not in _ROWS]
    if unknown:
        print(f"unknown rows: {' '.join(unknown)} (see --help)", file=sys.stderr)
        return 2
    print(f"python {sys.version.split()[0]}, httpx {httpx.__version__}, {os.cpu_count()} cores")
    with loopback() as base, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for key in chosen:
            _ROWS[key](base, folder)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(RESULTS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
