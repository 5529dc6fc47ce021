"""JWT required claims, JWT-shaped passwords, per-source-address connection limits
(jetmq only; issue 15, finding 3 and the per-IP limits).

Per-address tests connect from other loopback addresses (127.0.0.2, ...) to the broker on
127.0.0.1: Linux routes all of 127.0.0.0/8 to lo, so the broker sees distinct peers.
"""

from __future__ import annotations

import socket
import subprocess
import time
from types import SimpleNamespace

import pytest

import certs
import harness
import mqtt_raw as R
import prom
from conftest import LIMITS
from mqtt_client import V5, V311, uid

pytestmark = pytest.mark.jetmq_only("authentication and connection limits are jetmq configuration")

HOST = "127.0.0.1"
JWT_SECRET = b"jetmq-edge-test-secret-0123456789abcdef"
AUDIENCE, ISSUER = "jetmq", "https://issuer.test"
DOTTED = "correct.horse.battery"
OK = 0
BAD_CREDENTIALS = {V5: 0x86, V311: 4}
QUOTA_EXCEEDED = {V5: 0x97, V311: 3}
RATE_EXCEEDED = {V5: 0x9F, V311: 3}


def toml_str(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def hash_password(password: str) -> str:
    r = subprocess.run([str(harness.broker_bin()), "hash-password"], input=password + "\n",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def start_broker(workdir, nats_url: str, toml: str, node_id: str, extra_env=None) -> harness.BrokerNode:
    b = harness.BrokerNode(workdir, [nats_url], node_id=node_id, extra_env=extra_env)
    b.config_path = b.workdir / "jetmq.toml"
    b.config_path.write_text(toml)
    b.start()
    return b


def attempt(port: int, version: int, username: str | None, password: str) -> int:
    with R.RawClient(HOST, port, version=version) as r:
        return r.connect(uid("auth"), version=version, username=username, password=password.encode()).reason


# ----------------------------------------------------------------------------- JWT


@pytest.fixture(scope="module")
def jwt_node(tmp_path_factory, nats):
    """allow_anonymous = false; user alice whose password looks like a JWT; JWT with a
    required audience and issuer; password_as_token left at its default."""
    d = tmp_path_factory.mktemp("jwt-edge")
    toml = f"""
[auth]
allow_anonymous = false

[[auth.users]]
username = "alice"
password_hash = {toml_str(hash_password(DOTTED))}

[auth.jwt]
algorithm = "HS256"
secret = {toml_str(JWT_SECRET.decode())}
audience = "{AUDIENCE}"
issuer = "{ISSUER}"
"""
    b = start_broker(d, nats.url, toml, "jwt-edge")
    yield SimpleNamespace(broker=b, dir=d, toml=toml)
    b.terminate()


def token(**claims) -> str:
    full = {"sub": "dev-1", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 300}
    full.update(claims)
    return certs.hs256_jwt({k: v for k, v in full.items() if v is not None}, JWT_SECRET)


@pytest.mark.parametrize("missing", ["aud", "iss"])
def test_jwt_without_configured_claims_is_refused(jwt_node, version, missing):
    port = jwt_node.broker.port
    assert attempt(port, version, "u", token()) == OK, "the complete token logs in"
    assert attempt(port, version, "u", token(**{missing: None})) == BAD_CREDENTIALS[version]


def test_dotted_password_of_a_configured_user(jwt_node, version):
    port = jwt_node.broker.port
    assert attempt(port, version, "alice", DOTTED) == OK
    assert attempt(port, version, "alice", "wrong.pass.word") == BAD_CREDENTIALS[version]
    # A token under alice's name is her (wrong) password; under any other name it is a token.
    assert attempt(port, version, "alice", token()) == BAD_CREDENTIALS[version]
    assert attempt(port, version, "someone", token()) == OK


def test_password_as_token_always(jwt_node, tmp_path, nats):
    """The switch back to "every JWT-shaped password is a token": alice's dotted password
    is then checked as a (malformed) token and refused; a token under her name logs in."""
    b = start_broker(tmp_path, nats.url, jwt_node.toml, "jwt-always",
                     extra_env={"JETMQ_AUTH__JWT__PASSWORD_AS_TOKEN": "always"})
    try:
        assert attempt(b.port, V5, "alice", DOTTED) == 0x86
        assert attempt(b.port, V5, "alice", token()) == OK
    finally:
        b.terminate()


# ----------------------------------------------------------------------------- per-IP limits


class FromAddress(R.RawClient):
    """mqtt_raw.RawClient whose socket is bound to ``source`` (a loopback address)."""

    def __init__(self, port: int, source: str, version: int = V5, timeout: float = 5.0):
        self.version = version
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.closed = False
        self._next_id = 0


def outcome(port: int, source: str, version: int = V5, keep: list | None = None) -> int | None:
    """CONNACK reason code of a CONNECT from ``source``; None if the socket was just closed.
    Accepted connections are kept open in ``keep`` (closed otherwise)."""
    r = FromAddress(port, source, version)
    try:
        r.send(R.connect(uid("ip"), version=version))
        ack = r.expect(R.CONNACK, 5)
    except (R.Closed, ConnectionError, OSError):
        r.close()
        return None
    if ack.reason == 0 and keep is not None:
        keep.append(r)
    else:
        r.close()
    return ack.reason


@pytest.fixture
def kept():
    out: list = []
    yield out
    for r in out:
        r.close()


def refused_count(b: harness.BrokerNode) -> float:
    return prom.node_metrics(b).value("jetmq_connections_refused_per_ip_total")


def test_connections_per_ip_limit(broker_factory, kept):
    b = broker_factory(config={"limits": dict(LIMITS, max_connections_per_ip=3)})
    for _ in range(3):
        assert outcome(b.port, "127.0.0.2", keep=kept) == OK
    assert outcome(b.port, "127.0.0.2", V5) == QUOTA_EXCEEDED[V5]
    assert outcome(b.port, "127.0.0.2", V311) == QUOTA_EXCEEDED[V311]
    # Other addresses are not affected.
    assert outcome(b.port, "127.0.0.3", keep=kept) == OK
    assert outcome(b.port, HOST, keep=kept) == OK
    assert refused_count(b) == 2
    # A closed connection gives its place back.
    kept.pop(0).close()
    harness.wait_until(lambda: outcome(b.port, "127.0.0.2", keep=kept) == OK, 5,
                       what="a place freed by a closed connection")
    assert outcome(b.port, "127.0.0.2") == QUOTA_EXCEEDED[V5]
    assert b.alive()


def test_connect_rate_per_ip_limit(broker_factory):
    b = broker_factory(config={"limits": dict(LIMITS, max_connect_rate_per_ip=5)})
    t0 = time.monotonic()
    outcomes = [outcome(b.port, "127.0.0.4", V5 if i % 2 else V311) for i in range(20)]
    elapsed = time.monotonic() - t0
    accepted = outcomes.count(OK)
    # A burst of 5, then 5 per second.
    assert 5 <= accepted <= 5 + 5 * elapsed + 1, (elapsed, outcomes)
    refused = [(i, o) for i, o in enumerate(outcomes) if o != OK]
    assert refused, outcomes
    for i, o in refused:
        assert o == RATE_EXCEEDED[V5 if i % 2 else V311], outcomes
    # Meanwhile another address connects at once.
    assert outcome(b.port, "127.0.0.5") == OK
    assert refused_count(b) >= len(refused)
    time.sleep(1.2)  # the rate limit refills with time: 5 more CONNECTs a second
    assert outcome(b.port, "127.0.0.4") == OK
