"""The NATS backbone is locked (issue 15, finding 1): every shipped NATS config (dev, the
local cluster, compose, vps) runs with the users of ``jetmq-broker nats-auth`` and their
permissions.

For each shipped file, started as it ships (only ports, the store directory and TLS file
paths substituted; the generated credentials where the file includes them):
- a NATS client without credentials is refused;
- with the ingestor's NKEY it cannot subscribe to jetmq's message, session or retained
  subjects, nor read the buckets through the JetStream API, nor publish into ``jetmq.in.>``,
  nor receive the broker's replies; but it can do what consuming a share takes (create its
  consumer, pull, acknowledge);
- with the broker's NKEY a jetmq-broker works end to end (MQTT publish -> subscribe).
Routes: a server without the route password cannot join the compose cluster.

A raw NATS text-protocol client is used, so every request is exactly what the test says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

import certs
import harness
import nats_keys
from mqtt_client import V5, Client, uid

pytestmark = pytest.mark.jetmq_only("the NATS backbone's credentials")

# JETMQ_TEST_NATS_CONFIG_DIR: run these tests against another checkout's nats-config/ (e.g.
# one from before the backbone was locked, to see them fail there).
NATS_CONFIG = Path(os.environ.get("JETMQ_TEST_NATS_CONFIG_DIR") or harness.REPO_ROOT / "nats-config")


class RawNats:
    """A NATS text-protocol client: CONNECT (optionally with an NKEY), SUB, PUB, requests.
    ``denied`` tells whether the server answered a command with a Permissions Violation."""

    def __init__(self, host: str, port: int, seed_file: Path | None = None, timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rb")
        self.timeout = timeout
        self.sid = 0
        self.pending: list[tuple[str, bytes]] = []
        info = self.f.readline()
        assert info.startswith(b"INFO "), info
        connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True, "protocol": 1}
        if seed_file is not None:
            connect.update(harness.nkey_connect_fields(seed_file, json.loads(info[5:]).get("nonce", "")))
        self.sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        # A refused CONNECT gets -ERR and the socket closed at once. A PING sent on its heels
        # would still be unread when the server closes, and the kernel then answers with a
        # reset that can discard the -ERR: so wait a moment for a refusal before the PING.
        self.connect_error = self._refusal(0.5) or self._sync()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _read(self, deadline: float) -> tuple[str, bytes] | None:
        """One protocol line (and the payload of a message)."""
        self.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            line = self.f.readline()
        except (TimeoutError, socket.timeout):
            return None
        if not line:
            return ("EOF", b"")
        text = line.decode(errors="replace").strip()
        if text.startswith("PING"):
            self.sock.sendall(b"PONG\r\n")
            return ("PING", b"")
        if text.startswith("MSG "):
            size = int(text.split()[-1])
            return (text, self.f.read(size + 2)[:size])
        if text.startswith("HMSG "):
            hdr, total = (int(x) for x in text.split()[-2:])
            return (text, self.f.read(total + 2)[hdr:total])
        return (text, b"")

    def _refusal(self, within: float) -> str | None:
        """An -ERR (or the close) that comes without being asked for, within ``within`` s."""
        # select, not a socket timeout: a timed-out read leaves the buffered reader unusable.
        readable, _, _ = select.select([self.sock], [], [], within)
        if not readable:
            return None
        got = self._read(time.monotonic() + self.timeout)
        if got is None:
            return None
        line, _ = got
        if line.startswith("-ERR"):
            return line
        return "connection closed" if line == "EOF" else None

    def _sync(self) -> str | None:
        """PING and wait for PONG: returns the first -ERR the server sent before it."""
        self.sock.sendall(b"PING\r\n")
        deadline = time.monotonic() + self.timeout
        error = None
        while time.monotonic() < deadline:
            got = self._read(deadline)
            if got is None:
                break
            line, payload = got
            if line == "PONG":
                return error
            if line.startswith("-ERR") and error is None:
                error = line
            elif line == "EOF":
                return error or "connection closed"
            elif line.startswith(("MSG ", "HMSG ")):
                self.pending.append((line, payload))
        return error or "no PONG"

    @property
    def connected(self) -> bool:
        return self.connect_error is None

    def sub_error(self, subject: str) -> str | None:
        self.sid += 1
        self.sock.sendall(f"SUB {subject} {self.sid}\r\n".encode())
        return self._sync()

    def pub_error(self, subject: str, payload: bytes = b"x", reply: str = "") -> str | None:
        self.sock.sendall(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n")
        return self._sync()

    def request(self, subject: str, payload: bytes, inbox: str) -> tuple[str | None, bytes | None]:
        """(error, reply payload) of one request answered on ``inbox``."""
        err = self.sub_error(inbox)
        if err:
            return err, None
        self.sock.sendall(f"PUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + b"\r\n")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.pending:
                return None, self.pending.pop(0)[1]
            got = self._read(deadline)
            if got is None:
                break
            line, body = got
            if line.startswith("-ERR"):
                return line, None
            if line.startswith(("MSG ", "HMSG ")):
                return None, body
        return "no reply", None


def denied(err: str | None) -> bool:
    return bool(err) and "Permissions Violation" in err


# --------------------------------------------------------------------------- the shipped configs


def _sub(text: str, pattern: str, repl: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n >= 1, f"pattern {pattern!r} not in the shipped config"
    return new


class ShippedNats(harness.ManagedProcess):
    """nats-server running a copy of a shipped config: ports, store directory (and TLS file
    paths) substituted, ``include`` lines left as they ship."""

    kind = "nats"

    def __init__(self, workdir: Path, name: str, conf: Path, text: str, argv_extra: list[str] | None = None,
                 env: dict[str, str] | None = None, port: int = 0, http_port: int = 0):
        super().__init__(f"shipped-{name}", workdir)
        self.conf, self.port, self.http_port = conf, port, http_port
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
        self.argv_extra = argv_extra or []
        self.extra_env = env or {}

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [harness.nats_server_bin(), "-c", str(self.conf), *self.argv_extra]

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    def ready(self) -> bool:
        return harness.http_get(f"http://127.0.0.1:{self.http_port}/healthz?js-enabled-only=true", 1.0)[0] == 200


def _ports() -> tuple[int, int]:
    return harness.free_port(), harness.free_port()


def _common(text: str, port: int, http_port: int, store: Path) -> str:
    text = _sub(text, r"^listen: .*$", f"listen: 127.0.0.1:{port}")
    text = _sub(text, r"^http: .*$", f"http: 127.0.0.1:{http_port}")
    return _sub(text, r'^  store_dir: .*$', f'  store_dir: "{store}"')


def start_dev(d: Path):
    """nats-config/dev.conf with nats-config/mappings.conf and ./auth from the generator."""
    port, http_port = _ports()
    shutil.copy(NATS_CONFIG / "mappings.conf", d / "mappings.conf")
    auth = harness.generate_nats_auth(d / "auth")
    text = _common((NATS_CONFIG / "dev.conf").read_text(), port, http_port, d / "js")
    n = ShippedNats(d, "dev", d / "dev.conf", text, port=port, http_port=http_port)
    return [n], auth


def start_cluster_local(d: Path):
    """nats-config/cluster/nats-{1,2,3}.conf: the try-out cluster on one machine."""
    ports = [_ports() for _ in range(3)]
    route_ports = [harness.free_port() for _ in range(3)]
    shutil.copy(NATS_CONFIG / "cluster" / "mappings.conf", d / "mappings.conf")
    auth = harness.generate_nats_auth(d / "auth", [f"127.0.0.1:{p}" for p in route_ports])
    nodes = []
    for i in range(3):
        text = _common((NATS_CONFIG / "cluster" / f"nats-{i + 1}.conf").read_text(), *ports[i], d / f"js{i}")
        text = _sub(text, r"^  listen: .*$", f"  listen: 127.0.0.1:{route_ports[i]}")
        nodes.append(ShippedNats(d / f"n{i}", f"cluster{i}", d / f"nats-{i + 1}.conf", text,
                                 port=ports[i][0], http_port=ports[i][1]))
    return nodes, auth


def start_compose(d: Path):
    """nats-config/compose/nats.conf, three nodes, as the compose services run it: the config
    in <dir>/jetmq/, the nats-auth volume in <dir>/auth/."""
    ports = [_ports() for _ in range(3)]
    route_ports = [harness.free_port() for _ in range(3)]
    auth = harness.generate_nats_auth(d / "auth", [f"127.0.0.1:{p}" for p in route_ports])
    nodes = []
    for i in range(3):
        nd = d / f"node{i}"
        (nd / "jetmq").mkdir(parents=True)
        shutil.copy(NATS_CONFIG / "compose" / "mappings.conf", nd / "jetmq" / "mappings.conf")
        (nd / "auth").symlink_to(auth)
        text = _common((NATS_CONFIG / "compose" / "nats.conf").read_text(), *ports[i], nd / "js")
        text = _sub(text, r"^  listen: 0\.0\.0\.0:6222$", f"  listen: 127.0.0.1:{route_ports[i]}")
        nodes.append(ShippedNats(nd, f"compose{i}", nd / "jetmq" / "nats.conf", text,
                                 env={"NATS_NAME": f"nats-{i + 1}"}, port=ports[i][0], http_port=ports[i][1]))
    return nodes, auth


def start_vps(d: Path):
    """nats-config/vps/nats.conf with compose/node.yml's command line (one host), route TLS
    files from a test CA, and the generated auth.conf in <dir>/auth/."""
    port, http_port = _ports()
    (d / "jetmq").mkdir(parents=True)
    shutil.copy(NATS_CONFIG / "vps" / "mappings.conf", d / "jetmq" / "mappings.conf")
    auth = harness.generate_nats_auth(d / "auth")
    ca = certs.make_ca(d, "route-ca")
    cert = certs.make_cert(d, ca, "route", cn="127.0.0.1", sans=["IP:127.0.0.1"])
    text = (NATS_CONFIG / "vps" / "nats.conf").read_text()
    text = _sub(text, r"^http: .*$", f"http: 127.0.0.1:{http_port}")
    text = _sub(text, r"^  store_dir: .*$", f'  store_dir: "{d / "js"}"')
    text = _sub(text, r'cert_file: "/etc/nats/tls/route.pem"', f'cert_file: "{cert.cert}"')
    text = _sub(text, r'key_file: "/etc/nats/tls/route-key.pem"', f'key_file: "{cert.key}"')
    text = _sub(text, r'ca_file: "/etc/nats/tls/ca.pem"', f'ca_file: "{ca.cert}"')
    # One host alone: no --cluster/--routes (a lone clustered node never elects a JetStream
    # meta leader); test_compose.py runs two vps nodes over their TLS routes.
    argv = ["-n", "vps1", "-a", "127.0.0.1", "-p", str(port), "-m", str(http_port)]
    n = ShippedNats(d, "vps", d / "jetmq" / "nats.conf", text, argv_extra=argv, port=port, http_port=http_port)
    return [n], auth


SHIPPED = {"dev": start_dev, "cluster": start_cluster_local, "compose": start_compose, "vps": start_vps}


@pytest.fixture(scope="module", params=list(SHIPPED))
def shipped(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"shipped-{request.param}")
    nodes, auth = SHIPPED[request.param](d)
    try:
        for n in nodes:
            n.start(timeout=30)
        if len(nodes) > 1:
            harness.wait_until(
                lambda: all(harness.http_get(f"http://127.0.0.1:{n.http_port}/healthz", 1.0)[0] == 200 for n in nodes),
                60, interval=0.3, what="JetStream cluster healthy")
        yield request.param, nodes, auth
    finally:
        for n in reversed(nodes):
            n.terminate()
        violations = [line for n in nodes for line in n.log_tail(400).splitlines() if "Violation" in line]
        print(f"{request.param}: {len(violations)} violations logged (the test's own attempts)")


def test_the_shipped_config_refuses_anonymous_clients(shipped):
    name, nodes, _ = shipped
    for n in nodes:
        c = RawNats("127.0.0.1", n.port)
        try:
            assert not c.connected, f"{name}: a client without credentials got in"
            assert "Authorization Violation" in c.connect_error, c.connect_error
        finally:
            c.close()


def test_a_wrong_nkey_is_refused(shipped, tmp_path):
    _, nodes, _ = shipped
    stranger = nats_keys.NKey.generate("user")
    seed = tmp_path / "stranger.nk"
    seed.write_text(stranger.seed + "\n")
    c = RawNats("127.0.0.1", nodes[0].port, seed)
    try:
        assert not c.connected and "Authorization Violation" in c.connect_error, c.connect_error
    finally:
        c.close()


# What an ingestor's credentials must never do: read jetmq's messages, sessions or retained
# messages, write into them, or read the broker's replies.
INGESTOR_SUBSCRIBE_DENIED = [
    ">", "jetmq.>", "jetmq.s.>", "jetmq.s.0.devices.bob.private", "jetmq.in.>", "jetmq.r.>",
    "jetmq.node.>", "$KV.JETMQ_SESSIONS.>", "$KV.JETMQ_NODES.>", "$KV.>", "_INBOX.>",
    "_INBOX.broker.>", "$JS.API.>", "$JS.ACK.>",
]
INGESTOR_PUBLISH_DENIED = [
    "jetmq.in.devices.bob.private", "jetmq.s.0.devices.bob.private", "jetmq.r.devices.bob",
    "jetmq.node.b1.kick", "$KV.JETMQ_SESSIONS.client1", "$KV.JETMQ_NODES.b1",
    "$JS.API.STREAM.MSG.GET.KV_JETMQ_SESSIONS", "$JS.API.STREAM.MSG.GET.JETMQ_RETAINED",
    "$JS.API.STREAM.MSG.GET.JETMQ_MSGS", "$JS.API.DIRECT.GET.KV_JETMQ_SESSIONS",
    "$JS.API.DIRECT.GET.JETMQ_RETAINED", "$JS.API.STREAM.UPDATE.JETMQ_MSGS",
    "$JS.API.STREAM.DELETE.JETMQ_MSGS", "$JS.API.STREAM.PURGE.JETMQ_MSGS",
    "$JS.API.STREAM.CREATE.JETMQ_RETAINED", "$JS.API.STREAM.INFO.KV_JETMQ_SESSIONS",
    "$JS.API.CONSUMER.CREATE.KV_JETMQ_SESSIONS", "$JS.API.CONSUMER.CREATE.JETMQ_RETAINED.x.jetmq.r.>",
    "$JS.API.CONSUMER.CREATE.JETMQ_MSGS", "$JS.API.CONSUMER.CREATE.JETMQ_MSGS.x",
    "$JS.API.CONSUMER.DURABLE.CREATE.JETMQ_MSGS.x", "$JS.API.CONSUMER.CREATE.JETMQ_MSGS.x.jetmq.r.>",
    "$JS.API.CONSUMER.DELETE.JETMQ_MSGS.jetmq-share-x", "_INBOX.broker.x",
]


def test_the_ingestor_identity_cannot_touch_jetmq_subjects(shipped):
    name, nodes, auth = shipped
    c = RawNats("127.0.0.1", nodes[0].port, auth / "ingestor.nk")
    try:
        assert c.connected, c.connect_error
        allowed_subs = [s for s in INGESTOR_SUBSCRIBE_DENIED if not denied(c.sub_error(s))]
        allowed_pubs = [s for s in INGESTOR_PUBLISH_DENIED if not denied(c.pub_error(s, reply="_INBOX.ingestor.t"))]
        assert not allowed_subs, f"{name}: the ingestor may subscribe to {allowed_subs}"
        assert not allowed_pubs, f"{name}: the ingestor may publish to {allowed_pubs}"
    finally:
        c.close()


def test_the_broker_identity_cannot_read_the_ingestors_replies(shipped):
    _, nodes, auth = shipped
    c = RawNats("127.0.0.1", nodes[0].port, auth / "broker.nk")
    try:
        assert c.connected, c.connect_error
        assert denied(c.sub_error("_INBOX.ingestor.>"))
        assert denied(c.sub_error("_INBOX.>"))
        assert not c.sub_error("jetmq.s.>")
    finally:
        c.close()


def test_a_broker_and_an_ingestor_identity_work_end_to_end(shipped, tmp_path):
    """jetmq-broker with the broker's seed file: MQTT publish -> subscribe through the
    shipped config. Then, with the ingestor's key, what an ingestor does with its share:
    create its durable pull consumer on share 0, pull the message, acknowledge it."""
    name, nodes, auth = shipped
    b = harness.BrokerNode(tmp_path, [n.url for n in nodes], node_id=f"bb-{name}",
                           extra_env={"JETMQ_NATS__NKEY_SEED_FILE": str(auth / "broker.nk"),
                                      "JETMQ_NATS__REPLICAS": str(len(nodes))})
    b.start(timeout=90)
    try:
        topic = uid("backbone")
        sub = Client(b.address, version=V5).connect()
        pub = Client(b.address, version=V5).connect()
        try:
            assert sub.subscribe(topic, qos=1) == [1]
            assert pub.publish(topic, b"through the locked backbone", qos=1) == 0
            assert sub.get(15).payload == b"through the locked backbone"
        finally:
            sub.close_quietly()
            pub.close_quietly()
    finally:
        b.terminate()

    ing = RawNats("127.0.0.1", nodes[0].port, auth / "ingestor.nk", timeout=10)
    try:
        assert ing.connected, ing.connect_error
        err, info = ing.request("$JS.API.STREAM.INFO.JETMQ_MSGS", b"", "_INBOX.ingestor.i1")
        assert err is None and json.loads(info).get("config", {}).get("name") == "JETMQ_MSGS", (err, info)
        consumer = f"jetmq-ingestor-t{int(time.time() * 1000) % 100000}"
        share = "jetmq.s.*.>"  # every share: the test message is in whichever the mapping chose
        cfg = {"stream_name": "JETMQ_MSGS", "config": {"durable_name": consumer, "name": consumer,
                                                       "filter_subject": share, "ack_policy": "explicit",
                                                       "deliver_policy": "all"}}
        err, reply = ing.request(f"$JS.API.CONSUMER.CREATE.JETMQ_MSGS.{consumer}.{share}",
                                 json.dumps(cfg).encode(), "_INBOX.ingestor.c1")
        assert err is None and "error" not in json.loads(reply), (err, reply)
        err = ing.sub_error("_INBOX.ingestor.pull")
        assert err is None, err
    except BaseException:
        ing.close()
        raise
    _pull_and_ack(ing, consumer)


def _pull_and_ack(ing: RawNats, consumer: str) -> None:
    try:
        body = b'{"batch":1,"expires":5000000000}'
        ing.sock.sendall(f"PUB $JS.API.CONSUMER.MSG.NEXT.JETMQ_MSGS.{consumer} _INBOX.ingestor.pull {len(body)}\r\n"
                         .encode() + body + b"\r\n")
        deadline = time.monotonic() + 10
        ack_subject = None
        seen = []
        while time.monotonic() < deadline and ack_subject is None:
            got = ing._read(deadline)
            if got is None:
                break
            line, _ = got
            seen.append(line)
            assert not line.startswith("-ERR"), line
            if line.startswith(("MSG ", "HMSG ")):
                parts = line.split()
                # delivered on the pull inbox's subscription, under the message's own subject
                if len(parts) >= 5 and parts[3].startswith("$JS.ACK.JETMQ_MSGS."):
                    ack_subject = parts[3]
        assert ack_subject, f"the ingestor identity pulled nothing from its consumer: {seen}"
        assert ing.pub_error(ack_subject, b"+ACK") is None
        err, _ = ing.request(f"$JS.API.CONSUMER.INFO.JETMQ_MSGS.{consumer}", b"", "_INBOX.ingestor.i2")
        assert err is None, err
    finally:
        ing.close()


def test_a_server_without_the_route_password_cannot_join(tmp_path, shipped):
    """Routes are authenticated: a server that dials the cluster's route port without the
    generated route password is refused and never becomes part of it (vps: mutual TLS)."""
    if shipped[0] not in ("compose", "cluster"):
        pytest.skip("single-node config (vps routes are authenticated by mutual TLS)")
    name, nodes, auth = shipped
    target_routes = re.search(r"@127\.0\.0\.1:(\d+)", (auth / "routes.conf").read_text())
    assert target_routes
    rogue = harness.NatsServer(tmp_path, server_name="rogue", cluster_port=harness.free_port(),
                               routes=[f"nats-route://127.0.0.1:{target_routes.group(1)}"], auth=False)
    rogue.start()
    try:
        # the rogue dials the route port and is turned away (it would keep trying)
        harness.wait_until(lambda: "Authorization Violation" in rogue.log_tail(400), 20, 0.1,
                           "the rogue server's route to be refused")
        routez = harness.http_json(f"http://127.0.0.1:{nodes[0].http_port}/routez")
        names = {r.get("remote_name") for r in routez.get("routes") or []}
        assert "rogue" not in names, names
        assert harness.http_json(f"{rogue.monitor_url}/routez").get("num_routes", 0) == 0
    finally:
        rogue.terminate()


def test_every_shipped_config_is_valid_with_generated_credentials(tmp_path):
    """nats-server -t accepts every shipped file once the generated includes are in place
    (and refuses it while they are missing: no credentials, no server)."""
    work = tmp_path / "nats-config"
    shutil.copytree(NATS_CONFIG, work, ignore=shutil.ignore_patterns("auth"))
    missing = subprocess.run([harness.nats_server_bin(), "-t", "-c", str(work / "dev.conf")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0, "dev.conf starts without its credentials"
    harness.generate_nats_auth(work / "auth")
    harness.generate_nats_auth(work / "cluster" / "auth",
                               ["127.0.0.1:6222", "127.0.0.1:6223", "127.0.0.1:6224"])
    harness.generate_nats_auth(work / "auth-compose", ["nats-1:6222", "nats-2:6222", "nats-3:6222"])
    compose = tmp_path / "etc" / "nats"
    shutil.copytree(work / "compose", compose / "jetmq")
    (compose / "auth").symlink_to(work / "auth-compose")
    vps = tmp_path / "vps" / "nats"
    shutil.copytree(work / "vps", vps / "jetmq")
    (vps / "auth").symlink_to(work / "auth")
    for conf, env in [(work / "dev.conf", {}), (work / "cluster" / "nats-1.conf", {}),
                      (work / "cluster" / "nats-2.conf", {}), (work / "cluster" / "nats-3.conf", {}),
                      (compose / "jetmq" / "nats.conf", {"NATS_NAME": "nats-1"})]:
        r = subprocess.run([harness.nats_server_bin(), "-t", "-c", str(conf)], capture_output=True, text=True,
                           timeout=30, env={**os.environ, **env})
        assert r.returncode == 0, f"{conf}: {r.stdout}{r.stderr}"
        text = conf.read_text()
        assert "auth.conf" in text and "no_auth_user" not in text, conf


# --------------------------------------------------------------------------- ingestor start-up


@pytest.fixture(scope="module")
def locked_nats(tmp_path_factory):
    n = harness.NatsServer(tmp_path_factory.mktemp("locked"))
    n.start()
    yield n
    n.terminate()


def _ingestor_exit(tmp_path: Path, url: str, env: dict[str, str]) -> tuple[int, str]:
    import kafka_harness

    problem = kafka_harness.ingestor_bin_problem()
    if problem:
        pytest.skip(problem)
    conf = tmp_path / "ingestor.toml"
    # Kafka is never reached: the NATS connection comes first and must stop the ingestor.
    conf.write_text(f'[nats]\nurls = "{url}"\n[kafka]\nbootstrap_servers = "127.0.0.1:{harness.free_port()}"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")}
    try:
        r = subprocess.run([str(kafka_harness.ingestor_bin()), "--mqtt-id", "1", "--config", str(conf),
                            "--metrics-listen", f"127.0.0.1:{harness.free_port()}"],
                           env={**base, "NO_COLOR": "1", **env}, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the ingestor kept running against refused credentials:\n{e.stdout}\n{e.stderr}")
    return r.returncode, r.stdout + r.stderr


def test_an_ingestor_without_credentials_stops_with_the_key_named(tmp_path, locked_nats):
    code, out = _ingestor_exit(tmp_path, locked_nats.url, {})
    assert code == 1, out
    assert "authorization violation" in out and "nats.nkey_seed_file" in out, out


def test_an_ingestor_with_a_wrong_seed_file_stops_with_the_key_named(tmp_path, locked_nats):
    seed = tmp_path / "stranger.nk"
    seed.write_text(nats_keys.NKey.generate("user").seed + "\n")
    seed.chmod(0o600)
    code, out = _ingestor_exit(tmp_path, locked_nats.url, {"JETMQ_NATS__NKEY_SEED_FILE": str(seed)})
    assert code == 1, out
    assert "authorization violation" in out and "nats.nkey_seed_file" in out, out


def test_a_seed_file_that_is_not_a_seed_is_a_configuration_error(tmp_path, locked_nats):
    bad = tmp_path / "bad.nk"
    bad.write_text("not a seed\n")
    code, out = _ingestor_exit(tmp_path, locked_nats.url, {"JETMQ_NATS__NKEY_SEED_FILE": str(bad)})
    assert code == 2 and "nats.nkey_seed_file" in out, out
    b = harness.BrokerNode(tmp_path, [locked_nats.url], node_id="badseed",
                           extra_env={"JETMQ_NATS__NKEY_SEED_FILE": str(bad)})
    r = subprocess.run(b.argv(), env=b.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "nats.nkey_seed_file" in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_broker_with_wrong_credentials_stops_with_the_keys_named(tmp_path, locked_nats):
    b = harness.BrokerNode(tmp_path, [locked_nats.url], node_id="nocreds",
                           extra_env={"JETMQ_NATS__TOKEN": "not-a-key"})
    r = subprocess.run(b.argv(), env=b.env(), capture_output=True, text=True, timeout=45)
    assert r.returncode == 1 and "authorization violation" in r.stdout + r.stderr, r.stdout + r.stderr
