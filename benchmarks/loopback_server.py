"""A minimal HTTP/1.1 server for the benchmarks: keep-alive, bodies read and discarded in chunks.

Run as ``python benchmarks/loopback_server.py``; it prints its port on the first line of stdout
and answers every POST with an OpenAI-style image answer whose URL is its own ``/result.png``,
a GET of a path ending in ``.png`` with a small PNG image (64x64, so that a batch can download
and save it), and any other GET with a tiny body. Under ``/bfl/`` it answers as Black Forest
Labs does: a POST takes a job (``{"id", "polling_url"}``) and ``GET /bfl/v1/get_result?id=N``
answers ``Pending`` twice, then ``Ready``. It runs in its own process so that its CPU and
memory are not counted against the client being measured.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import sys
import zlib
from collections import Counter


def png(width: int, height: int) -> bytes:
    """A valid grey PNG image (8-bit greyscale), written by hand: no Pillow in this process."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    rows = b"".join(b"\0" + bytes([128]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


IMAGE = png(64, 64)
ANSWERS: dict[str, bytes] = {}


def answer(host: str) -> bytes:
    """An OpenAI-style image answer whose URL is this server's ``/result.png``."""
    if host not in ANSWERS:
        url = f"http://{host}/result.png"
        ANSWERS[host] = json.dumps({"created": 1, "data": [{"url": url}]}).encode()
    return ANSWERS[host]


CHUNK = 1024 * 1024
PENDING_POLLS = 2
JOB_IDS = itertools.count()
POLLS: Counter[str] = Counter()


def bfl(method: str, target: str, host: str) -> bytes:
    """BFL's answers: a job for a POST, its status for a poll (``Ready`` on the third)."""
    if method == "POST":
        job = str(next(JOB_IDS))
        url = f"http://{host}/bfl/v1/get_result?id={job}"
        answer = {"id": job, "polling_url": url, "cost": 3.0, "input_mp": 0.0, "output_mp": 1.0}
        return json.dumps(answer).encode()
    job = target.rpartition("id=")[2]
    POLLS[job] += 1
    if POLLS[job] <= PENDING_POLLS:
        return json.dumps({"id": job, "status": "Pending", "result": None}).encode()
    del POLLS[job]
    sample = "http://127.0.0.1/result.png"
    return json.dumps({"id": job, "status": "Ready", "result": {"sample": sample}}).encode()


async def discard(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        chunk = await reader.read(min(CHUNK, length))
        if not chunk:
            raise ConnectionError("client closed mid-body")
        length -= len(chunk)


async def discard_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        await discard(reader, size + 2)
        if size == 0:
            return


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            if headers.get("transfer-encoding", "").lower() == "chunked":
                await discard_chunked(reader)
            else:
                await discard(reader, int(headers.get("content-length", "0")))
            method, target, _ = lines[0].split(" ", 2)
            if target.startswith("/bfl/"):
                body = bfl(method, target, headers.get("host", ""))
            elif method == "POST":
                body = answer(headers.get("host", "127.0.0.1"))
            else:
                body = IMAGE if target.endswith(".png") else b"ok"
            kind = b"image/png" if body is IMAGE else b"application/json"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: "
                + kind
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=CHUNK, backlog=512)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
