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
    /// Upper bound on the stream's size (-1: unlimited). The server reserves it out of its
    /// JetStream store, so it also keeps the other streams and buckets from being starved.
    pub max_bytes: i64,
    /// Largest stream message accepted (-1: the server's `max_payload`).
    pub max_message_size: i32,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub duplicate_window: Duration,
}

impl MessageStreamSettings {
    /// NATS refuses a duplicate window longer than the stream's max age.
    fn duplicate_window(&self) -> Duration {
        if self.max_age.is_zero() {
            self.duplicate_window
        } else {
            self.duplicate_window.min(self.max_age)
        }
    }
}

impl Default for MessageStreamSettings {
    fn default() -> Self {
        MessageStreamSettings {
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: -1,
            max_message_size: -1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// Creates the message stream, or opens it. It allows fast-ingest batch publishing (ADR-50,
/// nats-server 2.14+), which the broker uses for QoS 1; a stream created before that is
/// updated to allow it. A server that does not know the setting still gets a stream:
/// check `allow_batch_publish` in the returned stream's config before batching.
pub async fn ensure_message_stream(
    js: &jetstream::Context,
    settings: &MessageStreamSettings,
) -> Result<stream::Stream, StreamSetupError> {
    let config = stream::Config {
        name: MESSAGE_STREAM.to_owned(),
        subjects: vec![format!("{SHARE_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_age: settings.max_age,
        max_bytes: settings.max_bytes,
        max_message_size: settings.max_message_size,
        duplicate_window: settings.duplicate_window(),
        // A full stream refuses new messages (their publishers are told, nothing
        // acknowledged is lost) rather than deleting stored ones that offline sessions and
        // ingestors still have to read.
        discard: stream::DiscardPolicy::New,
        allow_batch_publish: true,
        ..Default::default()
    };
    let setup_error = |e: Box<dyn std::error::Error + Send + Sync>| StreamSetupError {
        what: "stream",
        name: MESSAGE_STREAM,
        source: e,
    };
    let stream = match js.get_or_create_stream(config.clone()).await {
        Ok(stream) => stream,
        // A server older than 2.14 may refuse the unknown setting: create it without.
        Err(first) => js
            .get_or_create_stream(stream::Config {
                allow_batch_publish: false,
                ..config.clone()
            })
            .await
            .map_err(|_| setup_error(Box::new(first)))?,
    };
    if stream.cached_info().config.allow_batch_publish {
        return Ok(stream);
    }
    // Created by an older jetmq: allow batches, keeping whatever else its operator set.
    let mut upgraded = stream.cached_info().config.clone();
    upgraded.allow_batch_publish = true;
    match js.update_stream(upgraded).await {
        Ok(_) => js
            .get_stream(MESSAGE_STREAM)
            .await
            .map_err(|e| setup_error(Box::new(e))),
        Err(err) => {
            tracing::warn!(error = %err, "message stream does not allow batch publishing; QoS 1 is published one message at a time");
            Ok(stream)
        }
    }
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

/// JetStream API error codes that say the store has no room for a message. Checked against
/// nats-server 2.15.1: a stream at its `max_bytes` / `max_msgs` with discard "new" answers
/// 10077 ("maximum bytes exceeded", "maximum messages exceeded"); a server whose
/// `max_file_store` is used up answers 10023 ("insufficient resources"); 10047 ("insufficient
/// storage resources available") is the account's limit; 10054 ("message size exceeds
/// maximum allowed") is the stream's `max_msg_size`. All are 503 except 10054 (400).
pub const STORE_FULL_ERRORS: [u64; 4] = [10077, 10023, 10047, 10054];

/// Whether a JetStream API error code means the message was refused for lack of room (the
/// message was not stored; sending it again only helps once space frees).
pub fn is_store_full(err_code: u64) -> bool {
    STORE_FULL_ERRORS.contains(&err_code)
}

/// The limits the broker configures on the message stream, applied to a stream that exists
/// with others (created by an older jetmq, an ingestor with defaults, or an operator): the
/// stream is updated in place and the change logged. Returns the stream as it is now. A
/// refused update (e.g. the server cannot reserve the new `max_bytes`) is logged and the
/// stream kept as it was: the node still serves.
pub async fn apply_message_limits(
    js: &jetstream::Context,
    stream: stream::Stream,
    settings: &MessageStreamSettings,
) -> stream::Stream {
    let current = stream.cached_info().config.clone();
    let wanted = stream::Config {
        max_bytes: settings.max_bytes,
        max_age: settings.max_age,
        max_message_size: settings.max_message_size,
        discard: stream::DiscardPolicy::New,
        duplicate_window: if settings.max_age.is_zero() {
            current.duplicate_window
        } else {
            current.duplicate_window.min(settings.max_age)
        },
        ..current.clone()
    };
    if wanted.max_bytes == current.max_bytes
        && wanted.max_age == current.max_age
        && wanted.max_message_size == current.max_message_size
        && wanted.discard == current.discard
    {
        return stream;
    }
    match js.update_stream(wanted.clone()).await {
        Ok(_) => {
            tracing::warn!(
                stream = MESSAGE_STREAM,
                old_max_bytes = current.max_bytes,
                max_bytes = wanted.max_bytes,
                old_max_age_secs = current.max_age.as_secs(),
                max_age_secs = wanted.max_age.as_secs(),
                old_max_msg_size = current.max_message_size,
                max_msg_size = wanted.max_message_size,
                old_discard = ?current.discard,
                "message stream limits updated in place to this node's configuration"
            );
            js.get_stream(MESSAGE_STREAM).await.unwrap_or(stream)
        }
        Err(err) => {
            tracing::error!(
                stream = MESSAGE_STREAM,
                error = %err,
                max_bytes = current.max_bytes,
                wanted_max_bytes = wanted.max_bytes,
                discard = ?current.discard,
                "cannot update the message stream's limits; it keeps its old ones (check the NATS server's max_file_store against nats.message_max_bytes x replicas)"
            );
            stream
        }
    }
}
