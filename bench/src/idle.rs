//! Idle connections: open N connections (optionally each with one subscription), hold them,
//! and record the brokers' RSS before and after: memory per connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use jetmq_codec::{Packet, PubResp, QoS, ReasonCode};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::client::{Conn, ReadOutcome};
use crate::common::{secs, wait_until, Common, Deadline};
use crate::procmon::Monitor;
use crate::stats::{ErrorLog, Recorder};
use crate::topic;

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Subscribe each connection to its own topic (this template, QoS 1).
    #[arg(long)]
    pub subscribe: Option<String>,
    /// Seconds to wait after the last connection before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
}

pub async fn run(args: IdleArgs, run_id: &str) -> Result<serde_json::Value> {
    let c = &args.common;
    let deadline = Deadline::after(c.hard_timeout());
    let prefix = c
        .client_prefix
        .clone()
        .unwrap_or_else(|| format!("jb-{run_id}"));
    let monitor = Monitor::start(c.watch.clone());
    // Let the brokers settle from start-up; then take the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    monitor.mark("before");

    let errors = Arc::new(ErrorLog::default());
    let connected = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let connack = Arc::new(Recorder::new(8));
    let (close_tx, close_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(c.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for i in 0..args.connections {
        let opts = c.conn_opts(i, format!("{prefix}-i{i}"), true);
        let filter = args
            .subscribe
            .as_ref()
            .map(|t| topic::expand(t, i, 1, run_id));
        let (errors, connected, finished, dropped, connack, sem) = (
            errors.clone(),
            connected.clone(),
            finished.clone(),
            dropped.clone(),
            connack.clone(),
            sem.clone(),
        );
        let mut close_rx = close_rx.clone();
        let timeout = c.connect_timeout();
        tasks.spawn(async move {
            let setup = async {
                let _permit = sem.acquire().await;
                let t0 = Instant::now();
                let (mut conn, _) = Conn::open(&opts).await?;
                connack.record_ns(i, t0.elapsed().as_nanos() as u64);
                if let Some(f) = filter {
                    conn.subscribe(1, &[f], QoS::AtLeastOnce, timeout, |_, _| Ok(()))
                        .await?;
                }
                anyhow::Ok(conn)
            };
            let result = setup.await;
            finished.fetch_add(1, Ordering::Relaxed);
            let mut conn = match result {
                Ok(conn) => conn,
                Err(e) => {
                    errors.add(format!("{e:#}"));
                    return;
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            match hold(&mut conn, &mut close_rx, opts.keepalive).await {
                Ok(()) => conn.disconnect().await,
                Err(e) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    errors.add(format!("{e:#}"));
                }
            }
        });
    }
    let n = args.connections as u64;
    let all = wait_until(deadline.0, || finished.load(Ordering::Relaxed) >= n).await;
    let connect_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep_until(deadline.cap(Instant::now() + secs(args.settle)).into()).await;
    monitor.mark("connected");
    let hold_until = deadline.cap(Instant::now() + secs(c.duration));
    tokio::time::sleep_until(hold_until.into()).await;
    monitor.mark("held");
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
    let processes = monitor.report();
    let ok = connected.load(Ordering::Relaxed);
    let per_conn: serde_json::Map<String, serde_json::Value> = processes
        .iter()
        .filter(|(name, _)| name.as_str() != "loadgen")
        .filter_map(|(name, p)| {
            let before = *p.rss_marks_kb.get("before")?;
            let after = *p.rss_marks_kb.get("connected")?;
            let kb = if ok > 0 {
                (after as f64 - before as f64) / ok as f64
            } else {
                0.0
            };
            Some((name.clone(), json!(kb)))
        })
        .collect();
    let loadgen_kb = processes.get("loadgen").map(|p| {
        let before = p.rss_marks_kb.get("before").copied().unwrap_or(0) as f64;
        let after = p.rss_marks_kb.get("connected").copied().unwrap_or(0) as f64;
        if ok > 0 {
            (after - before) / ok as f64
        } else {
            0.0
        }
    });
    let mut notes = Vec::new();
    if !all {
        notes.push("hard timeout while connecting");
    }
    Ok(json!({
        "scenario": "idle",
        "params": {
            "connections": args.connections,
            "subscribe": args.subscribe,
            "hold": c.duration,
            "mqtt": format!("{:?}", c.mqtt),
            "targets": c.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        },
        "ok": all && ok == n && dropped.load(Ordering::Relaxed) == 0,
        "notes": notes,
        "result": {
            "connect": {
                "attempted": n,
                "ok": ok,
                "failed": n - ok.min(n),
                "secs": connect_secs,
                "connack_ms": connack.summary(),
            },
            "dropped_while_idle": dropped.load(Ordering::Relaxed),
            "rss_per_connection_kb": per_conn,
            "loadgen_rss_per_connection_kb": loadgen_kb,
            "errors": errors.snapshot(),
        },
        "processes": processes,
        "kernel_tcp": monitor.tcp(),
    }))
}

/// Keeps an idle connection alive (answers pings, acknowledges anything delivered) until
/// told to close.
pub async fn hold(
    conn: &mut Conn,
    close: &mut watch::Receiver<bool>,
    keepalive: u16,
) -> Result<()> {
    let ka = Duration::from_secs(u64::from(keepalive));
    loop {
        if *close.borrow() {
            return Ok(());
        }
        let ping_at = conn.last_write + ka * 3 / 4;
        if keepalive > 0 && Instant::now() >= ping_at {
            conn.queue(&Packet::PingReq)?;
        }
        conn.try_flush()?;
        let want_write = !conn.wbuf.is_empty();
        enum Ev {
            Read(std::io::Result<()>),
            Write(std::io::Result<()>),
            Close,
            Tick,
        }
        let ev = tokio::select! {
            r = conn.readable() => Ev::Read(r),
            r = conn.writable(), if want_write => Ev::Write(r),
            _ = close.changed() => Ev::Close,
            _ = tokio::time::sleep_until(ping_at.into()), if keepalive > 0 => Ev::Tick,
        };
        match ev {
            Ev::Read(r) => {
                r?;
                match conn.try_fill()? {
                    ReadOutcome::Eof => anyhow::bail!("connection closed by broker"),
                    ReadOutcome::WouldBlock => {}
                    ReadOutcome::Data => {
                        while let Some(p) = conn.next_packet()? {
                            match p {
                                Packet::Publish(p) if p.qos == QoS::AtLeastOnce => conn.queue(
                                    &Packet::PubAck(PubResp::new(p.packet_id, ReasonCode::SUCCESS)),
                                )?,
                                Packet::Publish(p) if p.qos == QoS::ExactlyOnce => conn.queue(
                                    &Packet::PubRec(PubResp::new(p.packet_id, ReasonCode::SUCCESS)),
                                )?,
                                Packet::PubRel(r) => conn.queue(&Packet::PubComp(PubResp::new(
                                    r.packet_id,
                                    ReasonCode::SUCCESS,
                                )))?,
                                Packet::Disconnect(d) => {
                                    anyhow::bail!("DISCONNECT from broker: 0x{:02x}", d.reason.0)
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
            Ev::Write(r) => r?,
            Ev::Close => return Ok(()),
            Ev::Tick => {}
        }
    }
}
