"""The CoAP load client of ``python -m testbed.bench coap``: one process, aiocoap, N in flight.

``python -m testbed.coap_load TARGET URI [--proxy] [--requests N | --seconds S] [--concurrency C]
[--rate R] [--records]`` sends GETs for ``URI`` to ``TARGET`` (HOST:PORT), ``C`` at a time
(one aiocoap client context per worker: aiocoap allows one CON in flight per remote and
context), paced at ``R`` requests/s in total when given, and prints one JSON object: counts,
requests/s, latency percentiles in ms, and with ``--records`` ``[t, ok, payload, latency_ms]`` per
request.
``--proxy`` sends the forward-proxy form (Proxy-Scheme + Uri-Host from URI). Every loop is
bounded by ``--requests`` or ``--seconds`` (and a 5 s timeout per request). Each worker
resolves TARGET once and reuses the address (aiocoap would run getaddrinfo in a thread for
every request, which made the client the slowest part of the direct path);
``cpu_ms_per_request`` is this process's CPU per request, to see whether the client limits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import aiocoap

REQUEST_TIMEOUT_S = 5.0


def _message(args: argparse.Namespace, remote: Any = None) -> aiocoap.Message:
    msg = aiocoap.Message(code=aiocoap.GET, uri=args.uri)
    if args.proxy:  # aiocoap leaves Uri-Host out for an IP literal; a forward proxy needs it
        msg.opt.proxy_scheme = "coap"
        host, _, port = args.uri.split("//", 1)[1].split("/", 1)[0].rpartition(":")
        msg.opt.uri_host, msg.opt.uri_port = host, int(port)
    if remote is None:
        msg.unresolved_remote = args.target
    else:
        msg.remote = remote  # resolved by this worker's first request
    return msg


async def _worker(
    args: argparse.Namespace, state: dict[str, Any], start: float, interval: float
) -> None:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    remote = None
    try:
        while True:
            now = time.monotonic() - start
            if state["issued"] >= args.requests or now >= args.seconds:
                return
            slot = state["issued"]
            state["issued"] += 1
            if interval:
                await asyncio.sleep(max(0.0, slot * interval - now))
            t0 = time.monotonic()
            ok, payload = False, b""
            try:
                request = _message(args, remote)
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    response = await ctx.request(request).response
                ok, payload = response.code.is_successful(), response.payload
                remote = request.remote if hasattr(request.remote, "interface") else None
            except (TimeoutError, aiocoap.error.Error, OSError):
                pass
            latency = time.monotonic() - t0
            state["lat"].append(latency)
            state["ok" if ok else "failed"] += 1
            if args.records:
                state["records"].append(
                    [round(t0 - start, 4), ok, payload.decode(errors="replace"), round(latency * 1000, 3)]
                )
    finally:
        await ctx.shutdown()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    state: dict[str, Any] = {"issued": 0, "ok": 0, "failed": 0, "lat": [], "records": []}
    interval = 1.0 / args.rate if args.rate else 0.0
    print("started", file=sys.stderr, flush=True)
    start, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(_worker(args, state, start, interval) for _ in range(args.concurrency)))
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
    lat = sorted(state["lat"]) or [0.0]
    result = {
        "ok": state["ok"],
        "failed": state["failed"],
        "seconds": round(elapsed, 3),
        "rps": round(state["ok"] / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(statistics.median(lat) * 1000, 3),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3),
        "cpu_ms_per_request": round(cpu * 1000 / max(1, len(state["lat"])), 3),
    }
    if args.records:
        result["records"] = state["records"]
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m testbed.coap_load")
    p.add_argument("target")
    p.add_argument("uri")
    p.add_argument("--proxy", action="store_true")
    p.add_argument("--requests", type=int, default=10**9)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--records", action="store_true")
    args = p.parse_args(argv)
    args.seconds = min(args.seconds, 3600.0)
    return args


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse()))))
