"""``edgeagent policy keygen|sign|verify|apply|status``: signed policy bundles (issue 11).

``keygen``, ``sign`` and ``verify`` are for operators and need no agent: an Ed25519 key pair
(private key PKCS#8 PEM, 0600; public key PEM), a signed envelope of a TOML or JSON bundle
(:mod:`overlay.policy` defines both), and the agent's own accept rule run against a public
key. ``verify`` exits 0 when the envelope would be accepted, 1 when it would be refused (the
reason on stderr), 2 for unreadable input. ``apply`` and ``status`` talk to the running agent
(control commands ``policy-apply``, ``policy-status``, served by
:mod:`edgeagent.features.policy`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.errors import UsageError

PRIVATE_NAME = "policy-signing.key"
PUBLIC_NAME = "policy-signing.pub"
POLICY_OFF = (
    "policy is off on this agent (or it is still starting): set [policy] trusted_keys in its config"
)
EXAMPLE = """example:
  edgeagent policy keygen --out ~/policy-keys
  edgeagent policy sign site.toml --key ~/policy-keys/policy-signing.key --out site.signed
  edgeagent policy verify site.signed --pubkey ~/policy-keys/policy-signing.pub
  # on each agent: [policy] trusted_keys = ["/etc/edgeagent/policy-signing.pub"]
  edgeagent policy apply site.signed
  edgeagent policy status
Raise 'version' in the bundle for every change: agents refuse any version not above the
highest they have applied, also after a restart."""
MAX_INPUT_BYTES = 1024 * 1024  # any file this command reads (bundles are at most 256 KiB)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "policy",
        help="signed policy bundles: keygen, sign, verify, apply, status",
        description=(
            "Policy bundles (TOML or JSON: version, issued, expires, intentions, splits,\n"
            "retries, timeouts, faults, rate_limits, mqtt) are signed with an operator's\n"
            "Ed25519 key; agents accept only bundles signed by a key in their [policy]\n"
            "trusted_keys with a version above the highest they have applied."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ops = parser.add_subparsers(dest="op", metavar="OP", required=True)
    p = ops.add_parser("keygen", help="write a new operator key pair",
                       description=f"Writes DIR/{PRIVATE_NAME} (0600) and DIR/{PUBLIC_NAME}.")  # fmt: skip
    p.add_argument(
        "--out", metavar="DIR", default=".", help="directory for the key files (default: .)"
    )
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p = ops.add_parser("sign", help="sign a bundle file (validated first)",
                       description="Prints (or writes) the signed envelope of a bundle file.")  # fmt: skip
    p.add_argument("file", metavar="FILE", help="the bundle (TOML or JSON)")
    p.add_argument("--key", metavar="PRIV", required=True, help="the private key file (keygen)")
    p.add_argument("--out", metavar="F", help="write the envelope here (default: stdout)")
    p = ops.add_parser("verify", help="check a signed envelope as an agent would",
                       description="Exit 0: would be accepted; 1: refused (reason on stderr); 2: bad input.")  # fmt: skip
    p.add_argument("file", metavar="FILE", help="the signed envelope (sign's output)")
    p.add_argument("--pubkey", metavar="PUB", required=True, action="append",
                   help="a trusted public key file, PEM or base64 (repeat for several)")  # fmt: skip
    p.add_argument("--high-water", metavar="N", type=int, default=0,
                   help="refuse versions not above N, as an agent that applied N (default: 0)")  # fmt: skip
    p = ops.add_parser("apply", help="hand a signed envelope to the running agent",
                       description="The agent checks it (signature, version, expiry) and applies it.")  # fmt: skip
    p.add_argument("file", metavar="FILE", help="the signed envelope")
    add_state_dir_argument(p)
    p = ops.add_parser("status", help="the agent's active policy version, source, refusals")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_state_dir_argument(p)
    parser.set_defaults(func=run)


def read_input(path: str, what: str) -> bytes:
    """The bytes of ``path`` (at most MAX_INPUT_BYTES); UsageError naming it otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{what} {path}: larger than {MAX_INPUT_BYTES} bytes")
    return data


def run(args: argparse.Namespace) -> int:
    from overlay.policy import PolicyError

    try:
        return int(_OPS[args.op](args))
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # writing a key or envelope
        raise UsageError(f"{exc.filename or args.op}: {exc.strerror}") from None


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgeagent.persist import atomic_write
    from overlay import policy

    out = Path(args.out)
    if not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    priv, pub = out / PRIVATE_NAME, out / PUBLIC_NAME
    for path in (priv, pub):
        if path.exists() and not args.force:
            raise UsageError(f"{path} exists (use --force to overwrite)")
    key = Ed25519PrivateKey.generate()
    atomic_write(priv, policy.private_pem(key), mode=0o600)
    atomic_write(pub, policy.public_pem(key.public_key()), mode=0o644)
    print(f"key id {policy.key_id(key.public_key())}: private {priv}, public {pub}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from overlay import policy

    key = policy.load_private_key(read_input(args.key, "--key"))
    envelope = policy.sign(read_input(args.file, "bundle"), key)
    if args.out:
        from edgeagent.persist import atomic_write

        atomic_write(args.out, envelope, mode=0o644)
    else:
        sys.stdout.write(envelope.decode())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from overlay import policy

    keys = [policy.load_public_key(read_input(p, "--pubkey")) for p in args.pubkey]
    decision = policy.decide(
        read_input(args.file, "envelope"), policy.trusted_keys(keys), args.high_water, time.time()
    )
    if not decision.accepted:
        print(f"edgeagent: refused: {decision.reason}: {decision.detail}", file=sys.stderr)
        return 1
    assert decision.bundle is not None
    print(f"valid: version {decision.bundle.version}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)
    read_input(path, "envelope")  # a missing file is the CLI's error, not the agent's
    result = _call(args, "policy-apply", path=path)
    if not result["accepted"]:
        print(f"edgeagent: refused: {result['reason']}: {result['detail']}", file=sys.stderr)
        return 1
    print(f"applied version {result['version']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    result = _call(args, "policy-status")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(render_status(result))
    return 0


def _call(args: argparse.Namespace, cmd: str, **request: Any) -> Any:
    try:
        return call_agent(state_dir_of(args), cmd, **request)
    except UsageError as exc:
        if "unknown command" in str(exc):
            raise UsageError(f"policy: {POLICY_OFF}") from None
        raise


def render_status(s: dict[str, Any]) -> str:
    version = "none" if s.get("version") is None else str(s["version"])
    synced = s.get("last_sync")
    ago = "never" if synced is None else f"{max(0.0, time.time() - synced):.0f}s ago"
    refusals = s.get("refusals", {})
    counts = ", ".join(f"{k} {v}" for k, v in sorted(refusals.items()) if v) or "none"
    lines = [
        f"active version: {version} (source: {s.get('source') or '-'})",
        f"high-water mark: {s.get('high_water', 0)}",
        f"last sync: {ago}",
        f"refusals: {counts}",
    ]
    if s.get("last_refusal"):
        lines.append(f"last refusal: {s['last_refusal']}")
    for name in ("cloud", "report"):
        part = s.get(name)
        if part:
            state = (
                "reachable" if part.get("reachable") else f"unreachable ({part.get('last_error')})"
            )
            lines.append(f"{name}: {part.get('url')} {state}")
    return "\n".join(lines)


_OPS = {"keygen": _keygen, "sign": _sign, "verify": _verify, "apply": _apply, "status": _status}
