"""Dispatcher for ``python -m testbed.bench NAME ...`` (see package docstring)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from testbed.bench import UsageError

BENCHMARKS = {
    "gossip": "simulated SWIM/Lifeguard cluster: detection, false deaths, dissemination, bandwidth",
    "ipam": "overlay address allocation under partitions and churn (simulated)",
    "footprint": "RSS and CPU of one real agent in a 100-member cluster",
    "detection-real": "crash detection on real sockets in the network-namespace testbed (root)",
    "traffic": "bytes on the wire, CPU and RSS of N real agents started at once on loopback",
    "hostile": "one live agent under unauthenticated streams, held connections, undecryptable datagrams",
    "signing": "owner-signed state: sign / verify / receive cost per entry and the bytes it adds",
    "coap": "CoAP GETs direct, through an aiocoap ForwardProxy and through the mesh; soak RSS; failover",
    "mqtt": "MQTT messages/s and latency: one mosquitto, two bridged mosquittos, two agents; share groups; QoS 1 across a restart",
    "insider": "one live agent fed validly sealed hostile messages by a fuzzer holding the cluster key",
    "mqtt-broker": "the sans-IO MQTT broker core: publish, fan-out, $share, subscribe, session resume (µs)",
    "scaling": "dissemination and bandwidth against N (10..10000): the real core in the simulator (warm start, up to --core-max) and a Monte-Carlo protocol model, beside the analytic SWIM model",
    "policy": "signed policy from a local HTTPS endpoint to every node enforcing it: simulator N=1000, real agents N=20",
    "uplink": "MQTT uplink to a cloud mosquitto: holder SIGKILLed mid-stream (failover, QoS 1 lost), cloud outage (spool drain, order)",
    "all": "every benchmark at a small size; one Markdown page with tables and plots (--report DIR)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.bench", description="edgeagent benchmarks"
    )
    sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    modules = {}
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"testbed.bench.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name == f"testbed.bench.{name.replace('-', '_')}":
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        result = modules[args.bench].run(args)
    except UsageError as exc:
        print(f"python -m testbed.bench {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        width = max(len(k) for k in result)
        for key in sorted(result):
            print(f"{key:<{width}}  {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
