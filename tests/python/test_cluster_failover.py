"""Failures in a fresh 3+3 cluster: kill -9 of a jetmq node, kill -9 of a NATS node.

Every load loop here is bounded in count (JETMQ_TEST_FAILOVER_MESSAGES, default 2000) and time.
"""

import collections
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import harness
import pytest

from mqtt_client import V5, V311, Client, Tracker, uid
from prom import node_metrics

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

N_MESSAGES = int(os.environ.get("JETMQ_TEST_FAILOVER_MESSAGES", "2000"))
PUBLISH_DEADLINE_S = 150
DELIVERY_DEADLINE_S = 120


def _streams(nats) -> dict:
    """name -> stream detail, merged over every live node's /jsz (each lists the streams it hosts)."""
    import harness

    out = {}
    for node in nats.nodes:
        if not node.alive():
            continue
        try:
            jsz = harness.http_json(f"{node.monitor_url}/jsz?streams=true&config=true", timeout=3)
        except Exception:  # noqa: BLE001
            continue
        for acc in jsz.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                out.setdefault(st["name"], st)
    return out


def stream_report(nats) -> str:
    """Streams as the live NATS nodes see them (replicas, leader, peers), for failure messages."""
    rows = []
    for name, st in sorted(_streams(nats).items()):
        cl = st.get("cluster") or {}
        peers = [(r.get("name"), r.get("current")) for r in cl.get("replicas") or []]
        rows.append(f"{name}: R{(st.get('config') or {}).get('num_replicas')} leader={cl.get('leader')} peers={peers}")
    return ("; ".join(rows) or "<no streams visible>") + " (streams hosted only on a dead node are not listed)"


def message_stream_leader(nats) -> int:
    """Index of the NATS node leading the stream that stores MQTT messages (captures jetmq.s.>),
    else the JetStream meta leader, else node 2."""
    names = [n.server_name for n in nats.nodes]
    for st in _streams(nats).values():
        subjects = (st.get("config") or {}).get("subjects") or []
        leader = (st.get("cluster") or {}).get("leader")
        if any(sub.startswith("jetmq.s.") for sub in subjects) and leader in names:
            return names.index(leader)
    for node in nats.nodes:
        leader = node.meta_leader()
        if leader in names:
            return names.index(leader)
    return 1


def reconnect(client: Client, targets, timeout: float = 60.0) -> Client:
    """Reconnect ``client`` (same paho instance, so QoS 2 receive state is kept) to a live node."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for t in targets:
            try:
                # Longer than a CONNECT can wait out a session-store election
                # (session.store_outage_grace_ms, 15 s): a client that gives up earlier and
                # retries takes its own session over.
                client.connect(host=t.host, port=t.port, clean=False, timeout=17)
                return client
            except (AssertionError, OSError) as e:
                last = e
                time.sleep(0.5)  # a pause between attempts while the cluster recovers
    raise AssertionError(f"{client.client_id} could not reconnect to {targets} within {timeout}s: {last}")


class Collector:
    """Drains a client's message queue into per-number counts in the background."""

    def __init__(self, client: Client, prefix: str):
        self.client = client
        self.counts: collections.Counter = collections.Counter()
        self.order: list[int] = []
        self.received: list = []  # the messages themselves (arrival time, DUP flag), in order
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                m = self.client.messages.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            n = int(m.payload)
            self.counts[n] += 1
            self.order.append(n)
            self.received.append(m)

    def missing(self, n: int) -> list[int]:
        return [i for i in range(n) if self.counts[i] == 0]

    def duplicates(self) -> list[int]:
        return sorted(i for i, c in self.counts.items() if c > 1)

    def stop(self):
        self._stop.set()
        self._t.join(5)


def session_record_seq(nats, client_id: str) -> int:
    """The stream sequence of a client's session record in the KV bucket, 0 if there is none."""
    node = next(n for n in nats.nodes if n.alive())
    reply = json.loads(node.request("$JS.API.STREAM.MSG.GET.KV_JETMQ_SESSIONS",
                                    json.dumps({"last_by_subj": f"$KV.JETMQ_SESSIONS.p.{client_id}"}).encode()))
    return (reply.get("message") or {}).get("seq", 0)


def start_publisher(*args, **kw):
    """publish_sequence(*args, **kw) in a thread of its own: a future of its (acked, sent)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="publisher")
    try:
        return pool.submit(publish_sequence, *args, **kw)
    finally:
        pool.shutdown(wait=False)


def _published(info) -> bool:
    # MQTTMessageInfo.is_published() raises for messages queued while disconnected; the flag is what we want
    return bool(getattr(info, "_published", False))


def publish_sequence(pub: Client, topic: str, n: int, qos: int, on_progress, targets, deadline_s: float,
                     await_connection=None):
    """Publish 0..n-1 with QoS, 8 at a time, following the publisher through disconnects.

    The publisher keeps its session (clean start 0), so paho resends unacknowledged messages
    itself after a reconnect. Returns (set of acknowledged numbers, number published).
    ``await_connection(pub)``, if given, replaces the reconnect to ``targets`` (for clients
    that something else reconnects).
    """
    acked = set()
    deadline = time.monotonic() + deadline_s

    def ensure_connected():
        if not pub.connected:
            if await_connection is not None:
                await_connection(pub)
            else:
                reconnect(pub, targets)

    def settle(window):
        for num, info in window:
            while not _published(info) and time.monotonic() < deadline:
                ensure_connected()
                with info._condition:
                    info._condition.wait(0.2)
            if _published(info):
                acked.add(num)

    i = 0
    window = []
    while i < n and time.monotonic() < deadline:
        ensure_connected()
        info = pub.paho.publish(topic, str(i).encode(), qos=qos)
        window.append((i, info))
        i += 1
        on_progress(i)
        if len(window) >= 8:
            settle(window)
            window.clear()
    settle(window)
    return acked, i


def test_kill9_broker_node_loses_nothing(fresh_cluster):
    """Subscribers (QoS 1 and QoS 2, persistent) on node 1, publisher on node 2; node 1 is
    SIGKILLed mid-stream; the subscribers reconnect to node 3 and every number arrives
    (QoS 1: none lost; QoS 2: none lost and none duplicated)."""
    _nats, procs, targets = fresh_cluster
    a, b, c = targets
    n = N_MESSAGES
    topic = uid("fo")
    cl = Tracker(a)
    try:
        s1 = cl(a, client_id=uid("fo-q1"), version=V311, clean=False).connect()
        s2 = cl(a, client_id=uid("fo-q2"), version=V5, clean=False, session_expiry=600).connect()
        assert s1.subscribe(topic, qos=1) == [1]
        assert s2.subscribe(topic, qos=2) == [2]
        c1, c2 = Collector(s1, topic), Collector(s2, topic)
        pub = cl(b, client_id=uid("fo-pub"), version=V5, clean=False, session_expiry=600, max_inflight=10).connect()

        kill_at = n // 4
        killed = threading.Event()

        def progress(i):
            if i == kill_at and not killed.is_set():
                procs[0].kill9()
                killed.set()

        publishing = start_publisher(pub, topic, n, 2, progress, [b, c], PUBLISH_DEADLINE_S)
        assert killed.wait(PUBLISH_DEADLINE_S), "publisher never reached the kill point"
        for s in (s1, s2):
            s.wait_disconnect(30)
        # the subscribers come back on a surviving node with their sessions
        for s in (s1, s2):
            reconnect(s, [c, b])
            assert s.session_present, f"{s.client_id}: session lost when its node died"
        acked, sent = publishing.result(timeout=PUBLISH_DEADLINE_S + 60)  # raises what the publisher raised
        assert sent == n, f"only {sent} of {n} published within {PUBLISH_DEADLINE_S}s"
        assert acked == set(range(n)), "publisher on a surviving node must get every ack"

        # the assertions below say what is missing
        harness.poll_until(lambda: not (c1.missing(n) or c2.missing(n)), DELIVERY_DEADLINE_S, 0.5)
        time.sleep(1.0)  # a moment for late duplicates to show up (checked below)
        c1.stop()
        c2.stop()
        m1, m2 = c1.missing(n), c2.missing(n)
        assert not m1, f"QoS 1 subscriber lost {len(m1)} messages, e.g. {m1[:20]}"
        assert not m2, f"QoS 2 subscriber lost {len(m2)} messages, e.g. {m2[:20]}"
        d2 = c2.duplicates()
        assert not d2, f"QoS 2 subscriber got {len(d2)} duplicates, e.g. {d2[:20]}"
    finally:
        cl.close_all()


def test_session_with_expiry_0_ends_when_its_node_dies(fresh_cluster):
    """A v5 session with Session Expiry Interval 0 ends with its network connection, also
    when that connection ends because the node died: reconnecting with Clean Start 0 to a
    surviving node finds no session, while a persistent session next to it is resumed."""
    _nats, procs, targets = fresh_cluster
    a, b, c = targets
    cl = Tracker(a)
    try:
        short = cl(a, client_id=uid("exp0"), version=V5, clean=False, session_expiry=0).connect()
        kept = cl(a, client_id=uid("exp600"), version=V5, clean=False, session_expiry=600).connect()
        assert short.subscribe(uid("exp0-topic"), qos=1) == [1]
        assert kept.subscribe(uid("exp600-topic"), qos=1) == [1]
        procs[0].kill9()
        for client in (short, kept):
            client.wait_disconnect(30)
            reconnect(client, [b, c])
        assert kept.session_present, "the persistent session must survive its node"
        assert not short.session_present, "a session with expiry 0 ended with its connection"
    finally:
        cl.close_all()


def test_will_of_a_client_that_reconnects_before_the_janitor_acts(fresh_cluster):
    """The client's node dies and the client reconnects to a survivor at once, long before the
    janitor notices the dead node: its will (no delay) is still published, exactly once, by
    the node that takes the session over. The janitor alone needs about 20 s."""
    _nats, procs, targets = fresh_cluster
    a, b, c = targets
    topic = uid("rewill")
    cl = Tracker(a)
    try:
        watcher = cl.connect(c, version=V5)
        assert watcher.subscribe(topic, qos=1) == [1]
        device = cl(a, client_id=uid("rewill-dev"), version=V5, clean=False, session_expiry=600,
                    will={"topic": topic, "payload": b"device lost", "qos": 1}).connect()
        procs[0].kill9()
        device.wait_disconnect(30)
        reconnect(device, [b, c])
        assert device.session_present
        m = watcher.get(10)
        assert m.payload == b"device lost"
        # Not a second time, by the janitor either (it settles the dead node's sessions after
        # about 20 s; JETMQ_TEST_WILL_DUP_WAIT widens this window, 3 s by default).
        watcher.expect_none(float(os.environ.get("JETMQ_TEST_WILL_DUP_WAIT", "3")))
    finally:
        cl.close_all()


def test_will_of_a_client_of_a_hung_node_published_once(fresh_cluster):
    """The client's node hangs (SIGSTOP) instead of dying; the client gives up on it and
    reconnects to a survivor, which gets no answer to its hand-over within 2 s and publishes
    the will itself. When the hung node wakes up, its old connection ends too, abruptly:
    it must see that the session went elsewhere and not publish the will a second time."""
    import signal

    _nats, procs, targets = fresh_cluster
    a, b, c = targets
    topic = uid("hungwill")
    cid = uid("hungwill-dev")
    cl = Tracker(a)
    hung = procs[0]
    try:
        watcher = cl.connect(c, version=V5)
        assert watcher.subscribe(topic, qos=1) == [1]
        device = cl.raw(a, version=V5)
        device.mqtt_connect(cid, clean=False, props={"SessionExpiryInterval": 600},
                            will={"topic": topic, "payload": b"device lost", "qos": 1})
        harness.freeze(hung.pid)
        try:
            device.close()  # no DISCONNECT: the device gave up on a node that stopped answering
            again = cl(b, client_id=cid, version=V5, clean=False, session_expiry=600).connect(timeout=15)
            assert again.session_present
            assert watcher.get(10).payload == b"device lost"
        finally:
            os.kill(hung.pid, signal.SIGCONT)
        # The woken node ends its old connection now (closed socket, late hand-over request).
        watcher.expect_none(float(os.environ.get("JETMQ_TEST_WILL_DUP_WAIT", "3")))
        assert hung.alive(), "the node that hung must carry on"
    finally:
        cl.close_all()


def test_wills_of_killed_node_published_by_survivor(fresh_cluster):
    nats, procs, targets = fresh_cluster
    a, b, c = targets
    base = uid("fowill")
    cl = Tracker(a)
    try:
        watcher = cl.connect(c, version=V5)
        watcher.subscribe(f"{base}/#", qos=1)
        doomed = [
            cl(a, version=V311, will={"topic": f"{base}/v311", "payload": b"v311 will", "qos": 1}).connect(),
            cl(a, version=V5, will={"topic": f"{base}/v5", "payload": b"v5 will", "qos": 1}).connect(),
            cl(a, version=V5, session_expiry=600,
               will={"topic": f"{base}/v5-persistent", "payload": b"v5 persistent will", "qos": 2}).connect(),
            cl(a, version=V5, will={"topic": f"{base}/v5-retained", "payload": b"retained will", "qos": 1,
                                    "retain": True}).connect(),
        ]
        # a client on a surviving node that disconnects normally: no will
        ok = cl(b, version=V5, will={"topic": f"{base}/clean", "payload": b"must not appear", "qos": 1}).connect()
        ok.disconnect()
        # the survivors learn of the dead node's clients and their wills from the session records
        if nats is not None:
            harness.wait_until(lambda: all(session_record_seq(nats, d.client_id) for d in doomed), 10, 0.1,
                               "a session record of every client of the node to be killed")
        procs[0].kill9()
        got = {}
        deadline = time.monotonic() + 30
        while len(got) < 4 and time.monotonic() < deadline:
            try:
                m = watcher.get(max(0.1, deadline - time.monotonic()))
            except AssertionError:
                break
            got[m.topic] = m.payload
        assert got == {
            f"{base}/v311": b"v311 will",
            f"{base}/v5": b"v5 will",
            f"{base}/v5-persistent": b"v5 persistent will",
            f"{base}/v5-retained": b"retained will",
        }, "wills of the killed node's clients must be published by a survivor within 30s"
        watcher.expect_none(1.0)
        late = cl.connect(b, version=V5)
        late.subscribe(f"{base}/v5-retained", qos=1)
        m = late.get(10)
        assert m.retain and m.payload == b"retained will"
    finally:
        cl.close_all()


def test_kill9_node_then_restart_rejoins(fresh_cluster):
    _nats, procs, targets = fresh_cluster
    a, b, c = targets
    t = uid("rejoin")
    procs[1].kill9()
    cl = Tracker(a)
    try:
        sub = cl.connect(a, version=V5)
        sub.subscribe(t, qos=1)
        cl.connect(c, version=V5).publish(t, b"while b is down", qos=1)
        assert sub.get(10).payload == b"while b is down"
        procs[1].start()
        cl.connect(b, version=V5).publish(t, b"b is back", qos=1)
        assert sub.get(10).payload == b"b is back"
    finally:
        cl.close_all()


@pytest.mark.needs_nats
@pytest.mark.parametrize("batching", [False, True], ids=["default", "always-batch"])
def test_kill9_nats_node_keeps_acknowledged_messages(request, batching):
    """The NATS node leading the message stream dies mid-stream: publishing goes on (the streams
    are replicated) and every message whose PUBACK the publisher got is delivered. Run twice:
    with the default (one by one under this light load) and with every QoS 1 message in a batch,
    whose batches the leader's death breaks (they are published again)."""
    nats, procs, targets = request.getfixturevalue("fresh_cluster_batching" if batching else "fresh_cluster")
    a, b, c = targets
    n = max(200, N_MESSAGES // 2)
    topic = uid("nkill")
    cl = Tracker(a)
    try:
        sub = cl(b, client_id=uid("nk-sub"), version=V5, clean=False, session_expiry=600).connect()
        assert sub.subscribe(topic, qos=1) == [1]
        coll = Collector(sub, topic)
        pub = cl(c, client_id=uid("nk-pub"), version=V5, clean=False, session_expiry=600, max_inflight=10).connect()
        killed = threading.Event()
        victim = []

        def progress(i):
            if i == n // 3 and not killed.is_set():
                # the worst case: the leader of the (by now existing) message stream dies
                victim.append(message_stream_leader(nats))
                nats.nodes[victim[0]].kill9()
                killed.set()

        publishing = start_publisher(pub, topic, n, 1, progress, [c, a], PUBLISH_DEADLINE_S)
        # the subscriber's broker may drop it while it fails over to another NATS node: follow it
        deadline = time.monotonic() + PUBLISH_DEADLINE_S + 60
        while not publishing.done() and time.monotonic() < deadline:
            d = sub.last_disconnect(0.5)
            if d is not None:
                reconnect(sub, [b, a])
        acked, _sent = publishing.result(timeout=5)  # raises what the publisher raised
        assert len(acked) >= n // 2, (f"only {len(acked)} of {n} acknowledged after NATS node {victim} died; "
                                      f"streams: {stream_report(nats)}")
        deadline = time.monotonic() + DELIVERY_DEADLINE_S
        while time.monotonic() < deadline and acked - set(coll.counts):
            d = sub.last_disconnect(0.5)
            if d is not None:
                reconnect(sub, [b, a])
        coll.stop()
        lost = sorted(acked - set(coll.counts))
        assert not lost, (f"{len(lost)} acknowledged messages never delivered, e.g. {lost[:20]}; "
                          f"streams: {stream_report(nats)}")
        if batching and nats is not None:
            publisher_node = procs[2]
            page = node_metrics(publisher_node)
            assert page.value("jetmq_publish_batches_total") >= 1, "the publisher's node never batched"
    finally:
        cl.close_all()


def test_kill9_completed_qos2_not_redelivered_behind_pending_qos1(fresh_cluster):
    """A QoS 2 message the subscriber completed (PUBCOMP) while an earlier QoS 1 message still
    waited for its PUBACK must not come back as a PUBLISH after its node dies: the stored
    cursor is still below it, and the client forgot its packet id at PUBREL, so a resend would
    be a second delivery. (Found by the node-failure benchmark with --puback-delay-ms.)"""
    import mqtt_raw as R

    _nats, procs, targets = fresh_cluster
    a, b, _c = targets
    cid, topic = uid("q2c"), uid("q2c-topic")
    props = {"SessionExpiryInterval": 600}
    cl = Tracker(a)
    try:
        sub = cl.raw(a, version=V5)
        sub.mqtt_connect(cid, clean=False, props=props)
        assert sub.subscribe([(topic, 2)]).reasons == [2]
        pub = cl.raw(b, version=V5)
        pub.mqtt_connect(uid("q2c-pub"))
        assert pub.publish_acked(topic, b"first", qos=1).type == R.PUBACK
        first = sub.expect(R.PUBLISH, 30)
        assert (first.payload, first.qos) == (b"first", 1)
        # PUBACK for "first" is held back; "second" goes through the whole QoS 2 exchange.
        assert pub.publish_acked(topic, b"second", qos=2).type == R.PUBCOMP
        second = sub.expect(R.PUBLISH, 30)
        assert (second.payload, second.qos) == (b"second", 2)
        sub.send(R.ack(R.PUBREC, second.packet_id, V5))
        assert sub.expect(R.PUBREL, 30).packet_id == second.packet_id
        sub.send(R.ack(R.PUBCOMP, second.packet_id, V5))
        # The session record is written about once a second while its state changes; there is
        # no outside event for it, so give it a few write periods before the kill.
        time.sleep(3.0)
        procs[0].kill9()
        sub.wait_closed(30)

        again = cl.raw(b, version=V5)
        assert again.mqtt_connect(cid, clean=False, props=props).session_present
        got = again.receive_for(5.0)
        payloads = [p.payload for p in got if p.type == R.PUBLISH]
        assert b"second" not in payloads, f"completed QoS 2 message delivered again: {got}"
        assert b"first" in payloads, f"unacknowledged QoS 1 message not resent after the crash: {got}"
    finally:
        cl.close_all()


@pytest.mark.needs_nats
def test_readyz_follows_jetstream_not_just_the_nats_connection(fresh_cluster):
    """A broker whose NATS node lost the cluster majority is still connected to it but cannot
    store anything: /readyz must say 503 (so DNS health checks take the node out) while
    /healthz stays 200, and /readyz must come back once JetStream answers again."""
    nats, procs, _targets = fresh_cluster
    if nats is None:
        pytest.skip("jetmq only: NATS majority loss")
    b1 = procs[0]  # prefers NATS node 0, the one left alone below
    assert b1.ready()
    nats.nodes[1].kill9()
    nats.nodes[2].kill9()
    harness.wait_until(lambda: not b1.ready(), 30, 0.25, "b1 to turn unready without a JetStream majority")
    status, _ = harness.http_get(f"http://{b1.host}:{b1.http_port}/healthz", timeout=2.0)
    assert status == 200, "the process is alive: /healthz stays 200"
    assert "JetStream does not answer; not ready" in b1.log_tail(400)
    nats.nodes[1].start()
    harness.wait_until(b1.ready, 90, 0.5, "b1 to be ready again once JetStream has a majority")
    assert "JetStream reachable again; ready" in b1.log_tail(400)


# A message reader's recovery: measured 2026-11-30, from the last PUBACK to the last delivery.
# Without the broker's own stall watch (async-nats rebuilding its ordered consumer alone, after
# missed heartbeats and pauses of up to 10 s): 14.3-19 s. With it: 3-8 s.
READER_RECOVERY_S = 12


def reader_consumer_hosts(nats) -> dict[str, int]:
    """For each push consumer of the message stream (the brokers' ordered readers): the index
    of the NATS node hosting it."""
    names = [n.server_name for n in nats.nodes]
    hosts = {}
    for node in nats.nodes:
        try:
            jsz = harness.http_json(f"{node.monitor_url}/jsz?consumers=true&config=true", timeout=3)
        except Exception:  # noqa: BLE001
            continue
        for acc in jsz.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                if st.get("name") != "JETMQ_MSGS":
                    continue
                for c in st.get("consumer_detail") or []:
                    leader = (c.get("cluster") or {}).get("leader")
                    if (c.get("config") or {}).get("deliver_subject") and leader in names:
                        hosts[c["name"]] = names.index(leader)
    return hosts


def test_stream_readers_hosted_on_a_killed_nats_node_recover(fresh_cluster):
    """Every broker reads the message stream through one ordered push consumer, hosted by one
    NATS node. That node dies: the readers it hosted are rebuilt elsewhere and cross-node
    delivery resumes within READER_RECOVERY_S of the publishes being acknowledged."""
    nats, procs, targets = fresh_cluster
    if nats is None:
        pytest.skip("jetmq only: where JetStream consumers live")
    harness.wait_until(lambda: len(reader_consumer_hosts(nats)) >= len(procs), 30, 0.5,
                       "every broker's stream reader to show up in /jsz")
    hosting = collections.Counter(reader_consumer_hosts(nats).values())
    # Prefer a node that is not the JetStream meta leader: then the rebuild does not also wait
    # for a meta election, and the time measured is the readers' own.
    meta = nats.nodes[0].meta_leader()
    candidates = [i for i in hosting if nats.nodes[i].server_name != meta] or list(hosting)
    victim = max(candidates, key=lambda i: hosting[i])
    topic = uid("reader")
    cl = Tracker(targets[0])
    try:
        subs = []
        for t in targets:
            s = cl.connect(t, version=V5)
            assert s.subscribe(topic, qos=1) == [1]
            subs.append(s)
        nats.nodes[victim].kill9()
        for i, t in enumerate(targets):
            pub = cl(t, client_id=uid("reader-pub"), version=V311)
            # A CONNECT waits out a session-store election for up to 10 s, then is refused
            # (3.1.1 return code 3): then once more, like a device would.
            for _ in range(3):
                if pub.connect(timeout=15, expect=None).connack.reason == 0:
                    break
            assert pub.connack.reason == 0, f"CONNACK {pub.connack.reason:#x} three times"
            assert pub.publish(topic, f"m{i}".encode(), qos=1) == 0
        acked = time.monotonic()
        for s in subs:
            left = max(0.5, READER_RECOVERY_S - (time.monotonic() - acked))
            got = sorted(m.payload.decode() for m in s.expect(len(targets), timeout=left))
            assert got == [f"m{i}" for i in range(len(targets))]
        took = time.monotonic() - acked
        print(f"readers on NATS node n{victim + 1} ({hosting[victim]} of {len(procs)}): "
              f"every message delivered {took:.1f}s after the last PUBACK")
    finally:
        cl.close_all()
