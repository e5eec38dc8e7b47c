"""A plain aiocoap server for the CoAP mesh tests and benchmarks: ``python -m testbed.coap_server HOST PORT NAME``.

Resources: ``/temp`` (GET: NAME as text/plain with ETag NAME; POST: the payload reversed,
2.04; PUT: 2.04 echoing Content-Format; DELETE: 2.02; FETCH: 2.05 with the payload), ``/big``
(GET: 3000 bytes, served block-wise by aiocoap), ``/upload`` (POST, block-wise: ``NAME:LENGTH``), ``/slow`` (GET after 0.3 s). It prints
``ready`` on stdout once bound.
"""

from __future__ import annotations

import asyncio
import sys

import aiocoap
import aiocoap.resource as resource

BIG = bytes(range(256)) * 11 + bytes(184)  # 3000 bytes, a recognisable pattern


class Temp(resource.Resource):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
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


async def main(host: str, port: int, name: str) -> None:
    root = resource.Site()
    root.add_resource(["temp"], Temp(name))
    root.add_resource(["big"], Big())
    root.add_resource(["slow"], Slow())
    root.add_resource(["upload"], Upload(name))
    await aiocoap.Context.create_server_context(root, bind=(host, port), transports=["udp6"])
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
