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
use tokio::task::JoinSet;

use crate::client::{Conn, ConnOpts};
use crate::common::{secs, wait_until, Common, Deadline};
use crate::procmon::Monitor;
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
    let deadline = Deadline::after(c.hard_timeout());
    let prefix = c
        .client_prefix
        .clone()
        .unwrap_or_else(|| format!("jb-{run_id}"));
    let monitor = Monitor::start(c.watch.clone());
    let errors = Arc::new(ErrorLog::default());
    let n = args.sessions;
    let mut notes: Vec<String> = Vec::new();

    // 1. Create the sessions.
    let t0 = Instant::now();
    let created = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let o = opts(c, i, &prefix, args.session_expiry);
        let filter = topic::expand(&args.topic, i, 1, run_id);
        let (created, done, errors, sem) =
            (created.clone(), done.clone(), errors.clone(), sem.clone());
        let mut go = go_rx.clone();
        let timeout = c.connect_timeout();
        tasks.spawn(async move {
            let setup = async {
                let _permit = sem.acquire().await;
                let (mut conn, _) = Conn::open(&o).await?;
                let reasons = conn
                    .subscribe(1, &[filter], QoS::AtLeastOnce, timeout, |_, _| Ok(()))
                    .await?;
                if reasons.first().is_none_or(|r| r.is_error()) {
                    bail!("SUBACK refused");
                }
                anyhow::Ok(conn)
            };
            let r = setup.await;
            done.fetch_add(1, Ordering::Relaxed);
            match r {
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
    if !wait_until(deadline.0, || done.load(Ordering::Relaxed) >= n as u64).await {
        notes.push("hard timeout while creating sessions".into());
    }
    let create_secs = t0.elapsed().as_secs_f64();
    monitor.mark("sessions_online");
    let _ = go_tx.send(true);
    while tasks.join_next().await.is_some() {}
    monitor.mark("sessions_offline");

    // 2. Optionally queue messages for the offline sessions.
    let mut offline_published = 0u64;
    if args.offline_messages > 0 && !deadline.passed() {
        match publish_offline(&args, &prefix, run_id, deadline).await {
            Ok(k) => offline_published = k,
            Err(e) => notes.push(format!("offline publish failed: {e:#}")),
        }
    }
    tokio::time::sleep_until(deadline.cap(Instant::now() + secs(args.pause)).into()).await;

    // 3. The storm.
    let connack = Arc::new(Recorder::new(16));
    let delivery = Arc::new(Recorder::new(16));
    let present = Arc::new(AtomicU64::new(0));
    let absent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let all_delivered = Arc::new(AtomicU64::new(0));
    let delivered_msgs = Arc::new(AtomicU64::new(0));
    let last_connack_ns = Arc::new(AtomicU64::new(0));
    let last_delivery_ns = Arc::new(AtomicU64::new(0));
    let (close_tx, close_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(false);
    let storm_sem = Arc::new(Semaphore::new(if args.storm_concurrency == 0 {
        n.max(1)
    } else {
        args.storm_concurrency
    }));
    let want_msgs = u64::from(args.offline_messages);
    for i in 0..n {
        let o = opts(c, i, &prefix, args.session_expiry);
        let (connack, delivery, present, absent, failed, finished, all_delivered, delivered_msgs) = (
            connack.clone(),
            delivery.clone(),
            present.clone(),
            absent.clone(),
            failed.clone(),
            finished.clone(),
            all_delivered.clone(),
            delivered_msgs.clone(),
        );
        let (last_connack_ns, last_delivery_ns, errors, sem) = (
            last_connack_ns.clone(),
            last_delivery_ns.clone(),
            errors.clone(),
            storm_sem.clone(),
        );
        let mut close = close_rx.clone();
        let mut start = start_rx.clone();
        let deliver_limit = c.connect_timeout();
        tasks.spawn(async move {
            let _ = start.wait_for(|v| *v).await;
            let t = Instant::now();
            let opened = {
                let _permit = sem.acquire().await;
                Conn::open(&o).await
            };
            let (mut conn, ack) = match opened {
                Ok(x) => x,
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    finished.fetch_add(1, Ordering::Relaxed);
                    errors.add(format!("storm: {e:#}"));
                    return;
                }
            };
            let took = t.elapsed();
            connack.record_ns(i, took.as_nanos() as u64);
            stamp(&last_connack_ns, crate::payload::now_ns());
            if ack.session_present {
                present.fetch_add(1, Ordering::Relaxed);
            } else {
                absent.fetch_add(1, Ordering::Relaxed);
            }
            // Queued messages.
            let mut got = 0u64;
            if want_msgs > 0 {
                let r = tokio::time::timeout(deliver_limit, async {
                    while got < want_msgs {
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
                delivered_msgs.fetch_add(got, Ordering::Relaxed);
                match r {
                    Ok(Ok(())) => {
                        all_delivered.fetch_add(1, Ordering::Relaxed);
                        delivery.record_ns(i, t.elapsed().as_nanos() as u64);
                        stamp(&last_delivery_ns, crate::payload::now_ns());
                    }
                    Ok(Err(e)) => errors.add(format!("queued messages: {e:#}")),
                    Err(_) => errors.add("queued messages: not all delivered in time"),
                }
            }
            finished.fetch_add(1, Ordering::Relaxed);
            let _ = crate::idle::hold(&mut conn, &mut close, o.keepalive).await;
            conn.disconnect().await;
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let storm_start = Instant::now();
    let storm_start_ns = crate::payload::instant_ns(storm_start);
    let _ = start_tx.send(true);
    if !wait_until(deadline.0, || finished.load(Ordering::Relaxed) >= n as u64).await {
        notes.push("hard timeout during the storm".into());
    }
    let storm_all_secs = storm_start.elapsed().as_secs_f64();
    monitor.mark("reconnected");
    let _ = close_tx.send(true);
    let close_limit = deadline.cap(Instant::now() + Duration::from_secs(15));
    while !tasks.is_empty() {
        match tokio::time::timeout_at(close_limit.into(), tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let since = |ns: u64| {
        if ns > storm_start_ns {
            (ns - storm_start_ns) as f64 / 1e9
        } else {
            0.0
        }
    };
    let created = ld(&created);
    let ok = created == n as u64 && ld(&present) == n as u64 && ld(&failed) == 0;
    Ok(json!({
        "scenario": "reconnect",
        "params": {
            "sessions": n,
            "offline_messages": args.offline_messages,
            "pause": args.pause,
            "storm_concurrency": args.storm_concurrency,
            "mqtt": format!("{:?}", c.mqtt),
            "targets": c.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        },
        "ok": ok && notes.is_empty(),
        "notes": notes,
        "result": {
            "create": {"ok": created, "failed": n as u64 - created.min(n as u64), "secs": create_secs},
            "storm": {
                "connack_ok": ld(&present) + ld(&absent),
                "session_present": ld(&present),
                "session_absent": ld(&absent),
                "failed": ld(&failed),
                // Time from the storm's start until the last CONNACK.
                "secs": since(ld(&last_connack_ns)),
                "all_done_secs": storm_all_secs,
                "connack_ms": connack.summary(),
            },
            "offline": {
                "published": offline_published,
                "expected": want_msgs * created,
                "delivered": ld(&delivered_msgs),
                "sessions_complete": ld(&all_delivered),
                "secs": since(ld(&last_delivery_ns)),
                "latency_ms": delivery.summary(),
            },
            "errors": errors.snapshot(),
        },
        "processes": monitor.report(),
        "kernel_tcp": monitor.tcp(),
    }))
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
