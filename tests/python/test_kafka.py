"""MQTT to Kafka end to end: paho-mqtt -> jetmq-broker -> NATS (mapping from
``jetmq-ingestor mapping``) -> jetmq-ingestor --mqtt-id 1..N -> tansu (Kafka API, sqlite).

Every component is a real process. Kafka is read back with confluent-kafka.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

import harness
import kafka_harness as kh
import mqtt_raw as raw
from mqtt_client import V311, V5, Client, uid
from prom import node_metrics

pytestmark = [pytest.mark.slow, pytest.mark.jetmq_only("needs jetmq, NATS and Kafka")]

ROUTES = """
[[routing.rules]]
filter = "sensors/+/temp"
topic = "temps"
"""


@pytest.fixture
def pipeline(tmp_path_factory):
    made = []

    def make(**kw) -> kh.Pipeline:
        for problem in (harness.broker_bin_problem(), kh.ingestor_bin_problem()):
            if problem:
                pytest.fail(problem, pytrace=False)
        kw.setdefault("ingestor_extra", ROUTES)
        p = kh.Pipeline(tmp_path_factory.mktemp("kafka"), **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def numbered(prefix: str, count: int, topics: int, qos: int = 1):
    """(topic, payload, qos): payload ``<topic index>:<n-th message of that topic>``."""
    return [(f"{prefix}/{n % topics}/data", f"{n % topics}:{n // topics}".encode(), qos) for n in range(count)]


def order_by_topic(records: list[kh.Record]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        out[r.header_str("mqtt.topic")].append(int(r.value.split(b":")[1]))
    return out


def publish_in_background(target, messages, chunk: int = 100, pause: float = 0.05, version: int = V5) -> Future:
    """Publishes from a thread, paced: a future of how many were acknowledged."""

    def run() -> int:
        acked = 0
        c = Client(target, version=version, max_inflight=100).connect()
        for i in range(0, len(messages), chunk):
            acked += kh.publish_many(c, messages[i:i + chunk])
            time.sleep(pause)  # paced: the flow goes on through what the test does meanwhile
        c.disconnect()
        return acked

    pool = ThreadPoolExecutor(1, thread_name_prefix="publisher")
    try:
        return pool.submit(run)
    finally:
        pool.shutdown(wait=False)


def join(job: Future, timeout: float = 180) -> int:
    """How many ``job`` got acknowledged; raises what it raised, or TimeoutError if not done."""
    return job.result(timeout=timeout)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_every_qos_arrives_with_topic_key_value_and_headers(pipeline, version):
    p = pipeline(shares=1)
    target = p.targets()[0]
    client_id = uid("dev")
    c = Client(target, client_id=client_id, version=version, max_inflight=50).connect()
    props = None
    if version == V5:
        props = {"ContentType": "application/json", "UserProperty": [("unit", "celsius"), ("unit", "kelvin"),
                                                                     ("site", "büro 1")],
                 "PayloadFormatIndicator": 1, "MessageExpiryInterval": 3600,
                 "ResponseTopic": "replies/x", "CorrelationData": b"\x00\x9f\x01"}
    payloads = {}
    for qos in (0, 1, 2):
        # Routed by a rule (sensors/+/temp -> temps) and by the default topic (mqtt).
        for topic in (f"sensors/{qos}/temp", f"plain/{version}/{qos}"):
            payload = bytes([0, 255, qos]) + f"payload {topic}".encode()
            payloads[topic] = payload
            assert c.publish(topic, payload, qos=qos, retain=(qos == 1), props=props) == 0
    c.disconnect()
    reader = p.reader("temps", "mqtt")
    records = reader.read_distinct(6, timeout=60)
    assert kh.distinct(records) == 6, p.diagnostics()
    assert kh.duplicates(records) == 0
    by_topic = {r.header_str("mqtt.topic"): r for r in records}
    assert set(by_topic) == set(payloads)
    for topic, r in by_topic.items():
        qos = int(topic.split("/")[-2] if topic.startswith("sensors") else topic.rsplit("/", 1)[1])
        assert r.topic == ("temps" if topic.startswith("sensors/") else "mqtt"), topic
        assert r.key == topic.encode(), "key = MQTT topic"
        assert r.value == payloads[topic], "payload untouched"
        assert r.header_str("mqtt.qos") == str(qos)
        assert r.header_str("mqtt.retain") == ("true" if qos == 1 else "false")
        assert r.header_str("mqtt.client_id") == client_id
        assert r.header_str("jetmq.share") == "0"
        ts = int(r.header_str("mqtt.timestamp_ms"))
        assert r.timestamp_ms == ts and abs(ts / 1000 - time.time()) < 300
        if version == V5:
            assert r.header_str("mqtt.content_type") == "application/json"
            assert r.headers_named("mqtt.user.unit") == [b"celsius", b"kelvin"], "repeated names, in order"
            assert r.header_str("mqtt.user.site") == "büro 1"
            assert r.header_str("mqtt.payload_format") == "1"
            assert r.header_str("mqtt.message_expiry") == "3600"
            assert r.header_str("mqtt.response_topic") == "replies/x"
            assert r.header("mqtt.correlation_data") == b"\x00\x9f\x01"
        else:
            names = {k for k, _ in r.headers}
            assert not any(n.startswith("mqtt.user.") for n in names)
            assert "mqtt.content_type" not in names
    reader.close()


def test_bundled_messages_become_one_record_each_in_order(pipeline):
    # Batches from the first message; raw bursts make the node store messages of one topic
    # together (bundles, see test_bundles.py).
    p = pipeline(shares=1, broker_env={"JETMQ_NATS__BATCH_PUBLISH_AFTER": "0"})
    b = p.brokers[0]
    prefix = uid("kb")
    topics, per_topic = 4, 200
    raw.publish_bursts(b.host, b.port, lambda i: f"{prefix}/{i}/data", topics, per_topic // 20, 20)
    assert node_metrics(b).value("jetmq_publish_bundles_total") >= 1
    reader = p.reader("mqtt")
    records = [r for r in reader.read_distinct(topics * per_topic, timeout=90)
               if r.header_str("mqtt.topic").startswith(prefix)]
    assert kh.distinct(records) == topics * per_topic, p.diagnostics()
    assert kh.duplicates(records) == 0
    assert any(r.header("jetmq.part") is not None for r in records), "no record came from a bundle"
    for r in records:
        assert r.key == r.header_str("mqtt.topic").encode()
    order = order_by_topic(records)
    assert sorted(order) == [f"{prefix}/{i}/data" for i in range(topics)]
    for topic, ns in order.items():
        assert ns == list(range(per_topic)), f"{topic}: order kept, nothing twice"
    reader.close()


def test_three_ingestors_split_the_flow_as_the_mapping_says(pipeline):
    p = pipeline(shares=3)
    c = Client(p.targets()[0], max_inflight=100).connect()
    n, topics = 1500, 60
    assert kh.publish_many(c, numbered("split", n, topics)) == n
    c.disconnect()
    reader = p.reader("mqtt")
    records = reader.read_distinct(n, timeout=90)
    assert kh.distinct(records) == n, p.diagnostics()
    assert kh.duplicates(records) == 0
    shares_of: dict[str, set[str]] = collections.defaultdict(set)
    per_share = collections.Counter()
    for r in records:
        shares_of[r.header_str("mqtt.topic")].add(r.header_str("jetmq.share"))
        per_share[r.header_str("jetmq.share")] += 1
    assert all(len(s) == 1 for s in shares_of.values()), "partition mode: a topic stays on one share"
    assert set(per_share) == {"0", "1", "2"}, per_share
    # Ingestor --mqtt-id k produced exactly the records of share k-1.
    harness.wait_until(lambda: sum(i.metric("acked_total") for i in p.ingestors.values()) >= n, 30,
                       what="acks of all ingestors")
    produced = {int(tag) - 1: ing.metric("produced_total") for tag, ing in p.ingestors.items()}
    assert produced == {int(s): float(c) for s, c in per_share.items()}, (produced, per_share)
    for topic, numbers in order_by_topic(records).items():
        assert numbers == list(range(n // topics)), f"order of {topic}"
    print(f"split over 3 ingestors: {dict(sorted(per_share.items()))}")
    reader.close()


def test_kafka_outage_loses_nothing(pipeline):
    p = pipeline(shares=1, ingestor_extra="[ingest]\nmax_in_flight = 300\n")
    ing = p.ingestors["1"]
    n = 2000
    job = publish_in_background(p.targets()[0], numbered("outage", n, 40), chunk=100, pause=0.1)
    harness.wait_until(lambda: ing.metric("acked_total") >= 300, 60, what="first records in Kafka")
    p.tansu.kill9()
    down_at = ing.metrics()
    time.sleep(6)  # the outage itself: the flow must stall, not fail
    during = ing.metrics()
    p.tansu.start()
    assert join(job) == n, "every publish acknowledged by the broker while Kafka was away"
    reader = p.reader("mqtt")
    records = reader.read_distinct(n, timeout=120)
    print(f"Kafka outage: {kh.distinct(records)} distinct of {n}, {kh.duplicates(records)} duplicates; "
          f"at kill {down_at}, after 6 s {during}")
    assert kh.distinct(records) == n, p.diagnostics()
    assert during.get("acked_total", 0) < n
    assert during.get("lag", 0) > 0 or during.get("in_flight", 0) > 0, during
    reader.close()


def test_ingestor_killed_mid_stream_loses_nothing(pipeline):
    p = pipeline(shares=1)
    first = p.ingestors["1"]
    n = 3000
    job = publish_in_background(p.targets()[0], numbered("kill", n, 50), chunk=100, pause=0.05)
    harness.wait_until(lambda: first.metric("acked_total") >= 500, 60, what="first records in Kafka")
    first.kill9()
    second = p.start_ingestor(1, tag="1-restarted")
    assert join(job) == n
    reader = p.reader("mqtt")
    records = reader.read_distinct(n, timeout=120)
    dups = kh.duplicates(records)
    print(f"ingestor kill -9 + restart: {kh.distinct(records)} distinct of {n}, {dups} duplicates "
          f"(restarted: {second.metrics()})")
    assert kh.distinct(records) == n, p.diagnostics()
    # Duplicates are the at-least-once redeliveries of what was in Kafka but not yet acked:
    # the restarted ingestor reports them as redeliveries.
    assert second.metric("redelivered_total") >= dups, second.metrics()
    reader.close()


def test_resizing_shares_on_a_live_system_loses_nothing(pipeline):
    """The documented procedure (docs/nats-config.md), through the broker: scale 1 -> 2 (start
    the new ingestor, then reload the mapping), then 2 -> 1 (reload, let ingestor 2 drain, stop it)."""
    p = pipeline(shares=1)
    one = p.ingestors["1"]
    n = 3000
    job = publish_in_background(p.targets()[0], numbered("resize", n, 60), chunk=100, pause=0.1)
    harness.wait_until(lambda: one.metric("acked_total") >= 300, 60, what="ingestor 1 producing")
    two = p.start_ingestor(2)
    p.set_shares(2)
    harness.wait_until(lambda: two.metric("acked_total") >= 200, 60, what="ingestor 2 producing")
    p.set_shares(1)
    # Scale down: ingestor 2 keeps running until its share is drained.
    harness.wait_until(lambda: two.metric("lag") == 0 and two.metric("in_flight") == 0, 60,
                       what="share 1 drained")
    assert two.terminate(timeout=30) == 0, two.log_tail()
    assert join(job) == n
    reader = p.reader("mqtt")
    records = reader.read_distinct(n, timeout=120)
    shares = collections.Counter(r.header_str("jetmq.share") for r in records)
    print(f"resize 1 -> 2 -> 1: {kh.distinct(records)} distinct of {n}, {kh.duplicates(records)} duplicates, "
          f"per share {dict(shares)}")
    assert kh.distinct(records) == n, p.diagnostics()
    assert shares["1"] > 0 and shares["0"] > 0
    reader.close()


@pytest.mark.cluster
def test_three_node_nats_cluster_two_ingestors(pipeline):
    """3 NATS nodes (R3 stream), 3 brokers, 2 ingestors; publishers on every broker."""
    p = pipeline(shares=2, cluster=True, brokers=3)
    n_per = 500
    total = 0
    for i, target in enumerate(p.targets()):
        c = Client(target, max_inflight=100).connect()
        total += kh.publish_many(c, numbered(f"node{i}", n_per, 20))
        c.disconnect()
    assert total == 3 * n_per
    reader = p.reader("mqtt")
    records = reader.read_distinct(total, timeout=120)
    shares = collections.Counter(r.header_str("jetmq.share") for r in records)
    print(f"cluster: {kh.distinct(records)} distinct of {total}, per share {dict(shares)}")
    assert kh.distinct(records) == total, p.diagnostics()
    assert set(shares) == {"0", "1"}
    for topic, numbers in order_by_topic(records).items():
        assert numbers == sorted(numbers), f"order of {topic}"
    reader.close()
