"""Enrollment over real TLS 1.3 on 127.0.0.1: tokens, pins, proofs, and hostile frames."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import socket

import pytest

from edgeagent import enroll as en
from edgeagent.enroll import EnrollError, EnrollmentServer, enroll
from edgeagent.token_store import TokenStore
from overlay import pki
from overlay.tokens import JoinToken, make_proof

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ISSUER_ID = "a" * 32
JOINER_ID = "b" * 32
KEYS = [b"k" * 32, b"j" * 32]


class Clock:
    def __init__(self, now: dt.datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def _write_node(tmp_path, ca_key, ca_cert, name: str, node_id: str):
    key = pki.new_node_key()
    cert = pki.issue_node_cert(
        ca_key, ca_cert, pki.make_csr(key, name, node_id), name, node_id, NOW
    )
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(pki.cert_pem(cert))
    key_file.write_bytes(pki.key_pem(key))
    return cert_file, key_file


class Issuer:
    """A CA, an issuer's node certificate, a token store and a running server."""

    def __init__(self, tmp_path, *, tls_ca=None, **kwargs) -> None:
        self.ca_key, self.ca_cert = pki.create_ca("home", NOW - dt.timedelta(days=1))
        tls_key, tls_cert = tls_ca or (self.ca_key, self.ca_cert)
        cert_file, key_file = _write_node(tmp_path, tls_key, tls_cert, "issuer", ISSUER_ID)
        self.store = TokenStore(tmp_path)
        self.clock = Clock()
        self.server = EnrollmentServer(
            self.ca_key,
            self.ca_cert,
            cert_file,
            key_file,
            self.store,
            lambda: KEYS,
            "home",
            clock=self.clock,
            **kwargs,
        )
        self.addr: tuple[str, int] = ("127.0.0.1", 0)

    async def start(self) -> Issuer:
        self.addr = await self.server.start("127.0.0.1", 0)
        return self

    def token(self, **kwargs) -> JoinToken:
        return self.store.create(
            pki.ca_pin(self.ca_cert), [self.addr], self.clock().timestamp(), **kwargs
        )


@pytest.fixture
async def issuer(tmp_path):
    issuer = await Issuer(tmp_path).start()
    yield issuer
    await issuer.server.close()


async def _join(token: JoinToken, name: str = "pi-2", clock=None) -> en.Enrollment:
    return await enroll(token, name, JOINER_ID, pki.new_node_key(), clock=clock or Clock())


async def test_enrollment_gives_a_cert_of_the_ca_the_keyring_and_the_cluster(issuer) -> None:
    key = pki.new_node_key()
    got = await enroll(issuer.token(), "pi-2", JOINER_ID, key, clock=Clock())
    identity = pki.verify_node_cert(issuer.ca_cert, got.cert, NOW)
    assert (identity.name, identity.node_id) == ("pi-2", JOINER_ID)
    assert got.cert.public_key() == key.public_key()
    assert got.ca_cert == issuer.ca_cert
    assert (got.keys, got.cluster, got.issuer) == (tuple(KEYS), "home", issuer.addr)
    assert got.issuer_time == NOW.timestamp()
    assert issuer.server.counts["issued"] == 1


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ("expired", "refused:expired"),
        ("revoked", "refused:revoked"),
        ("used_up", "refused:used_up"),
        ("unknown", "refused:unknown"),
        ("forged", "refused:forged"),
    ],
)
async def test_bad_tokens_are_refused_with_their_reason(issuer, setup: str, code: str) -> None:
    token = issuer.token(uses=1)
    if setup == "expired":
        issuer.clock.now = NOW + dt.timedelta(days=2)
    elif setup == "revoked":
        issuer.store.revoke(token.token_id)
    elif setup == "used_up":
        await _join(token)
    elif setup == "unknown":
        token = JoinToken("zzzzzzzz", token.secret, token.ca_pin, token.addresses)
    elif setup == "forged":
        token = JoinToken(token.token_id, b"\x00" * 16, token.ca_pin, token.addresses)
    with pytest.raises(EnrollError) as info:
        await _join(token)
    assert info.value.code == code
    assert "\n" not in str(info.value)
    assert issuer.server.counts[code.removeprefix("refused:")] == 1


async def test_forged_proof_does_not_use_up_the_token(issuer) -> None:
    token = issuer.token(uses=1)
    forged = JoinToken(token.token_id, b"\x00" * 16, token.ca_pin, token.addresses)
    with pytest.raises(EnrollError):
        await _join(forged)
    await _join(token)


async def test_issuer_with_a_cert_of_another_ca_is_refused_by_the_joiner(tmp_path) -> None:
    other = pki.create_ca("home", NOW - dt.timedelta(days=1))
    issuer = await Issuer(tmp_path, tls_ca=other).start()
    try:
        with pytest.raises(EnrollError) as info:
            await _join(issuer.token())
        assert "issuer's TLS certificate" in str(info.value)
        assert issuer.server.counts["issued"] == 0
    finally:
        await issuer.server.close()


async def test_issuer_of_another_cluster_fails_the_pin(issuer) -> None:
    token = issuer.token()
    other_pin = pki.ca_pin(pki.create_ca("home", NOW)[1])
    with pytest.raises(EnrollError, match="not the one in the token") as info:
        await _join(JoinToken(token.token_id, token.secret, other_pin, token.addresses))
    assert "could not enroll" in str(info.value)  # a pin failure moves on, then gives up
    assert issuer.server.counts["issued"] == 0


async def _raw_exchange(addr, request: dict | bytes, token: JoinToken | None = None):
    """Speak the protocol by hand: hello, then ``request`` (a frame dict or raw bytes)."""
    reader, writer = await asyncio.open_connection(*addr, ssl=en.joiner_tls_context())
    try:
        leaf = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        await en.read_frame(reader)
        if isinstance(request, dict):
            if token is not None:
                request["proof"] = make_proof(token.secret, token.token_id, leaf, request["csr"])
            request = en.encode_frame(request)
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(en.read_frame(reader), 5)
    finally:
        writer.close()


async def test_a_request_for_another_name_than_the_csr_is_refused(issuer) -> None:
    token = issuer.token()
    csr = pki.csr_der(pki.make_csr(pki.new_node_key(), "pi-9", JOINER_ID))
    request = {"token": token.token_id, "csr": csr, "name": "pi-2", "node_id": JOINER_ID}
    reply = await _raw_exchange(issuer.addr, request, token)
    assert reply["ok"] is False and reply["code"] == "bad_request"
    assert "names another node" in reply["error"]
    assert issuer.store.lookup(token.token_id, NOW.timestamp()).used == 0


@pytest.mark.parametrize(
    "junk",
    [
        b"\xff\xff\xff\xff",  # announces 4 GiB
        b"\x00\x00\x00\x00",  # empty frame
        b"\x00\x00\x00\x03\x01\x02\x03",  # not a map
        en.encode_frame({"token": 1}),  # wrong field types
    ],
)
async def test_a_malformed_request_is_dropped_and_the_server_keeps_serving(issuer, junk) -> None:
    try:
        await _raw_exchange(issuer.addr, junk)
    except (en.FrameError, ConnectionError):
        pass
    assert issuer.server.counts["bad_frame"] == 1
    await _join(issuer.token())


async def test_a_malformed_frame_from_the_issuer_is_an_enroll_error(tmp_path, issuer) -> None:
    cert_file, key_file = _write_node(tmp_path, issuer.ca_key, issuer.ca_cert, "bad", ISSUER_ID)

    async def babble(reader, writer) -> None:
        writer.write(b"\x00\x00\x00\x05junk!")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        babble, "127.0.0.1", 0, ssl=en.server_tls_context(cert_file, key_file)
    )
    addr = server.sockets[0].getsockname()[:2]
    token = issuer.token()
    try:
        with pytest.raises(EnrollError, match="bad frame"):
            await _join(JoinToken(token.token_id, token.secret, token.ca_pin, (addr,)))
    finally:
        server.close()
        await server.wait_closed()


async def test_an_unreachable_address_is_skipped(issuer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[:2]
    token = issuer.token()
    token = JoinToken(token.token_id, token.secret, token.ca_pin, (closed, issuer.addr))
    assert (await _join(token)).issuer == issuer.addr


async def test_a_joiner_without_a_clock_still_enrolls(issuer) -> None:
    epoch = Clock(dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
    got = await _join(issuer.token(), clock=epoch)
    assert got.issuer_time == NOW.timestamp()


async def test_concurrent_enrollments_are_capped_and_slow_clients_time_out(tmp_path) -> None:
    issuer = await Issuer(tmp_path, max_concurrent=1, timeout_s=0.5).start()
    try:
        _, idle = await asyncio.open_connection(*issuer.addr)  # holds the slot, says nothing
        await asyncio.sleep(0.05)
        with pytest.raises(EnrollError):
            await enroll(issuer.token(), "pi-2", JOINER_ID, pki.new_node_key(), timeout_s=2)
        assert issuer.server.counts["busy"] >= 1
        await asyncio.sleep(0.6)
        assert issuer.server.counts["timeout"] == 1
        await _join(issuer.token())
        idle.close()
    finally:
        await issuer.server.close()


def test_frame_decoder_only_raises_frame_error_on_random_input() -> None:
    rng = random.Random(8)
    good = en.encode_frame({"ca": b"x" * 100, "keys": [b"k" * 32]})[4:]
    for _ in range(3000):
        if rng.random() < 0.5:
            body = rng.randbytes(rng.randrange(1, 200))
        else:
            body = bytearray(good)
            body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body[: rng.randrange(1, len(body) + 1)])
        try:
            en.decode_body(body)
        except en.FrameError:
            pass
        try:
            en.frame_length(rng.randbytes(4))
        except en.FrameError:
            pass


def test_an_oversized_frame_is_not_encoded() -> None:
    with pytest.raises(ValueError):
        en.encode_frame({"keys": [b"x" * 60_000, b"y" * 10_000]})


# --------------------------------------------------------------------------- issuers found by mDNS


class FakeFinder:
    """What overlay.mdns.IssuerBrowser gives enroll(): announced issuer addresses, in order."""

    def __init__(self, found, *, fail: Exception | None = None) -> None:
        self.found = list(found)
        self.fail = fail
        self.asked: list[tuple[bytes, float]] = []
        self.closed = False

    def __call__(self, pin: bytes, browse_s: float) -> FakeFinder:
        self.asked.append((pin, browse_s))
        return self

    async def __aenter__(self) -> FakeFinder:
        if self.fail is not None:
            raise self.fail
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True

    async def next(self):
        return self.found.pop(0) if self.found else None


def _closed_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[:2]


async def _join_found(token: JoinToken, finder: FakeFinder) -> en.Enrollment:
    return await enroll(
        token, "pi-2", JOINER_ID, pki.new_node_key(), clock=Clock(), find_issuers=finder
    )


async def test_a_token_without_addresses_enrolls_with_an_issuer_found_by_mdns(issuer) -> None:
    token = issuer.token()
    bare = JoinToken(token.token_id, token.secret, token.ca_pin, ())
    finder = FakeFinder([issuer.addr])
    got = await _join_found(bare, finder)
    assert got.issuer == issuer.addr and got.cluster == "home"
    assert finder.asked == [(token.ca_pin, en.BROWSE_S)] and finder.closed


async def test_mdns_is_asked_only_when_no_token_address_answers(issuer) -> None:
    finder = FakeFinder([issuer.addr])
    assert (await _join_found(issuer.token(), finder)).issuer == issuer.addr
    assert finder.asked == []  # the token's address answered
    token = issuer.token()
    dead = JoinToken(token.token_id, token.secret, token.ca_pin, (_closed_port(),))
    assert (await _join_found(dead, finder)).issuer == issuer.addr
    assert len(finder.asked) == 1


async def test_an_announced_impostor_is_refused_by_the_pin_and_the_next_one_tried(
    tmp_path, issuer
) -> None:
    (tmp_path / "impostor").mkdir()
    impostor = await Issuer(tmp_path / "impostor").start()  # another CA, same protocol
    try:
        token = issuer.token()
        bare = JoinToken(token.token_id, token.secret, token.ca_pin, ())
        got = await _join_found(bare, FakeFinder([impostor.addr, issuer.addr]))
        assert got.issuer == issuer.addr
        with pytest.raises(EnrollError, match="not the one in the token") as info:
            await _join_found(bare, FakeFinder([impostor.addr]))
        assert "(mDNS)" in str(info.value) and impostor.server.counts["issued"] == 0
    finally:
        await impostor.server.close()


async def test_nothing_found_by_mdns_is_one_clear_error(issuer) -> None:
    token = issuer.token()
    bare = JoinToken(token.token_id, token.secret, token.ca_pin, ())
    with pytest.raises(EnrollError, match="no issuer of this CA announced itself on mDNS within 4 s"):
        await _join_found(bare, FakeFinder([]))
    with pytest.raises(EnrollError, match=r"mDNS unavailable \(no multicast\)"):
        await _join_found(bare, FakeFinder([], fail=OSError("no multicast")))
    with pytest.raises(EnrollError, match="names no issuer address and mDNS browsing is off"):
        await _join(bare)
    dead = JoinToken(token.token_id, token.secret, token.ca_pin, (_closed_port(),))
    with pytest.raises(EnrollError) as info:
        await _join_found(dead, FakeFinder([]))
    message = str(info.value)
    assert message.startswith("could not enroll: 127.0.0.1:") and "on mDNS within" in message
    assert "\n" not in message
