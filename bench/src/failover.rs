//! Node failure: N persistent-session clients spread over the broker nodes, each subscribed
//! to its own topic and publishing QoS 1 / QoS 2 at a fixed rate to a neighbour's topic; after
//! a warm-up one broker process is killed with SIGKILL. Clients that lose their connection
//! wait about a second and reconnect to another address (round robin, as DNS would hand them
//! out), resume their session (CONNACK session present) and resend what was in flight.
//!
//! Measured: time from the kill until every client is connected again with its session
//! resumed; messages lost (acknowledged with PUBACK / PUBCOMP and never delivered); QoS 2 and
//! QoS 1 duplicates; order violations (a message of a publisher delivered for the first time
//! after a later one of the same publisher and QoS, which MQTT forbids for one topic); a
//! per-second timeline of connected clients and message rates. Of a resume after the kill,
//! the clients' part (kill until the client noticed its connection was gone) and the
//! broker's part (TCP connect of the successful attempt until CONNACK with session present)
//! are reported apart, so a slow detection by the clients is not taken for a slow broker.
//!
//! The process killed may be a broker node, or (with `scripts/bench`'s `failover-stream` and
//! `failover-sessions`) the NATS node leading the message stream or the sessions bucket.
//!
//! Every client keeps its MQTT session state across reconnects the way the specification
//! asks of a client: unacknowledged PUBLISHes are resent with DUP, PUBREL is resent for
//! messages that got PUBREC, and incoming QoS 2 packet ids stay "pending" from PUBREC until
//! PUBREL, so a redelivered QoS 2 PUBLISH is answered but not delivered twice.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use jetmq_codec::{Packet, PubResp, Publish, QoS, ReasonCode};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{Conn, ReadOutcome};
use crate::common::{secs, wait_until, Common, Deadline};
use crate::payload::{self, Header};
use crate::procmon::{Monitor, Watched};
use crate::stats::{stamp, ErrorLog, Recorder, SeqTracker};
use crate::topic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QosMix {
    #[value(name = "1")]
    One,
    #[value(name = "2")]
    Two,
    /// Even sequence numbers QoS 1, odd ones QoS 2.
    #[value(name = "mix")]
    Mix,
}

impl QosMix {
    fn for_seq(self, seq: u64) -> QoS {
        match self {
            QosMix::One => QoS::AtLeastOnce,
            QosMix::Two => QoS::ExactlyOnce,
            QosMix::Mix if seq.is_multiple_of(2) => QoS::AtLeastOnce,
            QosMix::Mix => QoS::ExactlyOnce,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// `--duration` is how long clients keep publishing after the kill.
    #[command(flatten)]
    pub common: Common,
    /// Persistent-session clients (each publishes and subscribes).
    #[arg(long, default_value_t = 3000)]
    pub clients: usize,
    /// Messages per second per client.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// QoS of the publishes: 1, 2 or mix (alternating per message).
    #[arg(long, value_enum, default_value = "mix")]
    pub qos: QosMix,
    /// Publishes in flight per client (unacknowledged).
    #[arg(long, default_value_t = 16)]
    pub window: u16,
    /// Payload size in bytes (at least 24: the header).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Topic of client {i}: it subscribes to its own and publishes to that of client
    /// (i + --peer-offset) mod N, which sits on another node when clients are spread evenly.
    #[arg(long, default_value = "bench/{run}/fo/{i}")]
    pub topic: String,
    #[arg(long, default_value_t = 1)]
    pub peer_offset: usize,
    /// Seconds of publishing before the kill.
    #[arg(long, default_value_t = 15.0)]
    pub warmup: f64,
    /// The process to kill with SIGKILL after the warm-up, as NAME=PID (none: no kill, the
    /// run then only measures steady state).
    #[arg(long)]
    pub kill: Option<Watched>,
    /// The broker address served by the killed process (clients connected there are the ones
    /// expected to fail over); default: none, judged by which connections drop.
    #[arg(long)]
    pub kill_target: Option<SocketAddr>,
    /// Seconds a client waits after losing its connection (or failing to connect) before it
    /// tries the next address.
    #[arg(long, default_value_t = 1.0)]
    pub reconnect_delay: f64,
    /// Up to this many seconds are added at random to each reconnect delay.
    #[arg(long, default_value_t = 0.2)]
    pub reconnect_jitter: f64,
    /// After publishing stops: wait at most this long for acks and deliveries, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub drain: f64,
    /// MQTT 5 session expiry, seconds.
    #[arg(long, default_value_t = 3600)]
    pub session_expiry: u32,
    /// Subscribers hold each QoS 1 PUBACK this many milliseconds (a client that acknowledges
    /// after processing). Keeps QoS 1 deliveries in flight while later QoS 2 ones complete,
    /// the state a broker must persist carefully to resume without QoS 2 duplicates.
    #[arg(long, default_value_t = 0)]
    pub puback_delay_ms: u64,
    /// Print a timeline line per second to stderr.
    #[arg(long)]
    pub progress: bool,
}

impl FailoverArgs {
    /// Default hard limit: connect (at most 120 s), warm-up, the run, drain, and 60 s spare.
    pub fn hard_timeout(&self) -> Duration {
        match self.common.timeout {
            Some(t) => secs(t),
            None => secs(120.0 + self.warmup + self.common.duration + self.drain + 60.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Run,
    Drain,
    Close,
}

/// Counters bucketed by the second since the start of publishing.
struct Timeline {
    received: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
    sent: Vec<AtomicU64>,
    connacks: Vec<AtomicU64>,
    connected_min: Vec<AtomicU64>,
    connected_max: Vec<AtomicU64>,
}

impl Timeline {
    fn new(secs: usize) -> Timeline {
        let v = |init: u64| (0..secs).map(|_| AtomicU64::new(init)).collect();
        Timeline {
            received: v(0),
            acked: v(0),
            sent: v(0),
            connacks: v(0),
            connected_min: v(u64::MAX),
            connected_max: v(0),
        }
    }
}

struct ClientStats {
    /// Sequence numbers of this client's own messages that the broker acknowledged.
    acked: SeqTracker,
    /// Sequence numbers received from this client's publishing neighbour.
    received: SeqTracker,
    dup_qos1: u64,
    dup_qos2: u64,
    foreign: u64,
    /// Highest sequence received so far, per QoS (index 0: QoS 1, 1: QoS 2).
    received_high: [Option<u64>; 2],
    /// First deliveries below `received_high` of their QoS, per QoS.
    order_violations: [u64; 2],
}

struct Shared {
    targets: Vec<SocketAddr>,
    stats: Vec<Mutex<ClientStats>>,
    timeline: Timeline,
    latency: Recorder,
    outage: Recorder,
    /// After the kill: kill until a client noticed that its connection was gone.
    detection: Recorder,
    /// After the kill: the successful reconnect's TCP connect until CONNACK with session
    /// present (the broker's part of a resume).
    resume_connect: Recorder,
    errors: ErrorLog,
    /// DNS-like rotation: every reconnect attempt takes the next address.
    rotation: AtomicUsize,
    connected: AtomicU64,
    setup_done: AtomicU64,
    setup_failed: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    unique_received: AtomicU64,
    received: AtomicU64,
    run_start_ns: AtomicU64,
    kill_ns: AtomicU64,
    /// Clients whose connection dropped after the kill, and how they came back.
    dropped_after_kill: AtomicU64,
    resumed_after_kill: AtomicU64,
    session_lost_after_kill: AtomicU64,
    last_resume_ns: AtomicU64,
    reconnect_attempts: AtomicU64,
    reconnect_failures: AtomicU64,
    disconnects: AtomicU64,
    /// Disconnected clients right now (for "every client back").
    down: AtomicU64,
    down_since_kill: Vec<AtomicBool>,
}

impl Shared {
    fn second(&self, ns: u64) -> Option<usize> {
        let start = self.run_start_ns.load(Ordering::Relaxed);
        if start == 0 || ns < start {
            return None;
        }
        let s = ((ns - start) / 1_000_000_000) as usize;
        (s < self.timeline.received.len()).then_some(s)
    }

    fn bump(&self, series: &[AtomicU64], ns: u64, by: u64) {
        if let Some(s) = self.second(ns) {
            series[s].fetch_add(by, Ordering::Relaxed);
        }
    }

    fn next_target(&self, avoid: &[SocketAddr]) -> SocketAddr {
        let n = self.targets.len();
        for _ in 0..n {
            let k = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
            let t = self.targets[k];
            if !avoid.contains(&t) {
                return t;
            }
        }
        // Every address failed during this outage: start over.
        self.targets[self.rotation.fetch_add(1, Ordering::Relaxed) % n]
    }
}

pub async fn run(args: FailoverArgs, run_id: &str) -> Result<serde_json::Value> {
    let c = &args.common;
    if args.payload < payload::HEADER_LEN {
        bail!("--payload must be at least {}", payload::HEADER_LEN);
    }
    if args.clients == 0 || c.targets.is_empty() {
        bail!("need at least one client and one --target");
    }
    if args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let deadline = Deadline::after(args.hard_timeout());
    let prefix = c
        .client_prefix
        .clone()
        .unwrap_or_else(|| format!("jb-{run_id}"));
    let n = args.clients;
    let timeline_secs = (args.warmup + c.duration + args.drain + 30.0).ceil() as usize;
    let shared = Arc::new(Shared {
        targets: c.targets.clone(),
        stats: (0..n)
            .map(|_| {
                Mutex::new(ClientStats {
                    acked: SeqTracker::default(),
                    received: SeqTracker::default(),
                    dup_qos1: 0,
                    dup_qos2: 0,
                    foreign: 0,
                    received_high: [None; 2],
                    order_violations: [0; 2],
                })
            })
            .collect(),
        timeline: Timeline::new(timeline_secs),
        latency: Recorder::new(16),
        outage: Recorder::new(16),
        detection: Recorder::new(16),
        resume_connect: Recorder::new(16),
        errors: ErrorLog::default(),
        rotation: AtomicUsize::new(0),
        connected: AtomicU64::new(0),
        setup_done: AtomicU64::new(0),
        setup_failed: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        unique_received: AtomicU64::new(0),
        received: AtomicU64::new(0),
        run_start_ns: AtomicU64::new(0),
        kill_ns: AtomicU64::new(0),
        dropped_after_kill: AtomicU64::new(0),
        resumed_after_kill: AtomicU64::new(0),
        session_lost_after_kill: AtomicU64::new(0),
        last_resume_ns: AtomicU64::new(0),
        reconnect_attempts: AtomicU64::new(0),
        reconnect_failures: AtomicU64::new(0),
        disconnects: AtomicU64::new(0),
        down: AtomicU64::new(0),
        down_since_kill: (0..n).map(|_| AtomicBool::new(false)).collect(),
    });

    let monitor = Monitor::start(c.watch.clone());
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut notes: Vec<String> = Vec::new();

    let setup_start = Instant::now();
    for i in 0..n {
        let client = Client::new(i, &args, &prefix, run_id, shared.clone(), phase_rx.clone());
        let sem = sem.clone();
        tasks.spawn(client.run(sem, deadline));
    }
    if !wait_until(deadline.0, || {
        shared.setup_done.load(Ordering::Relaxed) >= n as u64
    })
    .await
    {
        notes.push("hard timeout while connecting".into());
    }
    let setup_secs = setup_start.elapsed().as_secs_f64();
    monitor.mark("connected");

    let run_start = Instant::now();
    shared
        .run_start_ns
        .store(payload::instant_ns(run_start), Ordering::Relaxed);
    let _ = phase_tx.send(Phase::Run);
    let sampler = tokio::spawn(sample_connected(shared.clone(), args.progress));

    // Warm-up, then the kill.
    tokio::time::sleep_until(deadline.cap(run_start + secs(args.warmup)).into()).await;
    let mut killed = None;
    if let Some(victim) = &args.kill {
        monitor.mark("before_kill");
        let kill_at = Instant::now();
        // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
        let rc = unsafe { libc::kill(victim.pid as libc::pid_t, libc::SIGKILL) };
        if rc == 0 {
            shared
                .kill_ns
                .store(payload::instant_ns(kill_at), Ordering::Relaxed);
            killed = Some(kill_at);
        } else {
            notes.push(format!(
                "kill -9 {} ({}) failed: {}",
                victim.pid,
                victim.name,
                std::io::Error::last_os_error()
            ));
        }
    }
    let kill_offset = killed.map(|k| k.duration_since(run_start).as_secs_f64());
    tokio::time::sleep_until(deadline.cap(Instant::now() + secs(c.duration)).into()).await;
    let _ = phase_tx.send(Phase::Drain);
    let publish_secs = run_start.elapsed().as_secs_f64();
    monitor.mark("published");

    // Drain: every sent message acknowledged and delivered, or nothing moving for 5 s.
    let drain_limit = deadline.cap(Instant::now() + secs(args.drain));
    let mut last = (0u64, 0u64);
    let mut last_change = Instant::now();
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let drained = wait_until(drain_limit, || {
        let now = (ld(&shared.acked), ld(&shared.unique_received));
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        let sent = ld(&shared.sent);
        (ld(&shared.acked) + ld(&shared.rejected) >= sent && ld(&shared.unique_received) >= sent)
            || last_change.elapsed() > Duration::from_secs(5)
    })
    .await;
    if !drained {
        notes.push("drain time ran out".into());
    }
    monitor.mark("drained");
    // Before Close, which ends the reconnect loops too.
    let down_at_end = ld(&shared.down);
    let timeline_end = run_start.elapsed();
    let connected_at_end = ld(&shared.connected);
    let _ = phase_tx.send(Phase::Close);
    let close_limit = deadline.cap(Instant::now() + Duration::from_secs(15));
    while !tasks.is_empty() {
        match tokio::time::timeout_at(close_limit.into(), tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                notes.push(format!("{} clients did not close in time", tasks.len()));
                tasks.abort_all();
                break;
            }
        }
    }
    sampler.abort();
    if deadline.passed() {
        notes.push("hard timeout".into());
    }

    // Loss and duplicates from the per-message trackers.
    let (mut lost, mut dup1, mut dup2, mut foreign, mut unacked_delivered) = (0, 0, 0, 0, 0);
    let mut lost_clients = 0u64;
    for i in 0..n {
        let sub = (i + args.peer_offset) % n;
        let Ok(p) = shared.stats[i].lock() else {
            continue;
        };
        let (missing, received) = if sub == i {
            (p.received.missing_of(&p.acked), p.received.unique)
        } else {
            let Ok(s) = shared.stats[sub].lock() else {
                continue;
            };
            (s.received.missing_of(&p.acked), s.received.unique)
        };
        lost += missing;
        if missing > 0 {
            lost_clients += 1;
        }
        unacked_delivered += received.saturating_sub(p.acked.unique.saturating_sub(missing));
    }
    let mut order_violations = [0u64; 2];
    for st in &shared.stats {
        if let Ok(s) = st.lock() {
            dup1 += s.dup_qos1;
            dup2 += s.dup_qos2;
            foreign += s.foreign;
            order_violations[0] += s.order_violations[0];
            order_violations[1] += s.order_violations[1];
        }
    }

    let kill_ns = ld(&shared.kill_ns);
    let since_kill = |ns: u64| (ns > kill_ns && kill_ns > 0).then(|| (ns - kill_ns) as f64 / 1e9);
    let dropped = ld(&shared.dropped_after_kill);
    let resumed = ld(&shared.resumed_after_kill);
    let all_back = down_at_end == 0 && connected_at_end == n as u64;
    let session_lost = ld(&shared.session_lost_after_kill);
    let last_resume_secs = since_kill(ld(&shared.last_resume_ns));
    // Only a number when every dropped client came back with its session.
    let resume_secs = if dropped > 0 && all_back && session_lost == 0 {
        last_resume_secs
    } else {
        None
    };
    let timeline = timeline_json(&shared, timeline_end);
    let sent = ld(&shared.sent);
    let acked = ld(&shared.acked);
    let ok = notes.is_empty()
        && ld(&shared.setup_failed) == 0
        && lost == 0
        && dup2 == 0
        && order_violations == [0, 0]
        && all_back
        && session_lost == 0
        && (args.kill.is_none() || killed.is_some());
    Ok(json!({
        "scenario": "failover",
        "params": {
            "clients": n,
            "rate": args.rate,
            "qos": format!("{:?}", args.qos),
            "window": args.window,
            "payload": args.payload,
            "peer_offset": args.peer_offset,
            "warmup": args.warmup,
            "after_kill": c.duration,
            "drain": args.drain,
            "reconnect_delay": args.reconnect_delay,
            "reconnect_jitter": args.reconnect_jitter,
            "session_expiry": args.session_expiry,
            "puback_delay_ms": args.puback_delay_ms,
            "kill": args.kill.as_ref().map(|k| format!("{}={}", k.name, k.pid)),
            "kill_target": args.kill_target.map(|t| t.to_string()),
            "mqtt": format!("{:?}", c.mqtt),
            "targets": c.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        },
        "ok": ok,
        "notes": notes,
        "result": {
            "connect": {
                "ok": n as u64 - ld(&shared.setup_failed),
                "failed": ld(&shared.setup_failed),
                "secs": setup_secs,
            },
            "kill": {
                "done": killed.is_some(),
                "at_secs": kill_offset,
                "clients_dropped": dropped,
                "resumed_session_present": resumed,
                "resumed_session_absent": session_lost,
                "all_connected_at_end": all_back,
                "connected_at_end": connected_at_end,
                // Kill until the last dropped client had CONNACK with session present; null
                // unless every one of them did.
                "resume_secs": resume_secs,
                "last_resume_secs": last_resume_secs,
                "outage_ms": shared.outage.summary(),
                // The clients' part: kill until the dropped connection was noticed.
                "detection_ms": shared.detection.summary(),
                // The broker's part: TCP connect until CONNACK with session present.
                "resume_connect_ms": shared.resume_connect.summary(),
            },
            "reconnects": {
                "attempts": ld(&shared.reconnect_attempts),
                "failed_attempts": ld(&shared.reconnect_failures),
                "disconnects": ld(&shared.disconnects),
            },
            "publish": {
                "sent": sent,
                "acked": acked,
                "rejected": ld(&shared.rejected),
                "unacked_at_end": sent.saturating_sub(acked + ld(&shared.rejected)),
                "secs": publish_secs,
            },
            "receive": {
                "received": ld(&shared.received),
                "unique": ld(&shared.unique_received),
                "lost": lost,
                "clients_with_loss": lost_clients,
                "duplicates_qos1": dup1,
                "duplicates_qos2": dup2,
                "order_violations": order_violations[0] + order_violations[1],
                "order_violations_qos1": order_violations[0],
                "order_violations_qos2": order_violations[1],
                "delivered_without_ack": unacked_delivered,
                "foreign": foreign,
                "latency_ms": shared.latency.summary(),
            },
            "timeline": timeline,
            "errors": shared.errors.snapshot(),
        },
        "processes": monitor.report(),
        "kernel_tcp": monitor.tcp(),
    }))
}

/// Samples the connected gauge ten times a second into the timeline's min/max.
async fn sample_connected(shared: Arc<Shared>, progress: bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut printed = 0usize;
    loop {
        tick.tick().await;
        let now = payload::now_ns();
        let conn = shared.connected.load(Ordering::Relaxed);
        if let Some(s) = shared.second(now) {
            shared.timeline.connected_min[s].fetch_min(conn, Ordering::Relaxed);
            shared.timeline.connected_max[s].fetch_max(conn, Ordering::Relaxed);
            if progress && s > printed {
                let t = &shared.timeline;
                let p = s - 1;
                eprintln!(
                    "t={p}s connected={}..{} sent={} acked={} received={} connacks={}",
                    t.connected_min[p].load(Ordering::Relaxed),
                    t.connected_max[p].load(Ordering::Relaxed),
                    t.sent[p].load(Ordering::Relaxed),
                    t.acked[p].load(Ordering::Relaxed),
                    t.received[p].load(Ordering::Relaxed),
                    t.connacks[p].load(Ordering::Relaxed),
                );
                printed = s;
            }
        }
    }
}

/// The whole seconds of the timeline up to `end` (since the start of publishing): the
/// closing phase, which would share the last partial second, is left out.
fn timeline_json(shared: &Shared, end: Duration) -> serde_json::Value {
    let t = &shared.timeline;
    let end = (end.as_secs() as usize).min(t.received.len());
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let rows: Vec<serde_json::Value> = (0..end)
        .map(|s| {
            let min = ld(&t.connected_min[s]);
            json!({
                "t": s,
                "connected_min": if min == u64::MAX { serde_json::Value::Null } else { json!(min) },
                "connected_max": ld(&t.connected_max[s]),
                "sent": ld(&t.sent[s]),
                "acked": ld(&t.acked[s]),
                "received": ld(&t.received[s]),
                "connacks": ld(&t.connacks[s]),
            })
        })
        .collect();
    json!(rows)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK / PUBREC.
    Sent,
    /// PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

struct Inflight {
    seq: u64,
    packet_id: u16,
    qos: QoS,
    sent_ns: u64,
    stage: Stage,
}

struct Client {
    idx: usize,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    opts: crate::client::ConnOpts,
    filter: String,
    pub_topic: String,
    qos: QosMix,
    rate: f64,
    window: usize,
    payload: usize,
    seq: u64,
    next_due: Option<Instant>,
    inflight: VecDeque<Inflight>,
    /// Incoming QoS 2 packet ids between PUBREC and PUBREL (the client's session state).
    qos2_pending: HashSet<u16>,
    expected_publisher: u32,
    subscribed: bool,
    reconnect_delay: Duration,
    reconnect_jitter: f64,
    keepalive: Duration,
    puback_delay: Duration,
    /// PUBACKs held back by --puback-delay-ms: when they are due, and for which packet id.
    delayed_acks: VecDeque<(Instant, u16)>,
}

enum Event {
    Readable(std::io::Result<()>),
    Writable(std::io::Result<()>),
    Phase(bool),
    Wake,
}

impl Client {
    fn new(
        idx: usize,
        args: &FailoverArgs,
        prefix: &str,
        run_id: &str,
        shared: Arc<Shared>,
        phase: watch::Receiver<Phase>,
    ) -> Client {
        let c = &args.common;
        let n = args.clients;
        let mut opts = c.conn_opts(idx, format!("{prefix}-f{idx}"), false);
        opts.session_expiry = Some(args.session_expiry);
        let peer = (idx + args.peer_offset) % n;
        // The client publishing to this one's topic.
        let publisher = (idx + n - args.peer_offset % n) % n;
        Client {
            idx,
            shared,
            phase,
            opts,
            filter: topic::expand(&args.topic, idx, 1, run_id),
            pub_topic: topic::expand(&args.topic, peer, 1, run_id),
            qos: args.qos,
            rate: args.rate,
            window: usize::from(args.window.max(1)),
            payload: args.payload,
            seq: 0,
            next_due: None,
            inflight: VecDeque::new(),
            qos2_pending: HashSet::new(),
            expected_publisher: publisher as u32,
            subscribed: false,
            reconnect_delay: secs(args.reconnect_delay),
            reconnect_jitter: args.reconnect_jitter.max(0.0),
            keepalive: Duration::from_secs(u64::from(c.keepalive)),
            puback_delay: Duration::from_millis(args.puback_delay_ms),
            delayed_acks: VecDeque::new(),
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    async fn run(mut self, sem: Arc<Semaphore>, deadline: Deadline) {
        // First connection: to this client's own node (clients spread evenly), retried like
        // any other connection but counted as a set-up failure if it never succeeds.
        let first = {
            let _permit = sem.acquire().await;
            self.connect(true).await
        };
        self.shared.setup_done.fetch_add(1, Ordering::Relaxed);
        let mut conn = match first {
            Ok(conn) => conn,
            Err(e) => {
                self.shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                self.shared.errors.add(format!("setup: {e:#}"));
                return;
            }
        };
        let mut avoid: Vec<SocketAddr> = Vec::new();
        loop {
            self.shared.connected.fetch_add(1, Ordering::Relaxed);
            let r = self.drive(&mut conn).await;
            self.shared.connected.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => {
                    conn.disconnect().await;
                    return;
                }
                Err(e) => {
                    if self.phase() == Phase::Close {
                        return;
                    }
                    self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
                    self.shared.errors.add(format!("connection lost: {e:#}"));
                }
            }
            // Lost: wait, then try the other addresses until one takes us.
            let down_at = Instant::now();
            let down_ns = payload::instant_ns(down_at);
            self.shared.down.fetch_add(1, Ordering::Relaxed);
            let after_kill = {
                let k = self.shared.kill_ns.load(Ordering::Relaxed);
                k > 0 && down_ns >= k
            };
            if after_kill && !self.shared.down_since_kill[self.idx].swap(true, Ordering::Relaxed) {
                self.shared
                    .dropped_after_kill
                    .fetch_add(1, Ordering::Relaxed);
                let k = self.shared.kill_ns.load(Ordering::Relaxed);
                self.shared
                    .detection
                    .record_ns(self.idx, down_ns.saturating_sub(k));
            }
            avoid.clear();
            avoid.push(self.opts.target);
            let reconnected = loop {
                if self.phase() == Phase::Close || deadline.passed() {
                    break None;
                }
                let jitter = self.reconnect_jitter * fraction(self.idx, self.seq);
                tokio::time::sleep_until(
                    deadline
                        .cap(Instant::now() + self.reconnect_delay + secs(jitter))
                        .into(),
                )
                .await;
                self.opts.target = self.shared.next_target(&avoid);
                self.shared
                    .reconnect_attempts
                    .fetch_add(1, Ordering::Relaxed);
                match self.connect(false).await {
                    Ok(c) => break Some(c),
                    Err(e) => {
                        self.shared
                            .reconnect_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.shared.errors.add(format!("reconnect: {e:#}"));
                        avoid.push(self.opts.target);
                    }
                }
            };
            self.shared.down.fetch_sub(1, Ordering::Relaxed);
            match reconnected {
                Some(c) => {
                    conn = c;
                    self.shared
                        .outage
                        .record_ns(self.idx, down_at.elapsed().as_nanos() as u64);
                }
                None => return,
            }
        }
    }

    /// TCP connect, CONNECT, CONNACK; subscribes when there is no session (first time, or a
    /// session the broker lost), and resends what was in flight.
    async fn connect(&mut self, first: bool) -> Result<Conn> {
        let opened_at = Instant::now();
        let (mut conn, ack) = Conn::open(&self.opts).await?;
        let open_ns = opened_at.elapsed().as_nanos() as u64;
        // Held PUBACKs belonged to the old connection; the broker sends those messages again.
        self.delayed_acks.clear();
        let now = payload::now_ns();
        self.shared.bump(&self.shared.timeline.connacks, now, 1);
        if let Some(rm) = ack.properties.receive_maximum {
            self.window = self.window.min(usize::from(rm.max(1)));
        }
        if !first {
            let k = self.shared.kill_ns.load(Ordering::Relaxed);
            if self.shared.down_since_kill[self.idx].load(Ordering::Relaxed) && k > 0 {
                if ack.session_present {
                    self.shared
                        .resumed_after_kill
                        .fetch_add(1, Ordering::Relaxed);
                    self.shared.resume_connect.record_ns(self.idx, open_ns);
                    stamp(&self.shared.last_resume_ns, now);
                } else {
                    self.shared
                        .session_lost_after_kill
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.shared.down_since_kill[self.idx].store(false, Ordering::Relaxed);
            }
            if !ack.session_present {
                self.shared
                    .errors
                    .add("CONNACK without session present on reconnect");
                self.subscribed = false;
            }
        }
        if !self.subscribed {
            let filter = self.filter.clone();
            let timeout = self.opts.timeout;
            let reasons = conn
                .subscribe(
                    1,
                    std::slice::from_ref(&filter),
                    QoS::ExactlyOnce,
                    timeout,
                    |conn, packet| self.handle(conn, packet),
                )
                .await?;
            match reasons.first() {
                Some(r) if !r.is_error() => self.subscribed = true,
                Some(r) => bail!("SUBACK refused: 0x{:02x}", r.0),
                None => bail!("SUBACK without reason codes"),
            }
        }
        // The client's half of session resumption: resend in order.
        for f in &self.inflight {
            match f.stage {
                Stage::Sent => conn.queue(&Packet::Publish(self.publish_packet(
                    f.seq,
                    f.sent_ns,
                    f.qos,
                    f.packet_id,
                    true,
                )))?,
                Stage::Released => conn.queue(&Packet::PubRel(PubResp::new(
                    f.packet_id,
                    ReasonCode::SUCCESS,
                )))?,
            }
        }
        Ok(conn)
    }

    fn publish_packet(
        &self,
        seq: u64,
        sent_ns: u64,
        qos: QoS,
        packet_id: u16,
        dup: bool,
    ) -> Publish {
        Publish {
            dup,
            qos,
            retain: false,
            topic: self.pub_topic.clone(),
            packet_id,
            properties: Default::default(),
            payload: payload::encode(
                Header {
                    publisher: self.idx as u32,
                    seq,
                    sent_ns,
                },
                self.payload,
            ),
        }
    }

    /// The connection's loop. Ok: close cleanly (phase Close); Err: the connection is lost.
    async fn drive(&mut self, conn: &mut Conn) -> Result<()> {
        loop {
            let phase = self.phase();
            if phase == Phase::Close {
                return Ok(());
            }
            let now = Instant::now();
            let mut wake: Option<Instant> = None;
            while let Some(&(due, id)) = self.delayed_acks.front() {
                if due > now {
                    wake = Some(due);
                    break;
                }
                conn.queue(&Packet::PubAck(PubResp::new(id, ReasonCode::SUCCESS)))?;
                self.delayed_acks.pop_front();
            }
            if phase == Phase::Run && self.inflight.len() < self.window {
                let period = Duration::from_secs_f64(1.0 / self.rate);
                let due = *self.next_due.get_or_insert_with(|| {
                    // Spread the clients' schedules over one period.
                    now + period.mul_f64(fraction(self.idx, 0))
                });
                if due <= now {
                    self.publish_next(conn)?;
                    // Slots missed while disconnected or blocked are skipped, not caught up.
                    let next = due + period;
                    self.next_due = Some(if next + period < now { now } else { next });
                }
                wake = match (wake, self.next_due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            if !self.keepalive.is_zero() {
                let ping_at = conn.last_write + self.keepalive * 3 / 4;
                if now >= ping_at {
                    conn.queue(&Packet::PingReq)?;
                } else {
                    wake = Some(wake.map_or(ping_at, |w| w.min(ping_at)));
                }
            }
            conn.try_flush()?;
            let want_write = !conn.wbuf.is_empty();
            let sleep_to = wake.unwrap_or(now + Duration::from_secs(3600));
            let event = tokio::select! {
                r = conn.readable() => Event::Readable(r),
                r = conn.writable(), if want_write => Event::Writable(r),
                r = self.phase.changed() => Event::Phase(r.is_ok()),
                _ = tokio::time::sleep_until(sleep_to.into()) => Event::Wake,
            };
            match event {
                Event::Readable(r) => {
                    r?;
                    match conn.try_fill()? {
                        ReadOutcome::Eof => bail!("closed by broker"),
                        ReadOutcome::WouldBlock => {}
                        ReadOutcome::Data => {
                            while let Some(packet) = conn.next_packet()? {
                                self.handle(conn, packet)?;
                            }
                        }
                    }
                }
                Event::Writable(r) => r?,
                Event::Phase(true) | Event::Wake => {}
                Event::Phase(false) => return Ok(()),
            }
        }
    }

    fn publish_next(&mut self, conn: &mut Conn) -> Result<()> {
        let seq = self.seq;
        let qos = self.qos.for_seq(seq);
        let packet_id = (seq % 65535) as u16 + 1;
        let sent_ns = payload::now_ns();
        conn.queue(&Packet::Publish(
            self.publish_packet(seq, sent_ns, qos, packet_id, false),
        ))?;
        self.inflight.push_back(Inflight {
            seq,
            packet_id,
            qos,
            sent_ns,
            stage: Stage::Sent,
        });
        self.seq += 1;
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        self.shared.bump(&self.shared.timeline.sent, sent_ns, 1);
        Ok(())
    }

    fn handle(&mut self, conn: &mut Conn, packet: Packet) -> Result<()> {
        match packet {
            Packet::Publish(p) => self.on_publish(conn, p)?,
            Packet::PubRel(r) => {
                self.qos2_pending.remove(&r.packet_id);
                conn.queue(&Packet::PubComp(PubResp::new(
                    r.packet_id,
                    ReasonCode::SUCCESS,
                )))?;
            }
            Packet::PubAck(r) => self.on_ack(conn, r, QoS::AtLeastOnce, false)?,
            Packet::PubRec(r) => self.on_ack(conn, r, QoS::ExactlyOnce, false)?,
            Packet::PubComp(r) => self.on_ack(conn, r, QoS::ExactlyOnce, true)?,
            Packet::PingResp | Packet::SubAck(_) | Packet::UnsubAck(_) => {}
            Packet::Disconnect(d) => bail!("DISCONNECT from broker: 0x{:02x}", d.reason.0),
            other => bail!("unexpected {} from broker", other.name()),
        }
        Ok(())
    }

    fn on_publish(&mut self, conn: &mut Conn, p: Publish) -> Result<()> {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce if !self.puback_delay.is_zero() => {
                let due = Instant::now() + self.puback_delay;
                self.delayed_acks.push_back((due, p.packet_id));
            }
            QoS::AtLeastOnce => conn.queue(&Packet::PubAck(PubResp::new(
                p.packet_id,
                ReasonCode::SUCCESS,
            )))?,
            QoS::ExactlyOnce => {
                conn.queue(&Packet::PubRec(PubResp::new(
                    p.packet_id,
                    ReasonCode::SUCCESS,
                )))?;
                if !self.qos2_pending.insert(p.packet_id) {
                    // A retransmission of a message this client already has (before PUBREL).
                    return Ok(());
                }
            }
        }
        let now = payload::now_ns();
        let shared = &self.shared;
        shared.received.fetch_add(1, Ordering::Relaxed);
        shared.bump(&shared.timeline.received, now, 1);
        let Ok(mut st) = shared.stats[self.idx].lock() else {
            return Ok(());
        };
        let Some(h) = payload::decode(&p.payload) else {
            st.foreign += 1;
            return Ok(());
        };
        if h.publisher != self.expected_publisher {
            st.foreign += 1;
            return Ok(());
        }
        shared
            .latency
            .record_ns(self.idx, now.saturating_sub(h.sent_ns));
        if st.received.record(h.seq) {
            shared.unique_received.fetch_add(1, Ordering::Relaxed);
            // MQTT keeps order per topic and QoS: each QoS has its own high-water mark.
            let q = usize::from(p.qos == QoS::ExactlyOnce);
            match st.received_high[q] {
                Some(high) if h.seq < high => st.order_violations[q] += 1,
                _ => st.received_high[q] = Some(h.seq),
            }
        } else if p.qos == QoS::ExactlyOnce {
            st.dup_qos2 += 1;
        } else {
            st.dup_qos1 += 1;
        }
        Ok(())
    }

    fn on_ack(&mut self, conn: &mut Conn, r: PubResp, qos: QoS, comp: bool) -> Result<()> {
        let Some(pos) = self
            .inflight
            .iter()
            .position(|f| f.packet_id == r.packet_id && f.qos == qos)
        else {
            // A late answer to a message already finished on an earlier connection.
            self.shared
                .errors
                .add("acknowledgement for unknown packet id");
            return Ok(());
        };
        let entry = &mut self.inflight[pos];
        let done = match (qos, comp, entry.stage) {
            (QoS::AtLeastOnce, _, _) => true,
            (_, false, Stage::Sent) if r.reason.is_error() => true,
            (_, false, _) => {
                entry.stage = Stage::Released;
                conn.queue(&Packet::PubRel(PubResp::new(
                    r.packet_id,
                    ReasonCode::SUCCESS,
                )))?;
                false
            }
            (_, true, Stage::Released) => true,
            (_, true, Stage::Sent) => {
                self.shared.errors.add("PUBCOMP before PUBREC");
                return Ok(());
            }
        };
        if !done {
            return Ok(());
        }
        let Some(entry) = self.inflight.remove(pos) else {
            return Ok(());
        };
        // PUBCOMP carries no verdict on the message (it was taken at PUBREC); a PUBACK or
        // PUBREC with an error reason is a refusal.
        if r.reason.is_error() && !comp {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            self.shared
                .errors
                .add(format!("publish refused: 0x{:02x}", r.reason.0));
            return Ok(());
        }
        if r.reason.is_error() {
            self.shared
                .errors
                .add(format!("PUBCOMP with reason 0x{:02x}", r.reason.0));
        }
        let now = payload::now_ns();
        self.shared.acked.fetch_add(1, Ordering::Relaxed);
        self.shared.bump(&self.shared.timeline.acked, now, 1);
        if let Ok(mut st) = self.shared.stats[self.idx].lock() {
            st.acked.record(entry.seq);
        }
        Ok(())
    }
}

/// A deterministic number in [0, 1) from a client index and a counter (golden-ratio spread).
fn fraction(idx: usize, k: u64) -> f64 {
    ((idx as f64 + k as f64 * 0.754_877_666) * 0.618_033_988_75).fract()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_alternates() {
        assert_eq!(QosMix::Mix.for_seq(0), QoS::AtLeastOnce);
        assert_eq!(QosMix::Mix.for_seq(1), QoS::ExactlyOnce);
        assert_eq!(QosMix::Two.for_seq(0), QoS::ExactlyOnce);
    }

    #[test]
    fn fraction_in_unit_interval() {
        for i in 0..1000 {
            let f = fraction(i, i as u64 * 7);
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }
}
