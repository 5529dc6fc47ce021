//! Names and shapes of the JetStream streams and KV buckets jetmq keeps its state in.
//!
//! Brokers and ingestors both call [`ensure_message_stream`] at start-up, so whichever
//! process comes first creates the stream with the same settings.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use thiserror::Error;

use crate::subject::{RETAINED_PREFIX, SHARE_PREFIX};

/// Every MQTT message, all shares: `jetmq.s.<share>.<topic>`.
pub const MESSAGE_STREAM: &str = "JETMQ_MSGS";
/// Last retained message per topic: `jetmq.r.<topic>`.
pub const RETAINED_STREAM: &str = "JETMQ_RETAINED";
/// Session state per client id.
pub const SESSION_BUCKET: &str = "JETMQ_SESSIONS";
/// Node liveness and the janitor's lease; entries age out when their writer stops.
pub const NODE_BUCKET: &str = "JETMQ_NODES";

#[derive(Debug, Error)]
#[error("cannot create or open JetStream {what} {name}: {source}")]
pub struct StreamSetupError {
    what: &'static str,
    name: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// How the message stream is kept.
#[derive(Debug, Clone)]
pub struct MessageStreamSettings {
    pub replicas: usize,
    /// Messages older than this are dropped: bounds how long an offline session can be away.
    pub max_age: Duration,
    /// Upper bound on the stream's size (-1: unlimited).
    pub max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub duplicate_window: Duration,
}

impl Default for MessageStreamSettings {
    fn default() -> Self {
        MessageStreamSettings {
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

pub async fn ensure_message_stream(
    js: &jetstream::Context,
    settings: &MessageStreamSettings,
) -> Result<stream::Stream, StreamSetupError> {
    js.get_or_create_stream(stream::Config {
        name: MESSAGE_STREAM.to_owned(),
        subjects: vec![format!("{SHARE_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_age: settings.max_age,
        max_bytes: settings.max_bytes,
        duplicate_window: settings.duplicate_window,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    })
    .await
    .map_err(|e| StreamSetupError {
        what: "stream",
        name: MESSAGE_STREAM,
        source: Box::new(e),
    })
}

pub async fn ensure_retained_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<stream::Stream, StreamSetupError> {
    js.get_or_create_stream(stream::Config {
        name: RETAINED_STREAM.to_owned(),
        subjects: vec![format!("{RETAINED_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: false,
        ..Default::default()
    })
    .await
    .map_err(|e| StreamSetupError {
        what: "stream",
        name: RETAINED_STREAM,
        source: Box::new(e),
    })
}

pub async fn ensure_kv_bucket(
    js: &jetstream::Context,
    name: &'static str,
    replicas: usize,
    max_age: Duration,
    max_value_size: i32,
) -> Result<jetstream::kv::Store, StreamSetupError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| StreamSetupError {
        what: "KV bucket",
        name,
        source: e,
    };
    match js.get_key_value(name).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: name.to_owned(),
                history: 1,
                num_replicas: replicas,
                max_age,
                max_value_size,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| err(Box::new(e))),
    }
}
