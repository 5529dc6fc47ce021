//! The node's directory of its live connections, and how a session's owner is told to go.
//!
//! Every connection past CONNECT registers here under its client id with its mailbox.
//! Whoever needs a connection gone (a newer connection of the same client, a drain) orders
//! it through that mailbox: [`Registry::kick`] does so on this node or, over NATS, on the
//! node that owns the session ([`crate::cluster::kick_subject`], answered by
//! [`serve_kicks`]), and [`Registry::hand_over`] also waits until the old connection has
//! written its session back. A connection removes itself with [`Registry::unregister`]
//! once its final session write is done, which is what a hand-over waits for.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jetmq_codec::ReasonCode;
use parking_lot::Mutex;

use crate::cluster;
use crate::routing::mailbox::{Control, MailboxSender};

/// How long a new owner waits for the previous connection's final session write.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// One registered connection: enough to tell it apart from a newer connection of the same
/// client and to give it orders.
pub struct LocalClient {
    pub connection: u64,
    /// The connection's mailbox, through which it takes orders ([`Control`]).
    pub control: MailboxSender,
}

/// The live connections of this node by client id, and the ids they are known by.
pub struct Registry {
    node_id: String,
    /// Reaches the registries of the other nodes (kicks and hand-overs).
    nats: async_nats::Client,
    clients: Mutex<HashMap<String, LocalClient>>,
    next_id: AtomicU64,
    first_connection_id: u64,
}

impl Registry {
    /// An empty registry whose connection ids start at `first_connection_id`: unique across
    /// restarts of a node under the same id, so the janitor can tell a previous process's
    /// sessions from the current one's.
    pub fn new(node_id: String, nats: async_nats::Client, first_connection_id: u64) -> Registry {
        Registry {
            node_id,
            nats,
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(first_connection_id),
            first_connection_id,
        }
    }

    /// A fresh connection id for a connection that passed CONNECT.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Connection ids of this process start here (see [`crate::janitor::Heartbeat`]).
    pub fn first_connection_id(&self) -> u64 {
        self.first_connection_id
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }

    /// True when no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.clients.lock().is_empty()
    }

    /// Registers `client` as `client_id`'s connection on this node; returns the connection
    /// it replaces, which the caller orders away.
    pub fn register(&self, client_id: String, client: LocalClient) -> Option<LocalClient> {
        self.clients.lock().insert(client_id, client)
    }

    /// Removes `client_id`'s entry if it still belongs to `connection` (a newer connection
    /// of the same client may have replaced it already).
    pub fn unregister(&self, client_id: &str, connection: u64) {
        let mut clients = self.clients.lock();
        if clients
            .get(client_id)
            .is_some_and(|c| c.connection == connection)
        {
            clients.remove(client_id);
        }
    }

    /// The registered connections not in `except`, with their mailboxes (for a drain).
    pub fn connections_except(&self, except: &HashSet<u64>) -> Vec<(u64, MailboxSender)> {
        self.clients
            .lock()
            .values()
            .filter(|c| !except.contains(&c.connection))
            .map(|c| (c.connection, c.control.clone()))
            .collect()
    }

    /// Asks the connection `connection` of `client_id` on `node` to go away.
    pub async fn kick(&self, node: &str, client_id: &str, connection: u64) {
        if node == self.node_id {
            self.kick_local(client_id, connection);
            return;
        }
        let payload = format!("{connection}\n{client_id}");
        if let Err(err) = self
            .nats
            .publish(cluster::kick_subject(node), payload.into())
            .await
        {
            tracing::warn!(client_id, node, error = %err, "cannot notify previous owner of a session");
        }
    }

    fn kick_local(&self, client_id: &str, connection: u64) {
        let clients = self.clients.lock();
        if let Some(local) = clients.get(client_id) {
            if local.connection == connection {
                local.control.order(Control::TakenOver);
            }
        }
    }

    fn is_live_here(&self, client_id: &str, connection: u64) -> bool {
        self.clients
            .lock()
            .get(client_id)
            .is_some_and(|c| c.connection == connection)
    }

    /// Asks a session's current connection to go away and waits (bounded) until it has
    /// written its final state: where it got to in the stream, which QoS 2 messages are
    /// released. The next owner then starts from there instead of from the last periodic
    /// write, which matters when a client roams to another node within milliseconds.
    /// A dead node or one that does not answer in time changes nothing: the caller claims
    /// the session as it is stored and kicks afterwards.
    ///
    /// Returns false when the owner's node did not answer at all (dead, or cut off): then
    /// nobody there will end that connection's session or publish its will.
    pub async fn hand_over(&self, node: &str, client_id: &str, connection: u64) -> bool {
        if node == self.node_id {
            self.kick_local(client_id, connection);
            self.wait_until_gone(client_id, connection).await;
            return true;
        }
        let payload = format!("{connection}\n{client_id}");
        let request = self
            .nats
            .request(cluster::kick_subject(node), payload.into());
        match tokio::time::timeout(HANDOVER_WAIT, request).await {
            Ok(Ok(_)) => true,
            Ok(Err(err)) => {
                tracing::debug!(client_id, node, error = %err, "previous owner did not hand the session over");
                false
            }
            Err(_) => {
                tracing::info!(
                    client_id,
                    node,
                    "previous owner did not hand the session over in time"
                );
                false
            }
        }
    }

    async fn wait_until_gone(&self, client_id: &str, connection: u64) {
        // Takeovers are rare; polling the registry costs nothing per connection, unlike a
        // completion channel held by every connection.
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        while self.is_live_here(client_id, connection) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Answers the kicks and hand-over requests other nodes send to this node's kick subject
/// (see [`Registry::kick`], [`Registry::hand_over`]) until the subscription ends.
pub async fn serve_kicks(registry: Arc<Registry>, mut kicks: async_nats::Subscriber) {
    while let Some(message) = kicks.next().await {
        let Ok(text) = std::str::from_utf8(&message.payload) else {
            continue;
        };
        let Some((connection, client_id)) = text.split_once('\n') else {
            continue;
        };
        let Ok(connection) = connection.parse::<u64>() else {
            continue;
        };
        registry.kick_local(client_id, connection);
        if let Some(reply) = message.reply {
            // The requester waits for the session's final write: answer once it is done.
            let registry = registry.clone();
            let client_id = client_id.to_owned();
            tokio::spawn(async move {
                registry.wait_until_gone(&client_id, connection).await;
                let _ = registry.nats.publish(reply, Default::default()).await;
            });
        }
    }
}

/// Reason code a connection gets when the node closes it for `control`.
pub fn control_reason(control: Control) -> ReasonCode {
    match control {
        Control::TakenOver => ReasonCode::SESSION_TAKEN_OVER,
        Control::Shutdown => ReasonCode::SERVER_SHUTTING_DOWN,
    }
}
