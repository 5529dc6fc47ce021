"""Bundles: while QoS 1 messages queue for a JetStream batch, the broker stores those of one
topic as one stream message (broker/src/ingress/batch/, common/src/envelope.rs). Against a
real nats-server: bundles form, the stream holds fewer messages than were published, and every
reader takes them apart again, in order: a live subscriber, a shared subscription group, and a
persistent session that resumes from JetStream in the middle of a bundle.
"""

import json
import queue
import time

import pytest

import harness
import mqtt_raw as raw
from mqtt_client import V5, Client, uid
from prom import node_metrics

pytestmark = pytest.mark.jetmq_only("jetmq's storage format in JetStream")

# Batches from the first message; a replay ring too small to serve the resumed session, so it
# reads its messages back from JetStream.
ENV = {"JETMQ_NATS__BATCH_PUBLISH_AFTER": "0", "JETMQ_NATS__REPLAY_BUFFER_MESSAGES": "16"}
PUBLISHERS = 5
ROUNDS = 12
PER_ROUND = 20  # the test configuration's receive maximum
TOTAL = PUBLISHERS * ROUNDS * PER_ROUND


def burst(b: harness.BrokerNode, topic: str) -> None:
    raw.publish_bursts(b.host, b.port, lambda i: f"{topic}/{i}", PUBLISHERS, ROUNDS, PER_ROUND)


def in_publisher_order(payloads: list[bytes]) -> bool:
    seen: dict[bytes, int] = {}
    for payload in payloads:
        who, n = payload.split(b":")
        if int(n) <= seen.get(who, -1):
            return False
        seen[who] = int(n)
    return True


def everything() -> set[bytes]:
    return {f"{i}:{n}".encode() for i in range(PUBLISHERS) for n in range(ROUNDS * PER_ROUND)}


def collect_publishes(c: raw.RawClient, want: int, ack_first: int | None = None, timeout: float = 30) -> list:
    """PUBLISH packets until `want` arrived; acknowledges the first `ack_first` (all if None)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {len(got)} of {want} messages"
        p = c.recv_packet(timeout=max(0.1, deadline - time.monotonic()))
        if p.type != raw.PUBLISH:
            continue
        got.append(p)
        if ack_first is None or len(got) <= ack_first:
            c.send(raw.ack(raw.PUBACK, p.packet_id, c.version))
    return got


def test_bundled_messages_reach_every_kind_of_reader_in_order(fresh_nats, broker_factory):
    b = broker_factory(nats_urls=[fresh_nats.url], extra_env=ENV)
    topic = uid("bundle")
    live = Client(b.address, version=V5, max_inflight=100).connect()
    members = [Client(b.address, version=V5, max_inflight=100).connect() for _ in range(2)]
    away_id = uid("away")
    away = raw.RawClient(b.host, b.port, version=V5)
    try:
        assert live.subscribe(f"{topic}/#", qos=1) == [1]
        for m in members:
            assert m.subscribe(f"$share/g/{topic}/#", qos=1) == [1]
        away.mqtt_connect(away_id, clean=False, props={"SessionExpiryInterval": 600})
        assert away.subscribe([(f"{topic}/#", 1)]).reasons == [1]
        away.disconnect()

        burst(b, topic)

        bundles = node_metrics(b).value("jetmq_publish_bundles_total")
        bundled = node_metrics(b).value("jetmq_publish_bundled_messages_total")
        assert bundles >= 1 and bundled > bundles, (bundles, bundled)
        info = json.loads(fresh_nats.request("$JS.API.STREAM.INFO.JETMQ_MSGS"))
        stored = info["state"]["messages"]
        assert stored < TOTAL, f"{stored} stream messages for {TOTAL} MQTT messages"

        # Live: every message once, in stream order (which keeps each publisher's order).
        got = live.expect(TOTAL, timeout=30)
        order = [m.payload for m in got]
        assert set(order) == everything() and len(order) == TOTAL
        assert in_publisher_order(order)
        assert not any(m.dup for m in got)

        # A shared group: every message reaches one of its members (at least once).
        shared: set[bytes] = set()

        def shared_has_everything() -> bool:
            for m in members:
                try:
                    while True:
                        shared.add(m.messages.get_nowait().payload)
                except queue.Empty:
                    pass
            return shared == everything()

        harness.poll_until(shared_has_everything, 30)
        assert shared == everything(), f"{len(everything() - shared)} missing in the shared group"

        # The persistent session resumes from JetStream, acknowledges part of what it gets
        # (most likely ending inside a bundle) and leaves; the next time it gets exactly the
        # rest: nothing it acknowledged again, nothing skipped, the same order as live.
        acked = 137
        away = raw.RawClient(b.host, b.port, version=V5)
        ca = away.mqtt_connect(away_id, clean=False, props={"SessionExpiryInterval": 600})
        assert ca.session_present
        first = collect_publishes(away, acked + 5, ack_first=acked)
        away.disconnect()
        away = raw.RawClient(b.host, b.port, version=V5)
        assert away.mqtt_connect(away_id, clean=False, props={"SessionExpiryInterval": 600}).session_present
        rest = collect_publishes(away, TOTAL - acked)
        resumed = [p.payload for p in first[:acked]] + [p.payload for p in rest]
        assert resumed == order
        assert not away.receive_for(0.5), "nothing after the last message"
    finally:
        away.close()
        live.close_quietly()
        for m in members:
            m.close_quietly()


def test_bundles_off_stores_one_stream_message_per_mqtt_message(fresh_nats, broker_factory):
    b = broker_factory(nats_urls=[fresh_nats.url], extra_env={**ENV, "JETMQ_NATS__BUNDLE_MAX_MESSAGES": "1"})
    topic = uid("single")
    live = Client(b.address, version=V5, max_inflight=100).connect()
    try:
        assert live.subscribe(f"{topic}/#", qos=1) == [1]
        burst(b, topic)
        assert len(live.expect(TOTAL, timeout=30)) == TOTAL
        assert node_metrics(b).value("jetmq_publish_bundles_total") == 0
        info = json.loads(fresh_nats.request("$JS.API.STREAM.INFO.JETMQ_MSGS"))
        assert info["state"]["messages"] == TOTAL
    finally:
        live.close_quietly()
