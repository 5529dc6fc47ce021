"""MQTT 5.0 features."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import V5, V311, assert_alive, collect_group, uid


# ------------------------------------------------------------------ CONNACK properties


@pytest.mark.jetmq_only("checks jetmq's configured limits are advertised")
def test_connack_advertises_configured_limits(clients, target):
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("limits"))
    lim = target.limits
    assert ca.props.get("MaximumPacketSize") == lim["max_packet_size"], ca
    assert ca.props.get("ReceiveMaximum") == lim["receive_maximum"], ca
    assert ca.props.get("TopicAliasMaximum") == lim["topic_alias_maximum"], ca


def test_connack_properties_are_consistent(clients):
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("cprops"))
    assert ca.props.get("ReceiveMaximum", 65535) > 0
    assert ca.props.get("MaximumPacketSize", 2**28) > 0
    assert ca.props.get("MaximumQoS", 2) in (0, 1, 2)


# ------------------------------------------------------------------ topic aliases


def test_topic_alias_client_to_server(clients):
    t = uid("alias")
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1)
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("ap"))
    if ca.props.get("TopicAliasMaximum", 0) < 1:
        pytest.fail(f"server does not allow topic aliases: {ca}")
    assert r.publish_acked(t, b"set", qos=1, props={"TopicAlias": 1}).reason == 0
    assert r.publish_acked(b"", b"use", qos=1, props={"TopicAlias": 1}).reason == 0
    assert r.publish_acked(b"", b"use-again", qos=1, props={"TopicAlias": 1}).reason == 0
    got = sub.expect(3)
    assert [(m.topic, m.payload) for m in got] == [(t, b"set"), (t, b"use"), (t, b"use-again")]
    for m in got:
        assert "TopicAlias" not in m.props, "client->server aliases are not forwarded"


def test_topic_alias_remapped(clients):
    t1, t2 = uid("alias1"), uid("alias2")
    sub = clients.connect(version=V5)
    sub.subscribe([(t1, 1), (t2, 1)])
    r = clients.raw(version=V5)
    r.mqtt_connect(uid("ar"))
    r.publish_acked(t1, b"a", qos=1, props={"TopicAlias": 2})
    r.publish_acked(t2, b"b", qos=1, props={"TopicAlias": 2})
    r.publish_acked(b"", b"c", qos=1, props={"TopicAlias": 2})
    assert [(m.topic, m.payload) for m in sub.expect(3)] == [(t1, b"a"), (t2, b"b"), (t2, b"c")]


@pytest.mark.parametrize("which", ["above-max", "zero"])
def test_topic_alias_invalid(clients, target, which):
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("abad"))
    mx = ca.props.get("TopicAliasMaximum", 0)
    alias = mx + 1 if which == "above-max" else 0
    r.publish(uid("x"), b"x", qos=1, props={"TopicAlias": alias})
    got = r.wait_closed(5)
    codes = [p.reason for p in got if p.type == R.DISCONNECT]
    if which == "above-max":
        assert codes == [0x94], f"expected DISCONNECT 0x94 (topic alias invalid): {got}"
    else:
        # alias 0 is never valid: 0x94; mosquitto 2.0.11 treats it as malformed (0x81)
        assert codes in ([0x94], [0x82], [0x81]), f"expected DISCONNECT 0x94: {got}"
    assert_alive(target)


def test_topic_alias_unknown_with_empty_topic(clients, target):
    r = clients.raw(version=V5)
    r.mqtt_connect(uid("aunk"))
    r.publish(b"", b"x", qos=1, props={"TopicAlias": 3})
    got = r.wait_closed(5)
    discs = [p for p in got if p.type == R.DISCONNECT]
    assert discs and discs[0].reason >= 0x80, f"unknown alias must be a protocol error: {got}"
    assert_alive(target)


# ------------------------------------------------------------------ subscription options


def test_subscription_identifiers(clients):
    b = uid("subid")
    sub = clients.connect(version=V5)
    sub.subscribe(f"{b}/+", qos=1, sub_id=7)
    sub.subscribe(f"{b}/#", qos=1, sub_id=300)
    sub.subscribe(f"{b}/only", qos=1)  # no identifier
    pub = clients.connect(version=V5)
    pub.publish(f"{b}/x", b"both", qos=1)
    got = sub.drain(1.0)
    ids = sorted(i for m in got for i in m.props.get("SubscriptionIdentifier", []))
    assert ids == [7, 300], f"identifiers of all matching subscriptions must be delivered: {[m.props for m in got]}"
    pub.publish(f"{b}/deep/er", b"hash only", qos=1)
    m = sub.get()
    assert m.props.get("SubscriptionIdentifier") == [300]
    pub.publish(f"{b}/only", b"three", qos=1)
    got = sub.drain(1.0)
    ids = sorted(i for m in got for i in m.props.get("SubscriptionIdentifier", []))
    assert ids == [7, 300], "the subscription without an identifier contributes none"


def test_subscription_identifier_on_retained(clients):
    t = uid("subid-ret")
    pub = clients.connect(version=V5)
    pub.publish(t, b"r", qos=1, retain=True)
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1, sub_id=42)
    m = sub.get()
    assert m.retain and m.props.get("SubscriptionIdentifier") == [42]


def test_no_local(clients):
    t = uid("nolocal")
    me = clients.connect(version=V5)
    me.subscribe(t, qos=1, no_local=True)
    other = clients.connect(version=V5)
    me.publish(t, b"mine", qos=1)
    other.publish(t, b"theirs", qos=1)
    assert [m.payload for m in me.drain(1.0)] == [b"theirs"]


@pytest.mark.mosquitto_differs("mosquitto 2.0.11 accepts No Local on a shared subscription")
def test_shared_subscription_must_not_set_no_local(clients, target):
    """No Local on a shared subscription is a protocol error (MQTT 5 3.8.3.1)."""
    r = clients.raw(version=V5)
    r.mqtt_connect(uid("sharednl"))
    r.send(R.subscribe(5, [(f"$share/g/{uid('x')}", R.sub_options(qos=1, no_local=True))], V5))
    try:
        p = r.recv_packet(5)
    except R.Closed:
        p = None
    if p is not None:
        assert (p.type == R.DISCONNECT and p.reason >= 0x80) or (p.type == R.SUBACK and p.reasons[0] >= 0x80), p
    assert_alive(target)


@pytest.mark.mosquitto_differs("mosquitto 2.0.11 ignores a subscription identifier in a PUBLISH")
def test_subscription_identifier_in_client_publish_is_a_protocol_error(clients, target):
    """Only the server puts subscription identifiers into a PUBLISH [MQTT-3.3.4-6]: one from a
    client gets DISCONNECT 0x82 and is not delivered."""
    t = uid("subid-in")
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1)
    r = clients.raw(version=V5)
    r.mqtt_connect(uid("subid-pub"))
    r.send(R.publish(t, b"x", qos=1, packet_id=1, version=V5, props={"SubscriptionIdentifier": 42}))
    got = r.wait_closed(5)
    assert [(p.type, p.reason) for p in got] == [(R.DISCONNECT, 0x82)], got
    sub.expect_none(0.5)
    assert_alive(target)


# ------------------------------------------------------------------ message expiry


@pytest.mark.slow
def test_message_expiry_queued(clients):
    cid, t = uid("mexp"), uid("mexp-topic")
    a = clients(client_id=cid, version=V5, clean=False, session_expiry=300).connect()
    a.subscribe(t, qos=1)
    a.disconnect()
    pub = clients.connect(version=V5)
    pub.publish(t, b"short", qos=1, props={"MessageExpiryInterval": 1})
    pub.publish(t, b"long", qos=1, props={"MessageExpiryInterval": 60})
    pub.publish(t, b"forever", qos=1)
    time.sleep(2.5)  # the 1 s message expiry runs out while the message is queued
    b = clients(client_id=cid, version=V5, clean=False, session_expiry=300).connect()
    got = b.drain(1.0)
    assert [m.payload for m in got] == [b"long", b"forever"], "an expired queued message must not be delivered"
    left = got[0].props.get("MessageExpiryInterval")
    assert left is not None and 50 <= left <= 58, f"remaining expiry must be decremented by the time queued: {left}"
    assert "MessageExpiryInterval" not in got[1].props


@pytest.mark.slow
def test_message_expiry_retained(clients):
    t1, t2 = uid("rexp1"), uid("rexp2")
    pub = clients.connect(version=V5)
    pub.publish(t1, b"short", qos=1, retain=True, props={"MessageExpiryInterval": 1})
    pub.publish(t2, b"long", qos=1, retain=True, props={"MessageExpiryInterval": 60})
    time.sleep(2.5)  # the 1 s message expiry runs out while the message is retained
    sub = clients.connect(version=V5)
    sub.subscribe([(t1, 1), (t2, 1)])
    got = sub.drain(1.0)
    assert [m.payload for m in got] == [b"long"], "an expired retained message must not be delivered"
    left = got[0].props.get("MessageExpiryInterval")
    assert left is not None and 50 <= left <= 58, left


def test_message_expiry_forwarded_live(clients):
    t = uid("lexp")
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1)
    pub = clients.connect(version=V5)
    pub.publish(t, b"x", qos=1, props={"MessageExpiryInterval": 100})
    left = sub.get().props.get("MessageExpiryInterval")
    assert left is not None and 98 <= left <= 100


# ------------------------------------------------------------------ pass-through properties


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_properties_passed_through(clients, qos):
    t = uid("props")
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=2)
    pub = clients.connect(version=V5)
    props = {
        "ResponseTopic": "reply/" + t,
        "CorrelationData": b"\x00\x01\xfe\xff corr",
        "ContentType": "application/x-test; charset=utf-8",
        "PayloadFormatIndicator": 1,
        "UserProperty": [("a", "1"), ("b", "2"), ("a", "3"), ("ünï", "cödé"), ("empty", "")],
    }
    pub.publish(t, "text payload ✓".encode(), qos=qos, props=props)
    m = sub.get()
    for k, v in props.items():
        assert m.props.get(k) == v, f"{k}: got {m.props.get(k)!r}, want {v!r}"


def test_payload_format_indicator_zero_passed(clients):
    t = uid("pfi0")
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1)
    pub = clients.connect(version=V5)
    pub.publish(t, b"\xff\xfe", qos=1, props={"PayloadFormatIndicator": 0})
    m = sub.get()
    assert m.payload == b"\xff\xfe"
    assert m.props.get("PayloadFormatIndicator", 0) == 0


def test_request_response_pattern(clients):
    req_t, resp_t = uid("req"), uid("resp")
    responder = clients.connect(version=V5)
    responder.subscribe(req_t, qos=1)
    requester = clients.connect(version=V5)
    requester.subscribe(resp_t, qos=1)
    requester.publish(req_t, b"question", qos=1, props={"ResponseTopic": resp_t, "CorrelationData": b"id-1"})
    req = responder.get()
    responder.publish(req.props["ResponseTopic"], b"answer", qos=1,
                      props={"CorrelationData": req.props["CorrelationData"]})
    resp = requester.get()
    assert resp.payload == b"answer" and resp.props.get("CorrelationData") == b"id-1"


def test_properties_not_leaked_to_v311(clients):
    t = uid("propsv3")
    sub = clients.connect(version=V311)
    sub.subscribe(t, qos=1)
    pub = clients.connect(version=V5)
    pub.publish(t, b"to v3", qos=1, props={"UserProperty": [("k", "v")], "ContentType": "x"})
    m = sub.get()
    assert m.payload == b"to v3" and m.topic == t


# ------------------------------------------------------------------ flow control / sizes


@pytest.mark.mosquitto_differs("mosquitto 2.0.11 answers the excess PUBLISH with PUBREC 0x97 instead of DISCONNECT 0x93")
def test_receive_maximum_exceeded(clients, target):
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("rmax"))
    rmax = ca.props.get("ReceiveMaximum", 65535)
    if rmax > 1000:
        pytest.fail(f"server Receive Maximum {rmax} too large to test; configure receive_maximum")
    t = uid("rmax-topic")
    # QoS 2 PUBLISHes stay unacknowledged until PUBREL/PUBCOMP, which we never send
    for i in range(1, rmax + 2):
        r.publish(t, b"x", qos=2, packet_id=i)
    got = r.wait_closed(10)
    discs = [p for p in got if p.type == R.DISCONNECT]
    recs = [p for p in got if p.type == R.PUBREC]
    assert discs and discs[-1].reason == 0x93, f"expected DISCONNECT 0x93 (receive maximum exceeded), got {got}"
    assert len(recs) <= rmax
    assert_alive(target)


def test_receive_maximum_respected_is_fine(clients):
    r = clients.raw(version=V5)
    ca = r.mqtt_connect(uid("rmaxok"))
    rmax = min(ca.props.get("ReceiveMaximum", 65535), 50)
    t = uid("rmaxok-topic")
    for i in range(1, rmax + 1):
        r.publish(t, b"x", qos=2, packet_id=i)
    for _ in range(rmax):
        assert r.expect(R.PUBREC).reason == 0
    for i in range(1, rmax + 1):
        r.send(R.ack(R.PUBREL, i, V5))
    for _ in range(rmax):
        assert r.expect(R.PUBCOMP).reason == 0


def test_client_maximum_packet_size_respected(clients):
    """The server never sends a client a packet larger than its Maximum Packet Size."""
    t = uid("cmps")
    small = clients(version=V5, connect_props={"MaximumPacketSize": 2048}).connect()
    small.subscribe(t, qos=1)
    pub = clients.connect(version=V5)
    pub.publish(t, b"a" * 4000, qos=1)
    pub.publish(t, b"b" * 100, qos=1)
    got = small.drain(1.5)
    assert [m.payload[:1] for m in got] == [b"b"], "the oversize message must be dropped for this client"
    assert small.connected, "dropping an oversize message must not disconnect the client"


def test_client_maximum_packet_size_raw(clients):
    t = uid("cmpsraw")
    r = clients.raw(version=V5)
    r.mqtt_connect(uid("small"), props={"MaximumPacketSize": 512})
    r.subscribe([(t, 0)])
    pub = clients.connect(version=V5)
    for size in (100, 2000, 400, 511, 600):
        pub.publish(t, b"z" * size, qos=1)
    deadline = time.monotonic() + 2
    sizes = []
    while time.monotonic() < deadline:
        try:
            p = r.recv_packet(0.3)
        except TimeoutError:
            continue
        total = 1 + len(R.varint(len(p.body))) + len(p.body)
        assert total <= 512, f"received a {total}-byte packet"
        sizes.append(len(p.payload))
    assert 100 in sizes and 400 in sizes and 2000 not in sizes and 600 not in sizes


@pytest.mark.parametrize("ver", [V311, V5], ids=["v311", "v5"])
def test_server_maximum_packet_size(clients, target, ver):
    r = clients.raw(version=ver)
    ca = r.mqtt_connect(uid("smps"))
    mx = ca.props.get("MaximumPacketSize", target.limits["max_packet_size"]) if ver == V5 else target.limits["max_packet_size"]
    sub = clients.connect(version=V5)
    t = uid("smps-topic")
    sub.subscribe(t, qos=0)
    r.publish(t, b"y" * (mx + 100), qos=0)
    got = r.wait_closed(10)
    if ver == V5:
        assert [p.reason for p in got if p.type == R.DISCONNECT] in ([0x95], []), got
        if not target.is_mosquitto:
            assert [p.reason for p in got if p.type == R.DISCONNECT] == [0x95], f"expected DISCONNECT 0x95: {got}"
    sub.expect_none(0.5)
    assert_alive(target)


def test_publish_just_under_max_packet_size(clients, target):
    mx = target.limits["max_packet_size"]
    t = uid("under")
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1)
    pub = clients.connect(version=V5)
    # fixed header (1 + 3 bytes) + topic + packet id + properties length
    payload = b"u" * (mx - (4 + 2 + len(t) + 2 + 1) - 16)
    assert pub.publish(t, payload, qos=1) == 0
    assert len(sub.get(10).payload) == len(payload)


# ------------------------------------------------------------------ shared subscriptions


def test_shared_subscriptions(clients):
    b = uid("share")
    topic = f"{b}/data"
    g1 = [clients.connect(version=V5) for _ in range(2)]
    g2 = clients.connect(version=V5)
    for c in g1:
        assert c.subscribe(f"$share/g1/{b}/+", qos=1) == [1]
    assert g2.subscribe(f"$share/g2/{b}/+", qos=1) == [1]
    pub = clients.connect(version=V5)
    n = 40
    for i in range(n):
        pub.publish(topic, str(i).encode(), qos=1)
    got1 = [[int(m.payload) for m in c] for c in collect_group(g1, n, 10, quiet=0.7)]
    got2 = [int(m.payload) for m in collect_group([g2], n, 10, quiet=0.5)[0]]
    all1 = got1[0] + got1[1]
    assert sorted(all1) == list(range(n)), f"each message goes to exactly one member of g1: {got1}"
    assert sorted(got2) == list(range(n)), "every group gets every message"
    for member in got1:
        assert member == sorted(member)


def test_shared_and_normal_subscription_together(clients):
    b = uid("share2")
    shared = clients.connect(version=V5)
    normal = clients.connect(version=V5)
    shared.subscribe(f"$share/grp/{b}", qos=1)
    normal.subscribe(b, qos=1)
    pub = clients.connect(version=V5)
    pub.publish(b, b"x", qos=1)
    assert shared.get().topic == b, "the topic of a shared delivery is the publish topic, not the $share filter"
    assert normal.get().payload == b"x"


def test_shared_subscription_member_leaves(clients):
    b = uid("share3")
    a = clients.connect(version=V5)
    c = clients.connect(version=V5)
    a.subscribe(f"$share/g/{b}", qos=1)
    c.subscribe(f"$share/g/{b}", qos=1)
    a.unsubscribe(f"$share/g/{b}")
    pub = clients.connect(version=V5)
    for i in range(10):
        pub.publish(b, str(i).encode(), qos=1)
    assert sorted(int(m.payload) for m in c.expect(10)) == list(range(10))
    a.expect_none(0.3)


@pytest.mark.mosquitto_differs("mosquitto 2.0.11 sends retained messages on a new shared subscription")
def test_shared_subscription_no_retained(clients):
    """Retained messages are not sent when a shared subscription is made (MQTT 5 4.8.2)."""
    b = uid("share-ret")
    pub = clients.connect(version=V5)
    pub.publish(b, b"retained", qos=1, retain=True)
    s = clients.connect(version=V5)
    s.subscribe(f"$share/g/{b}", qos=1)
    s.expect_none(1.0)


def test_unsubscribe_v5_reason_codes(clients):
    c = clients.connect(version=V5)
    t = uid("unsubrc")
    c.subscribe(t, qos=1)
    assert c.unsubscribe(t) == [0x00]
    assert c.unsubscribe(t)[0] in (0x00, 0x11)
