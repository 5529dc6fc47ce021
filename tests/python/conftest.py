"""Fixtures for the jetmq whole-system tests.

Targets (env ``JETMQ_TEST_TARGET``):
  * ``jetmq`` (default): a jetmq-broker over a single JetStream NATS node
  * ``mosquitto``: mosquitto, to validate the protocol tests themselves

Markers:
  * ``cluster``    - needs 3 jetmq nodes over a 3-node NATS cluster (jetmq only; with
                     JETMQ_TEST_EMULATE_CLUSTER=1 on mosquitto they run against 3 TCP proxies in front
                     of one mosquitto, to validate the tests' own logic)
  * ``needs_nats`` - exercises NATS itself (never emulated)
  * ``slow``       - takes more than a few seconds
  * ``jetmq_only(reason)`` - behaviour mosquitto cannot be configured for; skipped on mosquitto
  * ``mosquitto_differs(reason)`` - mosquitto legitimately behaves differently; skipped on mosquitto
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402
from mqtt_client import Target, Tracker  # noqa: E402

TARGET = os.environ.get("JETMQ_TEST_TARGET", "jetmq").strip().lower()
if TARGET not in ("jetmq", "mosquitto"):
    raise pytest.UsageError(f"JETMQ_TEST_TARGET must be 'jetmq' or 'mosquitto', not {TARGET!r}")
# Validate the cluster tests' own logic: with JETMQ_TEST_TARGET=mosquitto, the 3 "nodes" are TCP
# proxies in front of one mosquitto (killing a node = killing its proxy). Not a test of anything real.
EMULATE_CLUSTER = TARGET == "mosquitto" and os.environ.get("JETMQ_TEST_EMULATE_CLUSTER") == "1"

# The limits every single-node target is configured with. Tests read these (or the v5 CONNACK).
LIMITS = {
    "max_packet_size": 262144,
    "receive_maximum": 20,
    "max_inflight": 32,
    "max_queued_messages": 1000,
    "max_topic_levels": 32,
    "max_keepalive": 100,
    "max_session_expiry": 604800,
    "connect_timeout_ms": 3000,
    "topic_alias_maximum": 10,
}

# ACL used by test_acl.py (jetmq only): everything allowed except these.
ACL = {
    "default": "allow",
    "rules": [
        {"permission": "deny", "action": "publish", "filter": "acl/deny-pub/#"},
        {"permission": "deny", "action": "subscribe", "filter": "acl/deny-sub/#"},
        {"permission": "deny", "action": "all", "filter": "acl/deny-all/#"},
        {"permission": "deny", "action": "publish", "filter": "acl/by-client/#", "client_id": "acl-blocked-client"},
        {"permission": "deny", "action": "subscribe", "filter": "acl/by-user/#", "username": "mallory"},
    ],
}


# Teardown SIGTERMs the brokers: a short drain keeps that well inside harness.terminate()'s wait.
DRAIN = {"duration_ms": 1000, "waves": 2, "timeout_ms": 8000}


def broker_config(limits: dict | None = None, acl: dict | None = None) -> dict:
    return {"limits": dict(limits or LIMITS), "acl": dict(acl or ACL), "drain": dict(DRAIN)}


def mosquitto_conf(limits: dict | None = None) -> list[str]:
    lim = limits or LIMITS
    return [
        f"max_packet_size {lim['max_packet_size']}",
        f"max_keepalive {lim['max_keepalive']}",
        f"max_inflight_messages {lim['max_inflight']}",
        f"max_queued_messages {lim['max_queued_messages']}",
        f"max_topic_alias {lim['topic_alias_maximum']}",
    ]


# ----------------------------------------------------------------------------- pytest hooks


def pytest_configure(config):
    for line in (
        "cluster: needs a 3-node jetmq cluster over a 3-node NATS cluster (jetmq only)",
        "slow: takes more than a few seconds",
        "jetmq_only(reason): jetmq-specific behaviour; skipped against mosquitto",
        "mosquitto_differs(reason): mosquitto legitimately behaves differently; skipped against mosquitto",
        "infra: checks the test harness itself (runs against any target)",
        "needs_nats: a cluster test that exercises NATS itself (not emulated on mosquitto)",
    ):
        config.addinivalue_line("markers", line)


def pytest_report_header(config):
    where = harness.broker_bin() if TARGET == "jetmq" else harness.mosquitto_bin()
    return [f"jetmq test target: {TARGET} ({where})" + (" + emulated cluster" if EMULATE_CLUSTER else "")]


def pytest_collection_modifyitems(config, items):
    if TARGET == "jetmq":
        return
    for item in items:
        if item.get_closest_marker("cluster"):
            if not EMULATE_CLUSTER:
                item.add_marker(pytest.mark.skip(reason="cluster test: needs jetmq (JETMQ_TEST_TARGET=jetmq)"))
                continue
            if item.get_closest_marker("needs_nats"):
                item.add_marker(pytest.mark.skip(reason="emulated cluster has no NATS"))
                continue
        for name in ("jetmq_only", "mosquitto_differs"):
            m = item.get_closest_marker(name)
            if m:
                reason = m.args[0] if m.args else m.kwargs.get("reason", name)
                item.add_marker(pytest.mark.skip(reason=f"{TARGET}: {reason}"))
                break


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        procs = harness.live_processes()
        # broker logs first: they are what a failing test usually needs
        procs.sort(key=lambda p: (p.kind != "jetmq", p.kind != "mosquitto", p.name))
        for p in procs[:8]:
            lines = 60 if p.kind in ("jetmq", "mosquitto") else 10
            report.sections.append((f"log tail {p.name} (pid {p.pid}) {p.log_path}", p.log_tail(lines)))
    return report


# ----------------------------------------------------------------------------- infrastructure


def _require_broker_binary():
    problem = harness.broker_bin_problem()
    if problem:
        pytest.fail(problem, pytrace=False)


def _check_not_crashed(proc):
    if proc.crashed():
        pytest.fail(f"{proc.name} crashed during the tests (exit {proc.proc.returncode}):\n{proc.log_tail(80)}",
                    pytrace=False)


@pytest.fixture(scope="module")
def nats(tmp_path_factory):
    """A single-node JetStream NATS server (fresh per test module)."""
    n = harness.NatsServer(tmp_path_factory.mktemp("nats"))
    n.start()
    yield n
    n.terminate()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    """A 3-node JetStream NATS cluster on 127.0.0.11/.12/.13 (fresh per test module)."""
    c = harness.NatsCluster(tmp_path_factory.mktemp("natscluster"), n=3)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, request):
    """One jetmq-broker over a single NATS node, configured with LIMITS and ACL."""
    _require_broker_binary()
    nats = request.getfixturevalue("nats")
    b = harness.BrokerNode(tmp_path_factory.mktemp("jetmq"), [nats.url], node_id="b1", config=broker_config())
    b.start()
    yield b
    crashed = b.crashed()
    b.terminate()
    if crashed:
        pytest.fail(f"jetmq-broker crashed during the module (exit {b.proc.returncode}):\n{b.log_tail(80)}",
                    pytrace=False)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    m = harness.Mosquitto(tmp_path_factory.mktemp("mosquitto"), extra=mosquitto_conf())
    m.start()
    yield m
    m.terminate()


@pytest.fixture(scope="module")
def mqtt_target(request) -> Target:
    """(host, port) of the single-node broker under test, chosen by JETMQ_TEST_TARGET."""
    if TARGET == "mosquitto":
        m = request.getfixturevalue("mosquitto")
        return Target(m.host, m.port, "mosquitto", dict(LIMITS), m)
    b = request.getfixturevalue("broker")
    return Target(b.host, b.port, "jetmq", dict(LIMITS), b)


@pytest.fixture
def target(mqtt_target):
    """Per-test view of mqtt_target that fails the test if the broker process died."""
    yield mqtt_target
    if mqtt_target.process is not None:
        _check_not_crashed(mqtt_target.process)


@pytest.fixture
def clients(target):
    """Factory for clients that are closed after the test: ``clients.connect(version=5)``."""
    t = Tracker(target)
    yield t
    t.close_all()


@pytest.fixture(params=[4, 5], ids=["v311", "v5"])
def version(request) -> int:
    """Run a test for MQTT 3.1.1 (4) and 5.0 (5)."""
    return request.param


@pytest.fixture
def fresh_nats(tmp_path):
    """A nats-server of the test's own (JetStream, nothing else on it), for tests that look at
    what jetmq stores."""
    n = harness.NatsServer(tmp_path)
    n.start()
    yield n
    n.terminate()


@pytest.fixture
def broker_factory(tmp_path_factory, request):
    """Start extra jetmq nodes with custom config/env: ``broker_factory(config=..., extra_env=...)``."""
    _require_broker_binary()
    started = []

    def make(nats_urls=None, config=None, extra_env=None, node_id=None, host="127.0.0.1") -> harness.BrokerNode:
        urls = nats_urls or [request.getfixturevalue("nats").url]
        b = harness.BrokerNode(tmp_path_factory.mktemp("jetmq-extra"), urls, node_id=node_id or f"x{len(started) + 1}",
                               host=host, config=broker_config() if config is None else (config or None), extra_env=extra_env)
        started.append(b)
        b.start()
        return b

    yield make
    for b in started:
        b.terminate()


def _targets(nodes) -> list[Target]:
    return [Target(b.host, b.port, "jetmq", dict(LIMITS), b) for b in nodes]


def _emulated_nodes(workdir, mosq) -> list:
    nodes = []
    try:
        for i, host in enumerate(harness.NODE_HOSTS):
            p = harness.TcpProxy(workdir, mosq.address, host=host, name=f"proxy-b{i + 1}")
            nodes.append(p)
            p.start()
    except BaseException:
        for p in nodes:
            p.terminate()
        raise
    return nodes


def _emulated_targets(nodes) -> list[Target]:
    return [Target(p.host, p.port, "mosquitto", dict(LIMITS), p) for p in nodes]


@pytest.fixture(scope="module")
def brokers3(tmp_path_factory, request) -> list[Target]:
    """3 jetmq nodes on 127.0.0.11/.12/.13 over the 3-node NATS cluster (module scope)."""
    if EMULATE_CLUSTER:
        d = tmp_path_factory.mktemp("emul3")
        mosq = harness.Mosquitto(d, extra=mosquitto_conf())
        mosq.start()
        nodes = _emulated_nodes(d, mosq)
        yield _emulated_targets(nodes)
        for p in nodes:
            p.terminate()
        mosq.terminate()
        return
    _require_broker_binary()
    cluster = request.getfixturevalue("nats_cluster")
    nodes = harness.start_broker_cluster(tmp_path_factory.mktemp("jetmq3"), cluster, config=broker_config())
    yield _targets(nodes)
    crashed = [b for b in nodes if b.crashed()]
    for b in nodes:
        b.terminate()
    if crashed:
        pytest.fail("jetmq node(s) crashed: " + "; ".join(f"{b.name}:\n{b.log_tail(40)}" for b in crashed),
                    pytrace=False)


@pytest.fixture
def fresh_cluster(tmp_path_factory):
    """Function-scoped 3 NATS + 3 jetmq nodes, for tests that kill things.

    Yields (nats_cluster, broker_nodes, targets).
    """
    yield from _fresh_cluster(tmp_path_factory)


@pytest.fixture
def fresh_cluster_batching(tmp_path_factory):
    """fresh_cluster whose brokers publish every QoS 1 message in batches, whatever the load
    (nats.batch_publish_after = 0), so that failures hit the batch path."""
    yield from _fresh_cluster(tmp_path_factory, extra_env={"JETMQ_NATS__BATCH_PUBLISH_AFTER": "0"})


def _fresh_cluster(tmp_path_factory, extra_env=None):
    d = tmp_path_factory.mktemp("fresh")
    if EMULATE_CLUSTER:
        mosq = harness.Mosquitto(d, extra=mosquitto_conf())
        mosq.start()
        nodes = _emulated_nodes(d, mosq)
        try:
            yield None, nodes, _emulated_targets(nodes)
        finally:
            for p in nodes:
                p.terminate()
            mosq.terminate()
        return
    _require_broker_binary()
    cluster = harness.NatsCluster(d, n=3)
    cluster.start()
    nodes = []
    try:
        nodes = harness.start_broker_cluster(d, cluster, config=broker_config(), extra_env=extra_env)
        yield cluster, nodes, _targets(nodes)
    finally:
        for b in nodes:
            b.terminate()
        cluster.stop()
