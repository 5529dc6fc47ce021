//! Ingestion: pull one share from JetStream, produce to Kafka, ack each message in NATS
//! only after Kafka confirmed its record.
//!
//! [`run`] is the whole life of an ingestor process, step by step: the Kafka producer, the
//! metrics endpoint, the set-up against NATS (`setup`: connection, message stream,
//! durable consumer), the metrics tickers, the `pipeline` until shutdown, then the drain
//! and the hand-over of the pin to a standby.
//!
//! Order: records are handed to librdkafka in the order JetStream delivered them, from this
//! one task; the idempotent producer keeps that order per Kafka partition. Confirmations are
//! taken (and acks sent) in the same order. While a record waits for Kafka, its NATS message
//! gets a progress ack every third of `ack_wait`, so a slow or absent Kafka does not cause
//! redeliveries; the consumer's `max_ack_pending` equals the in-flight window, so nothing
//! waits unseen in the client's buffer meanwhile.
//!
//! The other modules: `records` turns a stored message into Kafka records, `produce`
//! waits for (and retries) one record's confirmation, `dead_letter` takes what Kafka
//! refuses for good.

mod dead_letter;
mod pipeline;
mod produce;
mod records;
mod setup;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use jetmq_common::shares::share_for_ingestor;
use jetmq_common::subject::share_filter;
use rdkafka::producer::FutureProducer;
use tokio::sync::watch;
use tracing::info;

pub use setup::{consumer_name, PRIORITY_GROUP};

use crate::config::Config;
use crate::kafka;
use crate::metrics::{self, Stats};
use pipeline::Pipeline;

/// How long leaving steps (unpin, flushing acks, a drain stuck on NATS) may overrun.
const GRACE: Duration = Duration::from_secs(5);

/// Runs ingestor `mqtt_id` until `shutdown` turns true, then drains and returns.
///
/// Returns `Ok` after a requested shutdown (also one during set-up) and an error when a
/// set-up step gave up or Kafka failed for good.
pub async fn run(
    config: Config,
    mqtt_id: u32,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let share = share_for_ingestor(mqtt_id)?;
    let stats = Stats::new();
    let name = consumer_name(&config.nats.consumer_prefix, mqtt_id);
    info!(mqtt_id, share, consumer = %name, filter = %share_filter(share), "starting");

    let producer: FutureProducer = kafka::client_config(&config.kafka, &config.ingest)
        .create()
        .context("cannot create the Kafka producer (check kafka.* settings)")?;

    // The metrics endpoint comes first, so monitoring sees an ingestor that waits for NATS.
    let mut background = Background::default();
    if let Some(addr) = config.metrics.listen {
        background.push(metrics::start_endpoint(addr, stats.clone(), mqtt_id).await?);
    }

    let Some(nats) = setup::connect(&config, mqtt_id, share, &mut shutdown).await? else {
        return Ok(());
    };

    background.push(metrics::watch_lag(
        nats.consumer.clone(),
        stats.clone(),
        Duration::from_secs(config.metrics.lag_interval_secs),
    ));
    if config.metrics.log_interval_secs > 0 {
        background.push(metrics::log_summaries(
            stats.clone(),
            mqtt_id,
            Duration::from_secs(config.metrics.log_interval_secs),
        ));
    }

    let mut pipeline = Pipeline::new(&config, producer, stats.clone());
    stats.ready.store(true, Ordering::Relaxed);
    let result = pipeline.run(&nats.consumer, &mut shutdown).await;
    stats.ready.store(false, Ordering::Relaxed);

    // Wait for the confirmations of what is in flight and ack them, then let go.
    let drained = pipeline.drain_in_time(GRACE).await;
    nats.release(&config, GRACE).await;
    drop(background);
    info!(mqtt_id, drained, "stopped: {}", stats.summary());
    result
}

/// Tasks that live as long as [`run`]: aborted when it returns, however it returns.
#[derive(Default)]
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    fn push(&mut self, task: tokio::task::JoinHandle<()>) {
        self.0.push(task);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
