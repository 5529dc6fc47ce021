"""The deployment topology as processes: round-robin DNS in front of everything, no load
balancer (docs/dns.md).

    dnsmasq on 127.0.0.1:<dns port>:
        nats.jetmq.test, mqtt.jetmq.test -> 127.0.0.11, 127.0.0.12, 127.0.0.13
    3 nats-server nodes (JetStream, routes) on 127.0.0.11-13, one client port for all
    3 jetmq-broker nodes on 127.0.0.11-13, one MQTT port for all, each started with
        --nats nats://nats.jetmq.test:<port> and dns.nameservers = [dnsmasq]

Every name is resolved by the broker's hickory resolver through the real DNS server; the
brokers are given no IP address of any NATS node.

The Kafka leg (``TestKafkaLeg``, its own topology, see there) adds what compose/docker-compose.yml
runs behind the brokers: the 2-share mapping in every NATS node's config, tansu as Kafka, and
``jetmq-ingestor --mqtt-id 1`` and ``--mqtt-id 2`` given only ``nats://nats.jetmq.test:<port>``.
"""

from __future__ import annotations

import collections
import os
import random
import re
import shlex
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness
import kafka_harness as kh
from mqtt_client import V5, V311, Client, Target, Tracker, uid

pytestmark = [pytest.mark.cluster, pytest.mark.needs_nats, pytest.mark.slow]

HOSTS = harness.NODE_HOSTS
NATS_NAME = "nats.jetmq.test"
MQTT_NAME = "mqtt.jetmq.test"


class Topology:
    def __init__(self, workdir, mapping: str | None = None, dns_host: str = "127.0.0.1", dns_port: int | None = None):
        self.dns = harness.Dnsmasq(workdir, {NATS_NAME: HOSTS, MQTT_NAME: HOSTS}, host=dns_host, port=dns_port)
        self.nats_port = harness.common_free_port(HOSTS)
        self.mqtt_port = harness.common_free_port(HOSTS)
        self.nats = harness.NatsCluster(workdir, n=3, hosts=HOSTS, ports=[self.nats_port] * 3, mapping=mapping)
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


# ----------------------------------------------------------------------------- the Kafka leg
#
# compose/docker-compose.yml runs two ingestors (--mqtt-id 1 and 2) over the 2-share mapping
# (nats-config/compose/mappings.conf) into Kafka, and resolves the NATS names with the
# container's resolver (/etc/resolv.conf -> Docker's DNS). Here the same as processes:
#
#   dnsmasq on <127.0.53.x>:53 (a resolv.conf can only name a server on port 53)
#   3 NATS nodes, each config carrying `jetmq-ingestor mapping --ingestors 2`
#   3 brokers (dns.nameservers = [that dnsmasq])
#   tansu (Kafka API) with the compose stack's topics: mqtt (6 partitions), mqtt-dead-letter
#   jetmq-ingestor --mqtt-id 1 / 2, nats.urls = "nats://nats.jetmq.test:<port>" and nothing
#       else about NATS; each runs in its own mount namespace (unshare --mount) whose
#       /etc/resolv.conf names only the dnsmasq, so glibc's resolver asks the real DNS server
#       (the name is not in /etc/hosts), as in a container. JETMQ_NATS__STREAM_REPLICAS=3 as
#       in compose.
#
# Its own processes (class-scoped fixture): the module's `topo` is not started yet when the
# class runs first (file order) and the class's processes are gone before `topo` starts, so
# the two never run at once; run alone or in any order, the class never sees the NATS node
# that test_nats_node_loss_and_dns_change kills.

SHARES = 2
KAFKA_TOPICS = (("mqtt", 6), ("mqtt-dead-letter", 1))  # compose's kafka-topics service
TOPICS_PER_QOS = 4  # per broker address
PER_TOPIC = 16


def port53_address() -> str:
    """A loopback address whose port 53 is free over UDP and TCP."""
    for last in random.sample(range(2, 255), 60):
        addr = f"127.0.53.{last}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind((addr, 53))
                t.bind((addr, 53))
        except OSError:
            continue
        return addr
    raise harness.HarnessError("no 127.0.53.x address with port 53 free")


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        n = data[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:  # compression pointer ends the name
            return pos + 2
        pos += 1 + n


def resolve_a(name: str, server: tuple[str, int], timeout: float = 3.0) -> list[str]:
    """The A records of ``name``, asked of ``server`` over UDP (RFC 1035, one question)."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query, server)
        data, _ = s.recvfrom(4096)
    rid, flags, qdcount, ancount, _, _ = struct.unpack(">HHHHHH", data[:12])
    assert rid == qid and flags & 0x8000, "not an answer to our query"
    assert flags & 0xF == 0, f"DNS error rcode {flags & 0xF} for {name}"
    pos = 12
    for _ in range(qdcount):
        pos = _skip_name(data, pos) + 4
    addrs = []
    for _ in range(ancount):
        pos = _skip_name(data, pos)
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += rdlen
    return addrs


class ResolvingIngestor(kh.Ingestor):
    """jetmq-ingestor whose /etc/resolv.conf (own mount namespace) names only ``nameserver``.

    ``unshare`` (no --fork) and ``sh`` exec into the ingestor: the PID is the ingestor's."""

    def __init__(self, workdir: Path, mqtt_id: int, toml: str, nameserver: str, extra_env: dict[str, str]):
        super().__init__(workdir, mqtt_id, toml, extra_env=extra_env)
        self.resolv_conf = self.workdir / "resolv.conf"
        self.resolv_conf.write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:3\n")

    def argv(self) -> list[str]:
        inner = super().argv()
        script = f"mount --bind {shlex.quote(str(self.resolv_conf))} /etc/resolv.conf && exec {shlex.join(inner)}"
        return [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private", "sh", "-c", script]


class KafkaTopology(Topology):
    def __init__(self, workdir: Path):
        dns_host = port53_address()
        super().__init__(workdir, mapping=kh.mapping_block(SHARES), dns_host=dns_host, dns_port=53)
        self.tansu = kh.Tansu(workdir)
        toml = kh.ingestor_toml([f"nats://{NATS_NAME}:{self.nats_port}"], self.tansu.bootstrap)
        self.ingestors = [
            ResolvingIngestor(workdir, i, toml, dns_host, {"JETMQ_NATS__STREAM_REPLICAS": "3"})
            for i in range(1, SHARES + 1)
        ]

    def start(self):
        super().start()
        self.tansu.start()
        for topic, partitions in KAFKA_TOPICS:
            self.tansu.create_topic(topic, partitions)
        for ing in self.ingestors:
            ing.start(timeout=60)

    def stop(self):
        for ing in self.ingestors:
            ing.terminate(timeout=20)
        self.tansu.kill9()
        super().stop()

    def diagnostics(self) -> str:
        parts = [f"--- {ing.name} {ing.metrics()}\n{ing.log_tail(30)}" for ing in self.ingestors]
        parts.append(f"--- tansu\n{self.tansu.log_tail(20)}")
        return "\n".join(parts)


@pytest.fixture(scope="class")
def ktopo(tmp_path_factory):
    for problem in (harness.broker_bin_problem(), kh.ingestor_bin_problem()):
        if problem:
            pytest.fail(problem, pytrace=False)
    if os.geteuid() != 0:
        pytest.skip("needs root: a DNS server on port 53 and a private /etc/resolv.conf (unshare --mount) "
                    "for the ingestors")
    kh.tansu_bin()  # fails here, before anything starts, when tansu is not installed
    t = KafkaTopology(tmp_path_factory.mktemp("topology-kafka"))
    try:
        t.start()
        yield t
    finally:
        t.stop()


@dataclass
class KafkaRun:
    addresses: list[str]  # what the DNS server answered for mqtt.jetmq.test
    sent: dict[tuple[bytes, bytes], int]  # (topic, payload) -> QoS
    records: list[kh.Record]


@pytest.fixture(scope="class")
def kafka_run(ktopo) -> KafkaRun:
    """Publishes through every address of mqtt.jetmq.test (v5 and v3.1.1 clients, QoS 0/1/2,
    several topics each), then reads topic `mqtt` until every QoS 1/2 message is there."""
    addresses = resolve_a(MQTT_NAME, (ktopo.dns.host, ktopo.dns.port))
    prefix = uid("kafka")
    sent: dict[tuple[bytes, bytes], int] = {}
    for i, addr in enumerate(sorted(addresses)):
        c = Client(Target(addr, ktopo.mqtt_port), version=V5 if i % 2 == 0 else V311, max_inflight=100).connect()
        msgs = [(f"{prefix}/{addr}/q{qos}/{t}", f"{addr} q{qos} t{t} #{n}".encode(), qos)
                for n in range(PER_TOPIC) for qos in (0, 1, 2) for t in range(TOPICS_PER_QOS)]
        assert kh.publish_many(c, msgs, timeout=60) == len(msgs)
        c.disconnect()
        sent.update({(topic.encode(), payload): qos for topic, payload, qos in msgs})
    want = {k for k, qos in sent.items() if qos > 0}
    reader = kh.Reader(ktopo.tansu.bootstrap, ["mqtt"])
    try:
        records = reader.read_until(lambda rs: want <= {(r.key, r.value) for r in rs}, timeout=60, linger=2.0)
    finally:
        reader.close()
    return KafkaRun(addresses, sent, records)


class TestKafkaLeg:
    def test_ingestors_found_nats_through_dns(self, ktopo):
        assert NATS_NAME not in Path("/etc/hosts").read_text(), "only the DNS server knows the name"
        block = kh.mapping_block(SHARES).strip()
        conns: dict[str, str] = {}
        for node in ktopo.nats.nodes:
            has_mapping = block in node.config_path.read_text()
            assert has_mapping, f"{node.name}'s config lacks the {SHARES}-share mapping: {node.config_path}"
            for c in harness.http_json(f"{node.monitor_url}/connz?limit=1024")["connections"]:
                conns[c.get("name", "")] = node.host
        for ing in ktopo.ingestors:
            toml = ing.config_path.read_text()
            assert f'urls = "nats://{NATS_NAME}:{ktopo.nats_port}"' in toml and "127.0.0.1" not in toml.split("[kafka]")[0]
            assert ing.resolv_conf.read_text().splitlines()[0] == f"nameserver {ktopo.dns.host}"
            assert ing.metric("ready") == 1, ing.metrics()
            # Connected to one of the addresses the name resolves to.
            assert conns.get(f"jetmq-ingestor-{ing.mqtt_id}") in HOSTS, sorted(conns)

    def test_every_qos12_message_reaches_kafka_keyed_by_topic(self, ktopo, kafka_run):
        assert sorted(kafka_run.addresses) == sorted(HOSTS), "published through every address of the name"
        sent, records = kafka_run.sent, kafka_run.records
        seen = collections.Counter((r.key, r.value) for r in records)
        missing = [k for k, qos in sent.items() if qos > 0 and k not in seen]
        assert not missing, (f"{len(missing)} of {sum(q > 0 for q in sent.values())} QoS 1/2 messages not in "
                             f"Kafka, e.g. {missing[:3]}\n{ktopo.diagnostics()}")
        for r in records:
            assert (r.key, r.value) in sent, f"a record nobody published: {r}"
            assert r.header_str("mqtt.topic") == r.key.decode(), "key = MQTT topic"
            assert r.header_str("mqtt.qos") == str(sent[(r.key, r.value)])
        assert not [k for k, n in seen.items() if n > 1], "no duplicates in a run without failures"
        by_topic: dict[bytes, list[int]] = collections.defaultdict(list)
        for r in sorted(records, key=lambda r: (r.partition, r.offset)):
            by_topic[r.key].append(int(r.value.rsplit(b"#", 1)[1]))
        for topic, numbers in by_topic.items():
            assert numbers == sorted(numbers), f"order of {topic!r}"
        qos0 = [k for k, qos in sent.items() if qos == 0]
        print(f"Kafka: {len(records)} records; QoS 1/2 {len(sent) - len(qos0)} of {len(sent) - len(qos0)}, "
              f"QoS 0 {sum(k in seen for k in qos0)} of {len(qos0)}")

    def test_both_ingestors_took_a_share(self, ktopo, kafka_run):
        records = kafka_run.records
        per_share = collections.Counter(r.header_str("jetmq.share") for r in records)
        assert set(per_share) == {"0", "1"}, per_share
        shares_of: dict[bytes, set[str]] = collections.defaultdict(set)
        for r in records:
            shares_of[r.key].add(r.header_str("jetmq.share"))
        assert all(len(s) == 1 for s in shares_of.values()), "partition mapping: a topic stays on one share"
        harness.wait_until(lambda: sum(i.metric("acked_total") for i in ktopo.ingestors) >= len(records), 30,
                           what="every record acknowledged by the ingestors")
        # Ingestor --mqtt-id k wrote exactly the records of share k-1.
        produced = {str(ing.mqtt_id - 1): ing.metric("produced_total") for ing in ktopo.ingestors}
        assert produced == {s: float(n) for s, n in per_share.items()}, (produced, per_share)
        print(f"split over {SHARES} ingestors: {dict(sorted(per_share.items()))}")


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
    # Readiness may dip while JetStream elects new leaders for what the dead node led (the
    # brokers' heartbeat writes fail meanwhile): it must come back.
    harness.wait_until(topo.all_ready, 60, interval=0.5, what="all brokers ready again")
