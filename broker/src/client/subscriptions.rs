//! SUBSCRIBE and UNSUBSCRIBE.

use std::time::Duration;

use jetmq_codec::{Packet, QoS, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe};

use super::fresh_retained;
use super::persist::AfterPersist;
use super::{Client, Exit};
use crate::auth::Action;
use crate::routing::{Delivery, SubEntry};
use crate::session::StoredSubscription;
use crate::topic;

fn entry(s: &StoredSubscription) -> SubEntry {
    SubEntry {
        qos: s.qos(),
        no_local: s.no_local,
        retain_as_published: s.retain_as_published,
        subscription_id: s.subscription_id,
        after_seq: 0,
    }
}

/// Router entries for stored subscriptions (shared ones go to their groups instead).
pub(super) fn entries(subs: &[StoredSubscription]) -> Vec<(String, SubEntry)> {
    subs.iter()
        .filter(|s| !s.filter.starts_with("$share/"))
        .map(|s| (s.filter.clone(), entry(s)))
        .collect()
}

/// Stored shared subscriptions as (group, filter, entry).
pub(super) fn shared_entries(subs: &[StoredSubscription]) -> Vec<(String, String, SubEntry)> {
    subs.iter()
        .filter_map(|s| {
            let (group, filter) = s.shared()?;
            Some((group.to_owned(), filter.to_owned(), entry(s)))
        })
        .collect()
}

fn granted(qos: QoS) -> ReasonCode {
    match qos {
        QoS::AtMostOnce => ReasonCode::GRANTED_QOS_0,
        QoS::AtLeastOnce => ReasonCode::GRANTED_QOS_1,
        QoS::ExactlyOnce => ReasonCode::GRANTED_QOS_2,
    }
}

/// How long a SUBSCRIBE waits for JetStream to say where the message stream ends.
const STORED_UPTO_WAIT: Duration = Duration::from_secs(2);

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    pub(super) async fn handle_subscribe(&mut self, subscribe: Subscribe) -> Result<(), Exit> {
        // A new subscription takes messages stored after this point. The router may not have
        // read all of those yet (a message this node acknowledged a moment ago, even to this
        // client), and its own position would hand them to the new subscription, although
        // they were published before it. Without an answer, the router's position it is.
        let stored_upto = crate::cluster::stored_upto(&self.context.messages, STORED_UPTO_WAIT)
            .await
            .unwrap_or(0);
        let limits = &self.context.config.limits;
        let (max_levels, max_len, max_subs) = (
            limits.max_topic_levels,
            limits.max_topic_length,
            limits.max_subscriptions,
        );
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut added = Vec::new();
        let mut retained = Vec::new();
        for request in &subscribe.filters {
            let parsed = match topic::parse_filter(&request.filter, max_levels, max_len) {
                Ok(parsed) => parsed,
                Err(_) if self.v5 && request.filter.is_empty() => {
                    // Not a filter at all ([MQTT-4.7.3-1]): closed as a malformed SUBSCRIBE,
                    // the way mosquitto and EMQX treat it; 3.1.1 gets its failure code 0x80.
                    return Err(
                        self.protocol_error(ReasonCode::TOPIC_FILTER_INVALID, "empty topic filter")
                    );
                }
                Err(err) => {
                    tracing::info!(client_id = %self.client_id, filter = %request.filter, ?err, "invalid topic filter");
                    reasons.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if parsed.share_group.is_some() && request.options.no_local {
                return Err(self.protocol_error(
                    ReasonCode::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                ));
            }
            if !self
                .context
                .config
                .acl
                .allowed(self.principal(), Action::Subscribe, parsed.filter)
            {
                tracing::info!(client_id = %self.client_id, filter = %request.filter, "subscription denied by ACL");
                reasons.push(ReasonCode::NOT_AUTHORIZED);
                continue;
            }
            let existing = self
                .record
                .subscriptions
                .iter()
                .position(|s| s.filter == request.filter);
            if existing.is_none() && self.record.subscriptions.len() >= max_subs {
                reasons.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let options = request.options;
            let stored = StoredSubscription {
                filter: request.filter.clone(),
                qos: options.qos as u8,
                no_local: options.no_local,
                retain_as_published: options.retain_as_published,
                subscription_id: subscribe.subscription_identifier,
            };
            let mut entry = entry(&stored);
            match existing {
                Some(index) => self.record.subscriptions[index] = stored,
                None => self.record.subscriptions.push(stored),
            }
            if let Some(group) = parsed.share_group {
                // Shared subscriptions get no retained messages (MQTT 5, 4.8.2).
                self.context.shared.join(
                    group,
                    parsed.filter,
                    self.shared_member(entry),
                    self.context.router.position().max(stored_upto),
                );
                reasons.push(granted(options.qos));
                continue;
            }
            if existing.is_none() {
                // A replaced subscription carries on without a gap.
                entry.after_seq = stored_upto;
            }
            self.subscriptions.retain(|(f, _)| *f != request.filter);
            self.subscriptions.push((request.filter.clone(), entry));
            added.push((request.filter.clone(), entry));
            let send_retained = match options.retain_handling {
                0 => true,
                1 => existing.is_none(),
                _ => false,
            };
            if send_retained {
                let stored = self.context.retained.matching(parsed.filter);
                // Most retained messages are old: the cheap test first.
                for msg in stored
                    .iter()
                    .filter(|m| fresh_retained::live_copy_may_follow(m))
                {
                    // Only where this subscription alone would deliver the live copy: an
                    // older one that matches delivers it as a publication of its own.
                    let overlapped = self
                        .subscriptions
                        .iter()
                        .any(|(f, _)| *f != request.filter && topic::matches(f, &msg.topic));
                    if !overlapped {
                        self.fresh_retained
                            .get_or_insert_with(Default::default)
                            .remember(msg);
                    }
                }
                let sys = crate::sys_topics::matching(&self.context, parsed.filter);
                for msg in stored.into_iter().chain(sys) {
                    if entry.no_local && *msg.envelope.client_id == *self.client_id {
                        continue;
                    }
                    retained.push(Delivery {
                        qos: entry.qos.min(msg.qos()),
                        retain: true,
                        subscription_ids: entry.subscription_id.into_iter().collect(),
                        shared_ack: None,
                        msg,
                    });
                }
            }
            reasons.push(granted(options.qos));
        }
        if !added.is_empty() {
            self.context.router.subscribe(self.session_key, &added);
        }
        let reasons = if self.v5 {
            reasons
        } else {
            reasons
                .into_iter()
                .map(|r| {
                    if r.is_error() {
                        ReasonCode::UNSPECIFIED_ERROR
                    } else {
                        r
                    }
                })
                .collect()
        };
        let suback = Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            properties: Default::default(),
            reasons,
        });
        self.after_persist(AfterPersist::Send(suback));
        if !retained.is_empty() {
            self.after_persist(AfterPersist::Deliver(retained));
        }
        Ok(())
    }

    pub(super) fn shared_member(&self, entry: SubEntry) -> crate::routing::shared::Member {
        crate::routing::shared::Member {
            session: self.session_key,
            tx: self.delivery_tx.clone(),
            entry,
        }
    }

    /// Joins the groups of the session's stored shared subscriptions (on connect).
    pub(super) fn join_shared(&self) {
        for (group, filter, entry) in shared_entries(&self.record.subscriptions) {
            self.context.shared.join(
                &group,
                &filter,
                self.shared_member(entry),
                self.context.router.position(),
            );
        }
    }

    pub(super) fn leave_shared(&self) {
        for (group, filter, _) in shared_entries(&self.record.subscriptions) {
            self.context.shared.leave(&group, &filter, self.session_key);
        }
    }

    pub(super) fn handle_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            let before = self.record.subscriptions.len();
            self.record.subscriptions.retain(|s| s.filter != *filter);
            match topic::parse_filter(filter, usize::MAX, usize::MAX) {
                Ok(parsed) if parsed.share_group.is_some() => {
                    let group = parsed.share_group.unwrap_or_default();
                    self.context
                        .shared
                        .leave(group, parsed.filter, self.session_key);
                }
                _ => {
                    self.subscriptions.retain(|(f, _)| f != filter);
                    self.context.router.unsubscribe(self.session_key, filter);
                }
            }
            reasons.push(if self.record.subscriptions.len() < before {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        let unsuback = Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            properties: Default::default(),
            reasons: if self.v5 { reasons } else { Vec::new() },
        });
        self.after_persist(AfterPersist::Send(unsuback));
    }
}
