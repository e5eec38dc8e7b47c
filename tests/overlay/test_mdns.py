"""mDNS discovery (overlay.mdns): which announced agents we try to join, how often, and issuers.

The loopback interface has no multicast, so the real advertise/browse round trip is in
tests/edgeagent/test_mdns.py (network namespace); here every acceptance rule is tested.
"""

from __future__ import annotations

import random

from overlay.mdns import (
    FIRST_RETRY_S,
    MAX_ADDRESSES_CONSIDERED,
    MAX_ATTEMPTS,
    MAX_CANDIDATES,
    MAX_LABEL_BYTES,
    MAX_RETRY_S,
    REFUSALS,
    JoinSchedule,
    Links,
    Peer,
    TokenBucket,
    classify_issuer,
    classify_peer,
    cluster_hash,
    enroll_txt_record,
    instance_name,
    parse_peer,
    txt_record,
)

OWN_ID = "a" * 32
PEER_ID = "b" * 32


def announced(
    cluster: str = "site", node_id: str = PEER_ID, port: int = 7946
) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in txt_record(cluster, node_id, port).items()}


def test_peer_of_the_same_cluster_is_accepted_with_its_gossip_port() -> None:
    peer = parse_peer(announced(), ["192.0.2.7"], cluster="site", own_node_id=OWN_ID)
    assert peer == Peer(node_id=PEER_ID, addr=("192.0.2.7", 7946))


def test_peer_of_another_cluster_is_ignored() -> None:
    assert parse_peer(announced("other"), ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None


def test_our_own_announcement_is_ignored() -> None:
    props = announced(node_id=OWN_ID)
    assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None


def test_bad_port_version_or_missing_fields_are_ignored() -> None:
    for change in (
        {b"port": b"0"},
        {b"port": b"70000"},
        {b"port": b"x"},
        {b"v": b"2"},
        {b"id": b""},
    ):
        props = {**announced(), **change}
        assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None
    props = announced()
    del props[b"c"]
    assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None
    props = {**announced(), b"id": b"\xff\xfe"}  # not UTF-8
    assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None


def test_unusable_addresses_are_skipped_and_ipv4_preferred() -> None:
    addrs = ["not-an-ip", "0.0.0.0", "224.0.0.251", "fe80::1", "2001:db8::5", "192.0.2.9"]
    peer = parse_peer(announced(), addrs, cluster="site", own_node_id=OWN_ID)
    assert peer is not None and peer.addr == ("192.0.2.9", 7946)
    peer = parse_peer(announced(), ["fe80::1", "2001:db8::5"], cluster="site", own_node_id=OWN_ID)
    assert peer is not None and peer.addr == ("2001:db8::5", 7946)
    assert parse_peer(announced(), ["fe80::1"], cluster="site", own_node_id=OWN_ID) is None


def test_txt_carries_only_a_hash_of_the_cluster_name() -> None:
    txt = txt_record("secret-site", PEER_ID, 7946)
    assert "secret-site" not in txt.values()
    assert txt["c"] == cluster_hash("secret-site") != cluster_hash("other-site")


def test_instance_name_fits_one_dns_label() -> None:
    name = instance_name("x" * 200, PEER_ID)
    assert len(name.encode()) <= MAX_LABEL_BYTES and name.endswith(PEER_ID[:8])
    assert len(instance_name("ü" * 40, PEER_ID).encode()) <= MAX_LABEL_BYTES


# --------------------------------------------------------------------------- the on-link rule

IFACES = [("127.0.0.1", 8), ("192.0.2.2", 24), ("198.51.100.7", 25), ("fd00::2", 64)]


def classify(addrs: list[str], links: Links, **txt: str) -> Peer | str:
    props = {**announced(), **{k.encode(): v.encode() for k, v in txt.items()}}
    return classify_peer(props, addrs, cluster="site", own_node_id=OWN_ID, links=links)


def test_wildcard_bind_accepts_any_subnet_of_ours_and_refuses_off_link_and_loopback() -> None:
    links = Links.of(IFACES, "0.0.0.0")
    assert classify(["192.0.2.200"], links) == Peer(PEER_ID, ("192.0.2.200", 7946))
    assert classify(["198.51.100.100"], links) == Peer(PEER_ID, ("198.51.100.100", 7946))
    assert classify(["fd00::99"], links) == Peer(PEER_ID, ("fd00::99", 7946))
    assert classify(["198.51.100.200"], links) == "off_link"  # outside the /25
    assert classify(["203.0.113.5"], links) == "off_link"
    assert classify(["127.0.0.1"], links) == "loopback"
    assert classify(["127.0.0.1", "203.0.113.5"], links) == "off_link"
    assert classify(["203.0.113.5", "192.0.2.9"], links) == Peer(PEER_ID, ("192.0.2.9", 7946))
    assert classify(["nonsense", "224.0.0.251", "fe80::1"], links) == "no_address"


def test_bound_to_one_address_only_its_own_subnet_is_on_link() -> None:
    links = Links.of(IFACES, "192.0.2.2")
    assert classify(["192.0.2.50"], links) == Peer(PEER_ID, ("192.0.2.50", 7946))
    assert classify(["198.51.100.100"], links) == "off_link"  # another interface's subnet
    assert classify(["127.0.0.1"], links) == "loopback"
    # A bind address on no interface of ours: nothing is on-link.
    assert classify(["192.0.2.50"], Links.of(IFACES, "203.0.113.1")) == "off_link"


def test_loopback_only_when_bound_to_loopback() -> None:
    links = Links.of(IFACES, "127.0.1.5")
    assert classify(["127.0.1.6"], links) == Peer(PEER_ID, ("127.0.1.6", 7946))
    assert classify(["192.0.2.50"], links) == "off_link"
    # No loopback interface reported: 127.0.0.0/8 still counts when bound there.
    assert classify(["127.9.9.9"], Links.of([], "127.0.0.1")) == Peer(PEER_ID, ("127.9.9.9", 7946))


def test_a_joiner_accepts_every_subnet_of_ours_loopback_included() -> None:
    links = Links.of(IFACES, None)
    assert links.pick(["127.0.0.1"]) == ("127.0.0.1", "")
    assert links.pick(["198.51.100.100"]) == ("198.51.100.100", "")
    assert links.pick(["203.0.113.5"]) == ("", "off_link")


def test_only_the_first_addresses_of_a_huge_list_are_looked_at() -> None:
    links = Links.of(IFACES, "0.0.0.0")
    flood = ["203.0.113.5"] * MAX_ADDRESSES_CONSIDERED + ["192.0.2.9"]
    assert classify(flood, links) == "off_link"


def test_refusal_reasons_for_bad_txt() -> None:
    links = Links.of(IFACES, "0.0.0.0")
    assert classify(["192.0.2.9"], links, c="0" * 16) == "foreign"
    assert classify(["192.0.2.9"], links, id=OWN_ID) == "self"
    assert classify(["192.0.2.9"], links, id="x" * 65) == "bad_txt"
    assert classify(["192.0.2.9"], links, port="+80") == "bad_txt"
    assert classify(["192.0.2.9"], links, port="0007946") == "bad_txt"
    assert set(REFUSALS) >= {"foreign", "self", "bad_txt", "off_link", "loopback", "no_address"}


def test_issuers_are_filtered_by_the_pin_prefix_and_the_on_link_rule() -> None:
    pin = bytes(range(32))
    props = {k.encode(): v.encode() for k, v in enroll_txt_record(pin).items()}
    links = Links.of(IFACES, None)
    assert classify_issuer(props, ["192.0.2.1"], 7947, ca_pin=pin, links=links) == ("192.0.2.1", 7947)
    other = bytes(32)
    assert classify_issuer(props, ["192.0.2.1"], 7947, ca_pin=other, links=links) == "foreign"
    assert classify_issuer(props, ["203.0.113.1"], 7947, ca_pin=pin, links=links) == "off_link"
    assert classify_issuer(props, ["192.0.2.1"], None, ca_pin=pin, links=links) == "bad_txt"
    assert enroll_txt_record(pin)["pin"] == pin.hex()[:16]  # a prefix: the pin itself stays private


# --------------------------------------------------------------------------- join schedule (virtual time)


def schedule(seed: int = 1, **kwargs: float) -> JoinSchedule:
    return JoinSchedule(random.Random(seed), **kwargs)  # type: ignore[arg-type]


def run_until(sched: JoinSchedule, addr: tuple[str, int], end: float, step: float = 0.1) -> list[float]:
    """Virtual time from 0 to ``end``: the times at which ``addr`` is (re)tried."""
    times = [0.0] if sched.offer(addr, 0.0) == "join" else []
    now = 0.0
    while now < end:
        now = round(now + step, 6)
        times += [now for a in sched.due(now) if a == addr]
    return times


def test_an_announcement_is_one_attempt_then_retries_with_doubling_waits_then_forgotten() -> None:
    sched = schedule(jitter=0.0)
    addr = ("192.0.2.9", 7946)
    times = run_until(sched, addr, 600.0)
    assert len(times) == MAX_ATTEMPTS
    waits = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
    assert waits == [FIRST_RETRY_S * 2**i for i in range(MAX_ATTEMPTS - 1)]
    assert addr not in sched and len(sched) == 0  # not a seed kept forever
    assert sched.offer(addr, 601.0) == "join"  # a later announcement starts afresh


def test_waits_are_capped_and_jittered_within_bounds() -> None:
    sched = schedule(seed=7, max_retry=10.0, jitter=0.25)
    waits = [sched.wait(n) for n in range(1, 40) for _ in range(20)]
    assert all(FIRST_RETRY_S * 0.75 <= w <= 10.0 * 1.25 for w in waits)
    assert max(waits) > 10.0 and min(w for w in waits) < FIRST_RETRY_S  # jitter both ways
    assert len({round(w, 9) for w in waits}) > 100  # members do not retry in lockstep


def test_repeated_announcements_do_not_buy_attempts() -> None:
    sched = schedule(jitter=0.0)
    addr = ("192.0.2.9", 7946)
    assert sched.offer(addr, 0.0) == "join"
    assert [sched.offer(addr, t / 10) for t in range(1, 19)] == ["backoff"] * 18
    assert sched.due(1.9) == [] and sched.due(2.0) == [addr]


def test_the_schedule_is_capped_and_frees_places_as_candidates_expire_or_join() -> None:
    sched = schedule(capacity=4, attempts=2, jitter=0.0)
    addrs = [(f"192.0.2.{i}", 7946) for i in range(1, 11)]
    verdicts = [sched.offer(a, 0.0) for a in addrs]
    assert verdicts == ["join"] * 4 + ["full"] * 6 and len(sched) == 4
    sched.done(addrs[0])  # joined: its place is free
    assert sched.offer(addrs[4], 0.5) == "join"
    assert sched.offer(addrs[5], 0.5) == "full"
    assert sorted(sched.due(2.0)) == sorted(addrs[1:4])  # second and last attempt
    assert sched.due(2.5) == [addrs[4]]
    assert sched.offer(addrs[5], 5.9) == "full"
    assert sched.offer(addrs[5], 6.0) == "join"  # the first three were forgotten at 2 + 4 s
    assert len(sched) <= 4


def test_a_flood_of_addresses_costs_bounded_memory_and_attempts() -> None:
    sched = schedule(seed=3)
    attempts = 0
    for i in range(20000):  # a hostile LAN announcing a new on-link address every 10 ms
        now = i * 0.01
        attempts += sched.offer((f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", 1), now) == "join"
        attempts += len(sched.due(now))
        assert len(sched) <= MAX_CANDIDATES
    # At most MAX_CANDIDATES addresses live at once, each tried MAX_ATTEMPTS times over the
    # sum of its waits (jitter shrinks a wait by a quarter at most) before its place is free.
    lifetime = sum(min(MAX_RETRY_S, FIRST_RETRY_S * 2**n) * 0.75 for n in range(MAX_ATTEMPTS))
    assert attempts <= (200.0 / lifetime + 1) * MAX_CANDIDATES * MAX_ATTEMPTS


def test_token_bucket_limits_the_rate_of_lookups() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert bucket.take(0.05) is False and bucket.take(0.1) is True
    taken = sum(bucket.take(1.0 + i / 1000) for i in range(10_000))  # 10 s of 1 kHz attempts
    assert 95 <= taken <= 106
