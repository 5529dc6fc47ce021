"""QoS 0/1/2 in both directions, exact packet flows, ordering, payload integrity."""

import os

import pytest

import mqtt_raw as R
from mqtt_client import V311, uid


@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_qos_roundtrip(clients, version, pub_qos, sub_qos):
    t = uid("qos")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    assert sub.subscribe(t, qos=sub_qos) == [sub_qos]
    assert pub.publish(t, b"payload", qos=pub_qos) == 0
    m = sub.get()
    assert (m.topic, m.payload) == (t, b"payload")
    assert m.qos == min(pub_qos, sub_qos), "delivered QoS is the minimum of publish and subscription QoS"
    assert m.retain is False
    sub.expect_none(0.3)


def test_qos1_flow_raw(clients, version):
    t = uid("flow1")
    sub = clients.raw(version=version)
    pub = clients.raw(version=version)
    sub.mqtt_connect(uid("s"))
    pub.mqtt_connect(uid("p"))
    assert sub.subscribe([(t, 1)]).reasons == [1]
    pid = pub.publish(t, b"one", qos=1, packet_id=4242)
    ack = pub.expect(R.PUBACK)
    assert ack.packet_id == pid == 4242
    assert ack.reason == 0
    p = sub.expect(R.PUBLISH)
    assert (p.topic, p.payload, p.qos, p.dup) == (t.encode(), b"one", 1, False)
    assert p.packet_id and p.packet_id != 0
    sub.send(R.ack(R.PUBACK, p.packet_id, version))
    # nothing else arrives (no redelivery after PUBACK)
    with pytest.raises(TimeoutError):
        sub.recv_packet(0.5)


def test_qos2_flow_raw(clients, version):
    t = uid("flow2")
    sub = clients.raw(version=version)
    pub = clients.raw(version=version)
    sub.mqtt_connect(uid("s"))
    pub.mqtt_connect(uid("p"))
    assert sub.subscribe([(t, 2)]).reasons == [2]
    pub.publish(t, b"two", qos=2, packet_id=77)
    rec = pub.expect(R.PUBREC)
    assert rec.packet_id == 77 and rec.reason == 0
    assert rec.flags == 0
    pub.send(R.ack(R.PUBREL, 77, version))
    comp = pub.expect(R.PUBCOMP)
    assert comp.packet_id == 77 and comp.reason == 0
    # outgoing leg: PUBLISH -> PUBREC -> PUBREL -> PUBCOMP
    p = sub.expect(R.PUBLISH)
    assert (p.topic, p.payload, p.qos) == (t.encode(), b"two", 2)
    sub.send(R.ack(R.PUBREC, p.packet_id, version))
    rel = sub.expect(R.PUBREL)
    assert rel.packet_id == p.packet_id
    assert rel.flags == 0x02, "PUBREL fixed header flags must be 0010"
    sub.send(R.ack(R.PUBCOMP, p.packet_id, version))
    with pytest.raises(TimeoutError):
        sub.recv_packet(0.5)


def test_qos2_duplicate_publish_delivered_once(clients, version):
    """A QoS 2 PUBLISH resent with DUP before PUBREL is not delivered twice."""
    t = uid("dup2")
    sub = clients.connect(version=version)
    sub.subscribe(t, qos=2)
    pub = clients.raw(version=version)
    pub.mqtt_connect(uid("p"))
    pub.publish(t, b"once", qos=2, packet_id=9)
    assert pub.expect(R.PUBREC).packet_id == 9
    pub.publish(t, b"once", qos=2, packet_id=9, dup=True)
    assert pub.expect(R.PUBREC).packet_id == 9
    pub.send(R.ack(R.PUBREL, 9, version))
    assert pub.expect(R.PUBCOMP).packet_id == 9
    assert sub.get().payload == b"once"
    sub.expect_none(1.0)


def test_qos1_puback_then_packet_id_reuse(clients, version):
    """After PUBACK the packet id is free again: a new PUBLISH with the same id is a new message."""
    t = uid("reuse")
    sub = clients.connect(version=version)
    sub.subscribe(t, qos=1)
    pub = clients.raw(version=version)
    pub.mqtt_connect(uid("p"))
    for i in range(3):
        pub.publish(t, f"m{i}".encode(), qos=1, packet_id=5)
        assert pub.expect(R.PUBACK).packet_id == 5
    assert [m.payload for m in sub.expect(3)] == [b"m0", b"m1", b"m2"]


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_order_per_topic(clients, version, qos):
    t = uid("order")
    n = 200
    sub = clients.connect(version=version)
    pub = clients.connect(version=version, max_inflight=10)  # below the receive maximum (20)
    sub.subscribe(t, qos=qos)
    infos = [pub.publish(t, str(i).encode(), qos=qos, wait=False) for i in range(n)]
    for info in infos:
        info.wait_for_publish(30)
    if qos == 0:
        got = [int(m.payload) for m in sub.drain(1.0)]
        assert got, "no QoS 0 message arrived at all"
        assert got == sorted(got) and len(set(got)) == len(got), "QoS 0 messages out of order or duplicated"
    else:
        got = [int(m.payload) for m in sub.expect(n, timeout=30)]
        assert got == list(range(n)), "messages on one topic must arrive in publish order"


@pytest.mark.parametrize(
    "kind",
    ["binary", "empty", "100k", "utf8", "nul"],
)
@pytest.mark.parametrize("qos", [0, 2])
def test_payload_intact(clients, version, kind, qos):
    payload = {
        "binary": bytes(range(256)) * 4,
        "empty": b"",
        "100k": os.urandom(100 * 1024),
        "utf8": "grüße 🚀 – ünïcödé".encode(),
        "nul": b"\x00" * 10 + b"end",
    }[kind]
    t = uid("payload")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe(t, qos=qos)
    pub.publish(t, payload, qos=qos)
    m = sub.get(10)
    assert m.payload == payload
    assert len(m.payload) == len(payload)


def test_many_topics_one_subscriber(clients, version):
    base = uid("many")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe([(f"{base}/{i}", 1) for i in range(20)])
    for i in range(20):
        pub.publish(f"{base}/{i}", str(i).encode(), qos=1)
    got = sorted(int(m.payload) for m in sub.expect(20))
    assert got == list(range(20))


def test_publisher_receives_own_message(clients, version):
    """Without No Local, a client subscribed to its own topic gets its own messages."""
    t = uid("self")
    c = clients.connect(version=version)
    c.subscribe(t, qos=1)
    c.publish(t, b"me", qos=1)
    assert c.get().payload == b"me"


def test_fan_out_to_many_subscribers(clients, version):
    t = uid("fan")
    subs = [clients.connect(version=version) for _ in range(10)]
    for s in subs:
        s.subscribe(t, qos=1)
    pub = clients.connect(version=V311)
    pub.publish(t, b"all", qos=1)
    for s in subs:
        assert s.get().payload == b"all"
