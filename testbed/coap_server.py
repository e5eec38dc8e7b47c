"""A plain aiocoap server for the CoAP mesh tests and benchmarks: ``python -m testbed.coap_server HOST PORT NAME``.

Resources: ``/temp`` (GET: NAME as text/plain with ETag NAME; POST: the payload reversed,
2.04; PUT: 2.04 echoing Content-Format; DELETE: 2.02; FETCH: 2.05 with the payload), ``/big``
(GET: 3000 bytes, served block-wise by aiocoap), ``/upload`` (POST, block-wise: ``NAME:LENGTH``), ``/slow`` (GET after 0.3 s),
``/obs`` (observable, RFC 7641: ``NAME:N``, a notification every :data:`OBS_INTERVAL_S` while
anyone observes), and for the tests two counters that are not counted themselves:
``/observers`` (how many observe ``/obs`` now) and ``/hits`` (requests to every other path).
It prints ``ready`` on stdout once bound.

``--delay-ms MS`` makes GET ``/temp`` answer MS late (a slower instance for the balancer).
``--max-age S`` gives ``/obs``'s responses and notifications Max-Age S (default: none, so 60).
``--mdns LABEL`` also announces it as a plain LAN device would, with python-zeroconf on
HOST only: ``LABEL._coap._udp.local.`` at HOST:PORT (no TXT, so the service is LABEL).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import aiocoap
import aiocoap.resource as resource

BIG = bytes(range(256)) * 11 + bytes(184)  # 3000 bytes, a recognisable pattern
OBS_INTERVAL_S = 0.2
UNCOUNTED = (("hits",), ("observers",))


class Temp(resource.Resource):
    def __init__(self, name: str, delay_s: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.delay_s = delay_s

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return aiocoap.Message(
            payload=self.name.encode(), content_format=0, etag=self.name.encode()
        )

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED, payload=request.payload[::-1])

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        cf = request.opt.content_format
        return aiocoap.Message(code=aiocoap.CHANGED, payload=str(int(cf)).encode())

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.DELETED)

    async def render_fetch(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=request.payload)


class Big(resource.Resource):
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=BIG)


class Upload(resource.Resource):
    """POST (block-wise, reassembled by aiocoap): ``NAME:LENGTH`` of what arrived."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(
            code=aiocoap.CHANGED, payload=f"{self.name}:{len(request.payload)}".encode()
        )


class Slow(resource.Resource):
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        await asyncio.sleep(0.3)
        return aiocoap.Message(payload=b"slow")


class Obs(resource.ObservableResource):
    """``NAME:N``; N grows by one per notification, sent every OBS_INTERVAL_S while observed."""

    def __init__(self, name: str, max_age: int | None = None) -> None:
        super().__init__()
        self.name, self.n, self.max_age = name, 0, max_age
        self.ticker: asyncio.Task[None] | None = None

    def update_observation_count(self, count: int) -> None:
        if count and self.ticker is None:
            self.ticker = asyncio.ensure_future(self._tick())
        elif not count and self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(OBS_INTERVAL_S)
            self.n += 1
            self.updated_state()

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        msg = aiocoap.Message(payload=f"{self.name}:{self.n}".encode(), content_format=0)
        if self.max_age is not None:
            msg.opt.max_age = self.max_age
        return msg


class Count(resource.Resource):
    def __init__(self, value: Callable[[], int]) -> None:
        super().__init__()
        self.value = value

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=str(self.value()).encode())


class CountingSite(resource.Site):
    """Counts every request to a path outside UNCOUNTED."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    async def render_to_pipe(self, pipe: Any) -> None:
        if tuple(pipe.request.opt.uri_path) not in UNCOUNTED:
            self.hits += 1
        await super().render_to_pipe(pipe)


async def announce(host: str, port: int, label: str) -> Any:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    zc = AsyncZeroconf(interfaces=[host], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(
        "_coap._udp.local.",
        f"{label}._coap._udp.local.",
        port=port,
        server=f"{label}-device.local.",
        parsed_addresses=[host],
    )
    await (await zc.async_register_service(info))
    return zc


async def main(
    host: str,
    port: int,
    name: str,
    mdns: str | None = None,
    delay_ms: int = 0,
    max_age: int | None = None,
) -> None:
    root = CountingSite()
    obs = Obs(name, max_age)
    root.add_resource(["obs"], obs)
    root.add_resource(["observers"], Count(lambda: len(obs._observations)))
    root.add_resource(["hits"], Count(lambda: root.hits))
    root.add_resource(["temp"], Temp(name, delay_ms / 1000))
    root.add_resource(["big"], Big())
    root.add_resource(["slow"], Slow())
    root.add_resource(["upload"], Upload(name))
    if mdns is not None:  # first: announcing after binding, aiocoap lost its socket
        await announce(host, port, mdns)
    await aiocoap.Context.create_server_context(root, bind=(host, port), transports=["udp6"])
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    args = sys.argv[1:]
    label = args[args.index("--mdns") + 1] if "--mdns" in args else None
    delay = int(args[args.index("--delay-ms") + 1]) if "--delay-ms" in args else 0
    age = int(args[args.index("--max-age") + 1]) if "--max-age" in args else None
    asyncio.run(main(args[0], int(args[1]), args[2], label, delay, age))
