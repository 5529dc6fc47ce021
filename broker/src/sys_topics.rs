//! Node-local `$SYS/broker/...` topics, as mosquitto has them: which node a client reached,
//! its version, its load. Each node answers for itself, so behind round-robin DNS a client
//! (or `jetmq-broker check`) learns which node it got.
//!
//! The values are computed when a SUBSCRIBE matches them and delivered like retained
//! messages (QoS 0, retain flag set, after the SUBACK); subscribing again gives fresh values.
//! They are never stored in JetStream and never reach other nodes. `$SYS` topics do not
//! match filters starting with a wildcard (`#`, `+/...`), and subscriptions to them pass the
//! ACL like any other.

use std::sync::Arc;

use bytes::Bytes;
use jetmq_common::envelope::Envelope;

use crate::node::ConnContext;
use crate::routing::{MessageRef, StoredMessage};
use crate::topic;

/// The namespace this node serves; clients cannot publish into it.
pub const PREFIX: &str = "$SYS/broker/";

pub const VERSION: &str = "$SYS/broker/version";
pub const NODE_ID: &str = "$SYS/broker/node_id";
pub const UPTIME: &str = "$SYS/broker/uptime";
pub const CLIENTS_CONNECTED: &str = "$SYS/broker/clients/connected";
pub const SUBSCRIPTIONS: &str = "$SYS/broker/subscriptions/count";
pub const RETAINED: &str = "$SYS/broker/retained messages/count";
pub const MESSAGES_RECEIVED: &str = "$SYS/broker/messages/received";
pub const MESSAGES_SENT: &str = "$SYS/broker/messages/sent";

/// True for topics a client must not publish to.
pub fn is_reserved(topic: &str) -> bool {
    topic.starts_with(PREFIX)
}

/// A snapshot of the node's figures, as (topic, text).
pub struct Snapshot {
    pub node_id: String,
    pub uptime_secs: u64,
    pub clients_connected: usize,
    pub subscriptions: usize,
    pub retained: usize,
    pub messages_received: u64,
    pub messages_sent: u64,
}

impl Snapshot {
    /// The figures of the node `context` belongs to, as they are now.
    pub fn of(context: &ConnContext) -> Snapshot {
        let started_ms = context.registry.first_connection_id() / 1000;
        Snapshot {
            node_id: context.config.node_id.clone(),
            uptime_secs: crate::session::now_ms().saturating_sub(started_ms) / 1000,
            clients_connected: context.registry.len(),
            subscriptions: context.router.subscription_count(),
            retained: context.retained.len(),
            messages_received: context.metrics.messages_received.total(),
            messages_sent: context.metrics.messages_sent.total(),
        }
    }

    fn entries(&self) -> [(&'static str, String); 8] {
        [
            (
                VERSION,
                format!("jetmq-broker {}", env!("CARGO_PKG_VERSION")),
            ),
            (NODE_ID, self.node_id.clone()),
            (UPTIME, format!("{} seconds", self.uptime_secs)),
            (CLIENTS_CONNECTED, self.clients_connected.to_string()),
            (SUBSCRIPTIONS, self.subscriptions.to_string()),
            (RETAINED, self.retained.to_string()),
            (MESSAGES_RECEIVED, self.messages_received.to_string()),
            (MESSAGES_SENT, self.messages_sent.to_string()),
        ]
    }

    /// The messages whose topic matches `filter` (without `$share/`).
    pub fn matching(&self, filter: &str) -> Vec<MessageRef> {
        self.entries()
            .into_iter()
            .filter(|(name, _)| topic::matches(filter, name))
            .map(|(name, text)| {
                Arc::new(StoredMessage {
                    seq: 0,
                    topic: name.to_owned(),
                    envelope: Envelope {
                        retain: true,
                        ..Envelope::default()
                    },
                    payload: Bytes::from(text),
                })
            })
            .collect()
    }
}

/// The node's `$SYS` messages matching `filter`, for a connection's SUBSCRIBE; cheap for
/// every other filter.
pub fn matching(context: &ConnContext, filter: &str) -> Vec<MessageRef> {
    // Only a filter starting with `$SYS` can match: wildcards never match a leading `$`.
    if !filter.starts_with("$SYS") {
        return Vec::new();
    }
    Snapshot::of(context).matching(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            node_id: "n7".into(),
            uptime_secs: 42,
            clients_connected: 3,
            subscriptions: 5,
            retained: 1,
            messages_received: 10,
            messages_sent: 20,
        }
    }

    fn topics(filter: &str) -> Vec<String> {
        snapshot()
            .matching(filter)
            .iter()
            .map(|m| m.topic.clone())
            .collect()
    }

    #[test]
    fn filters_select_topics_and_leading_wildcards_match_none() {
        assert_eq!(topics("$SYS/#").len(), 8);
        assert_eq!(topics("$SYS/broker/node_id"), vec![NODE_ID]);
        assert_eq!(topics("$SYS/broker/clients/+"), vec![CLIENTS_CONNECTED]);
        assert!(topics("#").is_empty());
        assert!(topics("+/broker/node_id").is_empty());
        let m = snapshot().matching(UPTIME);
        assert_eq!(&m[0].payload[..], b"42 seconds");
        assert!(m[0].envelope.retain);
        assert_eq!(m[0].qos(), jetmq_codec::QoS::AtMostOnce);
    }

    #[test]
    fn only_the_broker_namespace_is_reserved() {
        assert!(is_reserved("$SYS/broker/node_id"));
        assert!(!is_reserved("$SYS/other"));
        assert!(!is_reserved("sys/broker"));
    }
}
