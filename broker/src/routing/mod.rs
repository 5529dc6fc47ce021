//! Where messages leave: the node reads the whole message stream once, in order, and hands
//! each message to the local sessions whose subscriptions match.
//!
//! Every message carries its position in the stream ([`position`]), so a session always
//! knows exactly how far it got. A session that attaches (connect, resume) or falls behind
//! (its queue was full) catches up by replaying from its own position: from the in-memory
//! [`ReplayRing`] when it still covers the gap, else from JetStream.

pub mod index;
pub mod mailbox;
pub mod position;
mod replay;
pub mod shared;
pub mod stall;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use jetmq_codec::QoS;
use jetmq_common::envelope::Envelope;
use tokio::sync::mpsc;

use mailbox::MailboxSender;
use tokio_util::sync::CancellationToken;

pub use index::{Match, SessionKey, SubEntry, SubscriptionIndex};
pub use replay::{replay_range, ReplayError};

use crate::telemetry::Metrics;

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

    fn approximate_size(&self) -> usize {
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

/// The link from the router to one local session.
pub struct SessionLink {
    pub client_id: Arc<str>,
    pub tx: MailboxSender,
    /// Set by the router when it had to skip a QoS 1/2 message because the queue was full:
    /// the lowest skipped sequence. The session then replays from its own position.
    pub lagged: Arc<AtomicU64>,
}

pub const NOT_LAGGED: u64 = u64::MAX;

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

    fn push(&mut self, msg: MessageRef) {
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

struct RouterState {
    index: SubscriptionIndex,
    sessions: HashMap<SessionKey, SessionLink>,
}

/// The node-wide dispatcher; shared by all connections.
pub struct Router {
    state: RwLock<RouterState>,
    /// Highest position dispatched so far: always the end of a stream message.
    position: AtomicU64,
    ring: Mutex<ReplayRing>,
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(start_position: u64, mut ring: ReplayRing, metrics: Arc<Metrics>) -> Router {
        ring.evicted_upto = ring.evicted_upto.max(start_position);
        Router {
            state: RwLock::new(RouterState {
                index: SubscriptionIndex::default(),
                sessions: HashMap::new(),
            }),
            position: AtomicU64::new(start_position),
            ring: Mutex::new(ring),
            metrics,
        }
    }

    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, RouterState> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, RouterState> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a session with its subscriptions. Returns the position from which the
    /// session receives live messages: everything after it arrives through `link.tx`,
    /// everything up to it the session must replay itself.
    pub fn attach(&self, key: SessionKey, link: SessionLink, subs: &[(String, SubEntry)]) -> u64 {
        let mut state = self.write_state();
        for (filter, entry) in subs {
            state.index.insert(filter, key, *entry);
        }
        state.sessions.insert(key, link);
        self.position()
    }

    pub fn detach(&self, key: SessionKey, filters: impl IntoIterator<Item = String>) {
        let mut state = self.write_state();
        for filter in filters {
            state.index.remove(&filter, key);
        }
        state.sessions.remove(&key);
    }

    /// Adds subscriptions; returns the position after which they take effect.
    pub fn subscribe(&self, key: SessionKey, subs: &[(String, SubEntry)]) -> u64 {
        let mut state = self.write_state();
        for (filter, entry) in subs {
            state.index.insert(filter, key, *entry);
        }
        self.position()
    }

    /// Lets the router deliver to a lagged session again. Returns the position up to which
    /// the session must replay: the router skipped it only for messages up to there.
    pub fn clear_lag(&self, _key: SessionKey, lagged: &AtomicU64) -> u64 {
        let _state = self.write_state();
        lagged.store(NOT_LAGGED, Ordering::Release);
        self.position()
    }

    pub fn unsubscribe(&self, key: SessionKey, filter: &str) -> bool {
        self.write_state().index.remove(filter, key)
    }

    pub fn subscription_count(&self) -> usize {
        self.read_state().index.len()
    }

    pub fn ring_range(&self, after: u64, upto: u64) -> Option<Vec<MessageRef>> {
        self.ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .range(after, upto)
    }

    /// See [`ReplayRing::matching`].
    pub fn ring_matching(
        &self,
        filters: &[String],
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Option<(Vec<MessageRef>, u64)> {
        self.ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .matching(filters, after, upto, limit)
    }

    /// Hands the messages of one stream message to every matching local session; the
    /// router's position then moves to `upto`, the end of that stream message.
    pub fn dispatch(&self, msgs: &[MessageRef], upto: u64) {
        // Into the ring before the position moves: a catch-up up to the router's position
        // (clear_lag, attach) reads the ring and must find every message up to it. Pushing
        // after publishing the position lost messages under load (qos1-backlog benchmark).
        {
            let mut ring = self
                .ring
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for msg in msgs {
                ring.push(msg.clone());
            }
        }
        let state = self.read_state();
        for msg in msgs {
            self.dispatch_one(&state, msg);
        }
        self.position.store(upto, Ordering::Release);
    }

    fn dispatch_one(&self, state: &RouterState, msg: &MessageRef) {
        let seq = msg.seq;
        let mut matches = Vec::new();
        state.index.matches(&msg.topic, &mut matches);
        matches.sort_unstable_by_key(|m| m.session);
        let mut entries = Vec::new();
        for group in matches.chunk_by(|a, b| a.session == b.session) {
            let session = group[0].session;
            let Some(link) = state.sessions.get(&session) else {
                continue;
            };
            if link.lagged.load(Ordering::Acquire) != NOT_LAGGED {
                continue;
            }
            entries.clear();
            entries.extend(group.iter().map(|m| m.entry));
            let is_self = *link.client_id == *msg.envelope.client_id;
            let Some(delivery) = merge_matches(msg, &entries, is_self) else {
                continue;
            };
            let qos = delivery.qos;
            match link.tx.try_send(delivery) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) if qos == QoS::AtMostOnce => {
                    self.metrics.dropped_qos0.inc();
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    link.lagged.store(seq, Ordering::Release);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

/// Reads the message stream from `router.position() + 1` on, forever, and dispatches it.
pub async fn run_stream_reader(
    router: Arc<Router>,
    stream: async_nats::jetstream::stream::Stream,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The reader must outlive any NATS trouble (a server dying, a leader election): it is
    // recreated from the router's position, so nothing is skipped or delivered twice.
    let mut watch = stall::StallWatch::default();
    loop {
        match read_stream(&router, &stream, &client, &mut watch, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::warn!(error = %err, position = router.position(), "message stream reader restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

async fn read_stream(
    router: &Router,
    stream: &async_nats::jetstream::stream::Stream,
    client: &async_nats::Client,
    watch: &mut stall::StallWatch,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy};
    let mut messages = stall::open_ordered(
        stream,
        push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{}.>", jetmq_common::subject::SHARE_PREFIX),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: position::first_stream_seq_after(router.position()),
            },
            ..Default::default()
        },
    )
    .await?;
    let mut checks = stall::check_interval();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = checks.tick() => {
                // Every message of the stream matches the reader's filter, so its last
                // sequence is where the router must get to.
                watch.check(stream, position::stream_seq(router.position())).await?;
                continue;
            }
            next = messages.next() => next,
        };
        let Some(message) = next else {
            anyhow::bail!("message stream reader ended");
        };
        // An error ends this consumer: it must not be polled again (see
        // [`stall::open_ordered`]); the reader is rebuilt from the router's position, so
        // nothing is skipped or delivered twice.
        let message = message.map_err(|err| anyhow::anyhow!("message stream reader: {err}"))?;
        let Some(seq) = message.reply.as_deref().and_then(stream_sequence) else {
            tracing::warn!(reply = ?message.reply, "message without JetStream metadata");
            continue;
        };
        let upto = position::end_of(seq);
        if upto <= router.position() {
            continue;
        }
        match decode_stream_messages(Some(seq), message.subject.as_str(), message.payload.clone()) {
            Ok(msgs) => router.dispatch(&msgs, upto),
            Err(err) => {
                tracing::warn!(seq, subject = %message.subject, error = %err, "skipping undecodable message");
                router.position.store(upto, Ordering::Release);
            }
        }
    }
}

/// The stream sequence in a JetStream delivery's reply subject: `$JS.ACK.<stream>.<consumer>.
/// <delivered>.<stream seq>...` (7 tokens after the prefix), or with domain and account hash
/// first (9 or more). Only this one number is parsed: `Message::info` also converts the
/// timestamp, which showed up in profiles of the reader.
pub fn stream_sequence(reply: &str) -> Option<u64> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // One pass over the subject (it is read for every message): where tokens 3 and 5
    // start and end, and how many tokens there are.
    let mut bounds = [0usize; 7];
    let mut tokens = 1;
    for (i, _) in rest.match_indices('.') {
        if tokens < bounds.len() {
            bounds[tokens] = i + 1;
        }
        tokens += 1;
    }
    let index = match tokens {
        7 => 3,
        n if n >= 9 => 5,
        _ => return None,
    };
    rest[bounds[index]..bounds[index + 1] - 1].parse().ok()
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

    #[test]
    fn stream_sequence_from_both_reply_subject_forms() {
        assert_eq!(
            stream_sequence("$JS.ACK.JETMQ_MSGS.abc.1.4242.17.1764500000000000000.0"),
            Some(4242)
        );
        assert_eq!(
            stream_sequence("$JS.ACK._.ACCHASH.JETMQ_MSGS.abc.1.99.17.1764500000000000000.3.tok"),
            Some(99)
        );
        assert_eq!(stream_sequence("$JS.ACK.S.c.1.x.1.1.0"), None);
        assert_eq!(stream_sequence("$JS.ACK.S.c.1"), None);
        assert_eq!(stream_sequence("_INBOX.x.y"), None);
        assert_eq!(stream_sequence("$JS.ACK.S.c.1..1.1.0"), None);
        assert_eq!(
            stream_sequence("$JS.ACK.S.c.1.99999999999999999999.1.1.0"),
            None
        );
        assert_eq!(
            stream_sequence("$JS.ACK.S.c.1.18446744073709551615.1.1.0"),
            Some(u64::MAX)
        );
        assert_eq!(stream_sequence("$JS.ACK.S.c.1.7.1.1.0."), None);
    }

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

    fn msg(seq: u64, qos: u8) -> MessageRef {
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

    #[test]
    fn the_ring_covers_ranges_across_the_gaps_between_positions() {
        let router = Router::new(
            position::end_of(10),
            ReplayRing::new(3, usize::MAX),
            Arc::new(Metrics::default()),
        );
        // Stream message 11 is a bundle of two, 12 a single message.
        let bundle = [msg(position::of(11, 0), 1), msg(position::of(11, 1), 1)];
        router.dispatch(&bundle, position::end_of(11));
        router.dispatch(&[msg(position::of(12, 0), 1)], position::end_of(12));
        assert_eq!(router.position(), position::end_of(12));
        // Before the node's start: not in the ring.
        assert!(router
            .ring_range(position::end_of(9), position::end_of(12))
            .is_none());
        let seqs = |after, upto| -> Vec<u64> {
            router
                .ring_range(after, upto)
                .expect("held")
                .iter()
                .map(|m| m.seq)
                .collect()
        };
        assert_eq!(
            seqs(position::end_of(10), position::end_of(12)),
            vec![
                position::of(11, 0),
                position::of(11, 1),
                position::of(12, 0)
            ]
        );
        // A session that finished the first half of the bundle.
        assert_eq!(
            seqs(position::of(11, 0), position::end_of(12)),
            vec![position::of(11, 1), position::of(12, 0)]
        );
        // One more message evicts the bundle's first half.
        router.dispatch(&[msg(position::of(13, 0), 1)], position::end_of(13));
        assert!(router
            .ring_range(position::end_of(10), position::end_of(13))
            .is_none());
        assert_eq!(seqs(position::of(11, 0), position::of(11, 1)).len(), 1);
    }

    #[test]
    fn the_ring_holds_every_message_up_to_the_published_position() {
        // A catch-up reads the ring up to router.position(): the message at that position
        // must already be there, whatever the dispatching thread is doing meanwhile.
        let router = Arc::new(Router::new(
            0,
            ReplayRing::new(100_000, usize::MAX),
            Arc::new(Metrics::default()),
        ));
        let writer = {
            let router = router.clone();
            std::thread::spawn(move || {
                for seq in 1..=50_000 {
                    router.dispatch(&[msg(position::of(seq, 0), 1)], position::end_of(seq));
                }
            })
        };
        let filters = ["#".to_owned()];
        let mut checked = 0;
        while !writer.is_finished() || checked == 0 {
            let position = router.position();
            let seq = position::stream_seq(position);
            if seq > 0 {
                let (found, _) = router
                    .ring_matching(&filters, position::end_of(seq - 1), position, 1)
                    .expect("the ring covers the newest messages");
                assert_eq!(found.len(), 1, "message {position} missing from the ring");
                checked += 1;
            }
        }
        writer.join().expect("dispatching thread");
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

    #[tokio::test]
    async fn full_queue_marks_qos1_sessions_lagged() {
        let router = Router::new(
            0,
            ReplayRing::new(100, usize::MAX),
            Arc::new(Metrics::default()),
        );
        let (tx, rx) = mailbox::mailbox(1);
        let lagged = Arc::new(AtomicU64::new(NOT_LAGGED));
        let sub = SubEntry {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
            after_seq: 0,
        };
        router.attach(
            1,
            SessionLink {
                client_id: "sub".into(),
                tx,
                lagged: lagged.clone(),
            },
            &[("a/#".to_owned(), sub)],
        );
        // One single message, then a bundle of two: the queue (room for one) is full at the
        // bundle's first half, which is where the session must catch up from.
        router.dispatch(&[msg(position::of(1, 0), 1)], position::end_of(1));
        router.dispatch(
            &[msg(position::of(2, 0), 1), msg(position::of(2, 1), 1)],
            position::end_of(2),
        );
        assert_eq!(lagged.load(Ordering::Acquire), position::of(2, 0));
        assert_eq!(rx.recv().await.msg.seq, position::of(1, 0));
        assert_eq!(router.position(), position::end_of(2));
        let behind = router
            .ring_range(position::of(1, 0), position::end_of(2))
            .expect("held");
        assert_eq!(behind.len(), 2);
    }
}
