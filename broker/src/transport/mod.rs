//! Transports: what turns an accepted TCP socket into the MQTT byte stream that
//! [`crate::client::serve`] reads — plain TCP, TLS, WebSocket, WebSocket over TLS — and the
//! protection that applies before and below MQTT: the handshake timeout, the node-wide
//! CONNECT rate and per-connection read limits.
//!
//! Every accepted socket goes through [`Edge::upgrade`]; the result is one [`Stream`] type
//! whatever the transport, so the client code exists once, and a [`PeerInfo`]: what the
//! transport learned about the peer (its address, the username of a verified client
//! certificate, its per-user read budget). The server passes both to
//! [`crate::client::serve`], which hands the peer info on to the CONNECT handling.

pub mod limit;
pub mod tls;
pub mod websocket;

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use jetmq_codec::{ConnAck, ConnAckProperties, Packet, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ListenConfig};
use crate::connection::{FrameReader, FrameWriter};

/// Connections refused for the CONNECT rate that still get a CONNACK; beyond this many at
/// once, refused sockets are simply closed.
const POLITE_REFUSALS: usize = 16;
/// How long a refused connection may take to send its CONNECT.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest CONNECT read from a connection that is being refused.
const REFUSAL_MAX_PACKET: usize = 16 * 1024;
/// How long a TLS or WebSocket close may wait for a peer that does not read (the closing
/// message has to be written); after that the socket is just dropped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The MQTT listeners `listen` asks for.
pub fn listeners(listen: &ListenConfig) -> Vec<(Kind, SocketAddr)> {
    [
        (Kind::Tcp, listen.tcp),
        (Kind::Tls, listen.tls),
        (Kind::Ws, listen.ws),
        (Kind::Wss, listen.wss),
    ]
    .into_iter()
    .filter_map(|(kind, addr)| addr.map(|a| (kind, a)))
    .collect()
}

/// What the transport knows about the peer: made by [`Edge::upgrade`], passed to
/// [`crate::client::serve`] with the stream, used for logging and authentication.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's socket address.
    pub addr: SocketAddr,
    pub transport: Kind,
    /// From a client certificate that passed verification (`tls.username_from_cert`).
    pub cert_username: Option<String>,
    /// Where the authenticated username's shared read budget goes (None: no per-user
    /// limits configured).
    pub user_limit: Option<UserLimit>,
}

/// A connection's hook into the per-username read budgets (see [`limit::UserBudgets`]).
#[derive(Debug, Clone)]
pub struct UserLimit {
    budgets: Arc<limit::UserBudgets>,
    slot: limit::UserSlot,
}

impl PeerInfo {
    /// From now on, reads of this connection also count against `username`'s budget.
    pub fn attach_user(&self, username: &str) {
        if let Some(limit) = &self.user_limit {
            if let Some(budget) = limit.budgets.budget(username) {
                // Set once per connection: CONNECT comes once.
                let _ = limit.slot.set(budget);
            }
        }
    }
}

/// Everything listeners share: TLS state, limits.
pub struct Edge {
    tls: Option<Arc<tls::TlsState>>,
    ws_path: String,
    max_packet_size: u32,
    handshake_timeout: Duration,
    connect_rate: limit::ConnectRate,
    refusals: Arc<Semaphore>,
    publish_rate: u32,
    bytes_rate: u64,
    per_ip: Option<Arc<limit::PerIp>>,
    users: Arc<limit::UserBudgets>,
}

impl Edge {
    /// Loads certificates if a TLS listener is configured (errors name the file).
    pub fn new(config: &Config) -> anyhow::Result<Arc<Edge>> {
        let listen = &config.listen;
        let tls = if listen.tls.is_some() || listen.wss.is_some() {
            Some(Arc::new(tls::TlsState::load(&config.tls)?))
        } else {
            None
        };
        let limits = &config.limits;
        Ok(Arc::new(Edge {
            tls,
            ws_path: listen.ws_path.clone(),
            max_packet_size: limits.max_packet_size,
            handshake_timeout: Duration::from_millis(limits.connect_timeout_ms),
            connect_rate: limit::ConnectRate::new(limits.max_connect_rate),
            refusals: Arc::new(Semaphore::new(POLITE_REFUSALS)),
            publish_rate: limits.max_publish_rate,
            bytes_rate: limits.max_inbound_bytes_rate,
            per_ip: limit::PerIp::new(
                limits.max_connections_per_ip,
                limits.max_connect_rate_per_ip,
            ),
            users: Arc::new(limit::UserBudgets::new(
                limits.max_user_publish_rate,
                limits.max_user_inbound_bytes_rate,
            )),
        }))
    }

    /// Reloads certificates on SIGHUP and, every `tls.reload_interval_secs`, when the files
    /// changed. SIGHUP never stops the node, TLS or not.
    pub fn spawn_reloader(self: &Arc<Self>, shutdown: CancellationToken) {
        let tls = self.tls.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hangup = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot handle SIGHUP; certificates reload only on file change");
                    return reload_loop(tls, None, shutdown).await;
                }
            };
            reload_loop(tls, Some(&mut hangup), shutdown).await;
        });
    }

    /// False when the node-wide CONNECT rate is exceeded.
    pub fn admit_connection(&self) -> bool {
        self.connect_rate.admit()
    }

    /// Counts a new connection against the per-source-address limits; the guard holds its
    /// place until the connection ends. Ok(None) when those limits are off.
    pub fn admit_peer(
        &self,
        peer: SocketAddr,
    ) -> Result<Option<limit::PerIpGuard>, limit::PerIpRefusal> {
        match &self.per_ip {
            None => Ok(None),
            Some(per_ip) => per_ip.admit(peer.ip()).map(Some),
        }
    }

    /// Answers a connection over the CONNECT rate with CONNACK 0x9F (3.1.1: return code 3,
    /// server unavailable) if a refusal slot is free, else closes it at once.
    pub fn refuse(self: &Arc<Self>, kind: Kind, stream: TcpStream, peer: SocketAddr) {
        self.refuse_with(
            kind,
            stream,
            peer,
            ReasonCode::CONNECTION_RATE_EXCEEDED,
            "CONNECT rate exceeded",
        );
    }

    /// Answers a connection refused by the per-source-address limits: too many open from
    /// its address gets CONNACK 0x97 quota exceeded, too many new ones per second 0x9F
    /// connection rate exceeded (3.1.1: return code 3 for both); closed at once when no
    /// refusal slot is free, like [`Edge::refuse`].
    pub fn refuse_peer(
        self: &Arc<Self>,
        kind: Kind,
        stream: TcpStream,
        peer: SocketAddr,
        why: limit::PerIpRefusal,
    ) {
        let (reason, what) = match why {
            limit::PerIpRefusal::TooMany => (
                ReasonCode::QUOTA_EXCEEDED,
                "limits.max_connections_per_ip reached",
            ),
            limit::PerIpRefusal::TooFast => (
                ReasonCode::CONNECTION_RATE_EXCEEDED,
                "limits.max_connect_rate_per_ip exceeded",
            ),
        };
        self.refuse_with(kind, stream, peer, reason, what);
    }

    fn refuse_with(
        self: &Arc<Self>,
        kind: Kind,
        stream: TcpStream,
        peer: SocketAddr,
        reason: ReasonCode,
        what: &'static str,
    ) {
        let Ok(slot) = self.refusals.clone().try_acquire_owned() else {
            tracing::debug!(%peer, transport = %kind, "{what}; closing");
            return;
        };
        tracing::debug!(%peer, transport = %kind, "{what}; refusing");
        let edge = self.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
                if let Some((stream, _)) = edge.upgrade(kind, stream, peer).await {
                    refuse_connect(stream, reason).await;
                }
            })
            .await;
            drop(slot);
        });
    }

    /// Runs the transport's handshake (bounded by `limits.connect_timeout_ms`). None: the
    /// peer failed it or was too slow; the reason is logged at debug level (port scanners
    /// and health checks are not news).
    pub async fn upgrade(
        &self,
        kind: Kind,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(Stream, PeerInfo)> {
        let handshake = self.handshake(kind, stream, peer);
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(upgraded)) => Some(upgraded),
            Ok(Err(err)) => {
                tracing::debug!(%peer, transport = %kind, error = %err, "handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, transport = %kind, "handshake timed out");
                None
            }
        }
    }

    async fn handshake(
        &self,
        kind: Kind,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> anyhow::Result<(Stream, PeerInfo)> {
        let mut info = PeerInfo {
            addr: peer,
            transport: kind,
            cert_username: None,
            user_limit: None,
        };
        let inner = match kind {
            Kind::Tcp => Inner::Tcp(stream),
            Kind::Tls => {
                let tls = self.tls_accept(stream, &mut info).await?;
                Inner::Tls(Box::new(tls))
            }
            Kind::Ws => Inner::Ws(Box::new(
                websocket::accept(stream, &self.ws_path, self.max_packet_size).await?,
            )),
            Kind::Wss => {
                let tls = self.tls_accept(stream, &mut info).await?;
                Inner::Wss(Box::new(
                    websocket::accept(tls, &self.ws_path, self.max_packet_size).await?,
                ))
            }
        };
        let user_slot = self.users.enabled().then(|| {
            let slot = limit::UserSlot::default();
            info.user_limit = Some(UserLimit {
                budgets: self.users.clone(),
                slot: slot.clone(),
            });
            slot
        });
        let limited = limit::ReadLimiter::with_user(self.publish_rate, self.bytes_rate, user_slot)
            .map(|limiter| {
                Box::new(Limited {
                    limiter,
                    sleep: None,
                })
            });
        Ok((
            Stream {
                inner,
                needs_flush: false,
                limited,
                shutdown_deadline: None,
            },
            info,
        ))
    }

    async fn tls_accept(
        &self,
        stream: TcpStream,
        info: &mut PeerInfo,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        let Some(state) = &self.tls else {
            anyhow::bail!("no TLS configuration");
        };
        let tls = tokio_rustls::TlsAcceptor::from(state.server_config())
            .accept(stream)
            .await?;
        info.cert_username = state.cert_username(tls.get_ref().1);
        Ok(tls)
    }
}

async fn reload_loop(
    tls: Option<Arc<tls::TlsState>>,
    mut hangup: Option<&mut tokio::signal::unix::Signal>,
    shutdown: CancellationToken,
) {
    let interval = tls.as_ref().and_then(|t| t.reload_interval());
    let mut tick = interval.map(|every| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    loop {
        let signalled = tokio::select! {
            _ = shutdown.cancelled() => return,
            got = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if got.is_none() {
                    hangup = None;
                    continue;
                }
                true
            }
            _ = async {
                match tick.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => false,
        };
        let Some(state) = tls.clone() else {
            tracing::info!("SIGHUP: no TLS listener, nothing to reload");
            continue;
        };
        match tokio::task::spawn_blocking(move || state.reload()).await {
            Ok(Ok(true)) => tracing::info!("TLS certificates reloaded; new handshakes use them"),
            Ok(Ok(false)) if signalled => {
                tracing::info!("SIGHUP: TLS certificate files unchanged")
            }
            Ok(Ok(false)) => {}
            Ok(Err(err)) => tracing::error!(
                error = format!("{err:#}"),
                "TLS reload failed; keeping the previous certificates"
            ),
            Err(err) => tracing::error!(error = %err, "TLS reload task failed"),
        }
    }
}

async fn refuse_connect(stream: Stream, reason: ReasonCode) {
    let (read, write) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read, REFUSAL_MAX_PACKET);
    let mut writer = FrameWriter::new(write);
    if let Ok(Packet::Connect(connect)) = reader.next().await {
        writer.version = connect.protocol;
        let refusal = Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason,
            properties: ConnAckProperties::default(),
        }));
        if writer.queue(&refusal).is_ok() {
            let _ = writer.flush().await;
        }
    }
    writer.shutdown().await;
}

/// Any transport's connection, as the MQTT byte stream.
pub struct Stream {
    inner: Inner,
    /// A buffering transport (TLS, WebSocket) holds bytes it accepted but could not send
    /// yet. The client loop only writes while it has bytes of its own, so those bytes are
    /// pushed out from `poll_read` too, which the loop always polls.
    needs_flush: bool,
    limited: Option<Box<Limited>>,
    /// Started by the first `poll_shutdown` of a buffering transport.
    shutdown_deadline: Option<Pin<Box<Sleep>>>,
}

enum Inner {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<websocket::WsStream<TcpStream>>),
    Wss(Box<websocket::WsStream<TlsStream<TcpStream>>>),
}

struct Limited {
    limiter: limit::ReadLimiter,
    /// Set while the connection is over its budget: no reading until it fires.
    sleep: Option<Pin<Box<Sleep>>>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Inner {
    fn io(&mut self) -> Pin<&mut dyn Io> {
        match self {
            Inner::Tcp(s) => Pin::new(s),
            Inner::Tls(s) => Pin::new(s.as_mut()),
            Inner::Ws(s) => Pin::new(s.as_mut()),
            Inner::Wss(s) => Pin::new(s.as_mut()),
        }
    }

    fn buffers(&self) -> bool {
        !matches!(self, Inner::Tcp(_))
    }
}

impl Stream {
    pub fn kind(&self) -> Kind {
        match self.inner {
            Inner::Tcp(_) => Kind::Tcp,
            Inner::Tls(_) => Kind::Tls,
            Inner::Ws(_) => Kind::Ws,
            Inner::Wss(_) => Kind::Wss,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.needs_flush {
            // An error here shows up on the next write; reading goes on.
            if let Poll::Ready(Ok(())) = this.inner.io().poll_flush(cx) {
                this.needs_flush = false;
            }
        }
        if let Some(limited) = &mut this.limited {
            if let Some(sleep) = &mut limited.sleep {
                ready!(sleep.as_mut().poll(cx));
                limited.sleep = None;
            }
        }
        let Some(limited) = &mut this.limited else {
            return this.inner.io().poll_read(cx, buf);
        };
        let before = buf.filled().len();
        let allowance = if limited.limiter.limits_bytes() {
            limited.limiter.allowance(buf.remaining())
        } else {
            buf.remaining()
        };
        if allowance < buf.remaining() {
            // Read no more than the byte budget, through a bounce buffer.
            let mut bounce = [0u8; limit::MAX_LIMITED_READ];
            let mut part = ReadBuf::new(&mut bounce[..allowance]);
            ready!(this.inner.io().poll_read(cx, &mut part))?;
            buf.put_slice(part.filled());
        } else {
            ready!(this.inner.io().poll_read(cx, buf))?;
        }
        if let Some(delay) = limited.limiter.account(&buf.filled()[before..]) {
            limited.sleep = Some(Box::pin(tokio::time::sleep(delay)));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.inner.buffers() {
            return this.inner.io().poll_write(cx, buf);
        }
        // Nothing new is taken while older bytes are stuck: that keeps the transport's own
        // buffer at one write and lets the caller's write buffer limit work.
        if this.needs_flush {
            ready!(this.inner.io().poll_flush(cx))?;
            this.needs_flush = false;
        }
        let n = ready!(this.inner.io().poll_write(cx, buf))?;
        match this.inner.io().poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) | Poll::Pending => this.needs_flush = true,
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.inner.io().poll_flush(cx))?;
        this.needs_flush = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.inner.buffers() {
            return this.inner.io().poll_shutdown(cx);
        }
        if let Poll::Ready(done) = this.inner.io().poll_shutdown(cx) {
            return Poll::Ready(done);
        }
        // close_notify or the Close frame cannot be written: the peer is not reading.
        let deadline = this
            .shutdown_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(SHUTDOWN_TIMEOUT)));
        ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};
    use tokio_rustls::rustls;

    const TOTAL: usize = 1 << 20;

    /// A listener whose accepted sockets have a small send buffer, and a client socket with
    /// a small receive buffer: writes back up after a few kB.
    async fn tight_pair() -> (TcpStream, TcpStream) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(4096).expect("sndbuf");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener: TcpListener = socket.listen(8).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let client = TcpSocket::new_v4().expect("socket");
        client.set_recv_buffer_size(4096).expect("rcvbuf");
        let (client, accepted) = tokio::join!(client.connect(addr), listener.accept());
        (accepted.expect("accept").0, client.expect("connect"))
    }

    /// Writes `TOTAL` bytes the way the client loop does (write until its own buffer is
    /// empty, never flush), then only reads, as an idle connection does. The peer, which
    /// starts reading late, must still get every byte.
    async fn tail_goes_out_while_only_reading<F>(server: Stream, receive: F)
    where
        F: std::future::Future<Output = usize> + Send + 'static,
    {
        let receiver = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            receive.await
        });
        let (mut read, mut write) = tokio::io::split(server);
        let data = vec![7u8; TOTAL];
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = write.write(rest).await.expect("write");
            rest = &rest[n..];
        }
        // The read ends when the peer closes, after it has received what it will get.
        let mut byte = [0u8; 1];
        let idle = tokio::time::timeout(Duration::from_secs(20), read.read(&mut byte));
        let (_, received) = tokio::join!(idle, receiver);
        assert_eq!(received.expect("receiver"), TOTAL);
    }

    fn tls_pair_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    #[tokio::test]
    async fn tls_bytes_taken_by_a_write_are_sent_while_the_connection_only_reads() {
        let (server_tcp, client_tcp) = tight_pair().await;
        let (server_config, client_config) = tls_pair_configs();
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(server_config).accept(server_tcp),
            tokio_rustls::TlsConnector::from(client_config).connect(name, client_tcp)
        );
        let server = Stream {
            inner: Inner::Tls(Box::new(server.expect("server handshake"))),
            needs_flush: false,
            limited: None,
            shutdown_deadline: None,
        };
        let mut client = client.expect("client handshake");
        tail_goes_out_while_only_reading(server, async move {
            let mut got = 0;
            let mut buf = vec![0u8; 4096];
            while got < TOTAL {
                match tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => got += n,
                    _ => break,
                }
            }
            got
        })
        .await;
    }

    #[tokio::test]
    async fn closing_towards_a_peer_that_never_reads_gives_up() {
        let (server_tcp, client_tcp) = tight_pair().await;
        let (server_config, client_config) = tls_pair_configs();
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(server_config).accept(server_tcp),
            tokio_rustls::TlsConnector::from(client_config).connect(name, client_tcp)
        );
        let _client = client.expect("client handshake"); // never reads
        let mut server = Stream {
            inner: Inner::Tls(Box::new(server.expect("server handshake"))),
            needs_flush: false,
            limited: None,
            shutdown_deadline: None,
        };
        let data = vec![7u8; TOTAL];
        let _ = tokio::time::timeout(Duration::from_millis(500), server.write_all(&data)).await;
        let started = std::time::Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
        assert!(closed.is_ok(), "shutdown hung");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn websocket_bytes_taken_by_a_write_are_sent_while_the_connection_only_reads() {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let (server_tcp, client_tcp) = tight_pair().await;
        let request = "ws://localhost/mqtt"
            .into_client_request()
            .expect("request");
        let (server, client) = tokio::join!(
            websocket::accept(server_tcp, "/mqtt", 1 << 20),
            tokio_tungstenite::client_async(request, client_tcp)
        );
        let server = Stream {
            inner: Inner::Ws(Box::new(server.expect("server upgrade"))),
            needs_flush: false,
            limited: None,
            shutdown_deadline: None,
        };
        let (mut client, _) = client.expect("client upgrade");
        tail_goes_out_while_only_reading(server, async move {
            let mut got = 0;
            while got < TOTAL {
                match tokio::time::timeout(Duration::from_secs(5), client.next()).await {
                    Ok(Some(Ok(message))) => got += message.into_data().len(),
                    _ => break,
                }
            }
            got
        })
        .await;
    }
}
