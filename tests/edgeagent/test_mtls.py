"""Mutual TLS for the agent channel: real handshakes on loopback between provisioned state dirs."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from edgeagent import mtls, onboarding
from edgeagent.errors import ConfigError


def _now() -> dt.datetime:
    """The wall clock now (not at import: a long suite outlives the 5-minute backdating)."""
    return dt.datetime.now(dt.UTC)


def _member(ca: onboarding.ClusterCA, root: Path, name: str) -> tuple[mtls.ChannelTls, str]:
    state = root / name
    identity = onboarding.provision_member(ca, state, name)
    return mtls.load_channel_tls(state, _now()), identity.node_id


@pytest.fixture
def mesh(tmp_path: Path) -> dict[str, tuple[mtls.ChannelTls, str]]:
    ca = onboarding.create_cluster(tmp_path / "a", "a", "site")
    other = onboarding.new_ca("elsewhere")
    return {
        "a": (mtls.load_channel_tls(tmp_path / "a", _now()), _identity_id(tmp_path / "a")),
        "b": _member(ca, tmp_path, "b"),
        "x": _member(other, tmp_path, "x"),  # a node of another cluster's CA
    }


def _identity_id(state: Path) -> str:
    from edgeagent.persist import load_or_create_identity

    return load_or_create_identity(state, "a").node_id


async def _handshake(
    server: mtls.ChannelTls, client: mtls.ChannelTls, now: dt.datetime | None = None
) -> tuple[object, object, object]:
    """One TLS connection: (what the server saw, what the client saw, the reply the client read).

    Each "saw" is a verified identity, an error, or None when that side never got that far.
    """
    when = now if now is not None else _now()
    seen: dict[str, object] = {}
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen["server"] = mtls.peer_identity(
                writer.get_extra_info("ssl_object"), server.ca_cert, when
            )
            writer.write(b"ok")
            await writer.drain()
        except mtls.PeerRefused as exc:
            seen["server"] = exc
        finally:
            writer.close()
            done.set()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server.server)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client.client)
        seen["client"] = mtls.peer_identity(
            writer.get_extra_info("ssl_object"), client.ca_cert, when
        )
        seen["reply"] = await reader.read(2)  # a server-side refusal surfaces here (TLS 1.3)
        writer.close()
        if seen["reply"] == b"ok":
            await asyncio.wait_for(done.wait(), 5)
    except (
        OSError,
        asyncio.IncompleteReadError,
        mtls.PeerRefused,
    ) as exc:  # SSLError is an OSError
        seen.setdefault("client", exc)
        await asyncio.sleep(0.05)
    finally:
        srv.close()
        await srv.wait_closed()
    return seen.get("server"), seen.get("client"), seen.get("reply")


def test_members_of_one_ca_authenticate_each_other(
    mesh: dict[str, tuple[mtls.ChannelTls, str]],
) -> None:
    (a, a_id), (b, b_id) = mesh["a"], mesh["b"]
    server_saw, client_saw, reply = asyncio.run(_handshake(a, b))
    assert reply == b"ok"
    assert isinstance(server_saw, mtls.pki.CertIdentity) and server_saw.node_id == b_id
    assert isinstance(client_saw, mtls.pki.CertIdentity) and client_saw.node_id == a_id
    mtls.check_peer(client_saw, "a", a_id)  # the member we dialled
    with pytest.raises(mtls.PeerRefused, match="node id"):
        mtls.check_peer(client_saw, "a", b_id)
    with pytest.raises(mtls.PeerRefused, match="names 'a'"):
        mtls.check_peer(client_saw, "b", None)


def test_certificate_from_another_ca_is_refused_both_ways(
    mesh: dict[str, tuple[mtls.ChannelTls, str]],
) -> None:
    (a, _), (x, _) = mesh["a"], mesh["x"]
    server_saw, _, reply = asyncio.run(_handshake(a, x))  # x dials a: a refuses x's certificate
    assert server_saw is None and reply != b"ok"
    server_saw, client_saw, reply = asyncio.run(_handshake(x, a))  # a dials x: refuses x's cert
    assert isinstance(client_saw, OSError) and reply is None
    assert "certificate verify failed" in str(client_saw)


def test_client_without_certificate_is_refused(
    mesh: dict[str, tuple[mtls.ChannelTls, str]],
) -> None:
    import ssl

    a, _ = mesh["a"]
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    anonymous = mtls.ChannelTls(a.server, bare, a.ca_cert, a.own)
    server_saw, _, reply = asyncio.run(_handshake(a, anonymous))
    assert server_saw is None and reply != b"ok"  # the server never accepted the connection


def test_validity_is_judged_by_the_agents_clock_not_openssls(
    mesh: dict[str, tuple[mtls.ChannelTls, str]],
) -> None:
    (a, _), (b, _) = mesh["a"], mesh["b"]
    later = _now() + dt.timedelta(days=400)  # past the node certificates' one-year validity
    server_saw, client_saw, _ = asyncio.run(_handshake(a, b, later))
    assert isinstance(server_saw, mtls.PeerRefused) and "expired" in str(server_saw)
    assert isinstance(client_saw, mtls.PeerRefused) and "expired" in str(client_saw)


def test_missing_material_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node.crt.*missing.*edgeagent join"):
        mtls.load_channel_tls(tmp_path, _now())
