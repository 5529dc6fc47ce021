//! What jetmq-broker and jetmq-ingestor agree on: how MQTT topics become NATS subjects,
//! how a message is wrapped for JetStream, and the names of streams and buckets.

pub mod envelope;
pub mod histogram;
pub mod http;
pub mod natsauth;
pub mod natsconn;
pub mod otel;
pub mod prometheus;
pub mod retry;
pub mod settings;
pub mod shares;
pub mod streams;
pub mod subject;
