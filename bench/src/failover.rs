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
//!
//! This file holds the options, the run through the [`Runner`]'s phases, the kill and the
//! report; `client.rs` holds the clients with their reconnect loop and session state.

mod client;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use jetmq_codec::QoS;
use serde_json::json;

use crate::common::{secs, Common};
use crate::payload;
use crate::procmon::Watched;
use crate::scenario::Runner;
use crate::stats::{ErrorLog, Recorder, SeqTracker};
use client::Client;

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

    fn new(targets: Vec<SocketAddr>, n: usize, timeline_secs: usize) -> Shared {
        Shared {
            targets,
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
        }
    }
}

/// The state of the clients when publishing and draining are over, taken before they are
/// told to close (which ends their reconnect loops too).
struct AtEnd {
    down: u64,
    connected: u64,
    /// Since the start of publishing: the timeline's length.
    timeline: Duration,
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
    let n = args.clients;
    let timeline_secs = (args.warmup + c.duration + args.drain + 30.0).ceil() as usize;
    let shared = Arc::new(Shared::new(c.targets.clone(), n, timeline_secs));
    let mut runner = Runner::new(c, args.hard_timeout(), run_id);
    let connector = runner.connector();

    let setup_start = Instant::now();
    for i in 0..n {
        let phases = runner.phases();
        let client = Client::new(i, &args, &runner.prefix, run_id, shared.clone(), phases);
        runner.spawn(client.run(connector.clone(), runner.deadline));
    }
    runner.wait_set_up(n, "hard timeout while connecting").await;
    let setup_secs = setup_start.elapsed().as_secs_f64();
    runner.monitor.mark("connected");

    let run_start = runner.start_run(&shared.run_start_ns);
    let sampler = tokio::spawn(sample_connected(shared.clone(), args.progress));

    // Warm-up, then the kill.
    runner.sleep_until(run_start + secs(args.warmup)).await;
    let killed = match &args.kill {
        Some(victim) => kill(victim, &mut runner, &shared),
        None => None,
    };
    let kill_offset = killed.map(|k| k.duration_since(run_start).as_secs_f64());
    runner.sleep_until(Instant::now() + secs(c.duration)).await;
    let publish_secs = runner.end_run(run_start);

    // Drain: every sent message acknowledged and delivered, or nothing moving for 5 s.
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let moved = || (ld(&shared.acked), ld(&shared.unique_received));
    let all_done = || {
        let sent = ld(&shared.sent);
        ld(&shared.acked) + ld(&shared.rejected) >= sent && ld(&shared.unique_received) >= sent
    };
    let quiet = Duration::from_secs(5);
    runner.drain(secs(args.drain), quiet, moved, all_done).await;
    let at_end = AtEnd {
        down: ld(&shared.down),
        timeline: run_start.elapsed(),
        connected: ld(&shared.connected),
    };
    runner.close(Duration::from_secs(15), Some("clients")).await;
    sampler.abort();
    runner.note_if_out_of_time();

    let times = Times {
        setup_secs,
        publish_secs,
        killed: killed.is_some(),
        kill_offset,
    };
    let (ok, result) = report(&args, &shared, &times, &at_end);
    let params = json!({
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
    });
    Ok(runner.finish("failover", params, ok, result))
}

/// Kills `victim` with SIGKILL and records the moment in `shared.kill_ns`; returns it, or
/// notes why the kill failed.
fn kill(victim: &Watched, runner: &mut Runner, shared: &Shared) -> Option<Instant> {
    runner.monitor.mark("before_kill");
    let kill_at = Instant::now();
    // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
    let rc = unsafe { libc::kill(victim.pid as libc::pid_t, libc::SIGKILL) };
    if rc == 0 {
        shared
            .kill_ns
            .store(payload::instant_ns(kill_at), Ordering::Relaxed);
        Some(kill_at)
    } else {
        runner.notes.push(format!(
            "kill -9 {} ({}) failed: {}",
            victim.pid,
            victim.name,
            std::io::Error::last_os_error()
        ));
        None
    }
}

/// How long set-up and publishing took, and when the kill was.
struct Times {
    setup_secs: f64,
    publish_secs: f64,
    /// The kill was done.
    killed: bool,
    /// Seconds from the start of publishing to the kill.
    kill_offset: Option<f64>,
}

/// The run's verdict (apart from its notes) and its `result`: loss, duplicates and order
/// from the per-message trackers, the failover from the kill counters, the timeline.
fn report(
    args: &FailoverArgs,
    shared: &Shared,
    times: &Times,
    at_end: &AtEnd,
) -> (bool, serde_json::Value) {
    let n = args.clients;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
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
    let all_back = at_end.down == 0 && at_end.connected == n as u64;
    let session_lost = ld(&shared.session_lost_after_kill);
    let last_resume_secs = since_kill(ld(&shared.last_resume_ns));
    // Only a number when every dropped client came back with its session.
    let resume_secs = if dropped > 0 && all_back && session_lost == 0 {
        last_resume_secs
    } else {
        None
    };
    let timeline = timeline_json(shared, at_end.timeline);
    let sent = ld(&shared.sent);
    let acked = ld(&shared.acked);
    let ok = ld(&shared.setup_failed) == 0
        && lost == 0
        && dup2 == 0
        && order_violations == [0, 0]
        && all_back
        && session_lost == 0
        && (args.kill.is_none() || times.killed);
    let result = json!({
        "connect": {
            "ok": n as u64 - ld(&shared.setup_failed),
            "failed": ld(&shared.setup_failed),
            "secs": times.setup_secs,
        },
        "kill": {
            "done": times.killed,
            "at_secs": times.kill_offset,
            "clients_dropped": dropped,
            "resumed_session_present": resumed,
            "resumed_session_absent": session_lost,
            "all_connected_at_end": all_back,
            "connected_at_end": at_end.connected,
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
            "secs": times.publish_secs,
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
    });
    (ok, result)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_alternates() {
        assert_eq!(QosMix::Mix.for_seq(0), QoS::AtLeastOnce);
        assert_eq!(QosMix::Mix.for_seq(1), QoS::ExactlyOnce);
        assert_eq!(QosMix::Two.for_seq(0), QoS::ExactlyOnce);
    }
}
