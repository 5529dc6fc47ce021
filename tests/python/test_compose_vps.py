"""compose/node.yml as docs/deploy-vps.md runs it, on three stand-in hosts.

Each host is a container with its own address and network stack on a private network; the
node's services (nats, broker) run in that stack (`NETWORK_MODE=container:<host>`, what
`network_mode: host` gives on a VPS), from node.yml with an env file as the guide writes it:
route certificates from compose/route-certs.sh, NATS keys from `jetmq-broker nats-auth`,
the broker's configuration from compose/broker.example.toml (TLS only, no anonymous
clients, default-deny ACL `devices/%u/#`). Devices reach the brokers by one DNS name with
three A records, over TLS. One host is lost whole (its containers killed, as at a power cut):
the devices continue on the other two with their sessions.

The ingestor of node.yml's `ingestor` profile is not started here: it needs a Kafka
reachable from every host, which test_compose_stack.py covers for the one-host stack.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import certs
import harness
from mqtt_client import V5, Target, Tracker, uid
# `images` (a fixture: scripts/compose-images) builds the same images as for the one-host stack.
from test_compose_stack import ByDnsName, Devices, compose_command, images, run  # noqa: F401

ROOT = harness.REPO_ROOT
NODE_FILE = ROOT / "compose" / "node.yml"
SUBNET = "172.30.54.0/24"
HOSTS = {"node1": "172.30.54.11", "node2": "172.30.54.12", "node3": "172.30.54.13"}
DNS_ADDRESS = "172.30.54.53"
DNS_NAME = "mqtt.vps.test"
USERNAME = "device-1"
HOST_LOSS_RESUME_WITHIN_S = 30.0

pytestmark = [
    pytest.mark.jetmq_only("runs jetmq's own compose/node.yml"),
    pytest.mark.slow,
    pytest.mark.timeout(900),
]


class Hosts:
    """Three stand-in VPS hosts, a DNS server, and node.yml's services on each; everything
    removed at the end, by the names this run gave it."""

    def __init__(self, workdir: Path):
        self.tag = f"jt-vps{os.getpid()}"
        self.workdir = workdir
        self.network = self.tag
        self.containers: list[str] = []
        self.password = uid("pw")

    def docker(self, *args, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker", *args], timeout=timeout, check=check)

    def compose(self, host: str, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run([*compose_command(), "-p", f"{self.tag}-{host}", "-f", NODE_FILE,
                    "--env-file", self.workdir / f"{host}.env", *args], timeout=timeout, check=check)

    # ------------------------------------------------------------------ the guide's steps
    def prepare(self) -> None:
        w = self.workdir
        broker_bin = harness.broker_bin()
        # 2. Route certificates, one directory per host (keys 0600).
        run(["bash", ROOT / "compose" / "route-certs.sh", w / "nats-pki", *HOSTS.values()])
        # 2b. NATS credentials: the seeds belong to the image's user (10001).
        run([broker_bin, "nats-auth", "--out", w / "nats-auth"])
        for seed in ("broker.nk", "ingestor.nk"):
            os.chown(w / "nats-auth" / seed, 10001, 10001)
        # 4. The broker's certificate (the DNS name and every address) and its users.
        ca = certs.make_ca(w / "tls-ca", "devices-ca")
        sans = [f"DNS:{DNS_NAME}", *(f"IP:{a}" for a in HOSTS.values())]
        leaf = certs.make_cert(w / "tls", ca, "server", DNS_NAME, sans)
        (w / "tls" / "fullchain.pem").write_bytes(leaf.cert.read_bytes() + ca.cert.read_bytes())
        (w / "tls" / "privkey.pem").write_bytes(leaf.key.read_bytes())
        for f in ("fullchain.pem", "privkey.pem"):
            os.chown(w / "tls" / f, 10001, 10001)
            os.chmod(w / "tls" / f, 0o600)
        self.ca = str(ca.cert)
        hashed = subprocess.run([str(broker_bin), "hash-password"], input=self.password + "\n", text=True,
                                capture_output=True, check=True, timeout=60).stdout.strip()
        example = (ROOT / "compose" / "broker.example.toml").read_text()
        start = example.index('password_hash = "REPLACE')
        end = example.index("\n", start)
        config = example[:start] + f'password_hash = "{hashed}"' + example[end:]
        assert f'username = "{USERNAME}"' in config, "broker.example.toml's user changed: update the test"
        (w / "broker.toml").write_text(config)
        os.chmod(w / "broker.toml", 0o644)
        # 5. One env file per host, as node.env.example lays it out.
        routes = ",".join(f"nats-route://{a}:6222" for a in HOSTS.values())
        for host, address in HOSTS.items():
            (w / f"{host}.env").write_text("\n".join([
                f"NODE_NAME={host}",
                f"PUBLIC_ADDRESS={address}",
                f"NATS_ROUTES={routes}",
                f"NATS_TLS_DIR={w / 'nats-pki' / address}",
                f"NATS_AUTH_DIR={w / 'nats-auth'}",
                "JETMQ_IMAGE=jetmq-test/jetmq:local",
                "NATS_IMAGE=jetmq-test/nats:local",
                f"BROKER_CONFIG={w / 'broker.toml'}",
                f"BROKER_TLS_DIR={w / 'tls'}",
                "HTTP_PORT=8080",
                f"NETWORK_MODE=container:{self.tag}-{host}",
            ]) + "\n")
        # 6. DNS: one A record per host.
        (w / "dns").mkdir()
        (w / "dns" / "Corefile").write_text("vps.test:53 {\n    file /etc/coredns/vps.test.zone\n}\n")
        (w / "dns" / "vps.test.zone").write_text("$ORIGIN vps.test.\n$TTL 5\n" + "".join(
            f"mqtt IN A {a}\n" for a in HOSTS.values()))

    def start(self) -> None:
        self.docker("network", "create", "--subnet", SUBNET, self.network)
        for host, address in HOSTS.items():
            # The host itself: an address and a network stack, nothing else running.
            name = f"{self.tag}-{host}"
            self.docker("run", "-d", "--name", name, "--hostname", host, "--network", self.network, "--ip", address,
                        "jetmq-test/debian:bookworm", "sleep", "infinity")
            self.containers.append(name)
        name = f"{self.tag}-dns"
        self.docker("run", "-d", "--name", name, "--network", self.network, "--ip", DNS_ADDRESS,
                    "-v", f"{self.workdir / 'dns'}:/etc/coredns:ro", "jetmq-test/dns:local", "-conf", "/etc/coredns/Corefile")
        self.containers.append(name)
        # All hosts' NATS within moments of each other, as the guide asks; then the brokers.
        for host in HOSTS:
            self.compose(host, "up", "-d", "--no-build", "--no-deps", "nats")
        for host in HOSTS:
            self.compose(host, "up", "-d", "--no-build", "broker")

    def healthy(self, host: str) -> bool:
        for service in ("nats", "broker"):
            cid = self.compose(host, "ps", "-q", service, check=False).stdout.strip()
            if not cid:
                return False
            state = self.docker("inspect", "-f", "{{.State.Status}}/{{.State.Health.Status}}", cid, check=False).stdout
            if state.strip() != "running/healthy":
                return False
        return True

    def lose(self, host: str) -> None:
        """The host is gone at once: its services and its network stack."""
        self.compose(host, "kill")
        self.docker("kill", f"{self.tag}-{host}")

    def logs(self, host: str) -> str:
        out = self.compose(host, "logs", "--no-color", "--tail=40", check=False)
        return out.stdout[-4000:]

    def remove(self) -> None:
        for host in HOSTS:
            if (self.workdir / f"{host}.env").exists():
                self.compose(host, "down", "-v", "--remove-orphans", check=False)
        for name in self.containers:
            self.docker("rm", "-f", name, check=False)
        self.docker("network", "rm", self.network, check=False)


@pytest.fixture(scope="module")
def hosts(images, tmp_path_factory):
    h = Hosts(tmp_path_factory.mktemp("vps"))
    try:
        h.prepare()
        t0 = time.monotonic()
        h.start()
        deadline = time.monotonic() + 240
        while not all(h.healthy(host) for host in HOSTS):
            if time.monotonic() > deadline:
                raise AssertionError("hosts not healthy within 240s:\n" + "\n".join(h.logs(x) for x in HOSTS))
            time.sleep(1)
        h.startup_s = time.monotonic() - t0
        print(f"three hosts of node.yml healthy {h.startup_s:.1f}s after the first `up`")
        yield h
    finally:
        h.remove()


def test_three_hosts_by_one_name_lose_one_host_and_devices_continue(hosts):
    names = ByDnsName(DNS_NAME, DNS_ADDRESS, 8883)
    assert sorted(t.host for t in names) == sorted(HOSTS.values())
    login = {"username": USERNAME, "password": hosts.password, "tls_ca": hosts.ca}
    tracker = Tracker(Target(HOSTS["node1"], 8883))
    try:
        # Default-deny ACL: the user's own subtree only.
        denied = tracker.connect(Target(HOSTS["node2"], 8883), version=V5, **login)
        assert denied.subscribe("devices/someone-else/#", qos=1) == [0x87]
        victim = "node1"
        devices = Devices(tracker, Target(HOSTS[victim], 8883), login, names=names,
                          topic_root=f"devices/{USERNAME}")
        devices.start()
        devices.wait_progress(devices.n // 3)
        t_lost = time.monotonic()
        hosts.lose(victim)
        counts = devices.finish()
        resumed = devices.all_resumed_elsewhere(t_lost, HOSTS[victim], f"{victim} was lost")
        print(f"host {victim} lost: sessions resumed on the other hosts after (s) {sorted(resumed.values())}; "
              f"counts {counts}")
        # A host takes its NATS node along, which may lead the sessions bucket: resuming then
        # waits out that bucket's election (architecture.md, "Elections: what a client
        # sees"), a few seconds more than a broker kill alone (test_compose_stack.py: 10 s).
        slow = {k: v for k, v in resumed.items() if v > HOST_LOSS_RESUME_WITHIN_S}
        assert not slow, f"sessions resumed later than {HOST_LOSS_RESUME_WITHIN_S} s: {slow}"
    finally:
        tracker.close_all()
