"""jetmq-specific behaviour of a single node: health endpoints, configuration, state in JetStream."""

import json
import os
import time

import pytest

import harness
import mqtt_raw as R
from mqtt_client import V5, V311, Client, Target, Tracker, uid

pytestmark = pytest.mark.jetmq_only("jetmq process behaviour")


def as_target(b) -> Target:
    return Target(b.host, b.port, "jetmq", {}, b)


def test_health_endpoints(broker):
    for path in ("/healthz", "/readyz"):
        status, body = harness.http_get(f"http://{broker.host}:{broker.http_port}{path}")
        assert status == 200, (path, body)


def test_config_file_limits_applied(broker):
    """The module broker runs with conftest.LIMITS via --config; CONNACK shows them."""
    r = R.RawClient(broker.host, broker.port, version=V5)
    try:
        ca = r.mqtt_connect(uid("cfg"), keepalive=1000)
        assert ca.props.get("ServerKeepAlive") == 100
        assert ca.props.get("TopicAliasMaximum") == 10
    finally:
        r.close()


def test_env_overrides_config(broker_factory):
    b = broker_factory(extra_env={"JETMQ_LIMITS__MAX_PACKET_SIZE": "1024", "JETMQ_LIMITS__TOPIC_ALIAS_MAXIMUM": "3"})
    r = R.RawClient(b.host, b.port, version=V5)
    try:
        ca = r.mqtt_connect(uid("env"))
        assert ca.props.get("MaximumPacketSize") == 1024
        assert ca.props.get("TopicAliasMaximum") == 3
        r.publish("x/y", b"z" * 2000)
        got = r.wait_closed(5)
        assert [p.reason for p in got if p.type == R.DISCONNECT] == [0x95]
    finally:
        r.close()


def test_defaults_without_config(broker_factory):
    b = broker_factory(config={})
    r = R.RawClient(b.host, b.port, version=V5)
    try:
        ca = r.mqtt_connect(uid("defaults"), keepalive=7200)
        assert ca.props.get("ServerKeepAlive") == 3600, "default max_keepalive is 3600 s"
        assert ca.props.get("MaximumPacketSize", 1048576) == 1048576
    finally:
        r.close()


def test_restart_keeps_retained_and_sessions(broker_factory):
    """State lives in JetStream: a broker restart (SIGTERM) loses no retained message or session."""
    b = broker_factory()
    t = as_target(b)
    cl = Tracker(t)
    try:
        topic, cid = uid("restart-ret"), uid("restart-sess")
        cl.connect(version=V5).publish(topic, b"survives", qos=1, retain=True)
        s = cl(client_id=cid, version=V5, clean=False, session_expiry=600).connect()
        s.subscribe(topic + "/q", qos=1)
        s.disconnect()
        cl.connect(version=V5).publish(topic + "/q", b"queued before restart", qos=1)
        cl.close_all()
        b.terminate()
        b.start()
        s = cl(client_id=cid, version=V5, clean=False, session_expiry=600).connect()
        assert s.session_present
        assert s.get(10).payload == b"queued before restart"
        r = cl.connect(version=V311)
        r.subscribe(topic, qos=1)
        m = r.get(10)
        assert m.payload == b"survives" and m.retain
    finally:
        cl.close_all()


def session_revision(nats, client_id: str) -> int:
    """The KV revision (stream sequence) of a client's session record, 0 if there is none."""
    reply = json.loads(nats.request("$JS.API.STREAM.MSG.GET.KV_JETMQ_SESSIONS",
                                    json.dumps({"last_by_subj": f"$KV.JETMQ_SESSIONS.p.{client_id}"}).encode()))
    return (reply.get("message") or {}).get("seq", 0)


def test_only_resumable_sessions_write_their_position(broker, nats, clients):
    """A session that outlives its connection writes where it got to as messages arrive (so a
    resume after a crash replays little); one with expiry 0 never is resumed, so receiving
    messages costs it no session writes."""
    topic = uid("cursor")
    kept = clients(client_id=uid("cursor-kept"), version=V5, clean=False, session_expiry=600).connect()
    short = clients(client_id=uid("cursor-short"), version=V5, clean=True).connect()
    legacy = clients(client_id=uid("cursor-311"), version=V311, clean=True).connect()
    for c in (kept, short, legacy):
        assert c.subscribe(topic, qos=1) == [1]
    before = {c.client_id: session_revision(nats, c.client_id) for c in (kept, short, legacy)}
    assert all(before.values()), f"every connected client has a session record: {before}"
    pub = clients.connect(version=V5)
    for i in range(6):
        pub.publish(topic, str(i).encode(), qos=1)
        time.sleep(0.5)  # spread over 3 s: a session writes its position at most about once a second
    for c in (kept, short, legacy):
        assert [m.payload for m in c.drain(1.5)] == [str(i).encode() for i in range(6)]
    after = {c.client_id: session_revision(nats, c.client_id) for c in (kept, short, legacy)}
    assert after[kept.client_id] > before[kept.client_id], "a persistent session writes its position"
    assert after[short.client_id] == before[short.client_id], "a clean MQTT 5 session wrote its position"
    assert after[legacy.client_id] == before[legacy.client_id], "a clean 3.1.1 session wrote its position"


def test_clean_session_that_falls_behind_gets_every_qos1_message(broker, clients):
    """A clean (expiry 0) QoS 1 subscriber that stops reading falls further behind than its
    queue holds (limits: 1000 messages): the rest waits in JetStream, and once it reads again
    it catches up from where the router dropped it: every message once, in order. It is idle
    for a few seconds first while another topic carries traffic, so the node's position moves
    on without it (a clean session has no once-a-second tick that follows the node)."""
    from prom import node_metrics

    def replays():
        return node_metrics(broker).value("jetmq_session_replays_total")

    topic, other = uid("behind"), uid("behind-other")
    sub = clients.raw(version=V5, rcvbuf=4096)
    sub.mqtt_connect(uid("behind-sub"))
    sub.subscribe([(topic, 1)])
    pub = clients.connect(version=V5, max_inflight=16)
    for _ in range(25):
        pub.publish(other, b"x", qos=1)
        time.sleep(0.1)  # traffic elsewhere for a few seconds while the subscriber idles (see above)
    before = replays()
    n = 3000
    pad = b"p" * 1024
    info = None
    for i in range(n):
        info = pub.publish(topic, b"%06d" % i + pad, qos=1, wait=False)
        if i % 16 == 15:
            info.wait_for_publish(30)
    info.wait_for_publish(30)
    got = []
    deadline = time.monotonic() + 90
    while len(got) < n and time.monotonic() < deadline:
        p = sub.recv_packet(timeout=15)
        if p.type == R.PUBLISH:
            got.append(int(p.payload[:6]))
            sub.send(R.ack(R.PUBACK, p.packet_id, version=V5))
    first_wrong = next((i for i, g in enumerate(got) if g != i), None)
    assert got == list(range(n)), f"{len(got)} of {n}; first one out of place at index {first_wrong}"
    with pytest.raises(TimeoutError):
        extra = sub.recv_packet(timeout=1.5)
        pytest.fail(f"more after the last message: {extra!r}")
    assert replays() > before, "the subscriber never fell behind: the test did not test the catch-up"


def group_consumers(nats, group: str) -> list[str]:
    """The message stream's consumers of a shared-subscription group (named after it)."""
    reply = json.loads(nats.request("$JS.API.CONSUMER.NAMES.JETMQ_MSGS", b"{}"))
    return [c for c in reply.get("consumers") or [] if c.startswith(f"jetmq-share-{group}-")]


@pytest.mark.slow
def test_shared_group_without_members_keeps_nothing(broker, nats, clients):
    """A group that no session holds any more is deleted (the janitor checks every 3 s and
    waits 10 s), so what is published to it meanwhile is not handed to whoever joins it
    next. A group whose persistent member is only away stays, and the member finds the
    messages published meanwhile."""
    gone, kept = uid("gone"), uid("kept")
    assert len(gone) < 32 and len(kept) < 32, "the consumer name keeps 32 characters of the group"
    gone_topic, kept_topic = uid("share-gone"), uid("share-kept")
    leaver = clients.connect(version=V5)
    leaver.subscribe(f"$share/{gone}/{gone_topic}", qos=1)
    # The consumer is created in the background of the SUBACK.
    harness.wait_until(lambda: group_consumers(nats, gone), 10, interval=0.1, what="the group's consumer created")
    leaver.unsubscribe(f"$share/{gone}/{gone_topic}")
    away_id = uid("share-away")
    away = clients(client_id=away_id, version=V5, clean=False, session_expiry=300).connect()
    away.subscribe(f"$share/{kept}/{kept_topic}", qos=1)
    away.disconnect()
    harness.wait_until(lambda: not group_consumers(nats, gone), 40, interval=0.5, what="the memberless group deleted")
    assert group_consumers(nats, kept), "the group of an away persistent member must stay"
    # A plain subscriber shows when the node has read "to nobody" back from the stream: a
    # group created before that would start in front of it.
    watcher = clients.connect(version=V5)
    watcher.subscribe(gone_topic, qos=1)
    pub = clients.connect(version=V5)
    pub.publish(gone_topic, b"to nobody", qos=1)
    pub.publish(kept_topic, b"waiting", qos=1)
    assert watcher.get().payload == b"to nobody"
    joiner = clients.connect(version=V5)
    joiner.subscribe(f"$share/{gone}/{gone_topic}", qos=1)
    pub.publish(gone_topic, b"fresh", qos=1)
    assert [m.payload for m in joiner.drain(1.0)] == [b"fresh"]
    back = clients(client_id=away_id, version=V5, clean=False, session_expiry=300).connect()
    assert back.session_present
    assert [m.payload for m in back.drain(1.5)] == [b"waiting"]


def test_kill9_single_node_keeps_acknowledged_state(broker_factory):
    b = broker_factory()
    t = as_target(b)
    cl = Tracker(t)
    try:
        topic, cid = uid("k9"), uid("k9-sess")
        s = cl(client_id=cid, version=V311, clean=False).connect()
        s.subscribe(topic, qos=2)
        s.disconnect()
        pub = cl.connect(version=V5)
        for i in range(20):
            pub.publish(topic, str(i).encode(), qos=2)
        cl.close_all()
        b.kill9()
        b.start()
        s = cl(client_id=cid, version=V311, clean=False).connect()
        assert s.session_present
        assert [int(m.payload) for m in s.expect(20, timeout=20)] == list(range(20))
    finally:
        cl.close_all()


def test_sigterm_exits_zero(broker_factory):
    """A graceful shutdown exits 0 within the timeout."""
    b = broker_factory()
    with Client(as_target(b), version=V5) as c:
        c.connect()
        rc = b.terminate(timeout=15)
    assert rc == 0, f"jetmq-broker exit code on SIGTERM: {rc}\n{b.log_tail(30)}"


def test_two_nodes_one_nats(broker_factory):
    """Two jetmq nodes over the same single NATS node form one broker."""
    b1, b2 = broker_factory(), broker_factory()
    t = uid("two")
    with Client(as_target(b1), version=V5) as s, Client(as_target(b2), version=V5) as p:
        s.connect()
        p.connect()
        s.subscribe(t, qos=1)
        p.publish(t, b"x", qos=1)
        assert s.get(10).payload == b"x"


def test_publishes_waiting_for_jetstream_are_bounded_node_wide(broker_factory, nats):
    """Messages stored one by one each wait for JetStream's ack (here QoS 1 with batches
    off; QoS 2, retained copies and wills take the same path). While JetStream does not
    answer (its server is stopped), a node holds at most nats.max_publishes_alone of them
    in flight whatever the number of clients; the others wait to be sent. Once the server is
    back, every message is acknowledged and delivered."""
    import signal

    from prom import node_metrics

    b = broker_factory(extra_env={"JETMQ_NATS__MAX_PUBLISHES_ALONE": "4", "JETMQ_NATS__BATCH_PUBLISH": "false"})
    cl = Tracker(as_target(b))
    topic = uid("alone")

    def metric(name):
        return node_metrics(b).value(name)

    try:
        sub = cl.connect(version=V5)
        assert sub.subscribe(topic, qos=1) == [1]
        pubs = [cl.raw(version=V5) for _ in range(3)]
        for i, p in enumerate(pubs):
            p.mqtt_connect(uid(f"alone-p{i}"))
        harness.freeze(nats.pid)
        try:
            sent = {i: [p.publish(topic, f"{i}-{k}".encode(), qos=1) for k in range(3)] for i, p in enumerate(pubs)}
            harness.wait_until(lambda: metric("jetmq_publishes_alone_waits_total") >= 1, 5, 0.1,
                               "a publish to wait for a free place while JetStream is stopped")
            assert metric("jetmq_publishes_alone_in_flight") == 4, "at most 4 waiting for JetStream"
            assert metric("jetmq_publishes_alone_waits_total") >= 1, "the fifth of nine had to wait"
        finally:
            os.kill(nats.pid, signal.SIGCONT)
        for i, p in enumerate(pubs):
            for pid in sent[i]:
                ack = p.expect(R.PUBACK, 15)
                assert ack.packet_id == pid and ack.reason == 0, ack
        got = sorted(m.payload.decode() for m in sub.drain(2.0))
        assert got == sorted(f"{i}-{k}" for i in range(3) for k in range(3))
        assert metric("jetmq_publishes_alone_in_flight") == 0
    finally:
        cl.close_all()
