"""The baseline of row (m): a gateway written by hand, as small and fast as Python allows.

Run as ``python benchmarks/hand_gateway.py <emulator root> <port> <folder> <key> [--overlap]``.
It does the work `flux-adapters serve` does for a 64x64 text-to-image call at laozhang, and
nothing else: an aiohttp server on uvloop checks the caller's bearer key, POSTs the JSON body to
the emulator with one aiohttp session, downloads the result image, writes it to a new file in
*folder* and answers with its own link to it, which it then serves. No limits, no checks of the
image, no metrics, no logs, no failover, no typed errors.

With ``--overlap`` it answers as soon as the provider answered and downloads the image while the
client reads the answer (a fetch of the link waits for it): faster, but a download that fails
then fails the fetch, after a 200, where the gateway answers the POST itself with a 502
``result_not_kept``. It is measured to show what that choice would give, not as the baseline.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys

import aiohttp
import uvloop
from aiohttp import web


async def main(emulator: str, port: int, folder: str, key: str, overlap: bool) -> None:
    os.makedirs(folder, exist_ok=True)
    session = aiohttp.ClientSession()
    pending: dict[str, asyncio.Future[bytes]] = {}
    upstream = f"{emulator}/laozhang/v1/images/generations"
    provider_key = {"authorization": "Bearer bench-key"}

    async def keep(url: str, name: str) -> bytes:
        async with session.get(url) as answer:
            data = await answer.read()
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return data

    async def generations(request: web.Request) -> web.Response:
        if request.headers.get("authorization") != f"Bearer {key}":
            return web.json_response({"error": "bad key"}, status=401)
        async with session.post(upstream, json=await request.json(), headers=provider_key) as r:
            url = (await r.json())["data"][0]["url"]
        name = secrets.token_hex(16) + ".png"
        if overlap:
            pending[name] = asyncio.ensure_future(keep(url, name))
        else:
            await keep(url, name)
        link = f"http://127.0.0.1:{port}/v1/files/{name}"
        return web.json_response({"created": 0, "data": [{"url": link}]})

    async def files(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in pending:
            return web.Response(body=await pending.pop(name), content_type="image/png")
        with open(os.path.join(folder, name), "rb") as file:
            return web.Response(body=file.read(), content_type="image/png")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/v1/files/{name}", files)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    emulator, port, folder, key = sys.argv[1:5]
    uvloop.run(main(emulator, int(port), folder, key, "--overlap" in sys.argv[5:]))
