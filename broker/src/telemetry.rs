//! Logs, traces and counters.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use jetmq_common::envelope::Envelope;
use jetmq_common::histogram::Histogram;
use jetmq_common::otel::{self, LogFormat, SpanKind, SpanTrait as _, Tracing};
use jetmq_common::prometheus::Page;
use opentelemetry::KeyValue;
use tracing_subscriber::EnvFilter;

use crate::config::Config;

/// Text lines, or JSON lines with `telemetry.log_format = "json"`; to stdout.
pub fn init_logging(config: &Config) {
    let filter =
        EnvFilter::try_from_env("JETMQ_LOG").unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // Colours only on a terminal (and without NO_COLOR): container logs and log files get
    // plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false);
    if config.telemetry.log_format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Sets up OTLP export if `telemetry.otlp_endpoint` is set; call before the Tokio runtime
/// starts (see [`Tracing::init`]). The tracer is a process global, so the publish path pays
/// one atomic load when tracing is off.
pub fn init_tracing(config: &Config) -> Result<(), otel::OtelError> {
    if let Some(t) = Tracing::init(&config.telemetry, "jetmq-broker", &config.node_id)? {
        otel::install(t);
    }
    Ok(())
}

/// Flushes queued spans; call after the runtime has stopped.
pub fn shutdown_tracing() {
    otel::shutdown_global();
}

/// A sampled PUBLISH on its way into JetStream: the span (ended by [`PublishTrace::end`])
/// and the NATS headers that carry its `traceparent` to the ingestor.
pub struct PublishTrace {
    span: otel::Span,
    pub headers: async_nats::HeaderMap,
}

impl PublishTrace {
    /// `None` when tracing is off or this trace is not sampled.
    pub fn start(topic: &str, subject: &str, envelope: &Envelope) -> Option<PublishTrace> {
        let tracing = otel::global()?;
        let span = tracing.root(
            "mqtt publish",
            SpanKind::Producer,
            vec![
                KeyValue::new("messaging.system", "jetmq"),
                KeyValue::new("messaging.destination.name", subject.to_owned()),
                KeyValue::new("mqtt.topic", topic.to_owned()),
                KeyValue::new("mqtt.qos", i64::from(envelope.qos)),
                KeyValue::new("mqtt.client_id", envelope.client_id.clone()),
            ],
        );
        let traceparent = otel::traceparent(&span)?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(otel::TRACEPARENT, traceparent.as_str());
        Some(PublishTrace { span, headers })
    }

    pub fn end(mut self, error: Option<&dyn std::fmt::Display>) {
        if let Some(e) = error {
            self.span.set_status(otel::Status::error(e.to_string()));
        }
        self.span.end();
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

    /// Sets the value; returns the previous one.
    pub fn swap(&self, value: i64) -> i64 {
        self.0.swap(value, Ordering::Relaxed)
    }
}

/// One counter per MQTT QoS level, exported with a `qos` label.
#[derive(Debug, Default)]
pub struct PerQos([Counter; 3]);

impl PerQos {
    pub fn inc(&self, qos: u8) {
        if let Some(counter) = self.0.get(usize::from(qos)) {
            counter.inc();
        }
    }

    pub fn get(&self, qos: u8) -> u64 {
        self.0.get(usize::from(qos)).map_or(0, Counter::get)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }
}

/// Who held a session when a connection resumed it.
#[derive(Debug, Clone, Copy)]
pub enum PreviousOwner {
    /// Nobody: the client had disconnected (or the janitor released a dead node's session).
    None,
    /// Another connection on this node.
    ThisNode,
    /// A connection on another node: a takeover, or a failover from a node that died.
    OtherNode,
}

impl PreviousOwner {
    const LABELS: [&'static str; 3] = ["none", "this_node", "other_node"];
}

/// The node's counters, exported on /metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_total: Counter,
    /// PUBLISH packets from clients, by their QoS.
    pub messages_received: PerQos,
    /// PUBLISH packets to clients, by the QoS they were delivered with.
    pub messages_sent: PerQos,
    /// Time from handing a QoS 1/2 message to JetStream until its publish ack (retries
    /// after "no responders" included): what a publisher waits for PUBACK/PUBREC.
    pub publish_ack_latency: Histogram,
    /// CONNECTs that started a new session (none stored, expired, or clean start).
    pub sessions_created: Counter,
    /// CONNECTs that resumed a stored session, by [`PreviousOwner`].
    pub sessions_resumed: [Counter; 3],
    pub dropped_qos0: Counter,
    pub dropped_queue_full: Counter,
    pub protocol_errors: Counter,
    pub takeovers: Counter,
    pub session_replays: Counter,
    pub wills_published: Counter,
    /// QoS 1 batches given up (lost, refused, unanswered) and published again
    /// (see [`crate::ingress::batch`]).
    pub publish_batch_failures: Counter,
    /// QoS 1 batches confirmed by JetStream: QoS 1 messages / batches = average batch size.
    pub publish_batches: Counter,
    /// QoS 1 messages confirmed as part of a batch (the rest went one by one).
    pub publish_batched_messages: Counter,
    /// Stream messages holding several QoS 1 messages (bundles), and those messages.
    pub publish_bundles: Counter,
    pub publish_bundled_messages: Counter,
    /// Messages published one by one whose JetStream ack has not arrived yet
    /// (bounded by `nats.max_publishes_alone`).
    pub publishes_alone_in_flight: Gauge,
    /// Messages that had to wait for a slot among those (see [`crate::ingress`]).
    pub publishes_alone_waits: Counter,
    /// QoS 1/2 messages JetStream refused for lack of room (see [`crate::ingress`]).
    pub publish_store_full: Counter,
    /// 1 from a refusal for lack of room until the message stream has room again.
    pub message_store_full: Gauge,
    /// The message stream's size and limit, as last seen by the readiness probe.
    pub message_stream_bytes: Gauge,
    pub message_stream_max_bytes: Gauge,
    /// 1 while the node drains (see [`crate::server`]).
    pub draining: Gauge,
    pub drain_disconnects: Counter,
    /// Connections refused by `limits.max_connections_per_ip` / `max_connect_rate_per_ip`.
    pub connections_refused_per_ip: Counter,
}

impl Metrics {
    pub fn session_resumed(&self, previous: PreviousOwner) {
        self.sessions_resumed[previous as usize].inc();
    }

    /// Prometheus text exposition. `sessions`: client ids whose session this node holds.
    pub fn render(&self, subscriptions: usize, sessions: usize) -> String {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let mut page = Page::new();
        page
            .gauge("jetmq_connections", "Open MQTT connections.", self.connections.get())
            .counter("jetmq_connections_total", "MQTT connections accepted.", self.connections_total.get())
            .counter("jetmq_connections_refused_per_ip_total", "Connections refused by the per-source-address limits (max_connections_per_ip, max_connect_rate_per_ip).", self.connections_refused_per_ip.get())
            .gauge("jetmq_subscriptions", "Subscriptions of sessions on this node.", count(subscriptions))
            .gauge("jetmq_sessions", "Sessions held by connections on this node.", count(sessions))
            .counter("jetmq_sessions_created_total", "Connections that started a new session.", self.sessions_created.get())
            .counter("jetmq_messages_dropped_qos0_total", "QoS 0 messages dropped for slow subscribers.", self.dropped_qos0.get())
            .counter("jetmq_messages_dropped_queue_full_total", "Messages dropped because a session queue was full.", self.dropped_queue_full.get())
            .counter("jetmq_protocol_errors_total", "Connections closed for protocol violations.", self.protocol_errors.get())
            .counter("jetmq_session_takeovers_total", "Sessions taken over by a newer connection.", self.takeovers.get())
            .counter("jetmq_session_replays_total", "Catch-up replays run for sessions.", self.session_replays.get())
            .counter("jetmq_wills_published_total", "Will messages published.", self.wills_published.get())
            .counter("jetmq_publish_batches_total", "QoS 1 publish batches confirmed by JetStream.", self.publish_batches.get())
            .counter("jetmq_publish_batched_messages_total", "QoS 1 messages confirmed as part of a batch; the others were published one by one.", self.publish_batched_messages.get())
            .counter("jetmq_publish_bundles_total", "Stream messages sent holding several QoS 1 messages of one topic (bundles).", self.publish_bundles.get())
            .counter("jetmq_publish_bundled_messages_total", "QoS 1 messages sent inside bundles.", self.publish_bundled_messages.get())
            .counter("jetmq_publish_batch_failures_total", "QoS 1 publish batches given up and published again (gap, refusal, timeout, no stream leader).", self.publish_batch_failures.get())
            .gauge("jetmq_publishes_alone_in_flight", "Messages published one by one (QoS 2, QoS 1 outside batches, retained copies, wills) waiting for their JetStream ack.", self.publishes_alone_in_flight.get())
            .counter("jetmq_publishes_alone_waits_total", "Messages that waited for a free slot because nats.max_publishes_alone were waiting for acks.", self.publishes_alone_waits.get())
            .counter("jetmq_publish_store_full_total", "QoS 1/2 messages refused because JetStream had no room for them (MQTT 5: quota exceeded 0x97; 3.1.1: disconnected).", self.publish_store_full.get())
            .gauge("jetmq_message_store_full", "1 from a publish refused for lack of room until the message stream has room again.", self.message_store_full.get())
            .gauge("jetmq_message_stream_bytes", "Bytes in the message stream (JETMQ_MSGS), as last probed.", self.message_stream_bytes.get())
            .gauge("jetmq_message_stream_max_bytes", "The message stream's max_bytes (-1: none), as last probed.", self.message_stream_max_bytes.get())
            .gauge("jetmq_draining", "1 while the node drains: unready, listeners closed, clients sent away in waves.", self.draining.get())
            .counter("jetmq_drain_disconnects_total", "Clients asked to leave by a drain.", self.drain_disconnects.get())
            .counters(
                "jetmq_messages_received_total",
                "PUBLISH packets received from clients, by QoS.",
                "qos",
                (0..3u8).map(|q| (q, self.messages_received.get(q))),
            )
            .counters(
                "jetmq_messages_sent_total",
                "PUBLISH packets sent to clients, by QoS.",
                "qos",
                (0..3u8).map(|q| (q, self.messages_sent.get(q))),
            )
            .counters(
                "jetmq_sessions_resumed_total",
                "Connections that resumed a stored session, by who held it before.",
                "previous_owner",
                PreviousOwner::LABELS
                    .iter()
                    .zip(&self.sessions_resumed)
                    .map(|(label, c)| (label, c.get())),
            )
            .histogram(
                "jetmq_jetstream_publish_ack_seconds",
                "Time from a QoS 1/2 publish to JetStream until its ack.",
                &self.publish_ack_latency,
            )
            .gauges(
                "jetmq_build_info",
                "Version of this node.",
                "version",
                [(env!("CARGO_PKG_VERSION"), 1)],
            );
        page.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    #[test]
    fn exposition_has_labelled_counters_and_the_histogram() {
        let m = Metrics::default();
        m.messages_received.inc(1);
        m.messages_received.inc(1);
        m.messages_received.inc(7); // not a QoS: ignored rather than a panic
        m.messages_sent.inc(2);
        m.session_resumed(PreviousOwner::OtherNode);
        m.sessions_created.inc();
        m.publish_ack_latency.observe(Duration::from_millis(2));
        let text = m.render(4, 3);
        for expected in [
            "jetmq_messages_received_total{qos=\"0\"} 0\n",
            "jetmq_messages_received_total{qos=\"1\"} 2\n",
            "jetmq_messages_sent_total{qos=\"2\"} 1\n",
            "jetmq_sessions_resumed_total{previous_owner=\"other_node\"} 1\n",
            "jetmq_sessions_resumed_total{previous_owner=\"none\"} 0\n",
            "jetmq_sessions_created_total 1\n",
            "jetmq_sessions 3\n",
            "jetmq_subscriptions 4\n",
            "jetmq_jetstream_publish_ack_seconds_bucket{le=\"0.0025\"} 1\n",
            "jetmq_jetstream_publish_ack_seconds_bucket{le=\"0.001\"} 0\n",
            "jetmq_jetstream_publish_ack_seconds_count 1\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Each family is announced once, so Prometheus accepts the page.
        let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let n = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), n, "a metric family is declared twice");
    }
}
