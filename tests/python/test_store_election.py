"""A session store election: kill -9 of the NATS node that leads the sessions KV bucket.

While the bucket elects a new leader (a few seconds), no session write can land. The brokers
must wait that out: no client of a broker whose own NATS node survived is disconnected, no
acknowledged message is lost, a CONNECT and a SUBSCRIBE made during the election succeed
once the store is back, and every session still resumes afterwards (issue 19, finding 4).
"""

import collections
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import harness
import pytest

from mqtt_client import V5, V311, Tracker, uid

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.needs_nats, pytest.mark.timeout(600)]

SESSIONS_STREAM = "KV_JETMQ_SESSIONS"
# Streams whose leader must not die with the sessions bucket's: this test is about the
# bucket alone (the message stream's election is test_cluster_failover's).
OTHER_STREAMS = ("JETMQ_MSGS", "JETMQ_RETAINED")

BEFORE_KILL_S = 4.0
AFTER_KILL_S = 25.0
PUBLISH_INTERVAL_S = 0.02


def _api(nats, subject: str) -> dict:
    last = None
    for node in nats.nodes:
        if not node.alive():
            continue
        try:
            return json.loads(node.request(subject, b"", timeout=5))
        except Exception as e:  # noqa: BLE001 - try the next node
            last = e
    raise AssertionError(f"no live NATS node answered {subject}: {last}")


def stream_leader(nats, stream: str) -> str | None:
    info = _api(nats, f"$JS.API.STREAM.INFO.{stream}")
    return (info.get("cluster") or {}).get("leader")


def isolate_sessions_leader(nats) -> int:
    """Index of the NATS node leading the sessions bucket, after moving the leadership of the
    message and retained streams away from it (leader step-downs), so that killing it
    elects only the bucket's leader."""
    names = [n.server_name for n in nats.nodes]
    found = []

    def separated() -> bool:
        leader = stream_leader(nats, SESSIONS_STREAM)
        if leader not in names:
            return False
        clash = [s for s in OTHER_STREAMS if stream_leader(nats, s) == leader]
        for stream in clash:  # the next poll (1 s on) sees where the leadership went
            _api(nats, f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}")
        found[:] = [names.index(leader)]
        return not clash

    try:
        harness.wait_until(separated, 60, 1.0, "the sessions bucket's leader to lead none of the streams")
    except TimeoutError as e:
        raise AssertionError(f"could not separate the sessions bucket's leader from the streams' leaders: {e}") from None
    return found[0]


class Subscriber:
    """Counts (publisher, number) pairs a client receives, in the background."""

    def __init__(self, client):
        self.client = client
        self.counts: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                m = self.client.messages.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            self.counts[(m.topic.rsplit("/", 1)[-1], int(m.payload))] += 1

    def stop(self):
        self._stop.set()
        self._t.join(5)


def test_no_client_of_a_surviving_node_disconnected_when_the_sessions_leader_dies(fresh_cluster):
    nats, procs, targets = fresh_cluster
    if nats is None:
        pytest.skip("needs real NATS nodes")
    victim = isolate_sessions_leader(nats)
    # Broker i prefers NATS node i: the others keep their NATS connection.
    survivors = [t for i, t in enumerate(targets) if i != victim]
    topic = uid("elect")
    cl = Tracker(survivors[0])
    try:
        subscribers = []
        for t in survivors:
            for version, kw in ((V311, {}), (V311, {}), (V5, {"session_expiry": 600}), (V5, {"session_expiry": 600})):
                c = cl(t, client_id=uid("el-sub"), version=version, clean=False, **kw).connect()
                assert c.subscribe(f"{topic}/#", qos=1) == [1]
                subscribers.append(Subscriber(c))
        publishers = [
            cl(t, client_id=uid("el-pub"), version=V5, clean=False, session_expiry=600, max_inflight=10).connect()
            for t in survivors
        ]
        acked = {p.client_id: set() for p in publishers}
        stop = threading.Event()

        def publish(pub):
            """Publishes until stopped (or disconnected); raises if a message is not acknowledged."""
            i = 0
            while not stop.is_set() and pub.connected:
                info = pub.paho.publish(f"{topic}/{pub.client_id}", str(i).encode(), qos=1)
                num = i
                i += 1
                deadline = time.monotonic() + 30
                while not getattr(info, "_published", False) and pub.connected and time.monotonic() < deadline:
                    with info._condition:
                        info._condition.wait(0.2)
                if getattr(info, "_published", False):
                    acked[pub.client_id].add(num)
                elif pub.connected:
                    raise AssertionError(f"{pub.client_id}: message {num} not acknowledged within 30 s")
                time.sleep(PUBLISH_INTERVAL_S)  # pacing: a steady flow through the election

        pool = ThreadPoolExecutor(len(publishers), thread_name_prefix="publisher")
        try:
            publishing = [pool.submit(publish, p) for p in publishers]
        finally:
            pool.shutdown(wait=False)
        time.sleep(BEFORE_KILL_S)  # the load runs a while before the kill
        killed_at = time.monotonic()
        nats.nodes[victim].kill9()

        # During the election: a new persistent session on each survivor connects and
        # subscribes; both wait for the store instead of failing.
        time.sleep(0.5)  # just after the kill, in the election (which takes a few seconds)
        newcomers = []
        for t in survivors:
            c = cl(t, client_id=uid("el-new"), version=V5, clean=False, session_expiry=600)
            c.connect(timeout=30)
            assert c.subscribe(f"{topic}/#", qos=1, timeout=30) == [1]
            newcomers.append(c)
        claimed_after = time.monotonic() - killed_at

        time.sleep(max(0.0, AFTER_KILL_S - (time.monotonic() - killed_at)))  # the load runs on through it
        stop.set()
        failures = []
        for pub, f in zip(publishers, publishing):
            try:
                f.result(timeout=40)
            except Exception as e:  # noqa: BLE001 - concurrent.futures.TimeoutError included
                failures.append(f"{pub.client_id}: {e!r}")
        assert not failures, f"publishers failed: {failures}"
        everyone = [s.client for s in subscribers] + publishers + newcomers
        dropped = [(c.client_id, c.last_disconnect()) for c in everyone if not c.connected]
        assert not dropped, (f"{len(dropped)} clients of surviving nodes were disconnected by the sessions "
                             f"bucket's election (NATS node {victim} killed): {dropped[:10]}")

        expected = {(pid, n) for pid, nums in acked.items() for n in nums}
        assert len(expected) > 100, f"too little traffic to judge: {len(expected)} acknowledged"
        # the assertions below say what is missing
        harness.poll_until(lambda: not any(expected - set(s.counts) for s in subscribers), 60, 0.5)
        for s in subscribers:
            s.stop()
        for s in subscribers:
            lost = sorted(expected - set(s.counts))
            assert not lost, f"{s.client.client_id}: {len(lost)} acknowledged messages lost, e.g. {lost[:10]}"

        # Every session still resumes, on the other surviving node.
        addresses = [t.address for t in survivors]
        resume_s = []
        for s in subscribers:
            c = s.client
            c.abort()
            other = survivors[(addresses.index((c.host, c.port)) + 1) % len(survivors)]
            started = time.monotonic()
            c.connect(host=other.host, port=other.port, clean=False, timeout=20)
            resume_s.append(time.monotonic() - started)
            assert c.session_present, f"{c.client_id} ({'v5' if c.version == V5 else 'v3.1.1'}) lost its session"
        for p in procs:
            if p.alive():
                assert "panicked" not in p.log_tail(400), f"{p.name} panicked:\n{p.log_tail(40)}"
        print(f"victim NATS node {victim}; election-time CONNECT+SUBSCRIBE done {claimed_after:.1f}s after the kill; "
              f"{len(expected)} messages acknowledged; resume CONNECT->CONNACK max {max(resume_s):.3f}s")
    finally:
        cl.close_all()
