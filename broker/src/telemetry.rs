//! Logs and counters.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

pub fn init_logging(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_env("JETMQ_LOG").unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if config.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// The node's counters, exported on /metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_total: Counter,
    pub messages_received: Counter,
    pub messages_sent: Counter,
    pub dropped_qos0: Counter,
    pub dropped_queue_full: Counter,
    pub protocol_errors: Counter,
    pub takeovers: Counter,
    pub session_replays: Counter,
    pub wills_published: Counter,
    /// 1 while the node drains (see [`crate::server`]).
    pub draining: Gauge,
    pub drain_disconnects: Counter,
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self, subscriptions: usize) -> String {
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        line(
            "jetmq_connections",
            "gauge",
            "Open MQTT connections.",
            self.connections.get().to_string(),
        );
        line(
            "jetmq_connections_total",
            "counter",
            "MQTT connections accepted.",
            self.connections_total.get().to_string(),
        );
        line(
            "jetmq_subscriptions",
            "gauge",
            "Subscriptions of sessions on this node.",
            subscriptions.to_string(),
        );
        line(
            "jetmq_messages_received_total",
            "counter",
            "PUBLISH packets received from clients.",
            self.messages_received.get().to_string(),
        );
        line(
            "jetmq_messages_sent_total",
            "counter",
            "PUBLISH packets sent to clients.",
            self.messages_sent.get().to_string(),
        );
        line(
            "jetmq_messages_dropped_qos0_total",
            "counter",
            "QoS 0 messages dropped for slow subscribers.",
            self.dropped_qos0.get().to_string(),
        );
        line(
            "jetmq_messages_dropped_queue_full_total",
            "counter",
            "Messages dropped because a session queue was full.",
            self.dropped_queue_full.get().to_string(),
        );
        line(
            "jetmq_protocol_errors_total",
            "counter",
            "Connections closed for protocol violations.",
            self.protocol_errors.get().to_string(),
        );
        line(
            "jetmq_session_takeovers_total",
            "counter",
            "Sessions taken over by a newer connection.",
            self.takeovers.get().to_string(),
        );
        line(
            "jetmq_session_replays_total",
            "counter",
            "Catch-up replays run for sessions.",
            self.session_replays.get().to_string(),
        );
        line(
            "jetmq_wills_published_total",
            "counter",
            "Will messages published.",
            self.wills_published.get().to_string(),
        );
        line(
            "jetmq_draining",
            "gauge",
            "1 while the node drains: unready, listeners closed, clients sent away in waves.",
            self.draining.get().to_string(),
        );
        line(
            "jetmq_drain_disconnects_total",
            "counter",
            "Clients asked to leave by a drain.",
            self.drain_disconnects.get().to_string(),
        );
        out
    }
}
