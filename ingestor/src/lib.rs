//! jetmq-ingestor: consumes one share of jetmq's message stream (NATS JetStream) and writes
//! every message into Kafka, acking in NATS only what Kafka confirmed.

pub mod config;
pub mod ingest;
pub mod kafka;
pub mod mapping;
pub mod metrics;
pub mod routing;
