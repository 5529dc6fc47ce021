"""The deployment files (Dockerfile, compose/, nats-config/compose, nats-config/vps) checked
without a Docker engine: a real compose parser, the real binaries, a real nats-server, and a
real /metrics scrape of a running broker and ingestor.

What a compose parser cannot see is checked here: referenced files exist, the flags given to
jetmq-broker / jetmq-ingestor / nats-server are accepted by the real programs, Prometheus
scrapes the services and ports that serve /metrics, the DNS zone lists the brokers, and every
metric the Grafana dashboard and the alert rules use is really served. No image is built and
no container runs here (no engine): see compose/README.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

import harness
from prom import node_metrics, scrape

ROOT = harness.REPO_ROOT
COMPOSE = ROOT / "compose"
STACK = COMPOSE / "docker-compose.yml"
NODE = COMPOSE / "node.yml"
NODE_ENV = COMPOSE / "node.env.example"

pytestmark = pytest.mark.jetmq_only("checks jetmq's own deployment files and binaries")


def compose_bin() -> str:
    """Debian's docker-compose 1.29 (scripts/install-deps), or $JETMQ_COMPOSE_BIN."""
    path = os.environ.get("JETMQ_COMPOSE_BIN") or shutil.which("docker-compose")
    if not path:
        pytest.fail("docker-compose is missing: run scripts/install-deps (apt-get install docker-compose)",
                    pytrace=False)
    return path


def ingestor_bin() -> Path:
    env = os.environ.get("JETMQ_INGESTOR_BIN")
    return Path(env) if env else harness.broker_bin().parent / "jetmq-ingestor"


def venv_tool(name: str) -> str:
    path = harness._venv_bin(name) or shutil.which(name)
    if not path:
        pytest.fail(f"{name} is missing: run scripts/install-deps", pytrace=False)
    return str(path)


def run(argv, env=None, timeout=60, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd, stdin=subprocess.DEVNULL)


# What an operator puts in compose/.env (compose/.env.example): the stack has no default secrets.
STACK_SECRETS = {"MQTT_USERNAME": "demo", "MQTT_PASSWORD": "stack-test-password",
                 "GRAFANA_ADMIN_PASSWORD": "grafana-test-password"}


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict:
    r = run([compose_bin(), *args, "config"], cwd=COMPOSE,
            env={**{k: v for k, v in os.environ.items() if k not in STACK_SECRETS}, **(env or {})})
    assert r.returncode == 0, f"docker-compose {' '.join(args)} config failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


@pytest.fixture(scope="module")
def stack() -> dict:
    return compose_config("-f", str(STACK), env=STACK_SECRETS)


@pytest.fixture(scope="module")
def node() -> dict:
    return compose_config("-f", str(NODE), "--env-file", str(NODE_ENV), "--profile", "ingestor")


def services_running(cfg: dict, program: str) -> dict[str, list[str]]:
    return {name: svc["command"] for name, svc in cfg["services"].items()
            if isinstance(svc.get("command"), list) and svc["command"] and svc["command"][0] == program}


def flag(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(command):
            return command[i + 1]
    return None


def binds(svc: dict) -> list[tuple[str, str]]:
    """(host source, container target) of the service's bind mounts, as `config` prints them."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            if parts[0].startswith("/"):
                out.append((parts[0], parts[1]))
        elif v.get("type") == "bind":
            out.append((v["source"], v["target"]))
    return out


def named_volume_targets(svc: dict) -> list[str]:
    """Container paths of the service's named volumes."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict) and v.get("type") == "volume":
            out.append(v["target"])
        elif isinstance(v, str) and not v.split(":")[0].startswith(("/", ".")):
            out.append(v.split(":")[1])  # short syntax, as docker-compose 1.29 prints it
    return out


def host_path(svc: dict, container_path: str) -> Path | None:
    """The host file behind `container_path`, through the service's bind mounts."""
    best = None
    for source, target in binds(svc):
        if container_path != target and not container_path.startswith(target.rstrip("/") + "/"):
            continue
        if best is None or len(target) > len(best[1]):
            best = (source, target)
    if best is None:
        return None
    return Path(best[0]) / container_path[len(best[1]):].lstrip("/")


# ----------------------------------------------------------------------------- parsing


def test_compose_files_parse_and_name_the_whole_stack(stack, node):
    names = set(stack["services"])
    assert {"nats-1", "nats-2", "nats-3", "broker-1", "broker-2", "broker-3", "ingestor-1", "ingestor-2",
            "kafka", "kafka-topics", "dns", "prometheus", "grafana"} <= names, names
    assert {"nats", "broker", "ingestor"} <= set(node["services"])
    # Every long-running jetmq, NATS and Kafka service has a healthcheck on a health URL.
    for name in ["nats-1", "nats-2", "nats-3", "broker-1", "broker-2", "broker-3", "ingestor-1", "ingestor-2"]:
        test = " ".join(stack["services"][name]["healthcheck"]["test"])
        assert "/readyz" in test or "/healthz" in test, f"{name}: {test}"
    for name in ["nats", "broker", "ingestor"]:
        test = " ".join(node["services"][name]["healthcheck"]["test"])
        assert "/readyz" in test or "/healthz" in test, f"node.yml {name}: {test}"


def test_node_file_refuses_to_start_without_its_environment():
    r = run([compose_bin(), "-f", NODE, "config"], cwd=COMPOSE, env={"PATH": os.environ["PATH"]})
    assert r.returncode != 0
    assert "NODE_NAME must be set" in r.stderr, r.stderr


def test_every_referenced_file_exists(stack, node):
    for label, cfg in (("docker-compose.yml", stack), ("node.yml", node)):
        for name, svc in cfg["services"].items():
            build = svc.get("build")
            if build:
                assert (Path(build["context"]) / build.get("dockerfile", "Dockerfile")).is_file(), f"{label} {name}"
            mounted = [source for source, _ in binds(svc) if source.startswith(str(ROOT))]
            for source in mounted:
                assert Path(source).exists(), f"{label} {name}: missing {source}"
            if name in ("dns", "prometheus", "grafana", "nats-1", "nats", "broker"):
                assert mounted or name == "broker", f"{label} {name}: expected repository files mounted"
            # Config files named on command lines, through the mounts.
            command = svc.get("command") or []
            for opt in ("-c", "-conf", "--config", "--config.file"):
                target = flag(command, opt)
                if target and target.startswith("/"):
                    if any(target.startswith(v.rstrip("/") + "/") for v in named_volume_targets(svc)):
                        continue  # written by another service (mqtt-auth), checked below
                    path = host_path(svc, target)
                    assert path is not None, f"{label} {name}: {target} is not mounted"
                    if str(path).startswith(str(ROOT)):
                        assert path.is_file(), f"{label} {name}: {target} -> {path} missing"
    # Grafana's provisioned dashboard path and Prometheus's rule files, through the mounts.
    grafana = stack["services"]["grafana"]
    assert host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()
    prometheus = stack["services"]["prometheus"]
    prom_cfg = yaml.safe_load((COMPOSE / "prometheus/prometheus.yml").read_text())
    for rule_file in prom_cfg["rule_files"]:
        assert host_path(prometheus, rule_file).is_file(), rule_file
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/jetmq.yml").read_text())
    for p in provider["providers"]:
        assert host_path(grafana, p["options"]["path"] + "/jetmq.json").is_file()


# ----------------------------------------------------------------------------- real binaries


def stack_auth_file(stack: dict, directory: Path) -> Path:
    """Runs the stack's mqtt-auth service script as the container would (the real
    jetmq-broker hash-password), with its volume mapped to ``directory``."""
    svc = stack["services"]["mqtt-auth"]
    # `config` prints the file's `$$` escapes as they are; the container gets `$`.
    script = svc["command"][0].replace("$$", "$").replace("/etc/jetmq/auth", str(directory))
    env = {"PATH": f"{harness.broker_bin().parent}:{os.environ['PATH']}",
           **{k: str(v) for k, v in svc["environment"].items()}}
    r = run([*svc["entrypoint"], script], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return directory / "broker-auth.toml"


def node_broker_config(directory: Path) -> Path:
    """compose/broker.example.toml as an operator fills it in: a real password hash, and the
    TLS files of BROKER_TLS_DIR (made here) instead of /etc/jetmq/tls."""
    import certs
    ca = certs.make_ca(directory, "ca")
    server = certs.make_cert(directory, ca, "server", cn="node1.example.net", sans=["DNS:node1.example.net"])
    (directory / "tls").mkdir()
    shutil.copy(server.cert, directory / "tls/fullchain.pem")
    shutil.copy(server.key, directory / "tls/privkey.pem")
    text = (COMPOSE / "broker.example.toml").read_text()
    text = re.sub(r'password_hash = ".*"', lambda _: f'password_hash = "{hash_of("device-password")}"', text)
    path = directory / "broker.toml"
    path.write_text(text.replace("/etc/jetmq/tls/", f"{directory}/tls/"))
    return path


def hash_of(password: str) -> str:
    r = subprocess.run([str(harness.broker_bin()), "hash-password"], input=password + "\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def seed_files_here(env: dict[str, str], svc: dict, credentials: Path) -> dict[str, str]:
    """The service's JETMQ_NATS__NKEY_SEED_FILE (a path in the container, on the nats-auth
    volume or NATS_AUTH_DIR) -> the same file of a freshly generated credentials directory."""
    seed = env.get("JETMQ_NATS__NKEY_SEED_FILE")
    if seed:
        targets = [v.split(":")[1] if isinstance(v, str) else v.get("target", "") for v in svc.get("volumes", [])]
        assert any(seed.startswith(t) for t in targets if t), f"{seed} is not mounted: {targets}"
        env = {**env, "JETMQ_NATS__NKEY_SEED_FILE": str(credentials / Path(seed).name)}
    return env


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    return harness.generate_nats_auth(tmp_path_factory.mktemp("nats-auth") / "auth")


def test_broker_flags_in_the_compose_files_are_accepted_by_the_broker(stack, node, credentials, tmp_path):
    problem = harness.broker_bin_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    # The files behind --config, as they are on the machine that runs the stack.
    (tmp_path / "stack").mkdir()
    (tmp_path / "node").mkdir()
    configs = {"docker-compose.yml": stack_auth_file(stack, tmp_path / "stack"),
               "node.yml": node_broker_config(tmp_path / "node")}
    seen = 0
    for label, cfg in (("docker-compose.yml", stack), ("node.yml", node)):
        for name, command in services_running(cfg, "jetmq-broker").items():
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")},
                   **{k: str(v) for k, v in (cfg["services"][name].get("environment") or {}).items()}}
            assert flag(command, "--config"), f"{label} {name}: no --config: {command}"
            command = [a if not a.startswith("--config=") else f"--config={configs[label]}" for a in command]
            assert env.get("JETMQ_NATS__NKEY_SEED_FILE", "").endswith("/broker.nk"), f"{label} {name}: no NATS key"
            env = seed_files_here(env, cfg["services"][name], credentials)
            r = run([harness.broker_bin(), *command[1:], "--check-config"], env=env)
            assert r.returncode == 0, f"{label} {name}: {command}\n{r.stdout}{r.stderr}"
            assert f"node_id={flag(command, '--node-id')}" in r.stdout, r.stdout
            seen += 1
    assert seen == 4
    # The check really checks: a flag the broker does not know fails it.
    bad = run([harness.broker_bin(), "--node-id=x", "--no-such-flag", "--check-config"])
    assert bad.returncode != 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")}
    bad = run([harness.broker_bin(), "--node-id=not valid", "--check-config"], env=env)
    assert bad.returncode == 2 and "node_id" in bad.stderr, bad.stderr
    # Files are read too: a TLS listener whose certificate does not exist is refused.
    bad = run([harness.broker_bin(), "--node-id=x", "--check-config"],
              env={**env, "JETMQ_LISTEN__TLS": "127.0.0.1:8883", "JETMQ_TLS__CERT_FILE": "/nonexistent/cert.pem",
                   "JETMQ_TLS__KEY_FILE": "/nonexistent/key.pem"})
    assert bad.returncode == 2, bad.stdout + bad.stderr


def test_ingestor_flags_and_environment_are_accepted_by_the_ingestor(stack, node, credentials):
    ids = []
    for label, cfg in (("docker-compose.yml", stack), ("node.yml", node)):
        for name, command in services_running(cfg, "jetmq-ingestor").items():
            svc_env = {k: str(v) for k, v in (cfg["services"][name].get("environment") or {}).items()}
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")}, **svc_env}
            assert env.get("JETMQ_NATS__NKEY_SEED_FILE", "").endswith("/ingestor.nk"), f"{label} {name}: no NATS key"
            env = seed_files_here(env, cfg["services"][name], credentials)
            r = run([ingestor_bin(), *command[1:], "--print-config"], env=env)
            assert r.returncode == 0, f"{label} {name}: {command}\n{r.stderr}"
            printed = json.loads(r.stdout)
            assert printed["nats"]["stream_replicas"] == 3, f"{label} {name}: R3 on a 3-node cluster"
            assert printed["metrics"]["listen"].endswith(":9464")
            if label == "docker-compose.yml":
                assert printed["kafka"]["bootstrap_servers"] == ["kafka:9092"]
                ids.append(int(flag(command, "--mqtt-id")))
    # One ingestor per share of the NATS mapping the stack loads, ids 1..N.
    assert sorted(ids) == [1, 2]
    generated = run([ingestor_bin(), "mapping", "--ingestors", len(ids)])
    assert generated.returncode == 0, generated.stderr
    for conf_dir in ("compose", "vps"):
        mapping = (ROOT / "nats-config" / conf_dir / "mappings.conf").read_text()
        assert mapping == generated.stdout, f"nats-config/{conf_dir}/mappings.conf is not the generated block"


def test_nats_configs_pass_nats_server_check(stack, tmp_path):
    nats = harness.nats_server_bin()
    # The nats-auth volume (mounted at /etc/nats/auth) beside the config directory.
    auth = stack["services"]["nats-auth"]
    assert "nats-auth" in " ".join(auth["command"]) and "--if-missing" in " ".join(auth["command"])
    harness.generate_nats_auth(tmp_path / "auth", ["nats-1:6222", "nats-2:6222", "nats-3:6222"])
    for name in ("nats-1", "nats-2", "nats-3"):
        svc = stack["services"][name]
        targets = [v.get("target") if isinstance(v, dict) else v.split(":")[1] for v in svc["volumes"]]
        assert "/etc/nats/auth" in targets, svc["volumes"]
        conf_dir = tmp_path / "jetmq"
        shutil.copytree(host_path(svc, flag(svc["command"], "-c")).parent, conf_dir, dirs_exist_ok=True)
        r = run([nats, "-c", conf_dir / "nats.conf", "-t"], env={**os.environ, **svc["environment"]})
        assert r.returncode == 0, f"{name}: {r.stderr}"
    # Without its NATS_NAME the shared file must not silently start a nameless node.
    r = run([nats, "-c", tmp_path / "jetmq" / "nats.conf", "-t"],
            env={k: v for k, v in os.environ.items() if k != "NATS_NAME"})
    assert r.returncode != 0


# ----------------------------------------------------------------------------- wiring


def test_prometheus_scrapes_every_broker_and_ingestor_on_their_metrics_ports(stack):
    prom_cfg = yaml.safe_load((COMPOSE / "prometheus/prometheus.yml").read_text())
    targets = {t for job in prom_cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = set()
    for name, command in services_running(stack, "jetmq-broker").items():
        expected.add(f"{name}:{flag(command, '--http-listen').rsplit(':', 1)[1]}")
    for name, command in services_running(stack, "jetmq-ingestor").items():
        expected.add(f"{name}:{flag(command, '--metrics-listen').rsplit(':', 1)[1]}")
    assert targets == expected
    # Healthchecks probe the port the service really listens on.
    for name in expected:
        host, port = name.split(":")
        assert f"127.0.0.1:{port}/readyz" in " ".join(stack["services"][host]["healthcheck"]["test"])


def test_dns_zone_answers_with_the_three_broker_addresses(stack):
    zone = (COMPOSE / "coredns/jetmq.local.zone").read_text()
    records = re.findall(r"^mqtt\s+IN\s+A\s+(\S+)", zone, re.M)
    brokers = {svc["networks"]["jetmq"]["ipv4_address"] for name, svc in stack["services"].items()
               if name.startswith("broker-")}
    assert len(records) == 3 and set(records) == brokers
    dns = stack["services"]["dns"]
    corefile = host_path(dns, flag(dns["command"], "-conf"))
    assert "file /etc/coredns/jetmq.local.zone" in corefile.read_text()
    assert stack["services"]["mqtt-client"]["dns"] == [dns["networks"]["jetmq"]["ipv4_address"]]
    subnet = stack["networks"]["jetmq"]["ipam"]["config"][0]["subnet"]
    prefix = subnet.rsplit(".", 1)[0] + "."
    for name, svc in stack["services"].items():
        for net in (svc.get("networks") or {}).values():
            if net and net.get("ipv4_address"):
                assert net["ipv4_address"].startswith(prefix), f"{name} outside {subnet}"


def test_kafka_topics_are_the_ingestors_topics(stack):
    script = " ".join(stack["services"]["kafka-topics"]["command"])
    printed = json.loads(run([ingestor_bin(), "--print-config"]).stdout)
    for topic in (printed["routing"]["default_topic"], printed["routing"]["dead_letter_topic"]):
        assert re.search(rf"\b{re.escape(topic)}:\d+", script), topic


# ----------------------------------------------------------------------------- metrics


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bjetmq_[a-z0-9_]+", expr))


@pytest.fixture(scope="module")
def scraped(broker, nats, tmp_path_factory):
    """Sample names of a real broker's and a real ingestor's /metrics."""
    names = node_metrics(broker).names()
    port = harness.free_port()
    log = tmp_path_factory.mktemp("ingestor") / "ingestor.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETMQ_")}
    # No Kafka needed: the metrics endpoint is up before the ingestor needs Kafka or NATS.
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ingestor_bin()), "--mqtt-id", "1", "--nats", nats.url,
                                 "--kafka", f"127.0.0.1:{harness.free_port()}",
                                 "--metrics-listen", f"127.0.0.1:{port}"], stdout=out, stderr=out, env=env)
    try:
        harness.wait_until(lambda: harness.port_open("127.0.0.1", port), timeout=30, what="ingestor metrics")
        names |= scrape(f"http://127.0.0.1:{port}/metrics").names()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return names


def test_dashboard_uses_only_metrics_that_exist(scraped):
    dashboard = json.loads((COMPOSE / "grafana/dashboards/jetmq.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    assert used - scraped == set(), f"dashboard metrics no process serves: {sorted(used - scraped)}"
    # The panels the issue asks for are there.
    joined = " ".join(exprs)
    for needed in ("jetmq_connections", "jetmq_sessions", "jetmq_messages_received_total",
                   "jetmq_messages_sent_total", "jetmq_jetstream_publish_ack_seconds_bucket",
                   "jetmq_ingestor_lag", "jetmq_ingestor_kafka_produce_seconds_bucket",
                   "jetmq_sessions_resumed_total"):
        assert needed in joined, needed
    datasource = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasource["datasources"]}
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} <= uids


def test_alert_rules_use_only_metrics_that_exist(scraped):
    rules = yaml.safe_load((COMPOSE / "prometheus/alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used - scraped == set(), f"alert metrics no process serves: {sorted(used - scraped)}"


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_parses_lints_clean_and_ships_both_binaries(stack):
    import dockerfile

    r = run([venv_tool("hadolint"), ROOT / "Dockerfile"])
    assert r.returncode == 0, r.stdout + r.stderr
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages = [c.value for c in commands if c.cmd == "FROM"]
    assert [s[-1] for s in stages] == ["build", "runtime"]
    copied = [c.value for c in commands if c.cmd == "COPY" and "--from=build" in c.flags]
    assert copied and {"/out/jetmq-broker", "/out/jetmq-ingestor"} <= set(copied[0])
    exposed = {v for c in commands if c.cmd == "EXPOSE" for v in c.value}
    for name, command in {**services_running(stack, "jetmq-broker"), **services_running(stack, "jetmq-ingestor")}.items():
        for opt in ("--listen", "--http-listen", "--metrics-listen"):
            value = flag(command, opt)
            if value:
                assert value.rsplit(":", 1)[1] in exposed, f"{name} {opt} port not EXPOSEd"
        assert stack["services"][name]["build"]["target"] == "runtime"


# ----------------------------------------------------------------------------- VPS routes


def test_vps_nats_nodes_route_over_mutual_tls(tmp_path):
    """nats-config/vps/nats.conf with the command line compose/node.yml builds, certificates
    from compose/route-certs.sh: two real nats-servers (127.0.0.2 and .3 standing in for two
    hosts) form a cluster over TLS, and a route without a certificate is refused."""
    hosts = ["127.0.0.2", "127.0.0.3"]
    certs = tmp_path / "certs"
    r = run(["bash", COMPOSE / "route-certs.sh", certs, *hosts])
    assert r.returncode == 0, r.stderr
    route_port = harness.free_port(hosts[0])
    harness.generate_nats_auth(tmp_path / "auth")  # NATS_AUTH_DIR: the include ../auth/auth.conf
    procs = []
    try:
        for i, host in enumerate(hosts):
            env_file = tmp_path / f"node{i}.env"
            env_file.write_text(
                f"NODE_NAME=vps{i}\nPUBLIC_ADDRESS={host}\nNATS_TLS_DIR={certs / host}\n"
                f"BROKER_CONFIG={tmp_path / 'broker.toml'}\nBROKER_TLS_DIR={tmp_path / 'tls'}\n"
                f"NATS_ROUTES={','.join(f'nats-route://{h}:{route_port}' for h in hosts)}\n")
            cfg = compose_config("-f", str(NODE), "--env-file", str(env_file))
            svc = cfg["services"]["nats"]
            # Container paths -> this machine: the conf file and what it points at.
            conf = host_path(svc, flag(svc["command"], "-c")).read_text()
            work = tmp_path / f"vps{i}"
            work.mkdir()
            for container in re.findall(r'"(/etc/nats/tls/[^"]+)"', conf):
                conf = conf.replace(container, str(host_path(svc, container)))
            monitor = harness.free_port(host)
            conf = conf.replace('"/data/jetstream"', f'"{work / "js"}"').replace("http: 127.0.0.1:8222", f"http: {host}:{monitor}")
            (work / "nats.conf").write_text(conf)
            shutil.copy(ROOT / "nats-config/vps/mappings.conf", work / "mappings.conf")
            args = []
            for a in svc["command"][2:]:
                a = a.replace("--addr=127.0.0.1", f"--addr={host}").replace("--port=4222", f"--port={harness.free_port(host)}")
                a = a.replace("--cluster=nats://0.0.0.0:6222", f"--cluster=nats://{host}:{route_port}")
                a = a.replace(f"{host}:6222", f"{host}:{route_port}")
                args.append(a)
            log = open(work / "log", "wb")
            procs.append((subprocess.Popen([harness.nats_server_bin(), "-c", str(work / "nats.conf"), *args],
                                           stdout=log, stderr=log), host, monitor, work))

        def routed() -> bool:
            return all(harness.http_json(f"http://{h}:{m}/routez")["num_routes"] > 0 for _, h, m, _ in procs)

        try:
            harness.wait_until(routed, timeout=60, what="TLS routes between the two nodes")
        except TimeoutError:
            raise AssertionError("\n".join(harness.tail(w / "log", 30) for *_, w in procs)) from None
        names = {r["remote_name"] for r in harness.http_json(f"http://{hosts[0]}:{procs[0][2]}/routez")["routes"]}
        assert names == {"vps1"}
        # A route dialled without a client certificate is refused.
        run(["openssl", "s_client", "-connect", f"{hosts[0]}:{route_port}", "-CAfile", certs / "ca/ca.pem"],
                timeout=30)
        refused, _ = harness.poll_until(
            lambda: "client didn't provide a certificate" in (procs[0][3] / "log").read_text(), 20, 0.1)
        assert refused, "no refusal of the route without a client certificate logged within 20s:\n" + \
            harness.tail(procs[0][3] / "log", 20)
    finally:
        for p, *_ in procs:
            p.terminate()
        for p, *_ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
