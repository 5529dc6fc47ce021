//! What a connection may touch of its node.

use std::sync::Arc;

use async_nats::jetstream::stream::Stream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::registry::Registry;
use crate::authn::Authenticator;
use crate::config::Config;
use crate::ingress::Ingress;
use crate::retained::RetainedCache;
use crate::routing::shared::SharedGroups;
use crate::routing::Router;
use crate::session::SessionStore;
use crate::telemetry::Metrics;

/// The handles a connection works with, built once per node ([`super::Node::connect`])
/// and shared by all its connections as `Arc<ConnContext>`. Wills go out through it too
/// ([`crate::will`]), including those the janitor publishes for connections of dead nodes.
///
/// Deliberately absent: the node's health flags, its drain token and connection tracker,
/// the raw NATS client. A connection stops when [`ConnContext::shutdown`] is cancelled or
/// when it is ordered to through its mailbox ([`Registry`]).
pub struct ConnContext {
    /// The node's configuration (limits, ACL, session and drain settings, the node id).
    pub config: Arc<Config>,
    /// Session records (`JETMQ_SESSIONS`), written with compare-and-set.
    pub sessions: SessionStore,
    /// The message stream, read directly when a session replays what the router no longer
    /// holds.
    pub messages: Stream,
    pub router: Arc<Router>,
    pub retained: Arc<RetainedCache>,
    /// The node's shared-subscription groups (`$share/...`).
    pub shared: Arc<SharedGroups>,
    /// Where PUBLISHes (and wills) enter JetStream.
    pub ingress: Ingress,
    pub metrics: Arc<Metrics>,
    /// Checks CONNECT credentials (see [`crate::authn`]).
    pub authn: Authenticator,
    /// The node's live connections: a connection registers here and kicks or waits for
    /// the previous owner of its session through it.
    pub registry: Arc<Registry>,
    /// Cancelled for the hard stop: connections close at once, will timers give up.
    pub shutdown: CancellationToken,
    /// Session writes that only move an idle session's cursor forward, in flight at once
    /// (see `client::persist`): every connection's cursor follows the same stream, so
    /// without a bound they all come due in the same second.
    pub idle_cursor_writes: Arc<Semaphore>,
    /// Connections writing their final session state (and will) at once (see
    /// `client::Client::finish`): a mass disconnect ends thousands of sessions in the same
    /// moment, and each final write in flight holds its step, a copy of the record and a KV
    /// request.
    pub closing_writes: Arc<Semaphore>,
}
