"""The harness itself: NATS fixtures really run JetStream with our subject mapping."""

import json
import socket
import time

import pytest

import harness

pytestmark = pytest.mark.infra


def nats_roundtrip(url_host: str, port: int, sub: str, pub: str, payload: bytes = b"hi", timeout: float = 5.0) -> bytes:
    """Speak the NATS text protocol: SUB ``sub``, PUB to ``pub``, return the MSG line received."""
    with socket.create_connection((url_host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        info = f.readline()
        assert info.startswith(b"INFO "), info
        s.sendall(harness.nats_connect_line(url_host, port, info))  # the harness locks NATS
        s.sendall(f"SUB {sub} 1\r\nPING\r\n".encode())
        assert f.readline().strip() == b"PONG"
        s.sendall(f"PUB {pub} {len(payload)}\r\n".encode() + payload + b"\r\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = f.readline()
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                body = f.readline()
                assert body.rstrip(b"\r\n") == payload
                return line.strip()
        raise AssertionError("no MSG received")


def test_free_port_is_bindable():
    for host in ("127.0.0.1",) + harness.NODE_HOSTS:
        p = harness.free_port(host)
        with socket.socket() as s:
            s.bind((host, p))


def test_refuses_non_loopback():
    with pytest.raises(harness.HarnessError):
        harness.free_port("10.0.0.1")


def test_nats_single_node(nats):
    varz = nats.varz()
    assert varz["server_name"] == nats.server_name
    assert varz["port"] == nats.port
    jsz = nats.jsz()
    assert not jsz.get("disabled", False), jsz
    assert jsz["config"]["store_dir"].startswith(str(nats.store_dir))
    status, body = harness.http_get(f"{nats.monitor_url}/healthz")
    assert status == 200, body
    # the jetmq subject mapping is active: jetmq.in.<tokens> lands in share 0
    msg = nats_roundtrip(nats.host, nats.port, "jetmq.s.0.>", "jetmq.in.a.b.c")
    assert msg.split()[1] == b"jetmq.s.0.a.b.c", msg


def broker_connect(node: harness.NatsServer, info: bytes) -> bytes:
    """CONNECT line with the broker's NKEY of the node's (harness-generated) credentials."""
    connect = {"verbose": False}
    if node.auth_dir:
        connect.update(harness.nkey_connect_fields(node.auth_dir / "broker.nk", json.loads(info[5:]).get("nonce", "")))
    return b"CONNECT " + json.dumps(connect).encode() + b"\r\n"


def route_interest(node: harness.NatsServer, remote: str, subject: str) -> bool:
    """Whether ``node`` knows of interest in ``subject`` from ``remote`` over a route."""
    routez = harness.http_json(f"{node.monitor_url}/routez?subs=1")
    return any(r.get("remote_name") == remote and subject in (r.get("subscriptions_list") or [])
               for r in routez["routes"])


def test_nats_cluster(nats_cluster):
    leaders = set()
    for node in nats_cluster.nodes:
        jsz = node.jsz()
        meta = jsz["meta_cluster"]
        assert meta["name"] == "jetmq"
        assert meta["cluster_size"] == 3
        leaders.add(meta["leader"])
        routez = harness.http_json(f"{node.monitor_url}/routez")
        peers = {r.get("remote_name") for r in routez["routes"]}
        assert len(peers - {None}) >= 2 or routez["num_routes"] >= 2, routez
        assert node.varz()["cluster"]["name"] == "jetmq"
    assert len(leaders) == 1 and None not in leaders
    # a message published on one node reaches a subscriber on another node through the mapping
    n1, n3 = nats_cluster.nodes[0], nats_cluster.nodes[2]
    with socket.create_connection((n1.host, n1.port), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(broker_connect(n1, f.readline()) + b'SUB jetmq.s.0.> 1\r\nPING\r\n')
        assert f.readline().strip() == b"PONG"
        harness.wait_until(lambda: route_interest(n3, n1.server_name, "jetmq.s.0.>"), 5, 0.02,
                           f"the subscription on {n1.server_name} to reach {n3.server_name} over the routes")
        with socket.create_connection((n3.host, n3.port), timeout=5) as p:
            pf = p.makefile("rb")
            p.sendall(broker_connect(n3, pf.readline()) + b'PUB jetmq.in.x.y 2\r\nok\r\nPING\r\n')
            assert pf.readline().strip() == b"PONG"
        line = f.readline()
        assert line.split()[1] == b"jetmq.s.0.x.y", line


def test_nats_restart_keeps_jetstream_store(tmp_path):
    n = harness.NatsServer(tmp_path)
    n.start()
    try:
        pid = n.pid
        n.kill9()
        assert not n.alive()
        n.start()
        assert n.pid != pid
        assert n.jsz()["config"]["store_dir"].startswith(str(n.store_dir))
    finally:
        n.terminate()


def test_mosquitto_fixture(tmp_path):
    m = harness.Mosquitto(tmp_path)
    m.start()
    try:
        assert harness.port_open(m.host, m.port)
        assert "listener" in m.config_path.read_text()
    finally:
        m.terminate()
    assert not m.alive()


@pytest.mark.jetmq_only("the jetmq binary is not needed against mosquitto")
def test_broker_binary_contract():
    """The jetmq-broker binary must exist (built by scripts/test) - a missing one FAILS, not skips."""
    problem = harness.broker_bin_problem()
    assert problem is None, problem
