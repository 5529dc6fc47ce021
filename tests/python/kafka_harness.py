"""Kafka side of the whole-system tests: tansu (a Kafka-API broker), jetmq-ingestor processes,
the NATS mapping from ``jetmq-ingestor mapping``, and a Kafka reader (confluent-kafka, which
bundles a librdkafka recent enough for tansu).

Used by test_kafka.py, test_otel.py and bench/kafka_bench.py. Like harness.py, every process
listens on loopback only, logs to a file, and is stopped by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import harness
from harness import CACHE_DIR, REPO_ROOT, HarnessError, ManagedProcess, free_port, port_open


# --------------------------------------------------------------------------- binaries


def ingestor_bin() -> Path:
    """``$JETMQ_INGESTOR_BIN``, else next to the broker binary under test, else target/release."""
    env = os.environ.get("JETMQ_INGESTOR_BIN")
    if env:
        return Path(env)
    sibling = harness.broker_bin().parent / "jetmq-ingestor"
    if sibling.exists():
        return sibling
    return REPO_ROOT / "target" / "release" / "jetmq-ingestor"


def ingestor_bin_problem() -> str | None:
    b = ingestor_bin()
    if not (b.exists() and os.access(b, os.X_OK)):
        return (f"jetmq-ingestor binary missing at {b}: build it with `cargo build -p jetmq-ingestor` "
                f"(or point JETMQ_INGESTOR_BIN at it)")
    return None


def tansu_bin() -> str:
    for c in (os.environ.get("JETMQ_TANSU"), str(CACHE_DIR / "tansu-0.6.0" / "bin" / "tansu"), shutil.which("tansu")):
        if c and os.path.isfile(c):
            return c
    raise HarnessError("tansu not found: run scripts/install-tansu (or set JETMQ_TANSU)")


def mapping_block(ingestors: int, mode: str = "partition", weights: str | None = None) -> str:
    """The NATS ``mappings`` block, exactly as ``jetmq-ingestor mapping`` prints it."""
    argv = [str(ingestor_bin()), "mapping", "--ingestors", str(ingestors), "--mode", mode]
    if weights:
        argv += ["--weights", weights]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed: {out.stderr}")
    return out.stdout


def reload_nats(node: harness.NatsServer) -> None:
    """Rewrite the node's config with its (changed) ``mapping`` and reload it (SIGHUP by PID)."""
    node.write_config()
    subprocess.run([harness.nats_server_bin(), "--signal", f"reload={node.pid}"], check=True, timeout=30)
    harness.wait_until(lambda: "Reloaded server configuration" in node.log_tail(200), 20,
                       what=f"{node.name} to reload its configuration")


# --------------------------------------------------------------------------- tansu


class Tansu(ManagedProcess):
    """tansu 0.6 with sqlite storage in its work dir (its memory engine loses records)."""

    kind = "tansu"

    def __init__(self, workdir: Path, port: int | None = None):
        super().__init__("tansu", Path(workdir) / "tansu")
        self.port = port or free_port()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [tansu_bin(), "broker", "--storage-engine", "sqlite://tansu.db",
                "--listener-url", url, "--advertised-listener-url", url]

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["RUST_LOG"] = os.environ.get("JETMQ_TANSU_LOG", "warn")
        return e

    def ready(self) -> bool:
        return port_open("127.0.0.1", self.port)

    def create_topic(self, name: str, partitions: int = 1) -> None:
        out = subprocess.run(
            [tansu_bin(), "topic", "create", "--broker", f"tcp://127.0.0.1:{self.port}",
             "--partitions", str(partitions), name],
            capture_output=True, text=True, cwd=self.workdir, timeout=60)
        if out.returncode != 0:
            raise HarnessError(f"tansu topic create {name}: {out.stdout}{out.stderr}")

    # tansu 0.6 on SIGTERM keeps accepting connections but fails every produce, which drives
    # librdkafka's idempotent producer into epoch bumps its sqlite store cannot follow after a
    # restart: an outage is a SIGKILL (see docs/ingestor.md).
    stop = ManagedProcess.kill9


# --------------------------------------------------------------------------- jetmq-ingestor


def ingestor_toml(nats_urls: Iterable[str], bootstrap: str, extra: str = "") -> str:
    """Test defaults (tests/fixtures/ingestor.toml, shared with the Rust harness): short timers,
    so redelivery and takeover happen within a test."""
    template = (REPO_ROOT / "tests" / "fixtures" / "ingestor.toml").read_text()
    return (template.replace("{nats_urls}", ",".join(nats_urls))
            .replace("{bootstrap}", bootstrap)
            .replace("{extra}", extra))


class Ingestor(ManagedProcess):
    """``jetmq-ingestor --mqtt-id N --config FILE --metrics-listen 127.0.0.1:PORT``."""

    kind = "ingestor"

    def __init__(self, workdir: Path, mqtt_id: int, toml: str, tag: str | None = None,
                 extra_env: dict[str, str] | None = None):
        tag = tag or str(mqtt_id)
        super().__init__(f"ingestor-{tag}", Path(workdir) / f"ingestor-{tag}")
        self.mqtt_id = mqtt_id
        self.metrics_port = free_port()
        self.config_path = self.workdir / "ingestor.toml"
        self.config_path.write_text(toml)
        self.extra_env = dict(extra_env or {})

    def argv(self) -> list[str]:
        problem = ingestor_bin_problem()
        if problem:
            raise HarnessError(problem)
        return [str(ingestor_bin()), "--mqtt-id", str(self.mqtt_id), "--config", str(self.config_path),
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}"]

    def env(self) -> dict[str, str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")}
        e.setdefault("RUST_LOG", "info,jetmq_ingestor=debug,async_nats=warn")
        e["NO_COLOR"] = "1"
        # The ingestor's NKEY of a NATS server the harness locked, unless the test set its own.
        toml = self.config_path.read_text()
        if not any(f"\n{k} =" in toml for k in harness.NATS_AUTH_KEYS) and \
                not harness.has_nats_auth(None, self.extra_env):
            urls = re.search(r'^urls\s*=\s*"([^"]*)"', toml, re.M)
            if urls:
                e.update(harness.nats_seed_env(urls.group(1).split(","), "ingestor"))
        e.update(self.extra_env)
        return e

    def ready(self) -> bool:
        # The metrics endpoint is up before NATS is reached; lag >= 0 means the consumer exists.
        return self.metrics().get("lag", -1) >= 0

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return out
        for line in text.splitlines():
            if line.startswith("jetmq_ingestor_"):
                name, _, value = line.partition(" ")
                name = name[len("jetmq_ingestor_"):].split("{")[0]
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)


# --------------------------------------------------------------------------- reading Kafka


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    received: float = 0.0  # time.time() when this reader got it

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_str(self, name: str) -> str | None:
        v = self.header(name)
        return None if v is None else v.decode()

    def headers_named(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    @property
    def seq(self) -> int:
        v = self.header_str("jetmq.seq")
        if v is None:
            raise AssertionError(f"record without jetmq.seq: {self}")
        return int(v)


@dataclass
class Reader:
    """Reads topics from the beginning and keeps everything it saw."""

    bootstrap: str
    topics: list[str]
    records: list[Record] = field(default_factory=list)
    from_end: bool = False  # start at the end of each partition instead of the beginning

    def __post_init__(self):
        from confluent_kafka import Consumer, TopicPartition

        self._consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"jetmq-test-{os.getpid()}-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            # Fetch as soon as anything is there: the benchmark measures latency with this.
            "fetch.wait.max.ms": int(os.environ.get("JETMQ_TEST_FETCH_WAIT_MS", "10")),
        })
        assignment = []
        for topic in self.topics:
            md = self._consumer.list_topics(topic, timeout=20)
            t = md.topics.get(topic)
            if t is None or t.error is not None or not t.partitions:
                raise HarnessError(f"Kafka topic {topic} not found: {t.error if t else 'missing'}")
            # Offsets -2 and -1: the beginning and the end of the partition.
            assignment += [TopicPartition(topic, p, -1 if self.from_end else -2) for p in t.partitions]
        self._consumer.assign(assignment)

    def poll(self, timeout: float = 0.2) -> int:
        """Reads what is there (waits at most ``timeout`` for the first record); returns the count."""
        got = 0
        for m in self._consumer.consume(num_messages=5000, timeout=timeout):
            if m.error():
                continue
            now = time.time()
            self.records.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value() or b"",
                                       list(m.headers() or []), m.timestamp()[1], now))
            got += 1
        return got

    def read_until(self, pred: Callable[[list[Record]], bool], timeout: float, linger: float = 1.0) -> list[Record]:
        """Polls until ``pred(records)`` holds (or ``timeout``), then ``linger`` seconds more for
        late duplicates. Returns all records seen so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not pred(self.records):
            self.poll()
        end = time.monotonic() + linger
        while time.monotonic() < end:
            self.poll()
        return self.records

    def read_distinct(self, n: int, timeout: float, linger: float = 1.0) -> list[Record]:
        return self.read_until(lambda rs: distinct(rs) >= n, timeout, linger)

    def close(self) -> None:
        self._consumer.close()


def stored_count(bootstrap: str, topic: str) -> int:
    """Records stored in `topic`: the sum of its partitions' high watermarks. (tansu 0.6 stops
    answering fetches from the beginning of partitions with tens of thousands of records, so
    large runs count instead of reading everything back.)"""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"jetmq-count-{os.getpid()}"})
    try:
        md = c.list_topics(topic, timeout=20)
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=20)[1]
                   for p in md.topics[topic].partitions)
    finally:
        c.close()


def distinct(records: list[Record]) -> int:
    """MQTT messages among the records: one stream message (jetmq.seq) holds several when the
    broker bundled them, told apart by jetmq.part."""
    return len({(r.seq, r.header_str("jetmq.part")) for r in records})


def duplicates(records: list[Record]) -> int:
    return len(records) - distinct(records)


# --------------------------------------------------------------------------- whole pipeline


class Pipeline:
    """NATS (single node or 3-node cluster) + brokers + tansu + ingestors, torn down by PID."""

    def __init__(self, workdir, shares: int, ingestors: int | None = None, cluster: bool = False,
                 brokers: int = 1, ingestor_extra: str = "", broker_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.shares = shares
        self.extra = ingestor_extra
        self.ingestors: dict[str, Ingestor] = {}
        self.cluster: harness.NatsCluster | None = None
        self.nats_nodes: list[harness.NatsServer] = []
        self.brokers: list[harness.BrokerNode] = []
        self.tansu: Tansu | None = None
        try:
            mapping = mapping_block(shares)
            if cluster:
                self.cluster = harness.NatsCluster(workdir, n=3, mapping=mapping)
                self.cluster.start()
                self.nats_nodes = self.cluster.nodes
                self.brokers = harness.start_broker_cluster(workdir, self.cluster, hosts=harness.NODE_HOSTS[:brokers],
                                                            extra_env=broker_env)
            else:
                node = harness.NatsServer(workdir, mapping=mapping)
                self.nats_nodes = [node]
                node.start()
                self.brokers = [harness.BrokerNode(workdir, [node.url], node_id="b1", extra_env=broker_env).start()]
            self.nats_urls = [n.url for n in self.nats_nodes]
            self.tansu = Tansu(workdir)
            self.tansu.start()
            for t in ("mqtt", "temps", "mqtt-dead-letter"):
                self.tansu.create_topic(t, 3)
            for i in range(1, (ingestors if ingestors is not None else shares) + 1):
                self.start_ingestor(i)
        except BaseException:
            self.close()
            raise

    def targets(self) -> list:
        from mqtt_client import Target

        return [Target(b.host, b.port, "jetmq", {}, b) for b in self.brokers]

    def start_ingestor(self, mqtt_id: int, tag: str | None = None) -> Ingestor:
        tag = tag or str(mqtt_id)
        ing = Ingestor(self.workdir, mqtt_id, ingestor_toml(self.nats_urls, self.tansu.bootstrap, self.extra),
                       tag=tag)
        self.ingestors[tag] = ing
        ing.start(timeout=60)
        return ing

    def reader(self, *topics: str) -> "Reader":
        return Reader(self.tansu.bootstrap, list(topics or ["mqtt"]))

    def set_shares(self, shares: int) -> None:
        """The documented resize: new mapping on every server, reloaded one after the other."""
        block = mapping_block(shares)
        for node in self.nats_nodes:
            node.mapping = block
            reload_nats(node)
        self.shares = shares

    def diagnostics(self) -> str:
        parts = []
        for tag, ing in self.ingestors.items():
            parts.append(f"--- ingestor {tag} {ing.metrics()}\n{ing.log_tail(30)}")
        parts.append(f"--- tansu\n{self.tansu.log_tail(20)}")
        return "\n".join(parts)

    def close(self) -> None:
        for ing in self.ingestors.values():
            ing.terminate(timeout=20)
        if self.tansu:
            self.tansu.kill9()
        for b in self.brokers:
            b.terminate()
        if self.cluster:
            self.cluster.stop()
        else:
            for n in self.nats_nodes:
                n.terminate()


def publish_many(client, messages: Iterable[tuple[str, bytes, int]], timeout: float = 120.0,
                 props: dict | None = None) -> int:
    """Publishes (topic, payload, qos) tuples without waiting in between, then waits until
    every QoS 1/2 message is acknowledged. Returns how many were acknowledged or sent (QoS 0)."""
    pending = []
    sent = 0
    for topic, payload, qos in messages:
        info = client.publish(topic, payload, qos=qos, props=props, wait=False)
        if qos == 0:
            sent += 1
        else:
            pending.append(info.mid)
    deadline = time.monotonic() + timeout
    acked = 0
    with client._cv:
        for mid in pending:
            left = deadline - time.monotonic()
            if not client._cv.wait_for(lambda: mid in client._pubacks or not client.connected, max(left, 0)):
                raise AssertionError(f"{client.client_id}: {len(pending) - acked} publishes not acknowledged in {timeout}s")
            if mid not in client._pubacks:
                raise AssertionError(f"{client.client_id}: disconnected with {len(pending) - acked} unacknowledged")
            rc = client._pubacks.pop(mid)
            assert rc < 0x80, f"publish refused with reason {rc:#x}"
            acked += 1
    return sent + acked
