"""``python -m testbed.bench mqtt-broker``: a tiny run, so the benchmark keeps working."""

from __future__ import annotations

import argparse

from testbed.bench import mqtt_broker


def test_a_tiny_mqtt_broker_bench_reports_costs() -> None:
    args = argparse.Namespace(ops=20, rounds=1, filters=50, subscribers=5, queued=10)
    result = mqtt_broker.run(args)
    for key in ("publish_qos0_us", "publish_qos1_us", "fanout_per_subscriber_us", "shared_us",
                "subscribe_us", "resume_per_message_us"):  # fmt: skip
        assert result[key] > 0
    assert (result["filters"], result["subscribers"], result["queued"]) == (50, 5, 10)
