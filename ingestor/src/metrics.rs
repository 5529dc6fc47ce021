//! Counters, logged periodically and served as Prometheus text on `GET /metrics`, next to
//! `GET /healthz` (the process answers) and `GET /readyz` (consuming its share); and the
//! tickers that keep them current ([`watch_lag`], [`log_summaries`]).
//!
//! The endpoint is [`jetmq_common::http`], the page [`jetmq_common::prometheus`]; what the
//! ingestor counts is [`Stats`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::PullConsumer;
use jetmq_common::histogram::Histogram;
use jetmq_common::http::{self, Response, Status};
use jetmq_common::prometheus::Page;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info};

#[derive(Debug, Default)]
pub struct Stats {
    /// Messages taken from JetStream (redeliveries included).
    pub consumed: AtomicU64,
    /// Records Kafka confirmed on their target topic.
    pub produced: AtomicU64,
    /// Produce attempts that failed (each retry counts).
    pub failed: AtomicU64,
    /// Records written to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Messages acked in JetStream.
    pub acked: AtomicU64,
    /// Messages terminated in JetStream (neither Kafka topic nor dead letter took them).
    pub terminated: AtomicU64,
    /// Messages handed back to JetStream for a later retry (nak).
    pub nacked: AtomicU64,
    /// Messages JetStream delivered more than once.
    pub redelivered: AtomicU64,
    /// Records awaiting Kafka's confirmation.
    pub in_flight: AtomicI64,
    /// The consumer's num_pending (messages of the share not yet delivered), -1 unknown.
    pub lag: AtomicI64,
    /// Time from handing a record to librdkafka until Kafka confirmed it (per attempt).
    pub produce_latency: Histogram,
    /// Connected to NATS, consumer in place, taking messages: what /readyz reports.
    pub ready: AtomicBool,
}

impl Stats {
    pub fn new() -> Arc<Self> {
        let s = Stats::default();
        s.lag.store(-1, Ordering::Relaxed);
        Arc::new(s)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// One log-friendly line.
    pub fn summary(&self) -> String {
        format!(
            "consumed={} produced={} failed={} dead_lettered={} acked={} terminated={} nacked={} \
             redelivered={} in_flight={} lag={}",
            Self::get(&self.consumed),
            Self::get(&self.produced),
            Self::get(&self.failed),
            Self::get(&self.dead_lettered),
            Self::get(&self.acked),
            Self::get(&self.terminated),
            Self::get(&self.nacked),
            Self::get(&self.redelivered),
            self.in_flight.load(Ordering::Relaxed),
            self.lag.load(Ordering::Relaxed),
        )
    }

    /// Prometheus text exposition format, labelled with the ingestor id.
    pub fn prometheus(&self, mqtt_id: u32) -> String {
        let mqtt_id = mqtt_id.to_string();
        let mut page = Page::with_labels(&[("mqtt_id", &mqtt_id)]);
        let counters: [(&str, &str, &AtomicU64); 8] = [
            ("consumed", "Messages taken from JetStream", &self.consumed),
            ("produced", "Records Kafka confirmed", &self.produced),
            ("failed", "Failed produce attempts", &self.failed),
            (
                "dead_lettered",
                "Records written to the dead-letter topic",
                &self.dead_lettered,
            ),
            ("acked", "Messages acked in JetStream", &self.acked),
            (
                "terminated",
                "Messages terminated in JetStream",
                &self.terminated,
            ),
            ("nacked", "Messages handed back to JetStream", &self.nacked),
            (
                "redelivered",
                "Messages JetStream delivered more than once",
                &self.redelivered,
            ),
        ];
        for (name, help, value) in counters {
            page.counter(
                &format!("jetmq_ingestor_{name}_total"),
                &format!("{help}."),
                Self::get(value),
            );
        }
        let gauges: [(&str, &str, &AtomicI64); 2] = [
            (
                "in_flight",
                "Records awaiting Kafka confirmation",
                &self.in_flight,
            ),
            (
                "lag",
                "Messages of the share not yet delivered (consumer num_pending, -1 unknown)",
                &self.lag,
            ),
        ];
        for (name, help, value) in gauges {
            page.gauge(
                &format!("jetmq_ingestor_{name}"),
                &format!("{help}."),
                value.load(Ordering::Relaxed),
            );
        }
        page.gauge(
            "jetmq_ingestor_ready",
            "Consuming its share (1) or not (0).",
            i64::from(self.ready.load(Ordering::Relaxed)),
        );
        page.histogram(
            "jetmq_ingestor_kafka_produce_seconds",
            "Time from handing a record to the Kafka producer until Kafka confirmed it.",
            &self.produce_latency,
        );
        page.finish()
    }

    /// The answer to a request for `path`.
    fn answer(&self, path: &str, mqtt_id: u32) -> Response {
        match path {
            "/healthz" => Response::text(Status::Ok, "ok\n"),
            "/readyz" => Response::readiness(self.ready.load(Ordering::Relaxed)),
            // Every other path is the metrics page, as it always was.
            _ => Response::metrics(self.prometheus(mqtt_id)),
        }
    }
}

/// Serves `GET /healthz`, `GET /readyz` and `GET /metrics` (any other path, in fact) on
/// `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>, mqtt_id: u32) {
    http::serve(listener, move |path: &str| stats.answer(path, mqtt_id)).await;
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Binds the metrics endpoint on `addr` (`metrics.listen`) and serves it from a task of
/// its own.
pub async fn start_endpoint(
    addr: SocketAddr,
    stats: Arc<Stats>,
    mqtt_id: u32,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = bind(addr)
        .await
        .with_context(|| format!("metrics.listen {addr}"))?;
    // The bound address: with port 0 the system chose it.
    let addr = listener.local_addr().unwrap_or(addr);
    info!(%addr, "metrics endpoint on /metrics");
    Ok(tokio::spawn(serve(listener, stats, mqtt_id)))
}

/// Keeps [`Stats::lag`] at the consumer's `num_pending`, asked for every `every`.
pub fn watch_lag(consumer: PullConsumer, stats: Arc<Stats>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match consumer.get_info().await {
                Ok(info) => stats.lag.store(
                    i64::try_from(info.num_pending).unwrap_or(i64::MAX),
                    Ordering::Relaxed,
                ),
                Err(e) => debug!(error = %e, "consumer info failed"),
            }
        }
    })
}

/// Logs [`Stats::summary`] every `every` (the first time after `every`, not at once).
pub fn log_summaries(stats: Arc<Stats>, mqtt_id: u32, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            info!(mqtt_id, "{}", stats.summary());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The page as the ingestor wrote it by hand before it used `jetmq_common::prometheus`.
    fn handwritten(stats: &Stats, mqtt_id: u32) -> String {
        let s = stats;
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 8] = [
            ("consumed", "Messages taken from JetStream", &s.consumed),
            ("produced", "Records Kafka confirmed", &s.produced),
            ("failed", "Failed produce attempts", &s.failed),
            (
                "dead_lettered",
                "Records written to the dead-letter topic",
                &s.dead_lettered,
            ),
            ("acked", "Messages acked in JetStream", &s.acked),
            (
                "terminated",
                "Messages terminated in JetStream",
                &s.terminated,
            ),
            ("nacked", "Messages handed back to JetStream", &s.nacked),
            (
                "redelivered",
                "Messages JetStream delivered more than once",
                &s.redelivered,
            ),
        ];
        for (name, help, value) in counters {
            out.push_str(&format!(
                "# HELP jetmq_ingestor_{name}_total {help}.\n# TYPE jetmq_ingestor_{name}_total counter\njetmq_ingestor_{name}_total{{mqtt_id=\"{mqtt_id}\"}} {}\n",
                Stats::get(value)
            ));
        }
        let gauges: [(&str, &str, &AtomicI64); 2] = [
            (
                "in_flight",
                "Records awaiting Kafka confirmation",
                &s.in_flight,
            ),
            (
                "lag",
                "Messages of the share not yet delivered (consumer num_pending, -1 unknown)",
                &s.lag,
            ),
        ];
        for (name, help, value) in gauges {
            out.push_str(&format!(
                "# HELP jetmq_ingestor_{name} {help}.\n# TYPE jetmq_ingestor_{name} gauge\njetmq_ingestor_{name}{{mqtt_id=\"{mqtt_id}\"}} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# HELP jetmq_ingestor_ready Consuming its share (1) or not (0).\n# TYPE jetmq_ingestor_ready gauge\njetmq_ingestor_ready{{mqtt_id=\"{mqtt_id}\"}} {}\n",
            u8::from(s.ready.load(Ordering::Relaxed))
        ));
        s.produce_latency.render(
            &mut out,
            "jetmq_ingestor_kafka_produce_seconds",
            "Time from handing a record to the Kafka producer until Kafka confirmed it.",
            &format!("mqtt_id=\"{mqtt_id}\""),
        );
        out
    }

    #[test]
    fn the_page_is_byte_for_byte_what_it_was() {
        let stats = Stats::new();
        Stats::inc(&stats.consumed);
        Stats::inc(&stats.failed);
        stats.in_flight.store(4, Ordering::Relaxed);
        stats.ready.store(true, Ordering::Relaxed);
        stats.produce_latency.observe(Duration::from_millis(7));
        assert_eq!(stats.prometheus(12), handwritten(&stats, 12));
        stats.ready.store(false, Ordering::Relaxed);
        assert_eq!(stats.prometheus(0), handwritten(&stats, 0));
    }

    #[tokio::test]
    async fn endpoint_serves_counters() {
        let stats = Stats::new();
        Stats::inc(&stats.consumed);
        Stats::inc(&stats.consumed);
        stats.lag.store(7, Ordering::Relaxed);
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, stats.clone(), 3));
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("read");
        server.abort();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("jetmq_ingestor_consumed_total{mqtt_id=\"3\"} 2"),
            "{response}"
        );
        assert!(
            response.contains("jetmq_ingestor_lag{mqtt_id=\"3\"} 7"),
            "{response}"
        );
        assert!(stats.summary().contains("consumed=2"));
        assert!(
            response.contains("jetmq_ingestor_kafka_produce_seconds_count{mqtt_id=\"3\"} 0"),
            "{response}"
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn health_and_readiness_follow_the_ready_flag() {
        let stats = Stats::new();
        stats.produce_latency.observe(Duration::from_millis(30));
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, stats.clone(), 1));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        stats.ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200 OK"));
        let page = get(addr, "/metrics").await;
        server.abort();
        assert!(
            page.contains("jetmq_ingestor_ready{mqtt_id=\"1\"} 1"),
            "{page}"
        );
        assert!(
            page.contains(
                "jetmq_ingestor_kafka_produce_seconds_bucket{mqtt_id=\"1\",le=\"0.05\"} 1"
            ),
            "{page}"
        );
        assert!(
            page.contains(
                "jetmq_ingestor_kafka_produce_seconds_bucket{mqtt_id=\"1\",le=\"0.025\"} 0"
            ),
            "{page}"
        );
    }
}
