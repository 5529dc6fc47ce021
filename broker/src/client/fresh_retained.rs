//! A retained message published while a SUBSCRIBE for its topic is being handled reaches
//! the new subscriber twice: once from the node's retained copy (which this node updates as
//! soon as a PUBLISH is received, before JetStream stores it) and once live, when the stream
//! brings the message back after the subscription was registered. The subscriber should see
//! it once.
//!
//! At SUBSCRIBE time, the retained messages sent that are young enough to still be on their
//! way through the stream are remembered for a while; a live delivery that is the same
//! publication (same topic, publisher, receive time, properties and payload: the envelope's
//! millisecond timestamp is set when a node receives the PUBLISH, so a re-sent or re-published
//! message differs) is then dropped, whichever of the two arrives first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::routing::MessageRef;
use crate::session::now_ms;

/// How long a live copy can trail its retained copy: a JetStream round trip, or the time
/// the node's stream reader is behind. Later copies are delivered (a duplicate, as before).
const RACE_WINDOW: Duration = Duration::from_secs(10);

/// Bounds the memory a SUBSCRIBE to `#` during a burst of retained publishing can hold.
const MAX_REMEMBERED: usize = 10_000;

#[derive(Default)]
pub(super) struct FreshRetained {
    until: Option<Instant>,
    by_topic: HashMap<String, MessageRef>,
}

/// Whether the live copy of a retained message may still be on its way: it was received
/// within [`RACE_WINDOW`].
pub(super) fn live_copy_may_follow(msg: &MessageRef) -> bool {
    let window_ms = RACE_WINDOW.as_millis() as u64;
    msg.envelope.timestamp_ms.saturating_add(window_ms) >= now_ms()
}

impl FreshRetained {
    /// Remembers a retained message sent to a new subscription if its live copy may still
    /// be on its way.
    pub fn remember(&mut self, msg: &MessageRef) {
        if !live_copy_may_follow(msg) || self.by_topic.len() >= MAX_REMEMBERED {
            return;
        }
        self.until = Some(Instant::now() + RACE_WINDOW);
        self.by_topic.insert(msg.topic.clone(), msg.clone());
    }

    /// True if `live` is the live copy of a retained message already sent (it is then
    /// forgotten: a second live copy would be a second publication).
    pub fn is_duplicate(&mut self, live: &MessageRef) -> bool {
        let Some(until) = self.until else {
            return false;
        };
        if Instant::now() > until {
            *self = Self::default();
            return false;
        }
        if !live.envelope.retain {
            return false;
        }
        let same = self
            .by_topic
            .get(&live.topic)
            .is_some_and(|sent| sent.envelope == live.envelope && sent.payload == live.payload);
        if same {
            self.by_topic.remove(&live.topic);
        }
        same
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use jetmq_common::envelope::Envelope;

    use super::*;
    use crate::routing::StoredMessage;

    fn message(
        seq: u64,
        topic: &str,
        timestamp_ms: u64,
        retain: bool,
        payload: &str,
    ) -> MessageRef {
        Arc::new(StoredMessage {
            seq,
            topic: topic.to_owned(),
            envelope: Envelope {
                qos: 1,
                retain,
                client_id: "publisher".to_owned(),
                timestamp_ms,
                properties: Default::default(),
            },
            payload: Bytes::from(payload.to_owned()),
        })
    }

    #[test]
    fn the_live_copy_of_a_sent_retained_message_is_dropped_once() {
        let now = now_ms();
        let mut fresh = FreshRetained::default();
        fresh.remember(&message(0, "a/b", now, true, "on"));
        assert!(fresh.is_duplicate(&message(7, "a/b", now, true, "on")));
        // The same bytes again are another publication.
        assert!(!fresh.is_duplicate(&message(8, "a/b", now, true, "on")));
    }

    #[test]
    fn other_publications_are_delivered() {
        let now = now_ms();
        let mut fresh = FreshRetained::default();
        fresh.remember(&message(0, "a/b", now, true, "on"));
        assert!(
            !fresh.is_duplicate(&message(7, "a/b", now + 1, true, "on")),
            "received later"
        );
        assert!(
            !fresh.is_duplicate(&message(7, "a/b", now, true, "off")),
            "other payload"
        );
        assert!(
            !fresh.is_duplicate(&message(7, "a/c", now, true, "on")),
            "other topic"
        );
        assert!(
            !fresh.is_duplicate(&message(7, "a/b", now, false, "on")),
            "not retained"
        );
        assert!(fresh.is_duplicate(&message(9, "a/b", now, true, "on")));
    }

    #[test]
    fn old_retained_messages_are_not_remembered() {
        let old = now_ms() - RACE_WINDOW.as_millis() as u64 - 1_000;
        let mut fresh = FreshRetained::default();
        fresh.remember(&message(0, "a/b", old, true, "on"));
        assert!(fresh.is_empty());
        assert!(!fresh.is_duplicate(&message(7, "a/b", old, true, "on")));
    }
}
