//! The router: the node-wide table of local sessions and their subscriptions.
//!
//! Sessions [`Router::attach`] with their subscriptions and get the position from which
//! they receive live messages; the stream reader hands every stream message to
//! [`Router::dispatch`], which puts it into the [`ReplayRing`] and into the mailbox of
//! every matching session. A session whose mailbox is full is marked lagged
//! ([`SessionLink::lagged`]) and catches up by replay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jetmq_codec::QoS;
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::mpsc;

use super::mailbox::MailboxSender;
use super::{merge_matches, MessageRef, ReplayRing, SessionKey, SubEntry, SubscriptionIndex};
use crate::telemetry::Metrics;

/// The link from the router to one local session.
pub struct SessionLink {
    pub client_id: Arc<str>,
    pub tx: MailboxSender,
    /// Set by the router when it had to skip a QoS 1/2 message because the queue was full:
    /// the lowest skipped sequence. The session then replays from its own position.
    pub lagged: Arc<AtomicU64>,
}

pub const NOT_LAGGED: u64 = u64::MAX;

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
        ring.starting_at(start_position);
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

    /// Moves the position past a stream message that was not dispatched (undecodable).
    pub(super) fn skip_to(&self, upto: u64) {
        self.position.store(upto, Ordering::Release);
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, RouterState> {
        self.state.write()
    }

    fn read_state(&self) -> RwLockReadGuard<'_, RouterState> {
        self.state.read()
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
        self.ring.lock().range(after, upto)
    }

    /// See [`ReplayRing::matching`].
    pub fn ring_matching(
        &self,
        filters: &[String],
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Option<(Vec<MessageRef>, u64)> {
        self.ring.lock().matching(filters, after, upto, limit)
    }

    /// Hands the messages of one stream message to every matching local session; the
    /// router's position then moves to `upto`, the end of that stream message.
    pub fn dispatch(&self, msgs: &[MessageRef], upto: u64) {
        // Into the ring before the position moves: a catch-up up to the router's position
        // (clear_lag, attach) reads the ring and must find every message up to it. Pushing
        // after publishing the position lost messages under load (qos1-backlog benchmark).
        {
            let mut ring = self.ring.lock();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::message::tests::msg;
    use crate::routing::{mailbox, position};

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
