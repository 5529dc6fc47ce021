//! The node: start-up, listeners, health endpoint, shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use jetmq_codec::ReasonCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::authn::Authenticator;
use crate::client;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::ingress::Ingress;
use crate::retained::{self, RetainedCache};
use crate::routing::shared::SharedGroups;
use crate::routing::{self, ReplayRing, Router};
use crate::telemetry::Metrics;
use crate::transport::{self, Edge, Kind};

/// Sent to a connection by whoever needs it gone.
#[derive(Debug, Clone, Copy)]
pub enum Control {
    /// Another connection took the session over.
    TakenOver,
    /// The node is shutting down.
    Shutdown,
}

pub struct LocalClient {
    pub connection: u64,
    pub control: mpsc::Sender<Control>,
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
    pub shutdown: CancellationToken,
}

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
                let _ = local.control.try_send(Control::TakenOver);
            }
        }
    }
}

/// Starts the node and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    // Certificates and keys first: a typo in a path should not wait for NATS.
    let edge = Edge::new(&config)?;
    let authn = Authenticator::new(&config.auth)?;
    let cluster = cluster::connect(&config).await?;
    let start = cluster::with_retries("message stream state", || {
        let stream = cluster.messages.clone();
        async move { stream.get_info().await }
    })
    .await
    .context("cannot read message stream state")?
    .state
    .last_sequence;
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
    let ingress = Ingress {
        client: cluster.client.clone(),
        js: cluster.js.clone(),
        retained: retained.clone(),
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
        shutdown: shutdown.clone(),
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
    // One connection limit for all listeners together.
    let permits = Arc::new(Semaphore::new(node.config.limits.max_connections));
    let loops = listeners.into_iter().map(|(kind, addr, listener)| {
        tracing::info!(%addr, transport = %kind, node_id = %node.config.node_id, "MQTT listener ready");
        accept_loop(node.clone(), listener, kind, edge.clone(), permits.clone())
    });
    futures::future::join_all(loops).await;

    node.ready.store(false, Ordering::Release);
    disconnect_all(&node).await;
    // With NATS unreachable a flush would wait forever; shutdown must not.
    match tokio::time::timeout(Duration::from_secs(5), node.cluster.client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "NATS flush on shutdown failed"),
        Err(_) => tracing::warn!("NATS flush on shutdown timed out"),
    }
    Ok(())
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
) {
    loop {
        let accepted = tokio::select! {
            _ = node.shutdown.cancelled() => return,
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
        if !edge.admit_connection() {
            drop(permit);
            edge.refuse(kind, stream, peer);
            continue;
        }
        let node = node.clone();
        let edge = edge.clone();
        let task = async move {
            // TLS / WebSocket handshake, bounded by limits.connect_timeout_ms.
            // Boxed: the TLS / WebSocket handshake state is large and needed only briefly.
            if let Some((stream, peer_info)) = Box::pin(edge.upgrade(kind, stream, peer)).await {
                transport::scope(peer_info, Box::pin(client::serve(node, stream, peer))).await;
            }
            drop(permit);
        };
        tokio::spawn(task);
    }
}

async fn disconnect_all(node: &Node) {
    let controls: Vec<mpsc::Sender<Control>> = node
        .clients
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|c| c.control.clone())
        .collect();
    for control in &controls {
        let _ = control.try_send(Control::Shutdown);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if node
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve_kicks(node: Arc<Node>, mut kicks: async_nats::Subscriber) {
    while let Some(message) = kicks.next().await {
        let Ok(text) = std::str::from_utf8(&message.payload) else {
            continue;
        };
        let Some((connection, client_id)) = text.split_once('\n') else {
            continue;
        };
        let Ok(connection) = connection.parse() else {
            continue;
        };
        node.kick_local(client_id, connection);
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
            if node.ready.load(Ordering::Acquire) && connected {
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
