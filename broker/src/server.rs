//! The server: runs a node from start-up to exit.
//!
//! [`run`] is the whole life of a node, in two steps. [`start`] builds the node
//! ([`Node::connect`]) and starts what runs beside the connections: the stream readers, the
//! kick and drain subscriptions, the JetStream probe and the [`crate::janitor`]. [`serve`]
//! then opens the listeners, hands every accepted connection to [`client::serve`] with its
//! [`crate::node::ConnContext`], answers `/healthz`, `/readyz` and `/metrics`, and shuts
//! down: gracefully on `drain` (`drain_clients`), at once on `shutdown`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use jetmq_common::http::{self, Response};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::client;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::node::{serve_kicks, Node};
use crate::retained;
use crate::routing;
use crate::routing::mailbox::{Control, MailboxSender};
use crate::transport::{self, Edge, Kind};

/// Starts the node and serves until `drain` (graceful: see `drain_clients`) or `shutdown`
/// (immediate) is cancelled; called once by `main`.
pub async fn run(
    config: Config,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Certificates and keys first: a typo in a path should not wait for NATS.
    let edge = Edge::new(&config)?;
    let node = start(config, drain, shutdown).await?;
    serve(node, edge).await
}

/// Builds the node and starts its background tasks; returns once retained messages are
/// loaded (or after 30 s), so that the node is ready to serve.
pub async fn start(
    config: Config,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Node>> {
    let node = Arc::new(Node::connect(config, drain, shutdown.clone()).await?);
    let nodes_kv = cluster::with_retries("node bucket", || {
        jetmq_common::streams::ensure_kv_bucket(
            &node.cluster.js,
            jetmq_common::streams::NODE_BUCKET,
            node_replicas(&node.cluster),
            crate::janitor::NODE_TTL,
            64 * 1024,
        )
    })
    .await?;

    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    spawn_critical(
        "retained reader",
        retained::run_retained_reader(
            node.retained.clone(),
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
            node.router.clone(),
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
    tokio::spawn(serve_kicks(node.registry.clone(), kicks));
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
    Ok(node)
}

/// Serves a started node: opens the health endpoint and the MQTT listeners of `edge`,
/// accepts connections until a drain or the hard stop, then sends the clients away
/// (waves, or at once) and returns once their sessions are written back. Err when the
/// drain's deadline cut it short or a listener could not be opened.
pub async fn serve(node: Arc<Node>, edge: Arc<Edge>) -> anyhow::Result<()> {
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
    edge.spawn_reloader(node.shutdown.clone());
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
    node.shutdown.cancel();
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
        let context = node.context.clone();
        let edge = edge.clone();
        let task = async move {
            // TLS / WebSocket handshake, bounded by limits.connect_timeout_ms.
            // Boxed: the TLS / WebSocket handshake state is large and needed only briefly.
            if let Some((stream, peer_info)) = Box::pin(edge.upgrade(kind, stream, peer)).await {
                Box::pin(client::serve(context, stream, peer_info)).await;
            }
            drop(per_ip);
            drop(permit);
        };
        node.connections.spawn(task);
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
    let total = node.registry.len();
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
            let remaining = node.registry.connections_except(&signalled);
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
        let late = node.registry.connections_except(&signalled);
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

/// Health, readiness and metrics (see [`jetmq_common::http`]) until the node shuts down.
async fn serve_http(node: Arc<Node>, listener: TcpListener) {
    let shutdown = node.shutdown.clone();
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = http::serve(listener, move |path| answer_http(&node, path)) => {}
    }
}

fn answer_http(node: &Node, path: &str) -> Response {
    match path {
        "/healthz" => Response::text(http::Status::Ok, "ok\n"),
        "/readyz" => {
            let connected =
                node.cluster.client.connection_state() == async_nats::connection::State::Connected;
            Response::readiness(
                node.ready.load(Ordering::Acquire)
                    && connected
                    && node.jetstream_ok.load(Ordering::Acquire),
            )
        }
        "/metrics" => Response::metrics(
            node.metrics
                .render(node.router.subscription_count(), node.registry.len()),
        ),
        _ => Response::not_found(),
    }
}

pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}
