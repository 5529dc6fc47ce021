"""CONNECT / CONNACK, client ids, protocol levels, keep alive."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import mqtt_raw as R
from mqtt_client import V5, V311, Client, assert_alive, uid


def test_connect_success(clients, version):
    c = clients(version=version).connect()
    assert c.connack.reason == 0
    assert c.session_present is False


def test_session_present_flag(clients, version):
    cid = uid("sp")
    kw = dict(client_id=cid, version=version, clean=False, session_expiry=300 if version == V5 else None)
    a = clients(**kw).connect()
    assert a.session_present is False, "a brand new session must not be reported as present"
    a.disconnect()
    b = clients(**kw).connect()
    assert b.session_present is True
    b.disconnect()
    # a clean connect discards it; the flag is 0 ...
    c = clients(client_id=cid, version=version, clean=True).connect()
    assert c.session_present is False
    c.disconnect()
    # ... and the session is really gone
    d = clients(**kw).connect()
    assert d.session_present is False


def test_v5_empty_client_id_is_assigned(clients):
    c = clients(client_id="", version=V5).connect()
    assigned = c.connack.props.get("AssignedClientIdentifier")
    assert assigned, f"CONNACK must carry an Assigned Client Identifier, got {c.connack.props}"
    # and it works
    t = uid("assigned")
    assert c.subscribe(t, qos=1) == [1]
    c.publish(t, b"x", qos=1)
    assert c.get().payload == b"x"


def test_v311_empty_client_id_with_clean_session_accepted(clients):
    r = clients.raw(version=V311)
    ca = r.connect(b"", clean=True)
    assert ca.reason == 0
    assert ca.session_present is False
    r.send(R.pingreq())
    assert r.expect(R.PINGRESP).type == R.PINGRESP


def test_v311_empty_client_id_without_clean_session_rejected(clients):
    r = clients.raw(version=V311)
    ca = r.connect(b"", clean=False)
    assert ca.reason == 0x02, f"expected CONNACK 0x02 (identifier rejected), got {ca}"
    r.wait_closed(5)


@pytest.mark.parametrize("level", [6, 2, 0x7F])
def test_unsupported_protocol_level(clients, level):
    r = clients.raw(version=V311)
    r.send(R.connect(uid("lvl"), version=level))
    # A CONNECT laid out like 3.1.1 (no properties): the 3.1.1 CONNACK "unacceptable
    # protocol level" (20 02 00 01, [MQTT-3.1.2-2]), as mosquitto answers it; then the close.
    first = r.recv_packet(5)
    assert first.type == R.CONNACK, first
    assert first.body == b"\x00\x01", f"CONNACK body {first.body.hex()}"
    r.wait_closed(5)


@pytest.mark.mosquitto_differs("mosquitto 2.0.11 answers every unknown level in 3.1.1 form")
@pytest.mark.parametrize("level", [6, 99])
def test_unsupported_protocol_level_in_mqtt5_layout(clients, level):
    """A CONNECT laid out like MQTT 5 (with a property length) gets the MQTT 5 refusal:
    CONNACK 0x84 (20 03 00 84 00), then the close."""
    r = clients.raw(version=V311)
    body = R.connect(uid("lvl5"), version=V5)
    level_at = body.index(b"MQTT") + 4
    r.send(body[:level_at] + bytes([level]) + body[level_at + 1:])
    first = r.recv_packet(5)
    assert first.type == R.CONNACK, first
    assert first.body == b"\x00\x84\x00", f"CONNACK body {first.body.hex()}"
    r.wait_closed(5)


def test_second_connect_is_a_protocol_violation(clients, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("twice"))
    r.send(R.connect(uid("twice2"), version=version))
    got = r.wait_closed(5)
    for p in got:
        assert p.type == R.DISCONNECT and version == V5 and p.reason >= 0x80, f"unexpected {p}"


@pytest.mark.parametrize("first", ["pingreq", "publish", "subscribe"])
def test_first_packet_not_connect_is_closed(clients, first):
    r = clients.raw(version=V311)
    data = {"pingreq": R.pingreq(), "publish": R.publish("a/b", b"x"), "subscribe": R.subscribe(1, [("a/#", 0)])}[first]
    r.send(data)
    got = r.wait_closed(5)
    assert not any(p.type == R.CONNACK for p in got), got
    assert not any(p.type in (R.PINGRESP, R.SUBACK) for p in got), got


@pytest.mark.slow
def test_keepalive_silent_client_disconnected(clients, version):
    """A client silent for 1.5x keep alive is disconnected; one that pings stays."""
    ka = 2
    silent = clients.raw(version=version)
    pinger = clients.raw(version=version)
    silent.mqtt_connect(uid("ka-silent"), keepalive=ka)
    pinger.mqtt_connect(uid("ka-ping"), keepalive=ka)
    t0 = time.monotonic()
    stop = threading.Event()

    def ping():  # returns only when stopped; raises if a PINGRESP does not come
        while not stop.wait(1.0):
            pinger.send(R.pingreq())
            pinger.expect(R.PINGRESP, 3)

    with ThreadPoolExecutor(1) as pool:
        pinging = pool.submit(ping)
        try:
            got = silent.wait_closed(ka * 1.5 + 3)
            elapsed = time.monotonic() - t0
            assert elapsed >= ka * 1.0, f"closed too early ({elapsed:.2f}s) for keep alive {ka}s"
            for p in got:
                assert p.type == R.DISCONNECT and version == V5 and p.reason == 0x8D, f"unexpected {p}"
            # The pinging client must outlive twice its keep alive: only time passing shows that.
            time.sleep(max(0.0, ka * 2 + 0.5 - (time.monotonic() - t0)))
            assert pinger.is_open() and not pinging.done(), \
                f"pinging client was dropped: {pinging.exception() if pinging.done() else 'socket closed'}"
        finally:
            stop.set()
        pinging.result(timeout=5)


def test_keepalive_zero_is_accepted(clients, version):
    c = clients(version=version, keepalive=0).connect()
    assert c.connack.reason == 0


@pytest.mark.parametrize("asked", ["above", "zero"])
def test_v5_server_keepalive(clients, target, asked):
    """A v5 client asking for more than the server maximum gets Server Keep Alive in CONNACK."""
    mx = target.limits["max_keepalive"]
    ka = mx + 50 if asked == "above" else 0
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("ska"), keepalive=ka)
    if asked == "above":
        assert ca.props.get("ServerKeepAlive") == mx, ca
    else:
        # 0 (no keep alive) may be kept, or replaced by a server value no larger than the maximum
        assert ca.props.get("ServerKeepAlive", 0) <= mx, ca


@pytest.mark.jetmq_only("limits configured through JETMQ_LIMITS__* environment variables")
def test_max_keepalive_from_env(broker_factory, nats):
    b = broker_factory(extra_env={"JETMQ_LIMITS__MAX_KEEPALIVE": "30"}, config={})
    r = R.RawClient(b.host, b.port, version=V5)
    try:
        ca = r.mqtt_connect(uid("envka"), keepalive=60)
        assert ca.props.get("ServerKeepAlive") == 30, ca
    finally:
        r.close()


def test_connack_then_ping(clients, version):
    r = clients.raw(version=version)
    r.mqtt_connect(uid("ping"))
    for _ in range(3):
        r.send(R.pingreq())
        r.expect(R.PINGRESP)


def test_many_clients_connect(target):
    """50 concurrent connections, all get CONNACK (bounded)."""
    cs = [R.RawClient(*target, version=V311) for _ in range(50)]
    try:
        for i, c in enumerate(cs):
            c.send(R.connect(uid(f"many{i}")))
        for c in cs:
            assert c.expect(R.CONNACK).reason == 0
    finally:
        for c in cs:
            c.close()
    assert_alive(target)


def test_username_password_accepted(clients, version):
    c = clients(version=version, username="alice", password="secret").connect()
    assert c.connack.reason == 0


def test_client_disconnect_then_reconnect_same_id(clients, version):
    cid = uid("rc")
    a = clients(client_id=cid, version=version).connect()
    a.disconnect()
    b = clients(client_id=cid, version=version).connect()
    assert b.connack.reason == 0


def test_paho_defaults_smoke(target):
    with Client(target, version=V311) as c:
        c.connect()
        t = uid("smoke")
        c.subscribe(t, qos=2)
        c.publish(t, b"hello", qos=2)
        assert c.get().payload == b"hello"
