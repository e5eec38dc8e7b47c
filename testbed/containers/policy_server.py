"""The container testbed's policy endpoint: one directory served over HTTPS (stdlib only).

    python policy_server.py --root DIR --cert server.pem --key server.key [--port 8443]

How it works. ``GET /NAME`` answers the file ``DIR/NAME`` (a plain name: no ``/``, no leading
``.``; anything else is 404) with an ``ETag`` (a hash of its bytes); ``If-None-Match`` with
that tag is 304, so an agent polling ``[policy] url`` re-reads nothing until the file changes.
The testbed publishes by replacing the file atomically (temp, rename), so a GET sees the old
bundle or the new one, never half of one. Files over :data:`MAX_FILE_BYTES` are 404 (the
agent would refuse them anyway). ``HEAD /`` is 200 (a liveness probe). Every other method is
405. One line on stdout, ``ready``, once it listens.

Reports. ``POST /report`` takes an agent's reported state (``[policy] report_url``,
:class:`edgeagent.policy_sync.Reporter`: a JSON object with a ``node`` name): the body must
have a ``Content-Length`` of at most :data:`MAX_REPORT_BYTES` (else 411 / 413: read and
dropped up to :data:`MAX_FILE_BYTES`, beyond that the connection is closed unread) and be
a JSON object whose ``node`` is a string of at most :data:`MAX_NODE_NAME` characters (else
400); the newest one per node is kept, in memory, for at most :data:`MAX_REPORTERS` nodes (a
new one beyond that is 503). 204 when kept. ``GET /reports`` answers them as JSON,
``{node: {"count": N, "last": REPORT}}`` (so ``reports`` is never a served file's name).
Every GET's status is counted too (:class:`State`: the last :data:`MAX_ANSWERS` and a total),
and the last :data:`MAX_RECENT` reports kept in arrival order, which the host-side users (the
tests, ``testbed.bench policy``: one handler for all three) read.

The file runs inside the node image (python 3.11 with no ``testbed/``): the testbed copies it
into the run dir, bind-mounted read-only at ``/policy`` in the ``policy`` service. Also used
on the host by the tests (``serve()``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import http.server
import json
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 1 << 20
DEFAULT_PORT = 8443
REPORT_PATH = "/report"
REPORTS_PATH = "/reports"
MAX_REPORT_BYTES = 64 * 1024  # an agent's report is well under 2 KiB
MAX_NODE_NAME = 256
MAX_REPORTERS = 1024
MAX_ANSWERS = 1000  # GET statuses remembered
MAX_RECENT = 100  # reports remembered in arrival order (over all nodes)


class State:
    """One server's counters and reports, shared by its handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: collections.deque[int] = collections.deque(maxlen=MAX_ANSWERS)
        self.gets = 0  # every GET of a file, ever
        self.reports: dict[str, dict[str, Any]] = {}  # node -> {"count", "last"}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_RECENT)

    def answered(self, status: int) -> None:
        with self.lock:
            self.answers.append(status)
            self.gets += 1

    def keep(self, node: str, report: dict[str, Any]) -> bool:
        """Keep ``node``'s newest report; False if it is a new node over the cap."""
        with self.lock:
            held = self.reports.get(node)
            if held is None:
                if len(self.reports) >= MAX_REPORTERS:
                    return False
                held = self.reports[node] = {"count": 0, "last": None}
            held["count"] += 1
            held["last"] = report
            self.recent.append(report)
            return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {node: dict(held) for node, held in self.reports.items()}


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "edgeagent-testbed-policy/1"
    timeout = (
        10  # seconds a connection may stall (a handshake, a request line) before it is dropped
    )
    root = Path(".")
    state = State()  # make_server gives each server its own

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.split("?", 1)[0] == REPORTS_PATH:
            return self._json(200, self.state.snapshot())
        name = self.path.split("?", 1)[0].lstrip("/")
        path = self.root / name
        if not name or "/" in name or name.startswith(".") or not path.is_file():
            return self._answer(404)
        try:
            data = path.read_bytes()[: MAX_FILE_BYTES + 1]
        except OSError:
            return self._answer(404)
        if len(data) > MAX_FILE_BYTES:
            return self._answer(404)
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        if etag in {t.strip() for t in (self.headers.get("If-None-Match") or "").split(",")}:
            self.state.answered(304)
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return None
        self.state.answered(200)
        self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return None

    def do_HEAD(self) -> None:  # noqa: N802
        self._plain(200 if self.path == "/" else 404)

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != REPORT_PATH:
            return self._plain(405, close=True)  # its body unread: the connection goes
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._plain(411, close=True)
        if int(length) > MAX_REPORT_BYTES:
            left = int(length) if int(length) <= MAX_FILE_BYTES else 0
            while left > 0:  # read and dropped, so the client sees the 413
                chunk = self.rfile.read(min(MAX_REPORT_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
            return self._plain(413, close=True)  # beyond that not read: the connection goes
        report = _report(self.rfile.read(int(length)))
        if report is None:
            return self._plain(400)
        return self._plain(204 if self.state.keep(report["node"], report) else 503)

    def _answer(self, status: int) -> None:
        self.state.answered(status)
        self._plain(status)

    def _plain(self, status: int, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def _json(self, status: int, doc: object) -> None:
        body = json.dumps(doc, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def _report(body: bytes) -> dict[str, Any] | None:
    """The report in ``body``: a JSON object with a short string ``node``; None otherwise."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(doc, dict):
        return None
    node = doc.get("node")
    if not isinstance(node, str) or not 0 < len(node) <= MAX_NODE_NAME:
        return None
    return doc


def make_server(root: Path, cert: Path, key: Path, host: str = "0.0.0.0", port: int = DEFAULT_PORT
                ) -> http.server.ThreadingHTTPServer:  # fmt: skip
    """An HTTPS server of ``root`` (not yet serving); ``port`` 0 picks a free one. Its
    :class:`State` is ``server.RequestHandlerClass.state``."""
    handler = type("RootHandler", (Handler,), {"root": Path(root), "state": State()})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    # the handshake on the handler's thread, not in the accept loop (a slow client stalls one)
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def serve(
    root: Path, cert: Path, key: Path, host: str = "127.0.0.1"
) -> http.server.ThreadingHTTPServer:
    """Start one in a daemon thread on a free port (tests); ``shutdown()`` stops it."""
    server = make_server(root, cert, key, host, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy_server", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    try:
        server = make_server(args.root, args.cert, args.key, port=args.port)
    except (OSError, ssl.SSLError) as exc:
        print(f"policy_server: cannot start: {exc}", file=sys.stderr)
        return 2
    print("ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
