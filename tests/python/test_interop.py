"""Interop with the mosquitto command line clients (libmosquitto)."""

import shutil
import subprocess
import threading

import pytest

from mqtt_client import V5, V311, uid

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto_sub"), reason="mosquitto-clients not installed")


class Sub:
    """mosquitto_sub in the background, with -d so we know when SUBACK arrived."""

    def __init__(self, target, args, timeout=20):
        host, port = target
        # stdout is a pipe: make mosquitto_sub line-buffered so we see SUBACK as it happens
        unbuf = ["stdbuf", "-oL", "-eL"] if shutil.which("stdbuf") else []
        self.proc = subprocess.Popen(
            [*unbuf, "mosquitto_sub", "-h", host, "-p", str(port), "-d", "-W", str(timeout), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.lines: list[str] = []
        self.subscribed = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        if not self.subscribed.wait(10):
            self.stop()
            raise AssertionError(f"mosquitto_sub never got SUBACK: {self.lines}")

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if "received SUBACK" in line:
                self.subscribed.set()

    def wait(self, timeout=20) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.stop()
        self._t.join(5)
        return rc

    def payloads(self, prefix: str) -> list[str]:
        return [ln for ln in self.lines if ln.startswith(prefix)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run(cmd, timeout=20):
    return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("proto", ["mqttv5", "mqttv311"])
def test_mosquitto_sub_counts_messages(clients, target, proto):
    t = uid("isub")
    s = Sub(target, ["-V", proto, "-t", t, "-q", "1", "-C", "10"])
    pub = clients.connect(version=V5)
    for i in range(10):
        pub.publish(t, f"interop-{i}".encode(), qos=1)
    assert s.wait() == 0, s.lines
    assert s.payloads("interop-") == [f"interop-{i}" for i in range(10)]


@pytest.mark.parametrize("proto", ["mqttv5", "mqttv311"])
@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_mosquitto_pub(clients, target, proto, qos):
    t = uid("ipub")
    sub = clients.connect(version=V311)
    sub.subscribe(t, qos=2)
    host, port = target
    r = run(["mosquitto_pub", "-h", host, "-p", str(port), "-V", proto, "-q", qos, "-t", t, "-m", "from mosquitto_pub"])
    assert r.returncode == 0, r.stderr
    m = sub.get(10)
    assert m.payload == b"from mosquitto_pub" and m.qos == int(qos)


def test_mosquitto_pub_lines_and_retain(clients, target):
    t = uid("ilines")
    host, port = target
    lines = "\n".join(f"line-{i}" for i in range(20)) + "\n"
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1)
    r = subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", t, "-l"],
                       input=lines.encode(), capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert [m.payload.decode() for m in sub.expect(20)] == [f"line-{i}" for i in range(20)]
    r = run(["mosquitto_pub", "-h", host, "-p", str(port), "-q", "1", "-r", "-t", t, "-m", "retained-by-cli"])
    assert r.returncode == 0, r.stderr
    # mosquitto_sub --retained-only prints only the retained message
    r = run(["mosquitto_sub", "-h", host, "-p", str(port), "-V", "mqttv5", "-t", t, "-C", "1", "-W", "10",
             "--retained-only"])
    assert r.returncode == 0, r
    assert r.stdout.decode().strip() == "retained-by-cli"


def test_mosquitto_pub_v5_user_property(clients, target):
    t = uid("iprops")
    sub = clients.connect(version=V5)
    sub.subscribe(t, qos=1)
    host, port = target
    r = run(["mosquitto_pub", "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", t, "-m", "p",
             "-D", "publish", "user-property", "origin", "cli",
             "-D", "publish", "content-type", "text/x-cli",
             "-D", "publish", "message-expiry-interval", "120"])
    assert r.returncode == 0, r.stderr
    m = sub.get(10)
    assert m.props.get("UserProperty") == [("origin", "cli")]
    assert m.props.get("ContentType") == "text/x-cli"
    assert 100 <= m.props.get("MessageExpiryInterval", 0) <= 120


def test_mosquitto_sub_wildcard_verbose(clients, target):
    b = uid("iwild")
    s = Sub(target, ["-V", "mqttv5", "-t", f"{b}/#", "-v", "-C", "3"])
    pub = clients.connect(version=V311)
    for sub_t in ("a", "b/c", "d/e/f"):
        pub.publish(f"{b}/{sub_t}", sub_t.encode(), qos=0)
    assert s.wait() == 0, s.lines
    assert s.payloads(b) == [f"{b}/a a", f"{b}/b/c b/c", f"{b}/d/e/f d/e/f"]


def test_mosquitto_sub_persistent_session(clients, target):
    """mosquitto_sub -c (clean session off) receives QoS 1 messages queued while it was away."""
    host, port = target
    t, cid = uid("ipers"), uid("icid")
    base = ["mosquitto_sub", "-h", host, "-p", str(port), "-V", "mqttv311", "-i", cid, "-c", "-q", "1", "-t", t]
    r = run(base + ["-E"])  # -E: exit once subscribed
    assert r.returncode == 0, r
    pub = clients.connect(version=V5)
    for i in range(3):
        pub.publish(t, f"queued-{i}".encode(), qos=1)
    r = run(base + ["-C", "3", "-W", "10"])
    assert r.returncode == 0, r
    assert r.stdout.decode().split() == ["queued-0", "queued-1", "queued-2"]
    run(["mosquitto_sub", "-h", host, "-p", str(port), "-i", cid, "-t", t, "-E"])  # clean session: drop it


def test_mosquitto_pub_will_via_paho(clients, target):
    """A will from a paho client delivered to mosquitto_sub."""
    t = uid("iwill")
    s = Sub(target, ["-V", "mqttv311", "-t", t, "-C", "1"])
    w = clients(version=V5, will={"topic": t, "payload": b"cli-will", "qos": 1}).connect()
    w.abort()  # connect() returned on CONNACK: the broker holds the will
    assert s.wait() == 0, s.lines
    assert s.payloads("cli-will") == ["cli-will"]
