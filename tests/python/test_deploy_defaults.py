"""Secure by default (issue 15, finding 5): what ships is safe as shipped.

- The broker's own defaults refuse anonymous clients (a real broker over a real nats-server,
  paho clients in both protocol versions).
- compose/docker-compose.yml publishes MQTT only on all interfaces; every other port is bound
  to 127.0.0.1; it has no default secret (MQTT and Grafana passwords come from compose/.env)
  and its DNS server neither clashes with mDNS nor forwards (no open resolver).
- compose/node.yml + compose/broker.example.toml (the VPS guide's broker): MQTT over TLS only,
  no anonymous clients, default-deny ACL with each user in its own subtree. Run for real: the
  broker with that file, over TLS, against a real nats-server.
- compose/route-certs.sh leaves private keys 0600; compose/certbot-deploy-hook.sh installs
  certbot's files for the container's user with the key 0600.

The compose files are read with the real compose parser (docker-compose config); no
container is started here (the HA stack run for real is issue 16's test).
"""

from __future__ import annotations

import os
import ssl
import re
import stat
import subprocess

import pytest

import certs
import harness
import mqtt_raw as R
import test_compose as tc
from mqtt_client import V5, V311, Client, uid
from test_security import TlsRaw

pytestmark = pytest.mark.jetmq_only("jetmq's own defaults and deployment files")

NOT_AUTHORIZED = {V5: 0x87, V311: 5}
BAD_CREDENTIALS = {V5: 0x86, V311: 4}


# ----------------------------------------------------------------------------- the binary's defaults


@pytest.fixture(scope="module")
def default_broker(tmp_path_factory, nats):
    """A broker with no configuration file at all: what `jetmq-broker --nats URL` gives."""
    b = harness.BrokerNode(tmp_path_factory.mktemp("defaults"), [nats.url], node_id="defaults",
                           shipped_defaults=True)
    assert b.config_path is None
    b.start()
    yield b
    b.terminate()


def connack(make_raw, version: int, **credentials) -> int:
    """The CONNACK reason code / return code, as it is on the wire."""
    r = make_raw()
    try:
        return r.connect(uid("c"), version=version, **credentials).reason
    finally:
        r.close()


@pytest.mark.parametrize("version", [V5, V311])
def test_default_broker_refuses_anonymous_clients(default_broker, version):
    def plain():
        return R.RawClient(*default_broker.address, version=version)

    assert connack(plain, version) == NOT_AUTHORIZED[version]
    # A username without a password, or any password, is no way round it.
    assert connack(plain, version, username="someone") in (NOT_AUTHORIZED[version], BAD_CREDENTIALS[version])
    assert connack(plain, version, username="someone", password=b"x") == BAD_CREDENTIALS[version]


def test_default_broker_says_why_every_connect_is_refused(default_broker):
    harness.wait_until(lambda: "no way to log in is configured" in default_broker.log_path.read_text(errors="replace"), timeout=10,
                       what="the start-up warning about missing authentication")


# ----------------------------------------------------------------------------- compose/docker-compose.yml


def published(svc: dict) -> list[tuple[str, int]]:
    """(host address, host port) of every published port, as `docker-compose config` prints them."""
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip") or "0.0.0.0", int(p["published"])))
        else:
            parts = str(p).split("/")[0].split(":")
            out.append((parts[0], int(parts[1])) if len(parts) == 3 else ("0.0.0.0", int(parts[0])))
    return out


def test_stack_publishes_only_mqtt_on_all_interfaces(stack):
    public = []
    for name, svc in stack["services"].items():
        for host, port in published(svc):
            if host != "127.0.0.1":
                public.append((name, port))
    assert public, "the brokers' MQTT ports must be reachable"
    assert all(name.startswith("broker-") and port in (1883, 1884, 1885) for name, port in public), public
    # The MQTT ports map to the brokers' MQTT listener and nothing else of theirs is public.
    for name in ("broker-1", "broker-2", "broker-3"):
        svc = stack["services"][name]
        assert "--config=/etc/jetmq/auth/broker-auth.toml" in svc["command"], svc["command"]


def test_stack_has_no_default_secrets():
    r = tc.run([tc.compose_bin(), "-f", tc.STACK, "config"], cwd=tc.COMPOSE,
               env={"PATH": os.environ["PATH"]})
    assert r.returncode != 0, "the stack must not start without compose/.env"
    assert "compose/.env" in r.stderr, r.stderr
    text = tc.STACK.read_text()
    assert ":-admin" not in text
    assert re.search(r"GF_SECURITY_ADMIN_PASSWORD: \$\{GRAFANA_ADMIN_PASSWORD:\?", text)
    assert re.search(r"GF_AUTH_ANONYMOUS_ENABLED: \"false\"", text)
    example = (tc.COMPOSE / ".env.example").read_text()
    for key in ("MQTT_USERNAME", "MQTT_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"^{key}=", example, re.M), key
    assert re.search(r"^MQTT_PASSWORD=$", example, re.M), "no password ships in the example"
    ignored = (harness.REPO_ROOT / ".gitignore").read_text() + (harness.REPO_ROOT / ".dockerignore").read_text()
    assert "compose/.env" in ignored


def test_stack_mqtt_user_is_the_only_way_in(stack, tmp_path, nats):
    """The stack's mqtt-auth service script, run as the container runs it, makes a broker
    configuration that admits MQTT_USERNAME with MQTT_PASSWORD and nobody else."""
    auth = tc.stack_auth_file(stack, tmp_path)
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    assert "stack-test-password" not in auth.read_text(), "only the hash is stored"
    b = harness.BrokerNode(tmp_path, [nats.url], node_id="stack-auth", shipped_defaults=True)
    b.config_path = auth
    b.start()
    try:
        for version in (V5, V311):
            def plain():
                return R.RawClient(*b.address, version=version)

            assert connack(plain, version) == NOT_AUTHORIZED[version]
            assert connack(plain, version, username="demo", password=b"guess") == BAD_CREDENTIALS[version]
            ok = Client(b.address, version=version, username="demo", password="stack-test-password")
            ok.connect()
            ok.disconnect()
    finally:
        b.terminate()


def test_stack_dns_avoids_mdns_and_is_not_an_open_resolver(stack):
    ports = published(stack["services"]["dns"])
    assert ports and all(host == "127.0.0.1" and port != 5353 for host, port in ports), ports
    corefile = (tc.COMPOSE / "coredns/Corefile").read_text()
    code = "\n".join(line for line in corefile.splitlines() if not line.lstrip().startswith("#"))
    assert "forward" not in code and ".:53" not in code, corefile


# ----------------------------------------------------------------------------- compose/node.yml (VPS)


def test_node_broker_takes_its_settings_from_a_file(node):
    svc = node["services"]["broker"]
    assert tc.flag(svc["command"], "--config") == "/etc/jetmq/broker.toml"
    assert tc.flag(svc["command"], "--listen") is None, "listeners come from the file, TLS only"
    targets = {t for _, t in tc.binds(svc)}
    assert {"/etc/jetmq/broker.toml", "/etc/jetmq/tls"} <= targets, targets
    r = tc.run([tc.compose_bin(), "-f", tc.NODE, "config"], cwd=tc.COMPOSE,
               env={"PATH": os.environ["PATH"], "NODE_NAME": "n1", "PUBLIC_ADDRESS": "203.0.113.10",
                    "NATS_ROUTES": "nats-route://203.0.113.10:6222"})
    assert r.returncode != 0 and "BROKER_CONFIG must be set" in r.stderr, r.stderr


class ConfigOnlyBroker(harness.BrokerNode):
    """A broker whose MQTT listeners come from its configuration file only (no --listen), as
    compose/node.yml runs it; ``port`` is the file's TLS port, which readiness waits for."""

    def argv(self) -> list[str]:
        a = super().argv()
        i = a.index("--listen")
        del a[i:i + 2]
        return a


def test_node_broker_listens_on_tls_only(node, tmp_path):
    config = tc.node_broker_config(tmp_path)
    command = [a if not a.startswith("--config=") else f"--config={config}" for a in node["services"]["broker"]["command"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")}
    r = tc.run([harness.broker_bin(), *command[1:], "--check-config"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mqtt=[tls 0.0.0.0:8883]" in r.stdout, r.stdout


@pytest.mark.parametrize("version", [V5, V311])
def test_node_broker_example_refuses_anonymous_and_confines_each_device(tmp_path, nats, version):
    """compose/broker.example.toml as the VPS guide fills it in, run for real over TLS:
    anonymous and wrong passwords refused, a device confined to devices/<its name>/#."""
    config = tc.node_broker_config(tmp_path)
    tls_port = harness.free_port()
    config.write_text(config.read_text().replace('tls = "0.0.0.0:8883"', f'tls = "127.0.0.1:{tls_port}"'))
    b = ConfigOnlyBroker(tmp_path, [nats.url], node_id="vps-example", port=tls_port, shipped_defaults=True)
    b.config_path = config
    b.start()
    try:
        def client(**kw) -> Client:
            c = Client(("127.0.0.1", tls_port), version=version, **kw)
            c.paho.tls_set(ca_certs=str(tmp_path / "ca.pem"))
            c.paho.tls_insecure_set(True)  # the test certificate names node1.example.net
            return c

        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ctx.check_hostname = False  # the test certificate names node1.example.net

        def over_tls():
            return TlsRaw(tls_port, ctx, version=version)

        assert connack(over_tls, version) == NOT_AUTHORIZED[version]
        assert connack(over_tls, version, username="device-1", password=b"guess") == BAD_CREDENTIALS[version]
        dev = client(username="device-1", password="device-password")
        dev.connect()
        try:
            own = f"devices/device-1/{uid('t')}"
            other = f"devices/device-2/{uid('t')}"
            assert dev.subscribe(own, qos=1) == [1]
            assert dev.subscribe(other, qos=1)[0] >= 0x80
            assert dev.publish(own, b"mine", qos=1) == 0
            assert dev.get(10).payload == b"mine"
            if version == V5:
                assert dev.publish(other, b"theirs", qos=1) == 0x87
        finally:
            dev.close_quietly()
    finally:
        b.terminate()


# ----------------------------------------------------------------------------- key files


def test_route_certificate_keys_are_private(tmp_path):
    r = tc.run(["bash", tc.COMPOSE / "route-certs.sh", tmp_path / "pki", "203.0.113.10", "node2.example.net"])
    assert r.returncode == 0, r.stderr
    for host in ("203.0.113.10", "node2.example.net"):
        d = tmp_path / "pki" / host
        assert stat.S_IMODE((d / "route-key.pem").stat().st_mode) == 0o600
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert stat.S_IMODE((d / "route.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "pki/ca/ca-key.pem").stat().st_mode) & 0o077 == 0


def test_certbot_deploy_hook_installs_keys_for_the_container_user(tmp_path):
    live = tmp_path / "letsencrypt/live/node1.example.net"
    live.mkdir(parents=True)
    ca = certs.make_ca(tmp_path, "ca")
    leaf = certs.make_cert(tmp_path, ca, "leaf", cn="node1.example.net", sans=["DNS:node1.example.net"])
    (live / "fullchain.pem").write_bytes(leaf.cert.read_bytes() + ca.cert.read_bytes())
    (live / "privkey.pem").write_bytes(leaf.key.read_bytes())
    os.chmod(live / "privkey.pem", 0o600)
    dst = tmp_path / "jetmq-tls"
    env = {"PATH": os.environ["PATH"], "RENEWED_LINEAGE": str(live), "JETMQ_TLS_DIR": str(dst),
           "JETMQ_UID": str(os.getuid()), "JETMQ_COMPOSE_DIR": str(tmp_path / "no-compose-here")}
    r = subprocess.run(["bash", str(tc.COMPOSE / "certbot-deploy-hook.sh")], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((dst / "privkey.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(dst.stat().st_mode) == 0o700
    assert (dst / "fullchain.pem").read_bytes() == (live / "fullchain.pem").read_bytes()
    assert (dst / "privkey.pem").stat().st_uid == os.getuid()
    # Without certbot's variable it refuses instead of guessing.
    r = subprocess.run(["bash", str(tc.COMPOSE / "certbot-deploy-hook.sh")], env={"PATH": os.environ["PATH"]},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "RENEWED_LINEAGE" in r.stderr


# The parsed compose files, as test_compose's fixtures make them.
stack = tc.stack
node = tc.node
