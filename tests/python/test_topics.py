"""Topic filters: wildcards, $-topics, overlapping subscriptions, unsubscribe."""

import pytest

import mqtt_raw as R
from mqtt_client import V5, V311, assert_alive, uid


def _route(clients, version, filt, topics, base):
    """Subscribe ``filt`` (relative to base), publish each topic, return the set of topics received."""
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    assert sub.subscribe(f"{base}/{filt}" if filt else base, qos=1) == [1]
    for t in topics:
        pub.publish(t, t.encode(), qos=1)
    pub.publish(f"{base}-end", b"end", qos=1)  # sentinel on an unrelated topic: nothing matches it
    return {m.topic for m in sub.drain(0.7)}


def test_plus_wildcard(clients, version):
    b = uid("plus")
    topics = [f"{b}/x/c", f"{b}/y/c", f"{b}//c", f"{b}/x/y/c", f"{b}/c", f"{b}/x/c/d"]
    got = _route(clients, version, "+/c", topics, b)
    assert got == {f"{b}/x/c", f"{b}/y/c", f"{b}//c"}


def test_hash_wildcard_matches_parent(clients, version):
    b = uid("hash")
    topics = [f"{b}/a", f"{b}/a/b", f"{b}/a/b/c", f"{b}/ab", f"{b}", f"{b}/a/"]
    got = _route(clients, version, "a/#", topics, b)
    assert got == {f"{b}/a", f"{b}/a/b", f"{b}/a/b/c", f"{b}/a/"}, "a/# must match a itself and everything below"


def test_plus_and_hash_combined(clients, version):
    b = uid("combo")
    topics = [f"{b}/1/x", f"{b}/2/x/y", f"{b}/3", f"{b}/4/z"]
    got = _route(clients, version, "+/x/#", topics, b)
    assert got == {f"{b}/1/x", f"{b}/2/x/y"}


def test_single_plus_matches_one_level(clients, version):
    b = uid("one")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe(f"{b}/+", qos=0)
    for t in (f"{b}/a", f"{b}/", f"{b}/a/b"):
        pub.publish(t, b"x", qos=1)
    assert {m.topic for m in sub.drain(0.7)} == {f"{b}/a", f"{b}/"}


def test_dollar_topics_not_matched_by_leading_wildcards(clients, version):
    """Filters starting with # or + must not match topics starting with $."""
    u = uid("dollar")
    dollar_topic = f"$jetmqtest/{u}/x"
    hash_sub = clients.connect(version=version)
    plus_sub = clients.connect(version=version)
    exact_sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    # retain handling 2: don't flood this subscriber with every retained message on the broker
    if version == V5:
        hash_sub.subscribe("#", qos=1, retain_handling=2)
    else:
        hash_sub.subscribe("#", qos=1)
    plus_sub.subscribe(f"+/{u}/x", qos=1)
    exact_sub.subscribe(f"$jetmqtest/{u}/#", qos=1)
    pub.publish(dollar_topic, b"dollar", qos=1)
    pub.publish(f"normal/{u}/x", b"normal", qos=1)
    hash_topics = {m.topic for m in hash_sub.drain(1.0)}
    plus_topics = {m.topic for m in plus_sub.drain(0.3)}
    exact_topics = {m.topic for m in exact_sub.drain(0.3)}
    assert f"normal/{u}/x" in hash_topics, "the # subscriber is not working at all"
    assert f"normal/{u}/x" in plus_topics, "the +/... subscriber is not working at all"
    assert dollar_topic not in hash_topics, "# must not match a topic starting with $"
    assert dollar_topic not in plus_topics, "+/... must not match a topic starting with $"
    # a server may refuse client publishes to $-topics; if it accepted this one, an explicit filter gets it
    assert exact_topics <= {dollar_topic}


def test_overlapping_subscriptions(clients, version):
    """Overlapping subscriptions: one copy at the max QoS, or one copy per subscription (both allowed)."""
    b = uid("overlap")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    assert sub.subscribe([(f"{b}/#", 0), (f"{b}/a", 2), (f"{b}/+", 1)]) == [0, 2, 1]
    pub.publish(f"{b}/a", b"x", qos=2)
    got = sub.drain(1.0)
    assert 1 <= len(got) <= 3, got
    assert all(m.payload == b"x" and m.topic == f"{b}/a" for m in got)
    assert max(m.qos for m in got) == 2, "at least one copy must be delivered at the highest matching QoS"
    if len(got) == 1:
        assert got[0].qos == 2


def test_subscribe_replaces_identical_filter(clients, version):
    """Re-subscribing the same filter replaces the subscription (no second copy, new QoS applies)."""
    t = uid("replace")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    assert sub.subscribe(t, qos=0) == [0]
    assert sub.subscribe(t, qos=2) == [2]
    pub.publish(t, b"x", qos=2)
    m = sub.get()
    assert m.qos == 2
    sub.expect_none(0.7)
    assert sub.subscribe(t, qos=1) == [1]
    pub.publish(t, b"y", qos=2)
    assert sub.get().qos == 1
    sub.expect_none(0.5)


def test_suback_codes_per_filter(clients, version):
    b = uid("suback")
    sub = clients.connect(version=version)
    assert sub.subscribe([(f"{b}/0", 0), (f"{b}/1", 1), (f"{b}/2", 2)]) == [0, 1, 2]


def test_unsubscribe_stops_delivery(clients, version):
    t = uid("unsub")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe(t, qos=1)
    pub.publish(t, b"before", qos=1)
    assert sub.get().payload == b"before"
    codes = sub.unsubscribe(t)
    if version == V5:
        assert codes == [0x00], f"UNSUBACK reason codes {codes}"
    pub.publish(t, b"after", qos=1)
    sub.expect_none(1.0)


def test_unsuback_raw(clients, version):
    b = uid("unsuback")
    r = clients.raw(version=version)
    r.mqtt_connect(uid("u"))
    r.subscribe([(f"{b}/a", 1)])
    r.send(R.unsubscribe(31, [f"{b}/a", f"{b}/never-subscribed"], version))
    ua = r.expect(R.UNSUBACK)
    assert ua.packet_id == 31
    if version == V5:
        # 0x00 success; 0x11 "no subscription existed" (0x00 is tolerated for the unknown filter)
        assert ua.reasons[0] == 0x00
        assert ua.reasons[1] in (0x00, 0x11)
    else:
        assert ua.body == b"\x00\x1f", "3.1.1 UNSUBACK has only the packet id"


def test_unsubscribe_one_of_overlapping(clients, version):
    b = uid("unsub2")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe([(f"{b}/#", 1), (f"{b}/a", 1)])
    sub.unsubscribe(f"{b}/a")
    pub.publish(f"{b}/a", b"x", qos=1)
    got = sub.drain(0.7)
    assert len(got) == 1 and got[0].payload == b"x", "the remaining # subscription still matches"


@pytest.mark.parametrize("bad", ["a/#/b", "a#", "a/b+", "+a/b", ""])
def test_invalid_topic_filter(clients, target, version, bad):
    """An invalid filter gets a failure SUBACK code or the connection is closed; the node survives."""
    r = clients.raw(version=version)
    r.mqtt_connect(uid("badf"))
    r.send(R.subscribe(3, [(bad, 0)], version))
    try:
        p = r.recv_packet(5)
    except R.Closed:
        p = None
    if p is not None:
        if p.type == R.SUBACK:
            assert p.reasons[0] >= 0x80, f"invalid filter {bad!r} accepted: {p}"
        else:
            assert p.type == R.DISCONNECT and version == V5 and p.reason >= 0x80, p
    assert_alive(target)


@pytest.mark.jetmq_only("mosquitto closes the connection on every invalid filter")
@pytest.mark.parametrize("ver", [V311, V5], ids=["v311", "v5"])
def test_invalid_topic_filter_answers(clients, target, ver):
    """What jetmq answers, where the spec allows a SUBACK failure or closing: a filter with a
    misplaced wildcard gets SUBACK 0x8F (3.1.1: 0x80) and the connection stays; an empty one
    is no filter at all [MQTT-4.7.3-1], which MQTT 5 closes with DISCONNECT 0x8F."""
    r = clients.raw(version=ver)
    r.mqtt_connect(uid("badf2"))
    assert r.subscribe([("a/#/b", 0)]).reasons == [0x8F if ver == V5 else 0x80]
    r.send(R.subscribe(r.next_id(), [("", 0)], ver))
    if ver == V5:
        got = r.wait_closed(5)
        assert [(p.type, p.reason) for p in got] == [(R.DISCONNECT, 0x8F)], got
    else:
        assert r.expect(R.SUBACK).reasons == [0x80]
        r.send(R.pingreq())
        r.expect(R.PINGRESP)
    assert_alive(target)


def test_message_acknowledged_before_subscribe_is_not_delivered(clients, version):
    """A message whose PUBACK arrived before the SUBSCRIBE was sent was published before the
    subscription existed, so the new subscription does not get it, even when the node has not
    read it back from the stream yet (before the fix, a few rounds in twenty got it)."""
    t = uid("before-sub")
    rounds, early = 20, []
    pub = clients.raw_connected("before-sub-pub", version)
    sub = clients.raw_connected("before-sub-sub", version)
    for i in range(rounds):
        topic = f"{t}/{i}"
        pub.publish_acked(topic, b"earlier", qos=1)
        sub.send(R.subscribe(sub.next_id(), [(topic, 1)], version))
        if got := [p.payload for p in sub.receive_for(0.3) if p.type == R.PUBLISH]:
            early.append((topic, got))
    assert not early, f"{len(early)} of {rounds} new subscriptions got a message acknowledged before them: {early[:5]}"


def test_topic_levels_and_case(clients, version):
    b = uid("case")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe(f"{b}/Topic", qos=1)
    pub.publish(f"{b}/topic", b"lower", qos=1)
    pub.publish(f"{b}/Topic", b"upper", qos=1)
    pub.publish(f"{b}/Topic ", b"space", qos=1)
    assert [m.payload for m in sub.drain(0.7)] == [b"upper"], "topics are case sensitive and spaces matter"


def test_unicode_topic(clients, version):
    t = uid("uni") + "/grüße/日本/🚀"
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe(t.rsplit("/", 1)[0] + "/+", qos=1)
    pub.publish(t, b"u", qos=1)
    assert sub.get().topic == t


def test_many_levels_topic(clients, version):
    t = "/".join([uid("deep")] + [f"l{i}" for i in range(20)])
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe(t.split("/")[0] + "/#", qos=1)
    pub.publish(t, b"deep", qos=1)
    assert sub.get().topic == t


def test_leading_slash_is_a_level(clients, version):
    u = uid("slash")
    sub = clients.connect(version=version)
    pub = clients.connect(version=version)
    sub.subscribe(f"+/{u}", qos=1)
    pub.publish(f"/{u}", b"x", qos=1)
    assert sub.get().topic == f"/{u}", "'/x' has an empty first level that + matches"
