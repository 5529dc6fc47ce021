"""compose/docker-compose.yml run for real: every service in its own container, with its own
address and network stack, started by the Compose tool and broken on purpose.

The images come from scripts/compose-images (built here, without a registry) through
tests/compose/local-images.yml, which changes where images come from and nothing else, so
what runs is the shipped wiring. Grafana is left out: no registry here, and no package of it
that could be built into an image.

Devices reach the brokers the way compose/README.md tells users to: through the stack's DNS
name mqtt.jetmq.local (three A records, asked of the stack's DNS server) or a container's
address. Every load loop is bounded in count (JETMQ_TEST_COMPOSE_MESSAGES per publisher) and
time. Each test prints what it measured; compose/README.md and docs/operations.md quote it.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

import harness
from mqtt_client import V5, V311, Client, Target, Tracker, uid
from test_cluster_failover import Collector, publish_sequence, reconnect
from test_topology import resolve_a

ROOT = harness.REPO_ROOT
STACK_FILE = ROOT / "compose" / "docker-compose.yml"
OVERRIDE_FILE = ROOT / "tests" / "compose" / "local-images.yml"
READ_KAFKA = ROOT / "tests" / "compose" / "read_kafka.py"

# The fixed addresses of compose/docker-compose.yml's network.
DNS_ADDRESS = "172.30.53.53"
BROKERS = {"broker-1": "172.30.53.21", "broker-2": "172.30.53.22", "broker-3": "172.30.53.23"}
NATS_NODES = {"nats-1": "172.30.53.11", "nats-2": "172.30.53.12", "nats-3": "172.30.53.13"}
INGESTORS = {"ingestor-1": "172.30.53.31", "ingestor-2": "172.30.53.32"}
DNS_NAME = "mqtt.jetmq.local"
# Everything `up` starts in the tests: all but grafana (no image) and the mqtt-client tool.
# The one-shot services (mqtt-auth, nats-auth, kafka-topics) start as their dependencies.
SERVICES = ["dns", *NATS_NODES, *BROKERS, *INGESTORS, "kafka", "prometheus"]
LONG_RUNNING = SERVICES

N_MESSAGES = int(os.environ.get("JETMQ_TEST_COMPOSE_MESSAGES", "400"))
HEALTHY_WITHIN_S = 240
RESUME_WITHIN_S = 10.0

pytestmark = [
    pytest.mark.jetmq_only("runs jetmq's own compose stack"),
    pytest.mark.slow,
    pytest.mark.timeout(900),
]


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _docker_answers():
    pytest.skip("no Docker engine answers: the compose stack tests need one (see compose/README.md)",
                allow_module_level=True)


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where users have it, else v1 (`docker-compose`)."""
    if os.environ.get("JETMQ_COMPOSE_BIN"):
        return [os.environ["JETMQ_COMPOSE_BIN"]]
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if v2.returncode == 0:
        return ["docker", "compose"]
    v1 = shutil.which("docker-compose")
    if not v1:
        pytest.fail("neither `docker compose` nor docker-compose: run scripts/install-deps", pytrace=False)
    return [v1]


def run(argv, timeout: float = 120, check: bool = True, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


class Stack:
    """One compose project of the stack: its own name, free host ports on 127.0.0.1, and its
    containers, networks and volumes removed at the end (by project, nobody else's)."""

    def __init__(self, workdir: Path):
        self.project = f"jetmq-t{os.getpid()}"
        self.username = "device"
        self.password = secrets.token_urlsafe(16)
        self.env = dict(os.environ)
        self.env.update({
            "MQTT_USERNAME": self.username,
            "MQTT_PASSWORD": self.password,
            "GRAFANA_ADMIN_PASSWORD": secrets.token_urlsafe(16),
            # The test binds every host port on loopback, on ports nobody holds.
            "MQTT_HOST_IP": "127.0.0.1",
        })
        for name in ("MQTT_PORT_1", "MQTT_PORT_2", "MQTT_PORT_3", "BROKER_HTTP_PORT_1", "BROKER_HTTP_PORT_2",
                     "BROKER_HTTP_PORT_3", "NATS_MONITOR_PORT", "KAFKA_HOST_PORT", "PROMETHEUS_PORT",
                     "GRAFANA_PORT", "DNS_PORT"):
            self.env[name] = str(harness.free_port())
        self.network = f"{self.project}_jetmq"
        self.workdir = workdir
        self.base = [*compose_command(), "-p", self.project, "-f", str(STACK_FILE), "-f", str(OVERRIDE_FILE)]

    def compose(self, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.base, *args], timeout=timeout, check=check, env=self.env)

    def up(self, *services: str) -> None:
        self.compose("up", "-d", "--no-build", *(services or SERVICES), timeout=600)

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container of {service}"
        return cid

    def inspect(self, service: str, fmt: str) -> str:
        return run(["docker", "inspect", "-f", fmt, self.container(service)]).stdout.strip()

    def health(self, service: str) -> str:
        return self.inspect(service, "{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}")

    def wait_healthy(self, services=LONG_RUNNING, timeout: float = HEALTHY_WITHIN_S) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            states = {s: self.health(s) for s in services}
            # A service without a healthcheck (dns) counts once it runs.
            bad = {s: v for s, v in states.items() if v not in ("running/healthy", "running/")}
            if not bad:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy within {timeout}s: {bad}\n" + self.logs(*bad))
            time.sleep(1)

    def logs(self, *services: str, tail: int = 40) -> str:
        out = self.compose("logs", "--no-color", f"--tail={tail}", *services, check=False)
        return out.stdout[-6000:] + out.stderr[-1000:]

    def kill(self, service: str) -> None:
        """SIGKILL through the engine (`docker kill`): the restart policy leaves it down."""
        run(["docker", "kill", self.container(service)])

    def crash(self, service: str) -> None:
        """SIGKILL of the container's process from outside, as the kernel's OOM killer would:
        the engine sees it exit on its own, so the restart policy applies."""
        pid = int(self.inspect(service, "{{.State.Pid}}"))
        assert pid > 0, f"{service} is not running"
        os.kill(pid, signal.SIGKILL)

    def disconnect(self, service: str) -> None:
        run(["docker", "network", "disconnect", self.network, self.container(service)])

    def reconnect_network(self, service: str, address: str) -> None:
        # The same address and the service's name, as compose gave them.
        run(["docker", "network", "connect", "--ip", address, "--alias", service, self.network, self.container(service)])

    def down(self, volumes: bool) -> None:
        self.compose("down", *(["-v"] if volumes else []), "--remove-orphans", timeout=300, check=False)

    # ------------------------------------------------------------------ reading Kafka
    def _tools(self, *argv: str, timeout: float) -> str:
        out = run(["docker", "run", "--rm", "--network", self.network, "-v", f"{READ_KAFKA}:/probe/read_kafka.py:ro",
                   "jetmq-test/tools:local", "python3", "/probe/read_kafka.py", *argv], timeout=timeout)
        return out.stdout

    def kafka_ends(self, topic: str = "mqtt") -> dict:
        return json.loads(self._tools("ends", "kafka:9092", topic, timeout=90).strip().splitlines()[-1])

    def kafka_read(self, start: dict, want: int, timeout: float, topic: str = "mqtt") -> list[dict]:
        out = self._tools("read", "kafka:9092", topic, json.dumps(start), str(want), str(timeout), timeout=timeout + 60)
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for r in records:
            r["value"] = base64.b64decode(r["value"])
        return records

    def ingestor_metric(self, service: str, name: str) -> float:
        _, body = harness.http_get(f"http://{INGESTORS[service]}:9464/metrics", timeout=5)
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(f"jetmq_ingestor_{name}"):
                total += float(line.rsplit(" ", 1)[1])
        return total


class ByDnsName:
    """The brokers as a device finds them: the A records of a name (mqtt.jetmq.local), asked
    of a DNS server (the stack's) anew on every pass, in random order."""

    def __init__(self, name: str = DNS_NAME, server: str = DNS_ADDRESS, port: int = 1883):
        self.name, self.server, self.port = name, server, port

    def __iter__(self):
        try:
            addresses = resolve_a(self.name, (self.server, 53))
        except OSError:
            addresses = []
        random.shuffle(addresses)
        return iter([Target(a, self.port) for a in addresses])


class Devices:
    """Persistent-session devices under load, all first connected to one broker address:
    QoS 1 over MQTT 3.1.1 and QoS 2 over MQTT 5, a publisher and a subscriber of each. A
    watcher thread brings every dropped client back through the DNS name and records when
    and with which session state it came back."""

    def __init__(self, tracker: Tracker, target: Target, client_kw: dict, names=None, n: int = N_MESSAGES,
                 topic_root: str = "dev"):
        """``client_kw``: login (and TLS) of every client; ``names``: where a dropped client
        looks for a broker (a ByDnsName)."""
        self.n = n
        self.base = f"{topic_root}/{uid('dev')}"
        self.names = names or ByDnsName()
        auth = client_kw
        self.subs = {
            1: tracker(target, client_id=uid("s1"), version=V311, clean=False, **auth).connect(),
            2: tracker(target, client_id=uid("s2"), version=V5, clean=False, session_expiry=600, **auth).connect(),
        }
        self.pubs = {
            1: tracker(target, client_id=uid("p1"), version=V311, clean=False, max_inflight=8, **auth).connect(),
            2: tracker(target, client_id=uid("p2"), version=V5, clean=False, session_expiry=600, max_inflight=8,
                       **auth).connect(),
        }
        for qos, s in self.subs.items():
            assert s.subscribe(self.topic(qos), qos=qos) == [qos]
        self.collectors = {qos: Collector(s, self.topic(qos)) for qos, s in self.subs.items()}
        self.resumes: dict[str, list[tuple[float, bool, str]]] = collections.defaultdict(list)
        self.pace_s = 0.0
        self.progress = {1: 0, 2: 0}
        self.t0 = time.monotonic()
        self.results: dict[int, dict] = {}
        self._stop = threading.Event()
        # One watcher per client: a reconnect can wait out a dead address or a session claim,
        # and one device's wait must not delay the others.
        self._watchers = [threading.Thread(target=self._keep_connected, args=(c,), daemon=True) for c in self.clients]
        for w in self._watchers:
            w.start()
        self._threads: list[threading.Thread] = []

    def topic(self, qos: int) -> str:
        return f"{self.base}/q{qos}"

    @property
    def clients(self) -> list[Client]:
        return [*self.subs.values(), *self.pubs.values()]

    def _keep_connected(self, client: Client) -> None:
        while not self._stop.is_set():
            if not client.connected:
                try:
                    reconnect(client, self.names, timeout=60)
                    self.resumes[client.client_id].append((time.monotonic(), client.session_present, client.host))
                except AssertionError:
                    pass
            time.sleep(0.05)

    def _await_connection(self, client: Client) -> None:
        harness.wait_until(lambda: client.connected, timeout=90, what=f"{client.client_id} back")

    def start(self) -> None:
        for qos, pub in self.pubs.items():
            def publish(qos=qos, pub=pub):
                def progress(i):
                    self.progress[qos] = i
                    if self.pace_s:
                        time.sleep(self.pace_s)
                try:
                    acked, sent = publish_sequence(pub, self.topic(qos), self.n, qos, progress, None, 400,
                                                   await_connection=self._await_connection)
                    self.results[qos] = {"acked": acked, "sent": sent}
                except BaseException as e:  # noqa: BLE001
                    self.results[qos] = {"error": e}
            t = threading.Thread(target=publish, daemon=True)
            t.start()
            self._threads.append(t)

    def wait_progress(self, count: int, timeout: float = 120) -> None:
        harness.wait_until(lambda: min(self.progress.values()) >= count, timeout=timeout,
                           what=f"both publishers past message {count} (at {self.progress})")

    def finish(self, delivery_timeout: float = 120) -> dict:
        """Waits for the publishers and the deliveries; asserts that every acknowledged message
        arrived and no QoS 2 message twice. Returns what was counted."""
        for t in self._threads:
            t.join(450)
            assert not t.is_alive(), "a publisher did not finish"
        for qos, r in self.results.items():
            assert "error" not in r, f"QoS {qos} publisher failed: {r.get('error')!r}"
            assert r["sent"] == self.n, f"QoS {qos}: only {r['sent']} of {self.n} published"
        deadline = time.monotonic() + delivery_timeout
        while time.monotonic() < deadline and any(
                set(self.results[q]["acked"]) - set(c.counts) for q, c in self.collectors.items()):
            time.sleep(0.5)
        time.sleep(1.0)  # late duplicates
        self._stop.set()
        for w in self._watchers:
            w.join(70)
        counts = {}
        for qos, c in self.collectors.items():
            c.stop()
            acked = self.results[qos]["acked"]
            lost = sorted(acked - set(c.counts))
            assert not lost, f"QoS {qos}: {len(lost)} acknowledged messages lost, e.g. {lost[:20]}; {self.story()}"
            dups = c.duplicates()
            if qos == 2:
                assert not dups, f"QoS 2: {len(dups)} delivered twice, e.g. {dups[:20]}; {self.story()}"
            counts[qos] = {"acked": len(acked), "delivered": len(set(c.counts)), "duplicates": len(dups)}
            if dups:
                counts[qos]["duplicated"] = f"{dups[0]}..{dups[-1]}"
        return counts

    def story(self) -> str:
        """Every client's reconnects (seconds since the devices started, session present,
        address) and where in its sequence each subscriber saw a repeat: for failure messages."""
        lines = []
        for c in self.clients:
            back = [(round(t - self.t0, 2), present, host) for t, present, host in self.resumes[c.client_id]]
            lines.append(f"{c.client_id} reconnects {back}")
        for qos, col in self.collectors.items():
            repeats = [i for i, n in enumerate(col.order) if col.order.index(n) != i]
            first = col.received[repeats[0]] if repeats else None
            when = f", the first {round(first.t - self.t0, 2)}s after the start, DUP {first.dup}" if first else ""
            lines.append(f"QoS {qos} subscriber: {len(col.order)} received, repeats at positions {repeats[:10]}{when}")
        return "; ".join(lines)

    def all_resumed_elsewhere(self, t_event: float, lost: str, what: str) -> dict[str, float]:
        """Seconds from ``t_event`` to each client's first reconnect after it; asserts that every
        client came back, with its session, on another address than ``lost``."""
        out = {}
        for c in self.clients:
            r = self.resumed_after(t_event, c)
            assert r is not None, f"{c.client_id} never came back after {what}"
            at, present, host = r
            assert present and host != lost, f"{c.client_id}: session present {present} on {host} after {what}"
            out[c.client_id] = round(at - t_event, 2)
        return out

    def resumed_after(self, t_event: float, client: Client) -> tuple[float, bool, str] | None:
        later = [r for r in self.resumes[client.client_id] if r[0] >= t_event]
        return later[0] if later else None


def auth_kwargs(stack: Stack) -> dict:
    return {"username": stack.username, "password": stack.password}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "compose-images")], capture_output=True, text=True,
                         timeout=3600)
    print(out.stdout[-3000:])
    assert out.returncode == 0, f"scripts/compose-images failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("compose"))
    t0 = time.monotonic()
    try:
        s.up()
        healthy = s.wait_healthy()
        s.startup_s = time.monotonic() - t0
        print(f"compose stack: `up` to every service healthy in {s.startup_s:.1f}s "
              f"({healthy:.1f}s of it after `up` returned)")
        yield s
    finally:
        s.down(volumes=True)


@pytest.fixture
def devices_tracker(stack):
    tracker = Tracker(Target(BROKERS["broker-1"], 1883))
    yield tracker
    tracker.close_all()


def restore(stack: Stack) -> None:
    """Brings every service back for the next test (what a test killed or cut off)."""
    stack.up()
    stack.wait_healthy()


# --------------------------------------------------------------------------- the override


def wiring(service: dict) -> dict:
    """A service without where its image comes from. Compose v1 reorders the volumes of a
    service that two files name, and prints a network without options as null or as {}:
    neither means anything, so they compare equal."""
    out = {}
    for key, value in service.items():
        if key in ("image", "build"):
            continue
        if key in ("volumes", "ports", "dns", "env_file", "profiles") and isinstance(value, list):
            value = sorted(value, key=lambda v: json.dumps(v, sort_keys=True))
        if key == "networks" and isinstance(value, dict):
            value = {net: opts or {} for net, opts in value.items()}  # `jetmq:` and `jetmq: {}`
        out[key] = value
    return out


def test_override_changes_only_where_images_come_from():
    env = dict(os.environ, MQTT_USERNAME="u", MQTT_PASSWORD="p", GRAFANA_ADMIN_PASSWORD="g")
    compose = compose_command()
    shipped = yaml.safe_load(run([*compose, "-f", STACK_FILE, "config"], env=env).stdout)
    tested = yaml.safe_load(run([*compose, "-f", STACK_FILE, "-f", OVERRIDE_FILE, "config"], env=env).stdout)
    override = yaml.safe_load(OVERRIDE_FILE.read_text())
    assert set(override) == {"services"}, "the override may only name services"
    for name, svc in override["services"].items():
        assert set(svc) <= {"image", "build"}, f"{name}: the override changes {set(svc) - {'image', 'build'}}"
    assert set(tested["services"]) == set(shipped["services"])
    for name in shipped["services"]:
        a, b = wiring(shipped["services"][name]), wiring(tested["services"][name])
        assert a == b, f"{name}: the override changed more than its image"
    assert {k: v for k, v in shipped.items() if k != "services"} == {k: v for k, v in tested.items() if k != "services"}
    # Everything the tests start has a locally built image; grafana alone keeps its official one.
    not_local = sorted(n for n, s in tested["services"].items() if not str(s.get("image", "")).startswith("jetmq-test/"))
    assert not_local == ["grafana"], not_local


# --------------------------------------------------------------------------- 1. up


def test_up_every_service_healthy_and_messages_reach_every_broker_and_kafka(stack, devices_tracker):
    cl = devices_tracker
    auth = auth_kwargs(stack)
    # The DNS name lists the three brokers, from inside the network and on the host's port.
    inside = sorted(resolve_a(DNS_NAME, (DNS_ADDRESS, 53)))
    on_host = sorted(resolve_a(DNS_NAME, ("127.0.0.1", int(stack.env["DNS_PORT"]))))
    assert inside == on_host == sorted(BROKERS.values()), (inside, on_host)

    # Publish on broker-1 by its container address; the other two brokers' subscribers get it.
    topic = uid("up")
    subs = [cl.connect(Target(BROKERS[b], 1883), version=V5, **auth) for b in ("broker-2", "broker-3")]
    for s in subs:
        assert s.subscribe(f"{topic}/#", qos=1) == [1]
    pub = cl.connect(Target(BROKERS["broker-1"], 1883), version=V311, **auth)
    pub.publish(f"{topic}/by-address", b"hello", qos=1)
    for s in subs:
        m = s.get(15)
        assert (m.topic, m.payload) == (f"{topic}/by-address", b"hello")

    # Through the DNS name: one publisher per A record, each heard on every broker.
    listeners = [cl.connect(Target(a, 1883), version=V311, **auth) for a in inside]
    for s in listeners:
        assert s.subscribe(f"{topic}/dns/#", qos=1) == [1]
    for a in inside:
        cl.connect(Target(a, 1883), version=V5, **auth).publish(f"{topic}/dns/{a}", a.encode(), qos=1)
    for s in listeners:
        got = sorted(m.payload.decode() for m in s.expect(3, 15))
        assert got == inside, got

    # The MQTT host ports (loopback in the test) reach the brokers too.
    for i in (1, 2, 3):
        cl.connect(Target("127.0.0.1", int(stack.env[f"MQTT_PORT_{i}"])), version=V5, **auth)

    # Kafka: topics of both shares, keyed by MQTT topic, written by --mqtt-id 1 and 2.
    ends = stack.kafka_ends()
    n = 40
    sent = {f"{topic}/kafka/{i}": f"m{i}".encode() for i in range(n)}
    for t, payload in sent.items():
        pub.publish(t, payload, qos=1)
    records = [r for r in stack.kafka_read(ends, n, 120) if r["key"] in sent]
    got = {r["key"]: r["value"] for r in records}
    assert got == sent, f"{len(got)} of {n} messages in Kafka keyed by their MQTT topic"
    shares = collections.Counter(r["headers"].get("jetmq.share") for r in records)
    assert set(shares) == {"0", "1"}, f"records by share (share 0: --mqtt-id 1, share 1: --mqtt-id 2): {dict(shares)}"
    for ingestor in INGESTORS:
        assert stack.ingestor_metric(ingestor, "acked_total") > 0, f"{ingestor} acknowledged nothing"
    print(f"up: startup {stack.startup_s:.1f}s; {n} messages in Kafka, by share {dict(shares)}")


# --------------------------------------------------------------------------- 2. broker killed


def test_broker_node_killed_under_load_loses_nothing_and_sessions_resume(stack, devices_tracker):
    cl = devices_tracker
    auth = auth_kwargs(stack)
    victim = "broker-1"
    devices = Devices(cl, Target(BROKERS[victim], 1883), auth_kwargs(stack))
    # Wills of the dead node's clients: published by a survivor.
    will_topic = uid("will")
    watcher = cl.connect(Target(BROKERS["broker-2"], 1883), version=V5, **auth)
    assert watcher.subscribe(f"{will_topic}/#", qos=1) == [1]
    cl(Target(BROKERS[victim], 1883), version=V311, will={"topic": f"{will_topic}/v311", "payload": b"gone", "qos": 1},
       **auth).connect()
    cl(Target(BROKERS[victim], 1883), version=V5, will={"topic": f"{will_topic}/v5", "payload": b"gone", "qos": 1},
       **auth).connect()
    try:
        devices.start()
        devices.wait_progress(N_MESSAGES // 3)
        t_kill = time.monotonic()
        stack.kill(victim)
        counts = devices.finish()
        resumes = devices.all_resumed_elsewhere(t_kill, BROKERS[victim], f"{victim} was killed")
        wills = {}
        deadline = time.monotonic() + 30
        while len(wills) < 2 and time.monotonic() < deadline:
            m = watcher.get(max(0.1, deadline - time.monotonic()))
            wills[m.topic] = round(time.monotonic() - t_kill, 2)
        assert set(wills) == {f"{will_topic}/v311", f"{will_topic}/v5"}, wills
        reconnects = {c.client_id: len(devices.resumes[c.client_id]) for c in devices.clients}
        print(f"broker killed: counts {counts}; sessions resumed after (s) {sorted(resumes.values())}; "
              f"reconnects {reconnects}; "
              f"wills after (s) {sorted(wills.values())}")
        if os.environ.get("JETMQ_TEST_COMPOSE_STORY"):  # every client's reconnects, for a closer look
            print(devices.story(), f"(the kill {round(t_kill - devices.t0, 2)}s after the start)")
        slow = {k: v for k, v in resumes.items() if v > RESUME_WITHIN_S}
        assert not slow, f"sessions resumed later than {RESUME_WITHIN_S}s: {slow}"
    finally:
        restore(stack)


# --------------------------------------------------------------------------- 3. NATS node killed, cut off


def nats_healthz(node: str) -> bool:
    try:
        status, _ = harness.http_get(f"http://{NATS_NODES[node]}:8222/healthz", timeout=3)
        return status == 200
    except OSError:
        return False


@pytest.mark.parametrize("failure", ["killed", "cut-off"])
def test_nats_node_lost_under_load_loses_nothing(stack, devices_tracker, failure):
    cl = devices_tracker
    victim = "nats-1"
    devices = Devices(cl, Target(BROKERS["broker-1"], 1883), auth_kwargs(stack))
    try:
        devices.pace_s = 0.01
        devices.start()
        devices.wait_progress(N_MESSAGES // 4)
        t_fail = time.monotonic()
        before = dict(devices.progress)
        if failure == "killed":
            stack.kill(victim)
        else:
            stack.disconnect(victim)
        # Delivery resumes: both publishers get further while the node is gone.
        harness.wait_until(lambda: all(devices.progress[q] > before[q] + 20 for q in before), timeout=60,
                           what=f"publishing going on after {victim} was {failure}")
        resumed_s = time.monotonic() - t_fail
        time.sleep(5)
        t_back = time.monotonic()
        if failure == "killed":
            stack.up(victim)
        else:
            stack.reconnect_network(victim, NATS_NODES[victim])
        harness.wait_until(lambda: nats_healthz(victim), timeout=120, what=f"{victim} current again")
        caught_up_s = time.monotonic() - t_back
        devices.pace_s = 0.0
        counts = devices.finish()
        print(f"NATS node {failure}: publishing went on {resumed_s:.1f}s after; back and current "
              f"(/healthz) {caught_up_s:.1f}s after its return; counts {counts}")
    finally:
        if failure == "cut-off" and victim not in run(["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                                       stack.container(victim)]).stdout:
            stack.reconnect_network(victim, NATS_NODES[victim])
        restore(stack)


# --------------------------------------------------------------------------- 4. stop, rolling restart


def test_graceful_stop_sends_clients_away_and_rolling_restart_loses_nothing(stack, devices_tracker):
    cl = devices_tracker
    auth = auth_kwargs(stack)
    victim = "broker-2"
    devices = Devices(cl, Target(BROKERS[victim], 1883), auth_kwargs(stack))
    observer = cl.connect(Target(BROKERS[victim], 1883), version=V5, **auth)
    try:
        devices.pace_s = 0.02
        devices.start()
        devices.wait_progress(20)
        t_stop = time.monotonic()
        stack.compose("stop", victim, timeout=120)
        stop_s = time.monotonic() - t_stop
        d = observer.wait_disconnect(5)
        assert d.reason in (0x8B, 0x9C), f"a stopping broker sends MQTT 5 clients away with 0x8B or 0x9C, got {d}"
        # The drain sends clients away over its duration; each comes back on another broker.
        for c in devices.clients:
            harness.wait_until(lambda c=c: devices.resumed_after(t_stop, c) is not None, timeout=30,
                               what=f"{c.client_id} back after the stop")
        moved_s = max(devices.all_resumed_elsewhere(t_stop, BROKERS[victim], f"{victim} stopped").values())
        stack.up(victim)
        stack.wait_healthy([victim])
        # Rolling restart under the same load: one broker after another, each healthy first.
        t_roll = time.monotonic()
        for broker in BROKERS:
            stack.compose("restart", broker, timeout=120)
            stack.wait_healthy([broker], timeout=120)
        roll_s = time.monotonic() - t_roll
        devices.pace_s = 0.0
        counts = devices.finish()
        print(f"graceful stop of {victim}: {stop_s:.1f}s, clients sent away with {d.reason:#x}, all back "
              f"elsewhere {moved_s:.1f}s after the stop began; "
              f"rolling restart of 3 brokers {roll_s:.1f}s; counts {counts}")
    finally:
        restore(stack)


# --------------------------------------------------------------------------- 5. ingestor killed


def test_ingestor_killed_under_load_its_share_continues_nothing_lost_in_kafka(stack, devices_tracker):
    cl = devices_tracker
    auth = auth_kwargs(stack)
    ends = stack.kafka_ends()
    base = uid("ing")
    n_topics, per_topic = 20, 10
    pub = cl.connect(Target(BROKERS["broker-3"], 1883), version=V5, **auth)
    sent = {}
    t_crash = None
    for i in range(per_topic):
        for t in range(n_topics):
            topic, payload = f"{base}/{t}", f"{t}-{i}".encode()
            pub.publish(topic, payload, qos=1)
            sent[payload] = topic
        if i == per_topic // 3:
            t_crash = time.monotonic()
            stack.crash("ingestor-1")
        time.sleep(0.2)
    try:
        # The restart policy brings it back (it died on its own, as far as the engine knows).
        stack.wait_healthy(["ingestor-1"], timeout=120)
        back_s = time.monotonic() - t_crash
        records = [r for r in stack.kafka_read(ends, len(sent), 180) if r["key"] and r["key"].startswith(base)]
        seen = collections.Counter(r["value"] for r in records)
        missing = sorted(set(sent) - set(seen))
        assert not missing, f"{len(missing)} of {len(sent)} messages missing in Kafka, e.g. {missing[:10]}"
        assert all(sent[r["value"]] == r["key"] for r in records), "a record keyed by another topic"
        dups = sum(c - 1 for c in seen.values())
        shares = collections.Counter(r["headers"].get("jetmq.share") for r in records)
        restarts = stack.inspect("ingestor-1", "{{.RestartCount}}")
        print(f"ingestor-1 crashed: healthy again after {back_s:.1f}s (restart count {restarts}); "
              f"{len(sent)} messages, all in Kafka, {dups} duplicates; by share {dict(shares)}")
    finally:
        restore(stack)


# --------------------------------------------------------------------------- 6. down and up


def test_whole_stack_down_and_up_keeps_sessions_queued_and_retained_messages(stack, devices_tracker):
    cl = devices_tracker
    auth = auth_kwargs(stack)
    topic, retained = uid("keep"), uid("retained")
    sub = cl(Target(BROKERS["broker-1"], 1883), client_id=uid("keep-sub"), version=V5, clean=False,
             session_expiry=3600, **auth).connect()
    assert sub.subscribe(topic, qos=1) == [1]
    sub.disconnect()
    pub = cl.connect(Target(BROKERS["broker-2"], 1883), version=V5, **auth)
    n = 50
    for i in range(n):
        pub.publish(topic, str(i).encode(), qos=1)
    pub.publish(retained, b"still here", qos=1, retain=True)
    pub.disconnect()
    time.sleep(1)
    t_down = time.monotonic()
    stack.compose("down", timeout=300)  # containers and network go; volumes stay
    down_s = time.monotonic() - t_down
    t_up = time.monotonic()
    stack.up()
    stack.wait_healthy()
    up_s = time.monotonic() - t_up
    reconnect(sub, ByDnsName(), timeout=60)
    assert sub.session_present, "the session did not survive down and up"
    got = sorted(int(m.payload) for m in sub.expect(n, 30))
    assert got == list(range(n)), f"queued messages after down/up: {got[:10]}.. ({len(got)})"
    late = cl.connect(Target(BROKERS["broker-3"], 1883), version=V311, **auth)
    late.subscribe(retained, qos=1)
    m = late.get(15)
    assert m.retain and m.payload == b"still here"
    print(f"down {down_s:.1f}s, up to healthy {up_s:.1f}s; session, {n} queued and the retained message kept")
