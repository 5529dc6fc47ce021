//! Shared subscriptions (`$share/<group>/<filter>`): each message to one member of the
//! group, cluster-wide.
//!
//! A group is a durable JetStream pull consumer on the message stream. Every node with a
//! local member pulls from it; JetStream hands each message to one puller, and that node
//! gives it to one of its members (round robin). The message is acknowledged to JetStream
//! only when the member acknowledged it (PUBACK / PUBCOMP; at once for QoS 0); a member that
//! disappears first makes JetStream redeliver it to another.
//!
//! A group lives as long as some session holds its subscription, connected or not (a
//! persistent member that is away finds the group's messages waiting, as in mosquitto and
//! HiveMQ). Once none does, the janitor deletes the consumer ([`UnusedGroups`]), so messages
//! published to a group without members are not kept for whoever joins it next.

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use parking_lot::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

use super::{decode_stream_messages, position, SessionKey, SubEntry};

/// The JetStream message behind a shared delivery; negatively acknowledged if dropped
/// unacknowledged, so another member gets it without waiting for the ack timeout.
///
/// A bundle (several QoS 1 messages in one stream message) is one JetStream message: it is
/// acknowledged once its members acknowledged every part, and handed out again whole if one
/// part was not (the parts already acknowledged then arrive twice, which QoS 1 allows;
/// QoS 2 messages are never bundled).
pub struct SharedAck {
    message: jetstream::Message,
    /// Parts not acknowledged yet.
    remaining: AtomicUsize,
    done: AtomicBool,
}

impl SharedAck {
    /// One part acknowledged by its member.
    pub fn ack(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && !self.done.swap(true, Ordering::AcqRel)
        {
            let message = self.message.clone();
            tokio::spawn(async move {
                if let Err(err) = message.ack().await {
                    tracing::debug!(error = %err, "shared subscription ack failed; JetStream will redeliver");
                }
            });
        }
    }
}

impl Drop for SharedAck {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Acquire) {
            let message = self.message.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                });
            }
        }
    }
}

impl std::fmt::Debug for SharedAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAck")
            .field("done", &self.done)
            .finish()
    }
}

#[derive(Clone)]
pub struct Member {
    pub session: SessionKey,
    pub tx: super::mailbox::MailboxSender,
    pub entry: SubEntry,
}

struct Group {
    /// Where a newly created group consumer starts: right after the stream position at the
    /// first SUBSCRIBE, so messages published after its SUBACK are never missed while the
    /// consumer is still being created; later, right after the last message pulled, so a
    /// consumer deleted under a member (the janitor judging from a stale index) comes back
    /// without handing out again what it already did.
    start_sequence: u64,
    members: Vec<Member>,
    next: usize,
    stop: CancellationToken,
}

type GroupKey = (String, String);

/// This node's members of shared subscriptions, by (group, filter).
pub struct SharedGroups {
    groups: Mutex<HashMap<GroupKey, Group>>,
    stream: jetstream::stream::Stream,
    shutdown: CancellationToken,
}

/// Every group consumer's name starts with this (see [`consumer_name`]).
const CONSUMER_PREFIX: &str = "jetmq-share-";

/// The durable consumer's name: stable for (group, filter), valid for JetStream.
pub fn consumer_name(group: &str, filter: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(group.as_bytes());
    hasher.write_u8(0);
    hasher.write(filter.as_bytes());
    let safe: String = group
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    format!("{CONSUMER_PREFIX}{safe}-{:016x}", hasher.finish())
}

/// The group consumers that these sessions' shared subscriptions use.
pub fn consumers_in_use<'a>(
    records: impl Iterator<Item = &'a crate::session::SessionRecord>,
) -> HashSet<String> {
    records
        .flat_map(|r| r.subscriptions.iter())
        .filter_map(|s| s.shared())
        .map(|(group, filter)| consumer_name(group, filter))
        .collect()
}

/// How long a group consumer must stay unused before it is deleted: a SUBSCRIBE creates the
/// consumer before the session record naming it is written, and the janitor's copy of the
/// records trails the bucket.
const UNUSED_GRACE: Duration = Duration::from_secs(10);

/// The janitor's bookkeeping of group consumers no session refers to.
#[derive(Default)]
pub struct UnusedGroups {
    since: HashMap<String, Instant>,
}

impl UnusedGroups {
    /// Deletes the group consumers that no session has referred to for [`UNUSED_GRACE`].
    pub async fn forget(
        &mut self,
        stream: &jetstream::stream::Stream,
        in_use: &HashSet<String>,
    ) -> anyhow::Result<()> {
        let mut names = stream.consumer_names();
        let mut unused = HashSet::new();
        while let Some(name) = names.next().await {
            let name = name?;
            if name.starts_with(CONSUMER_PREFIX) && !in_use.contains(&name) {
                unused.insert(name);
            }
        }
        let now = Instant::now();
        self.since.retain(|name, _| unused.contains(name));
        for name in unused {
            let since = *self.since.entry(name.clone()).or_insert(now);
            if now.duration_since(since) < UNUSED_GRACE {
                continue;
            }
            match stream.delete_consumer(&name).await {
                Ok(_) => {
                    tracing::info!(consumer = %name, "shared subscription group has no members left; deleted");
                    self.since.remove(&name);
                }
                Err(err) => {
                    tracing::debug!(consumer = %name, error = %err, "cannot delete unused shared subscription group yet")
                }
            }
        }
        Ok(())
    }
}

impl SharedGroups {
    pub fn new(
        stream: jetstream::stream::Stream,
        shutdown: CancellationToken,
    ) -> Arc<SharedGroups> {
        Arc::new(SharedGroups {
            groups: Mutex::new(HashMap::new()),
            stream,
            shutdown,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.groups.lock()
    }

    /// `after`: the position after which the group's messages are wanted, if this node
    /// creates the group's consumer.
    pub fn join(self: &Arc<Self>, group: &str, filter: &str, member: Member, after: u64) {
        let key = (group.to_owned(), filter.to_owned());
        let mut groups = self.lock();
        if let Some(existing) = groups.get_mut(&key) {
            existing.members.retain(|m| m.session != member.session);
            existing.members.push(member);
            return;
        }
        let stop = self.shutdown.child_token();
        groups.insert(
            key.clone(),
            Group {
                start_sequence: position::first_stream_seq_after(after),
                members: vec![member],
                next: 0,
                stop: stop.clone(),
            },
        );
        drop(groups);
        let this = self.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Err(err) = this.pull(&key, &stop).await {
                    tracing::warn!(group = %key.0, filter = %key.1, error = %err, "shared subscription reader failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }

    pub fn leave(&self, group: &str, filter: &str, session: SessionKey) {
        let key = (group.to_owned(), filter.to_owned());
        let mut groups = self.lock();
        let Some(existing) = groups.get_mut(&key) else {
            return;
        };
        existing.members.retain(|m| m.session != session);
        if existing.members.is_empty() {
            existing.stop.cancel();
            groups.remove(&key);
        }
    }

    async fn pull(&self, key: &GroupKey, stop: &CancellationToken) -> anyhow::Result<()> {
        let (group, filter) = key;
        let start_sequence = self.lock().get(key).map_or(1, |g| g.start_sequence);
        let prefix = jetmq_common::subject::SHARE_PREFIX;
        let subjects: Vec<String> = jetmq_common::subject::filter_to_subjects(filter)
            .into_iter()
            .map(|tokens| format!("{prefix}.*.{tokens}"))
            .collect();
        let name = consumer_name(group, filter);
        let consumer = self
            .stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subjects: subjects,
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 1000,
                    // A group nobody has joined for a day is forgotten.
                    inactive_threshold: Duration::from_secs(24 * 3600),
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(64)
            .messages()
            .await?;
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let Some(message) = next else {
                anyhow::bail!("shared subscription stream ended");
            };
            let message = message?;
            // Shared deliveries carry no position: the group's consumer, not the
            // session's cursor, keeps track of them.
            let decoded =
                decode_stream_messages(None, message.subject.as_str(), message.payload.clone());
            let msgs = match decoded {
                Ok(msgs) => msgs,
                Err(err) => {
                    tracing::warn!(error = %err, "undecodable message on shared subscription; dropped");
                    let _ = message.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            if !msgs.iter().all(|m| crate::topic::matches(filter, &m.topic)) {
                // A `$` topic reached through a leading wildcard: not for MQTT subscribers.
                let _ = message.ack().await;
                continue;
            }
            let ack = Arc::new(SharedAck {
                message,
                remaining: AtomicUsize::new(msgs.len()),
                done: AtomicBool::new(false),
            });
            let seq = ack.message.info().map_or(0, |i| i.stream_sequence);
            let handed = msgs
                .iter()
                .all(|msg| self.hand_to_member(key, msg, seq, ack.clone()));
            if !handed {
                // No member here can take it now: let another node's member have it.
                ack.done.store(true, Ordering::Release);
                let _ = ack
                    .message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                    .await;
            }
        }
    }

    fn hand_to_member(
        &self,
        key: &GroupKey,
        msg: &super::MessageRef,
        seq: u64,
        ack: Arc<SharedAck>,
    ) -> bool {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(key) else {
            return false;
        };
        let count = group.members.len();
        for _ in 0..count {
            let index = group.next % count;
            group.next = group.next.wrapping_add(1);
            let member = &group.members[index];
            let Some(mut delivery) = super::merge_matches(msg, &[member.entry], false) else {
                continue;
            };
            delivery.retain = false;
            delivery.shared_ack = Some(ack.clone());
            if member.tx.try_send(delivery).is_ok() {
                group.start_sequence = group.start_sequence.max(seq + 1);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shared_subscriptions_name_group_consumers() {
        let subscription = |filter: &str| crate::session::StoredSubscription {
            filter: filter.to_owned(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
        };
        let mut a = crate::session::SessionRecord::new("a", 0);
        a.subscriptions = vec![subscription("$share/g1/a/+"), subscription("a/#")];
        let mut b = crate::session::SessionRecord::new("b", 0);
        b.subscriptions = vec![subscription("$share/g1/a/+"), subscription("$share/g2/#")];
        let in_use = consumers_in_use([&a, &b].into_iter());
        let expected: HashSet<String> = [consumer_name("g1", "a/+"), consumer_name("g2", "#")]
            .into_iter()
            .collect();
        assert_eq!(in_use, expected);
    }

    #[test]
    fn consumer_names_are_stable_and_safe() {
        let a = consumer_name("g1", "a/+/c");
        assert_eq!(a, consumer_name("g1", "a/+/c"));
        assert_ne!(a, consumer_name("g1", "a/+/d"));
        assert_ne!(consumer_name("g", "1a"), consumer_name("g1", "a"));
        let odd = consumer_name("grüppe.*>", "#");
        assert!(
            odd.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{odd}"
        );
    }
}
