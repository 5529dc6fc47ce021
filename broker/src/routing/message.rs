//! What flows through routing: one MQTT message as stored in the message stream
//! ([`StoredMessage`]), and its delivery to one session ([`Delivery`]).
//!
//! The stream reader decodes stream messages with [`decode_stream_messages`] (a bundle is
//! several MQTT messages); the router turns each into one [`Delivery`] per matching session
//! with [`merge_matches`].

use std::sync::Arc;

use bytes::Bytes;
use jetmq_codec::QoS;
use jetmq_common::envelope::Envelope;

use super::{position, shared, SubEntry};

/// One MQTT message as stored in the message stream.
#[derive(Debug)]
pub struct StoredMessage {
    /// Position in `JETMQ_MSGS` ([`position`]); 0 for messages that did not come from it
    /// (retained) or that the session must not count (shared subscriptions).
    pub seq: u64,
    pub topic: String,
    pub envelope: Envelope,
    pub payload: Bytes,
}

pub type MessageRef = Arc<StoredMessage>;

impl StoredMessage {
    pub fn qos(&self) -> QoS {
        QoS::from_u8(self.envelope.qos).unwrap_or(QoS::AtMostOnce)
    }

    pub(super) fn approximate_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.topic.len()
            + self.payload.len()
            + self.envelope.client_id.len()
    }
}

/// A message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: MessageRef,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// Set for shared subscriptions: acknowledge to JetStream once the client did.
    pub shared_ack: Option<Arc<shared::SharedAck>>,
}

/// Builds the delivery of `msg` for a session from all its matching subscriptions: one copy,
/// at the highest granted QoS, carrying every subscription identifier.
pub fn merge_matches(
    msg: &MessageRef,
    matches: &[SubEntry],
    publisher_is_self: bool,
) -> Option<Delivery> {
    let mut qos = None::<QoS>;
    let mut retain = false;
    let mut ids = Vec::new();
    for entry in matches {
        if entry.no_local && publisher_is_self {
            continue;
        }
        if entry.after_seq != 0 && msg.seq <= entry.after_seq {
            continue;
        }
        let granted = entry.qos.min(msg.qos());
        qos = Some(qos.map_or(granted, |q| q.max(granted)));
        retain |= entry.retain_as_published && msg.envelope.retain;
        if let Some(id) = entry.subscription_id {
            ids.push(id);
        }
    }
    qos.map(|qos| Delivery {
        msg: msg.clone(),
        qos,
        retain,
        subscription_ids: ids,
        shared_ack: None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeMessageError {
    #[error(transparent)]
    Subject(#[from] jetmq_common::subject::SubjectError),
    #[error(transparent)]
    Envelope(#[from] jetmq_common::envelope::EnvelopeError),
}

/// The MQTT messages of one stream message (several if it is a bundle), each with its
/// position if `stream_seq` is given, else with 0.
pub fn decode_stream_messages(
    stream_seq: Option<u64>,
    subject: &str,
    body: Bytes,
) -> Result<Vec<MessageRef>, DecodeMessageError> {
    let (_, topic) = jetmq_common::subject::parse_stream_subject(subject)?;
    let bodies = jetmq_common::envelope::split_bundle(body)?;
    let mut out = Vec::with_capacity(bodies.len());
    let last = bodies.len().saturating_sub(1);
    let mut topic = Some(topic);
    for (index, body) in bodies.into_iter().enumerate() {
        let (envelope, payload) = Envelope::decode(body)?;
        // The last (usually the only) message takes the topic itself.
        let topic = if index == last {
            topic.take()
        } else {
            topic.clone()
        };
        out.push(Arc::new(StoredMessage {
            seq: stream_seq.map_or(0, |s| position::of(s, index)),
            topic: topic.unwrap_or_default(),
            envelope,
            payload,
        }));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A QoS 1 delivery of a message with sequence `seq`.
    pub(crate) fn delivery(seq: u64) -> Delivery {
        Delivery {
            msg: msg(seq, 1),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Vec::new(),
            shared_ack: None,
        }
    }

    pub(crate) fn msg(seq: u64, qos: u8) -> MessageRef {
        Arc::new(StoredMessage {
            seq,
            topic: "a/b".into(),
            envelope: Envelope {
                qos,
                retain: true,
                client_id: "pub".into(),
                ..Default::default()
            },
            payload: Bytes::from_static(b"x"),
        })
    }

    #[test]
    fn overlapping_subscriptions_merge_into_one_delivery() {
        let m = msg(1, 2);
        let subs = [
            SubEntry {
                qos: QoS::AtMostOnce,
                no_local: false,
                retain_as_published: false,
                subscription_id: Some(1),
                after_seq: 0,
            },
            SubEntry {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: true,
                subscription_id: Some(7),
                after_seq: 0,
            },
        ];
        let d = merge_matches(&m, &subs, false).expect("delivered");
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert!(d.retain);
        assert_eq!(d.subscription_ids, vec![1, 7]);
    }

    #[test]
    fn no_local_skips_own_messages() {
        let m = msg(1, 1);
        let sub = SubEntry {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: false,
            subscription_id: None,
            after_seq: 0,
        };
        assert!(merge_matches(&m, &[sub], true).is_none());
        assert!(merge_matches(&m, &[sub], false).is_some());
    }
}
