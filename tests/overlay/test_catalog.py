"""The service catalog: names, URIs, the replicated value (bounded, total decoder), the healthy view."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gossip.messages import MemberState
from overlay.catalog import (
    MAX_INSTANCES_PER_NODE,
    STATE_KEY,
    Catalog,
    CatalogError,
    Instance,
    Protocol,
    check_service_name,
    decode_instances,
    encode_instances,
    make_instance,
    parse_tag,
    parse_uri,
)


def test_state_key_is_short_and_distinct_from_ipam() -> None:
    assert STATE_KEY == "svc"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("coap://127.0.0.1:5683/temp", (Protocol.COAP, "127.0.0.1", 5683, "/temp")),
        ("coap://[::1]:5684", (Protocol.COAP, "::1", 5684, "")),
        ("COAP://Sensor-1.LOCAL/a/b/", (Protocol.COAP, "sensor-1.local", 5683, "/a/b")),
        ("mqtt://broker", (Protocol.MQTT, "broker", 1883, "")),
        ("coap://[fe80:0:0::1]:1/x%20y", (Protocol.COAP, "fe80::1", 1, "/x%20y")),
        ("coap://h:65535/", (Protocol.COAP, "h", 65535, "")),
    ],
)
def test_parse_uri_accepts(uri: str, expected: tuple[Protocol, str, int, str]) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("127.0.0.1:5683", "must look like coap://"),
        ("http://h:80", "scheme must be coap or mqtt"),
        ("coap://:5683/x", "has no host"),
        ("coap://h:0", "port '0'"),
        ("coap://h:70000", "port '70000'"),
        ("coap://h:ab", "port 'ab'"),
        ("coap://h:", "port ''"),
        ("coap://::1:5683", "must be in brackets"),
        ("coap://[::1:5683", "unterminated"),
        ("coap://[zz::1]:5683", "not an IPv6 address"),
        ("coap://[::1]x:5683", "unexpected"),
        ("coap://h:1/a?b=1", "query or fragment"),
        ("coap://u@h:1", "user info"),
        ("coap://h:1/a b", "path"),
        ("coap://bad_host-:1", "not a host name"),
        ("coap://1.2.3.999:1", "not a host name"),
        ("coap://h:1/" + "a" * 200, "longer than 128"),
    ],
)
def test_parse_uri_refuses_with_a_message_naming_the_problem(uri: str, words: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_uri(uri)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)  # the CLI catches ValueError for one-line errors


def test_service_names_are_dns_labels() -> None:
    assert check_service_name(" Temperature ") == "temperature"
    assert check_service_name("a-1") == "a-1"
    assert check_service_name("x" * 63) == "x" * 63
    for bad, words in [
        ("", "empty"),
        ("x" * 64, "longer than 63"),
        ("a_b", "one DNS label"),
        ("-a", "one DNS label"),
        ("a-", "one DNS label"),
        ("a.b", "one DNS label"),
        ("node", "reserved"),
    ]:
        with pytest.raises(CatalogError, match=words):
            check_service_name(bad)


def test_tags_and_weights() -> None:
    assert parse_tag("Site=lab-1") == ("site", "lab-1")
    inst = make_instance("t", "coap://h:1", weight=3, tags={"site": "a", "version": "2"})
    assert (inst.site, inst.zone, inst.version, inst.weight) == ("a", "", "2", 3)
    for bad in ["nokey", "=v", "k=", "k=a b"]:
        with pytest.raises(CatalogError):
            parse_tag(bad)
    for weight in [0, 1001, True, 1.5]:
        with pytest.raises(CatalogError, match="weight"):
            make_instance("t", "coap://h:1", weight=weight)  # type: ignore[arg-type]
    with pytest.raises(CatalogError, match="at most 8 tags"):
        make_instance("t", "coap://h:1", tags={f"k{i}": "v" for i in range(9)})


def _instances(n: int, node: str = "n1") -> list[Instance]:
    return [
        make_instance(
            f"svc{i % 3}",
            f"coap://10.0.0.{i}:5683/p{i}",
            weight=1 + i % 4,
            tags={"site": "s1"},
            node=node,
        )
        for i in range(n)
    ]


def test_encode_decode_round_trip_sets_the_owner() -> None:
    original = _instances(5, node="")
    value = encode_instances(original)
    back = decode_instances("owner-a", value)
    assert {(i.name, i.endpoint, i.weight, i.tags) for i in back} == {
        (i.name, i.endpoint, i.weight, i.tags) for i in original
    }
    assert {i.node for i in back} == {"owner-a"}
    assert decode_instances("owner-a", None) == ()
    v6 = make_instance("v", "coap://[::1]:7")
    assert decode_instances("o", encode_instances([v6]))[0].endpoint == "coap://[::1]:7"


def test_encode_keeps_one_per_endpoint() -> None:
    one = make_instance("t", "coap://h:1")
    assert len(decode_instances("o", encode_instances([one, one]))) == 1
    with pytest.raises(CatalogError, match="given twice"):
        encode_instances([one, make_instance("t", "coap://h:1", weight=2)])
    both = encode_instances([one, make_instance("u", "coap://h:1")])  # two services, one URI
    assert len(decode_instances("o", both)) == 2


def test_encode_refuses_over_the_budget() -> None:
    with pytest.raises(CatalogError, match="at most 32"):
        encode_instances(_instances(MAX_INSTANCES_PER_NODE + 1))
    encode_instances(_instances(MAX_INSTANCES_PER_NODE))  # 32 small ones fit
    big = [
        make_instance(
            f"s{i}",
            f"coap://host-{i}.example:1/" + "p" * 120,
            tags={f"k{j}": "v" * 60 for j in range(8)},
        )
        for i in range(4)
    ]
    with pytest.raises(CatalogError, match="bytes packed"):
        encode_instances(big)


HOSTILE: list[Any] = [
    1,
    "x",
    [],
    {"v": 2, "i": []},
    {"v": 1},
    {"v": 1, "i": "x"},
    {"v": 1, "i": [1]},
    {"v": 1, "i": [[1, 2, 3, 4, 5, 6, 7]]},
    {"v": 1, "i": [["a", "coap", "h", 1, "", 1, {}]] * 2},  # duplicate
    {"v": 1, "i": [["a", "coap", "H", 1, "", 1, {}]]},  # host not canonical
    {"v": 1, "i": [["a", "coap", "::0:1", 1, "", 1, {}]]},  # v6 not canonical
    {"v": 1, "i": [["a", "coap", "h", True, "", 1, {}]]},
    {"v": 1, "i": [["a", "coap", "h", 1, "", 1, {1: 2}]]},
    {"v": 1, "i": [["a", "coap", "h", 1, "", 1, {"k": 2}]]},
    {"v": 1, "i": [["node", "coap", "h", 1, "", 1, {}]]},
    {"v": 1, "i": [["a", "http", "h", 1, "", 1, {}]]},
    {"v": 1, "i": [["a", "coap", "h", 1, "no-slash", 1, {}]]},
    {"v": 1, "i": [["a", "coap", "h", 1, "", 0, {}]]},
    {"v": 1, "i": [["a", "coap", "h", 1, "", 1, []]]},
    {"v": 1, "i": [["a", "coap", "h" * 300, 1, "", 1, {}]]},
    {"v": 1, "i": [["a", "coap", "h", 1, "", 1, {}]] * 40},
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_raise_only_catalog_error(value: Any) -> None:
    with pytest.raises(CatalogError):
        decode_instances("o", value)


def _mutate(value: Any, rng: random.Random) -> Any:
    odd: list[Any] = [
        None,
        True,
        -1,
        0,
        2**70,
        1.5,
        float("nan"),
        "",
        "x" * 300,
        b"\xff",
        [],
        {},
        [[]],
        {"k": []},
        "A",
        "::1",
        "a..b",
    ]
    if isinstance(value, dict) and value and rng.random() < 0.5:
        key = rng.choice(list(value))
        return {**value, key: _mutate(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.7:
        at = rng.randrange(len(value))
        return [*value[:at], _mutate(value[at], rng), *value[at + 1 :]]
    return rng.choice(odd)


def test_mutated_values_raise_only_catalog_error() -> None:
    rng = random.Random(9)
    base = encode_instances(_instances(6))
    decoded = rejected = 0
    for _ in range(5000):
        value = _mutate(base, rng)
        try:
            found = decode_instances("o", value)
        except CatalogError:
            rejected += 1
        else:
            decoded += 1
            assert len(found) <= MAX_INSTANCES_PER_NODE
    assert rejected > 1000 and decoded > 10  # both branches exercised


def _catalog() -> Catalog:
    cat = Catalog(local="a")
    for node in "abcd":
        if node != "a":
            cat.on_member(node, MemberState.ALIVE)
        assert cat.on_state(
            node,
            encode_instances(
                [
                    make_instance("temp", f"coap://10.0.0.{ord(node)}:5683"),
                    make_instance("hum", f"coap://10.0.1.{ord(node)}:5683"),
                ]
            ),
        )
    return cat


def test_services_of_a_node_follow_what_it_publishes() -> None:
    cat = _catalog()
    assert cat.services_of("b") == {"temp", "hum"}
    assert cat.on_state("b", encode_instances([make_instance("hum", "coap://10.0.2.1:5683")]))
    assert cat.services_of("b") == {"hum"}
    assert cat.on_state("b", None)
    assert cat.services_of("b") == set() and cat.services_of("nobody") == set()


def test_healthy_view_follows_member_states_and_ejections() -> None:
    cat = _catalog()
    assert cat.services() == ["hum", "temp"]
    assert [i.node for i in cat.healthy("temp")] == ["a", "b", "c", "d"]
    cat.on_member("b", MemberState.SUSPECT)
    cat.on_member("c", MemberState.DEAD)
    cat.on_member("d", MemberState.LEFT)
    assert [i.node for i in cat.healthy("temp")] == ["a"]
    local = cat.instances("temp")[0]
    # Only a suspect node is left: it is the last resort.
    assert [i.node for i in cat.healthy("temp", ejected={local.key})] == ["b"]
    assert cat.dns_nodes("TEMP", ejected={local.key}) == ["b"]
    cat.on_member("b", MemberState.DEAD)
    assert cat.healthy("temp", ejected={local.key}) == []
    assert cat.dns_nodes("nothing") == []
    rows = {(r["node"], r["name"]): r["state"] for r in cat.rows(ejected={local.key})}
    assert rows[("a", "temp")] == "ejected"
    assert rows[("a", "hum")] == "healthy"
    assert rows[("b", "temp")] == "down"
    assert set(cat.rows()[0]) == {"name", "protocol", "node", "endpoint", "state", "weight", "tags"}


def test_bad_value_is_dropped_counted_and_replaces_the_old_one() -> None:
    cat = _catalog()
    assert not cat.on_state("b", {"v": 1, "i": "garbage"})
    assert cat.stats["bad_values"] == 1
    assert "b" not in {i.node for i in cat.instances("temp")}
    assert cat.on_state("c", None)
    assert "c" not in {i.node for i in cat.instances("temp")}
    cat.on_reaped("d")
    assert [i.node for i in cat.instances("temp")] == ["a"]
