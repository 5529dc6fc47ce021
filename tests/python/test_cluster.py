"""Three jetmq nodes (127.0.0.11/.12/.13) over a 3-node JetStream cluster: one logical broker."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import V5, Tracker, collect_group, uid

pytestmark = pytest.mark.cluster


@pytest.fixture
def nodes(brokers3):
    return brokers3


@pytest.fixture
def cl(brokers3):
    t = Tracker(brokers3[0])
    yield t
    t.close_all()


def persistent(cl, node, cid, version, expiry=300, **kw):
    return cl(node, client_id=cid, version=version, clean=False,
              session_expiry=expiry if version == V5 else None, **kw)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_cross_node_delivery(cl, nodes, version, qos):
    t = uid("xnode")
    sub = cl.connect(nodes[0], version=version)
    sub.subscribe(t, qos=qos)
    pub = cl.connect(nodes[1], version=version, max_inflight=10)
    n = 50
    infos = [pub.publish(t, str(i).encode(), qos=qos, wait=False) for i in range(n)]
    for info in infos:
        info.wait_for_publish(30)
    if qos == 0:
        got = [int(m.payload) for m in sub.drain(2.0)]
        assert got and got == sorted(got)
    else:
        got = [int(m.payload) for m in sub.expect(n, timeout=30)]
        assert got == list(range(n)), "per-topic order holds across nodes"
    sub.expect_none(0.3)


def test_cross_node_qos_and_payload(cl, nodes):
    t = uid("xq")
    sub = cl.connect(nodes[2], version=V5)
    sub.subscribe(t, qos=2)
    pub = cl.connect(nodes[0], version=V5)
    payload = bytes(range(256)) * 100
    pub.publish(t, payload, qos=2, props={"UserProperty": [("n", "1")], "ContentType": "bin"})
    m = sub.get(10)
    assert m.payload == payload and m.qos == 2
    assert m.props.get("UserProperty") == [("n", "1")] and m.props.get("ContentType") == "bin"


def test_subscribers_on_every_node(cl, nodes, version):
    t = uid("every")
    subs = [cl.connect(n, version=version) for n in nodes]
    for s in subs:
        s.subscribe(t, qos=1)
    for i, n in enumerate(nodes):
        cl.connect(n, version=version).publish(t, f"from-{i}".encode(), qos=1)
    for s in subs:
        assert sorted(m.payload for m in s.expect(3)) == [b"from-0", b"from-1", b"from-2"]
        s.expect_none(0.3)


def test_wildcards_across_nodes(cl, nodes, version):
    b = uid("xwild")
    sub = cl.connect(nodes[1], version=version)
    sub.subscribe([(f"{b}/+/x", 1), (f"{b}/deep/#", 1)])
    pub = cl.connect(nodes[2], version=version)
    for t in (f"{b}/a/x", f"{b}/a/y", f"{b}/deep", f"{b}/deep/1/2"):
        pub.publish(t, b"w", qos=1)
    assert {m.topic for m in sub.drain(1.5)} == {f"{b}/a/x", f"{b}/deep", f"{b}/deep/1/2"}


def test_retained_across_nodes(cl, nodes, version):
    t = uid("xret")
    cl.connect(nodes[0], version=version).publish(t, b"from node 1", qos=1, retain=True)
    s = cl.connect(nodes[2], version=version)
    s.subscribe(t, qos=1)
    m = s.get(10)
    assert (m.payload, m.retain) == (b"from node 1", True)
    # replaced via node 2, deleted via node 3
    cl.connect(nodes[1], version=version).publish(t, b"replaced", qos=1, retain=True)
    s2 = cl.connect(nodes[0], version=version)
    s2.subscribe(t, qos=1)
    assert [m.payload for m in s2.drain(1.0)] == [b"replaced"]
    cl.connect(nodes[2], version=version).publish(t, b"", qos=1, retain=True)
    s3 = cl.connect(nodes[1], version=version)
    s3.subscribe(t, qos=1)
    s3.expect_none(1.0)


def test_takeover_across_nodes(cl, nodes, version):
    cid = uid("xtake")
    old = cl(nodes[0], client_id=cid, version=version).connect()
    new = cl(nodes[1], client_id=cid, version=version).connect()
    d = old.wait_disconnect(15)
    if version == V5 and not nodes[0].is_mosquitto:
        assert d.from_server and d.reason == 0x8E, f"node 1 must send DISCONNECT 0x8E: {d}"
    t = uid("xtake-t")
    new.subscribe(t, qos=1)
    cl.connect(nodes[2], version=version).publish(t, b"to new", qos=1)
    assert new.get(10).payload == b"to new"
    old.expect_none(0.3)


def test_takeover_across_nodes_raw(cl, nodes):
    cid = uid("xtakeraw")
    old = cl.raw(nodes[2], version=V5)
    old.mqtt_connect(cid)
    new = cl.raw(nodes[0], version=V5)
    new.mqtt_connect(cid)
    got = old.wait_closed(15)
    if not nodes[0].is_mosquitto:
        assert [p.reason for p in got if p.type == R.DISCONNECT] == [0x8E], got


def test_persistent_session_moves_nodes(cl, nodes, version):
    cid, t = uid("xmove"), uid("xmove-t")
    a = persistent(cl, nodes[0], cid, version).connect()
    a.subscribe(t, qos=2)
    a.disconnect()
    pub = cl.connect(nodes[2], version=version)
    for i in range(10):
        pub.publish(t, f"q{1 + i % 2}-{i}".encode(), qos=1 + i % 2)
    b = persistent(cl, nodes[1], cid, version).connect()
    assert b.session_present, "the session is cluster-wide"
    got = [m.payload.decode() for m in b.expect(10, timeout=15)]
    for q in (1, 2):
        assert [p for p in got if p.startswith(f"q{q}")] == [f"q{q}-{i}" for i in range(10) if 1 + i % 2 == q]
    # and the subscription itself moved: live messages arrive on node 2
    pub.publish(t, b"live", qos=1)
    assert b.get(10).payload == b"live"


def test_persistent_session_takeover_while_connected(cl, nodes, version):
    """Connect to node 2 while still connected to node 1: session present, old connection closed."""
    cid, t = uid("xlive"), uid("xlive-t")
    a = persistent(cl, nodes[0], cid, version).connect()
    a.subscribe(t, qos=1)
    b = persistent(cl, nodes[1], cid, version).connect()
    assert b.session_present
    a.wait_disconnect(15)
    cl.connect(nodes[2], version=version).publish(t, b"after", qos=1)
    assert b.get(10).payload == b"after"


@pytest.mark.slow
def test_v5_session_expiry_cluster_wide(cl, nodes):
    cid = uid("xexp")
    a = cl(nodes[0], client_id=cid, version=V5, clean=False, session_expiry=2).connect()
    a.subscribe(uid("xexp-t"), qos=1)
    a.disconnect()
    time.sleep(3.5)  # the session's 2 s expiry runs out: only time passing ends it
    b = cl(nodes[2], client_id=cid, version=V5, clean=False, session_expiry=2).connect()
    assert not b.session_present


def test_will_across_nodes(cl, nodes, version):
    t = uid("xwill")
    watcher = cl.connect(nodes[1], version=version)
    watcher.subscribe(t, qos=1)
    w = cl(nodes[0], version=version, will={"topic": t, "payload": b"node1 client gone", "qos": 1}).connect()
    w.abort()
    assert watcher.get(15).payload == b"node1 client gone"


def test_shared_subscription_across_nodes(cl, nodes):
    b = uid("xshare")
    members = [cl.connect(nodes[i], version=V5) for i in (0, 1)]
    for m in members:
        m.subscribe(f"$share/g/{b}", qos=1)
    pub = cl.connect(nodes[2], version=V5)
    n = 60
    for i in range(n):
        pub.publish(b, str(i).encode(), qos=1)
    got = [[int(m.payload) for m in c] for c in collect_group(members, n, 10)]
    assert sorted(got[0] + got[1]) == list(range(n)), f"each message to exactly one group member: {got}"


def test_no_local_across_nodes(cl, nodes):
    t = uid("xnl")
    me = cl.connect(nodes[0], version=V5)
    me.subscribe(t, qos=1, no_local=True)
    me.publish(t, b"mine", qos=1)
    cl.connect(nodes[1], version=V5).publish(t, b"theirs", qos=1)
    assert [m.payload for m in me.drain(1.0)] == [b"theirs"]


def test_unsubscribe_across_nodes(cl, nodes, version):
    t = uid("xunsub")
    sub = cl.connect(nodes[0], version=version)
    sub.subscribe(t, qos=1)
    sub.unsubscribe(t)
    cl.connect(nodes[1], version=version).publish(t, b"x", qos=1)
    sub.expect_none(1.0)


def test_nodes_share_nothing_locally(cl, nodes):
    """Each node is an independent process; a client can use all three in turn with one id."""
    cid, t = uid("xroam"), uid("xroam-t")
    for i, n in enumerate(nodes):
        c = persistent(cl, n, cid, V5).connect()
        assert c.session_present == (i > 0)
        if i == 0:
            c.subscribe(t, qos=1)
        cl.connect(nodes[(i + 1) % 3], version=V5).publish(t, f"hop{i}".encode(), qos=1)
        assert c.get(10).payload == f"hop{i}".encode(), "earlier messages were acknowledged; no redelivery"
        c.disconnect()
