"""/metrics of a running jetmq-broker: the names the Grafana dashboard and the alerts use
exist, and move the way their meaning says when real MQTT traffic flows."""

import pytest

import harness
from mqtt_client import V5, uid
from prom import node_metrics

pytestmark = pytest.mark.jetmq_only("scrapes jetmq's own /metrics endpoint")


def page(b: harness.BrokerNode):
    return node_metrics(b)


def test_messages_by_qos_publish_ack_latency_and_sessions(target, clients):
    b = target.process
    before = page(b)
    t = uid("metrics")
    sub = clients.connect(version=V5)
    for qos in (0, 1, 2):
        assert sub.subscribe(f"{t}/{qos}", qos=qos) == [qos]
    pub = clients.connect(version=V5)
    n = 5
    for qos in (0, 1, 2):
        for i in range(n):
            pub.publish(f"{t}/{qos}", f"{qos}-{i}".encode(), qos=qos)
    got = sub.expect(3 * n, timeout=20)
    assert sorted(m.qos for m in got) == [0] * n + [1] * n + [2] * n
    # A persistent session, dropped and resumed on the same node (nobody holds it meanwhile).
    # The server finishes a DISCONNECT after the client has sent it: a CONNECT that overtakes
    # the final session write finds the old connection still owning the session and counts
    # as a takeover on this node. Wait until the node no longer holds it.
    cid = uid("metrics-ps")
    held = page(b).value("jetmq_sessions")
    clients.connect(client_id=cid, version=V5, clean=False, session_expiry=300).disconnect()
    harness.wait_until(lambda: page(b).value("jetmq_sessions") <= held, 5,
                       what=f"the node to let go of {cid} (jetmq_sessions back to {held})")
    again = clients.connect(client_id=cid, version=V5, clean=False, session_expiry=300)
    assert again.session_present

    after = page(b)
    for qos in (0, 1, 2):
        for name in ("jetmq_messages_received_total", "jetmq_messages_sent_total"):
            delta = after.value(name, qos=qos) - before.value(name, qos=qos)
            assert delta >= n, f"{name}{{qos={qos}}} grew by {delta}, expected at least {n}"
    assert after.types["jetmq_jetstream_publish_ack_seconds"] == "histogram"
    acks = after.value("jetmq_jetstream_publish_ack_seconds_count") - before.value(
        "jetmq_jetstream_publish_ack_seconds_count")
    assert acks >= 2 * n, f"only {acks} publish acks timed for {2 * n} QoS 1/2 messages"
    buckets = after.buckets("jetmq_jetstream_publish_ack_seconds")
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), f"buckets not cumulative: {buckets}"
    assert buckets[-1] == (float("inf"), after.value("jetmq_jetstream_publish_ack_seconds_count"))
    mean = after.value("jetmq_jetstream_publish_ack_seconds_sum") / after.value(
        "jetmq_jetstream_publish_ack_seconds_count")
    # A JetStream ack on loopback: well above zero, well below the 30 s client timeout.
    assert 0 < mean < 5, f"mean publish-ack latency {mean} s"
    assert after.value("jetmq_sessions_created_total") - before.value("jetmq_sessions_created_total") >= 3
    assert after.value("jetmq_sessions_resumed_total", previous_owner="none") - before.value(
        "jetmq_sessions_resumed_total", previous_owner="none") >= 1
    # sub, pub and the resumed client hold sessions right now.
    assert after.value("jetmq_sessions") >= 3
    assert after.value("jetmq_connections") >= 3
    assert after.value("jetmq_build_info") == 1


def test_session_resumed_from_another_node_is_counted_there(target, clients, broker_factory):
    """The dashboard's "session loads after failover" panel: a client whose session another
    node still holds comes back here."""
    second = broker_factory(node_id="m2")
    before = page(second)
    cid = uid("metrics-move")
    holder = clients.connect(client_id=cid, version=V5, clean=False, session_expiry=300)
    holder.subscribe(uid("metrics-move-topic"), qos=1)
    moved = clients.connect(target=second.address, client_id=cid, version=V5, clean=False, session_expiry=300)
    assert moved.session_present
    holder.wait_disconnect(timeout=15)
    after = page(second)
    assert after.value("jetmq_sessions_resumed_total", previous_owner="other_node") - before.value(
        "jetmq_sessions_resumed_total", previous_owner="other_node") == 1
    assert after.value("jetmq_session_takeovers_total") - before.value("jetmq_session_takeovers_total") == 1
