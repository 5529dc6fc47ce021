"""The broker's connection to NATS (jetmq only): TLS with the server's own CA and a client
certificate, user/password, NKEY, token and .creds (operator/JWT) authentication, against
real nats-server processes configured for each.

Start-up policy under test (docs/security.md, "The NATS connection"): wrong credentials or a
failed TLS set-up stop the broker at once with exit code 1 and a log line naming the
[nats] keys to check; only an unreachable server is retried (for 60 s).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

import certs
import harness
import nats_keys
from mqtt_client import V5, Client, uid

pytestmark = pytest.mark.jetmq_only("the broker's NATS connection")

USER, PASSWORD, TOKEN = "jetmq", "nats-password-1", "nats-token-0123456789"


class ConfiguredNats(harness.NatsServer):
    """A nats-server with extra configuration (TLS, authorization, operator mode)."""

    def __init__(self, workdir: Path, extra: str, server_name: str, mapping: str | None = None):
        self.extra = extra
        # its own authorization below, instead of the harness's generated one
        super().__init__(workdir, server_name=server_name, mapping=mapping, auth=False)

    def write_config(self) -> None:
        super().write_config()
        with open(self.config_path, "a") as f:
            f.write(self.extra + "\n")


def toml_path(p) -> str:
    return str(Path(p))


def broker_node(workdir: Path, url: str, nats_conf: dict, node_id: str):
    b = harness.BrokerNode(workdir, [url], node_id=node_id, config={"nats": nats_conf})
    return b


def start_ok(workdir: Path, url: str, nats_conf: dict, node_id: str) -> harness.BrokerNode:
    b = broker_node(workdir, url, nats_conf, node_id)
    b.start(timeout=90)
    return b


def start_fails(workdir: Path, url: str, nats_conf: dict, node_id: str, within: float = 45.0) -> str:
    """Runs a broker that must exit non-zero by itself, quickly; returns its output."""
    b = broker_node(workdir, url, nats_conf, node_id)
    try:
        r = subprocess.run(b.argv(), env=b.env(), cwd=str(b.workdir), capture_output=True, text=True,
                           timeout=within)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"broker did not stop within {within}s on a permanent NATS error:\n{e.stdout}")
    assert r.returncode == 1, f"exit code {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def pubsub_works(b: harness.BrokerNode) -> None:
    t = uid("natssec")
    sub = Client(b.address, version=V5).connect()
    pub = Client(b.address, version=V5).connect()
    try:
        assert sub.subscribe(t, qos=1) == [1]
        assert pub.publish(t, b"through secured NATS", qos=1) == 0
        assert sub.get(15).payload == b"through secured NATS"
    finally:
        sub.close_quietly()
        pub.close_quietly()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("natspki")
    ca = certs.make_ca(d, "nats-ca")
    return SimpleNamespace(
        ca=ca,
        server=certs.make_cert(d, ca, "nats-server", cn="localhost", sans=["DNS:localhost", "IP:127.0.0.1"]),
        client=certs.make_cert(d, ca, "nats-client", cn="jetmq-broker", client=True),
        other_ca=certs.make_ca(d, "other-ca"),
    )


@pytest.fixture(scope="module")
def user_nkey():
    return nats_keys.NKey.generate("user")


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory, pki, user_nkey):
    """TLS required, client certificates verified; users: password and NKEY."""
    extra = f"""
tls {{
  cert_file: "{pki.server.cert}"
  key_file: "{pki.server.key}"
  ca_file: "{pki.ca.cert}"
  verify: true
  timeout: 5
}}
authorization {{
  users: [
    {{user: "{USER}", password: "{PASSWORD}"}}
    {{nkey: "{user_nkey.public_key}"}}
  ]
}}
"""
    n = ConfiguredNats(tmp_path_factory.mktemp("natstls"), extra, "tls1")
    n.start()
    yield n
    n.terminate()


def tls_url(n) -> str:
    return f"tls://127.0.0.1:{n.port}"


def tls_conf(pki, **auth) -> dict:
    return {"tls_required": True, "tls_ca_file": toml_path(pki.ca.cert), "tls_cert_file": toml_path(pki.client.cert),
            "tls_key_file": toml_path(pki.client.key), **auth}


def test_tls_client_certificate_and_password(tmp_path, tls_nats, pki):
    b = start_ok(tmp_path, tls_url(tls_nats), tls_conf(pki, user=USER, password=PASSWORD), "ntls1")
    try:
        pubsub_works(b)
        conns = harness.http_json(f"{tls_nats.monitor_url}/connz?auth=1").get("connections", [])
        mine = [c for c in conns if c.get("name", "").startswith("jetmq-broker/ntls1")]
        assert mine and all(c.get("tls_version") for c in mine), mine
        assert all(c.get("authorized_user") == USER for c in mine), mine
    finally:
        b.terminate()


def test_tls_nkey(tmp_path, tls_nats, pki, user_nkey):
    b = start_ok(tmp_path, tls_url(tls_nats), tls_conf(pki, nkey_seed=user_nkey.seed), "ntls2")
    try:
        pubsub_works(b)
    finally:
        b.terminate()


def test_wrong_nkey_stops_the_broker(tmp_path, tls_nats, pki):
    stranger = nats_keys.NKey.generate("user")
    out = start_fails(tmp_path, tls_url(tls_nats), tls_conf(pki, nkey_seed=stranger.seed), "ntls3")
    assert "authorization violation" in out and "nats.nkey_seed" in out, out


def test_wrong_password_stops_the_broker(tmp_path, tls_nats, pki):
    out = start_fails(tmp_path, tls_url(tls_nats), tls_conf(pki, user=USER, password="wrong"), "ntls4")
    assert "authorization violation" in out and "nats.user/nats.password" in out, out


def test_untrusted_server_certificate_stops_the_broker(tmp_path, tls_nats, pki):
    conf = tls_conf(pki, user=USER, password=PASSWORD)
    conf["tls_ca_file"] = toml_path(pki.other_ca.cert)
    out = start_fails(tmp_path, tls_url(tls_nats), conf, "ntls5")
    assert "TLS towards NATS failed" in out and "nats.tls_ca_file" in out, out


def test_missing_client_certificate_is_refused(tmp_path, tls_nats, pki):
    """The server verifies client certificates: without one the broker never gets in."""
    conf = {"tls_required": True, "tls_ca_file": toml_path(pki.ca.cert), "user": USER, "password": PASSWORD}
    out = start_fails(tmp_path, tls_url(tls_nats), conf, "ntls6")
    assert "TLS towards NATS failed" in out, out


@pytest.fixture(scope="module")
def token_nats(tmp_path_factory):
    n = ConfiguredNats(tmp_path_factory.mktemp("natstoken"), f'authorization {{ token: "{TOKEN}" }}', "tok1")
    n.start()
    yield n
    n.terminate()


def test_token(tmp_path, token_nats):
    b = start_ok(tmp_path, token_nats.url, {"token": TOKEN}, "ntok1")
    try:
        pubsub_works(b)
    finally:
        b.terminate()


def test_wrong_token_stops_the_broker(tmp_path, token_nats):
    out = start_fails(tmp_path, token_nats.url, {"token": "not-the-token"}, "ntok2")
    assert "authorization violation" in out and "nats.token" in out, out


def test_tls_required_against_a_plain_server_stops_the_broker(tmp_path, token_nats, pki):
    out = start_fails(tmp_path, token_nats.url, {"token": TOKEN, "tls_required": True,
                                                 "tls_ca_file": toml_path(pki.ca.cert)}, "ntok3")
    assert "TLS towards NATS failed" in out, out


@pytest.fixture(scope="module")
def operator_nats(tmp_path_factory):
    d = tmp_path_factory.mktemp("natsop")
    setup = nats_keys.operator_setup(d / "keys", mappings={"jetmq.in.>": "jetmq.s.0.>"})
    # Operator mode: the subject mapping lives in the account JWT, not the server config.
    n = ConfiguredNats(d, setup.server_conf, "op1", mapping="")
    n.start()
    yield SimpleNamespace(server=n, setup=setup)
    n.terminate()


def test_creds_file(tmp_path, operator_nats):
    b = start_ok(tmp_path, operator_nats.server.url, {"creds_file": toml_path(operator_nats.setup.creds_path)}, "nop1")
    try:
        pubsub_works(b)
    finally:
        b.terminate()


def test_creds_of_an_unknown_account_stop_the_broker(tmp_path, operator_nats):
    out = start_fails(tmp_path, operator_nats.server.url,
                      {"creds_file": toml_path(operator_nats.setup.stranger_creds_path)}, "nop2")
    assert "authorization violation" in out and "nats.creds_file" in out, out
