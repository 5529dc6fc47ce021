//! The publish/subscribe scenario behind fan-in, fan-out and the many-clients test:
//! N publishers (as fast as a window allows, or at a fixed rate each), M subscribers,
//! end-to-end latency from the payload's timestamp, loss and duplicates from its sequence
//! numbers.
//!
//! This file holds the options, the topology (which subscriber gets which publisher's
//! messages), the run through the [`Runner`]'s phases and the report; `worker.rs` holds the
//! client connections.

mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use jetmq_codec::QoS;
use serde::Serialize;
use serde_json::json;

use crate::client::ConnOpts;
use crate::common::{secs, Common};
use crate::payload;
use crate::scenario::Runner;
use crate::stats::{ErrorLog, Latency, Recorder, SeqTracker};
use crate::topic;
use worker::{Role, Worker};

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
    let pub_qos = qos(args.qos);
    let sub_qos = args.sub_qos.map(qos).unwrap_or(pub_qos);
    let (shared, pairs) = topology(&args, run_id, pub_qos, sub_qos);
    let shared = Arc::new(shared);
    let mut runner = Runner::new(c, c.hard_timeout(), run_id);
    let connector = runner.connector();

    // Subscribers first, all subscribed before anyone publishes.
    let setup_start = Instant::now();
    for s in 0..args.subscribers {
        let opts = conn_opts(&args, s, format!("{}-s{s}", runner.prefix));
        let w = Worker::new(shared.clone(), Role::Sub(s), &args, runner.phases());
        runner.spawn(w.run(opts, connector.clone()));
    }
    let note = "hard timeout while connecting subscribers";
    runner.wait_set_up(args.subscribers, note).await;
    // Then publishers.
    for p in 0..args.publishers {
        let i = args.subscribers + p;
        let opts = conn_opts(&args, i, format!("{}-p{p}", runner.prefix));
        let w = Worker::new(shared.clone(), Role::Pub(p), &args, runner.phases());
        runner.spawn(w.run(opts, connector.clone()));
    }
    let note = "hard timeout while connecting publishers";
    runner
        .wait_set_up(args.subscribers + args.publishers, note)
        .await;
    let setup_secs = setup_start.elapsed().as_secs_f64();
    runner.monitor.mark("connected");

    // Measured phase.
    let run_start = runner.start_run(&shared.run_start_ns);
    let progress = tokio::spawn(progress_log(shared.clone(), args.progress));
    runner.sleep_until(run_start + secs(c.duration)).await;
    let publish_secs = runner.end_run(run_start);

    // Drain: wait for outstanding acks and deliveries, or until nothing moves for 3 s.
    let moved = || {
        let acked: u64 = shared
            .pubs
            .iter()
            .map(|p| p.acked.load(Ordering::Relaxed))
            .sum();
        (shared.received.load(Ordering::Relaxed), acked)
    };
    let quiet = Duration::from_secs(3);
    runner
        .drain(secs(args.drain), quiet, moved, || all_delivered(&shared))
        .await;
    progress.abort();
    runner
        .close(Duration::from_secs(10), Some("connections"))
        .await;
    runner.note_if_out_of_time();

    let report = report(&shared, &args, publish_secs, setup_secs, pairs);
    let params = json!({
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
    });
    let ok = report.connect.failed == 0 && report.unexpected_close == 0;
    Ok(runner.finish("pubsub", params, ok, report))
}

/// Connection options of client `i` (subscribers first, then publishers).
fn conn_opts(args: &PubsubArgs, i: usize, client_id: String) -> ConnOpts {
    let mut o = args.common.conn_opts(i, client_id, !args.persistent);
    if args.persistent {
        o.session_expiry = Some(args.session_expiry);
    }
    o
}

/// The shared state of a run and the number of (publisher, subscriber) pairs: which
/// subscriber should get which publisher's messages.
fn topology(args: &PubsubArgs, run_id: &str, pub_qos: QoS, sub_qos: QoS) -> (Shared, u64) {
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
    let shared = Shared {
        pubs,
        subs,
        latency: Recorder::new(16),
        ack_latency: Recorder::new(16),
        errors: ErrorLog::default(),
        connected: AtomicU64::new(0),
        connect_failed: AtomicU64::new(0),
        unexpected_close: AtomicU64::new(0),
        received: AtomicU64::new(0),
        first_recv_ns: AtomicU64::new(u64::MAX),
        last_recv_ns: AtomicU64::new(0),
        last_ack_ns: AtomicU64::new(0),
        run_start_ns: AtomicU64::new(0),
        pub_qos,
        sub_qos,
    };
    (shared, pairs)
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
