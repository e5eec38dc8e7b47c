"""overlay.mqtt.mesh: interest values, aggregation, routing plans, envelopes, retained digests."""

from __future__ import annotations

import random
from collections import Counter

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.mqtt import mesh
from overlay.mqtt.mesh import (
    Envelope,
    MeshDecodeError,
    MeshRouter,
    aggregate,
    decode_envelope,
    decode_retained_items,
    encode_envelope,
    encode_retained_items,
    interest_value,
    parse_interest,
    retained_digest,
)
from overlay.mqtt.packets import Properties
from overlay.mqtt.topics import filter_matches

LEVEL = st.sampled_from(["a", "b", "c", "$SYS", "x"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=4).map("/".join)
FILTER_LEVEL = st.sampled_from(["a", "b", "c", "$SYS", "x", "+"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVEL, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=300, deadline=None)
@given(st.lists(filters(), min_size=1, max_size=40), st.integers(1, 6), st.lists(TOPIC, max_size=20))
def test_aggregate_never_loses_interest(found: list[str], limit: int, topics: list[str]) -> None:
    wide = aggregate(found, limit)
    roots = {f.split("/")[0] for f in wide if f.startswith("$")}
    assert len(wide) <= max(limit, 1 + len(roots))
    for topic in topics:
        if any(filter_matches(f, topic) for f in found):
            assert any(filter_matches(f, topic) for f in wide), (found, wide, topic)


def test_aggregate_examples() -> None:
    assert aggregate(["a/b/c", "a/b/d", "a/b/c"], 5) == ["a/b/c", "a/b/d"]
    assert aggregate(["a/b/c", "a/b/d", "x/y"], 2) == ["a/b/#", "x/y"]
    assert aggregate(["a/#", "a/b", "a/+/c"], 5) == ["a/#"]  # covered filters go
    assert aggregate(["a", "b", "c"], 2) == ["#"]
    assert aggregate(["a", "b", "$SYS/x"], 1) == ["#", "$SYS/#"]  # '#' does not see $SYS


def test_interest_value_is_bounded_and_parses_back() -> None:
    plain = [f"site/room{i}/temp" for i in range(100)]
    shares = [(f"g{i}", f"jobs/{i}") for i in range(40)]
    value = interest_value(plain, shares)
    assert len(value["f"]) <= mesh.MAX_FILTERS
    assert len(packed := msgpack.packb(value)) < 1400, len(packed)
    parsed = parse_interest(msgpack.unpackb(packed))
    assert parsed is not None
    assert parsed.wants("site/room77/temp") and not parsed.wants("other/x")
    assert parsed.groups_for("jobs/3") == {"g3"}
    assert len({g for g, _ in parsed.shares}) == mesh.MAX_GROUPS
    assert mesh.groups_left_out(shares) == 40 - mesh.MAX_GROUPS
    assert interest_value([], []) is None


@pytest.mark.parametrize(
    "value",
    [None, 1, [], {"v": 2}, {"v": 1, "f": "a"}, {"v": 1, "f": ["a/#/b"]},
     {"v": 1, "f": [1]}, {"v": 1, "s": [["g", "a", "b"]]}, {"v": 1, "s": [["g/x", "a"]]},
     {"v": 1, "s": [["", "a"]]}, {"v": 1, "f": ["x" * 300]}, {"v": 1, "f": ["a"] * 500}],
)  # fmt: skip
def test_parse_interest_refuses_malformed(value: object) -> None:
    assert parse_interest(value) is None


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=8) | st.booleans(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=2), c, max_size=4)))  # fmt: skip
def test_parse_interest_is_total(value: object) -> None:
    parse_interest(value)  # never raises


def _router(me: str, interests: dict[str, object], seed: int = 1) -> MeshRouter:
    router = MeshRouter(me, random.Random(seed))
    for node, value in interests.items():
        router.set_interest(node, value)
    return router


def test_plan_plain_once_per_agent_and_share_group_once_mesh_wide() -> None:
    interests = {
        "a": interest_value([], [("g", "jobs/#")]),
        "b": interest_value(["jobs/#", "jobs/+"], [("g", "jobs/#")]),
        "c": interest_value(["jobs/x"], [("g", "jobs/x"), ("h", "#")]),
        "d": interest_value(["other"], []),
        "e": {"v": 1, "f": ["bad/#/x"]},
    }
    router = _router("a", interests)
    assert router.stats.interest_malformed == 1
    plan = router.plan("jobs/x")
    assert plan.plain == {"b", "c"}
    assert plan.shares == {"g": "a", "h": "c"}  # g: this agent has a member (locality)
    assert plan.destinations("a") == {"b": (True, ()), "c": (True, ("h",))}
    # from d (no member of g): least loaded of a, b, c, so spread evenly (c takes h's too)
    interests["c"] = interest_value(["jobs/x"], [("g", "jobs/x")])
    router_d = _router("d", interests)
    chosen = Counter(router_d.plan("jobs/x").shares["g"] for _ in range(300))
    assert set(chosen) == {"a", "b", "c"} and max(chosen.values()) - min(chosen.values()) <= 1
    # an unreachable agent is never chosen
    assert router_d.plan("jobs/x", reachable=["a"]).shares == {"g": "a"}
    assert router_d.plan("jobs/x", reachable=["a"]).plain == frozenset()


def test_envelope_round_trip_and_duplicates() -> None:
    props = Properties(content_type="text/plain", user_properties=(("k", "v"),),
                       message_expiry_interval=30, correlation_data=b"\x01")  # fmt: skip
    env = Envelope("a", 7, "t/x", b"\x00\xff", qos=1, retain=True, plain=False, groups=("g",),
                   stamp=(1700000000000, 3, "a"), client_id="c1", properties=props)  # fmt: skip
    assert decode_envelope(encode_envelope(env)) == env
    router = _router("b", {})
    assert router.accept(env) and not router.accept(env)
    assert router.stats.duplicates == 1
    assert not router.accept(Envelope("a", 8, "t", b"", hop=mesh.MAX_HOPS + 1))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_envelope_decoder_is_total(data: bytes) -> None:
    try:
        decode_envelope(data)
    except MeshDecodeError:
        pass


def test_envelope_decoder_mutations() -> None:
    rng = random.Random(5)
    good = encode_envelope(Envelope("a", 1, "t/x", b"p", qos=1, stamp=(1, 2, "a")))
    refused = 0
    for _ in range(20000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode_envelope(bytes(data))
        except MeshDecodeError:
            refused += 1
    assert refused > 1000  # the mutations do hit the checks
    with pytest.raises(MeshDecodeError):
        decode_envelope(b"\x00" * (mesh.MAX_ENVELOPE_BYTES + 1))


def test_retained_digest_and_items() -> None:
    rows = [("a/b", b"1", 0, (5, 0, "n1")), ("c", b"", 1, (6, 2, "n2"))]
    assert retained_digest([(t, s) for t, _, _, s in rows]) == retained_digest(
        [(t, s) for t, _, _, s in reversed(rows)]
    )
    assert retained_digest([("a/b", (5, 0, "n1"))]) != retained_digest([("a/b", (5, 1, "n1"))])
    assert decode_retained_items(encode_retained_items(rows)) == rows
    with pytest.raises(MeshDecodeError):
        decode_retained_items(msgpack.packb([["a/+", b"", 0, [1, 0, "n"]]]))
    with pytest.raises(MeshDecodeError):
        decode_retained_items(msgpack.packb([["a", b"", 0, None]]))


def test_batches_keep_order_and_refuse_junk() -> None:
    envs = [Envelope("a", i, f"t/{i}", bytes([i])) for i in range(5)]
    assert mesh.decode_batch(mesh.encode_batch([encode_envelope(e) for e in envs])) == envs
    good = mesh.encode_batch([encode_envelope(e) for e in envs])
    for bad in (b"", b"\x00", good[:-1], good + b"x", b"\xff\xff" + good[2:]):
        with pytest.raises(MeshDecodeError):
            mesh.decode_batch(bad)
    rng = random.Random(9)
    for _ in range(5000):
        data = bytearray(good)
        data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            mesh.decode_batch(bytes(data))
        except MeshDecodeError:
            pass
