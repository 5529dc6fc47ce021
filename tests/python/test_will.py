"""Will messages."""

import time

import pytest

import harness
from mqtt_client import V5, V311, uid


def _will(topic, payload=b"gone", qos=1, retain=False, props=None):
    return {"topic": topic, "payload": payload, "qos": qos, "retain": retain, "props": props}


def test_will_on_abrupt_disconnect(clients, version):
    t = uid("will")
    watcher = clients.connect(version=version)
    watcher.subscribe(t, qos=1)
    w = clients.connect(version=version, will=_will(t, b"abrupt"))
    w.abort()
    m = watcher.get(10)
    assert (m.topic, m.payload, m.qos) == (t, b"abrupt", 1)
    watcher.expect_none(0.5)


def test_no_will_on_normal_disconnect(clients, version):
    t = uid("nowill")
    watcher = clients.connect(version=version)
    watcher.subscribe(t, qos=1)
    w = clients.connect(version=version, will=_will(t))
    w.disconnect()
    watcher.expect_none(2.0)


def test_v5_disconnect_with_will_message_publishes_will(clients):
    t = uid("will04")
    watcher = clients.connect(version=V5)
    watcher.subscribe(t, qos=1)
    w = clients.connect(version=V5, will=_will(t, b"asked-for"))
    w.disconnect(reason=0x04)
    assert watcher.get(10).payload == b"asked-for"


@pytest.mark.slow
def test_v5_will_delay(clients):
    t = uid("willdelay")
    watcher = clients.connect(version=V5)
    watcher.subscribe(t, qos=1)
    w = clients.connect(version=V5, session_expiry=30, clean=True,
                        will=_will(t, b"delayed", props={"WillDelayInterval": 2}))
    w.abort()
    t0 = time.monotonic()
    watcher.expect_none(1.2)
    m = watcher.get(8)
    elapsed = time.monotonic() - t0
    assert m.payload == b"delayed"
    assert elapsed >= 1.5, f"will published after {elapsed:.2f}s, before its 2s delay"


@pytest.mark.slow
def test_v5_will_delay_cancelled_by_reconnect(clients):
    t = uid("willcancel")
    cid = uid("wc")
    watcher = clients.connect(version=V5)
    watcher.subscribe(t, qos=1)
    w = clients.connect(client_id=cid, version=V5, session_expiry=30,
                        will=_will(t, b"must not appear", props={"WillDelayInterval": 3}))
    w.abort()
    time.sleep(0.5)  # let the server see the drop (a reconnect, not a takeover), well within the 3 s delay
    back = clients.connect(client_id=cid, version=V5, session_expiry=30, clean=False)
    assert back.session_present
    watcher.expect_none(4.5)
    back.disconnect()


@pytest.mark.slow
def test_v5_will_published_at_session_end_if_shorter_than_delay(clients):
    """The will is sent when the session ends, even if the will delay is longer."""
    t = uid("willexp")
    watcher = clients.connect(version=V5)
    watcher.subscribe(t, qos=1)
    w = clients.connect(version=V5, session_expiry=1, will=_will(t, b"at-expiry", props={"WillDelayInterval": 60}))
    w.abort()
    assert watcher.get(8).payload == b"at-expiry"


def test_will_retain(clients, version):
    t = uid("willret")
    # Subscribing while the will goes out may see it twice, live and as the retained copy;
    # this test is about the retained copy, so it looks once the will is out.
    watcher = clients.connect(version=version)
    watcher.subscribe(t, qos=1)
    w = clients.connect(version=version, will=_will(t, b"last words", retain=True))
    w.abort()
    assert watcher.get(10).payload == b"last words"
    got = []

    def retained_will_seen() -> bool:
        sub = clients.connect(version=version)
        sub.subscribe(t, qos=1)
        got[:] = sub.drain(0.5)
        sub.disconnect()
        return bool(got)

    harness.poll_until(retained_will_seen, 10)
    assert len(got) == 1, "the retained will must be stored"
    assert got[0].payload == b"last words" and got[0].retain


def test_will_qos2_and_empty_payload(clients, version):
    t = uid("willq2")
    watcher = clients.connect(version=version)
    watcher.subscribe(t, qos=2)
    w = clients.connect(version=version, will=_will(t, b"", qos=2))
    w.abort()
    m = watcher.get(10)
    assert m.payload == b"" and m.qos == 2


def test_v5_will_properties_passed_through(clients):
    t = uid("willprops")
    watcher = clients.connect(version=V5)
    watcher.subscribe(t, qos=1)
    props = {
        "ContentType": "application/json",
        "ResponseTopic": "will/response",
        "CorrelationData": b"\x01\x02",
        "PayloadFormatIndicator": 1,
        "UserProperty": [("who", "me"), ("why", "test")],
    }
    w = clients.connect(version=V5, will=_will(t, b'{"gone":true}', props=props))
    w.abort()
    m = watcher.get(10)
    for k, v in props.items():
        assert m.props.get(k) == v, f"{k}: {m.props.get(k)!r} != {v!r}"


@pytest.mark.slow
def test_will_on_keepalive_timeout(clients, version):
    t = uid("willka")
    watcher = clients.connect(version=version)
    watcher.subscribe(t, qos=1)
    r = clients.raw(version=version)
    r.mqtt_connect(uid("silent"), keepalive=2, will={"topic": t, "payload": b"timed out", "qos": 1})
    # stay silent (socket open); the server must time us out (after ~3s) and publish the will
    assert watcher.get(9).payload == b"timed out"


def test_will_on_protocol_error(clients, version):
    t = uid("willerr")
    watcher = clients.connect(version=version)
    watcher.subscribe(t, qos=1)
    r = clients.raw(version=version)
    r.mqtt_connect(uid("bad"), will={"topic": t, "payload": b"protocol error", "qos": 1})
    r.send(b"\x36\x05\x00\x01a\x00\x01")  # PUBLISH with QoS 3: malformed
    r.wait_closed(5)
    assert watcher.get(10).payload == b"protocol error"


def test_will_raw_abrupt_close(clients, version):
    t = uid("willraw")
    watcher = clients.connect(version=version)
    watcher.subscribe(t, qos=1)
    r = clients.raw(version=version)
    r.mqtt_connect(uid("raw"), will={"topic": t, "payload": b"rst", "qos": 0})
    r.close()
    assert watcher.get(10).payload == b"rst"


def test_will_not_published_on_takeover_v311_after_clean_disconnect(clients):
    """A client that disconnected cleanly and then another connection with its id: no will."""
    t = uid("willtk")
    cid = uid("tk")
    watcher = clients.connect(version=V311)
    watcher.subscribe(t, qos=1)
    a = clients.connect(client_id=cid, version=V311, will=_will(t))
    a.disconnect()
    clients.connect(client_id=cid, version=V311)
    watcher.expect_none(1.5)
