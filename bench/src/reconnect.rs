//! Reconnect storm: N persistent sessions connect (clean session 0) and subscribe, disconnect,
//! optionally get messages queued while offline, then all reconnect at once. Measures the time
//! until every client has its CONNACK with session present (and its queued messages).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use jetmq_codec::{Packet, PubResp, Publish, QoS, ReasonCode};
use serde_json::json;
use tokio::sync::{watch, Semaphore};

use crate::client::{Conn, ConnOpts};
use crate::common::{secs, Common, Deadline};
use crate::scenario::Runner;
use crate::stats::{stamp, ErrorLog, Recorder};
use crate::topic;

#[derive(Debug, Clone, Args)]
pub struct ReconnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Persistent sessions.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Topic template each session subscribes to ({i} = session index).
    #[arg(long, default_value = "bench/{run}/rs/{i}")]
    pub topic: String,
    /// Seconds between the disconnect of all and the storm.
    #[arg(long, default_value_t = 2.0)]
    pub pause: f64,
    /// QoS 1 messages published to each session's topic while it is offline.
    #[arg(long, default_value_t = 0)]
    pub offline_messages: u32,
    /// Reconnection attempts in flight at once during the storm (0 = all).
    #[arg(long, default_value_t = 0)]
    pub storm_concurrency: usize,
    /// MQTT 5 session expiry, seconds.
    #[arg(long, default_value_t = 3600)]
    pub session_expiry: u32,
}

fn opts(c: &Common, i: usize, prefix: &str, expiry: u32) -> ConnOpts {
    let mut o = c.conn_opts(i, format!("{prefix}-r{i}"), false);
    o.session_expiry = Some(expiry);
    o
}

pub async fn run(args: ReconnectArgs, run_id: &str) -> Result<serde_json::Value> {
    let c = &args.common;
    let mut runner = Runner::new(c, c.hard_timeout(), run_id);
    let errors = Arc::new(ErrorLog::default());
    let n = args.sessions;

    // 1. Create the sessions.
    let t0 = Instant::now();
    let created = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = watch::channel(false);
    let connector = runner.connector();
    for i in 0..n {
        let o = opts(c, i, &runner.prefix, args.session_expiry);
        let filter = topic::expand(&args.topic, i, 1, run_id);
        let (created, errors, connector) = (created.clone(), errors.clone(), connector.clone());
        let mut go = go_rx.clone();
        let timeout = c.connect_timeout();
        runner.spawn(async move {
            let setup = async {
                let (mut conn, _) = Conn::open(&o).await?;
                let reasons = conn
                    .subscribe(1, &[filter], QoS::AtLeastOnce, timeout, |_, _| Ok(()))
                    .await?;
                if reasons.first().is_none_or(|r| r.is_error()) {
                    bail!("SUBACK refused");
                }
                anyhow::Ok(conn)
            };
            match connector.set_up(setup).await {
                Ok(conn) => {
                    created.fetch_add(1, Ordering::Relaxed);
                    // Everyone disconnects together once all are subscribed.
                    let _ = go.wait_for(|v| *v).await;
                    conn.disconnect().await;
                }
                Err(e) => errors.add(format!("create: {e:#}")),
            }
        });
    }
    runner
        .wait_set_up(n, "hard timeout while creating sessions")
        .await;
    let create_secs = t0.elapsed().as_secs_f64();
    runner.monitor.mark("sessions_online");
    let _ = go_tx.send(true);
    runner.join().await;
    runner.monitor.mark("sessions_offline");

    // 2. Optionally queue messages for the offline sessions.
    let mut offline_published = 0u64;
    if args.offline_messages > 0 && !runner.deadline.passed() {
        match publish_offline(&args, &runner.prefix, run_id, runner.deadline).await {
            Ok(k) => offline_published = k,
            Err(e) => runner.notes.push(format!("offline publish failed: {e:#}")),
        }
    }
    runner.sleep_until(Instant::now() + secs(args.pause)).await;

    // 3. The storm.
    let storm = Arc::new(Storm {
        connack: Recorder::new(16),
        delivery: Recorder::new(16),
        present: AtomicU64::new(0),
        absent: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        all_delivered: AtomicU64::new(0),
        delivered_msgs: AtomicU64::new(0),
        last_connack_ns: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        errors: errors.clone(),
        permits: Semaphore::new(if args.storm_concurrency == 0 {
            n.max(1)
        } else {
            args.storm_concurrency
        }),
        want_msgs: u64::from(args.offline_messages),
        deliver_limit: c.connect_timeout(),
    });
    let (close_tx, close_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(false);
    for i in 0..n {
        let o = opts(c, i, &runner.prefix, args.session_expiry);
        let (start, close) = (start_rx.clone(), close_rx.clone());
        runner.spawn(reconnect_one(i, o, storm.clone(), start, close));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let storm_start = Instant::now();
    let storm_start_ns = crate::payload::instant_ns(storm_start);
    let _ = start_tx.send(true);
    let note = "hard timeout during the storm";
    runner
        .wait_for(note, || storm.finished.load(Ordering::Relaxed) >= n as u64)
        .await;
    let storm_all_secs = storm_start.elapsed().as_secs_f64();
    runner.monitor.mark("reconnected");
    let _ = close_tx.send(true);
    runner.close(Duration::from_secs(15), None).await;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let since = |ns: u64| {
        if ns > storm_start_ns {
            (ns - storm_start_ns) as f64 / 1e9
        } else {
            0.0
        }
    };
    let created = ld(&created);
    let s = &storm;
    let ok = created == n as u64 && ld(&s.present) == n as u64 && ld(&s.failed) == 0;
    let params = json!({
        "sessions": n,
        "offline_messages": args.offline_messages,
        "pause": args.pause,
        "storm_concurrency": args.storm_concurrency,
    });
    let result = json!({
        "create": {"ok": created, "failed": n as u64 - created.min(n as u64), "secs": create_secs},
        "storm": {
            "connack_ok": ld(&s.present) + ld(&s.absent),
            "session_present": ld(&s.present),
            "session_absent": ld(&s.absent),
            "failed": ld(&s.failed),
            // Time from the storm's start until the last CONNACK.
            "secs": since(ld(&s.last_connack_ns)),
            "all_done_secs": storm_all_secs,
            "connack_ms": s.connack.summary(),
        },
        "offline": {
            "published": offline_published,
            "expected": s.want_msgs * created,
            "delivered": ld(&s.delivered_msgs),
            "sessions_complete": ld(&s.all_delivered),
            "secs": since(ld(&s.last_delivery_ns)),
            "latency_ms": s.delivery.summary(),
        },
        "errors": errors.snapshot(),
    });
    Ok(runner.finish("reconnect", params, ok, result))
}

/// The storm's settings and counters, shared by its clients.
struct Storm {
    connack: Recorder,
    delivery: Recorder,
    present: AtomicU64,
    absent: AtomicU64,
    failed: AtomicU64,
    /// Clients done: connected and got their queued messages, or failed.
    finished: AtomicU64,
    all_delivered: AtomicU64,
    delivered_msgs: AtomicU64,
    last_connack_ns: AtomicU64,
    last_delivery_ns: AtomicU64,
    errors: Arc<ErrorLog>,
    /// `--storm-concurrency`.
    permits: Semaphore,
    /// Queued messages each session should get.
    want_msgs: u64,
    deliver_limit: Duration,
}

/// One session of the storm: waits for `start`, reconnects, takes its queued messages, then
/// holds the connection until `close`.
async fn reconnect_one(
    i: usize,
    o: ConnOpts,
    storm: Arc<Storm>,
    mut start: watch::Receiver<bool>,
    mut close: watch::Receiver<bool>,
) {
    let s = &*storm;
    let _ = start.wait_for(|v| *v).await;
    let t = Instant::now();
    let opened = {
        let _permit = s.permits.acquire().await;
        Conn::open(&o).await
    };
    let (mut conn, ack) = match opened {
        Ok(x) => x,
        Err(e) => {
            s.failed.fetch_add(1, Ordering::Relaxed);
            s.finished.fetch_add(1, Ordering::Relaxed);
            s.errors.add(format!("storm: {e:#}"));
            return;
        }
    };
    let took = t.elapsed();
    s.connack.record_ns(i, took.as_nanos() as u64);
    stamp(&s.last_connack_ns, crate::payload::now_ns());
    if ack.session_present {
        s.present.fetch_add(1, Ordering::Relaxed);
    } else {
        s.absent.fetch_add(1, Ordering::Relaxed);
    }
    // Queued messages.
    let mut got = 0u64;
    if s.want_msgs > 0 {
        let r = tokio::time::timeout(s.deliver_limit, async {
            while got < s.want_msgs {
                match conn.recv().await? {
                    Some(Packet::Publish(p)) => {
                        if p.qos == QoS::AtLeastOnce {
                            conn.queue(&Packet::PubAck(PubResp::new(
                                p.packet_id,
                                ReasonCode::SUCCESS,
                            )))?;
                            conn.flush().await?;
                        }
                        got += 1;
                    }
                    Some(_) => {}
                    None => bail!("closed while waiting for queued messages"),
                }
            }
            anyhow::Ok(())
        })
        .await;
        s.delivered_msgs.fetch_add(got, Ordering::Relaxed);
        match r {
            Ok(Ok(())) => {
                s.all_delivered.fetch_add(1, Ordering::Relaxed);
                s.delivery.record_ns(i, t.elapsed().as_nanos() as u64);
                stamp(&s.last_delivery_ns, crate::payload::now_ns());
            }
            Ok(Err(e)) => s.errors.add(format!("queued messages: {e:#}")),
            Err(_) => s.errors.add("queued messages: not all delivered in time"),
        }
    }
    s.finished.fetch_add(1, Ordering::Relaxed);
    let _ = crate::idle::hold(&mut conn, &mut close, o.keepalive).await;
    conn.disconnect().await;
}

/// Publishes `offline_messages` QoS 1 messages to every session's topic from one connection
/// with a window of 100; returns how many were acknowledged.
async fn publish_offline(
    args: &ReconnectArgs,
    prefix: &str,
    run_id: &str,
    deadline: Deadline,
) -> Result<u64> {
    let c = &args.common;
    let o = c.conn_opts(0, format!("{prefix}-offline-pub"), true);
    let (mut conn, _) = Conn::open(&o).await?;
    let total = args.sessions as u64 * u64::from(args.offline_messages);
    let mut next = 0u64;
    let mut acked = 0u64;
    let mut inflight = 0u64;
    let window = 100u64;
    while acked < total {
        if deadline.passed() {
            bail!("hard timeout");
        }
        while inflight < window && next < total {
            let i = (next % args.sessions as u64) as usize;
            conn.queue(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic::expand(&args.topic, i, 1, run_id),
                packet_id: (next % 65535) as u16 + 1,
                properties: Default::default(),
                payload: bytes::Bytes::from_static(b"queued while offline"),
            }))?;
            next += 1;
            inflight += 1;
        }
        conn.flush().await?;
        match tokio::time::timeout(Duration::from_secs(30), conn.recv()).await {
            Ok(Ok(Some(Packet::PubAck(_)))) => {
                acked += 1;
                inflight -= 1;
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => bail!("closed by broker"),
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("no PUBACK within 30 s"),
        }
    }
    conn.disconnect().await;
    Ok(acked)
}
