"""Wildcard-safe ACL placeholders (jetmq only; issue 15, finding 2).

An identity pasted into a rule's `%u` / `%c` must never widen the rule. Before the fix,
client id `+` turned `allow clients/%c/#` into `allow clients/+/#` (everyone's tree), and
username `#` / `a/b`, a certificate CN `+` or a JWT claim `#` did the same to
`allow devices/%u/#`. For every carrier, in MQTT 3.1.1 and 5, the attacker here must not
get another user's retained or live messages, nor publish into their tree; the victim's own
access (the positive control) keeps working.

The module's broker listens on TCP and TLS:

    [tls]  client_auth = "optional", username_from_cert = "cn"
    [auth] allow_anonymous = true (usernames are claimed), JWT HS256
    [acl]  default deny; allow all devices/%u/#; allow all clients/%c/#
"""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace
from unittest import mock

import pytest

import certs
import harness
import mqtt_client
from mqtt_client import V5, V311, Client, uid

pytestmark = pytest.mark.jetmq_only("ACL placeholders are jetmq configuration")

HOST = "127.0.0.1"
JWT_SECRET = b"jetmq-acl-test-secret-0123456789abcdef"
SUB_DENIED = {V5: 0x87, V311: 0x80}


def toml_str(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki-acl")
    ca = certs.make_ca(d, "acl-ca")
    return SimpleNamespace(
        ca=ca,
        server=certs.make_cert(d, ca, "server", cn="localhost", sans=["DNS:localhost", "IP:127.0.0.1"]),
        # openssl's -subj needs the backslash; the certificate's CN is a bare "+".
        plus=certs.make_cert(d, ca, "plus", cn="\\+", client=True),
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory, pki, nats):
    d = tmp_path_factory.mktemp("acl-subst")
    tls_port = harness.free_port()
    toml = f"""
[listen]
tls = "{HOST}:{tls_port}"

[tls]
cert_file = {toml_str(pki.server.cert)}
key_file = {toml_str(pki.server.key)}
client_ca_file = {toml_str(pki.ca.cert)}
client_auth = "optional"
username_from_cert = "cn"
reload_interval_secs = 0

[auth]
allow_anonymous = true

[auth.jwt]
algorithm = "HS256"
secret = {toml_str(JWT_SECRET.decode())}

[acl]
default = "deny"

[[acl.rules]]
permission = "allow"
action = "all"
filter = "devices/%u/#"

[[acl.rules]]
permission = "allow"
action = "all"
filter = "clients/%c/#"
"""
    b = harness.BrokerNode(d, [nats.url], node_id="acl-subst")
    b.config_path = b.workdir / "jetmq.toml"
    b.config_path.write_text(toml)
    b.start()
    yield SimpleNamespace(broker=b, tcp=b.port, tls=tls_port)
    crashed = b.crashed()
    b.terminate()
    if crashed:
        pytest.fail(f"broker crashed:\n{b.log_tail(80)}", pytrace=False)


@pytest.fixture
def opened():
    out: list[Client] = []
    yield out
    for c in out:
        c.close_quietly()


@contextlib.contextmanager
def paho_tls(tls: dict):
    original = mqtt_client.paho.Client

    def build(*args, **kwargs):
        c = original(*args, **kwargs)
        c.tls_set(**tls)
        return c

    with mock.patch.object(mqtt_client.paho, "Client", build):
        yield


def client(opened, port: int, version: int, tls: dict | None = None, **kw) -> Client:
    if tls is None:
        c = Client((HOST, port), version=version, **kw)
    else:
        with paho_tls(tls):
            c = Client((HOST, port), version=version, **kw)
    opened.append(c)
    return c


def hs256(sub: str) -> str:
    return certs.hs256_jwt({"sub": sub, "exp": int(time.time()) + 300}, JWT_SECRET)


def assert_cannot_reach(victim: Client, victim_tree: str, target: str, attacker: Client,
                        attack_filters: list[str], version: int) -> None:
    """``victim`` (connected) owns ``victim_tree`` (a filter ending in /#); ``target`` is a
    topic prefix inside it. The attacker (connected) must get neither the retained nor the
    live message there, and its publish there must not arrive."""
    retained, live, cmd = f"{target}/{uid('ret')}", f"{target}/{uid('live')}", f"{target}/{uid('cmd')}"
    # Positive control: the victim's own rule works.
    assert victim.publish(retained, b"victim's retained secret", qos=1, retain=True) == 0
    assert victim.subscribe(victim_tree, qos=1) == [1]
    assert victim.get().payload == b"victim's retained secret"

    codes = attacker.subscribe([(f, 1) for f in attack_filters])
    assert codes == [SUB_DENIED[version]] * len(attack_filters), \
        f"{attacker.client_id!r} was granted {attack_filters} in the victim's tree: {codes}"

    assert victim.publish(live, b"victim's live secret", qos=1) == 0
    assert victim.get().payload == b"victim's live secret"
    attacker.expect_none(1.0)

    rc = attacker.publish(cmd, b"command from the attacker", qos=1)
    # MQTT 5: PUBACK 0x87; 3.1.1 cannot say no, the message is dropped.
    assert rc == (0x87 if version == V5 else 0), rc
    victim.expect_none(1.0)


@pytest.mark.parametrize("attacker_id, attack_filter", [("+", "clients/+/#"), ("#", "clients/#")],
                         ids=["plus", "hash"])
def test_wildcard_client_id_cannot_widen_a_rule(node, opened, version, attacker_id, attack_filter):
    victim_id = uid("victim")
    victim = client(opened, node.tcp, version, client_id=victim_id).connect()
    attacker = client(opened, node.tcp, version, client_id=attacker_id).connect()
    assert_cannot_reach(victim, f"clients/{victim_id}/#", f"clients/{victim_id}", attacker,
                        [attack_filter, f"clients/{victim_id}/#"], version)


@pytest.mark.parametrize("shape", ["plus", "hash", "slash"])
def test_wildcard_username_cannot_widen_a_rule(node, opened, version, shape):
    victim_name = uid("bob")
    if shape == "plus":
        attacker_name, target, filters = "+", f"devices/{victim_name}", ["devices/+/#"]
    elif shape == "hash":
        attacker_name, target, filters = "#", f"devices/{victim_name}", ["devices/#"]
    else:
        # "bob/b" would own devices/bob/b/#, inside bob's tree.
        attacker_name, target = f"{victim_name}/b", f"devices/{victim_name}/b"
        filters = [f"{target}/#"]
    victim = client(opened, node.tcp, version, username=victim_name).connect()
    attacker = client(opened, node.tcp, version, username=attacker_name).connect()
    assert_cannot_reach(victim, f"devices/{victim_name}/#", target, attacker, filters, version)


def test_wildcard_certificate_name_cannot_widen_a_rule(node, pki, opened, version):
    victim_name = uid("dev")
    victim = client(opened, node.tcp, version, username=victim_name).connect()
    tls = {"ca_certs": str(pki.ca.cert), "certfile": str(pki.plus.cert), "keyfile": str(pki.plus.key)}
    # No credentials: the certificate's CN ("+") is the username.
    attacker = client(opened, node.tls, version, tls=tls).connect()
    assert_cannot_reach(victim, f"devices/{victim_name}/#", f"devices/{victim_name}", attacker,
                        ["devices/+/#"], version)


def test_wildcard_jwt_claim_cannot_widen_a_rule(node, opened, version):
    victim_name = uid("dev")
    victim = client(opened, node.tcp, version, username=victim_name).connect()
    # 3.1.1 needs a username to send a password; the token's claim replaces it.
    attacker = client(opened, node.tcp, version, username="ignored", password=hs256("#")).connect()
    assert_cannot_reach(victim, f"devices/{victim_name}/#", f"devices/{victim_name}", attacker,
                        ["devices/#"], version)


def test_wildcard_identity_is_logged_not_refused(node, opened):
    c = client(opened, node.tcp, V5, client_id="+", username="#").connect()
    assert c.connected
    harness.wait_until(lambda: "identity is missing, empty or holds + # / or NUL" in node.broker.log_tail(2000),
                       5, what="the warning about the unusable identity")


def test_safe_identities_still_get_their_own_trees(node, opened, version):
    """The carriers with ordinary names: the JWT claim and the client id give their own
    trees."""
    name = uid("jwt")
    c = client(opened, node.tcp, version, username="ignored", password=hs256(name)).connect()
    own = f"devices/{name}/{uid('x')}"
    assert c.subscribe(own, qos=1) == [1]
    assert c.publish(own, b"mine", qos=1) == 0
    assert c.get().payload == b"mine"
    assert c.subscribe(f"clients/{c.client_id}/x", qos=1) == [1]
    assert c.subscribe("devices/ignored/x", qos=1) == [SUB_DENIED[version]]
