//! The node: the NATS connection and the shared state every part of the broker works on.
//!
//! [`Node::connect`] builds it from the configuration: it connects to NATS, finds where
//! the message stream ends, and sets up the router, the retained cache and the ingress.
//! It starts no task and opens no listener; [`crate::server`] does that with the built node
//! (the stream readers, the kick and drain subscriptions, the janitor, then the listeners).
//!
//! A connection never sees the [`Node`]: it gets the [`ConnContext`], which holds only
//! what a connection may touch (the ingress, the router, the retained cache, the session
//! store, the configuration, the registry of live connections...). The node's health
//! flags, its NATS client and its shutdown bookkeeping stay with the server and the janitor.
//!
//! Layering: `node` sits below `client`, `janitor`, `will` and `sys_topics` and above
//! `ingress`, `session`, `routing` and `transport`; it imports nothing from above.

mod context;
mod registry;

pub use context::ConnContext;
pub use registry::{control_reason, serve_kicks, LocalClient, Registry};

use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authn::Authenticator;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::ingress::batch::BatchPublisher;
use crate::ingress::Ingress;
use crate::retained::RetainedCache;
use crate::routing::shared::SharedGroups;
use crate::routing::{ReplayRing, Router};
use crate::telemetry::Metrics;
use crate::transport::tls::CertName;

/// At most this many idle-cursor session writes in flight per node
/// ([`ConnContext::idle_cursor_writes`]).
const IDLE_CURSOR_WRITES: usize = 64;
/// At most this many connections end their session at once per node
/// ([`ConnContext::closing_writes`]).
const CLOSING_WRITES: usize = 256;

/// One broker process: what the server, the janitor and the health endpoint work on.
/// Shared as `Arc<Node>`; connections get [`Node::context`] instead.
pub struct Node {
    pub config: Arc<Config>,
    pub cluster: Cluster,
    pub router: Arc<Router>,
    pub retained: Arc<RetainedCache>,
    pub metrics: Arc<Metrics>,
    /// Live connections on this node by client id.
    pub registry: Arc<Registry>,
    /// Set once the node serves, cleared when it stops taking clients (`/readyz`).
    pub ready: AtomicBool,
    /// The message stream answered its last probe (see `server::probe_jetstream`).
    pub jetstream_ok: AtomicBool,
    /// Heartbeat writes that failed in a row (see [`crate::janitor`]): a write needs the
    /// bucket's quorum, which a stream-info probe alone does not prove.
    pub store_write_failures: AtomicU32,
    /// Cancelled when a graceful drain is requested (signal, `jetmq-broker drain`).
    pub drain: CancellationToken,
    /// Cancelled for the hard stop: background tasks end, connections close at once.
    pub shutdown: CancellationToken,
    /// Every accepted connection's task, so a drain can wait until each session is written.
    pub connections: TaskTracker,
    /// What every connection of this node is given.
    pub context: Arc<ConnContext>,
}

impl Node {
    /// Connects to NATS and builds the node's shared state; starts nothing (see the module
    /// documentation). `drain` and `shutdown` are the tokens that will stop it.
    pub async fn connect(
        config: Config,
        drain: CancellationToken,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Node> {
        let metrics = Arc::new(Metrics::default());
        let authn = Authenticator::new(&config.auth)?;
        if !config
            .auth
            .admits_anyone(config.tls.username_from_cert != CertName::None)
        {
            tracing::warn!(
                "no way to log in is configured (auth.allow_anonymous is false and there are no \
                 auth.users, no auth.jwt, no tls.username_from_cert): every CONNECT will be refused"
            );
        }
        let cluster = cluster::connect(&config).await?;
        let start = cluster::with_retries("message stream state", || {
            let stream = cluster.messages.clone();
            async move { stream.get_info().await }
        })
        .await
        .context("cannot read message stream state")?
        .state
        .last_sequence;
        let start = crate::routing::position::end_of(start);
        let router = Arc::new(Router::new(
            start,
            ReplayRing::new(
                config.nats.replay_buffer_messages,
                config.nats.replay_buffer_bytes,
            ),
            metrics.clone(),
        ));
        let retained = Arc::new(RetainedCache::default());
        let first_connection_id = crate::session::now_ms().saturating_mul(1000);
        let batches = if !config.nats.batch_publish {
            None
        } else if !cluster.messages.cached_info().config.allow_batch_publish {
            tracing::warn!("the message stream does not allow batch publishing (nats-server older than 2.14?); QoS 1 is published one message at a time");
            None
        } else {
            let publisher = BatchPublisher::start(
                cluster.client.clone(),
                shutdown.clone(),
                metrics.clone(),
                config.nats.batch_publish_after,
                config.nats.bundle_max_messages,
            )
            .await
            .context("cannot subscribe to the batch publishing inbox")?;
            Some(publisher)
        };
        let ingress = Ingress {
            client: cluster.client.clone(),
            js: Arc::new(cluster.js.clone()),
            retained: retained.clone(),
            batches,
            alone: Arc::new(Semaphore::new(config.nats.max_publishes_alone)),
            metrics: metrics.clone(),
        };
        let config = Arc::new(config);
        let registry = Arc::new(Registry::new(
            config.node_id.clone(),
            cluster.client.clone(),
            first_connection_id,
        ));
        let context = Arc::new(ConnContext {
            config: config.clone(),
            sessions: cluster.sessions.clone(),
            messages: cluster.messages.clone(),
            router: router.clone(),
            retained: retained.clone(),
            shared: SharedGroups::new(cluster.messages.clone(), shutdown.clone()),
            ingress,
            metrics: metrics.clone(),
            authn,
            registry: registry.clone(),
            shutdown: shutdown.clone(),
            idle_cursor_writes: Arc::new(Semaphore::new(IDLE_CURSOR_WRITES)),
            closing_writes: Arc::new(Semaphore::new(CLOSING_WRITES)),
        });
        Ok(Node {
            config,
            cluster,
            router,
            retained,
            metrics,
            registry,
            ready: AtomicBool::new(false),
            jetstream_ok: AtomicBool::new(true),
            store_write_failures: AtomicU32::new(0),
            drain,
            shutdown,
            connections: TaskTracker::new(),
            context,
        })
    }
}
