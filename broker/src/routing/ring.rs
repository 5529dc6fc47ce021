//! The replay ring: the most recent messages of the stream, in memory.
//!
//! The router pushes every message it dispatches into the ring ([`Router::dispatch`]); a
//! session that catches up asks the ring first ([`ReplayRing::matching`]) and goes to
//! JetStream only when the ring no longer covers its gap.
//!
//! [`Router::dispatch`]: super::Router::dispatch

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};

use super::MessageRef;

/// The most recent messages of the stream, kept so that resuming sessions rarely need
/// JetStream at all.
#[derive(Default)]
pub struct ReplayRing {
    messages: VecDeque<MessageRef>,
    /// Sequences in the ring by topic hash: a session subscribed to exact topics (the usual
    /// device pattern) finds its messages without looking at everyone else's. In a storm of
    /// 10,000 resuming sessions the scan over the whole ring per session was 40% of the CPU.
    by_topic: HashMap<u64, VecDeque<u64>, BuildHasherDefault<AlreadyHashed>>,
    /// The `by_topic` key of each message in `messages`, in the same order: an evicted
    /// message's topic is not hashed a second time (SipHash of every topic twice was 2% of
    /// the node's CPU in QoS 1 fan-in).
    topic_hashes: VecDeque<u64>,
    /// Keyed per process, so nobody can choose topics that pile into one `by_topic` slot.
    topic_hasher: std::collections::hash_map::RandomState,
    /// Every message up to this position that the ring ever had is gone from it (and the
    /// ring never had those before the node's start): it holds whatever came after.
    evicted_upto: u64,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

/// What a ring entry costs besides the message: its slot in `by_topic`.
const RING_INDEX_OVERHEAD: usize = 56;

/// `by_topic` keys are hashes already: hashing them again cost as much as the first time.
/// Hand-written because no crate in the dependency tree offers an identity hasher (such
/// as `nohash-hasher`), and these few lines are not worth a new dependency.
#[derive(Default)]
struct AlreadyHashed(u64);

impl std::hash::Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in so it still works.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl ReplayRing {
    pub fn new(max_messages: usize, max_bytes: usize) -> ReplayRing {
        ReplayRing {
            max_messages,
            max_bytes,
            ..ReplayRing::default()
        }
    }

    pub(super) fn push(&mut self, msg: MessageRef) {
        self.bytes += msg.approximate_size() + RING_INDEX_OVERHEAD;
        let hash = self.topic_hasher.hash_one(&msg.topic);
        self.by_topic.entry(hash).or_default().push_back(msg.seq);
        self.topic_hashes.push_back(hash);
        self.messages.push_back(msg);
        while self.messages.len() > self.max_messages || self.bytes > self.max_bytes {
            let (Some(old), Some(hash)) =
                (self.messages.pop_front(), self.topic_hashes.pop_front())
            else {
                break;
            };
            self.bytes -= old.approximate_size() + RING_INDEX_OVERHEAD;
            self.evicted_upto = old.seq;
            if let Some(seqs) = self.by_topic.get_mut(&hash) {
                seqs.pop_front();
                if seqs.is_empty() {
                    self.by_topic.remove(&hash);
                }
            }
        }
    }

    /// The ring of a node that starts reading at `position`: it never had anything up
    /// to there.
    pub(super) fn starting_at(&mut self, position: u64) {
        self.evicted_upto = self.evicted_upto.max(position);
    }

    /// Positions have gaps (a stream message of one MQTT message leaves 255 unused), so the
    /// ring keeps how far it evicted rather than comparing with its first message.
    fn covers(&self, after: u64) -> bool {
        after >= self.evicted_upto
    }

    fn at(&self, seq: u64) -> Option<&MessageRef> {
        let index = self.messages.partition_point(|m| m.seq < seq);
        self.messages.get(index).filter(|m| m.seq == seq)
    }

    /// Messages with `after < seq <= upto`, if the ring still holds all of them.
    pub fn range(&self, after: u64, upto: u64) -> Option<Vec<MessageRef>> {
        if upto <= after {
            return Some(Vec::new());
        }
        if !self.covers(after) {
            return None;
        }
        let start = self.messages.partition_point(|m| m.seq <= after);
        Some(
            self.messages
                .range(start..)
                .take_while(|m| m.seq <= upto)
                .cloned()
                .collect(),
        )
    }

    /// Up to `limit` messages with `after < seq <= upto` matching one of `filters`, and the
    /// sequence up to which the range was looked at; `None` if the ring does not hold the
    /// whole range.
    pub fn matching(
        &self,
        filters: &[String],
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Option<(Vec<MessageRef>, u64)> {
        if upto <= after || filters.is_empty() {
            return Some((Vec::new(), upto.max(after)));
        }
        if !self.covers(after) {
            return None;
        }
        let exact = filters.iter().all(|f| !f.contains(['+', '#']));
        let mut out = Vec::new();
        if exact {
            let mut seqs: Vec<u64> = filters
                .iter()
                .filter_map(|f| self.by_topic.get(&self.topic_hasher.hash_one(f)))
                .flat_map(|seqs| seqs.iter().copied().filter(|&s| s > after && s <= upto))
                .collect();
            seqs.sort_unstable();
            seqs.dedup();
            for seq in seqs {
                // Equal hashes of different topics are possible: check the topic itself.
                let Some(msg) = self.at(seq).filter(|m| filters.contains(&m.topic)) else {
                    continue;
                };
                if out.len() == limit {
                    return Some((out, seq - 1));
                }
                out.push(msg.clone());
            }
            return Some((out, upto));
        }
        let start = self.messages.partition_point(|m| m.seq <= after);
        for msg in self.messages.range(start..).take_while(|m| m.seq <= upto) {
            if filters.iter().any(|f| crate::topic::matches(f, &msg.topic)) {
                if out.len() == limit {
                    return Some((out, msg.seq - 1));
                }
                out.push(msg.clone());
            }
        }
        Some((out, upto))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::message::tests::msg;
    use crate::routing::StoredMessage;
    use bytes::Bytes;
    use jetmq_common::envelope::Envelope;
    use std::sync::Arc;

    #[test]
    fn ring_serves_only_ranges_it_fully_holds() {
        let mut ring = ReplayRing::new(3, usize::MAX);
        for seq in 1..=5 {
            ring.push(msg(seq, 1));
        }
        assert!(ring.range(1, 5).is_none());
        let seqs: Vec<u64> = ring
            .range(2, 4)
            .expect("held")
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, vec![3, 4]);
        assert_eq!(ring.range(5, 5).expect("empty").len(), 0);
    }

    fn on_topic(seq: u64, topic: &str) -> MessageRef {
        Arc::new(StoredMessage {
            seq,
            topic: topic.into(),
            envelope: Envelope::default(),
            payload: Bytes::from_static(b"x"),
        })
    }

    #[test]
    fn ring_finds_exact_topics_through_its_index_and_wildcards_by_scanning() {
        let mut ring = ReplayRing::new(4, usize::MAX);
        for (seq, topic) in [
            (1, "d/1"),
            (2, "d/2"),
            (3, "d/1"),
            (4, "d/3"),
            (5, "d/1"),
            (6, "e/1"),
        ] {
            ring.push(on_topic(seq, topic));
        }
        // 1 and 2 were evicted, and with them their index entries.
        assert!(ring.matching(&["d/1".into()], 0, 6, 10).is_none());
        assert!(!ring
            .by_topic
            .contains_key(&ring.topic_hasher.hash_one("d/2")));
        let seqs = |found: Option<(Vec<MessageRef>, u64)>| {
            let (msgs, reached) = found.expect("held");
            (msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), reached)
        };
        assert_eq!(
            seqs(ring.matching(&["d/1".into()], 2, 6, 10)),
            (vec![3, 5], 6)
        );
        assert_eq!(
            seqs(ring.matching(&["d/1".into(), "d/3".into()], 2, 6, 10)),
            (vec![3, 4, 5], 6)
        );
        // The limit stops right before the first message that did not fit.
        assert_eq!(seqs(ring.matching(&["d/1".into()], 2, 6, 1)), (vec![3], 4));
        assert_eq!(
            seqs(ring.matching(&["d/+".into()], 2, 6, 10)),
            (vec![3, 4, 5], 6)
        );
        assert_eq!(
            seqs(ring.matching(&["#".into()], 3, 5, 10)),
            (vec![4, 5], 5)
        );
        assert_eq!(
            seqs(ring.matching(&["nothing".into()], 2, 6, 10)),
            (vec![], 6)
        );
    }
}
