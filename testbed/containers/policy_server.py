"""The container testbed's policy endpoint: one directory served over HTTPS (stdlib only).

    python policy_server.py --root DIR --cert server.pem --key server.key [--port 8443]

How it works. ``GET /NAME`` answers the file ``DIR/NAME`` (a plain name: no ``/``, no leading
``.``; anything else is 404) with an ``ETag`` (a hash of its bytes); ``If-None-Match`` with
that tag is 304, so an agent polling ``[policy] url`` re-reads nothing until the file changes.
The testbed publishes by replacing the file atomically (temp, rename), so a GET sees the old
bundle or the new one, never half of one. Files over :data:`MAX_FILE_BYTES` are 404 (the
agent would refuse them anyway). ``HEAD /`` is 200 (a liveness probe). Every other method is
405. One line on stdout, ``ready``, once it listens.

The file runs inside the node image (python 3.11 with no ``testbed/``): the testbed copies it
into the run dir, bind-mounted read-only at ``/policy`` in the ``policy`` service. Also used
on the host by the tests (``serve()``).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import ssl
import sys
import threading
from pathlib import Path

MAX_FILE_BYTES = 1 << 20
DEFAULT_PORT = 8443


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "edgeagent-testbed-policy/1"
    timeout = (
        10  # seconds a connection may stall (a handshake, a request line) before it is dropped
    )
    root = Path(".")

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        name = self.path.split("?", 1)[0].lstrip("/")
        path = self.root / name
        if not name or "/" in name or name.startswith(".") or not path.is_file():
            return self._plain(404)
        try:
            data = path.read_bytes()[: MAX_FILE_BYTES + 1]
        except OSError:
            return self._plain(404)
        if len(data) > MAX_FILE_BYTES:
            return self._plain(404)
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        if etag in {t.strip() for t in (self.headers.get("If-None-Match") or "").split(",")}:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return None
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
        self._plain(405)

    def _plain(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def make_server(root: Path, cert: Path, key: Path, host: str = "0.0.0.0", port: int = DEFAULT_PORT
                ) -> http.server.ThreadingHTTPServer:  # fmt: skip
    """An HTTPS server of ``root`` (not yet serving); ``port`` 0 picks a free one."""
    handler = type("RootHandler", (Handler,), {"root": Path(root)})
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
