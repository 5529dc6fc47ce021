"""The deployment topology as processes: round-robin DNS in front of everything, no load
balancer (docs/dns.md).

    dnsmasq on 127.0.0.1:<dns port>:
        nats.jetmq.test, mqtt.jetmq.test -> 127.0.0.11, 127.0.0.12, 127.0.0.13
    3 nats-server nodes (JetStream, routes) on 127.0.0.11-13, one client port for all
    3 jetmq-broker nodes on 127.0.0.11-13, one MQTT port for all, each started with
        --nats nats://nats.jetmq.test:<port> and dns.nameservers = [dnsmasq]

Every name is resolved by the broker's hickory resolver through the real DNS server; the
brokers are given no IP address of any NATS node.
"""

from __future__ import annotations

import re
import subprocess

import pytest

import harness
from mqtt_client import V5, V311, Target, Tracker, uid

pytestmark = [pytest.mark.cluster, pytest.mark.needs_nats, pytest.mark.slow]

HOSTS = harness.NODE_HOSTS
NATS_NAME = "nats.jetmq.test"
MQTT_NAME = "mqtt.jetmq.test"


class Topology:
    def __init__(self, workdir):
        self.dns = harness.Dnsmasq(workdir, {NATS_NAME: HOSTS, MQTT_NAME: HOSTS})
        self.nats_port = harness.common_free_port(HOSTS)
        self.mqtt_port = harness.common_free_port(HOSTS)
        self.nats = harness.NatsCluster(workdir, n=3, hosts=HOSTS, ports=[self.nats_port] * 3)
        config = {"dns": {"nameservers": [self.dns.nameserver], "refresh_secs": 1}}
        self.brokers = [
            harness.BrokerNode(workdir, [f"nats://{NATS_NAME}:{self.nats_port}"], node_id=f"b{i + 1}", host=h,
                               port=self.mqtt_port, config=config)
            for i, h in enumerate(HOSTS)
        ]

    def start(self):
        self.dns.start()
        self.nats.start()
        for b in self.brokers:
            b.start(timeout=60)

    def stop(self):
        for b in self.brokers:
            b.terminate()
        self.nats.stop()
        self.dns.terminate()

    def targets(self) -> list[Target]:
        return [Target(b.host, b.port, "jetmq", {}, b) for b in self.brokers]

    def check(self, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(harness.broker_bin()), "check", f"{MQTT_NAME}:{self.mqtt_port}", "--nameserver", self.dns.nameserver],
            capture_output=True, text=True, timeout=timeout)

    def all_ready(self) -> bool:
        return all(harness.http_get(f"http://{b.host}:{b.http_port}/readyz", 1.0)[0] == 200 for b in self.brokers)


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    problem = harness.broker_bin_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    t = Topology(tmp_path_factory.mktemp("topology"))
    try:
        t.start()
        yield t
    finally:
        t.stop()


def check_rows(result: subprocess.CompletedProcess) -> list[list[str]]:
    lines = result.stdout.strip().splitlines()
    assert lines and lines[0].startswith("ADDRESS"), result.stdout + result.stderr
    return [line.split() for line in lines[1:]]


def cross_node_round(cl: Tracker, targets: list[Target], qos: int = 1) -> None:
    """A subscriber on every node; a publisher on every node; everyone gets everything."""
    topic = uid("topo")
    subs = []
    for t in targets:
        s = cl.connect(t, version=V5)
        assert s.subscribe(topic, qos=qos) == [qos]
        subs.append(s)
    for i, t in enumerate(targets):
        p = cl.connect(t, version=V311)
        assert p.publish(topic, f"from-{i}".encode(), qos=qos) == 0
    for s in subs:
        got = sorted(m.payload.decode() for m in s.expect(len(targets), timeout=30))
        assert got == [f"from-{i}" for i in range(len(targets))]
        s.expect_none(0.3)


def test_brokers_found_nats_through_dns(topo):
    for b in topo.brokers:
        log = b.log_tail(400)
        line = next((l for l in log.splitlines() if "connecting to NATS" in l), "")
        for h in HOSTS:
            assert f"nats://{h}:{topo.nats_port}" in line, f"{b.name} resolved {NATS_NAME} to all nodes: {line!r}"
        assert NATS_NAME not in line, "with a configured name server the pool holds addresses only"


def test_check_lists_every_node_with_its_own_id(topo):
    r = topo.check()
    assert r.returncode == 0, r.stdout + r.stderr
    rows = check_rows(r)
    assert sorted(row[0] for row in rows) == [f"{h}:{topo.mqtt_port}" for h in HOSTS]
    assert all(row[1] == "yes" for row in rows), r.stdout
    assert sorted(row[2] for row in rows) == ["b1", "b2", "b3"]
    by_addr = {row[0]: row[2] for row in rows}
    for b in topo.brokers:
        assert by_addr[f"{b.host}:{b.port}"] == b.node_id, "each address answers for its own node"


def test_messages_cross_every_node(topo):
    cl = Tracker(topo.targets()[0])
    try:
        cross_node_round(cl, topo.targets())
    finally:
        cl.close_all()


def test_check_fails_when_a_node_is_down(topo, tmp_path):
    # A fourth address in DNS that nobody serves, as after a node's death.
    topo.dns.set_records({NATS_NAME: HOSTS, MQTT_NAME: list(HOSTS) + ["127.0.0.14"]})
    try:
        harness.wait_until(lambda: len(check_rows(topo.check())) == 4, 30, interval=0.5,
                           what="dnsmasq serving the 4th address")
        r = topo.check()
        assert r.returncode == 1, r.stdout + r.stderr
        rows = {row[0]: row for row in check_rows(r)}
        assert rows[f"127.0.0.14:{topo.mqtt_port}"][1] == "no"
        assert all(rows[f"{h}:{topo.mqtt_port}"][1] == "yes" for h in HOSTS)
    finally:
        topo.dns.set_records({NATS_NAME: HOSTS, MQTT_NAME: HOSTS})


def test_nats_node_loss_and_dns_change(topo):
    """Kill one NATS node: the brokers stay (or come back) ready and keep delivering across
    nodes. Then take its address out of DNS: the brokers re-resolve and drop it from their
    NATS server pool."""
    victim = topo.nats.nodes[0]
    victim.kill9()
    harness.wait_until(topo.all_ready, 90, interval=0.5, what="all brokers ready after a NATS node died")
    cl = Tracker(topo.targets()[0])
    try:
        cross_node_round(cl, topo.targets())
    finally:
        cl.close_all()
    r = topo.check()
    assert r.returncode == 0 and sorted(row[2] for row in check_rows(r)) == ["b1", "b2", "b3"], r.stdout + r.stderr

    topo.dns.set_records({NATS_NAME: HOSTS[1:], MQTT_NAME: HOSTS})
    changed = re.compile(r"resolve differently now.*servers=\[(.*)\]")

    def pool_updated(b) -> bool:
        for line in b.log_tail(400).splitlines():
            m = changed.search(line)
            if m and HOSTS[0] not in m.group(1) and all(h in m.group(1) for h in HOSTS[1:]):
                return True
        return False

    for b in topo.brokers:
        harness.wait_until(lambda b=b: pool_updated(b), 30, interval=0.5,
                           what=f"{b.name} re-resolving {NATS_NAME} without the dead node")
    assert topo.all_ready()
