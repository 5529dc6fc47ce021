//! Messages towards the client: taking deliveries in, catch-up replays, writing PUBLISH
//! packets, acknowledgements. The bookkeeping itself is [`DeliveryState`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use jetmq_codec::{Packet, PubResp, Publish, PublishProperties, QoS, ReasonCode};

use super::persist::AfterPersist;
use super::Client;
use crate::auth::Action;
use crate::routing::{merge_matches, replay_range, Delivery, MessageRef, ReplayError, NOT_LAGGED};
use crate::session::delivery::{Accept, AckKind, AckOutcome};
use crate::session::now_ms;

pub(super) type ReplayFuture =
    Pin<Box<dyn Future<Output = Result<(Vec<MessageRef>, u64), ReplayError>> + Send>>;

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    /// A delivery from the router (live, so in order and after the position).
    pub(super) fn accept_delivery(&mut self, delivery: Delivery) {
        if let Some(fresh) = &mut self.fresh_retained {
            // A shared subscription's delivery is its group's, and waits for its own ack.
            if delivery.shared_ack.is_none() && fresh.is_duplicate(&delivery.msg) {
                self.delivery.skip_live(delivery.msg.seq);
                return;
            }
            if fresh.is_empty() {
                self.fresh_retained = None;
            }
        }
        if self.delivery.accept_live(delivery) == Accept::Dropped {
            self.queue_overflow();
        }
    }

    fn queue_overflow(&self) {
        self.context.metrics.dropped_queue_full.inc();
        tracing::debug!(client_id = %self.client_id, "session queue full; dropping message");
    }

    /// Notices when the router had to skip us (our queue was full) and, once everything it
    /// did hand over is taken in, arranges the catch-up. Cheap; runs every loop turn so a
    /// lagging subscriber resumes as soon as it has room, not on a timer.
    pub(super) fn check_lag(&mut self) {
        if self.delivery.replay_upto.is_some() {
            return;
        }
        let lagged = self.lagged.load(Ordering::Acquire);
        if lagged != NOT_LAGGED && self.deliveries.is_empty() && !self.delivery.is_full() {
            self.delivery.position = self.delivery.position.max(lagged.saturating_sub(1));
            let upto = self
                .context
                .router
                .clear_lag(self.session_key, &self.lagged);
            self.delivery.replay_upto = Some(upto);
        }
    }

    /// Moves the position past messages the router had nothing for us in.
    pub(super) fn advance_position(&mut self) {
        if self.delivery.replay_upto.is_some() || self.lagged.load(Ordering::Acquire) != NOT_LAGGED
        {
            return;
        }
        let router_position = self.context.router.position();
        if self.deliveries.is_empty() {
            self.delivery.position = self.delivery.position.max(router_position);
        }
    }

    pub(super) fn maybe_start_replay(&mut self) {
        let Some(upto) = self.delivery.replay_upto else {
            return;
        };
        if self.replay.is_some() {
            return;
        }
        if upto <= self.delivery.position {
            self.delivery.replay_upto = None;
            return;
        }
        let room = self.delivery.room();
        if room == 0 {
            return;
        }
        let filters: Vec<String> = self.subscriptions.iter().map(|(f, _)| f.clone()).collect();
        if filters.is_empty() {
            self.delivery.replay_reached(upto);
            return;
        }
        self.context.metrics.session_replays.inc();
        let context = self.context.clone();
        let after = self.delivery.position;
        self.replay = Some(Box::pin(async move {
            replay_range(
                &context.router,
                &context.messages,
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
                    let entries: Vec<_> = self
                        .subscriptions
                        .iter()
                        .filter(|(filter, _)| crate::topic::matches(filter, &msg.topic))
                        .map(|(_, entry)| *entry)
                        .collect();
                    let is_self = *msg.envelope.client_id == *self.client_id;
                    let Some(delivery) = merge_matches(&msg, &entries, is_self) else {
                        continue;
                    };
                    // QoS 0 messages are not kept for sessions that were away or behind.
                    if delivery.qos != QoS::AtMostOnce
                        && self.delivery.accept_replayed(delivery) == Accept::Dropped
                    {
                        self.queue_overflow();
                    }
                }
                self.delivery.replay_reached(reached);
            }
            Err(err) => {
                tracing::warn!(client_id = %self.client_id, error = %err, "session replay failed; retrying");
            }
        }
    }

    /// Sends what the in-flight window and the socket allow.
    pub(super) fn pump(&mut self) {
        while self.writer.pending() < super::WRITE_SOFT_LIMIT {
            let Some((delivery, packet_id, dup)) = self.delivery.next_to_send() else {
                break;
            };
            self.send_publish(delivery, packet_id, dup);
        }
    }

    fn send_publish(&mut self, delivery: Delivery, packet_id: u16, dup: bool) {
        let msg = &delivery.msg;
        if !self.context.config.acl.allows_everything()
            && !self
                .context
                .config
                .acl
                .allowed(self.principal(), Action::Subscribe, &msg.topic)
        {
            self.delivery.discarded(&delivery);
            return;
        }
        let props = &msg.envelope.properties;
        let mut expiry = props.message_expiry_interval;
        if let Some(interval) = expiry {
            let age_secs = now_ms().saturating_sub(msg.envelope.timestamp_ms) / 1000;
            if age_secs >= u64::from(interval) {
                self.delivery.discarded(&delivery);
                return;
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
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic,
            packet_id,
            properties,
            payload: msg.payload.clone(),
        };
        match self.writer.queue(&Packet::Publish(publish)) {
            Ok(true) => {
                self.context.metrics.messages_sent.inc(delivery.qos as u8);
                self.delivery.sent(delivery, packet_id);
            }
            Ok(false) => {
                tracing::debug!(client_id = %self.client_id, "message exceeds the client's maximum packet size; dropped");
                self.delivery.discarded(&delivery);
            }
            Err(err) => {
                tracing::warn!(client_id = %self.client_id, error = %err, "cannot encode PUBLISH; dropped");
                self.delivery.discarded(&delivery);
            }
        }
    }

    /// After a resume: QoS 2 messages whose PUBREC arrived before the break get PUBREL.
    pub(super) fn resend_released(&mut self) {
        for id in self.delivery.resume_released() {
            let _ = self
                .writer
                .queue(&Packet::PubRel(PubResp::new(id, ReasonCode::SUCCESS)));
        }
    }

    /// PUBACK / PUBREC / PUBCOMP for a message we sent.
    pub(super) fn outgoing_acked(&mut self, packet_id: u16, kind: AckKind, reason: ReasonCode) {
        match self.delivery.acked(packet_id, kind, reason) {
            AckOutcome::Finished => {}
            AckOutcome::SendPubRel { persist_first } => {
                let pubrel = Packet::PubRel(PubResp::new(packet_id, ReasonCode::SUCCESS));
                if persist_first {
                    // Durable before PUBREL: a resumed session must answer with PUBREL, not
                    // deliver the message again.
                    self.after_persist(AfterPersist::Send(pubrel));
                } else {
                    let _ = self.writer.queue(&pubrel);
                }
            }
            AckOutcome::UnknownPacketId => {
                tracing::debug!(client_id = %self.client_id, packet_id, ?kind, "acknowledgement for unknown packet id");
            }
            AckOutcome::Unexpected(state) => {
                tracing::debug!(client_id = %self.client_id, packet_id, ?kind, ?state, "unexpected acknowledgement; ignored");
            }
        }
    }

    pub(super) fn principal(&self) -> crate::auth::Principal<'_> {
        crate::auth::Principal {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }
}
