"""QoS 1 publishing in JetStream fast-ingest batches (broker/src/ingress/batch/), against a
real nats-server: the stream allows batches, messages go in batches and every one arrives,
the switch turns it off, an older stream is upgraded, and a stream that stops allowing
batches while the node runs makes it fall back to one message at a time without losing any.
"""

import json

import pytest

import harness
from mqtt_client import V5, V311, Client, uid
from prom import node_metrics

pytestmark = pytest.mark.jetmq_only("jetmq's publishing path into JetStream")

MESSAGE_STREAM = "JETMQ_MSGS"


def metric(b: harness.BrokerNode, name: str) -> float:
    return node_metrics(b).value(name)


def publish_and_receive(b: harness.BrokerNode, n: int, version: int = V5, publishers: int = 4) -> None:
    """n QoS 1 messages from `publishers` clients with 20 in flight each (more than the 32
    the broker publishes one by one before it batches): every PUBACK is success and every
    message arrives, in order per publisher."""
    topic = uid("batch")
    sub = Client(b.address, version=version)
    pubs = [Client(b.address, version=version, max_inflight=20) for _ in range(publishers)]
    try:
        sub.connect()
        assert sub.subscribe(f"{topic}/#", qos=1) == [1]
        for pub in pubs:
            pub.connect()
        infos = [pubs[i % publishers].publish(f"{topic}/{i % publishers}", f"m{i}".encode(), qos=1, wait=False)
                 for i in range(n)]
        for info in infos:
            info.wait_for_publish(20)
            assert info.is_published()
        got = sub.expect(n, timeout=30)
        for p in range(publishers):
            mine = [m.payload for m in got if m.topic == f"{topic}/{p}"]
            assert mine == [f"m{i}".encode() for i in range(p, n, publishers)]
    finally:
        sub.close_quietly()
        for pub in pubs:
            pub.close_quietly()


# Batches from the first message, whatever the load.
ALWAYS_BATCH = {"JETMQ_NATS__BATCH_PUBLISH_AFTER": "0"}


def test_qos1_goes_in_batches_and_every_message_arrives(fresh_nats, broker_factory):
    b = broker_factory(nats_urls=[fresh_nats.url], extra_env=ALWAYS_BATCH)
    assert fresh_nats.stream_config(MESSAGE_STREAM).get("allow_batched") is True
    publish_and_receive(b, 300)
    publish_and_receive(b, 50, version=V311)
    batches = metric(b, "jetmq_publish_batches_total")
    # Fewer batches than messages: they really were batched.
    assert 1 <= batches < 350, f"{batches} batches for 350 QoS 1 messages"
    assert metric(b, "jetmq_publish_batch_failures_total") == 0


def test_light_load_publishes_one_by_one(fresh_nats, broker_factory):
    # One publisher with 20 in flight stays under the default of 32 messages waiting one by
    # one: no batch needed.
    b = broker_factory(nats_urls=[fresh_nats.url])
    publish_and_receive(b, 100, publishers=1)
    assert metric(b, "jetmq_publish_batches_total") == 0


def test_batch_publish_off_publishes_one_by_one(fresh_nats, broker_factory):
    b = broker_factory(nats_urls=[fresh_nats.url], extra_env={"JETMQ_NATS__BATCH_PUBLISH": "false"})
    publish_and_receive(b, 100)
    assert metric(b, "jetmq_publish_batches_total") == 0


def test_message_stream_of_an_older_jetmq_is_upgraded(fresh_nats, broker_factory):
    # As an older jetmq created it: no allow_batched.
    config = {
        "name": MESSAGE_STREAM,
        "subjects": ["jetmq.s.>"],
        "storage": "file",
        "num_replicas": 1,
        "max_age": 3600 * 10**9,
        "discard": "old",
    }
    reply = json.loads(fresh_nats.request(f"$JS.API.STREAM.CREATE.{MESSAGE_STREAM}", json.dumps(config).encode()))
    assert "error" not in reply, reply
    assert not fresh_nats.stream_config(MESSAGE_STREAM).get("allow_batched")
    # The limits are the node's configuration (applied in place since issue 15): an operator
    # who keeps messages for an hour says so in jetmq's configuration.
    b = broker_factory(nats_urls=[fresh_nats.url], extra_env={**ALWAYS_BATCH, "JETMQ_NATS__MESSAGE_MAX_AGE_SECS": "3600"})
    stream = fresh_nats.stream_config(MESSAGE_STREAM)
    assert stream.get("allow_batched") is True
    assert stream.get("max_age") == 3600 * 10**9, "the configured age stays"
    assert stream.get("discard") == "new", "a full store refuses instead of deleting acknowledged messages"
    publish_and_receive(b, 100)
    assert metric(b, "jetmq_publish_batches_total") >= 1


def test_stream_that_stops_allowing_batches_falls_back_without_losing_messages(fresh_nats, broker_factory):
    b = broker_factory(nats_urls=[fresh_nats.url], extra_env=ALWAYS_BATCH)
    publish_and_receive(b, 50)
    before = metric(b, "jetmq_publish_batches_total")
    assert before >= 1
    info = json.loads(fresh_nats.request(f"$JS.API.STREAM.INFO.{MESSAGE_STREAM}"))
    config = info["config"]
    config["allow_batched"] = False
    reply = json.loads(fresh_nats.request(f"$JS.API.STREAM.UPDATE.{MESSAGE_STREAM}", json.dumps(config).encode()))
    assert "error" not in reply, reply
    # The first batch after the change is refused; its messages and all later ones are
    # published one at a time, and still each is acknowledged only once stored.
    publish_and_receive(b, 200)
    publish_and_receive(b, 50)
    assert metric(b, "jetmq_publish_batches_total") == before
    assert "does not allow batch publishing" in b.log_tail(400)
