//! `jetmq-bench`: MQTT load generator for jetmq and its peers.
//!
//! Scenarios:
//! * `pubsub`: N publishers, M subscribers; fan-in, fan-out and many-clients tests.
//! * `idle`: N idle connections; broker memory per connection.
//! * `reconnect`: a storm of N persistent sessions reconnecting at once.
//! * `failover`: persistent-session clients over several nodes, one node killed with -9.
//!
//! Every run is bounded by `--duration` and a hard `--timeout`; the result is one JSON
//! document (stdout or `--json FILE`), a one-line summary goes to stderr.
//!
//! The phases `pubsub`, `reconnect` and `failover` share (connect the clients, measure,
//! drain, close, report) are run by [`scenario::Runner`].

mod client;
mod common;
mod failover;
mod idle;
mod payload;
mod procmon;
mod pubsub;
mod reconnect;
mod scenario;
mod stats;
mod topic;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "jetmq-bench",
    version,
    about = "MQTT load generator for jetmq and its peers"
)]
struct Cli {
    /// Worker threads of the load generator (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Publishers and subscribers: throughput, end-to-end latency, loss, duplicates.
    Pubsub(pubsub::PubsubArgs),
    /// Idle connections: broker memory per connection.
    Idle(idle::IdleArgs),
    /// Reconnect storm of persistent sessions.
    Reconnect(reconnect::ReconnectArgs),
    /// Node failure: persistent sessions fail over when one broker process is killed.
    Failover(failover::FailoverArgs),
}

impl Cmd {
    fn common(&self) -> &common::Common {
        match self {
            Cmd::Pubsub(a) => &a.common,
            Cmd::Idle(a) => &a.common,
            Cmd::Reconnect(a) => &a.common,
            Cmd::Failover(a) => &a.common,
        }
    }

    fn hard_timeout(&self) -> Duration {
        match self {
            Cmd::Failover(a) => a.hard_timeout(),
            other => other.common().hard_timeout(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nofile = common::raise_nofile();
    let _ = payload::epoch();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = cli.threads {
        builder.worker_threads(t.max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jetmq-bench: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let c = cli.cmd.common().clone();
    let hard = cli.cmd.hard_timeout() + Duration::from_secs(30);
    let run_id = common::run_id();
    let started = std::time::Instant::now();
    let result = runtime.block_on(async {
        let work = async {
            match cli.cmd {
                Cmd::Pubsub(a) => pubsub::run(a, &run_id).await,
                Cmd::Idle(a) => idle::run(a, &run_id).await,
                Cmd::Reconnect(a) => reconnect::run(a, &run_id).await,
                Cmd::Failover(a) => failover::run(a, &run_id).await,
            }
        };
        match tokio::time::timeout(hard, work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("hard timeout ({} s)", hard.as_secs())),
        }
    });
    let mut value = match result {
        Ok(v) => v,
        Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
    };
    if let Some(obj) = value.as_object_mut() {
        obj.insert("label".into(), serde_json::json!(c.label));
        obj.insert("run_id".into(), serde_json::json!(run_id));
        obj.insert(
            "wall_secs".into(),
            serde_json::json!(started.elapsed().as_secs_f64()),
        );
        obj.insert("loadgen_nofile".into(), serde_json::json!(nofile));
    }
    eprintln!("{}", summary_line(&value));
    let text = match serde_json::to_string_pretty(&value) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("jetmq-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match &c.json {
        Some(path) => {
            if let Err(e) = std::fs::write(path, text + "\n") {
                eprintln!("jetmq-bench: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        None => println!("{text}"),
    }
    // Shut down without waiting for stuck connections.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if value.get("error").is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn summary_line(v: &serde_json::Value) -> String {
    let g = |p: &str| v.pointer(p).cloned().unwrap_or(serde_json::Value::Null);
    let f = |p: &str| g(p).as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    match v.get("scenario").and_then(|s| s.as_str()) {
        Some("pubsub") => format!(
            "[{}] pubsub ok={} sent={} acked={} recv={} lost={} dup={} recv/s={} ack/s={} p50={}ms p99={}ms max={}ms",
            g("/label"),
            g("/ok"),
            g("/result/publish/sent"),
            g("/result/publish/acked"),
            g("/result/receive/received"),
            g("/result/receive/lost"),
            g("/result/receive/duplicates"),
            f("/result/receive/rate"),
            f("/result/publish/ack_rate"),
            f("/result/receive/latency_ms/p50"),
            f("/result/receive/latency_ms/p99"),
            f("/result/receive/latency_ms/max"),
        ),
        Some("idle") => format!(
            "[{}] idle ok={} connected={} KB/conn={}",
            g("/label"),
            g("/ok"),
            g("/result/connect/ok"),
            g("/result/rss_per_connection_kb"),
        ),
        Some("reconnect") => format!(
            "[{}] reconnect ok={} present={} absent={} failed={} storm={}s offline={}/{}",
            g("/label"),
            g("/ok"),
            g("/result/storm/session_present"),
            g("/result/storm/session_absent"),
            g("/result/storm/failed"),
            f("/result/storm/secs"),
            g("/result/offline/delivered"),
            g("/result/offline/expected"),
        ),
        Some("failover") => format!(
            "[{}] failover ok={} dropped={} resumed={} absent={} resume={}s sent={} acked={} lost={} dup1={} dup2={} order={} all_back={}",
            g("/label"),
            g("/ok"),
            g("/result/kill/clients_dropped"),
            g("/result/kill/resumed_session_present"),
            g("/result/kill/resumed_session_absent"),
            f("/result/kill/last_resume_secs"),
            g("/result/publish/sent"),
            g("/result/publish/acked"),
            g("/result/receive/lost"),
            g("/result/receive/duplicates_qos1"),
            g("/result/receive/duplicates_qos2"),
            g("/result/receive/order_violations"),
            g("/result/kill/all_connected_at_end"),
        ),
        _ => format!("[{}] error: {}", g("/label"), g("/error")),
    }
}
