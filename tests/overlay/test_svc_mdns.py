"""The mDNS service import / export rules (overlay/svc_mdns.py): which announced CoAP devices
become instances, which are refused and why, the bounded import table, what is exported."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from gossip.messages import MemberState
from overlay.catalog import Catalog, Instance, encode_instances, make_instance
from overlay.mdns import Links
from overlay.svc_mdns import (
    COAP_SERVICE_TYPE,
    EXPORT_MARK,
    MAX_IMPORTED,
    REFUSALS,
    ImportTable,
    classify_device,
    export_names,
    export_txt,
)

LAN = Links.of([("192.168.1.10", 24)], "0.0.0.0")


def classify(label: str, props: dict[object, object] | None = None, addrs: list[str] | None = None,
             port: object = 5683, links: Links = LAN) -> Instance | str:  # fmt: skip
    return classify_device(
        f"{label}.{COAP_SERVICE_TYPE}", props or {}, ["192.168.1.20"] if addrs is None else addrs, port,  # type: ignore[arg-type]
        links=links, node="gw",
    )  # fmt: skip


def test_a_device_becomes_an_instance_owned_by_the_agent_that_sees_it() -> None:
    found = classify("Thermo Hall", {b"path": b"/sensors/t"}, port=5690)
    assert isinstance(found, Instance)
    assert (found.name, found.node, found.endpoint) == (
        "thermo-hall", "gw", "coap://192.168.1.20:5690/sensors/t"
    )  # fmt: skip
    assert found.tags == (("src", "mdns"),)
    named = classify("whatever-1", {b"svc": b"temperature"})
    assert isinstance(named, Instance) and named.name == "temperature"


def test_hostile_or_odd_announcements_are_refused_with_a_reason() -> None:
    cases = {
        "bad_name": [
            classify("node"),  # reserved
            classify("-lead"),
            classify("x" * 64),
            classify("ünïcode"),
            classify("ok", {b"svc": b"a.b"}),
            classify("ok", {b"svc": b"\xff\xfe"}),
            classify_device("ok._http._tcp.local.", {}, ["192.168.1.20"], 5683, links=LAN, node="gw"),
            classify("tab\there"),
        ],
        "bad_port": [classify("ok", port=0), classify("ok", port=70000), classify("ok", port=None),
                     classify("ok", port=True)],  # fmt: skip
        "bad_txt": [classify("ok", {b"path": b"no-slash"}), classify("ok", {b"path": b"/a b"}),
                    classify("ok", {b"\x01": b"x"})],  # fmt: skip
        "off_link": [classify("ok", addrs=["10.0.0.1"])],
        "loopback": [classify("ok", addrs=["127.0.0.1"])],
        "no_address": [classify("ok", addrs=[]), classify("ok", addrs=["not-an-ip"])],
        "mesh_export": [classify("temperature", dict(export_txt("temperature")))],
    }
    for reason, results in cases.items():
        assert reason in REFUSALS
        assert results == [reason] * len(results), reason


@given(
    label=st.text(max_size=80),
    props=st.dictionaries(st.binary(max_size=20), st.one_of(st.none(), st.binary(max_size=80)),
                          max_size=6),  # fmt: skip
    addrs=st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=20)), max_size=10),
    port=st.one_of(st.none(), st.integers(-5, 70000)),
)
def test_any_announcement_is_an_instance_that_publishes_or_a_known_refusal(
    label: str, props: dict[object, object], addrs: list[str], port: int | None
) -> None:
    found = classify_device(label + "." + COAP_SERVICE_TYPE, props, addrs, port, links=LAN, node="gw")
    if isinstance(found, str):
        assert found in REFUSALS
    else:
        encode_instances([found])  # what was accepted can be published


def test_import_table_is_bounded_and_withdraws() -> None:
    table = ImportTable()
    insts = [make_instance(f"d{i}", f"coap://192.168.1.{i + 1}", node="gw") for i in range(40)]
    verdicts = [table.offer(f"d{i}.{COAP_SERVICE_TYPE}", inst) for i, inst in enumerate(insts)]
    assert verdicts == ["added"] * MAX_IMPORTED + ["full"] * (40 - MAX_IMPORTED)
    assert len(table) == MAX_IMPORTED
    assert table.offer(f"d0.{COAP_SERVICE_TYPE}", insts[0]) == "same"
    moved = make_instance("d0", "coap://192.168.1.200", node="gw")
    assert table.offer(f"d0.{COAP_SERVICE_TYPE}", moved) == "updated"
    assert table.remove(f"d0.{COAP_SERVICE_TYPE}") and not table.remove("never.")
    assert moved not in table.instances() and len(table) == MAX_IMPORTED - 1
    assert table.offer(f"d30.{COAP_SERVICE_TYPE}", insts[30]) == "added"  # room again


def test_export_names_skip_own_imports_unhealthy_services_and_are_bounded() -> None:
    catalog = Catalog("gw")
    device = make_instance("thermo", "coap://192.168.1.20", tags=[("src", "mdns")], node="gw")
    catalog.on_state("gw", encode_instances([device]))
    remote = [make_instance(f"s{i:02}", "coap://10.0.0.1") for i in range(20)]
    catalog.on_member("b", MemberState.ALIVE)
    catalog.on_state("b", encode_instances(remote))
    catalog.on_member("c", MemberState.DEAD)
    catalog.on_state("c", encode_instances([make_instance("gone", "coap://10.0.0.2")]))
    names = export_names(catalog, [device])
    assert names == [f"s{i:02}" for i in range(16)]  # sorted, at most MAX_EXPORTED
    assert "thermo" not in names and "gone" not in names
    assert "thermo" in export_names(catalog, [], limit=32)  # someone else's device on our node: exported
    ejected = {i.key for i in catalog.instances("s00")}
    assert "s00" not in export_names(catalog, [], ejected)  # its only instance is ejected
    assert export_txt("s00") == {EXPORT_MARK: "1", "path": "/mesh/s00"}


def test_classify_is_deterministic_for_a_seeded_stream_of_names() -> None:
    rng = random.Random(7)
    alphabet = "abcXYZ- _.\x00é9"
    accepted = 0
    for _ in range(2000):
        label = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 70)))
        found = classify(label)
        assert isinstance(found, Instance) or found in REFUSALS
        accepted += isinstance(found, Instance)
    assert 0 < accepted < 2000
