//! The publish/subscribe scenario behind fan-in, fan-out and the many-clients test:
//! N publishers (as fast as a window allows, or at a fixed rate each), M subscribers,
//! end-to-end latency from the payload's timestamp, loss and duplicates from its sequence
//! numbers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use jetmq_codec::{Packet, PubResp, Publish, QoS, ReasonCode};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{Conn, ReadOutcome};
use crate::common::{secs, wait_until, Common, Deadline};
use crate::payload::{self, Header};
use crate::procmon::Monitor;
use crate::stats::{stamp, ErrorLog, Latency, Recorder, SeqTracker};
use crate::topic;

#[derive(Debug, Clone, Args)]
pub struct PubsubArgs {
    #[command(flatten)]
    pub common: Common,
    /// Publishing connections.
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,
    /// Subscribing connections.
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// QoS of the publishes.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// QoS of the subscriptions (default: same as --qos).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub sub_qos: Option<u8>,
    /// Messages per second per publisher; 0 = as fast as the windows allow.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// QoS 1/2 publishes in flight per publisher (unacknowledged).
    #[arg(long, default_value_t = 100)]
    pub window: u16,
    /// End-to-end window: a publisher stays at most this many messages ahead of the slowest
    /// subscriber that should receive them (0 = off). Keeps "as fast as possible" from just
    /// filling a broker's queues.
    #[arg(long, default_value_t = 0)]
    pub e2e_window: u64,
    /// Payload size in bytes (at least 24: the header).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Topic template for publisher {i}; {g} = i mod --groups, {run} = run id.
    #[arg(long, default_value = "bench/{run}/{i}")]
    pub topic: String,
    /// Filter template for subscriber {s}; {g} = s mod --groups, {run} = run id.
    #[arg(long, default_value = "bench/{run}/#")]
    pub filter: String,
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Persistent sessions (clean session 0 / MQTT 5 clean start 0 with an expiry).
    #[arg(long)]
    pub persistent: bool,
    /// MQTT 5 session expiry for --persistent, seconds.
    #[arg(long, default_value_t = 3600)]
    pub session_expiry: u32,
    /// After publishing stops: wait at most this long for acks and deliveries, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Upper bound on messages per publisher.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_messages: u64,
    /// Print sent/acked/received per second to stderr.
    #[arg(long)]
    pub progress: bool,
}

async fn progress_log(shared: Arc<Shared>, on: bool) {
    if !on {
        return;
    }
    let start = Instant::now();
    let mut last = (0u64, 0u64, 0u64);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (
            shared
                .pubs
                .iter()
                .map(|p| p.sent.load(Ordering::Relaxed))
                .sum::<u64>(),
            shared
                .pubs
                .iter()
                .map(|p| p.acked.load(Ordering::Relaxed))
                .sum::<u64>(),
            shared.received.load(Ordering::Relaxed),
        );
        eprintln!(
            "t={:.0}s sent/s={} acked/s={} received/s={}",
            start.elapsed().as_secs_f64(),
            now.0 - last.0,
            now.1 - last.1,
            now.2 - last.2
        );
        last = now;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Run,
    Drain,
    Close,
}

struct PubState {
    topic: String,
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    /// Every sequence number below this was acknowledged (QoS 1/2).
    acked_prefix: AtomicU64,
    /// Unique messages received from this publisher, per subscriber that should get them.
    e2e: Vec<Arc<AtomicU64>>,
    e2e_stalls: AtomicU64,
    alive: AtomicBool,
}

struct SubState {
    filter: String,
    trackers: Mutex<HashMap<u32, SeqTracker>>,
    e2e: HashMap<u32, Arc<AtomicU64>>,
    received: AtomicU64,
    foreign: AtomicU64,
    alive: AtomicBool,
}

struct Shared {
    pubs: Vec<PubState>,
    subs: Vec<SubState>,
    latency: Recorder,
    ack_latency: Recorder,
    errors: ErrorLog,
    connected: AtomicU64,
    connect_failed: AtomicU64,
    setup_done: AtomicU64,
    unexpected_close: AtomicU64,
    received: AtomicU64,
    first_recv_ns: AtomicU64,
    last_recv_ns: AtomicU64,
    last_ack_ns: AtomicU64,
    run_start_ns: AtomicU64,
    pub_qos: QoS,
    sub_qos: QoS,
}

impl Shared {
    fn effective_qos(&self) -> QoS {
        self.pub_qos.min(self.sub_qos)
    }
}

fn qos(v: u8) -> QoS {
    QoS::from_u8(v).unwrap_or(QoS::AtMostOnce)
}

pub async fn run(args: PubsubArgs, run_id: &str) -> Result<serde_json::Value> {
    let c = &args.common;
    if args.payload < payload::HEADER_LEN {
        bail!("--payload must be at least {}", payload::HEADER_LEN);
    }
    let deadline = Deadline::after(c.hard_timeout());
    let prefix = c
        .client_prefix
        .clone()
        .unwrap_or_else(|| format!("jb-{run_id}"));
    let pub_qos = qos(args.qos);
    let sub_qos = args.sub_qos.map(qos).unwrap_or(pub_qos);

    // Topology: which subscriber should get which publisher's messages.
    let topics: Vec<String> = (0..args.publishers)
        .map(|i| topic::expand(&args.topic, i, args.groups, run_id))
        .collect();
    let filters: Vec<String> = (0..args.subscribers)
        .map(|s| topic::expand(&args.filter, s, args.groups, run_id))
        .collect();
    let mut pub_e2e: Vec<Vec<Arc<AtomicU64>>> = vec![Vec::new(); args.publishers];
    let mut subs = Vec::with_capacity(args.subscribers);
    let mut pairs = 0u64;
    for filter in &filters {
        let mut e2e = HashMap::new();
        for (p, t) in topics.iter().enumerate() {
            if topic::matches(filter, t) {
                let cell = Arc::new(AtomicU64::new(0));
                pub_e2e[p].push(cell.clone());
                e2e.insert(p as u32, cell);
                pairs += 1;
            }
        }
        subs.push(SubState {
            filter: filter.clone(),
            trackers: Mutex::new(HashMap::new()),
            e2e,
            received: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            alive: AtomicBool::new(false),
        });
    }
    let pubs: Vec<PubState> = topics
        .into_iter()
        .zip(pub_e2e)
        .map(|(topic, e2e)| PubState {
            topic,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            acked_prefix: AtomicU64::new(0),
            e2e,
            e2e_stalls: AtomicU64::new(0),
            alive: AtomicBool::new(false),
        })
        .collect();
    let shared = Arc::new(Shared {
        pubs,
        subs,
        latency: Recorder::new(16),
        ack_latency: Recorder::new(16),
        errors: ErrorLog::default(),
        connected: AtomicU64::new(0),
        connect_failed: AtomicU64::new(0),
        setup_done: AtomicU64::new(0),
        unexpected_close: AtomicU64::new(0),
        received: AtomicU64::new(0),
        first_recv_ns: AtomicU64::new(u64::MAX),
        last_recv_ns: AtomicU64::new(0),
        last_ack_ns: AtomicU64::new(0),
        run_start_ns: AtomicU64::new(0),
        pub_qos,
        sub_qos,
    });

    let monitor = Monitor::start(c.watch.clone());
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut notes: Vec<String> = Vec::new();

    // Subscribers first, all subscribed before anyone publishes.
    let setup_start = Instant::now();
    for s in 0..args.subscribers {
        let opts = {
            let mut o = c.conn_opts(s, format!("{prefix}-s{s}"), !args.persistent);
            if args.persistent {
                o.session_expiry = Some(args.session_expiry);
            }
            o
        };
        let w = Worker::new(shared.clone(), Role::Sub(s), &args, phase_rx.clone());
        let sem = sem.clone();
        tasks.spawn(async move { w.run(opts, sem).await });
    }
    let total_subs = args.subscribers as u64;
    let ok = wait_until(deadline.0, || {
        shared.setup_done.load(Ordering::Relaxed) >= total_subs
    })
    .await;
    if !ok {
        notes.push("hard timeout while connecting subscribers".into());
    }
    // Then publishers.
    for p in 0..args.publishers {
        let i = args.subscribers + p;
        let opts = {
            let mut o = c.conn_opts(i, format!("{prefix}-p{p}"), !args.persistent);
            if args.persistent {
                o.session_expiry = Some(args.session_expiry);
            }
            o
        };
        let w = Worker::new(shared.clone(), Role::Pub(p), &args, phase_rx.clone());
        let sem = sem.clone();
        tasks.spawn(async move { w.run(opts, sem).await });
    }
    let total = (args.subscribers + args.publishers) as u64;
    let ok = wait_until(deadline.0, || {
        shared.setup_done.load(Ordering::Relaxed) >= total
    })
    .await;
    if !ok {
        notes.push("hard timeout while connecting publishers".into());
    }
    let setup_secs = setup_start.elapsed().as_secs_f64();
    monitor.mark("connected");

    // Measured phase.
    let run_start = Instant::now();
    shared
        .run_start_ns
        .store(payload::instant_ns(run_start), Ordering::Relaxed);
    let _ = phase_tx.send(Phase::Run);
    let progress = tokio::spawn(progress_log(shared.clone(), args.progress));
    tokio::time::sleep_until(deadline.cap(run_start + secs(c.duration)).into()).await;
    let _ = phase_tx.send(Phase::Drain);
    let publish_secs = run_start.elapsed().as_secs_f64();
    monitor.mark("published");

    // Drain: wait for outstanding acks and deliveries, or until nothing moves for 3 s.
    let drain_limit = deadline.cap(Instant::now() + secs(args.drain));
    let mut last_progress = (0u64, 0u64);
    let mut last_change = Instant::now();
    let drained = wait_until(drain_limit, || {
        let progress = (
            shared.received.load(Ordering::Relaxed),
            shared
                .pubs
                .iter()
                .map(|p| p.acked.load(Ordering::Relaxed))
                .sum(),
        );
        if progress != last_progress {
            last_progress = progress;
            last_change = Instant::now();
        }
        all_delivered(&shared) || last_change.elapsed() > Duration::from_secs(3)
    })
    .await;
    if !drained {
        notes.push("drain time ran out".into());
    }
    monitor.mark("drained");
    progress.abort();
    let _ = phase_tx.send(Phase::Close);
    let close_limit = deadline.cap(Instant::now() + Duration::from_secs(10));
    while !tasks.is_empty() {
        match tokio::time::timeout_at(close_limit.into(), tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                notes.push(format!("{} connections did not close in time", tasks.len()));
                tasks.abort_all();
                break;
            }
        }
    }
    if deadline.passed() {
        notes.push("hard timeout".into());
    }

    let report = report(&shared, &args, publish_secs, setup_secs, pairs);
    Ok(json!({
        "scenario": "pubsub",
        "params": {
            "publishers": args.publishers,
            "subscribers": args.subscribers,
            "qos": args.qos,
            "sub_qos": sub_qos as u8,
            "rate": args.rate,
            "window": args.window,
            "e2e_window": args.e2e_window,
            "payload": args.payload,
            "topic": args.topic,
            "filter": args.filter,
            "groups": args.groups,
            "persistent": args.persistent,
            "duration": c.duration,
            "mqtt": format!("{:?}", c.mqtt),
            "targets": c.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        },
        "ok": notes.is_empty() && report.connect.failed == 0 && report.unexpected_close == 0,
        "notes": notes,
        "result": report,
        "processes": monitor.report(),
        "kernel_tcp": monitor.tcp(),
    }))
}

/// True when every subscriber has every message it should get.
fn all_delivered(shared: &Shared) -> bool {
    let qos0 = shared.effective_qos() == QoS::AtMostOnce;
    shared.pubs.iter().all(|p| {
        let sent = p.sent.load(Ordering::Relaxed);
        if shared.pub_qos != QoS::AtMostOnce
            && p.acked.load(Ordering::Relaxed) + p.rejected.load(Ordering::Relaxed) < sent
            && p.alive.load(Ordering::Relaxed)
        {
            return false;
        }
        let want = if qos0 {
            sent
        } else {
            p.acked_prefix.load(Ordering::Relaxed)
        };
        p.e2e.iter().all(|c| c.load(Ordering::Relaxed) >= want)
    })
}

#[derive(Debug, Serialize)]
struct ConnectReport {
    attempted: u64,
    ok: u64,
    failed: u64,
    secs: f64,
}

#[derive(Debug, Serialize)]
struct PublishReport {
    sent: u64,
    acked: u64,
    rejected: u64,
    secs: f64,
    send_rate: f64,
    ack_rate: f64,
    ack_latency_ms: Latency,
    e2e_window_stalls: u64,
}

#[derive(Debug, Serialize)]
struct ReceiveReport {
    received: u64,
    unique: u64,
    expected: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    foreign: u64,
    /// Deliveries per second: received / (last delivery - start of publishing).
    rate: f64,
    secs: f64,
    latency_ms: Latency,
}

#[derive(Debug, Serialize)]
struct Report {
    connect: ConnectReport,
    publish: PublishReport,
    receive: ReceiveReport,
    unexpected_close: u64,
    matched_pairs: u64,
    errors: std::collections::BTreeMap<String, u64>,
}

fn report(
    shared: &Shared,
    args: &PubsubArgs,
    publish_secs: f64,
    setup_secs: f64,
    pairs: u64,
) -> Report {
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let sent: u64 = shared.pubs.iter().map(|p| ld(&p.sent)).sum();
    let acked: u64 = shared.pubs.iter().map(|p| ld(&p.acked)).sum();
    let rejected: u64 = shared.pubs.iter().map(|p| ld(&p.rejected)).sum();
    let stalls: u64 = shared.pubs.iter().map(|p| ld(&p.e2e_stalls)).sum();
    let qos0 = shared.effective_qos() == QoS::AtMostOnce;
    let run_start = ld(&shared.run_start_ns);
    let (mut unique, mut expected, mut lost, mut dups, mut ooo) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for sub in &shared.subs {
        let Ok(trackers) = sub.trackers.lock() else {
            continue;
        };
        for t in trackers.values() {
            unique += t.unique;
            dups += t.duplicates;
            ooo += t.out_of_order;
        }
        for &p in sub.e2e.keys() {
            let Some(ps) = shared.pubs.get(p as usize) else {
                continue;
            };
            let want = if qos0 {
                ld(&ps.sent)
            } else {
                ld(&ps.acked_prefix)
            };
            expected += want;
            lost += match trackers.get(&p) {
                Some(t) => t.missing_below(want),
                None => want,
            };
        }
    }
    let received = ld(&shared.received);
    let last_recv = ld(&shared.last_recv_ns);
    let recv_secs = if last_recv > run_start {
        (last_recv - run_start) as f64 / 1e9
    } else {
        0.0
    };
    let last_ack = ld(&shared.last_ack_ns);
    let ack_secs = if last_ack > run_start {
        ((last_ack - run_start) as f64 / 1e9).max(publish_secs.min(1e-9))
    } else {
        publish_secs
    };
    let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let attempted = (args.publishers + args.subscribers) as u64;
    let ok = ld(&shared.connected);
    Report {
        connect: ConnectReport {
            attempted,
            ok,
            failed: ld(&shared.connect_failed),
            secs: setup_secs,
        },
        publish: PublishReport {
            sent,
            acked,
            rejected,
            secs: publish_secs,
            send_rate: rate(sent, publish_secs),
            ack_rate: if shared.pub_qos == QoS::AtMostOnce {
                0.0
            } else {
                rate(acked, ack_secs)
            },
            ack_latency_ms: shared.ack_latency.summary(),
            e2e_window_stalls: stalls,
        },
        receive: ReceiveReport {
            received,
            unique,
            expected,
            lost,
            duplicates: dups,
            out_of_order: ooo,
            foreign: shared.subs.iter().map(|s| ld(&s.foreign)).sum(),
            rate: rate(received, recv_secs),
            secs: recv_secs,
            latency_ms: shared.latency.summary(),
        },
        unexpected_close: ld(&shared.unexpected_close),
        matched_pairs: pairs,
        errors: shared.errors.snapshot(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Pub(usize),
    Sub(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sent,
    Released,
    Done,
}

struct Inflight {
    seq: u64,
    sent_ns: u64,
    stage: Stage,
}

/// The publishing half of a worker.
struct Publisher {
    idx: usize,
    qos: QoS,
    seq: u64,
    max: u64,
    window: usize,
    inflight: VecDeque<Inflight>,
    rate: f64,
    /// Offset of this publisher's schedule within one period, so that publishers at a fixed
    /// rate do not all fire at once.
    phase_offset: Duration,
    payload: usize,
    e2e_window: u64,
    e2e_allowed: u64,
    e2e_forgiven: u64,
    e2e_blocked_since: Option<Instant>,
}

struct Worker {
    shared: Arc<Shared>,
    role: Role,
    publisher: Option<Publisher>,
    phase: watch::Receiver<Phase>,
    filter_qos: QoS,
    qos2_pending: HashSet<u16>,
    keepalive: Duration,
    connect_timeout: Duration,
}

enum Event {
    Readable(std::io::Result<()>),
    Writable(std::io::Result<()>),
    Phase(bool),
    Wake,
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        role: Role,
        args: &PubsubArgs,
        phase: watch::Receiver<Phase>,
    ) -> Worker {
        let publisher = match role {
            Role::Pub(idx) => {
                let period = if args.rate > 0.0 {
                    1.0 / args.rate
                } else {
                    0.0
                };
                // Golden-ratio spread of start offsets over one period.
                let frac = (idx as f64 * 0.618_033_988_75).fract();
                Some(Publisher {
                    idx,
                    qos: shared.pub_qos,
                    seq: 0,
                    max: args.max_messages,
                    window: usize::from(args.window.max(1)),
                    inflight: VecDeque::new(),
                    rate: args.rate,
                    phase_offset: Duration::from_secs_f64(period * frac),
                    payload: args.payload,
                    e2e_window: args.e2e_window,
                    e2e_allowed: 0,
                    e2e_forgiven: 0,
                    e2e_blocked_since: None,
                })
            }
            Role::Sub(_) => None,
        };
        Worker {
            filter_qos: shared.sub_qos,
            shared,
            role,
            publisher,
            phase,
            qos2_pending: HashSet::new(),
            keepalive: Duration::from_secs(u64::from(args.common.keepalive)),
            connect_timeout: args.common.connect_timeout(),
        }
    }

    async fn run(mut self, opts: crate::client::ConnOpts, sem: Arc<Semaphore>) {
        let conn = {
            let _permit = sem.acquire().await;
            self.setup(&opts).await
        };
        self.shared.setup_done.fetch_add(1, Ordering::Relaxed);
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                self.shared.connect_failed.fetch_add(1, Ordering::Relaxed);
                self.shared.errors.add(format!("setup: {e:#}"));
                return;
            }
        };
        self.set_alive(true);
        let result = self.drive(&mut conn).await;
        self.set_alive(false);
        match result {
            Ok(true) => conn.disconnect().await,
            Ok(false) => {}
            Err(e) => {
                self.shared.unexpected_close.fetch_add(1, Ordering::Relaxed);
                self.shared.errors.add(format!("{e:#}"));
            }
        }
    }

    fn set_alive(&self, v: bool) {
        match self.role {
            Role::Pub(i) => self.shared.pubs[i].alive.store(v, Ordering::Relaxed),
            Role::Sub(i) => self.shared.subs[i].alive.store(v, Ordering::Relaxed),
        }
    }

    async fn setup(&mut self, opts: &crate::client::ConnOpts) -> Result<Conn> {
        let (mut conn, ack) = Conn::open(opts).await?;
        self.shared.connected.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &mut self.publisher {
            if let Some(rm) = ack.properties.receive_maximum {
                p.window = p.window.min(usize::from(rm));
            }
        }
        if let Role::Sub(s) = self.role {
            let filter = self.shared.subs[s].filter.clone();
            let reasons = conn
                .subscribe(
                    1,
                    std::slice::from_ref(&filter),
                    self.filter_qos,
                    self.connect_timeout,
                    |conn, packet| self.handle(conn, packet),
                )
                .await?;
            match reasons.first() {
                Some(r) if !r.is_error() => {}
                Some(r) => bail!("SUBACK refused: 0x{:02x}", r.0),
                None => bail!("SUBACK without reason codes"),
            }
        }
        Ok(conn)
    }

    /// The connection's loop. Ok(true): close cleanly; Ok(false): the peer closed.
    async fn drive(&mut self, conn: &mut Conn) -> Result<bool> {
        loop {
            let phase = *self.phase.borrow();
            if phase == Phase::Close {
                return Ok(true);
            }
            let now = Instant::now();
            let mut wake: Option<Instant> = None;
            let mut again = false;
            let mut write_full = false;
            if phase == Phase::Run {
                if let Some(p) = &mut self.publisher {
                    match p.fill(conn, &self.shared, now)? {
                        Fill::Blocked => {}
                        Fill::WriteFull => write_full = true,
                        Fill::At(t) => wake = Some(t),
                        Fill::Again => again = true,
                    }
                }
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
            if write_full && conn.wbuf.len() < MAX_WBUF {
                again = true;
            }
            let want_write = !conn.wbuf.is_empty();
            let sleep_to = wake.unwrap_or(now + Duration::from_secs(3600));
            let event = tokio::select! {
                r = conn.readable() => Event::Readable(r),
                r = conn.writable(), if want_write => Event::Writable(r),
                r = self.phase.changed() => Event::Phase(r.is_ok()),
                _ = tokio::time::sleep_until(sleep_to.into()), if wake.is_some() => Event::Wake,
                _ = tokio::task::yield_now(), if again => Event::Wake,
            };
            match event {
                Event::Readable(r) => {
                    r?;
                    match conn.try_fill()? {
                        ReadOutcome::Eof => {
                            if *self.phase.borrow() != Phase::Close {
                                bail!("connection closed by broker");
                            }
                            return Ok(false);
                        }
                        ReadOutcome::WouldBlock => {}
                        ReadOutcome::Data => {
                            while let Some(packet) = conn.next_packet()? {
                                self.handle(conn, packet)?;
                            }
                        }
                    }
                }
                Event::Writable(r) => r?,
                Event::Phase(true) => {}
                Event::Phase(false) => return Ok(true),
                Event::Wake => {}
            }
        }
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
            Packet::PubAck(r) => self.on_ack(conn, r, AckKind::Ack)?,
            Packet::PubRec(r) => self.on_ack(conn, r, AckKind::Rec)?,
            Packet::PubComp(r) => self.on_ack(conn, r, AckKind::Comp)?,
            Packet::PingResp | Packet::SubAck(_) | Packet::UnsubAck(_) => {}
            Packet::Disconnect(d) => bail!("DISCONNECT from broker: 0x{:02x}", d.reason.0),
            other => bail!("unexpected {} from broker", other.name()),
        }
        Ok(())
    }

    fn on_publish(&mut self, conn: &mut Conn, p: Publish) -> Result<()> {
        match p.qos {
            QoS::AtMostOnce => {}
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
                    // Retransmission of a message we already have: not a new delivery.
                    return Ok(());
                }
            }
        }
        let Role::Sub(s) = self.role else {
            return Ok(());
        };
        let now = payload::now_ns();
        let shared = &self.shared;
        let sub = &shared.subs[s];
        shared.received.fetch_add(1, Ordering::Relaxed);
        sub.received.fetch_add(1, Ordering::Relaxed);
        shared.first_recv_ns.fetch_min(now, Ordering::Relaxed);
        stamp(&shared.last_recv_ns, now);
        let Some(h) = payload::decode(&p.payload) else {
            sub.foreign.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        shared.latency.record_ns(s, now.saturating_sub(h.sent_ns));
        let fresh = match sub.trackers.lock() {
            Ok(mut t) => t.entry(h.publisher).or_default().record(h.seq),
            Err(_) => true,
        };
        if fresh {
            match sub.e2e.get(&h.publisher) {
                Some(cell) => {
                    cell.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    sub.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, conn: &mut Conn, r: PubResp, kind: AckKind) -> Result<()> {
        let Some(p) = &mut self.publisher else {
            bail!("acknowledgement on a subscriber connection");
        };
        let Some(front) = p.inflight.front().map(|f| f.seq) else {
            self.shared
                .errors
                .add(format!("{kind:?} for unknown packet id"));
            return Ok(());
        };
        // Packet ids are seq mod 65535 + 1 and the window is below 65535, so the id names
        // exactly one in-flight entry.
        let off = (u64::from(r.packet_id.wrapping_sub(1)) + 65535 - front % 65535) % 65535;
        let Some(entry) = p.inflight.get_mut(off as usize) else {
            self.shared
                .errors
                .add(format!("{kind:?} for unknown packet id"));
            return Ok(());
        };
        let ps = &self.shared.pubs[p.idx];
        let mut done = false;
        match (p.qos, kind) {
            (QoS::AtLeastOnce, AckKind::Ack) | (QoS::ExactlyOnce, AckKind::Comp) => {
                done = true;
            }
            (QoS::ExactlyOnce, AckKind::Rec) => {
                if r.reason.is_error() {
                    done = true;
                } else {
                    entry.stage = Stage::Released;
                    conn.queue(&Packet::PubRel(PubResp::new(
                        r.packet_id,
                        ReasonCode::SUCCESS,
                    )))?;
                }
            }
            _ => {
                self.shared
                    .errors
                    .add(format!("{kind:?} does not fit QoS {}", p.qos as u8));
            }
        }
        if done && entry.stage != Stage::Done {
            entry.stage = Stage::Done;
            if r.reason.is_error() {
                ps.rejected.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .errors
                    .add(format!("{kind:?} with reason 0x{:02x}", r.reason.0));
            } else {
                let now = payload::now_ns();
                ps.acked.fetch_add(1, Ordering::Relaxed);
                stamp(&self.shared.last_ack_ns, now);
                self.shared
                    .ack_latency
                    .record_ns(p.idx, now.saturating_sub(entry.sent_ns));
            }
            while p.inflight.front().is_some_and(|f| f.stage == Stage::Done) {
                p.inflight.pop_front();
            }
            let prefix = p.inflight.front().map_or(p.seq, |f| f.seq);
            ps.acked_prefix.store(prefix, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum AckKind {
    /// PUBACK
    Ack,
    /// PUBREC
    Rec,
    /// PUBCOMP
    Comp,
}

enum Fill {
    /// Nothing to do until an ack arrives (or the publisher is finished).
    Blocked,
    /// The write buffer is full: continue once the socket took some of it.
    WriteFull,
    /// Next publish is due then.
    At(Instant),
    /// More could be sent right away (yielded to let acks in).
    Again,
}

const MAX_WBUF: usize = 64 * 1024;
const BATCH: usize = 64;

impl Publisher {
    fn fill(&mut self, conn: &mut Conn, shared: &Shared, now: Instant) -> Result<Fill> {
        let ps = &shared.pubs[self.idx];
        for _ in 0..BATCH {
            if self.seq >= self.max {
                return Ok(Fill::Blocked);
            }
            if conn.wbuf.len() >= MAX_WBUF {
                return Ok(Fill::WriteFull);
            }
            if self.qos != QoS::AtMostOnce && self.inflight.len() >= self.window {
                return Ok(Fill::Blocked);
            }
            if self.e2e_blocked(ps, now) {
                return Ok(Fill::At(now + Duration::from_millis(1)));
            }
            if self.rate > 0.0 {
                let run_start = payload::ns_to_instant(shared.run_start_ns.load(Ordering::Relaxed));
                let due = run_start
                    + self.phase_offset
                    + Duration::from_secs_f64(self.seq as f64 / self.rate);
                if due > now {
                    return Ok(Fill::At(due));
                }
            }
            self.publish_one(conn, ps)?;
        }
        Ok(Fill::Again)
    }

    fn e2e_blocked(&mut self, ps: &PubState, now: Instant) -> bool {
        if self.e2e_window == 0 || ps.e2e.is_empty() || self.seq < self.e2e_allowed {
            return false;
        }
        let slowest = ps
            .e2e
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        self.e2e_allowed = slowest + self.e2e_forgiven + self.e2e_window;
        if self.seq < self.e2e_allowed {
            self.e2e_blocked_since = None;
            return false;
        }
        let since = *self.e2e_blocked_since.get_or_insert(now);
        if now.duration_since(since) > Duration::from_secs(2) {
            // A subscriber stopped receiving (loss or stall): give up on those messages.
            ps.e2e_stalls.fetch_add(1, Ordering::Relaxed);
            self.e2e_forgiven = self.seq.saturating_sub(slowest);
            self.e2e_allowed = slowest + self.e2e_forgiven + self.e2e_window;
            self.e2e_blocked_since = None;
            return false;
        }
        true
    }

    fn publish_one(&mut self, conn: &mut Conn, ps: &PubState) -> Result<()> {
        let seq = self.seq;
        let sent_ns = payload::now_ns();
        let payload = payload::encode(
            Header {
                publisher: self.idx as u32,
                seq,
                sent_ns,
            },
            self.payload,
        );
        let packet_id = if self.qos == QoS::AtMostOnce {
            0
        } else {
            (seq % 65535) as u16 + 1
        };
        conn.queue(&Packet::Publish(Publish {
            dup: false,
            qos: self.qos,
            retain: false,
            topic: ps.topic.clone(),
            packet_id,
            properties: Default::default(),
            payload,
        }))?;
        if self.qos != QoS::AtMostOnce {
            self.inflight.push_back(Inflight {
                seq,
                sent_ns,
                stage: Stage::Sent,
            });
        }
        self.seq += 1;
        ps.sent.store(self.seq, Ordering::Relaxed);
        if self.qos == QoS::AtMostOnce || self.inflight.len() == 1 {
            let prefix = self.inflight.front().map_or(self.seq, |f| f.seq);
            ps.acked_prefix.store(prefix, Ordering::Relaxed);
        }
        Ok(())
    }
}
