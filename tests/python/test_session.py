"""Persistent sessions, session expiry, redelivery and takeover on one node."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import V5, uid


def persistent(clients, cid, version, expiry=300, **kw):
    """A client with clean session 0 (3.1.1) / clean start 0 + session expiry (5.0)."""
    return clients(client_id=cid, version=version, clean=False, session_expiry=expiry if version == V5 else None, **kw)


class GoneSignal:
    """A will (no delay) for a client under test, and a watcher that receives it: when the will
    arrives, the server has seen that client's connection end (for closes without DISCONNECT)."""

    def __init__(self, clients, version):
        self.topic = uid("gone")
        self.watcher = clients.connect(version=version)
        assert self.watcher.subscribe(self.topic, qos=1) == [1]
        self.will = {"topic": self.topic, "payload": b"gone", "qos": 1}

    def wait(self, timeout: float = 10.0) -> None:
        try:
            m = self.watcher.get(timeout)
        except AssertionError:
            raise AssertionError(f"the server did not end the closed connection within {timeout}s "
                                 f"(no will on {self.topic})") from None
        assert m.payload == b"gone", m


def test_subscriptions_survive_reconnect(clients, version):
    cid, t = uid("ps"), uid("ps-topic")
    a = persistent(clients, cid, version).connect()
    a.subscribe(t, qos=1)
    a.disconnect()
    b = persistent(clients, cid, version).connect()
    assert b.session_present
    pub = clients.connect(version=version)
    pub.publish(t, b"after reconnect", qos=1)
    assert b.get().payload == b"after reconnect"


def test_offline_messages_delivered_after_reconnect(clients, version):
    cid, t = uid("off"), uid("off-topic")
    a = persistent(clients, cid, version).connect()
    assert a.subscribe(t, qos=2) == [2]
    a.disconnect()
    pub = clients.connect(version=version)
    for i in range(5):
        pub.publish(t, f"q1-{i}".encode(), qos=1)
        pub.publish(t, f"q2-{i}".encode(), qos=2)
        pub.publish(t, f"q0-{i}".encode(), qos=0)
    # publish() returned on each QoS 1/2 acknowledgement: the messages are stored (QoS 0 is not checked)
    b = persistent(clients, cid, version).connect()
    assert b.session_present
    got = [m.payload.decode() for m in b.drain(1.5)]
    # order is guaranteed per topic and QoS level (MQTT 5 4.6), not across QoS levels
    for q in (1, 2):
        assert [p for p in got if p.startswith(f"q{q}")] == [f"q{q}-{i}" for i in range(5)], \
            f"QoS {q} messages queued while offline must all arrive, in order: {got}"
    # QoS 0 offline messages may be dropped (or kept); if kept they are in order
    q0 = [p for p in got if p.startswith("q0")]
    assert q0 == sorted(q0)


def test_offline_messages_qos_downgraded_to_subscription(clients, version):
    cid, t = uid("offq"), uid("offq-topic")
    a = persistent(clients, cid, version).connect()
    a.subscribe(t, qos=1)
    a.disconnect()
    pub = clients.connect(version=version)
    pub.publish(t, b"x", qos=2)
    b = persistent(clients, cid, version).connect()
    m = b.get()
    assert m.payload == b"x" and m.qos == 1


def test_clean_start_discards_session(clients, version):
    cid, t = uid("clean"), uid("clean-topic")
    a = persistent(clients, cid, version).connect()
    a.subscribe(t, qos=1)
    a.disconnect()
    pub = clients.connect(version=version)
    pub.publish(t, b"queued", qos=1)
    b = clients(client_id=cid, version=version, clean=True).connect()
    assert not b.session_present
    b.expect_none(1.0)
    pub.publish(t, b"after clean start", qos=1)
    b.expect_none(0.7)  # the subscription was discarded too


def test_v5_session_expiry_zero_ends_session_at_disconnect(clients):
    cid, t = uid("se0"), uid("se0-topic")
    a = clients(client_id=cid, version=V5, clean=False, session_expiry=0).connect()
    a.subscribe(t, qos=1)
    a.disconnect()
    b = clients(client_id=cid, version=V5, clean=False, session_expiry=0).connect()
    assert not b.session_present


@pytest.mark.slow
def test_v5_session_expiry(clients):
    cid, t = uid("sexp"), uid("sexp-topic")
    a = clients(client_id=cid, version=V5, clean=False, session_expiry=2).connect()
    a.subscribe(t, qos=1)
    a.disconnect()
    # within the interval the session is there
    b = clients(client_id=cid, version=V5, clean=False, session_expiry=2).connect()
    assert b.session_present
    b.disconnect()
    pub = clients.connect(version=V5)
    time.sleep(3.5)  # the session's 2 s expiry runs out: only time passing ends it
    pub.publish(t, b"after expiry", qos=1)
    c = clients(client_id=cid, version=V5, clean=False, session_expiry=2).connect()
    assert not c.session_present, "the session must be gone after its expiry interval"
    c.expect_none(1.0)


def test_v5_disconnect_sets_session_expiry_zero(clients):
    cid = uid("dse")
    a = clients(client_id=cid, version=V5, clean=False, session_expiry=300).connect()
    a.subscribe(uid("dse-topic"), qos=1)
    a.disconnect(props={"SessionExpiryInterval": 0})
    b = clients(client_id=cid, version=V5, clean=False, session_expiry=300).connect()
    assert not b.session_present, "DISCONNECT with Session Expiry Interval 0 ends the session"


@pytest.mark.parametrize("expiry_prop", [None, 10**7])
def test_v5_session_expiry_connack(clients, target, expiry_prop):
    """If the server uses a different session expiry than requested, it says so in CONNACK."""
    r = clients.raw(version=V5)
    props = {} if expiry_prop is None else {"SessionExpiryInterval": expiry_prop}
    ca = r.mqtt_connect(uid("sec"), clean=False, props=props)
    if "SessionExpiryInterval" in ca.props:
        assert ca.props["SessionExpiryInterval"] <= (expiry_prop or 0) or expiry_prop is None
    r.disconnect()


@pytest.mark.jetmq_only("mosquitto does not clamp the session expiry to a configured maximum")
def test_v5_session_expiry_clamped_to_server_max(clients, target):
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("seclamp"), clean=False, props={"SessionExpiryInterval": 10**7})
    assert ca.props.get("SessionExpiryInterval") == target.limits["max_session_expiry"], ca
    r.disconnect(props={"SessionExpiryInterval": 0}, reason=0)


def test_unacked_qos1_resent_with_dup_after_reconnect(clients, version):
    cid, t = uid("dup1"), uid("dup1-topic")
    gone = GoneSignal(clients, version)
    r = clients.raw(version=version)
    r.mqtt_connect(cid, clean=False, props={"SessionExpiryInterval": 300} if version == V5 else None, will=gone.will)
    r.subscribe([(t, 1)])
    pub = clients.connect(version=version)
    pub.publish(t, b"ack me", qos=1)
    p = r.expect(R.PUBLISH)
    assert p.qos == 1 and not p.dup
    r.close()  # no PUBACK
    gone.wait()  # a reconnect, not a takeover of a connection the server still holds
    r2 = clients.raw(version=version)
    ca = r2.mqtt_connect(cid, clean=False, props={"SessionExpiryInterval": 300} if version == V5 else None)
    assert ca.session_present
    again = r2.expect(R.PUBLISH)
    assert again.payload == b"ack me"
    assert again.dup, "a resent PUBLISH must have DUP set"
    assert again.packet_id == p.packet_id, "resent PUBLISH keeps its packet identifier"
    r2.send(R.ack(R.PUBACK, again.packet_id, version))
    with pytest.raises(TimeoutError):
        r2.recv_packet(0.7)


def test_messages_queued_while_offline_are_first_deliveries(clients, version):
    """On resume, only what the previous connection did send comes again with DUP 1; messages
    that arrived while the client was away go out as first deliveries (DUP 0)."""
    cid, t = uid("dup0"), uid("dup0-topic")
    props = {"SessionExpiryInterval": 300} if version == V5 else None
    gone = GoneSignal(clients, version)
    r = clients.raw(version=version)
    r.mqtt_connect(cid, clean=False, props=props, will=gone.will)
    r.subscribe([(t, 1)])
    pub = clients.connect(version=version)
    pub.publish(t, b"sent", qos=1)
    first = r.expect(R.PUBLISH)
    assert first.payload == b"sent" and not first.dup
    r.close()  # no PUBACK
    gone.wait()  # the messages below arrive while the client is away
    for payload in (b"queued-1", b"queued-2"):
        pub.publish(t, payload, qos=1)
    r2 = clients.raw(version=version)
    assert r2.mqtt_connect(cid, clean=False, props=props).session_present
    got = []
    for _ in range(3):
        p = r2.expect(R.PUBLISH)
        got.append((p.payload, p.dup))
        r2.send(R.ack(R.PUBACK, p.packet_id, version))
    assert got == [(b"sent", True), (b"queued-1", False), (b"queued-2", False)], got


def test_qos2_pubrel_resent_after_reconnect(clients, version):
    cid, t = uid("rel2"), uid("rel2-topic")
    gone = GoneSignal(clients, version)
    r = clients.raw(version=version)
    props = {"SessionExpiryInterval": 300} if version == V5 else None
    r.mqtt_connect(cid, clean=False, props=props, will=gone.will)
    r.subscribe([(t, 2)])
    pub = clients.connect(version=version)
    pub.publish(t, b"exactly once", qos=2)
    p = r.expect(R.PUBLISH)
    r.send(R.ack(R.PUBREC, p.packet_id, version))
    rel = r.expect(R.PUBREL)
    r.close()  # no PUBCOMP
    gone.wait()  # a reconnect, not a takeover of a connection the server still holds
    r2 = clients.raw(version=version)
    assert r2.mqtt_connect(cid, clean=False, props=props).session_present
    again = r2.recv_packet(5)
    assert again.type == R.PUBREL and again.packet_id == rel.packet_id, \
        f"after PUBREC the server resends PUBREL, not the PUBLISH: {again}"
    r2.send(R.ack(R.PUBCOMP, again.packet_id, version))
    with pytest.raises(TimeoutError):
        r2.recv_packet(0.7)


def test_inbound_qos2_state_survives_reconnect(clients, version):
    """Client->server QoS 2: PUBLISH, PUBREC, reconnect, PUBREL -> PUBCOMP, delivered exactly once."""
    cid, t = uid("in2"), uid("in2-topic")
    sub = clients.connect(version=version)
    sub.subscribe(t, qos=2)
    props = {"SessionExpiryInterval": 300} if version == V5 else None
    r = clients.raw(version=version)
    r.mqtt_connect(cid, clean=False, props=props)
    r.publish(t, b"in-flight", qos=2, packet_id=11)
    assert r.expect(R.PUBREC).packet_id == 11
    r.close()
    r2 = clients.raw(version=version)
    assert r2.mqtt_connect(cid, clean=False, props=props).session_present
    r2.send(R.ack(R.PUBREL, 11, version))
    assert r2.expect(R.PUBCOMP).packet_id == 11
    got = sub.drain(1.0)
    assert [m.payload for m in got] == [b"in-flight"]


# mosquitto 2.0.11 closes the old connection without sending DISCONNECT 0x8E; jetmq must send it.
def test_takeover_same_node(clients, target, version):
    cid = uid("take")
    a = clients(client_id=cid, version=version).connect()
    b = clients(client_id=cid, version=version).connect()
    assert b.connack.reason == 0
    d = a.wait_disconnect(10)
    if version == V5 and not target.is_mosquitto:
        assert d.from_server and d.reason == 0x8E, f"old connection must get DISCONNECT 0x8E (session taken over): {d}"
    # the new connection works
    t = uid("take-topic")
    b.subscribe(t, qos=1)
    b.publish(t, b"mine", qos=1)
    assert b.get().payload == b"mine"


def test_takeover_keeps_persistent_session(clients, version):
    cid, t = uid("takeps"), uid("takeps-topic")
    a = persistent(clients, cid, version).connect()
    a.subscribe(t, qos=1)
    b = persistent(clients, cid, version).connect()
    assert b.session_present
    a.wait_disconnect(10)
    pub = clients.connect(version=version)
    pub.publish(t, b"to the new connection", qos=1)
    assert b.get().payload == b"to the new connection"
    a.expect_none(0.3)


def test_takeover_raw_old_socket_closed(clients, target, version):
    cid = uid("takeraw")
    old = clients.raw(version=version)
    old.mqtt_connect(cid)
    new = clients.raw(version=version)
    new.mqtt_connect(cid)
    got = old.wait_closed(10)
    if version == V5 and not target.is_mosquitto:  # mosquitto 2.0.11 sends no DISCONNECT 0x8E
        assert [p.reason for p in got if p.type == R.DISCONNECT] == [0x8E], got
    else:
        assert not got, f"3.1.1 has no server DISCONNECT: {got}"
    new.send(R.pingreq())
    new.expect(R.PINGRESP)


def test_offline_queue_survives_multiple_reconnects(clients, version):
    cid, t = uid("multi"), uid("multi-topic")
    pub = clients.connect(version=version)
    a = persistent(clients, cid, version).connect()
    a.subscribe(t, qos=1)
    a.disconnect()
    expected = []
    for round_ in range(3):
        for i in range(3):
            payload = f"{round_}-{i}".encode()
            pub.publish(t, payload, qos=1)
            expected.append(payload)
        c = persistent(clients, cid, version).connect()
        assert c.session_present
        got = [m.payload for m in c.expect(3)]
        assert got == expected[-3:]
        c.disconnect()
