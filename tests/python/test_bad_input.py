"""Hostile and broken clients. After each, the node must still serve a fresh client."""

import os
import random
import struct
import time

import pytest

import mqtt_raw as R
from mqtt_client import V5, V311, assert_alive, uid


def closes(r: R.RawClient, version: int, timeout: float = 5.0):
    """Assert the server closes the connection; in v5 an optional DISCONNECT must carry an error code."""
    got = r.wait_closed(timeout)
    for p in got:
        if p.type == R.DISCONNECT:
            assert version == V5 and p.reason >= 0x80, f"unexpected {p}"
        else:
            assert p.type in (R.CONNACK, R.PUBACK, R.PUBREC, R.SUBACK), f"unexpected {p} before close"
    return got


@pytest.fixture
def alive(target):
    """Checks, after the test body, that the node still works."""
    yield
    assert_alive(target)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_garbage_before_connect(clients, alive, seed):
    rnd = random.Random(seed)
    data = bytes(rnd.randrange(256) for _ in range(4096))
    if data[0] >> 4 == R.CONNECT:
        data = b"\xff" + data[1:]
    r = clients.raw(version=V311)
    r.send(data)
    got = closes(r, V311)
    assert not any(p.type == R.CONNACK and p.reason == 0 for p in got)


def test_random_garbage_after_connect(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("garbage"))
    rnd = random.Random(42)
    r.send(b"\x00" + bytes(rnd.randrange(256) for _ in range(2048)))  # packet type 0 is reserved
    closes(r, version)


def test_huge_remaining_length_connect(clients, alive):
    """A fixed header announcing the maximum encodable length (256 MB; 300 MB cannot be encoded) must not make the server allocate or wait for it."""
    r = clients.raw(version=V311)
    r.send(b"\x10" + R.varint(268_435_455) + b"\x00\x04MQTT\x04\x02\x00\x3c")
    closes(r, V311)


def test_huge_remaining_length_publish(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("huge"))
    r.send(b"\x30" + R.varint(268_435_455) + b"\x00\x01a" + b"x" * 1000)
    got = closes(r, version)
    if version == V5:
        codes = [p.reason for p in got if p.type == R.DISCONNECT]
        assert codes in ([], [0x95]), got


def test_malformed_remaining_length(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("varint"))
    r.send(b"\x30\xff\xff\xff\xff\x7f")  # 5-byte remaining length
    closes(r, version)


def test_packet_over_max_packet_size(clients, alive, target, version):
    mx = target.limits["max_packet_size"]
    t = uid("over")
    sub = clients.connect(version=version)
    sub.subscribe(t, qos=0)
    r = clients.raw(version=version)
    r.mqtt_connect(uid("big"))
    r.send(R.publish(t, b"o" * (mx + 1), qos=0, version=version))
    closes(r, version, 10)
    sub.expect_none(0.5)


@pytest.mark.parametrize("topic", [b"a/\xff\xfe", b"a/\xc0\xaf", b"a\x00b", b"\xed\xa0\x80"],
                         ids=["ff-fe", "overlong", "nul", "surrogate"])
def test_invalid_utf8_topic(clients, alive, version, topic):
    sub = clients.connect(version=version)
    sub.subscribe("a/#", qos=0)
    r = clients.raw(version=version)
    r.mqtt_connect(uid("utf8"))
    r.send(R.publish(topic, b"bad", qos=1, packet_id=1, version=version))
    closes(r, version)
    assert not [m for m in sub.drain(0.5) if m.payload == b"bad"]


def test_invalid_utf8_subscribe_filter(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("utf8f"))
    r.send(R.subscribe(1, [(b"x/\xff", 0)], version))
    closes(r, version)


def test_invalid_utf8_client_id(clients, alive, version):
    r = clients.raw(version=version)
    r.send(R.connect(b"id-\xff\xfe", version=version))
    got = r.wait_closed(5)
    assert not any(p.type == R.CONNACK and p.reason == 0 for p in got), got


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", "#", "+"])
def test_publish_topic_with_wildcards(clients, alive, version, topic):
    sub = clients.connect(version=version)
    sub.subscribe("a/#", qos=0)
    r = clients.raw(version=version)
    r.mqtt_connect(uid("wild"))
    r.send(R.publish(topic, b"wild", qos=1, packet_id=1, version=version))
    got = closes(r, version)
    if version == V5 and [p for p in got if p.type == R.DISCONNECT]:
        assert [p.reason for p in got if p.type == R.DISCONNECT][0] in (0x90, 0x82, 0x81), got
    assert not [m for m in sub.drain(0.5) if m.payload == b"wild"]


def test_publish_empty_topic_without_alias(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("empty"))
    r.send(R.publish(b"", b"x", qos=0, version=version))
    closes(r, version)


def test_publish_qos3(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("qos3"))
    r.send(R.fixed(R.PUBLISH, 0x06, R.mqtt_str("a/b") + b"\x00\x01" + (b"\x00" if version == V5 else b"") + b"x"))
    closes(r, version)


def test_qos1_publish_with_packet_id_zero(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("pid0"))
    r.send(R.publish("a/b", b"x", qos=1, packet_id=0, version=version))
    closes(r, version)


@pytest.mark.parametrize("what", ["subscribe-flags", "pubrel-flags", "connect-reserved", "empty-subscribe",
                                  "subscribe-qos3", "reserved-type-15-v311"])
def test_protocol_violations(clients, alive, version, what):
    r = clients.raw(version=version)
    if what == "connect-reserved":
        r.send(R.connect(uid("res"), version=version, reserved_flag=True))
        got = r.wait_closed(5)
        assert not any(p.type == R.CONNACK and p.reason == 0 for p in got), got
        return
    r.mqtt_connect(uid("viol"))
    if what == "subscribe-flags":
        data = R.subscribe(1, [("a/b", 0)], version, flags=0x00)
    elif what == "pubrel-flags":
        data = R.fixed(R.PUBREL, 0x00, b"\x00\x01")
    elif what == "empty-subscribe":
        data = R.fixed(R.SUBSCRIBE, 0x02, b"\x00\x01" + (b"\x00" if version == V5 else b""))
    elif what == "subscribe-qos3":
        data = R.subscribe(1, [("a/b", 3)], version)
    else:
        if version == V5:
            pytest.skip("AUTH (15) is valid in v5")
        data = R.fixed(15, 0, b"")
    r.send(data)
    closes(r, version)


@pytest.mark.slow
@pytest.mark.mosquitto_differs("mosquitto 2.0.11 has no CONNECT timeout: a half-sent CONNECT is kept open")
def test_slowloris_connect(clients, alive, target):
    """A CONNECT sent one byte per second is cut off after the CONNECT timeout."""
    timeout_s = target.limits["connect_timeout_ms"] / 1000
    pkt = R.connect(uid("slow"), version=V311, keepalive=60)
    r = clients.raw(version=V311)
    t0 = time.monotonic()
    closed_at = None
    for i, byte in enumerate(pkt[:-1]):  # never send the last byte
        if not r.send(bytes([byte])) or not r.is_open():
            closed_at = time.monotonic() - t0
            break
        if time.monotonic() - t0 > timeout_s + 6:
            break
        time.sleep(1.0)  # one byte a second: the slowloris this test is about
    if closed_at is None:
        try:
            r.wait_closed(max(0.5, timeout_s + 6 - (time.monotonic() - t0)))
            closed_at = time.monotonic() - t0
        except AssertionError:
            pass
    assert closed_at is not None, f"slowloris CONNECT still open after {time.monotonic() - t0:.1f}s"
    assert closed_at <= timeout_s + 3, f"closed after {closed_at:.1f}s, CONNECT timeout is {timeout_s}s"


@pytest.mark.slow
@pytest.mark.mosquitto_differs("mosquitto 2.0.11 has no CONNECT timeout: an idle socket is kept open")
def test_idle_socket_without_connect(clients, alive, target):
    timeout_s = target.limits["connect_timeout_ms"] / 1000
    r = clients.raw(version=V311)
    t0 = time.monotonic()
    r.wait_closed(timeout_s + 4)
    assert time.monotonic() - t0 >= timeout_s * 0.5


@pytest.mark.slow
def test_slow_reader_does_not_hurt_the_broker(clients, target):
    """Two subscribers (QoS 0 and QoS 1) that never read while 12000 x 16 KB messages (~190 MB
    each, ~380 MB of backlog) are published: the broker drops or disconnects them, keeps serving
    others, and its memory levels off (bounded by its queue limits, not by what was published)."""
    t = uid("slowread")
    payload = b"S" * 16384
    n = int(os.environ.get("JETMQ_TEST_SLOW_READER_MESSAGES", "12000"))
    readers = []
    for qos in (0, 1):
        r = clients.raw(version=V5, rcvbuf=4096)
        r.mqtt_connect(uid(f"never-reads-{qos}"))
        r.subscribe([(t, qos)])
        readers.append(r)
    probe = clients.connect(version=V5)
    probe_t = uid("probe")
    probe.subscribe(probe_t, qos=1)
    proc = target.process
    rss = (lambda: proc.rss_bytes() or 0) if proc is not None else None
    samples = {}
    pub = clients.connect(version=V5, max_inflight=16)
    deadline = time.monotonic() + 120
    sent = 0
    for i in range(n):
        if time.monotonic() > deadline:
            break
        info = pub.publish(t, payload, qos=1, wait=False)
        if i % 16 == 15:
            info.wait_for_publish(30)
        sent += 1
        if i % 1000 == 0:
            # others are still served meanwhile
            pub.publish(probe_t, str(i).encode(), qos=1)
            assert probe.get(15).payload == str(i).encode()
            if rss:
                samples[i] = rss()
    assert sent >= n // 4, f"publisher could only send {sent} messages in 120s"
    assert_alive(target)
    if rss and sent == n:
        samples[n] = rss()
        mb = {k: round(v / 2**20) for k, v in samples.items()}
        first, mid, last = samples[0], samples[max(k for k in samples if k <= n // 2)], samples[n]
        backlog = 2 * sent * len(payload)
        assert last - mid < 48 * 2**20, f"broker memory keeps growing with the backlog (MB at message #): {mb}"
        assert max(samples.values()) - first < backlog / 2, f"broker memory follows the backlog: {mb}"


def test_many_half_open_connections(clients, alive, target):
    """50 sockets that connect and send nothing do not block new clients."""
    socks = [clients.raw(version=V311) for _ in range(50)]
    assert_alive(target)
    for s in socks:
        s.close()


def test_connect_flood_then_abort(target, alive):
    """100 connections that send CONNECT and immediately reset."""
    for i in range(100):
        r = R.RawClient(*target, version=V311)
        r.send(R.connect(uid(f"flood{i}")))
        r.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_LINGER, struct.pack("ii", 1, 0))
        r.close()


def test_truncated_packet_then_close(clients, alive, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("trunc"))
    pkt = R.publish("a/b", b"x" * 100, qos=1, packet_id=3, version=version)
    r.send(pkt[:50])
    r.close()


def test_password_without_username_v311(clients, alive):
    r = clients.raw(version=V311)
    r.send(R.connect(uid("pw"), version=V311, password=b"secret"))
    got = r.wait_closed(5)
    assert not any(p.type == R.CONNACK and p.reason == 0 for p in got), got


def test_wrong_protocol_name(clients, alive):
    r = clients.raw(version=V311)
    r.send(R.connect(uid("name"), version=V311, protocol_name=b"MQTX"))
    got = r.wait_closed(5)
    assert not any(p.type == R.CONNACK and p.reason == 0 for p in got), got


def test_subscription_storm(clients, alive, version):
    """One client with 500 subscriptions, then unsubscribing them all (bounded)."""
    c = clients.connect(version=version)
    b = uid("storm")
    for chunk in range(10):
        filters = [(f"{b}/{chunk}/{i}", 1) for i in range(50)]
        assert c.subscribe(filters) == [1] * 50
    pub = clients.connect(version=version)
    pub.publish(f"{b}/9/49", b"last", qos=1)
    assert c.get().payload == b"last"
    for chunk in range(10):
        c.unsubscribe([f"{b}/{chunk}/{i}" for i in range(50)])
    pub.publish(f"{b}/9/49", b"gone", qos=1)
    c.expect_none(0.7)
