//! PUBLISH from the client: alias resolution, checks, into JetStream, then PUBACK/PUBREC.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use jetmq_codec::{Packet, PubResp, Publish, QoS, ReasonCode};
use jetmq_common::envelope::{Envelope, MessageProperties};

use super::persist::AfterPersist;
use super::{Client, Exit};
use crate::auth::Action;
use crate::ingress::PublishError;
use crate::session::{now_ms, InboundQos2};
use crate::topic;

pub(super) struct InboundDone {
    packet_id: u16,
    qos: QoS,
    result: Result<(), PublishError>,
}

pub(super) type PendingAck = Pin<Box<dyn Future<Output = InboundDone> + Send>>;

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    pub(super) async fn handle_publish(&mut self, mut publish: Publish) -> Result<(), Exit> {
        self.context
            .metrics
            .messages_received
            .inc(publish.qos as u8);
        let limits = &self.context.config.limits;
        if !publish.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6]: only the server puts them in (EMQX and HiveMQ close here too).
            return Err(self.protocol_error(
                ReasonCode::PROTOCOL_ERROR,
                "subscription identifier in a client's PUBLISH",
            ));
        }
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > limits.topic_alias_maximum {
                return Err(self
                    .protocol_error(ReasonCode::TOPIC_ALIAS_INVALID, "topic alias out of range"));
            }
            if publish.topic.is_empty() {
                match self.aliases_in.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        return Err(
                            self.protocol_error(ReasonCode::PROTOCOL_ERROR, "unknown topic alias")
                        );
                    }
                }
            } else {
                self.aliases_in.insert(alias, publish.topic.clone());
            }
        }
        if topic::validate_topic_name(
            &publish.topic,
            limits.max_topic_levels,
            limits.max_topic_length,
        )
        .is_err()
        {
            return Err(self.protocol_error(ReasonCode::TOPIC_NAME_INVALID, "invalid topic name"));
        }
        if publish.qos != QoS::AtMostOnce
            && self.inbound_unacked >= usize::from(limits.receive_maximum)
        {
            return Err(self.protocol_error(
                ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                "client exceeded the receive maximum",
            ));
        }
        let packet_id = publish.packet_id;
        if publish.qos == QoS::ExactlyOnce {
            if let Some(known) = self
                .record
                .inbound_qos2
                .iter()
                .find(|e| e.packet_id == packet_id)
            {
                // A retransmission.
                if self.qos2_publishing.contains(&packet_id) {
                    return Ok(());
                }
                if self.qos2_stored.contains(&packet_id) {
                    let _ = self.writer.queue(&Packet::PubRec(PubResp::new(
                        packet_id,
                        ReasonCode::SUCCESS,
                    )));
                    return Ok(());
                }
                // Announced by an earlier connection, which may have died before storing it:
                // store again under the same id; JetStream keeps one copy.
                let msg_id = known.msg_id.clone();
                return self.republish_qos2(publish, msg_id).await;
            }
        }
        // The node itself answers for $SYS/broker/ (crate::sys_topics): no spoofing it.
        if crate::sys_topics::is_reserved(&publish.topic)
            || !self
                .context
                .config
                .acl
                .allowed(self.principal(), Action::Publish, &publish.topic)
        {
            tracing::info!(client_id = %self.client_id, topic = %publish.topic, "publish denied by ACL");
            return self.refuse_publish(packet_id, publish.qos);
        }
        let envelope = self.envelope_for(&mut publish);
        match publish.qos {
            QoS::AtMostOnce => {
                if let Err(err) = self
                    .context
                    .ingress
                    .publish(&publish.topic, &envelope, publish.payload, None)
                    .await
                {
                    tracing::warn!(client_id = %self.client_id, error = %err, "QoS 0 publish failed");
                }
                Ok(())
            }
            QoS::AtLeastOnce => {
                self.inbound_unacked += 1;
                self.store_inbound(publish.topic, envelope, publish.payload, packet_id, None)
                    .await
            }
            QoS::ExactlyOnce => {
                self.inbound_unacked += 1;
                // The de-duplication id is written ahead of the publish, so a retransmission
                // after a crash is stored under the same id and dropped by JetStream.
                let msg_id = format!(
                    "{}:{}:{:x}",
                    self.client_id,
                    packet_id,
                    now_ms() ^ self.connection.rotate_left(32)
                );
                self.record.inbound_qos2.push(InboundQos2 {
                    packet_id,
                    msg_id: msg_id.clone(),
                });
                self.qos2_publishing.insert(packet_id);
                self.after_persist(AfterPersist::PublishQos2 {
                    topic: publish.topic,
                    envelope: Box::new(envelope),
                    payload: publish.payload,
                    packet_id,
                    msg_id,
                });
                Ok(())
            }
        }
    }

    async fn republish_qos2(&mut self, mut publish: Publish, msg_id: String) -> Result<(), Exit> {
        self.inbound_unacked += 1;
        self.qos2_publishing.insert(publish.packet_id);
        let envelope = self.envelope_for(&mut publish);
        self.store_inbound(
            publish.topic,
            envelope,
            publish.payload,
            publish.packet_id,
            Some(&msg_id),
        )
        .await
    }

    fn envelope_for(&self, publish: &mut Publish) -> Envelope {
        Envelope {
            qos: publish.qos as u8,
            retain: publish.retain,
            client_id: self.client_id.to_string(),
            timestamp_ms: now_ms(),
            properties: MessageProperties {
                payload_format_indicator: publish.properties.payload_format_indicator,
                message_expiry_interval: publish.properties.message_expiry_interval,
                content_type: publish.properties.content_type.take(),
                response_topic: publish.properties.response_topic.take(),
                correlation_data: publish.properties.correlation_data.take(),
                user_properties: std::mem::take(&mut publish.properties.user_properties),
            },
        }
    }

    fn refuse_publish(&mut self, packet_id: u16, qos: QoS) -> Result<(), Exit> {
        // MQTT 5 says why; 3.1.1 has no way to, so the message is acknowledged and dropped.
        let reason = if self.v5 {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::SUCCESS
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let _ = self
                    .writer
                    .queue(&Packet::PubAck(PubResp::new(packet_id, reason)));
            }
            QoS::ExactlyOnce => {
                if !self.v5 {
                    self.record.inbound_qos2.push(InboundQos2 {
                        packet_id,
                        msg_id: String::new(),
                    });
                    self.qos2_stored.insert(packet_id);
                    self.inbound_unacked += 1;
                }
                let _ = self
                    .writer
                    .queue(&Packet::PubRec(PubResp::new(packet_id, reason)));
            }
        }
        Ok(())
    }

    pub(super) async fn store_inbound(
        &mut self,
        topic: String,
        envelope: Envelope,
        payload: Bytes,
        packet_id: u16,
        msg_id: Option<&str>,
    ) -> Result<(), Exit> {
        let qos = QoS::from_u8(envelope.qos).unwrap_or(QoS::AtLeastOnce);
        let started = std::time::Instant::now();
        match self
            .context
            .ingress
            .publish_in_order(
                &topic,
                &envelope,
                payload,
                msg_id,
                Some(&self.publish_order),
            )
            .await
        {
            Ok(ack) => {
                let metrics = self.context.metrics.clone();
                self.acks.push_back(Box::pin(async move {
                    let result = ack.await;
                    if result.is_ok() {
                        metrics.publish_ack_latency.observe(started.elapsed());
                    }
                    InboundDone {
                        packet_id,
                        qos,
                        result,
                    }
                }));
                Ok(())
            }
            Err(err) => Err(self.store_failed(&err)),
        }
    }

    fn store_failed(&mut self, err: &PublishError) -> Exit {
        // Not acknowledging and closing makes the client send the message again, to
        // whichever node it reaches next: nothing acknowledged is lost.
        tracing::warn!(client_id = %self.client_id, error = %err, "message not stored; disconnecting so the client retries");
        self.send_disconnect(ReasonCode::SERVER_BUSY);
        Exit::Abnormal
    }

    pub(super) fn publish_acknowledged(&mut self, done: InboundDone) -> Result<(), Exit> {
        if let Err(err) = &done.result {
            if err.is_store_full() {
                return self.store_full(done.packet_id, done.qos, err);
            }
            return Err(self.store_failed(err));
        }
        let ack = PubResp::new(done.packet_id, ReasonCode::SUCCESS);
        match done.qos {
            QoS::AtLeastOnce => {
                self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
                let _ = self.writer.queue(&Packet::PubAck(ack));
            }
            _ => {
                self.qos2_publishing.remove(&done.packet_id);
                self.qos2_stored.insert(done.packet_id);
                let _ = self.writer.queue(&Packet::PubRec(ack));
            }
        }
        Ok(())
    }

    /// JetStream had no room for the message: it is not stored. MQTT 5 publishers get
    /// PUBACK / PUBREC 0x97 (quota exceeded) and stay connected; a 3.1.1 publisher, which
    /// cannot be told, is disconnected without an acknowledgement and sends the message again
    /// when it reconnects (acknowledging it would lose it). See docs/security.md, "Quotas".
    fn store_full(&mut self, packet_id: u16, qos: QoS, err: &PublishError) -> Result<(), Exit> {
        self.context.metrics.publish_store_full.inc();
        if self.context.metrics.message_store_full.swap(1) == 0 {
            tracing::warn!(error = %err, "message store full: publishes are refused (MQTT 5: quota exceeded 0x97; 3.1.1: disconnected) until space frees");
        }
        if !self.v5 {
            tracing::info!(client_id = %self.client_id, error = %err, "message store full; disconnecting the MQTT 3.1.1 publisher without an acknowledgement");
            self.send_disconnect(ReasonCode::SERVER_BUSY);
            return Err(Exit::Abnormal);
        }
        tracing::debug!(client_id = %self.client_id, packet_id, "message store full; quota exceeded");
        self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
        let refusal = PubResp::new(packet_id, ReasonCode::QUOTA_EXCEEDED);
        match qos {
            QoS::AtLeastOnce => {
                let _ = self.writer.queue(&Packet::PubAck(refusal));
            }
            _ => {
                // A PUBREC with a failure code ends the exchange: the packet id is free again,
                // and its de-duplication id must go before the client reuses the id (or a
                // new message would be dropped as a duplicate of this unstored one).
                self.qos2_publishing.remove(&packet_id);
                self.record
                    .inbound_qos2
                    .retain(|e| e.packet_id != packet_id);
                self.after_persist(AfterPersist::Send(Packet::PubRec(refusal)));
            }
        }
        Ok(())
    }

    pub(super) fn handle_pubrel(&mut self, packet_id: u16) {
        let known = self
            .record
            .inbound_qos2
            .iter()
            .position(|e| e.packet_id == packet_id);
        match known {
            Some(index) if !self.qos2_publishing.contains(&packet_id) => {
                self.record.inbound_qos2.remove(index);
                self.qos2_stored.remove(&packet_id);
                self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
                let pubcomp = Packet::PubComp(PubResp::new(packet_id, ReasonCode::SUCCESS));
                self.after_persist(AfterPersist::Send(pubcomp));
            }
            Some(_) => {
                tracing::debug!(client_id = %self.client_id, packet_id, "PUBREL before PUBREC; ignored");
            }
            None => {
                let reason = if self.v5 {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                } else {
                    ReasonCode::SUCCESS
                };
                let _ = self
                    .writer
                    .queue(&Packet::PubComp(PubResp::new(packet_id, reason)));
            }
        }
    }
}
