//! What no single connection can do: notice dead nodes, publish the wills of their clients,
//! fire delayed wills whose node is gone, and remove expired sessions.
//!
//! Every node writes a heartbeat into the `JETMQ_NODES` bucket, whose entries age out after
//! [`NODE_TTL`]. One node at a time holds the janitor lease (a key in the same bucket, created
//! only if absent and refreshed by its holder); it watches the session bucket and acts on
//! records whose owner is gone or whose will or expiry is due. Its writes are
//! compare-and-set, so a client reconnecting at the same moment always wins. From the same
//! records it knows which shared-subscription groups still have members, and deletes the
//! others' consumers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::routing::shared::{consumers_in_use, UnusedGroups};
use crate::session::{now_ms, SessionRecord, StoreError};
use crate::will::publish_will;

/// A node whose heartbeat is older than this counts as dead.
pub const NODE_TTL: Duration = Duration::from_secs(15);
const HEARTBEAT: Duration = Duration::from_secs(3);
const LEASE_KEY: &str = "janitor";
/// A delayed will normally fires on its own node; the janitor waits this much longer
/// before it concludes that node is not going to.
const WILL_GRACE_MS: u64 = 5_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    /// Connection ids of the node's current process start here; lower ones belong to a
    /// previous process under the same node id.
    pub first_connection: u64,
    pub connections: i64,
    pub version: String,
}

fn heartbeat_key(node_id: &str) -> String {
    format!("node.{node_id}")
}

/// The janitor of `node`, started by the server once the node is built: writes the
/// node's heartbeat into `nodes_kv` (`JETMQ_NODES`) and, while it holds the lease, settles
/// the sessions nobody else will. Returns when `shutdown` is cancelled.
pub async fn run(node: Arc<Node>, nodes_kv: kv::Store, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut lease: Option<u64> = None;
    let mut index: Option<SessionIndex> = None;
    let mut unused_groups = UnusedGroups::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // The heartbeat is left to age out: by then this node's connections have
                // written their sessions back, and nothing mistakes them for orphans.
                if lease.is_some() {
                    let _ = nodes_kv.delete(LEASE_KEY).await;
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let beat = Heartbeat {
            node_id: node.config.node_id.clone(),
            first_connection: node.registry.first_connection_id(),
            connections: node.metrics.connections.get(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        if let Ok(value) = serde_json::to_vec(&beat) {
            match nodes_kv
                .put(heartbeat_key(&beat.node_id), value.into())
                .await
            {
                Ok(_) => node.store_write_failures.store(0, Ordering::Release),
                Err(err) => {
                    node.store_write_failures.fetch_add(1, Ordering::AcqRel);
                    tracing::warn!(error = %err, "heartbeat write failed");
                }
            }
        }
        lease = renew_lease(&nodes_kv, &node.config.node_id, lease).await;
        if lease.is_none() {
            index = None;
            continue;
        }
        if index.is_none() {
            match SessionIndex::start(&node).await {
                Ok(started) => {
                    tracing::info!("janitor lease acquired; watching sessions");
                    index = Some(started);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "janitor cannot watch sessions");
                    continue;
                }
            }
        }
        if index
            .as_ref()
            .is_some_and(|index| index._watcher.is_finished())
        {
            // Its watch ended (an error, see below): read the bucket afresh next round.
            tracing::info!("janitor's session watch ended; restarting it");
            index = None;
            continue;
        }
        if let Some(index) = index.as_mut() {
            index.drain_updates();
            let alive = live_nodes(&nodes_kv).await;
            if let Some(alive) = alive {
                sweep(&node, index, &alive).await;
            }
            if !index.loaded {
                continue;
            }
            let in_use = consumers_in_use(index.records.values());
            if let Err(err) = unused_groups.forget(&node.cluster.messages, &in_use).await {
                tracing::debug!(error = %err, "janitor cannot list shared subscription groups");
            }
        }
    }
}

async fn renew_lease(nodes_kv: &kv::Store, node_id: &str, lease: Option<u64>) -> Option<u64> {
    let value = bytes::Bytes::from(node_id.to_owned());
    let Some(revision) = lease else {
        return nodes_kv.create(LEASE_KEY, value).await.ok();
    };
    // A refusal while the previous renewal is still marked in flight (10164) says nothing
    // about who holds the lease (see `StoreError::InFlight`); it clears within milliseconds.
    let mut wait = crate::session::InFlightWait::new();
    loop {
        match nodes_kv.update(LEASE_KEY, value.clone(), revision).await {
            Ok(revision) => return Some(revision),
            Err(err) if crate::session::is_in_flight(&err.to_string()) => {
                wait.pause().await.ok()?
            }
            Err(_) => return None,
        }
    }
}

/// Node id → first connection id of its live process. None if the bucket can't be read.
async fn live_nodes(nodes_kv: &kv::Store) -> Option<HashMap<String, u64>> {
    let mut keys = nodes_kv.keys().await.ok()?;
    let mut alive = HashMap::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { return None };
        if !key.starts_with("node.") {
            continue;
        }
        // A heartbeat that cannot be read says nothing about its node: no verdict this round
        // rather than one that takes the sessions of a live node away.
        if let Some(value) = nodes_kv.get(&key).await.ok()? {
            if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&value) {
                alive.insert(beat.node_id, beat.first_connection);
            }
        }
    }
    Some(alive)
}

struct IndexUpdate {
    key: String,
    record: Option<SessionRecord>,
    /// The watch has delivered every record that existed when it started.
    caught_up: bool,
}

/// What the janitor needs to know about each session, kept current by a KV watch.
struct SessionIndex {
    updates: tokio::sync::mpsc::Receiver<IndexUpdate>,
    records: HashMap<String, SessionRecord>,
    /// Every record that existed when the watch started is in: only then does a group that
    /// no record names have no members.
    loaded: bool,
    _watcher: tokio::task::JoinHandle<()>,
}

impl SessionIndex {
    async fn start(node: &Node) -> anyhow::Result<SessionIndex> {
        let kv = node
            .cluster
            .js
            .get_key_value(jetmq_common::streams::SESSION_BUCKET)
            .await?;
        let loaded = kv.status().await?.values() == 0;
        let mut watch = kv.watch_with_history(">").await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let watcher = tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                // An error ends the watch: its ordered consumer must not be polled again
                // (see `routing::stall::open_ordered`); the janitor starts a new one.
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(err) => {
                        tracing::warn!(error = %err, "janitor's session watch failed");
                        return;
                    }
                };
                let record = match entry.operation {
                    Operation::Put => crate::session::SessionRecord::from_json(&entry.value).ok(),
                    Operation::Delete | Operation::Purge => None,
                };
                let update = IndexUpdate {
                    key: entry.key,
                    record,
                    caught_up: entry.delta == 0,
                };
                if tx.send(update).await.is_err() {
                    return;
                }
            }
        });
        Ok(SessionIndex {
            updates: rx,
            records: HashMap::new(),
            loaded,
            _watcher: watcher,
        })
    }

    fn drain_updates(&mut self) {
        while let Ok(IndexUpdate {
            key,
            record,
            caught_up,
        }) = self.updates.try_recv()
        {
            self.loaded |= caught_up;
            match record {
                Some(record) => {
                    self.records.insert(key, record);
                }
                None => {
                    self.records.remove(&key);
                }
            }
        }
    }
}

impl Drop for SessionIndex {
    fn drop(&mut self) {
        self._watcher.abort();
    }
}

async fn sweep(node: &Arc<Node>, index: &SessionIndex, alive: &HashMap<String, u64>) {
    let now = now_ms();
    for record in index.records.values() {
        // The index may trail the bucket (a busy cluster writes every session about once a
        // second), so this only picks candidates; `settle` decides on a fresh read.
        if needs_settling(record, alive, now) {
            if let Err(err) = settle(node, &record.client_id, alive, now).await {
                tracing::debug!(client_id = %record.client_id, error = %err, "janitor left session for the next round");
            }
        }
    }
}

/// Is the record's owner a process that no longer runs?
fn owner_is_dead(record: &SessionRecord, alive: &HashMap<String, u64>) -> bool {
    record
        .owner
        .as_ref()
        .is_some_and(|owner| match alive.get(&owner.node) {
            Some(first) => owner.connection < *first,
            None => true,
        })
}

fn needs_settling(record: &SessionRecord, alive: &HashMap<String, u64>, now: u64) -> bool {
    let will_due = record.owner.is_none()
        && record
            .will_due_ms
            .is_some_and(|due| now >= due + WILL_GRACE_MS);
    let expired = record.owner.is_none() && record.is_expired(now);
    owner_is_dead(record, alive) || will_due || expired
}

#[derive(Debug, PartialEq)]
enum Settled {
    /// The record is fine as it is (e.g. its client reconnected to a live node meanwhile).
    Untouched,
    Save,
    Delete,
}

/// Brings a freshly read record to the state its clock says it should be in; returns what to
/// do with it and the will to publish, if any.
fn settle_record(
    record: &mut SessionRecord,
    alive: &HashMap<String, u64>,
    now: u64,
) -> (Settled, Option<crate::session::StoredWill>) {
    if record.owner.is_some() {
        if !owner_is_dead(record, alive) {
            // Owned by a live connection: never take a session away from it.
            return (Settled::Untouched, None);
        }
        record.owner = None;
        record.disconnected_at_ms = Some(now);
        if let Some(will) = &record.will {
            let delay = u64::from(will.delay_secs.min(record.expiry_secs)) * 1000;
            record.will_due_ms = Some(now + delay);
        }
    }
    let mut will = None;
    if record.will_due_ms.is_some_and(|due| now >= due) || record.is_expired(now) {
        will = record.will.take();
        record.will_due_ms = None;
    }
    if record.is_expired(now) {
        (Settled::Delete, will)
    } else {
        (Settled::Save, will)
    }
}

/// Re-reads one session and settles it (see [`settle_record`]).
async fn settle(
    node: &Arc<Node>,
    client_id: &str,
    alive: &HashMap<String, u64>,
    now: u64,
) -> Result<(), StoreError> {
    let store = &node.cluster.sessions;
    let (Some(mut record), revision) = store.load(client_id).await? else {
        return Ok(());
    };
    let owner = record.owner.as_ref().map(|o| o.node.clone());
    let (what, will) = settle_record(&mut record, alive, now);
    if what == Settled::Untouched {
        return Ok(());
    }
    if let Some(node_id) = owner {
        tracing::info!(client_id, node = %node_id, "session orphaned by a dead node; taking care of it");
    }
    // The will goes out only once the write landed: a client that reconnected meanwhile
    // (whose node then publishes the will itself) or another janitor makes this write
    // fail, so the will is published by exactly one of them.
    match what {
        Settled::Delete => store.delete(client_id, revision).await?,
        _ => store.save(&record, revision).await.map(|_| ())?,
    }
    if let Some(will) = will {
        publish_will(&node.context, client_id, record.username.as_deref(), &will).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Owner;

    fn owned_by(node: &str, connection: u64) -> SessionRecord {
        let mut r = SessionRecord::new("c", 0);
        r.owner = Some(Owner {
            node: node.into(),
            connection,
        });
        r.expiry_secs = 3600;
        r
    }

    #[test]
    fn a_session_taken_over_by_a_live_node_is_left_alone() {
        // node-1 died; the janitor's index still shows the session there, but by the time it
        // reads the record again the client has resumed it on node-2.
        let alive = HashMap::from([("node-2".to_owned(), 100)]);
        let stale = owned_by("node-1", 7);
        assert!(needs_settling(&stale, &alive, 1_000));
        let mut fresh = owned_by("node-2", 150);
        let before = fresh.clone();
        assert_eq!(
            settle_record(&mut fresh, &alive, 1_000).0,
            Settled::Untouched
        );
        assert_eq!(fresh, before);
    }

    #[test]
    fn a_session_of_a_dead_node_is_released() {
        let alive = HashMap::from([("node-2".to_owned(), 100)]);
        for mut r in [owned_by("node-1", 7), owned_by("node-2", 99)] {
            let (what, will) = settle_record(&mut r, &alive, 1_000);
            assert_eq!(what, Settled::Save);
            assert!(will.is_none());
            assert_eq!(r.owner, None);
            assert_eq!(r.disconnected_at_ms, Some(1_000));
        }
    }
}
