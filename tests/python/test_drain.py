"""Graceful drain: SIGTERM / SIGINT / `jetmq-broker drain` (docs/drain.md).

A draining node turns /readyz to 503 at once (/healthz stays 200), closes its listeners,
sends its clients away in waves spread over drain.duration_ms (MQTT 5: DISCONNECT 0x8B, or
0x9C + Server Reference when configured; 3.1.1: closed), writes every session back and
exits 0. Every load loop here is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

import harness
from conftest import broker_config
from mqtt_client import V5, V311, Client, Tracker, uid

pytestmark = [pytest.mark.jetmq_only("drain is jetmq's own"), pytest.mark.slow, pytest.mark.timeout(600)]

SERVER_SHUTTING_DOWN = 0x8B
USE_ANOTHER_SERVER = 0x9C


def drain_config(**drain) -> dict:
    c = broker_config()
    c["drain"] = {"duration_ms": 3000, "waves": 3, "timeout_ms": 20000, **drain}
    return c


def sigterm(node: harness.BrokerNode) -> float:
    node._expect_exit = True
    os.kill(node.pid, signal.SIGTERM)
    return time.monotonic()


def wait_exit(node: harness.BrokerNode, timeout: float) -> int:
    try:
        return node.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{node.name} still running {timeout}s after the drain began") from None


def drain_command(node_id: str, nats_url: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`jetmq-broker drain` as an operator runs it: only a NATS URL, nothing about the node's host."""
    return subprocess.run(
        [str(harness.broker_bin()), "drain", "--node-id", node_id, "--nats", nats_url],
        capture_output=True, text=True, timeout=timeout,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")},
             **harness.nats_seed_env([nats_url], "broker")},  # the broker's NATS key
    )


def http_status(node: harness.BrokerNode, path: str) -> int | None:
    try:
        return harness.http_get(f"http://{node.host}:{node.http_port}{path}", timeout=1.0)[0]
    except OSError:
        return None


class HealthWatch:
    """Polls /readyz and /healthz in the background; remembers when readyz first said 503."""

    def __init__(self, node: harness.BrokerNode):
        self.node = node
        self.unready_at: float | None = None
        self.health_while_unready: list[int | None] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            ready = http_status(self.node, "/readyz")
            if ready == 503:
                if self.unready_at is None:
                    self.unready_at = time.monotonic()
                self.health_while_unready.append(http_status(self.node, "/healthz"))
            if ready is None and self.unready_at is not None:
                return  # the process is gone
            time.sleep(0.02)  # the sampling period: when readyz turned 503 is known to 20 ms

    def stop(self):
        self._stop.set()
        self._t.join(5)
        # the last probe may race the process exit
        while self.health_while_unready and self.health_while_unready[-1] is None:
            self.health_while_unready.pop()


def waves_of(times: list[float], gap: float = 0.4) -> list[list[float]]:
    """Disconnect times grouped into bursts separated by more than ``gap`` seconds."""
    groups: list[list[float]] = []
    for t in sorted(times):
        if groups and t - groups[-1][-1] <= gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def test_sigterm_drains_in_waves_and_exits_0(broker_factory):
    """readyz 503 before the first client leaves, healthz 200 throughout, listeners closed,
    v5 clients get 0x8B, v3.1.1 clients are closed, disconnects come in 3 waves over ~3 s,
    exit code 0 well within drain.timeout_ms."""
    node = broker_factory(config=drain_config(), node_id=uid("dw").replace("-", "_"))
    cl = Tracker(node.address)
    try:
        v5 = [cl.connect(node.address, version=V5) for _ in range(6)]
        v3 = [cl.connect(node.address, version=V311) for _ in range(3)]
        watch = HealthWatch(node)
        started = sigterm(node)
        lefts = {}
        for c in v5 + v3:
            lefts[c.client_id] = c.wait_disconnect(20)
        code = wait_exit(node, 25)
        watch.stop()
        elapsed = time.monotonic() - started

        assert code == 0, f"exit code {code}\n{node.log_tail(40)}"
        assert elapsed < 20, f"drain took {elapsed:.1f}s, longer than drain.timeout_ms"
        for c in v5:
            d = lefts[c.client_id]
            assert d.from_server and d.reason == SERVER_SHUTTING_DOWN, f"{c.client_id}: {d}"
            assert "ServerReference" not in d.props
        for c in v3:
            assert not lefts[c.client_id].from_server, "3.1.1 has no DISCONNECT from the server"
        times = [d.t for d in lefts.values()]
        assert watch.unready_at is not None, "/readyz never answered 503 during the drain"
        assert watch.unready_at < min(times), (
            f"/readyz turned 503 {watch.unready_at - min(times):.3f}s after the first client was disconnected")
        assert watch.health_while_unready and all(s == 200 for s in watch.health_while_unready), \
            f"/healthz must stay 200 while draining: {watch.health_while_unready[:10]}"
        groups = waves_of(times)
        spread = max(times) - min(times)
        print(f"drain: unready after {watch.unready_at - started:.3f}s, disconnects at "
              f"{[round(x - started, 2) for x in sorted(times)]}, {len(groups)} waves, exit after {elapsed:.2f}s")
        assert len(groups) == 3, f"expected 3 waves, saw {[len(g) for g in groups]}"
        assert [len(g) for g in groups] == [3, 3, 3], f"uneven waves {[len(g) for g in groups]}"
        assert 1.4 <= spread <= 4.0, f"disconnects spread over {spread:.2f}s, expected about 2s (waves at 1, 2, 3 s)"
        assert min(times) - started >= 0.5, "the first wave should come after duration/waves, not at once"
    finally:
        cl.close_all()


def test_listener_closed_while_draining(broker_factory):
    """Once the drain begins, new connections are refused while old ones are still served."""
    node = broker_factory(config=drain_config(duration_ms=4000, waves=1), node_id=uid("dl").replace("-", "_"))
    cl = Tracker(node.address)
    try:
        old = cl.connect(node.address, version=V5)
        topic = uid("dl")
        old.subscribe(topic, qos=1)
        sigterm(node)
        harness.wait_until(lambda: http_status(node, "/readyz") == 503, 5, what="readyz 503")
        assert not harness.port_open(node.host, node.port), "MQTT listener still open while draining"
        # the existing connection still works until its wave
        assert old.publish(topic, b"still served", qos=1) == 0
        assert old.get(5).payload == b"still served"
        d = old.wait_disconnect(15)
        assert d.reason == SERVER_SHUTTING_DOWN
        assert wait_exit(node, 25) == 0
    finally:
        cl.close_all()


def test_second_signal_stops_at_once(broker_factory):
    """A second SIGTERM skips the remaining waves: everyone leaves at once, exit 0."""
    node = broker_factory(config=drain_config(duration_ms=20000, waves=2, timeout_ms=40000),
                          node_id=uid("ds").replace("-", "_"))
    cl = Tracker(node.address)
    try:
        clients = [cl.connect(node.address, version=V5) for _ in range(4)]
        sigterm(node)
        harness.wait_until(lambda: http_status(node, "/readyz") == 503, 5, what="readyz 503")
        time.sleep(0.5)  # nobody may be disconnected yet: a moment into the drain
        assert all(c.connected for c in clients), "first wave is due only after 10s"
        second = sigterm(node)
        for c in clients:
            d = c.wait_disconnect(10)
            assert d.reason == SERVER_SHUTTING_DOWN and d.t - second < 5, d
        assert wait_exit(node, 15) == 0
        assert time.monotonic() - second < 10
    finally:
        cl.close_all()


def test_server_reference_gets_0x9c(broker_factory):
    ref = "mqtt-b.example.net:1883"
    node = broker_factory(config=drain_config(duration_ms=500, waves=1, server_reference=ref),
                          node_id=uid("dr").replace("-", "_"))
    cl = Tracker(node.address)
    try:
        v5 = cl.connect(node.address, version=V5)
        v3 = cl.connect(node.address, version=V311)
        sigterm(node)
        d5, d3 = v5.wait_disconnect(15), v3.wait_disconnect(15)
        assert d5.from_server and d5.reason == USE_ANOTHER_SERVER, d5
        assert d5.props.get("ServerReference") == ref, d5.props
        assert not d3.from_server
        assert wait_exit(node, 25) == 0
    finally:
        cl.close_all()


def test_drain_command_over_nats(broker_factory, nats):
    """`jetmq-broker drain --node-id ID --nats URL`: needs only NATS, not the node's address."""
    node_id = uid("dc").replace("-", "_")
    node = broker_factory(config=drain_config(duration_ms=1000, waves=2), node_id=node_id)
    cl = Tracker(node.address)
    try:
        c = cl.connect(node.address, version=V5)
        missing = drain_command(node_id + "_nope", nats.url)
        assert missing.returncode != 0, "draining a node that does not exist must fail"
        assert "nope" in missing.stderr, missing.stderr
        node._expect_exit = True
        r = drain_command(node_id, nats.url)
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["node_id"] == node_id and answer["draining"] is True and answer["connections"] == 1, answer
        assert c.wait_disconnect(15).reason == SERVER_SHUTTING_DOWN
        assert wait_exit(node, 25) == 0
        assert "drain requested over NATS" in node.log_tail(200)
    finally:
        cl.close_all()


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_persistent_session_moves_to_another_node(broker_factory, version):
    """A persistent session drained from node A resumes on node B with its subscription and
    the QoS 1 messages published while it was away."""
    a = broker_factory(config=drain_config(duration_ms=500, waves=1), node_id=uid("pa").replace("-", "_"))
    b = broker_factory(config=drain_config(), node_id=uid("pb").replace("-", "_"))
    topic = uid("moved")
    cl = Tracker(a.address)
    try:
        sub = cl(a.address, client_id=uid("mover"), version=version, clean=False,
                 session_expiry=600 if version == V5 else None).connect()
        assert sub.subscribe(topic, qos=1) == [1]
        pub = cl.connect(b.address, version=V5)
        assert pub.publish(topic, b"before", qos=1) == 0
        assert sub.get(10).payload == b"before"
        sigterm(a)
        sub.wait_disconnect(15)
        assert wait_exit(a, 25) == 0
        for i in range(20):
            assert pub.publish(topic, f"away {i}".encode(), qos=1) == 0
        sub.connect(host=b.host, port=b.port, clean=False)
        assert sub.session_present, "session lost by the drain"
        got = [m.payload for m in sub.expect(20, 20)]
        assert got == [f"away {i}".encode() for i in range(20)]
        assert pub.publish(topic, b"after", qos=1) == 0
        assert sub.get(10).payload == b"after", "subscription did not move with the session"
    finally:
        cl.close_all()


def test_will_published_on_drain_by_default(broker_factory):
    """Default (drain.will_delay_secs = 0): a drain is a server-initiated close, so MQTT's rule
    applies and wills go out (after the client's own will delay)."""
    a = broker_factory(config=drain_config(duration_ms=500, waves=1), node_id=uid("wa").replace("-", "_"))
    b = broker_factory(config=drain_config(), node_id=uid("wb").replace("-", "_"))
    base = uid("dwill")
    cl = Tracker(a.address)
    try:
        watcher = cl.connect(b.address, version=V5)
        watcher.subscribe(f"{base}/#", qos=1)
        cl(a.address, version=V311, will={"topic": f"{base}/v311", "payload": b"v311", "qos": 1}).connect()
        cl(a.address, version=V5, will={"topic": f"{base}/v5", "payload": b"v5", "qos": 1}).connect()
        sigterm(a)
        assert wait_exit(a, 25) == 0
        got = {m.topic: m.payload for m in watcher.expect(2, 15)}
        assert got == {f"{base}/v311": b"v311", f"{base}/v5": b"v5"}
    finally:
        cl.close_all()


def test_will_delay_on_drain_lets_clients_move(broker_factory):
    """drain.will_delay_secs = 3: a persistent-session client that resumes on another node in
    time cancels its will; one that does not come back still gets its will, later."""
    cfg = drain_config(duration_ms=500, waves=1, will_delay_secs=3)
    a = broker_factory(config=cfg, node_id=uid("da").replace("-", "_"))
    b = broker_factory(config=cfg, node_id=uid("db").replace("-", "_"))
    base = uid("dwd")
    cl = Tracker(a.address)
    try:
        watcher = cl.connect(b.address, version=V5)
        watcher.subscribe(f"{base}/#", qos=1)
        mover = cl(a.address, client_id=uid("mv"), version=V5, clean=False, session_expiry=600,
                   will={"topic": f"{base}/mover", "payload": b"must not appear", "qos": 1}).connect()
        cl(a.address, client_id=uid("gone"), version=V311, clean=False,
           will={"topic": f"{base}/gone", "payload": b"gone", "qos": 1}).connect()
        started = sigterm(a)
        mover.wait_disconnect(15)
        mover.connect(host=b.host, port=b.port, clean=False)
        assert mover.session_present
        assert wait_exit(a, 25) == 0
        m = watcher.get(40)
        late = time.monotonic() - started
        assert (m.topic, m.payload) == (f"{base}/gone", b"gone")
        assert late >= 2.5, f"will of the drained client came after {late:.1f}s, before drain.will_delay_secs"
        watcher.expect_none(3.0)
    finally:
        cl.close_all()


# ----------------------------------------------------------------------------- rolling restart

ROLL_MAX_PER_PUBLISHER = int(os.environ.get("JETMQ_TEST_ROLL_MESSAGES", "10000"))
# Paced, so the load lasts through all three restarts instead of finishing before them.
ROLL_RATE_PER_PUBLISHER = float(os.environ.get("JETMQ_TEST_ROLL_RATE", "400"))
ROLL_PUBLISHERS = 3
DELIVERY_DEADLINE_S = 150


@pytest.fixture
def drain_cluster(tmp_path_factory):
    """3 NATS + 3 jetmq nodes with a short drain, function scoped (nodes get restarted)."""
    d = tmp_path_factory.mktemp("roll")
    cluster = harness.NatsCluster(d, n=3)
    cluster.start()
    nodes = []
    try:
        nodes = harness.start_broker_cluster(d, cluster, config=drain_config(duration_ms=2000, waves=4))
        yield cluster, nodes
    finally:
        for b in nodes:
            b.terminate()
        cluster.stop()


def connect_anywhere(client: Client, nodes, first: int, timeout: float = 60.0) -> int:
    """Reconnect ``client`` (same paho instance: its unacked QoS 1 messages are resent) to a
    live node, trying ``first`` and then the others. Returns the node index."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for k in range(len(nodes)):
            i = (first + k) % len(nodes)
            try:
                client.connect(host=nodes[i].host, port=nodes[i].port, clean=False, timeout=5)
                return i
            except (AssertionError, OSError) as e:
                last = e
        time.sleep(0.2)  # a pause between rounds of attempts while nodes restart
    raise AssertionError(f"{client.client_id} could not reconnect within {timeout}s: {last}")


class Publisher(threading.Thread):
    """Publishes "<name>:<i>" with QoS 1, 8 in flight, until told to stop (or the bound),
    following its connection from node to node. ``acked``: numbers whose PUBACK arrived."""

    def __init__(self, client: Client, topic: str, nodes, home: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.client, self.topic, self.nodes, self.home, self.stop_flag = client, topic, nodes, home, stop
        self.acked: set[int] = set()
        self.sent = 0
        self.reconnects = 0
        self.error: BaseException | None = None

    def state(self) -> str:
        return (f"{self.client.client_id} sent={self.sent} acked={len(self.acked)} home={self.home} "
                f"connected={self.client.connected} alive={self.is_alive()} error={self.error!r}")

    def ensure(self):
        if not self.client.connected:
            self.home = connect_anywhere(self.client, self.nodes, self.home + 1)
            self.reconnects += 1

    def settle(self, window, deadline):
        for num, info in window:
            while not getattr(info, "_published", False) and time.monotonic() < deadline:
                self.ensure()
                with info._condition:
                    info._condition.wait(0.2)
            if getattr(info, "_published", False):
                self.acked.add(num)

    def run(self):
        try:
            started = time.monotonic()
            deadline = started + 300
            window = []
            while self.sent < ROLL_MAX_PER_PUBLISHER and not self.stop_flag.is_set() and time.monotonic() < deadline:
                self.ensure()
                window.append((self.sent, self.client.paho.publish(self.topic, str(self.sent).encode(), qos=1)))
                self.sent += 1
                if len(window) >= 8:
                    self.settle(window, deadline + 60)
                    window.clear()
                    ahead = started + self.sent / ROLL_RATE_PER_PUBLISHER - time.monotonic()
                    if ahead > 0:
                        self.stop_flag.wait(ahead)
            self.settle(window, deadline + 60)
        except BaseException as e:  # noqa: BLE001
            self.error = e


class Subscriber(threading.Thread):
    """Counts every (topic, number) a persistent-session subscriber receives and follows it
    to another node whenever it is disconnected."""

    def __init__(self, client: Client, nodes, home: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.client, self.nodes, self.home, self.stop_flag = client, nodes, home, stop
        self.counts: dict[tuple[str, int], int] = {}
        self.reasons: list[int] = []
        self.lost_session = 0
        self.error: BaseException | None = None

    def state(self) -> str:
        return (f"{self.client.client_id} got={len(self.counts)} home={self.home} reasons={self.reasons} "
                f"connected={self.client.connected} alive={self.is_alive()} error={self.error!r}")

    def run(self):
        try:
            while not self.stop_flag.is_set():
                try:
                    m = self.client.messages.get(timeout=0.1)
                    key = (m.topic, int(m.payload))
                    self.counts[key] = self.counts.get(key, 0) + 1
                except Exception:  # noqa: BLE001 - queue.Empty
                    pass
                d = self.client.last_disconnect()
                if d is not None:
                    self.reasons.append(d.reason if d.from_server else -1)
                    self.home = connect_anywhere(self.client, self.nodes, self.home + 1)
                    if not self.client.session_present:
                        self.lost_session += 1
        except BaseException as e:  # noqa: BLE001
            self.error = e


@pytest.mark.cluster
def test_rolling_restart_under_qos1_load_loses_nothing(drain_cluster):
    """Each of 3 nodes in turn is drained (SIGTERM, or `jetmq-broker drain` through another
    NATS node) and restarted while publishers and persistent-session subscribers keep going.
    Every acknowledged QoS 1 message reaches every subscriber; duplicates are counted."""
    nats, nodes = drain_cluster
    base = uid("roll")
    stop_pub, stop_sub = threading.Event(), threading.Event()
    cl = Tracker(nodes[0].address)
    subs: list[Subscriber] = []
    pubs: list[Publisher] = []
    try:
        for i, version in enumerate([V5, V311, V5]):
            c = cl(nodes[i].address, client_id=uid(f"rs{i}"), version=version, clean=False,
                   session_expiry=600 if version == V5 else None).connect()
            assert c.subscribe(f"{base}/#", qos=1) == [1]
            subs.append(Subscriber(c, nodes, i, stop_sub))
        for i, version in enumerate([V5, V311, V5][:ROLL_PUBLISHERS]):
            c = cl(nodes[(i + 1) % 3].address, client_id=uid(f"rp{i}"), version=version, clean=False,
                   session_expiry=600 if version == V5 else None, max_inflight=8).connect()
            pubs.append(Publisher(c, f"{base}/p{i}", nodes, (i + 1) % 3, stop_pub))
        for t in subs + pubs:
            t.start()

        def progress() -> int:
            return sum(p.sent for p in pubs)

        harness.wait_until(lambda: progress() >= 200, 60, what="load running before the roll")
        timeline = []
        for i, node in enumerate(nodes):
            before = progress()
            t0 = time.monotonic()
            if i == 1:
                # from "another host": the command talks to NATS node 3 only
                node._expect_exit = True
                r = drain_command(node.node_id, nats.nodes[2].url)
                assert r.returncode == 0, f"drain command failed: {r.stderr}"
            else:
                sigterm(node)
            code = wait_exit(node, 30)
            drained = time.monotonic() - t0
            assert code == 0, f"{node.name} exited {code} after drain\n{node.log_tail(40)}"
            node.start(timeout=60)
            timeline.append((node.node_id, round(drained, 2), round(time.monotonic() - t0, 2), progress() - before))
            try:
                harness.wait_until(lambda: progress() >= before + 100, 60, what=f"load continuing after {node.name}")
            except TimeoutError as e:
                raise AssertionError(f"{e}; publishers: {[p.state() for p in pubs]}; "
                                     f"subscribers: {[s.state() for s in subs]}") from None
        stop_pub.set()
        for p in pubs:
            p.join(120)
            assert not p.is_alive(), f"{p.client.client_id} did not finish"
            assert p.error is None, f"publisher failed: {p.error!r}"

        expected = {(p.topic, n) for p in pubs for n in p.acked}
        # the assertions below say what is missing
        harness.poll_until(lambda: not any(expected - s.counts.keys() for s in subs), DELIVERY_DEADLINE_S, 0.5)
        time.sleep(1.0)  # a moment for late duplicates to show up (counted below)
        stop_sub.set()
        for s in subs:
            s.join(30)
            assert s.error is None, f"subscriber failed: {s.error!r}"

        sent = sum(p.sent for p in pubs)
        print(f"\nrolling restart: timeline (node, drain s, drain+restart s, msgs published meanwhile) {timeline}")
        print(f"published {sent}, acknowledged {len(expected)}, publisher reconnects {[p.reconnects for p in pubs]}")
        for s in subs:
            got = s.counts.keys() & expected
            dups = sum(c - 1 for k, c in s.counts.items() if c > 1)
            print(f"subscriber {s.client.client_id}: received {len(got)}/{len(expected)} acknowledged, "
                  f"{dups} duplicates, disconnect reasons {s.reasons}, sessions lost {s.lost_session}")
        for s in subs:
            lost = sorted(expected - s.counts.keys())
            assert not lost, f"{s.client.client_id} lost {len(lost)} acknowledged QoS 1 messages, e.g. {lost[:10]}"
            assert s.lost_session == 0, f"{s.client.client_id} lost its session in a drain"
            assert s.reasons and all(r in (SERVER_SHUTTING_DOWN, -1) for r in s.reasons), s.reasons
        assert sent >= 600, f"only {sent} messages published during the roll"
    finally:
        stop_pub.set()
        stop_sub.set()
        cl.close_all()
