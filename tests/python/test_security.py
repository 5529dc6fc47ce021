"""Transports and security (jetmq only): TLS, mutual TLS, WebSocket, secure WebSocket,
passwords, JWT, certificate reload, CONNECT rate and per-client read limits, slow
handshakes. After every hostile case the node must still serve a legitimate client.

Certificates are made in the test with the openssl command line (tests/python/certs.py).

The module's broker ("secure") listens on TCP, TLS, WS and WSS, with:

    [tls]  client_auth = "optional", username_from_cert = "cn"
    [auth] allow_anonymous = false, user alice, JWT HS256 with audience "jetmq"
    [acl]  allow all private/%u/#, deny all private/#   (default allow)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

import certs
import harness
import mqtt_client
import mqtt_raw as R
from conftest import LIMITS
from mqtt_client import V5, V311, Client, uid

pytestmark = pytest.mark.jetmq_only("TLS, WebSocket, authentication and rate limits are jetmq configuration")

HOST = "127.0.0.1"
PASSWORD = "alice-password"
JWT_SECRET = b"jetmq-test-secret-0123456789abcdef"
BAD_CREDENTIALS = {V5: 0x86, V311: 4}
NOT_AUTHORIZED = {V5: 0x87, V311: 5}


# ----------------------------------------------------------------------------- helpers


def hash_password(password: str) -> str:
    r = subprocess.run([str(harness.broker_bin()), "hash-password"], input=password + "\n",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def toml_str(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def limits_toml(**overrides) -> str:
    lim = dict(LIMITS, **overrides)
    return "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in lim.items())


def start_broker(workdir: Path, nats_url: str, toml: str, node_id: str) -> harness.BrokerNode:
    """A broker with a hand-written TOML file (harness.to_toml has no nested tables). Without
    an [auth] section it lets anonymous clients in, like every harness broker."""
    b = harness.BrokerNode(workdir, [nats_url], node_id=node_id)
    b.config_path = b.workdir / "jetmq.toml"
    if "[auth]" not in toml:
        toml += "\n" + harness.to_toml({"auth": harness.TEST_DEFAULTS["auth"]})
    b.config_path.write_text(toml)
    b.start()
    return b


def now() -> int:
    return int(time.time())


def jwt(sub: str = "jwt-user", aud: str = "jetmq", exp_in: int = 300, secret: bytes = JWT_SECRET, **extra) -> str:
    claims = {"sub": sub, "aud": aud, "exp": now() + exp_in, **extra}
    return certs.hs256_jwt(claims, secret)


@contextlib.contextmanager
def paho_transport(transport: str = "tcp", tls: dict | None = None):
    """Makes mqtt_client.Client build its paho client for ``transport`` / TLS."""
    original = mqtt_client.paho.Client

    def build(*args, **kwargs):
        c = original(*args, transport=transport, **kwargs)
        if transport == "websockets":
            c.ws_set_options(path="/mqtt")
        if tls is not None:
            c.tls_set(**tls)
        return c

    with mock.patch.object(mqtt_client.paho, "Client", build):
        yield


def tls_context(ca: certs.Pair, client_cert: certs.Pair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert.cert), str(client_cert.key))
    return ctx


class TlsRaw(R.RawClient):
    """mqtt_raw.RawClient over TLS (handshake in the constructor)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, version: int = V5, timeout: float = 5.0,
                 rcvbuf: int | None = None):
        super().__init__(HOST, port, version=version, timeout=timeout, rcvbuf=rcvbuf)
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")


def refused_or_closed(r: R.RawClient, packet: bytes, timeout: float = 5.0) -> R.Packet | None:
    """Sends ``packet``; returns the CONNACK if one came, None if the connection just closed/failed."""
    try:
        r.send(packet)
        return r.expect(R.CONNACK, timeout)
    except (R.Closed, ssl.SSLError, ConnectionError, OSError):
        return None


def ws_handshake(port: int, path: str = "/mqtt", protocol: str | None = "mqtt", timeout: float = 5.0):
    """Raw WebSocket upgrade; returns (socket, response head)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in head and time.monotonic() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head.decode(errors="replace")


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (payload < 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def wait_eof(s: socket.socket, timeout: float) -> bool:
    """True if the peer closes ``s`` within ``timeout`` (data before that is discarded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not s.recv(65536):
                return True
        except socket.timeout:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def trickle_until_closed(s: socket.socket, data: bytes, interval: float, limit: float) -> float | None:
    """Sends ``data`` one byte per ``interval``; returns when the server closed the socket."""
    t0 = time.monotonic()
    s.settimeout(interval)
    for byte in data:
        if time.monotonic() - t0 > limit:
            return None
        try:
            s.sendall(bytes([byte]))
            if not s.recv(65536):
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except (ConnectionError, OSError):
            return time.monotonic() - t0
    return None


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(d, "test-ca")
    return SimpleNamespace(
        dir=d,
        ca=ca,
        server=certs.make_cert(d, ca, "server", cn="localhost", sans=["DNS:localhost", "IP:127.0.0.1"]),
        server2=certs.make_cert(d, ca, "server2", cn="localhost", sans=["DNS:localhost", "IP:127.0.0.1"]),
        device=certs.make_cert(d, ca, "device-1", cn="device-1", client=True),
        rogue=certs.make_cert(d, certs.make_ca(d, "rogue-ca"), "rogue", cn="device-1", client=True),
    )


def install_server_cert(pair: certs.Pair, cert_path: Path, key_path: Path) -> None:
    """Replaces the broker's certificate files atomically."""
    for src, dst in ((pair.cert, cert_path), (pair.key, key_path)):
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(Path(src).read_bytes())
        os.replace(tmp, dst)


@pytest.fixture(scope="module")
def secure(tmp_path_factory, pki, nats):
    d = tmp_path_factory.mktemp("secure")
    cert_path, key_path = d / "server.pem", d / "server.key"
    install_server_cert(pki.server, cert_path, key_path)
    ports = {k: harness.free_port() for k in ("tls", "ws", "wss")}
    toml = f"""
[listen]
tls = "{HOST}:{ports['tls']}"
ws = "{HOST}:{ports['ws']}"
wss = "{HOST}:{ports['wss']}"

[tls]
cert_file = {toml_str(cert_path)}
key_file = {toml_str(key_path)}
client_ca_file = {toml_str(pki.ca.cert)}
client_auth = "optional"
username_from_cert = "cn"
reload_interval_secs = 0

{limits_toml()}
[auth]
allow_anonymous = false

[[auth.users]]
username = "alice"
password_hash = {toml_str(hash_password(PASSWORD))}

[auth.jwt]
algorithm = "HS256"
secret = {toml_str(JWT_SECRET.decode())}
audience = "jetmq"
leeway_secs = 0

[acl]
default = "allow"

[[acl.rules]]
permission = "allow"
action = "all"
filter = "private/%u/#"

[[acl.rules]]
permission = "deny"
action = "all"
filter = "private/#"
"""
    b = start_broker(d, nats.url, toml, "sec1")
    yield SimpleNamespace(broker=b, tcp=b.port, cert_path=cert_path, key_path=key_path, **ports)
    crashed = b.crashed()
    b.terminate()
    if crashed:
        pytest.fail(f"secure broker crashed:\n{b.log_tail(80)}", pytrace=False)


@pytest.fixture
def opened():
    """Clients (paho or raw) closed at the end of the test."""
    out: list = []
    yield out
    for c in out:
        try:
            c.close_quietly() if isinstance(c, Client) else c.close()
        except Exception:  # noqa: BLE001
            pass


def client(opened, port: int, version: int = V5, transport: str = "tcp", tls: dict | None = None,
           **kw) -> Client:
    with paho_transport(transport, tls):
        c = Client((HOST, port), version=version, **kw)
    opened.append(c)
    return c


def alice(opened, port: int, version: int = V5, **kw) -> Client:
    return client(opened, port, version, username="alice", password=PASSWORD, **kw)


def assert_serving(secure, opened):
    """A password client on TCP and one on WebSocket still exchange messages."""
    t = uid("alive")
    sub = alice(opened, secure.ws, transport="websockets").connect()
    pub = alice(opened, secure.tcp).connect()
    assert sub.subscribe(t, qos=1) == [1]
    assert pub.publish(t, b"ping", qos=1) == 0
    assert sub.get(10).payload == b"ping"
    assert secure.broker.alive()


@pytest.fixture
def still_serving(secure, opened):
    yield
    assert_serving(secure, opened)


# ----------------------------------------------------------------------------- TLS


def test_tls_password_login_and_pubsub(secure, pki, opened, version, still_serving):
    tls = {"ca_certs": str(pki.ca.cert)}
    t = uid("tls")
    c = alice(opened, secure.tls, version, tls=tls).connect()
    plain = alice(opened, secure.tcp, version).connect()
    assert plain.subscribe(t, qos=1) == [1]
    assert c.subscribe(t, qos=1) == [1]
    c.publish(t, b"over tls", qos=1)
    assert c.get().payload == b"over tls"
    assert plain.get().payload == b"over tls"
    plain.publish(t, b"to tls", qos=1)
    assert c.get().payload == b"to tls"


def test_mtls_certificate_name_is_the_username(secure, pki, opened, version, still_serving):
    """No username or password: the verified certificate's CN (device-1) logs in and the
    ACL's %u sees it."""
    tls = {"ca_certs": str(pki.ca.cert), "certfile": str(pki.device.cert), "keyfile": str(pki.device.key)}
    c = client(opened, secure.tls, version, tls=tls).connect()
    own, other = f"private/device-1/{uid('x')}", f"private/alice/{uid('x')}"
    assert c.subscribe(own, qos=1) == [1]
    assert c.subscribe(other, qos=1) == [0x87 if version == V5 else 0x80]
    if version == V5:
        assert c.publish(own, b"mine", qos=1) == 0
        assert c.get().payload == b"mine"
        assert c.publish(other, b"not mine", qos=1) == 0x87


def test_mtls_certificate_wins_over_claimed_username(secure, pki, opened):
    tls = {"ca_certs": str(pki.ca.cert), "certfile": str(pki.device.cert), "keyfile": str(pki.device.key)}
    c = client(opened, secure.tls, V5, tls=tls, username="alice", password="wrong").connect()
    assert c.publish(f"private/alice/{uid('x')}", b"x", qos=1) == 0x87
    assert c.publish(f"private/device-1/{uid('x')}", b"x", qos=1) == 0


def test_mtls_untrusted_certificate_is_refused(secure, pki, opened, still_serving):
    """A client certificate from another CA fails the handshake: no CONNACK, no session."""
    try:
        r = TlsRaw(secure.tls, tls_context(pki.ca, pki.rogue))
    except (ssl.SSLError, ConnectionError, OSError):
        return  # refused during the handshake (TLS 1.2 style)
    opened.append(r)
    # TLS 1.3: the client finishes first; the server's alert arrives on the next read.
    assert refused_or_closed(r, R.connect(uid("rogue"), version=V5)) is None


def test_tls_without_certificate_needs_credentials(secure, pki, opened, version, still_serving):
    r = TlsRaw(secure.tls, tls_context(pki.ca), version=version)
    opened.append(r)
    ack = r.connect(uid("nocert"), version=version)
    assert ack.reason == NOT_AUTHORIZED[version]
    r2 = TlsRaw(secure.tls, tls_context(pki.ca), version=version)
    opened.append(r2)
    assert r2.connect(uid("pw"), version=version, username="alice", password=PASSWORD.encode()).reason == 0


def test_plaintext_mqtt_on_the_tls_port_is_closed(secure, opened, still_serving):
    r = R.RawClient(HOST, secure.tls, version=V311)
    opened.append(r)
    r.send(R.connect(uid("plain"), version=V311, username="alice", password=PASSWORD.encode()))
    got = r.wait_closed(LIMITS["connect_timeout_ms"] / 1000 + 3)
    assert not any(p.type == R.CONNACK for p in got), got


@pytest.mark.parametrize("qos", [0, 1])
def test_large_messages_reach_a_slow_tls_reader(secure, pki, opened, qos, still_serving):
    """TLS buffers what it encrypts: the tail of a large message must still go out when the
    reader catches up, even though the broker has nothing more to write."""
    t = uid("big")
    r = TlsRaw(secure.tls, tls_context(pki.ca), version=V5, timeout=15, rcvbuf=4096)
    opened.append(r)
    r.mqtt_connect(uid("slowtls"), username="alice", password=PASSWORD.encode())
    r.subscribe([(t, qos)])
    pub = alice(opened, secure.tcp).connect()
    payloads = [bytes([65 + i]) * 200_000 for i in range(3)]
    for p in payloads:
        pub.publish(t, p, qos=1)
    time.sleep(1.0)  # the broker's writes back up meanwhile
    for p in payloads:
        m = r.expect(R.PUBLISH, timeout=15)
        assert m.payload == p
        if qos:
            r.send(R.ack(R.PUBACK, m.packet_id, V5))


def open_connections(b: harness.BrokerNode) -> int:
    _, body = harness.http_get(f"http://{b.host}:{b.http_port}/metrics")
    for line in body.decode().splitlines():
        if line.startswith("jetmq_connections "):
            return int(float(line.split()[1]))
    raise AssertionError("no jetmq_connections metric")


def test_tls_reader_that_never_reads_is_disconnected(tmp_path, pki, nats, opened):
    """A TLS subscriber that stops reading is disconnected at max_write_buffer and its
    connection really ends (closing TLS towards it cannot hang)."""
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    install_server_cert(pki.server, cert_path, key_path)
    port = harness.free_port()
    toml = f"""
[listen]
tls = "{HOST}:{port}"

[tls]
cert_file = {toml_str(cert_path)}
key_file = {toml_str(key_path)}

{limits_toml(max_write_buffer=65536, max_inflight=400, max_queued_messages=1000)}
"""
    # 200 x 50 KB all in flight at once (max_inflight 400) is 10 MB, more than a loopback
    # socket's send buffer ever grows to (tcp_wmem max, 4 MB here): the broker's own write
    # buffer must fill. With the default window of 32 (1.6 MB) the kernel alone could absorb
    # it and the broker would just wait for PUBACKs, which is not what this test is about.
    b = start_broker(tmp_path, nats.url, toml, "sec-stuck")
    try:
        t = uid("stuck")
        r = TlsRaw(port, tls_context(pki.ca), version=V5, timeout=10, rcvbuf=4096)
        opened.append(r)
        r.mqtt_connect(uid("never-reads"))
        r.subscribe([(t, 1)])
        pub = client(opened, b.port).connect()
        assert open_connections(b) == 2
        for i in range(200):  # 10 MB
            pub.publish(t, bytes([i % 256]) * 50_000, qos=1, wait=(i % 20 == 19), timeout=30)
        harness.wait_until(lambda: open_connections(b) == 1, 30, 0.2, "the stuck TLS connection to end")
        assert "client is not reading" in b.log_tail(400)
        t2 = uid("after")
        assert pub.subscribe(t2, qos=1) == [1]
        pub.publish(t2, b"ok", qos=1)
        assert pub.get(10).payload == b"ok"
    finally:
        b.terminate()


@pytest.mark.slow
def test_tls_handshake_slowloris(secure, still_serving):
    """A ClientHello sent one byte every 0.5 s is cut off after the CONNECT timeout."""
    timeout_s = LIMITS["connect_timeout_ms"] / 1000
    s = socket.create_connection((HOST, secure.tls), timeout=5)
    try:
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(600)
        closed_after = trickle_until_closed(s, hello, 0.5, timeout_s + 6)
    finally:
        s.close()
    assert closed_after is not None, "slow TLS handshake still open"
    assert closed_after <= timeout_s + 2, f"closed after {closed_after:.1f}s, timeout is {timeout_s}s"


def test_certificate_reload_on_sighup(secure, pki, opened, still_serving):
    """SIGHUP swaps the certificate for new handshakes; connected TLS clients stay."""
    tls = {"ca_certs": str(pki.ca.cert)}

    def presented() -> str:
        with socket.create_connection((HOST, secure.tls), timeout=5) as raw:
            with tls_context(pki.ca).wrap_socket(raw, server_hostname="localhost") as s:
                return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()

    first, second = certs.fingerprint(pki.server.cert), certs.fingerprint(pki.server2.cert)
    assert presented() == first
    t = uid("reload")
    old = alice(opened, secure.tls, tls=tls).connect()
    assert old.subscribe(t, qos=1) == [1]
    try:
        install_server_cert(pki.server2, secure.cert_path, secure.key_path)
        os.kill(secure.broker.pid, signal.SIGHUP)
        harness.wait_until(lambda: presented() == second, 10, 0.1, "the new certificate")
        assert old.connected, "a TLS client was dropped by the reload"
        old.publish(t, b"after reload", qos=1)
        assert old.get().payload == b"after reload"
        # A broken key is refused; the node keeps the certificate it has.
        secure.key_path.write_text("not a key\n")
        os.kill(secure.broker.pid, signal.SIGHUP)
        harness.wait_until(lambda: "TLS reload failed" in secure.broker.log_tail(200), 10, 0.1, "reload error")
        assert presented() == second
    finally:
        install_server_cert(pki.server, secure.cert_path, secure.key_path)
        os.kill(secure.broker.pid, signal.SIGHUP)
        harness.wait_until(lambda: presented() == first, 10, 0.1, "the original certificate")


def test_certificate_reload_on_file_change(tmp_path, pki, nats, opened):
    """With reload_interval_secs, replaced files are picked up without a signal."""
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    install_server_cert(pki.server, cert_path, key_path)
    port = harness.free_port()
    toml = f"""
[listen]
tls = "{HOST}:{port}"

[tls]
cert_file = {toml_str(cert_path)}
key_file = {toml_str(key_path)}
reload_interval_secs = 1
"""
    b = start_broker(tmp_path, nats.url, toml, "sec-reload")
    try:
        def presented() -> str:
            with socket.create_connection((HOST, port), timeout=5) as raw:
                with tls_context(pki.ca).wrap_socket(raw, server_hostname="localhost") as s:
                    return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()

        assert presented() == certs.fingerprint(pki.server.cert)
        c = client(opened, port, tls={"ca_certs": str(pki.ca.cert)}).connect()
        install_server_cert(pki.server2, cert_path, key_path)
        harness.wait_until(lambda: presented() == certs.fingerprint(pki.server2.cert), 10, 0.2, "file reload")
        t = uid("still")
        assert c.subscribe(t, qos=1) == [1]
        c.publish(t, b"x", qos=1)
        assert c.get().payload == b"x"
    finally:
        b.terminate()


# ----------------------------------------------------------------------------- revocation (CRL)


def mtls_outcome(port: int, ca: certs.Pair, cert: certs.Pair, opened) -> int | None:
    """CONNACK reason for a certificate login over TLS, None if the handshake was refused."""
    try:
        r = TlsRaw(port, tls_context(ca, cert), version=V5)
    except (ssl.SSLError, ConnectionError, OSError):
        return None
    opened.append(r)
    ack = refused_or_closed(r, R.connect(uid("crl"), version=V5))
    return None if ack is None else ack.reason


def test_revoked_client_certificate_is_refused_and_crl_reloads(tmp_path, pki, nats, opened):
    """tls.crl_file: a revoked device certificate fails the handshake; a CRL revoking one more
    device is picked up on SIGHUP; devices not revoked keep logging in, and the node keeps
    serving everyone else."""
    d = tmp_path / "pki"
    revoked = certs.make_cert(d, pki.ca, "revoked-dev", cn="revoked-dev", client=True)
    later = certs.make_cert(d, pki.ca, "later-dev", cn="later-dev", client=True)
    authority = certs.RevocationList(d / "ca-db", pki.ca)
    authority.revoke(revoked)
    crl_path = authority.write(tmp_path / "crl.pem")
    port = harness.free_port()
    toml = f"""
[listen]
tls = "{HOST}:{port}"

[tls]
cert_file = {toml_str(pki.server.cert)}
key_file = {toml_str(pki.server.key)}
client_ca_file = {toml_str(pki.ca.cert)}
client_auth = "required"
crl_file = {toml_str(crl_path)}
username_from_cert = "cn"
reload_interval_secs = 0

[auth]
allow_anonymous = false
"""
    b = start_broker(tmp_path, nats.url, toml, "sec-crl")
    try:
        assert mtls_outcome(port, pki.ca, pki.device, opened) == 0
        assert mtls_outcome(port, pki.ca, revoked, opened) is None, "a revoked certificate got in"
        assert mtls_outcome(port, pki.ca, later, opened) == 0

        authority.revoke(later)
        authority.write(crl_path)
        os.kill(b.pid, signal.SIGHUP)
        harness.wait_until(lambda: "TLS certificates reloaded" in b.log_tail(200), 10, 0.1, "CRL reload")
        assert mtls_outcome(port, pki.ca, later, opened) is None, "revoked after reload, still got in"
        assert mtls_outcome(port, pki.ca, revoked, opened) is None
        assert mtls_outcome(port, pki.ca, pki.device, opened) == 0

        tls = {"ca_certs": str(pki.ca.cert), "certfile": str(pki.device.cert), "keyfile": str(pki.device.key)}
        t = f"devices/{uid('crl')}"
        c = client(opened, port, tls=tls).connect()
        assert c.subscribe(t, qos=1) == [1]
        assert c.publish(t, b"still served", qos=1) == 0
        assert c.get().payload == b"still served"
        assert b.alive()
    finally:
        b.terminate()


# ----------------------------------------------------------------------------- WebSocket


def test_websocket_pubsub(secure, opened, version, still_serving):
    t = uid("ws")
    ws = alice(opened, secure.ws, version, transport="websockets").connect()
    plain = alice(opened, secure.tcp, version).connect()
    assert ws.subscribe(t, qos=1) == [1]
    assert plain.subscribe(t, qos=1) == [1]
    plain.publish(t, b"to ws", qos=1)
    assert ws.get().payload == b"to ws"
    assert ws.publish(t, b"from ws" * 1000, qos=1) == 0  # spans several TCP segments
    assert plain.get().payload == b"to ws"
    assert plain.get().payload == b"from ws" * 1000


def test_secure_websocket_pubsub_and_certificate_login(secure, pki, opened, still_serving):
    t = uid("wss")
    pw = alice(opened, secure.wss, transport="websockets", tls={"ca_certs": str(pki.ca.cert)}).connect()
    tls = {"ca_certs": str(pki.ca.cert), "certfile": str(pki.device.cert), "keyfile": str(pki.device.key)}
    dev = client(opened, secure.wss, transport="websockets", tls=tls).connect()
    own = f"private/device-1/{uid('x')}"
    assert dev.subscribe(own, qos=1) == [1]
    assert pw.subscribe(t, qos=1) == [1]
    assert dev.publish(t, b"hello", qos=1) == 0
    assert pw.get().payload == b"hello"
    assert pw.publish(own, b"denied for alice", qos=1) == 0x87
    assert dev.publish(own, b"own", qos=1) == 0
    assert dev.get().payload == b"own"


def test_large_messages_over_websocket(secure, opened, still_serving):
    t = uid("wsbig")
    ws = alice(opened, secure.ws, transport="websockets").connect()
    assert ws.subscribe(t, qos=1) == [1]
    pub = alice(opened, secure.ws, transport="websockets").connect()
    payloads = [bytes([97 + i]) * 200_000 for i in range(3)]
    for p in payloads:
        assert pub.publish(t, p, qos=1) == 0
    assert [m.payload for m in ws.expect(3, 15)] == payloads


def test_websocket_handshake_answers(secure, still_serving):
    s, head = ws_handshake(secure.ws, "/mqtt", "mqttv3.1, mqtt")
    s.close()
    assert head.startswith("HTTP/1.1 101"), head
    assert "sec-websocket-protocol: mqtt\r\n" in head.lower(), head
    s, head = ws_handshake(secure.ws, "/elsewhere")
    s.close()
    assert head.startswith("HTTP/1.1 404"), head
    s = socket.create_connection((HOST, secure.ws), timeout=5)
    try:
        s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")  # not an upgrade
        head = s.recv(4096)
    except ConnectionError:
        head = b""
    finally:
        s.close()
    assert not head.startswith(b"HTTP/1.1 101"), head


def test_websocket_text_frame_closes_the_connection(secure, still_serving):
    s, head = ws_handshake(secure.ws)
    try:
        assert head.startswith("HTTP/1.1 101"), head
        s.sendall(ws_frame(0x1, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"))
        assert wait_eof(s, 5), "a text message did not close the connection"
    finally:
        s.close()


@pytest.mark.slow
def test_websocket_handshake_slowloris(secure, still_serving):
    timeout_s = LIMITS["connect_timeout_ms"] / 1000
    s = socket.create_connection((HOST, secure.ws), timeout=5)
    try:
        request = b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" + b"X-Padding: " + b"a" * 200
        closed_after = trickle_until_closed(s, request, 0.5, timeout_s + 6)
    finally:
        s.close()
    assert closed_after is not None, "slow WebSocket upgrade still open"
    assert closed_after <= timeout_s + 2, f"closed after {closed_after:.1f}s"


# ----------------------------------------------------------------------------- passwords


@pytest.mark.parametrize("username,password,outcome", [
    ("alice", PASSWORD, "ok"),
    ("alice", "wrong", "bad"),
    ("alice", None, "bad"),
    ("mallory", "anything", "bad"),
    ("mallory", None, "bad"),
    (None, None, "not-authorized"),
], ids=["right", "wrong-password", "no-password", "unknown-user", "unknown-no-password", "anonymous"])
def test_password_outcomes(secure, opened, version, username, password, outcome, still_serving):
    r = R.RawClient(HOST, secure.tcp, version=version)
    opened.append(r)
    ack = r.connect(uid("pw"), version=version, username=username,
                    password=None if password is None else password.encode())
    expected = {"ok": 0, "bad": BAD_CREDENTIALS[version], "not-authorized": NOT_AUTHORIZED[version]}[outcome]
    assert ack.reason == expected, ack
    if outcome != "ok":
        r.wait_closed(5)


def test_password_guessing_does_not_stall_others(secure, opened, still_serving):
    """40 wrong-password CONNECTs at once (each an argon2 run) while a legitimate client works."""
    def guess(i: int) -> int | None:
        """The CONNACK reason code, None if there was none."""
        try:
            with R.RawClient(HOST, secure.tcp, version=V5, timeout=20) as r:
                return r.connect(uid(f"guess{i}"), username="alice", password=f"guess{i}".encode()).reason
        except Exception:  # noqa: BLE001
            return None

    with ThreadPoolExecutor(40) as pool:
        guesses = [pool.submit(guess, i) for i in range(40)]
        t0 = time.monotonic()
        t = uid("busy")
        c = alice(opened, secure.tcp).connect(timeout=20)
        assert c.subscribe(t, qos=1) == [1]
        c.publish(t, b"x", qos=1)
        assert c.get(10).payload == b"x"
        elapsed = time.monotonic() - t0
        results = [f.result(timeout=60) for f in guesses]
    assert results.count(0x86) + results.count(0x89) == 40, results
    assert 0 not in results
    print(f"legitimate client done in {elapsed:.2f}s during the guessing")


def test_hash_password_subcommand():
    h = hash_password("pw")
    assert h.startswith("$argon2id$v=19$"), h
    assert h != hash_password("pw"), "salted"
    r = subprocess.run([str(harness.broker_bin()), "hash-password"], input="", capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0


# ----------------------------------------------------------------------------- JWT


def test_jwt_login_uses_the_claim_as_username(secure, opened, version, still_serving):
    token = jwt(sub="jwt-user")
    # 3.1.1 needs a username to send a password; it is ignored.
    c = client(opened, secure.tcp, version, username="ignored", password=token).connect()
    own, other = f"private/jwt-user/{uid('x')}", f"private/ignored/{uid('x')}"
    assert c.subscribe(own, qos=1) == [1]
    assert c.subscribe(other, qos=1) == [0x87 if version == V5 else 0x80]


def test_jwt_without_username_v5(secure, opened):
    r = R.RawClient(HOST, secure.tcp, version=V5)
    opened.append(r)
    assert r.connect(uid("jwt"), password=jwt().encode()).reason == 0


@pytest.mark.slow
def test_connection_ends_when_its_token_expires(secure, opened, version, still_serving):
    """A client logged in with a JWT valid for 4 more seconds (leeway 0 on this node) works
    until then and is disconnected at expiry: MQTT 5 DISCONNECT 0xA0 (maximum connect
    time), 3.1.1 a closed socket. A client whose token lives longer stays."""
    short = client(opened, secure.tcp, version, username="u", password=jwt(sub="short-lived", exp_in=4),
                   keepalive=60).connect()
    t0 = time.monotonic()
    lasting = client(opened, secure.tcp, version, username="u", password=jwt(sub="long-lived", exp_in=600),
                     keepalive=60).connect()
    t = f"private/short-lived/{uid('exp')}"
    assert short.subscribe(t, qos=1) == [1]
    assert short.publish(t, b"before expiry", qos=1) == 0
    assert short.get().payload == b"before expiry"
    d = short.wait_disconnect(15)
    elapsed = time.monotonic() - t0
    assert 2.5 <= elapsed <= 9, elapsed
    if version == V5:
        assert (d.from_server, d.reason) == (True, 0xA0), d
    assert lasting.connected, "a connection with a valid token was closed too"
    own = f"private/long-lived/{uid('still')}"
    assert lasting.subscribe(own, qos=1) == [1]


@pytest.mark.parametrize("case", ["expired", "wrong-audience", "bad-signature", "no-expiry", "not-yet-valid",
                                  "alg-none"])
def test_jwt_refused(secure, opened, version, case, still_serving):
    if case == "expired":
        token = jwt(exp_in=-60)
    elif case == "wrong-audience":
        token = jwt(aud="someone-else")
    elif case == "bad-signature":
        token = jwt(secret=b"another-secret-0123456789abcdefgh")
    elif case == "no-expiry":
        token = certs.hs256_jwt({"sub": "x", "aud": "jetmq"}, JWT_SECRET)
    elif case == "not-yet-valid":
        token = jwt(nbf=now() + 600, exp_in=1200)
    else:
        header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        token = header + "." + jwt().split(".")[1] + "."
    r = R.RawClient(HOST, secure.tcp, version=version)
    opened.append(r)
    ack = r.connect(uid("jwt"), version=version, username="u", password=token.encode())
    assert ack.reason == BAD_CREDENTIALS[version], (case, ack)


def test_jwt_rs256(tmp_path, nats, opened):
    key, pub = certs.make_rsa_key(tmp_path, "issuer")
    other_key, _ = certs.make_rsa_key(tmp_path, "other")
    toml = f"""
[auth]
allow_anonymous = false

[auth.jwt]
algorithm = "RS256"
public_key_file = {toml_str(pub)}
username_claim = "device"
issuer = "https://issuer.test"
"""
    b = start_broker(tmp_path, nats.url, toml, "sec-rs256")
    try:
        def attempt(token: str) -> int:
            with R.RawClient(HOST, b.port, version=V5) as r:
                return r.connect(uid("rs"), password=token.encode()).reason

        claims = {"device": "d-1", "iss": "https://issuer.test", "exp": now() + 300}
        assert attempt(certs.rs256_jwt(claims, key)) == 0
        assert attempt(certs.rs256_jwt(claims, other_key)) == 0x86
        assert attempt(certs.rs256_jwt(dict(claims, iss="https://evil.test"), key)) == 0x86
        # An HS256 token "signed" with the public key must not pass (algorithm confusion).
        assert attempt(certs.hs256_jwt(claims, Path(pub).read_bytes())) == 0x86
    finally:
        b.terminate()


# ----------------------------------------------------------------------------- rate limits


def test_connect_rate_limit(broker_factory):
    b = broker_factory(config={"limits": dict(LIMITS, max_connect_rate=5)})
    outcomes = []
    t0 = time.monotonic()
    for i in range(30):
        r = R.RawClient(HOST, b.port, version=V5 if i % 2 else V311)
        try:
            ack = refused_or_closed(r, R.connect(uid(f"rate{i}"), version=r.version))
            outcomes.append(None if ack is None else (r.version, ack.reason))
        finally:
            r.close()
    elapsed = time.monotonic() - t0
    accepted = [o for o in outcomes if o is not None and o[1] == 0]
    refused = [o for o in outcomes if o is not None and o[1] != 0]
    # A burst of 5, then 5 per second.
    assert 4 <= len(accepted) <= 5 + 5 * elapsed + 1, (elapsed, outcomes)
    assert refused, outcomes
    for version, reason in refused:
        assert reason == (0x9F if version == V5 else 3), outcomes
    time.sleep(1.2)  # the rate limit refills with time: 5 more CONNECTs a second
    with R.RawClient(HOST, b.port, version=V5) as r:
        assert r.connect(uid("after")).reason == 0


def test_publish_flood_is_slowed_not_dropped(broker_factory, opened):
    """max_publish_rate = 100: a client blasting 2000 QoS 0 PUBLISHes is read at about
    100/s (after a burst of 100); it is not disconnected, and other clients are served."""
    b = broker_factory(config={"limits": dict(LIMITS, max_publish_rate=100)})
    t = uid("flood")
    sub = client(opened, b.port).connect()
    assert sub.subscribe(t, qos=0) == [0]
    flooder = R.RawClient(HOST, b.port, version=V311, timeout=10)
    opened.append(flooder)
    flooder.mqtt_connect(uid("flooder"))
    blob = b"".join(R.publish(t, str(i).encode(), qos=0, version=V311) for i in range(2000))
    sender = threading.Thread(target=flooder.send, args=(blob,), daemon=True)
    t0 = time.monotonic()
    sender.start()
    # Another client on the same node gets through at once.
    other_t = uid("other")
    other = client(opened, b.port).connect()
    assert other.subscribe(other_t, qos=1) == [1]
    other.publish(other_t, b"quick", qos=1)
    assert other.get(5).payload == b"quick"
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))  # a 3 s window to measure the rate over
    got = len(sub.drain(0.2))
    elapsed = time.monotonic() - t0
    # Reads come in chunks of a few kB (up to ~250 of these PUBLISHes), charged after the
    # fact: the burst, the rate, and one chunk.
    assert got <= 100 + 100 * elapsed + 250, f"{got} messages in {elapsed:.1f}s at 100/s"
    assert got >= 100, f"only {got} messages in {elapsed:.1f}s"
    assert flooder.is_open(), "the flooder was disconnected instead of slowed down"


@pytest.mark.slow
def test_inbound_bandwidth_limit(broker_factory, opened):
    """max_inbound_bytes_rate = 20000: a 100 kB PUBLISH takes about 4 s to be read."""
    b = broker_factory(config={"limits": dict(LIMITS, max_inbound_bytes_rate=20000)})
    t = uid("bw")
    c = client(opened, b.port).connect()
    t0 = time.monotonic()
    assert c.publish(t, b"B" * 100_000, qos=1, timeout=30) == 0
    elapsed = time.monotonic() - t0
    assert 3.0 <= elapsed <= 15, f"100 kB at 20 kB/s took {elapsed:.1f}s"
    quick = client(opened, b.port).connect()
    assert quick.publish(uid("q"), b"x", qos=1) == 0


# ----------------------------------------------------------------------------- slow packets after CONNECT


PACKET_READ_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def patient(tmp_path_factory, nats):
    """A node whose packets must each arrive within 3 s (limits.packet_read_timeout_ms)."""
    config = {"limits": dict(LIMITS, packet_read_timeout_ms=PACKET_READ_TIMEOUT_S * 1000)}
    b = harness.BrokerNode(tmp_path_factory.mktemp("patient"), [nats.url], node_id="slow1", config=config)
    b.start()
    yield b
    crashed = b.crashed()
    b.terminate()
    if crashed:
        pytest.fail(f"broker crashed:\n{b.log_tail(80)}", pytrace=False)


class Bystanders:
    """A subscriber and a publisher on the same node, exchanging a message on every check."""

    def __init__(self, port: int, opened):
        self.topic = uid("bystander")
        self.sub = client(opened, port).connect()
        self.pub = client(opened, port).connect()
        assert self.sub.subscribe(self.topic, qos=1) == [1]
        self.n = 0

    def check(self) -> None:
        self.n += 1
        assert self.pub.publish(self.topic, str(self.n).encode(), qos=1) == 0
        assert self.sub.get(10).payload == str(self.n).encode(), "another client was not served meanwhile"


@pytest.mark.slow
def test_trickled_packet_after_connect_is_cut_off(patient, opened, version):
    """A PUBLISH sent one byte per second after a good CONNECT (keep alive 60 s, so keep
    alive would not catch it) is cut off after limits.packet_read_timeout_ms; meanwhile
    other clients on the node are served."""
    others = Bystanders(patient.port, opened)
    r = R.RawClient(HOST, patient.port, version=version, timeout=10)
    opened.append(r)
    r.mqtt_connect(uid("trickle"), keepalive=60, version=version)
    packet = R.publish(uid("t"), b"x" * 64, 0, False, False, None, version, None)
    received: list = []

    def closed() -> bool:
        while True:
            try:
                received.append(r.recv_packet(0.05))
            except R.Closed:
                return True
            except TimeoutError:
                return False

    t0 = time.monotonic()
    closed_at = None
    for byte in packet[:-1]:
        if not r.send(bytes([byte])) or closed():
            closed_at = time.monotonic() - t0
            break
        if time.monotonic() - t0 > PACKET_READ_TIMEOUT_S + 8:
            break
        others.check()
        time.sleep(1.0)  # one byte a second: the trickle this test is about
    assert closed_at is not None, f"trickling client still connected after {time.monotonic() - t0:.1f}s"
    assert PACKET_READ_TIMEOUT_S - 1 <= closed_at <= PACKET_READ_TIMEOUT_S + 4, closed_at
    if version == V5:
        assert [(p.type, p.reason) for p in received] == [(R.DISCONNECT, 0x8D)], received
    else:
        assert received == [], received
    others.check()


@pytest.mark.slow
def test_slow_packets_that_each_arrive_in_time_are_fine(patient, opened):
    """The deadline is per packet: three PUBLISHes, each spread over ~2 s (under the 3 s
    limit) and sent back to back, take longer than the limit together and all get through."""
    t = uid("slowok")
    sub = client(opened, patient.port).connect()
    assert sub.subscribe(t, qos=1) == [1]
    r = R.RawClient(HOST, patient.port, version=V5, timeout=10)
    opened.append(r)
    r.mqtt_connect(uid("slowok"), keepalive=60, version=V5)
    t0 = time.monotonic()
    for i in range(3):
        packet = R.publish(t, f"slow-{i}".encode(), 1, False, False, i + 1, V5, None)
        half = len(packet) // 2
        for part in (packet[:1], packet[1:half], packet[half:]):
            assert r.send(part), "closed while sending"
            time.sleep(0.9)  # each packet spread over ~2 s, under the 3 s limit
        ack = r.expect(R.PUBACK)
        assert ack.packet_id == i + 1
    assert time.monotonic() - t0 > PACKET_READ_TIMEOUT_S + 1
    assert r.is_open()
    assert [sub.get(10).payload for _ in range(3)] == [b"slow-0", b"slow-1", b"slow-2"]
