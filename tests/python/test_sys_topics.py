"""Node-local $SYS/broker/... topics (jetmq only) and `jetmq-broker check` against one node.

The node answers a SUBSCRIBE to $SYS/broker/... with its own figures, delivered like
retained messages; see broker/src/sys_topics.rs and docs/dns.md.
"""

import re
import subprocess

import pytest

import harness
from mqtt_client import V5, V311, uid

pytestmark = pytest.mark.jetmq_only("jetmq's $SYS topics and node ids")

NOT_AUTHORIZED = 0x87


def sys_values(client, filt="$SYS/broker/#", n=8, timeout=10.0) -> dict:
    client.subscribe(filt, qos=0)
    msgs = client.expect(n, timeout=timeout)
    assert all(m.retain for m in msgs), "delivered as retained messages"
    assert all(m.topic.startswith("$SYS/broker/") for m in msgs)
    return {m.topic: m.payload.decode() for m in msgs}


def test_sys_topics_describe_the_node(clients, target, version):
    c = clients.connect(version=version)
    c.subscribe(uid("counted"), qos=1)
    v = sys_values(c)
    assert v["$SYS/broker/node_id"] == target.process.node_id
    assert re.fullmatch(r"jetmq-broker \d+\.\d+\.\d+.*", v["$SYS/broker/version"])
    assert re.fullmatch(r"\d+ seconds", v["$SYS/broker/uptime"])
    assert int(v["$SYS/broker/clients/connected"]) >= 1
    assert int(v["$SYS/broker/subscriptions/count"]) >= 1, "the subscription made before counts"
    for key in ("retained messages/count", "messages/received", "messages/sent"):
        assert int(v[f"$SYS/broker/{key}"]) >= 0
    c.expect_none(0.5)


def test_connected_count_follows_clients_on_resubscribe(clients):
    watcher = clients.connect(version=V5)
    before = int(sys_values(watcher, "$SYS/broker/clients/connected", n=1)["$SYS/broker/clients/connected"])
    extra = [clients.connect(version=V311) for _ in range(3)]
    watcher.unsubscribe("$SYS/broker/clients/connected")
    after = int(sys_values(watcher, "$SYS/broker/clients/connected", n=1)["$SYS/broker/clients/connected"])
    assert after == before + 3
    for c in extra:
        c.disconnect()


def test_leading_wildcards_never_match_sys(clients, version):
    c = clients.connect(version=version)
    t = uid("plain")
    assert c.subscribe([("#", 0), ("+/broker/#", 0)]) == [0, 0]
    p = clients.connect(version=version)
    p.publish(t, b"x", qos=1)
    got = c.drain(1.5)
    assert [m.topic for m in got if m.topic == t], "the plain message arrives"
    assert not [m.topic for m in got if m.topic.startswith("$")], [m.topic for m in got]


def test_clients_cannot_publish_into_sys_broker(clients):
    watcher = clients.connect(version=V5)
    node_id = sys_values(watcher, "$SYS/broker/node_id", n=1)["$SYS/broker/node_id"]
    c = clients.connect(version=V5)
    assert c.publish("$SYS/broker/node_id", b"spoofed", qos=1, retain=True) == NOT_AUTHORIZED
    watcher.expect_none(0.5)
    fresh = clients.connect(version=V5)
    assert sys_values(fresh, "$SYS/broker/node_id", n=1)["$SYS/broker/node_id"] == node_id
    fresh.expect_none(0.5)


def test_sys_subscriptions_pass_the_acl(broker_factory, version):
    acl = {"default": "allow", "rules": [{"permission": "deny", "action": "subscribe", "filter": "$SYS/broker/#"}]}
    node = broker_factory(config={"acl": acl})
    from mqtt_client import Target, Tracker

    t = Tracker(Target(node.host, node.port, "jetmq", {}, node))
    try:
        c = t.connect(version=version)
        assert c.subscribe("$SYS/broker/node_id") == [0x80 if version == V311 else NOT_AUTHORIZED]
        c.expect_none(0.5)
    finally:
        t.close_all()


def run_check(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(harness.broker_bin()), "check", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_check_command_reports_one_node(target):
    r = run_check(f"{target.host}:{target.port}")
    assert r.returncode == 0, r.stderr + r.stdout
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:6] == ["ADDRESS", "REACHABLE", "NODE_ID", "VERSION", "CLIENTS", "LATENCY_MS"]
    assert len(lines) == 2, r.stdout
    cols = lines[1].split()
    assert cols[0] == f"{target.host}:{target.port}" and cols[1] == "yes"
    assert cols[2] == target.process.node_id
    assert cols[3] == "jetmq-broker"
    assert int(cols[5]) >= 1, "the check's own connection counts"
    assert float(cols[6]) > 0


def test_check_command_fails_for_an_unreachable_address():
    port = harness.free_port("127.0.0.1")
    r = run_check(f"127.0.0.1:{port}", "--timeout-ms", "3000")
    assert r.returncode == 1, r.stderr + r.stdout
    row = r.stdout.strip().splitlines()[1].split()
    assert row[:2] == [f"127.0.0.1:{port}", "no"]


def test_check_command_rejects_an_unresolvable_name():
    # .invalid never resolves (RFC 6761); the resolver answers from the system configuration.
    r = run_check("no-such-node.invalid:1883", "--timeout-ms", "3000")
    assert r.returncode == 2, r.stderr + r.stdout
    assert "cannot resolve" in r.stderr or "timed out" in r.stderr, r.stderr
