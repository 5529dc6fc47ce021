//! The baseline of the MQTT-to-Kafka benchmark (bench/kafka_bench.py): produce `--count`
//! records of `--size` bytes straight into Kafka with exactly the ingestor's producer settings
//! (`jetmq_ingestor::kafka::client_config`, defaults: idempotent, acks=all, linger 5 ms), keys
//! cycling over `--keys` MQTT-like topics, at most `--window` records awaiting confirmation
//! (the ingestor's `ingest.max_in_flight`). Prints one JSON line: records, seconds, rate, and
//! `confirmed_at`: seconds since the first send at which each confirmation was taken (in
//! order), so the caller can compute a steady-state rate without start-up, and `started_unix`
//! (wall clock of the first send) so that the confirmations of several concurrent producers
//! can be merged on one time line.
//!
//! Several producers side by side (the baseline for K ingestors): run K processes with
//! `--producers K --producer I` (I = 1..K); producer I uses only the keys `k` with
//! `k % K == I - 1`, so the producers split the key space like the ingestors split the topics.
//!
//! cargo run --release -p jetmq-ingestor --example kafka_direct -- \
//!     --bootstrap 127.0.0.1:9092 --topic direct --count 20000 --size 256

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use jetmq_ingestor::config::{IngestConfig, KafkaConfig};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value_t = 100)]
    keys: usize,
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// How many producers run side by side (each its own process).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Which of them this one is, 1..=producers.
    #[arg(long, default_value_t = 1)]
    producer: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.producers == 0 || args.producer == 0 || args.producer > args.producers {
        bail!("--producer must be in 1..={}", args.producers);
    }
    let kafka = KafkaConfig {
        bootstrap_servers: vec![args.bootstrap.clone()],
        ..Default::default()
    };
    let ingest = IngestConfig {
        max_in_flight: args.window,
        ..Default::default()
    };
    let producer: FutureProducer = jetmq_ingestor::kafka::client_config(&kafka, &ingest)
        .create()
        .context("Kafka producer")?;
    let keys: Vec<String> = (0..args.keys.max(1))
        .filter(|k| k % args.producers == args.producer - 1)
        .map(|k| format!("bench/{k}/data"))
        .collect();
    if keys.is_empty() {
        bail!(
            "no keys for producer {} of {}",
            args.producer,
            args.producers
        );
    }
    let client_id = format!("bench-publisher-{}", args.producer);
    let share = (args.producer - 1).to_string();
    let value = vec![b'x'; args.size];
    let mut inflight = VecDeque::with_capacity(args.window);
    let started = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs_f64();
    let mut failed = 0usize;
    let mut confirmed_at = Vec::with_capacity(args.count);
    for n in 0..args.count {
        if inflight.len() >= args.window {
            if let Some(f) = inflight.pop_front() {
                failed += usize::from(!matches!(f.await, Ok(Ok(_))));
                confirmed_at.push(started.elapsed().as_secs_f64());
            }
        }
        let key = &keys[n % keys.len()];
        // The metadata headers the ingestor adds, so both records are the same size.
        let seq = n.to_string();
        let headers = OwnedHeaders::new_with_capacity(7)
            .insert(header("mqtt.topic", key))
            .insert(header("mqtt.qos", "1"))
            .insert(header("mqtt.retain", "false"))
            .insert(header("mqtt.client_id", &client_id))
            .insert(header("mqtt.timestamp_ms", "1700000000000"))
            .insert(header("jetmq.seq", &seq))
            .insert(header("jetmq.share", &share));
        let record = FutureRecord::to(&args.topic)
            .key(key.as_bytes())
            .payload(&value[..])
            .headers(headers);
        match producer.send_result(record) {
            Ok(f) => inflight.push_back(f),
            Err((e, _)) => bail!("enqueue failed: {e}"),
        }
    }
    for f in inflight {
        failed += usize::from(!matches!(f.await, Ok(Ok(_))));
        confirmed_at.push(started.elapsed().as_secs_f64());
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "records": args.count,
            "failed": failed,
            "size": args.size,
            "seconds": secs,
            "rate": args.count as f64 / secs,
            "producer": args.producer,
            "producers": args.producers,
            "keys": keys.len(),
            "started_unix": started_unix,
            "confirmed_at": confirmed_at,
        })
    );
    if failed > 0 {
        bail!("{failed} records failed");
    }
    Ok(())
}
