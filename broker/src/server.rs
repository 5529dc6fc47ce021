//! The node: start-up, listeners, health endpoint, shutdown.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use jetmq_codec::ReasonCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authn::Authenticator;
use crate::client;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::ingress::batch::BatchPublisher;
use crate::ingress::Ingress;
use crate::retained::{self, RetainedCache};
use crate::routing::shared::SharedGroups;
use crate::routing::{self, ReplayRing, Router};
use crate::telemetry::Metrics;
use crate::transport::tls::CertName;
use crate::transport::{self, Edge, Kind};

/// Sent to a connection by whoever needs it gone.
pub use crate::routing::mailbox::Control;
use crate::routing::mailbox::MailboxSender;

pub struct LocalClient {
    pub connection: u64,
    /// The connection's mailbox, through which it takes orders ([`Control`]).
    pub control: MailboxSender,
}

/// Everything a connection needs from its node.
pub struct Node {
    pub config: Config,
    pub cluster: Cluster,
    pub router: Arc<Router>,
    pub retained: Arc<RetainedCache>,
    pub shared: Arc<SharedGroups>,
    pub ingress: Ingress,
    pub metrics: Arc<Metrics>,
    /// Checks CONNECT credentials (see [`crate::authn`]).
    pub authn: Authenticator,
    /// Live connections on this node by client id.
    pub clients: Mutex<HashMap<String, LocalClient>>,
    next_id: AtomicU64,
    first_connection_id: u64,
    pub ready: AtomicBool,
    /// The message stream answered its last probe (see [`probe_jetstream`]).
    pub jetstream_ok: AtomicBool,
    /// Heartbeat writes that failed in a row (see [`crate::janitor`]): a write needs the
    /// bucket's quorum, which a stream-info probe alone does not prove.
    pub store_write_failures: AtomicU32,
    /// Cancelled when a graceful drain is requested (signal, `jetmq-broker drain`).
    pub drain: CancellationToken,
    /// Cancelled for the hard stop: background tasks end, connections close at once.
    pub shutdown: CancellationToken,
    /// Every accepted connection's task, so a drain can wait until each session is written.
    connections: TaskTracker,
    /// Session writes that only move an idle session's cursor forward, in flight at once
    /// (see `client::persist`): every connection's cursor follows the same stream, so
    /// without a bound they all come due in the same second.
    pub idle_cursor_writes: Arc<Semaphore>,
}

/// At most this many idle-cursor session writes in flight per node (`Node::idle_cursor_writes`).
const IDLE_CURSOR_WRITES: usize = 64;

impl Node {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Connection ids of this process start here (see [`crate::janitor::Heartbeat`]).
    pub fn first_connection_id(&self) -> u64 {
        self.first_connection_id
    }

    /// Asks the connection `connection` of `client_id` on `node` to go away.
    pub async fn kick(&self, node: &str, client_id: &str, connection: u64) {
        if node == self.config.node_id {
            self.kick_local(client_id, connection);
            return;
        }
        let payload = format!("{connection}\n{client_id}");
        if let Err(err) = self
            .cluster
            .client
            .publish(cluster::kick_subject(node), payload.into())
            .await
        {
            tracing::warn!(client_id, node, error = %err, "cannot notify previous owner of a session");
        }
    }

    fn kick_local(&self, client_id: &str, connection: u64) {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(local) = clients.get(client_id) {
            if local.connection == connection {
                local.control.order(Control::TakenOver);
            }
        }
    }

    fn is_live_here(&self, client_id: &str, connection: u64) -> bool {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
        if node == self.config.node_id {
            self.kick_local(client_id, connection);
            self.wait_until_gone(client_id, connection).await;
            return true;
        }
        let payload = format!("{connection}\n{client_id}");
        let request = self
            .cluster
            .client
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

/// How long a new owner waits for the previous connection's final session write.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// Starts the node and serves until `drain` (graceful: see [`drain_clients`]) or `shutdown`
/// (immediate) is cancelled.
pub async fn run(
    config: Config,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    // Certificates and keys first: a typo in a path should not wait for NATS.
    let edge = Edge::new(&config)?;
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
    let nodes_kv = cluster::with_retries("node bucket", || {
        jetmq_common::streams::ensure_kv_bucket(
            &cluster.js,
            jetmq_common::streams::NODE_BUCKET,
            node_replicas(&cluster),
            crate::janitor::NODE_TTL,
            64 * 1024,
        )
    })
    .await?;
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
        alone: Arc::new(tokio::sync::Semaphore::new(config.nats.max_publishes_alone)),
        metrics: metrics.clone(),
    };
    let node = Arc::new(Node {
        config,
        router: router.clone(),
        retained: retained.clone(),
        shared: SharedGroups::new(cluster.messages.clone(), shutdown.clone()),
        ingress,
        metrics,
        authn,
        clients: Mutex::new(HashMap::new()),
        // Unique across restarts of a node under the same id, so the janitor can tell a
        // previous process's sessions from the current one's.
        next_id: AtomicU64::new(first_connection_id),
        first_connection_id,
        ready: AtomicBool::new(false),
        jetstream_ok: AtomicBool::new(true),
        store_write_failures: AtomicU32::new(0),
        drain: drain.clone(),
        shutdown: shutdown.clone(),
        connections: TaskTracker::new(),
        idle_cursor_writes: Arc::new(Semaphore::new(IDLE_CURSOR_WRITES)),
        cluster,
    });

    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    spawn_critical(
        "retained reader",
        retained::run_retained_reader(
            retained,
            node.cluster.retained.clone(),
            node.cluster.client.clone(),
            loaded_tx,
            shutdown.clone(),
        ),
        shutdown.clone(),
    );
    spawn_critical(
        "message stream reader",
        routing::run_stream_reader(
            router,
            node.cluster.messages.clone(),
            node.cluster.client.clone(),
            shutdown.clone(),
        ),
        shutdown.clone(),
    );
    let kicks = node
        .cluster
        .client
        .subscribe(cluster::kick_subject(&node.config.node_id))
        .await
        .context("cannot subscribe to node control subject")?;
    tokio::spawn(serve_kicks(node.clone(), kicks));
    tokio::spawn(probe_jetstream(node.clone()));
    let drain_requests = node
        .cluster
        .client
        .subscribe(cluster::drain_subject(&node.config.node_id))
        .await
        .context("cannot subscribe to node drain subject")?;
    tokio::spawn(serve_drain_requests(node.clone(), drain_requests));
    tokio::spawn(crate::janitor::run(
        node.clone(),
        nodes_kv,
        shutdown.clone(),
    ));

    if tokio::time::timeout(Duration::from_secs(30), loaded_rx)
        .await
        .is_err()
    {
        tracing::warn!("retained messages still loading after 30 s; serving anyway");
    }

    if let Some(addr) = node.config.listen.http {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
        tracing::info!(%addr, "health and metrics endpoint");
        tokio::spawn(serve_http(node.clone(), listener));
    }
    let mut listeners = Vec::new();
    for (kind, addr) in transport::listeners(&node.config.listen) {
        let listener = bind_with_backlog(addr)
            .with_context(|| format!("cannot listen for MQTT over {kind} on {addr}"))?;
        listeners.push((kind, addr, listener));
    }
    if listeners.is_empty() {
        anyhow::bail!(
            "no MQTT listener configured (listen.tcp, listen.tls, listen.ws, listen.wss)"
        );
    }
    edge.spawn_reloader(shutdown.clone());
    node.ready.store(true, Ordering::Release);
    // Unready strictly before the listeners close: DNS health checks should stop sending
    // clients here no later than the node stops taking them.
    let stop_accepting = CancellationToken::new();
    tokio::spawn({
        let node = node.clone();
        let stop_accepting = stop_accepting.clone();
        async move {
            tokio::select! {
                _ = node.drain.cancelled() => {}
                _ = node.shutdown.cancelled() => {}
            }
            node.ready.store(false, Ordering::Release);
            stop_accepting.cancel();
        }
    });
    // One connection limit for all listeners together.
    let permits = Arc::new(Semaphore::new(node.config.limits.max_connections));
    let loops = listeners.into_iter().map(|(kind, addr, listener)| {
        tracing::info!(%addr, transport = %kind, node_id = %node.config.node_id, "MQTT listener ready");
        accept_loop(
            node.clone(),
            listener,
            kind,
            edge.clone(),
            permits.clone(),
            stop_accepting.clone(),
        )
    });
    futures::future::join_all(loops).await;
    node.ready.store(false, Ordering::Release);
    node.connections.close();

    let result = if node.shutdown.is_cancelled() {
        stop_now(&node).await;
        Ok(())
    } else {
        drain_clients(&node).await
    };
    shutdown.cancel();
    // With NATS unreachable a flush would wait forever; shutdown must not.
    match tokio::time::timeout(Duration::from_secs(5), node.cluster.client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "NATS flush on shutdown failed"),
        Err(_) => tracing::warn!("NATS flush on shutdown timed out"),
    }
    result
}

/// Listen queue for MQTT sockets. The default 128 overflows in a reconnect storm (thousands
/// of clients of a dead node arriving within a second), and each overflow costs a client a
/// SYN retransmission of a second or more.
const LISTEN_BACKLOG: u32 = 4096;

fn bind_with_backlog(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The node bucket gets the replicas the message stream got.
fn node_replicas(cluster: &Cluster) -> usize {
    cluster.messages.cached_info().config.num_replicas.max(1)
}

fn spawn_critical<F>(name: &'static str, task: F, shutdown: CancellationToken)
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        match task.await {
            Ok(()) => {}
            Err(err) => {
                tracing::error!(task = name, error = %err, "node task failed; shutting down");
                shutdown.cancel();
            }
        }
    });
}

async fn accept_loop(
    node: Arc<Node>,
    listener: TcpListener,
    kind: Kind,
    edge: Arc<Edge>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refusing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let per_ip = match edge.admit_peer(peer) {
            Ok(guard) => guard,
            Err(why) => {
                // Logged once per refusal at info: an address hammering the node shows up,
                // and the counter tells how often.
                tracing::info!(%peer, reason = ?why, "per-address connection limit; refusing");
                node.metrics.connections_refused_per_ip.inc();
                drop(permit);
                edge.refuse_peer(kind, stream, peer, why);
                continue;
            }
        };
        if !edge.admit_connection() {
            drop(permit);
            edge.refuse(kind, stream, peer);
            continue;
        }
        let tracker = node.connections.clone();
        let node = node.clone();
        let edge = edge.clone();
        let task = async move {
            // TLS / WebSocket handshake, bounded by limits.connect_timeout_ms.
            // Boxed: the TLS / WebSocket handshake state is large and needed only briefly.
            if let Some((stream, peer_info)) = Box::pin(edge.upgrade(kind, stream, peer)).await {
                transport::scope(peer_info, Box::pin(client::serve(node, stream, peer))).await;
            }
            drop(per_ip);
            drop(permit);
        };
        tracker.spawn(task);
    }
}

/// How long the hard stop waits for connections to write their sessions back.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The hard stop: every connection closes at once (0x8B) and writes its session back.
async fn stop_now(node: &Node) {
    node.shutdown.cancel();
    if tokio::time::timeout(STOP_GRACE, node.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = node.connections.len(),
            "connections still closing at shutdown"
        );
    }
}

/// The graceful path: the listeners are closed and /readyz answers 503 already. Clients are
/// sent away in waves spread over `drain.duration_ms`, so the nodes that take them over are
/// not hit by all of them at once; each connection writes its session back (cursor,
/// released QoS 2 ids, owner cleared) before it ends, so another node can claim it without
/// waiting for the janitor. Err when the hard deadline `drain.timeout_ms` cut it short.
async fn drain_clients(node: &Node) -> anyhow::Result<()> {
    let config = &node.config.drain;
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(config.timeout_ms);
    let duration = Duration::from_millis(config.duration_ms);
    node.metrics.draining.set(1);
    let total = local_clients(node, &HashSet::new()).len();
    let waves = (config.waves as usize).min(total).max(1);
    tracing::info!(
        clients = total,
        waves,
        duration_ms = config.duration_ms,
        timeout_ms = config.timeout_ms,
        "drain started: not ready, listeners closed"
    );
    let mut signalled = HashSet::new();
    if total > 0 {
        for wave in 1..=waves {
            let at = started + duration.mul_f64(wave as f64 / waves as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                // Everyone left on their own.
                _ = node.connections.wait() => break,
                _ = node.shutdown.cancelled() => break,
            }
            let remaining = local_clients(node, &signalled);
            let share = remaining.len().div_ceil(waves - wave + 1);
            let sent = signal(remaining.into_iter().take(share), &mut signalled);
            node.metrics.drain_disconnects.add(sent as u64);
            tracing::info!(
                wave,
                waves,
                disconnected = sent,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "drain wave"
            );
        }
    }
    // Connections still in their handshake when the drain began register late; they go too.
    let mut sweep = tokio::time::interval(Duration::from_millis(100));
    loop {
        let late = local_clients(node, &signalled);
        if !late.is_empty() {
            let sent = signal(late.into_iter(), &mut signalled);
            node.metrics.drain_disconnects.add(sent as u64);
            tracing::info!(disconnected = sent, "drain: late connections sent away");
        }
        tokio::select! {
            _ = node.connections.wait() => {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "drain complete: every session written back"
                );
                return Ok(());
            }
            _ = sweep.tick() => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = node.shutdown.cancelled() => {
                stop_now(node).await;
                return Ok(());
            }
        }
    }
    let left = node.connections.len();
    tracing::error!(
        connections = left,
        "drain deadline passed; closing the remaining connections now"
    );
    stop_now(node).await;
    anyhow::bail!(
        "drain did not finish within drain.timeout_ms = {} ms ({left} connections left)",
        config.timeout_ms
    )
}

/// Registered connections not yet asked to leave.
fn local_clients(node: &Node, signalled: &HashSet<u64>) -> Vec<(u64, MailboxSender)> {
    node.clients
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|c| !signalled.contains(&c.connection))
        .map(|c| (c.connection, c.control.clone()))
        .collect()
}

fn signal(
    clients: impl Iterator<Item = (u64, MailboxSender)>,
    signalled: &mut HashSet<u64>,
) -> usize {
    let mut sent = 0;
    for (connection, control) in clients {
        if control.order(Control::Shutdown) {
            sent += 1;
        }
        signalled.insert(connection);
    }
    sent
}

/// `jetmq-broker drain` sends a request here (see [`cluster::drain_subject`]); the reply
/// says how many clients the node is about to send away.
async fn serve_drain_requests(node: Arc<Node>, mut requests: async_nats::Subscriber) {
    while let Some(message) = requests.next().await {
        let already = node.drain.is_cancelled();
        tracing::info!(already, "drain requested over NATS");
        node.drain.cancel();
        if let Some(reply) = message.reply {
            let body = serde_json::json!({
                "node_id": node.config.node_id,
                "draining": true,
                "already_draining": already,
                "connections": node.metrics.connections.get(),
            });
            if let Err(err) = node
                .cluster
                .client
                .publish(reply, body.to_string().into())
                .await
            {
                tracing::warn!(error = %err, "cannot answer drain request");
            }
        }
    }
}

/// How often /readyz's view of JetStream is refreshed.
const JETSTREAM_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps `jetstream_ok` current: the message stream must answer (it has a leader and the
/// NATS node we talk to reaches it) and the node's heartbeat writes must land, else
/// publishes cannot be acknowledged and DNS health checks should send clients elsewhere.
/// A NATS node cut off from the majority may still answer stream info from its own state
/// while every write fails, so the info request alone is not enough. Two failed probes (or
/// heartbeats) in a row flip it, one success flips it back, so one slow answer does not take
/// a node out.
async fn probe_jetstream(node: Arc<Node>) {
    let mut failures = 0u32;
    let mut refusals_seen = node.metrics.publish_store_full.get();
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tokio::time::sleep(JETSTREAM_PROBE_INTERVAL) => {}
        }
        let probe = node
            .cluster
            .js
            .get_stream(jetmq_common::streams::MESSAGE_STREAM);
        let answer = tokio::time::timeout(JETSTREAM_PROBE_INTERVAL, probe).await;
        if let Ok(Ok(stream)) = &answer {
            refusals_seen = watch_store_room(&node, stream.cached_info(), refusals_seen);
        }
        let ok =
            matches!(answer, Ok(Ok(_))) && node.store_write_failures.load(Ordering::Acquire) < 2;
        failures = if ok { 0 } else { failures + 1 };
        let healthy = failures < 2;
        if node.jetstream_ok.swap(healthy, Ordering::AcqRel) != healthy {
            if healthy {
                tracing::info!("JetStream reachable again; ready");
            } else {
                tracing::warn!("JetStream does not answer; not ready");
            }
        }
    }
}

/// A full message store does not make the node unready: logins, session claims,
/// subscriptions and delivery of stored messages all still work, and another node would be
/// just as full (the stream is shared). It shows in metrics and the log instead: the flag
/// set by the first refused publish is cleared, with a log line, once no publish was
/// refused since the last probe and the stream has room for a message of the largest size.
/// Returns the refusal count seen now.
fn watch_store_room(node: &Node, info: &async_nats::jetstream::stream::Info, seen: u64) -> u64 {
    let metrics = &node.metrics;
    metrics
        .message_stream_bytes
        .set(i64::try_from(info.state.bytes).unwrap_or(i64::MAX));
    metrics.message_stream_max_bytes.set(info.config.max_bytes);
    let refusals = metrics.publish_store_full.get();
    let largest = i64::from(info.config.max_message_size.max(64 * 1024));
    let has_room = info.config.max_bytes < 0
        || (info.state.bytes as i64).saturating_add(largest) <= info.config.max_bytes;
    if refusals == seen && has_room && metrics.message_store_full.swap(0) == 1 {
        tracing::info!(
            stream_bytes = info.state.bytes,
            max_bytes = info.config.max_bytes,
            "message store has room again; publishes are accepted"
        );
    }
    refusals
}

async fn serve_kicks(node: Arc<Node>, mut kicks: async_nats::Subscriber) {
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
        node.kick_local(client_id, connection);
        if let Some(reply) = message.reply {
            // The requester waits for the session's final write: answer once it is done.
            let node = node.clone();
            let client_id = client_id.to_owned();
            tokio::spawn(async move {
                node.wait_until_gone(&client_id, connection).await;
                let _ = node.cluster.client.publish(reply, Default::default()).await;
            });
        }
    }
}

/// A deliberately tiny HTTP/1.1 responder: three GET paths, no keep-alive.
async fn serve_http(node: Arc<Node>, listener: TcpListener) {
    loop {
        let (stream, _) = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer_http(node, stream)).await;
        });
    }
}

async fn answer_http(node: Arc<Node>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut request = vec![0u8; 2048];
    let n = stream.read(&mut request).await?;
    let head = String::from_utf8_lossy(&request[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/healthz" => ("200 OK", "ok\n".to_owned()),
        "/readyz" => {
            let connected =
                node.cluster.client.connection_state() == async_nats::connection::State::Connected;
            if node.ready.load(Ordering::Acquire)
                && connected
                && node.jetstream_ok.load(Ordering::Acquire)
            {
                ("200 OK", "ready\n".to_owned())
            } else {
                ("503 Service Unavailable", "not ready\n".to_owned())
            }
        }
        "/metrics" => {
            let sessions = node.clients.lock().unwrap_or_else(|p| p.into_inner()).len();
            (
                "200 OK",
                node.metrics
                    .render(node.router.subscription_count(), sessions),
            )
        }
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reason code a connection gets when the node closes it for `control`.
pub fn control_reason(control: Control) -> ReasonCode {
    match control {
        Control::TakenOver => ReasonCode::SESSION_TAKEN_OVER,
        Control::Shutdown => ReasonCode::SERVER_SHUTTING_DOWN,
    }
}

pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}
