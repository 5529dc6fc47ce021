//! Messages towards the client: the queue, the in-flight window, catch-up replays.
//!
//! Packet identifiers of messages from the stream are derived from their stream sequence.
//! After a crash the node that resumes the session resends an unfinished QoS 2 message
//! under the same identifier, so the client recognises it and does not deliver it twice.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use jetmq_codec::{Packet, PubResp, Publish, PublishProperties, QoS, ReasonCode};

use super::{Client, Exit};
use crate::auth::Action;
use crate::routing::{merge_matches, replay_range, Delivery, MessageRef, ReplayError, NOT_LAGGED};
use crate::session::now_ms;

/// Identifiers 1..=32767 belong to stream messages, the rest to retained deliveries.
const STREAM_PACKET_IDS: u64 = 32_767;
pub(super) const FIRST_EXTRA_PACKET_ID: u16 = 32_768;

pub(super) type ReplayFuture =
    Pin<Box<dyn Future<Output = Result<(Vec<MessageRef>, u64), ReplayError>> + Send>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // named after the packets
pub(super) enum AckKind {
    PubAck,
    PubRec,
    PubComp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // what the message waits for
pub(super) enum OutState {
    AwaitAck,
    AwaitRec,
    AwaitComp,
}

pub(super) struct Outgoing {
    pub seq: u64,
    pub state: OutState,
    pub shared_ack: Option<std::sync::Arc<crate::routing::shared::SharedAck>>,
}

/// Messages waiting for the in-flight window, bounded in count and in payload bytes.
pub(super) struct SessionQueue {
    items: VecDeque<Delivery>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl SessionQueue {
    pub fn new(max_messages: usize, max_bytes: usize) -> SessionQueue {
        SessionQueue {
            items: VecDeque::new(),
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    pub fn is_full(&self) -> bool {
        self.items.len() >= self.max_messages || self.bytes >= self.max_bytes
    }

    /// How many more messages fit (by count; bytes are checked as they arrive).
    pub fn room(&self) -> usize {
        if self.bytes >= self.max_bytes {
            return 0;
        }
        self.max_messages.saturating_sub(self.items.len())
    }

    /// False (and the delivery dropped) when full.
    pub fn push(&mut self, delivery: Delivery) -> bool {
        if self.is_full() {
            return false;
        }
        self.bytes += delivery.msg.payload.len();
        self.items.push_back(delivery);
        true
    }

    pub fn front(&self) -> Option<&Delivery> {
        self.items.front()
    }

    pub fn pop_front(&mut self) -> Option<Delivery> {
        let delivery = self.items.pop_front()?;
        self.bytes -= delivery.msg.payload.len();
        Some(delivery)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Delivery> {
        self.items.iter()
    }
}

pub(super) fn stream_packet_id(seq: u64) -> u16 {
    (seq % STREAM_PACKET_IDS + 1) as u16
}

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    /// A delivery from the router (live, so in order and after `position`).
    pub(super) fn accept_delivery(&mut self, delivery: Delivery) {
        if delivery.shared_ack.is_some() {
            // Shared-subscription messages come from their group, outside the sequence.
            self.enqueue(delivery);
            return;
        }
        let seq = delivery.msg.seq;
        if seq <= self.position || self.released.contains(&seq) {
            return;
        }
        self.position = seq;
        self.enqueue(delivery);
    }

    fn enqueue(&mut self, delivery: Delivery) {
        if delivery.qos != QoS::AtMostOnce {
            self.delivered_since_persist = true;
        }
        if !self.queue.push(delivery) {
            self.node.metrics.dropped_queue_full.inc();
            tracing::debug!(client_id = %self.client_id, "session queue full; dropping message");
        }
    }

    /// Moves the position past messages the router had nothing for us in, and notices when
    /// the router had to skip us.
    pub(super) fn advance_position(&mut self) {
        if self.replay_upto.is_some() {
            return;
        }
        let lagged = self.lagged.load(Ordering::Acquire);
        if lagged != NOT_LAGGED {
            if self.deliveries.is_empty() {
                // Everything before the skipped message has been taken in; catch up from there.
                self.position = self.position.max(lagged.saturating_sub(1));
                let upto = self.node.router.clear_lag(self.session_key, &self.lagged);
                self.replay_upto = Some(upto);
            }
            return;
        }
        let router_position = self.node.router.position();
        if self.deliveries.is_empty() {
            self.position = self.position.max(router_position);
        }
    }

    pub(super) fn maybe_start_replay(&mut self) {
        let Some(upto) = self.replay_upto else { return };
        if self.replay.is_some() {
            return;
        }
        if upto <= self.position {
            self.replay_upto = None;
            return;
        }
        let room = self.queue.room();
        if room == 0 {
            return;
        }
        let filters: Vec<String> = self.subscriptions.iter().map(|(f, _)| f.clone()).collect();
        if filters.is_empty() {
            self.position = upto;
            self.replay_upto = None;
            return;
        }
        self.node.metrics.session_replays.inc();
        let node = self.node.clone();
        let after = self.position;
        self.replay = Some(Box::pin(async move {
            replay_range(
                &node.router,
                &node.cluster.messages,
                &filters,
                after,
                upto,
                room,
            )
            .await
        }));
    }

    pub(super) fn replay_finished(&mut self, result: Result<(Vec<MessageRef>, u64), ReplayError>) {
        match result {
            Ok((messages, reached)) => {
                for msg in messages {
                    if msg.seq <= self.position || self.released.contains(&msg.seq) {
                        continue;
                    }
                    let entries: Vec<_> = self
                        .subscriptions
                        .iter()
                        .filter(|(filter, _)| crate::topic::matches(filter, &msg.topic))
                        .map(|(_, entry)| *entry)
                        .collect();
                    let is_self = *msg.envelope.client_id == *self.client_id;
                    if let Some(delivery) = merge_matches(&msg, &entries, is_self) {
                        if delivery.qos != QoS::AtMostOnce {
                            self.enqueue(delivery);
                        }
                    }
                }
                self.position = self.position.max(reached);
                if self.replay_upto.is_some_and(|upto| upto <= self.position) {
                    self.replay_upto = None;
                }
            }
            Err(err) => {
                tracing::warn!(client_id = %self.client_id, error = %err, "session replay failed; retrying");
            }
        }
    }

    /// Sends what the in-flight window and the socket allow.
    pub(super) fn pump(&mut self) -> Result<(), Exit> {
        while self.inflight.len() < self.inflight_limit
            && self.writer.pending() < super::WRITE_SOFT_LIMIT
        {
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce {
                let id = self.packet_id_for(front.msg.seq);
                let Some(id) = id else { break };
                let Some(delivery) = self.queue.pop_front() else {
                    break;
                };
                self.send_publish(delivery, id)?;
            } else {
                let Some(delivery) = self.queue.pop_front() else {
                    break;
                };
                self.send_publish(delivery, 0)?;
            }
        }
        // QoS 0 messages do not wait for the window.
        while self.writer.pending() < super::WRITE_SOFT_LIMIT {
            match self.queue.front() {
                Some(front) if front.qos == QoS::AtMostOnce => {
                    let Some(delivery) = self.queue.pop_front() else {
                        break;
                    };
                    self.send_publish(delivery, 0)?;
                }
                _ => break,
            }
        }
        Ok(())
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

    fn send_publish(&mut self, delivery: Delivery, packet_id: u16) -> Result<(), Exit> {
        let msg = &delivery.msg;
        if !self.node.config.acl.allows_everything()
            && !self
                .node
                .config
                .acl
                .allowed(self.principal(), Action::Subscribe, &msg.topic)
        {
            return Ok(());
        }
        let props = &msg.envelope.properties;
        let mut expiry = props.message_expiry_interval;
        if let Some(interval) = expiry {
            let age_secs = now_ms().saturating_sub(msg.envelope.timestamp_ms) / 1000;
            if age_secs >= u64::from(interval) {
                return Ok(());
            }
            expiry = Some(interval - age_secs as u32);
        }
        let mut properties = PublishProperties::default();
        let mut topic = msg.topic.clone();
        if self.v5 {
            properties = PublishProperties {
                payload_format_indicator: props.payload_format_indicator,
                message_expiry_interval: expiry,
                topic_alias: None,
                response_topic: props.response_topic.clone(),
                correlation_data: props.correlation_data.clone(),
                user_properties: props.user_properties.clone(),
                subscription_identifiers: delivery.subscription_ids.clone(),
                content_type: props.content_type.clone(),
            };
            if self.alias_out_max > 0 {
                if let Some(alias) = self.aliases_out.get(&topic) {
                    properties.topic_alias = Some(*alias);
                    topic = String::new();
                } else if self.aliases_out.len() < usize::from(self.alias_out_max) {
                    let alias = self.aliases_out.len() as u16 + 1;
                    self.aliases_out.insert(topic.clone(), alias);
                    properties.topic_alias = Some(alias);
                }
            }
        }
        let publish = Publish {
            dup: delivery.qos != QoS::AtMostOnce && self.maybe_sent_before.contains(&msg.seq),
            qos: delivery.qos,
            retain: delivery.retain,
            topic,
            packet_id,
            properties,
            payload: msg.payload.clone(),
        };
        match self.writer.queue(&Packet::Publish(publish)) {
            Ok(true) => {
                self.node.metrics.messages_sent.inc();
            }
            Ok(false) => {
                tracing::debug!(client_id = %self.client_id, "message exceeds the client's maximum packet size; dropped");
                return Ok(());
            }
            Err(err) => {
                tracing::warn!(client_id = %self.client_id, error = %err, "cannot encode PUBLISH; dropped");
                return Ok(());
            }
        }
        let state = match delivery.qos {
            QoS::AtMostOnce => {
                if let Some(ack) = &delivery.shared_ack {
                    ack.ack();
                }
                return Ok(());
            }
            QoS::AtLeastOnce => super::outbound::OutState::AwaitAck,
            QoS::ExactlyOnce => super::outbound::OutState::AwaitRec,
        };
        self.inflight.insert(
            packet_id,
            Outgoing {
                seq: delivery.msg.seq,
                state,
                shared_ack: delivery.shared_ack,
            },
        );
        Ok(())
    }

    /// After a resume: QoS 2 messages whose PUBREC arrived before the break get PUBREL.
    pub(super) fn resend_released(&mut self) {
        let released: Vec<u64> = self.released.iter().copied().collect();
        for seq in released {
            let id = stream_packet_id(seq);
            self.inflight.insert(
                id,
                Outgoing {
                    seq,
                    state: OutState::AwaitComp,
                    shared_ack: None,
                },
            );
            let _ = self
                .writer
                .queue(&Packet::PubRel(PubResp::new(id, ReasonCode::SUCCESS)));
        }
    }

    /// PUBACK / PUBREC / PUBCOMP for a message we sent.
    pub(super) fn outgoing_acked(&mut self, packet_id: u16, kind: AckKind, reason: ReasonCode) {
        let Some(outgoing) = self.inflight.get_mut(&packet_id) else {
            tracing::debug!(client_id = %self.client_id, packet_id, ?kind, "acknowledgement for unknown packet id");
            return;
        };
        match (kind, outgoing.state) {
            (AckKind::PubAck, OutState::AwaitAck) | (AckKind::PubComp, OutState::AwaitComp) => {
                let seq = outgoing.seq;
                if let Some(ack) = &outgoing.shared_ack {
                    ack.ack();
                }
                self.inflight.remove(&packet_id);
                self.delivered_since_persist = true;
                if self.released.remove(&seq) {
                    self.record_dirty = true;
                }
            }
            (AckKind::PubRec, OutState::AwaitRec) if reason.is_error() => {
                self.inflight.remove(&packet_id);
            }
            (AckKind::PubRec, OutState::AwaitRec) => {
                outgoing.state = OutState::AwaitComp;
                let seq = outgoing.seq;
                let pubrel = Packet::PubRel(PubResp::new(packet_id, ReasonCode::SUCCESS));
                if seq == 0 {
                    let _ = self.writer.queue(&pubrel);
                } else {
                    // Durable before PUBREL: a resumed session must answer with PUBREL, not
                    // deliver the message again.
                    self.released.insert(seq);
                    self.after_persist(super::persist::AfterPersist::Send(pubrel));
                }
            }
            (kind, state) => {
                tracing::debug!(client_id = %self.client_id, packet_id, ?kind, ?state, "unexpected acknowledgement; ignored");
            }
        }
    }

    /// Highest sequence such that every QoS 1/2 message up to it is finished or released.
    pub(super) fn durable_cursor(&self) -> u64 {
        let queued = self
            .queue
            .iter()
            .filter(|d| d.qos != QoS::AtMostOnce && d.msg.seq > 0)
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

    pub(super) fn principal(&self) -> crate::auth::Principal<'_> {
        crate::auth::Principal {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_packet_ids_stay_in_their_range() {
        for seq in [1u64, 2, 32_766, 32_767, 32_768, u64::MAX] {
            let id = stream_packet_id(seq);
            assert!((1..FIRST_EXTRA_PACKET_ID).contains(&id), "{seq} -> {id}");
        }
        assert_eq!(stream_packet_id(5), stream_packet_id(5 + STREAM_PACKET_IDS));
    }
}
