"""Quotas that keep the cluster serving when one client floods (issue 15, finding 4).

One user publishing QoS 1 as fast as it can used to fill NATS's whole JetStream store: other
clients' session claims failed ("cannot claim session"), they were disconnected (0x88), and
/readyz stayed 503. Now the message stream has a byte limit with discard "new", reserved in
the server's store, so a flood fills only the stream: the flooder is refused (MQTT 5: PUBACK
0x97 quota exceeded; 3.1.1: disconnected without PUBACK), everyone else keeps logging in,
claiming sessions and subscribing, the node stays ready, nothing acknowledged is lost, and
publishing works again once space frees (here: the stream's max age). See docs/security.md,
"Quotas".

Every test runs a NATS server of its own with a small ``max_file_store`` (jetmq only).
"""

from __future__ import annotations

import threading
import time

import pytest

import harness
import mqtt_raw as R
from conftest import ACL, DRAIN, LIMITS
from mqtt_client import Client, uid

pytestmark = pytest.mark.jetmq_only("JetStream quotas")

HOST = "127.0.0.1"
MIB = 1024 * 1024
# The whole JetStream store of the test's NATS server, and the message stream's share of it.
STORE = "24MB"
STREAM_BYTES = 4 * MIB
# Stored messages expire after this long: how space frees again without an operator.
MAX_AGE_SECS = 8
PAYLOAD = 32 * 1024
QUOTA_EXCEEDED = 0x97


@pytest.fixture
def small_nats(tmp_path):
    n = harness.NatsServer(tmp_path, max_file_store=STORE)
    n.start()
    yield n
    n.terminate()


def quota_config(**nats) -> dict:
    return {
        "limits": dict(LIMITS),
        "acl": dict(ACL),
        "drain": dict(DRAIN),
        "nats": {"message_max_bytes": STREAM_BYTES, "message_max_age_secs": MAX_AGE_SECS, **nats},
    }


def readyz(b: harness.BrokerNode) -> int:
    status, _ = harness.http_get(f"http://{b.host}:{b.http_port}/readyz", timeout=2.0)
    return status


def metric(b: harness.BrokerNode, name: str) -> float:
    status, body = harness.http_get(f"http://{b.host}:{b.http_port}/metrics", timeout=2.0)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


def stream_info(n: harness.NatsServer) -> dict:
    import json

    return json.loads(harness.nats_request(n.host, n.port, "$JS.API.STREAM.INFO.JETMQ_MSGS"))


def flood(flooder: R.RawClient, topic: str, version: int, window: int, limit: int = 2000):
    """Publishes QoS 1 messages numbered from 0, ``window`` in flight, until the store
    refuses 20 of them (MQTT 5), the broker closes the connection (3.1.1), or ``limit``.
    Returns (numbers acknowledged with 0, numbers refused with 0x97, packets otherwise)."""
    acked: list[int] = []
    refused: list[int] = []
    other: list = []
    in_flight: dict[int, int] = {}
    sent = 0
    while True:
        while len(in_flight) < window and sent < limit and flooder.is_open():
            payload = b"%08d" % sent + b"f" * (PAYLOAD - 8)
            pid = flooder.publish(topic, payload, qos=1)
            in_flight[pid] = sent
            sent += 1
        if not in_flight:
            return acked, refused, other
        try:
            p = flooder.recv_packet(15)
        except R.Closed:
            return acked, refused, other
        if p.type != R.PUBACK:
            other.append(p)
            continue
        number = in_flight.pop(p.packet_id)
        if p.reason == 0:
            acked.append(number)
        elif p.reason == QUOTA_EXCEEDED:
            refused.append(number)
        else:
            other.append(p)
        if len(refused) >= 20:
            return acked, refused, other


class Logins:
    """Other users logging in (persistent sessions: each one claims its session in the KV
    bucket) and subscribing, in a loop, while the flood runs; records each login's time."""

    def __init__(self, port: int, version: int):
        self.port = port
        self.version = version
        self.times: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            c = Client((HOST, self.port), version=self.version, clean=False, session_expiry=300)
            t0 = time.monotonic()
            try:
                c.connect(timeout=5)
                self.times.append(time.monotonic() - t0)
                reasons = c.subscribe(uid("q/login") + "/#", qos=1)
                if reasons != [1]:
                    self.failures.append(f"SUBACK {reasons}")
            except Exception as e:  # noqa: BLE001
                self.failures.append(f"{type(e).__name__}: {e}")
            finally:
                c.close_quietly()
            time.sleep(0.1)  # a login every ~0.1 s: a steady stream of them, not a storm

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


@pytest.mark.parametrize("version", [R.V311, R.V5], ids=["v311", "v5"])
def test_flood_fills_only_the_message_stream_and_the_cluster_keeps_serving(small_nats, broker_factory, version):
    b = broker_factory(nats_urls=[small_nats.url], config=quota_config())
    topic = uid("q/flood")
    # A persistent subscriber, online through the flood: it must get every acknowledged
    # message (stored messages expire after MAX_AGE_SECS, long after it got them).
    keeper = Client((HOST, b.port), version=R.V5, clean=False, session_expiry=600)
    keeper.connect()
    try:
        assert keeper.subscribe(topic, qos=1) == [1]
        flooder = R.RawClient(HOST, b.port, version=version, timeout=15)
        try:
            flooder.mqtt_connect(uid("flooder"))
            with Logins(b.port, R.V5) as logins:
                harness.wait_until(lambda: logins.times or logins.failures, 10, what="the first login before the flood")
                acked, refused, other = flood(flooder, topic, version, window=LIMITS["receive_maximum"])
                # The store is full now: others still log in, claim sessions, subscribe.
                full_since = time.monotonic()
                while time.monotonic() - full_since < 2.5:
                    assert readyz(b) == 200, "a full message store must not make the node unready"
                    time.sleep(0.25)  # sampled for 2.5 s: it must stay ready all along, not become so
            assert acked, "nothing was stored before the stream filled"
            assert len(acked) * PAYLOAD <= STREAM_BYTES, f"{len(acked)} messages exceed the stream's limit"
            if version == R.V5:
                assert len(refused) >= 20, f"no quota-exceeded PUBACKs: {len(acked)} acked, other {other}"
                assert not other, f"unexpected packets: {other}"
                assert flooder.is_open(), "an MQTT 5 publisher over quota must not be disconnected"
            else:
                # 3.1.1 cannot be told: the publisher is disconnected without a PUBACK.
                assert not refused and not other, (refused, other)
                assert not flooder.is_open(), "the MQTT 3.1.1 flooder was neither refused nor disconnected"
                assert len(acked) < 2000
            assert not logins.failures, logins.failures[:5]
            assert len(logins.times) >= 5, f"only {len(logins.times)} logins during the flood"
            assert max(logins.times) < 3.0, f"slowest login {max(logins.times):.2f}s"
            assert metric(b, "jetmq_message_store_full") == 1
            assert metric(b, "jetmq_publish_store_full_total") >= 1
            info = stream_info(small_nats)
            assert info["config"]["discard"] == "new" and info["config"]["max_bytes"] == STREAM_BYTES
        finally:
            flooder.close()

        # No acknowledged message is lost: the persistent subscriber has every one.
        got: set[int] = set()
        deadline = time.monotonic() + 15
        while not set(acked) <= got and time.monotonic() < deadline:
            try:
                m = keeper.get(timeout=1)
            except Exception:  # noqa: BLE001
                continue
            got.add(int(m.payload[:8]))
        missing = sorted(set(acked) - got)
        assert not missing, f"{len(missing)} acknowledged messages never delivered: {missing[:10]}"
    finally:
        keeper.close_quietly()

    # Space frees (the stored messages expire): the store takes messages again and clients
    # exchange them, without anyone restarting anything.
    t = uid("q/after")
    sub = Client((HOST, b.port), version=R.V5).connect()
    pub = R.RawClient(HOST, b.port, version=R.V5, timeout=10)
    try:
        assert sub.subscribe(t, qos=1) == [1]
        pub.mqtt_connect(uid("pub"))
        acks = []

        def stored() -> bool:
            acks.append(pub.publish_acked(t, b"after the flood", qos=1))
            return acks[-1].reason == 0

        harness.wait_until(stored, MAX_AGE_SECS + 20, 0.5, "the store to take messages again")
        assert all(ack.reason == QUOTA_EXCEEDED for ack in acks[:-1]), acks
        assert sub.get(timeout=10).payload == b"after the flood"
        harness.wait_until(lambda: metric(b, "jetmq_message_store_full") == 0, 10, what="store-full flag cleared")
        assert readyz(b) == 200
    finally:
        pub.close()
        sub.close_quietly()
    assert "message store full" in b.log_path.read_text()
    assert "message store has room again" in b.log_path.read_text()


def test_qos2_over_quota_gets_pubrec_0x97_and_the_packet_id_is_free_again(small_nats, broker_factory):
    """MQTT 5 QoS 2: PUBREC 0x97 ends the exchange; a new message with the same packet id
    after space frees is stored (not dropped as a duplicate of the refused one)."""
    b = broker_factory(nats_urls=[small_nats.url], config=quota_config())
    filler = R.RawClient(HOST, b.port, version=R.V5, timeout=15)
    filler.mqtt_connect(uid("filler"))
    acked, refused, _ = flood(filler, uid("q/fill"), R.V5, window=LIMITS["receive_maximum"])
    filler.close()
    assert acked and refused
    t = uid("q/qos2")
    sub = Client((HOST, b.port), version=R.V5).connect()
    c = R.RawClient(HOST, b.port, version=R.V5, timeout=15)
    try:
        assert sub.subscribe(t, qos=2) == [2]
        c.mqtt_connect(uid("q2"), clean=False, props={"SessionExpiryInterval": 300})
        # As large as the flood's messages: the stream may still have room for a small one.
        rec = c.publish_acked(t, b"r" * PAYLOAD, qos=2, packet_id=7)
        assert rec.type == R.PUBREC and rec.reason == QUOTA_EXCEEDED, rec
        answers = []

        def stored() -> bool:
            answers.append(c.publish_acked(t, b"s" * PAYLOAD, qos=2, packet_id=7))
            return answers[-1].type == R.PUBCOMP

        harness.wait_until(stored, MAX_AGE_SECS + 20, 0.5, "the store to take messages again")
        assert all(a.reason == QUOTA_EXCEEDED for a in answers[:-1]), answers
        assert sub.get(timeout=10).payload == b"s" * PAYLOAD
    finally:
        c.close()
        sub.close_quietly()


def test_stream_larger_than_the_servers_store_stops_the_start_up(small_nats, tmp_path):
    """The default 2 GiB message stream does not fit a 24 MB store: NATS refuses to reserve
    it, and the broker says which keys to change instead of running with sessions that the
    stream can starve."""
    b = harness.BrokerNode(tmp_path, [small_nats.url], node_id="big", config={"drain": dict(DRAIN)})
    with pytest.raises(harness.HarnessError):
        b.start(timeout=15)
    b.terminate()
    log = b.log_path.read_text()
    assert "nats.message_max_bytes" in log and "max_file_store" in log, harness.tail(b.log_path)


def test_an_existing_stream_gets_the_new_limits_in_place(small_nats, broker_factory):
    """A stream created by an older jetmq (discard old, no byte limit) is updated."""
    import json

    created = json.loads(harness.nats_request(small_nats.host, small_nats.port, "$JS.API.STREAM.CREATE.JETMQ_MSGS", json.dumps({
        "name": "JETMQ_MSGS", "subjects": ["jetmq.s.>"], "storage": "file", "discard": "old",
        "max_bytes": -1, "max_age": 7 * 24 * 3600 * 10**9, "num_replicas": 1,
    }).encode()))
    assert "error" not in created, created
    b = broker_factory(nats_urls=[small_nats.url], config=quota_config())
    config = stream_info(small_nats)["config"]
    assert config["discard"] == "new"
    assert config["max_bytes"] == STREAM_BYTES
    assert config["max_age"] == MAX_AGE_SECS * 10**9
    assert config["max_msg_size"] == LIMITS["max_packet_size"] + 64 * 1024
    assert "message stream limits updated in place" in b.log_path.read_text()


def test_one_user_shares_one_publish_budget_across_connections(broker_factory):
    """max_user_publish_rate = 100: two connections of one username blasting QoS 0 are read
    at about 100/s together (each connection alone may do 1000/s); another user on the same
    node is not held up, and nobody is disconnected."""
    limits = dict(LIMITS, max_publish_rate=1000, max_user_publish_rate=100, max_user_inbound_bytes_rate=0)
    b = broker_factory(config={"limits": limits, "acl": dict(ACL), "drain": dict(DRAIN)})
    t = uid("q/user")
    sub = Client((HOST, b.port), version=R.V5).connect()
    floods = []
    try:
        assert sub.subscribe(t + "/#", qos=0) == [0]
        for i in range(2):
            r = R.RawClient(HOST, b.port, version=R.V311, timeout=10)
            r.mqtt_connect(uid("greedy"), username="greedy")
            floods.append(r)
        blob = b"".join(R.publish(t + "/greedy", b"%d" % i, qos=0, version=R.V311) for i in range(1000))
        senders = [threading.Thread(target=r.send, args=(blob,), daemon=True) for r in floods]
        t0 = time.monotonic()
        for s in senders:
            s.start()
        # Another user on the same node gets through at once.
        other = R.RawClient(HOST, b.port, version=R.V5, timeout=10)
        floods.append(other)
        other.mqtt_connect(uid("other"), username="modest")
        for i in range(150):
            other.publish(t + "/modest", b"m", qos=0)
        assert other.publish_acked(t + "/modest", b"last", qos=1).reason == 0
        assert time.monotonic() - t0 < 2.0, "the other user was held up"
        time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))  # a 3 s window to measure the rate over
        got = sub.drain(0.3)
        elapsed = time.monotonic() - t0
        greedy = sum(1 for m in got if m.topic.endswith("/greedy"))
        modest = sum(1 for m in got if m.topic.endswith("/modest"))
        assert modest == 151, modest
        # Burst (100) + rate, plus one read's worth of small PUBLISHes per connection charged
        # after the fact; each connection alone would have been read at 1000/s.
        assert greedy <= 100 + 100 * elapsed + 2 * 250, f"{greedy} messages in {elapsed:.1f}s for one user at 100/s"
        assert greedy >= 100, f"only {greedy} in {elapsed:.1f}s"
        assert all(r.is_open() for r in floods), "a throttled client was disconnected"
    finally:
        for r in floods:
            r.close()
        sub.close_quietly()
