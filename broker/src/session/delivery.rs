//! The outgoing half of a session as a state machine, free of I/O: which messages wait,
//! which are in flight under which packet id, and how far the session durably got.
//!
//! Packet identifiers of messages from the stream are derived from their position
//! ([`crate::routing::position`]), so after a crash the node that resumes the session
//! resends an unfinished QoS 2 message under the same identifier and the client recognises
//! it instead of delivering it twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Arc;

use jetmq_codec::{QoS, ReasonCode};

use crate::routing::shared::SharedAck;
use crate::routing::Delivery;

/// Identifiers 1..=32767 belong to stream messages, the rest to other deliveries
/// (retained messages on subscribe, shared subscriptions).
const STREAM_PACKET_IDS: u64 = 32_767;
const FIRST_EXTRA_PACKET_ID: u16 = 32_768;

pub fn stream_packet_id(seq: u64) -> u16 {
    (seq % STREAM_PACKET_IDS + 1) as u16
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // named after the packets
pub enum AckKind {
    PubAck,
    PubRec,
    PubComp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // what the message waits for
pub enum OutState {
    AwaitAck,
    AwaitRec,
    AwaitComp,
}

struct Outgoing {
    seq: u64,
    state: OutState,
    shared_ack: Option<Arc<SharedAck>>,
}

/// What an acknowledgement from the client leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// The message is done.
    Finished,
    /// Send PUBREL; if `persist_first`, only after the session record says "released".
    SendPubRel {
        persist_first: bool,
    },
    UnknownPacketId,
    Unexpected(OutState),
}

/// Messages waiting for the in-flight window, bounded in count and in payload bytes.
struct SessionQueue {
    items: VecDeque<Delivery>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl SessionQueue {
    fn is_full(&self) -> bool {
        self.items.len() >= self.max_messages || self.bytes >= self.max_bytes
    }

    fn push(&mut self, delivery: Delivery) -> bool {
        if self.is_full() {
            return false;
        }
        self.bytes += delivery.msg.payload.len();
        self.items.push_back(delivery);
        true
    }

    fn pop_front(&mut self) -> Option<Delivery> {
        let delivery = self.items.pop_front()?;
        self.bytes -= delivery.msg.payload.len();
        Some(delivery)
    }
}

/// Whether a delivery was taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Accept {
    Queued,
    /// Already seen (sequence at or below the position, or released).
    Duplicate,
    /// The queue was full; the delivery was dropped.
    Dropped,
}

pub struct DeliveryState {
    queue: SessionQueue,
    inflight: HashMap<u16, Outgoing>,
    inflight_limit: usize,
    next_extra_packet_id: u16,
    /// Every message up to this stream sequence has been seen by this session.
    pub position: u64,
    /// Messages in (position, replay_upto] must come from a replay, not the router queue.
    pub replay_upto: Option<u64>,
    /// In the order their PUBRECs arrived: a resume sends PUBREL in that order.
    released: Released,
    /// Released messages whose PUBCOMP arrived while the cursor was still below them. They
    /// stay in `released` until the cursor covers them: dropping them earlier would leave a
    /// stored record in which they are neither below the cursor nor released, and a resume
    /// from it would send them again as new PUBLISHes, which the client (having forgotten
    /// the packet id at PUBREL) would deliver twice.
    completed: HashSet<u64>,
    /// Stream sequences a previous connection may already have sent (DUP on resend).
    maybe_sent_before: RangeInclusive<u64>,
    /// The highest stream sequence that this or a previous connection may have sent.
    sent_upto: u64,
    /// A QoS 1/2 message was queued or finished since the flag was last cleared.
    pub delivered_since_persist: bool,
    /// The released set shrank since the flag was last cleared.
    pub released_changed: bool,
}

impl DeliveryState {
    /// `cursor` and `released` come from the session record; a resumed session may have had
    /// messages in `maybe_sent_before` sent to it by its previous connection.
    pub fn new(
        max_messages: usize,
        max_bytes: usize,
        inflight_limit: usize,
        cursor: u64,
        released: &[u64],
        maybe_sent_before: RangeInclusive<u64>,
    ) -> DeliveryState {
        DeliveryState {
            queue: SessionQueue {
                items: VecDeque::new(),
                bytes: 0,
                max_messages,
                max_bytes,
            },
            inflight: HashMap::new(),
            inflight_limit: inflight_limit.max(1),
            next_extra_packet_id: FIRST_EXTRA_PACKET_ID,
            position: cursor,
            replay_upto: None,
            released: Released::from_stored(released),
            completed: HashSet::new(),
            sent_upto: if maybe_sent_before.is_empty() {
                cursor
            } else {
                cursor.max(*maybe_sent_before.end())
            },
            maybe_sent_before,
            delivered_since_persist: false,
            released_changed: false,
        }
    }

    pub fn is_full(&self) -> bool {
        self.queue.is_full()
    }

    /// How many more messages fit (by count; bytes are checked as they arrive).
    pub fn room(&self) -> usize {
        if self.queue.bytes >= self.queue.max_bytes {
            return 0;
        }
        self.queue
            .max_messages
            .saturating_sub(self.queue.items.len())
    }

    pub fn queued(&self) -> usize {
        self.queue.items.len()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    fn push(&mut self, delivery: Delivery) -> Accept {
        if delivery.qos != QoS::AtMostOnce {
            self.delivered_since_persist = true;
        }
        if self.queue.push(delivery) {
            Accept::Queued
        } else {
            Accept::Dropped
        }
    }

    /// A delivery from the router: live, in stream order, after `position` (or a
    /// shared-subscription message, which lives outside the sequence).
    pub fn accept_live(&mut self, delivery: Delivery) -> Accept {
        if delivery.shared_ack.is_some() {
            return self.push(delivery);
        }
        let seq = delivery.msg.seq;
        if seq <= self.position || self.released.contains(&seq) {
            return Accept::Duplicate;
        }
        self.position = seq;
        self.push(delivery)
    }

    /// A live message not delivered (it went out as a retained copy already): the position
    /// moves past it as if it had been.
    pub fn skip_live(&mut self, seq: u64) {
        self.position = self.position.max(seq);
    }

    /// A delivery read back from the stream during a catch-up; the position moves with
    /// [`DeliveryState::replay_reached`].
    pub fn accept_replayed(&mut self, delivery: Delivery) -> Accept {
        let seq = delivery.msg.seq;
        if seq <= self.position || self.released.contains(&seq) {
            return Accept::Duplicate;
        }
        self.push(delivery)
    }

    /// A catch-up looked at everything up to `reached`.
    pub fn replay_reached(&mut self, reached: u64) {
        self.position = self.position.max(reached);
        if self.replay_upto.is_some_and(|upto| upto <= self.position) {
            self.replay_upto = None;
        }
    }

    /// Deliveries not sent yet (e.g. retained messages after a SUBACK).
    pub fn push_extra(&mut self, delivery: Delivery) -> Accept {
        self.push(delivery)
    }

    /// The next delivery that may go out now, with its packet id (0 for QoS 0) and DUP flag.
    /// Order is kept: a QoS 1/2 message waiting for the window holds back what follows it.
    pub fn next_to_send(&mut self) -> Option<(Delivery, u16, bool)> {
        let front = self.queue.items.front()?;
        if front.qos == QoS::AtMostOnce {
            return self.queue.pop_front().map(|d| (d, 0, false));
        }
        if self.inflight.len() >= self.inflight_limit {
            return None;
        }
        let seq = front.msg.seq;
        let packet_id = self.packet_id_for(seq)?;
        let delivery = self.queue.pop_front()?;
        let dup = seq > 0 && self.maybe_sent_before.contains(&seq);
        Some((delivery, packet_id, dup))
    }

    /// The identifier for a message, or None while it is still in use by an earlier one.
    fn packet_id_for(&mut self, seq: u64) -> Option<u16> {
        if seq > 0 {
            let id = stream_packet_id(seq);
            return (!self.inflight.contains_key(&id)).then_some(id);
        }
        for _ in 0..=(u16::MAX - FIRST_EXTRA_PACKET_ID) {
            let id = self.next_extra_packet_id;
            self.next_extra_packet_id = if id == u16::MAX {
                FIRST_EXTRA_PACKET_ID
            } else {
                id + 1
            };
            if !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Records a QoS 1/2 message as written to the client (or handed over for good, if it
    /// could not be sent at all: then it is finished right away).
    pub fn sent(&mut self, delivery: Delivery, packet_id: u16) {
        let state = match delivery.qos {
            QoS::AtMostOnce => {
                if let Some(ack) = &delivery.shared_ack {
                    ack.ack();
                }
                return;
            }
            QoS::AtLeastOnce => OutState::AwaitAck,
            QoS::ExactlyOnce => OutState::AwaitRec,
        };
        self.sent_upto = self.sent_upto.max(delivery.msg.seq);
        self.inflight.insert(
            packet_id,
            Outgoing {
                seq: delivery.msg.seq,
                state,
                shared_ack: delivery.shared_ack,
            },
        );
    }

    /// For [`SessionRecord::sent_upto`](crate::session::SessionRecord::sent_upto) when the
    /// connection ends in order.
    pub fn sent_upto(&self) -> u64 {
        self.sent_upto
    }

    /// A delivery that will never be sent (expired, too large for the client, refused by
    /// the ACL): done as far as the session is concerned.
    pub fn discarded(&mut self, delivery: &Delivery) {
        if let Some(ack) = &delivery.shared_ack {
            ack.ack();
        }
        if delivery.qos != QoS::AtMostOnce {
            self.delivered_since_persist = true;
        }
        self.forget_covered_completions();
    }

    pub fn acked(&mut self, packet_id: u16, kind: AckKind, reason: ReasonCode) -> AckOutcome {
        let Some(outgoing) = self.inflight.get_mut(&packet_id) else {
            return AckOutcome::UnknownPacketId;
        };
        match (kind, outgoing.state) {
            (AckKind::PubAck, OutState::AwaitAck) | (AckKind::PubComp, OutState::AwaitComp) => {
                self.finish(packet_id);
                AckOutcome::Finished
            }
            (AckKind::PubRec, OutState::AwaitRec) if reason.is_error() => {
                self.finish(packet_id);
                AckOutcome::Finished
            }
            (AckKind::PubRec, OutState::AwaitRec) => {
                outgoing.state = OutState::AwaitComp;
                let seq = outgoing.seq;
                if seq > 0 {
                    self.released.insert(seq);
                }
                AckOutcome::SendPubRel {
                    persist_first: seq > 0,
                }
            }
            (_, state) => AckOutcome::Unexpected(state),
        }
    }

    fn finish(&mut self, packet_id: u16) {
        if let Some(outgoing) = self.inflight.remove(&packet_id) {
            if let Some(ack) = &outgoing.shared_ack {
                ack.ack();
            }
            self.delivered_since_persist = true;
            if self.released.contains(&outgoing.seq) {
                self.completed.insert(outgoing.seq);
            }
        }
        self.forget_covered_completions();
    }

    /// Drops completed QoS 2 messages the cursor now covers from `released`.
    fn forget_covered_completions(&mut self) {
        if self.completed.is_empty() {
            return;
        }
        let cursor = self.durable_cursor();
        let before = self.completed.len();
        let mut covered = HashSet::new();
        self.completed.retain(|&seq| {
            if seq <= cursor {
                covered.insert(seq);
                false
            } else {
                true
            }
        });
        if self.completed.len() != before {
            self.released.retain(|seq| !covered.contains(&seq));
            self.released_changed = true;
        }
    }

    /// After a resume: the packet ids of QoS 2 messages whose PUBREC arrived before the
    /// break, in the order the PUBRECs arrived ([MQTT-4.6.0-4]: PUBRELs go out in that order;
    /// packet ids wrap, so their numeric order is not it). They are in flight again,
    /// waiting for PUBCOMP; the caller sends PUBREL.
    pub fn resume_released(&mut self) -> Vec<u16> {
        let mut ids = Vec::new();
        for &seq in self.released.in_order() {
            let id = stream_packet_id(seq);
            self.inflight.insert(
                id,
                Outgoing {
                    seq,
                    state: OutState::AwaitComp,
                    shared_ack: None,
                },
            );
            ids.push(id);
        }
        ids
    }

    /// Highest sequence such that every QoS 1/2 message up to it is finished or released.
    pub fn durable_cursor(&self) -> u64 {
        let queued = self
            .queue
            .items
            .iter()
            .filter(|d| d.qos != QoS::AtMostOnce && d.msg.seq > 0 && d.shared_ack.is_none())
            .map(|d| d.msg.seq);
        let inflight = self
            .inflight
            .values()
            .filter(|o| o.seq > 0 && o.state != OutState::AwaitComp)
            .map(|o| o.seq);
        match queued.chain(inflight).min() {
            Some(oldest) => (oldest - 1).min(self.position),
            None => self.position,
        }
    }

    /// The released positions for the session record, in the order their PUBRECs arrived.
    pub fn released_in_order(&self) -> Vec<u64> {
        self.released.in_order().copied().collect()
    }
}

/// Positions of released QoS 2 messages, in the order they were released (their PUBRECs
/// arrived), with a set beside the order for the per-message `contains` of the router.
#[derive(Default)]
struct Released {
    order: VecDeque<u64>,
    members: HashSet<u64>,
}

impl Released {
    /// From a session record: its list is in release order (records of builds that sorted
    /// it by position hold the same order, since a session's messages go out in position
    /// order and the client answers PUBREC in the order of the PUBLISHes).
    fn from_stored(stored: &[u64]) -> Released {
        let mut released = Released::default();
        for &seq in stored {
            released.insert(seq);
        }
        released
    }

    fn contains(&self, seq: &u64) -> bool {
        self.members.contains(seq)
    }

    fn insert(&mut self, seq: u64) {
        if self.members.insert(seq) {
            self.order.push_back(seq);
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let members = &mut self.members;
        self.order.retain(|&seq| {
            let kept = keep(seq);
            if !kept {
                members.remove(&seq);
            }
            kept
        });
    }

    fn in_order(&self) -> impl Iterator<Item = &u64> {
        self.order.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::StoredMessage;
    use bytes::Bytes;
    use jetmq_common::envelope::Envelope;

    fn delivery(seq: u64, qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(StoredMessage {
                seq,
                topic: "t".into(),
                envelope: Envelope {
                    qos: qos as u8,
                    ..Default::default()
                },
                payload: Bytes::from_static(b"0123456789"),
            }),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            shared_ack: None,
        }
    }

    fn state(cursor: u64) -> DeliveryState {
        DeliveryState::new(100, 1 << 20, 2, cursor, &[], RangeInclusive::new(1, 0))
    }

    #[test]
    fn live_deliveries_at_or_below_the_position_are_duplicates() {
        let mut s = state(10);
        assert_eq!(
            s.accept_live(delivery(10, QoS::AtLeastOnce)),
            Accept::Duplicate
        );
        assert_eq!(
            s.accept_live(delivery(11, QoS::AtLeastOnce)),
            Accept::Queued
        );
        assert_eq!(
            s.accept_live(delivery(11, QoS::AtLeastOnce)),
            Accept::Duplicate
        );
        assert_eq!(s.position, 11);
    }

    #[test]
    fn window_holds_back_qos1_and_what_follows() {
        let mut s = state(0);
        for seq in 1..=3 {
            s.accept_live(delivery(seq, QoS::AtLeastOnce));
        }
        s.accept_live(delivery(4, QoS::AtMostOnce));
        let (d1, id1, _) = s.next_to_send().expect("first");
        s.sent(d1, id1);
        let (d2, id2, _) = s.next_to_send().expect("second");
        s.sent(d2, id2);
        assert!(s.next_to_send().is_none(), "window of 2 is full");
        assert_eq!(s.durable_cursor(), 0);
        assert_eq!(
            s.acked(id1, AckKind::PubAck, ReasonCode::SUCCESS),
            AckOutcome::Finished
        );
        assert_eq!(s.durable_cursor(), 1);
        let (d3, id3, _) = s.next_to_send().expect("third");
        assert_eq!(id3, stream_packet_id(3));
        s.sent(d3, id3);
        let (d4, id4, _) = s.next_to_send().expect("QoS 0 after it");
        assert_eq!((d4.msg.seq, id4), (4, 0));
    }

    #[test]
    fn qos2_released_survives_as_pubrel_on_resume() {
        let mut s = state(0);
        s.accept_live(delivery(5, QoS::ExactlyOnce));
        let (d, id, dup) = s.next_to_send().expect("sendable");
        assert!(!dup);
        s.sent(d, id);
        assert_eq!(
            s.acked(id, AckKind::PubRec, ReasonCode::SUCCESS),
            AckOutcome::SendPubRel {
                persist_first: true
            }
        );
        // PUBREC'd messages no longer hold the cursor back; they are in `released`.
        assert_eq!(s.durable_cursor(), 5);
        assert_eq!(s.released_in_order(), vec![5]);

        // A new connection resumes from cursor 5 with 5 released.
        let mut resumed = DeliveryState::new(100, 1 << 20, 2, 5, &[5], RangeInclusive::new(6, 9));
        assert_eq!(resumed.resume_released(), vec![stream_packet_id(5)]);
        assert_eq!(
            resumed.accept_replayed(delivery(5, QoS::ExactlyOnce)),
            Accept::Duplicate
        );
        assert_eq!(
            resumed.acked(stream_packet_id(5), AckKind::PubComp, ReasonCode::SUCCESS),
            AckOutcome::Finished
        );
        assert!(resumed.released_changed);
        assert!(resumed.released_in_order().is_empty());
    }

    #[test]
    fn pubrels_after_a_resume_follow_the_pubrec_order_across_a_packet_id_wrap() {
        // Positions around the point where packet ids wrap (32767 -> 1).
        let seqs: Vec<u64> = (STREAM_PACKET_IDS - 3..STREAM_PACKET_IDS + 3).collect();
        let mut s = DeliveryState::new(
            100,
            1 << 20,
            16,
            seqs[0] - 1,
            &[],
            RangeInclusive::new(1, 0),
        );
        for &seq in &seqs {
            s.accept_live(delivery(seq, QoS::ExactlyOnce));
        }
        let mut ids = Vec::new();
        while let Some((d, id, _)) = s.next_to_send() {
            s.sent(d, id);
            ids.push(id);
        }
        assert!(ids.windows(2).any(|w| w[1] < w[0]), "ids wrap: {ids:?}");
        for &id in &ids {
            s.acked(id, AckKind::PubRec, ReasonCode::SUCCESS);
        }
        let stored = s.released_in_order();
        assert_eq!(stored, seqs, "the record keeps the PUBREC order");

        let json = serde_json::to_vec(&stored).expect("serializes");
        let loaded: Vec<u64> = serde_json::from_slice(&json).expect("parses");
        let mut resumed = DeliveryState::new(
            100,
            1 << 20,
            16,
            *seqs.last().expect("some"),
            &loaded,
            RangeInclusive::new(1, 0),
        );
        assert_eq!(resumed.resume_released(), ids, "PUBRELs in PUBREC order");

        // Completing the first one keeps the rest in order.
        resumed.acked(ids[0], AckKind::PubComp, ReasonCode::SUCCESS);
        assert_eq!(resumed.released_in_order(), seqs[1..].to_vec());
    }

    #[test]
    fn resent_messages_carry_dup_and_the_same_packet_id() {
        let mut s = DeliveryState::new(100, 1 << 20, 8, 3, &[], RangeInclusive::new(4, 6));
        s.accept_replayed(delivery(4, QoS::ExactlyOnce));
        s.replay_reached(6);
        s.accept_live(delivery(7, QoS::ExactlyOnce));
        let (_, id4, dup4) = s.next_to_send().expect("replayed");
        let (_, id7, dup7) = s.next_to_send().expect("live");
        assert_eq!((id4, dup4), (stream_packet_id(4), true));
        assert_eq!((id7, dup7), (stream_packet_id(7), false));
    }

    #[test]
    fn colliding_packet_ids_wait_for_the_earlier_message() {
        let mut s = DeliveryState::new(100, 1 << 20, 8, 0, &[], RangeInclusive::new(1, 0));
        s.accept_live(delivery(1, QoS::AtLeastOnce));
        s.accept_live(delivery(1 + STREAM_PACKET_IDS, QoS::AtLeastOnce));
        let (d, id, _) = s.next_to_send().expect("first");
        s.sent(d, id);
        assert!(s.next_to_send().is_none(), "same packet id still in flight");
        s.acked(id, AckKind::PubAck, ReasonCode::SUCCESS);
        assert!(s.next_to_send().is_some());
    }

    #[test]
    fn queue_is_bounded_by_bytes() {
        let mut s = DeliveryState::new(100, 25, 2, 0, &[], RangeInclusive::new(1, 0));
        assert_eq!(s.accept_live(delivery(1, QoS::AtLeastOnce)), Accept::Queued);
        assert_eq!(s.accept_live(delivery(2, QoS::AtLeastOnce)), Accept::Queued);
        assert_eq!(s.accept_live(delivery(3, QoS::AtLeastOnce)), Accept::Queued);
        assert!(s.is_full());
        assert_eq!(s.room(), 0);
        assert_eq!(
            s.accept_live(delivery(4, QoS::AtLeastOnce)),
            Accept::Dropped
        );
    }

    #[test]
    fn refused_pubrec_finishes_the_message() {
        let mut s = state(0);
        s.accept_live(delivery(1, QoS::ExactlyOnce));
        let (d, id, _) = s.next_to_send().expect("sendable");
        s.sent(d, id);
        assert_eq!(
            s.acked(id, AckKind::PubRec, ReasonCode::NOT_AUTHORIZED),
            AckOutcome::Finished
        );
        assert_eq!(s.inflight(), 0);
        assert_eq!(
            s.acked(id, AckKind::PubComp, ReasonCode::SUCCESS),
            AckOutcome::UnknownPacketId
        );
    }

    #[test]
    fn completed_qos2_above_the_cursor_is_not_sent_again_after_a_crash() {
        let mut s = state(0);
        s.accept_live(delivery(10, QoS::AtLeastOnce));
        s.accept_live(delivery(11, QoS::ExactlyOnce));
        let (d10, id10, _) = s.next_to_send().expect("QoS 1");
        s.sent(d10, id10);
        let (d11, id11, _) = s.next_to_send().expect("QoS 2");
        s.sent(d11, id11);
        assert_eq!(
            s.acked(id11, AckKind::PubRec, ReasonCode::SUCCESS),
            AckOutcome::SendPubRel {
                persist_first: true
            }
        );
        assert_eq!(
            s.acked(id11, AckKind::PubComp, ReasonCode::SUCCESS),
            AckOutcome::Finished
        );
        // The QoS 1 message still waits for its PUBACK, so the cursor stays below both.
        let cursor = s.durable_cursor();
        assert_eq!(cursor, 9);
        // What a periodic write would store; then the node dies.
        let released = s.released_in_order();
        let mut resumed = DeliveryState::new(
            100,
            1 << 20,
            2,
            cursor,
            &released,
            RangeInclusive::new(10, 11),
        );
        resumed.resume_released();
        assert_eq!(
            resumed.accept_replayed(delivery(10, QoS::AtLeastOnce)),
            Accept::Queued,
            "QoS 1 is at least once"
        );
        // The client forgot packet id 11 at PUBREL: sending it again would deliver it twice.
        assert_eq!(
            resumed.accept_replayed(delivery(11, QoS::ExactlyOnce)),
            Accept::Duplicate
        );

        // Once the QoS 1 message is acknowledged the cursor covers 11 and it is forgotten.
        s.acked(id10, AckKind::PubAck, ReasonCode::SUCCESS);
        assert_eq!(s.durable_cursor(), 11);
        assert!(s.released_in_order().is_empty());
        assert!(s.released_changed);
    }
}
