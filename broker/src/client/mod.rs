//! One MQTT connection, from CONNECT to close: where packets enter the broker.
//!
//! [`serve`] runs the handshake, claims the session and then drives a single loop that
//! waits on the socket, on deliveries from the router, on JetStream acknowledgements, on
//! session writes and on timers. All per-connection state lives in [`Client`]; nothing in
//! it is needed after the connection ends, because whatever must survive is in the
//! session record.
//!
//! It stays one file of about 700 lines because its heart is that one `select!` loop
//! (`run_loop`, 175 lines) and the handshake that sets up what the loop reads; the
//! handling of each packet kind already lives in the child modules.

mod close;
mod connect;
mod fresh_retained;
mod inbound;
mod outbound;
mod persist;
mod subscriptions;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use jetmq_codec::{Disconnect, Packet, ProtocolVersion, ReasonCode};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::connection::{FrameReader, FrameWriter, ReadError, Transport};
use crate::node::{control_reason, ConnContext, LocalClient};
use crate::routing::mailbox::{mailbox, Control, MailboxReceiver, MailboxSender};
use crate::routing::{SessionKey, SessionLink, SubEntry, NOT_LAGGED};
use crate::session::SessionRecord;
use crate::transport::PeerInfo;

use crate::session::delivery::{AckKind, DeliveryState};
use inbound::PendingAck;
use persist::AfterPersist;

/// How often the session's position is written back while it changes.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// Deliveries buffered between the router and one connection.
const ROUTER_QUEUE: usize = 256;
/// Outgoing bytes above which we stop taking new deliveries until the socket drains.
const WRITE_SOFT_LIMIT: usize = 64 * 1024;
/// How long a drained connection waits for the acknowledgements in flight (JetStream acks of
/// its PUBLISHes, the client's PUBACKs) before it says goodbye. Whatever is still open then
/// is resent after the client reconnects: duplicates, never losses.
const DRAIN_SETTLE: Duration = Duration::from_secs(2);

/// Why the loop ended.
#[derive(Debug)]
enum Exit {
    /// DISCONNECT from the client; `publish_will` for reason 0x04.
    Disconnect {
        publish_will: bool,
    },
    /// Socket closed, keep alive expired, protocol error: the will goes out.
    Abnormal,
    /// Another connection owns the session now; leave the record alone.
    TakenOver,
    Shutdown,
}

pub(crate) struct Client<R, W> {
    context: Arc<ConnContext>,
    reader: FrameReader<R>,
    writer: FrameWriter<W>,
    peer: SocketAddr,
    v5: bool,
    client_id: Arc<str>,
    username: Option<String>,
    connection: u64,
    session_key: SessionKey,
    keep_alive: Duration,
    last_packet_at: Instant,
    /// When the client's token expires: the connection ends then (MQTT 5: DISCONNECT 0xA0).
    credentials_expire: Option<Instant>,
    /// When the packet now partly buffered began to arrive (see `limits.packet_read_timeout_ms`).
    partial_since: Option<Instant>,

    // The session record as last written, and its revision (for compare-and-set).
    record: SessionRecord,
    revision: u64,

    // Deliveries towards the client.
    deliveries: MailboxReceiver,
    /// The sending side of `deliveries`, for shared-subscription groups.
    delivery_tx: MailboxSender,
    lagged: Arc<AtomicU64>,
    subscriptions: Vec<(String, SubEntry)>,
    delivery: DeliveryState,
    replay: Option<outbound::ReplayFuture>,
    aliases_out: HashMap<String, u16>,
    alias_out_max: u16,
    /// Retained messages just sent to new subscriptions whose live copies may follow.
    fresh_retained: Option<Box<fresh_retained::FreshRetained>>,

    // PUBLISHes from the client.
    acks: FuturesOrdered<PendingAck>,
    /// Keeps this client's messages published one by one in order when some go again.
    publish_order: crate::ingress::PublishOrder,
    inbound_unacked: usize,
    aliases_in: HashMap<u16, String>,
    qos2_publishing: HashSet<u16>,
    /// QoS 2 messages this connection stored (PUBREC sent), awaiting PUBREL.
    qos2_stored: HashSet<u16>,

    // Session record writes.
    persist: Option<persist::PersistFuture>,
    waiting_for_persist: Vec<AfterPersist>,
    riding_on_persist: Vec<AfterPersist>,
    persisted_cursor: u64,
    /// Record fields changed that no pending write covers yet.
    record_dirty: bool,
    persist_failures: u32,
    /// Set when a drain asked this connection to leave: nothing new goes out, and the loop
    /// ends once what is in flight is acknowledged or this deadline passes.
    closing: Option<Instant>,
}

/// Serves one accepted socket until it closes: called by the server for every connection
/// once its transport handshake is done, with what the transport learned about the peer.
/// Never panics on client input; every way out is logged with the client id.
pub async fn serve<S: Transport>(context: Arc<ConnContext>, stream: S, peer: PeerInfo) {
    context.metrics.connections.inc();
    context.metrics.connections_total.inc();
    let (read_half, write_half) = tokio::io::split(stream);
    let reader = FrameReader::new(read_half, context.config.limits.max_packet_size as usize);
    let writer = FrameWriter::new(write_half);
    // Every log line about this connection carries the node and (once known) the client id.
    let span = tracing::info_span!(
        "client",
        node = %context.config.node_id,
        peer = %peer.addr,
        client_id = tracing::field::Empty
    );
    // The handshake's state (CONNECT packet, session claim) is large and short-lived: boxed,
    // so that it is freed once the session runs. A suspended future is as big as its
    // largest state, and an idle connection should pay only for waiting.
    // `let else`, not `if let`: an `if let` keeps its scrutinee (the `Option<Client>`) alive
    // to the end of its block, i.e. across every await below, and the future then holds
    // the client twice (1.3 KB more per connection).
    async {
        let Some(mut client) = Box::pin(handshake(context.clone(), reader, writer, peer)).await
        else {
            return;
        };
        let exit = client.run_loop().await;
        // By reference: the client stays where it is. Moved into the (boxed) future, it was
        // a second copy of the whole connection state per closing connection, and when
        // thousands close at once (a load balancer restart, a network cut) they all hold one
        // while their session writes wait for JetStream.
        Box::pin(client.finish(exit)).await;
    }
    .instrument(span)
    .await;
    context.metrics.connections.dec();
}

/// A connection past CONNACK.
type Established<S> = Client<ReadHalf<S>, WriteHalf<S>>;

async fn handshake<S: Transport>(
    context: Arc<ConnContext>,
    mut reader: FrameReader<ReadHalf<S>>,
    mut writer: FrameWriter<WriteHalf<S>>,
    peer_info: PeerInfo,
) -> Option<Established<S>> {
    let peer = peer_info.addr;
    let timeout = Duration::from_millis(context.config.limits.connect_timeout_ms);
    let first = match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within {timeout:?}; closing");
            return None;
        }
        Ok(Err(ReadError::Decode(jetmq_codec::DecodeError::UnsupportedProtocol {
            level,
            v5_shaped,
        }))) => {
            tracing::info!(%peer, level, v5_shaped, "unsupported protocol level; refusing");
            // The refusal in the form the client can read: MQTT 5's 0x84 for a CONNECT laid
            // out like MQTT 5, else 3.1.1's "unacceptable protocol level" ([MQTT-3.1.2-2]),
            // which is what mosquitto sends to every unknown level.
            writer.version = if v5_shaped {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V311
            };
            let _ = writer.queue(&connect::refusal(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION));
            let _ = writer.flush().await;
            return None;
        }
        Ok(Err(err)) => {
            context.metrics.protocol_errors.inc();
            tracing::info!(%peer, error = %err, "closing before CONNECT completed");
            return None;
        }
        Ok(Ok(packet)) => packet,
    };
    let Packet::Connect(connect) = first else {
        context.metrics.protocol_errors.inc();
        tracing::info!(%peer, packet = first.name(), "first packet was not CONNECT; closing");
        return None;
    };
    writer.version = connect.protocol;
    let admission = match Box::pin(connect::admit(&context, &connect, &peer_info)).await {
        Ok(admission) => admission,
        Err(reason) => {
            tracing::info!(%peer, client_id = %connect.client_id, reason = reason.0, "CONNECT refused");
            let _ = writer.queue(&connect::refusal(reason));
            let _ = writer.flush().await;
            return None;
        }
    };
    if let Some(max) = connect.properties.maximum_packet_size {
        writer.peer_max_packet_size = max as usize;
    }
    let connection = context.registry.next_id();
    let claim = match Box::pin(connect::claim_session(
        &context, &admission, &connect, connection,
    ))
    .await
    {
        Ok(claim) => claim,
        Err(err) => {
            tracing::warn!(%peer, client_id = %admission.client_id, error = %err, "cannot claim session; refusing");
            let _ = writer.queue(&connect::refusal(ReasonCode::SERVER_UNAVAILABLE));
            let _ = writer.flush().await;
            return None;
        }
    };
    let client_id: Arc<str> = Arc::from(admission.client_id.as_str());
    tracing::Span::current().record("client_id", &*client_id);
    let (tx, rx) = mailbox(ROUTER_QUEUE);
    if let Some(previous) = context.registry.register(
        admission.client_id.clone(),
        LocalClient {
            connection,
            control: tx.clone(),
        },
    ) {
        previous.control.order(Control::TakenOver);
    }
    if writer
        .queue(&connect::connack(
            &context,
            &connect,
            &admission,
            claim.session_present,
        ))
        .is_err()
    {
        return None;
    }
    tracing::debug!(%peer, client_id = %client_id, session_present = claim.session_present, "connected");

    let lagged = Arc::new(AtomicU64::new(NOT_LAGGED));
    let subscriptions = subscriptions::entries(&claim.record.subscriptions);
    let live_from = context.router.attach(
        connection,
        SessionLink {
            client_id: client_id.clone(),
            tx: tx.clone(),
            lagged: lagged.clone(),
        },
        &subscriptions,
    );
    let receive_maximum = connect.properties.receive_maximum.unwrap_or(u16::MAX);
    let limits = &context.config.limits;
    let mut delivery = DeliveryState::new(
        limits.max_queued_messages,
        limits.max_queued_bytes,
        usize::from(limits.max_inflight.min(receive_maximum)),
        claim.record.cursor,
        &claim.record.released,
        if claim.session_present {
            // Unknown after a crash: anything up to where this node's stream is now.
            claim.record.cursor + 1..=claim.sent_upto.unwrap_or(live_from)
        } else {
            std::ops::RangeInclusive::new(1, 0)
        },
    );
    delivery.replay_upto = Some(live_from);
    let mut client = Client {
        context: context.clone(),
        reader,
        writer,
        peer,
        v5: connect.protocol.is_v5(),
        client_id: client_id.clone(),
        username: admission.username.clone(),
        connection,
        session_key: connection,
        keep_alive: Duration::from_secs(u64::from(admission.keep_alive)),
        last_packet_at: Instant::now(),
        partial_since: None,
        credentials_expire: admission.expires_at.map(unix_secs_to_instant),
        persisted_cursor: claim.record.cursor,
        record_dirty: false,
        delivery,
        record: claim.record,
        revision: claim.revision,
        deliveries: rx,
        delivery_tx: tx,
        lagged,
        subscriptions,
        replay: None,
        aliases_out: HashMap::new(),
        alias_out_max: connect.properties.topic_alias_maximum.unwrap_or(0),
        fresh_retained: None,
        acks: FuturesOrdered::new(),
        publish_order: Default::default(),
        inbound_unacked: 0,
        aliases_in: HashMap::new(),
        qos2_publishing: HashSet::new(),
        qos2_stored: HashSet::new(),
        persist: None,
        waiting_for_persist: Vec::new(),
        riding_on_persist: Vec::new(),
        persist_failures: 0,
        closing: None,
    };
    client.resend_released();
    client.join_shared();
    Some(client)
}

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    async fn run_loop(&mut self) -> Exit {
        let mut persist_tick = tokio::time::interval(PERSIST_INTERVAL);
        persist_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stall_limit = self.context.config.limits.max_write_buffer;
        let packet_read_timeout =
            Duration::from_millis(self.context.config.limits.packet_read_timeout_ms);
        // Both futures live as long as the loop. Made afresh in every pass they cost a
        // registration and a removal each time: a keep-alive timer is an insert into and a
        // removal from the timer wheel per packet. The shutdown future is polled in every
        // pass and takes its token's lock each time; a child token of our own keeps that
        // lock out of reach of the node's other connections.
        let shutdown = self.context.shutdown.child_token().cancelled_owned();
        tokio::pin!(shutdown);
        // Armed at the keep-alive deadline as it was then; packets since only move the
        // deadline later, so when it fires it is checked and moved on, at most once per
        // keep-alive period.
        let keep_alive_timer = tokio::time::sleep_until(self.keep_alive_deadline());
        tokio::pin!(keep_alive_timer);
        loop {
            if let Some(deadline) = self.closing {
                if (self.acks.is_empty() && self.delivery.inflight() == 0)
                    || Instant::now() >= deadline
                {
                    self.send_drain_disconnect();
                    return Exit::Shutdown;
                }
            } else {
                self.pump();
                self.check_lag();
                self.maybe_start_replay();
            }
            self.maybe_start_persist(false);
            if self.writer.pending() > stall_limit {
                tracing::info!(client_id = %self.client_id, bytes = self.writer.pending(), "client is not reading; disconnecting");
                return Exit::Abnormal;
            }
            // Keep alive alone does not stop a client that trickles a packet a byte at a
            // time (every byte counts as activity): each packet must also arrive in time.
            let packet_deadline = self.partial_since.map(|since| since + packet_read_timeout);
            let accept_deliveries = self.closing.is_none()
                && self.delivery.replay_upto.is_none()
                && !self.delivery.is_full()
                && self.writer.pending() < WRITE_SOFT_LIMIT;
            // While writes are stuck (a session store election), a client that keeps asking
            // for things that need one is not read from: the queue stays bounded.
            let reads_paused = self.waiting_for_persist.len() >= persist::MAX_WAITING_FOR_PERSIST;
            tokio::select! {
                read = self.reader.fill(), if !reads_paused => {
                    if let Err(err) = read {
                        return self.read_failed(err);
                    }
                    let now = Instant::now();
                    self.last_packet_at = now;
                    let mut completed = false;
                    loop {
                        match self.reader.try_next() {
                            Ok(Some(packet)) => {
                                completed = true;
                                let Some(packet) = self.handle_packet_now(packet) else {
                                    continue;
                                };
                                if let Err(exit) = Box::pin(self.handle_packet(packet)).await {
                                    return exit;
                                }
                            }
                            Ok(None) => break,
                            Err(err) => return self.read_failed(ReadError::Decode(err)),
                        }
                    }
                    self.partial_since = match self.partial_since {
                        _ if !self.reader.has_partial_packet() => None,
                        Some(since) if !completed => Some(since),
                        _ => Some(now),
                    };
                }
                _ = sleep_until(packet_deadline) => {
                    self.context.metrics.protocol_errors.inc();
                    tracing::info!(client_id = %self.client_id, peer = %self.peer, timeout = ?packet_read_timeout, "packet not completed in time; disconnecting");
                    self.send_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT);
                    return Exit::Abnormal;
                }
                written = self.writer.write_some(), if self.writer.pending() > 0 => {
                    if let Err(err) = written {
                        tracing::debug!(client_id = %self.client_id, error = %err, "write failed");
                        return Exit::Abnormal;
                    }
                }
                delivery = self.deliveries.recv(), if accept_deliveries => {
                    self.accept_delivery(delivery);
                    while !self.delivery.is_full() {
                        match self.deliveries.try_recv() {
                            Some(delivery) => self.accept_delivery(delivery),
                            None => break,
                        }
                    }
                }
                Some(done) = self.acks.next() => {
                    if let Err(exit) = self.publish_acknowledged(done) {
                        return exit;
                    }
                    // JetStream acks arrive in bursts: answer every one that is ready now,
                    // so they leave in one write instead of one syscall each.
                    while let Some(Some(done)) = self.acks.next().now_or_never() {
                        if let Err(exit) = self.publish_acknowledged(done) {
                            return exit;
                        }
                    }
                }
                replayed = async { self.replay.as_mut().expect("guarded").await }, if self.replay.is_some() => {
                    self.replay = None;
                    self.replay_finished(replayed);
                }
                persisted = async { self.persist.as_mut().expect("guarded").await }, if self.persist.is_some() => {
                    self.persist = None;
                    if let Err(exit) = Box::pin(self.persist_finished(persisted)).await {
                        return exit;
                    }
                }
                // Only a session that can be resumed has a position worth writing. A clean
                // one (expiry 0) writes only when something waits for a write, and its
                // position matters only while it runs: a lag replay starts from where the
                // router dropped, not from it. Without this tick, 10,000 clean publishers
                // wake the node 10,000 times a second less.
                _ = persist_tick.tick(), if self.record.expiry_secs > 0 => {
                    self.advance_position();
                    self.maybe_start_persist(true);
                }
                _ = sleep_until(self.credentials_expire) => {
                    tracing::info!(client_id = %self.client_id, username = self.username.as_deref(), "token expired; disconnecting");
                    self.send_disconnect(ReasonCode::MAXIMUM_CONNECT_TIME);
                    return Exit::Abnormal;
                }
                _ = &mut keep_alive_timer, if !self.keep_alive.is_zero() => {
                    if reads_paused {
                        // The client's PINGREQs wait unread while this side does not read:
                        // its silence is ours. Counted from when reading resumes.
                        self.last_packet_at = Instant::now();
                    }
                    let deadline = self.keep_alive_deadline();
                    if Instant::now() >= deadline {
                        tracing::info!(client_id = %self.client_id, "keep alive expired");
                        self.send_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT);
                        return Exit::Abnormal;
                    }
                    keep_alive_timer.as_mut().reset(deadline);
                }
                _ = sleep_until(self.closing) => {}
                command = self.deliveries.control() => {
                    match command {
                        Control::TakenOver => {
                            if let Err(exit) = Box::pin(self.handle_arrived_packets()).await {
                                return exit;
                            }
                            self.send_disconnect(control_reason(Control::TakenOver));
                            tracing::info!(client_id = %self.client_id, "session taken over by a newer connection");
                            return Exit::TakenOver;
                        }
                        Control::Shutdown => {
                            if self.closing.is_none() {
                                tracing::debug!(client_id = %self.client_id, inflight = self.delivery.inflight(), "drain: settling before disconnect");
                                self.closing = Some(Instant::now() + DRAIN_SETTLE);
                            }
                        }
                    }
                }
                _ = &mut shutdown => {
                    self.send_drain_disconnect();
                    return Exit::Shutdown;
                }
            }
        }
    }

    /// When a client that has been silent since its last packet has been silent too long:
    /// one and a half times its keep alive (MQTT-3.1.2-24). Only meaningful for a non-zero
    /// keep alive.
    fn keep_alive_deadline(&self) -> Instant {
        self.last_packet_at + self.keep_alive + self.keep_alive / 2
    }

    /// Handles the packets that have already arrived. A client that says goodbye and
    /// connects again at once (DISCONNECT, perhaps with Session Expiry 0, then CONNECT on a
    /// new socket) must have its DISCONNECT honoured even when the new connection's takeover
    /// order is noticed first. Bounded: a flooding client cannot hold up the takeover.
    async fn handle_arrived_packets(&mut self) -> Result<(), Exit> {
        for _ in 0..16 {
            loop {
                match self.reader.try_next() {
                    Ok(Some(packet)) => Box::pin(self.handle_packet(packet)).await?,
                    Ok(None) => break,
                    Err(err) => return Err(self.read_failed(ReadError::Decode(err))),
                }
            }
            match self.reader.fill().now_or_never() {
                Some(Ok(())) => continue,
                // Closed or failed: the takeover goes on as ordered.
                Some(Err(_)) | None => return Ok(()),
            }
        }
        Ok(())
    }

    fn read_failed(&mut self, err: ReadError) -> Exit {
        match err {
            ReadError::Closed => {
                tracing::debug!(client_id = %self.client_id, "connection closed by client")
            }
            ReadError::Decode(err) => {
                self.context.metrics.protocol_errors.inc();
                tracing::info!(client_id = %self.client_id, peer = %self.peer, error = %err, "protocol violation; disconnecting");
                self.send_disconnect(err.reason_code());
            }
            other => {
                tracing::debug!(client_id = %self.client_id, error = %other, "connection lost")
            }
        }
        Exit::Abnormal
    }

    /// Closes with a reason: MQTT 5 clients get a DISCONNECT, 3.1.1 clients just the close.
    fn send_disconnect(&mut self, reason: ReasonCode) {
        if self.v5 {
            let _ = self
                .writer
                .queue(&Packet::Disconnect(Disconnect::new(reason)));
        }
    }

    /// The drain's goodbye: 0x9C with the configured Server Reference, else 0x8B.
    fn send_drain_disconnect(&mut self) {
        if !self.v5 {
            return;
        }
        let reference = self.context.config.drain.server_reference.clone();
        let reason = if reference.is_some() {
            ReasonCode::USE_ANOTHER_SERVER
        } else {
            ReasonCode::SERVER_SHUTTING_DOWN
        };
        let mut disconnect = Disconnect::new(reason);
        disconnect.properties.server_reference = reference;
        let _ = self.writer.queue(&Packet::Disconnect(disconnect));
    }

    fn protocol_error(&mut self, reason: ReasonCode, what: &str) -> Exit {
        self.context.metrics.protocol_errors.inc();
        tracing::info!(client_id = %self.client_id, peer = %self.peer, reason = reason.0, "{what}; disconnecting");
        self.send_disconnect(reason);
        Exit::Abnormal
    }

    /// Handles a packet that needs nothing awaited (acknowledgements, PINGREQ) at once and
    /// returns the others. Acknowledgements are half the packets of a busy connection, and
    /// this way they skip the boxed future that [`Self::handle_packet`] costs (an
    /// allocation and a copy of the whole future, which profiles showed).
    fn handle_packet_now(&mut self, packet: Packet) -> Option<Packet> {
        match packet {
            Packet::PubAck(ack) => self.outgoing_acked(ack.packet_id, AckKind::PubAck, ack.reason),
            Packet::PubRec(rec) => self.outgoing_acked(rec.packet_id, AckKind::PubRec, rec.reason),
            Packet::PubComp(comp) => {
                self.outgoing_acked(comp.packet_id, AckKind::PubComp, comp.reason)
            }
            Packet::PubRel(rel) => self.handle_pubrel(rel.packet_id),
            Packet::PingReq => {
                let _ = self.writer.queue(&Packet::PingResp);
            }
            other => return Some(other),
        }
        None
    }

    /// Handles any packet; callers try [`Self::handle_packet_now`] first.
    async fn handle_packet(&mut self, packet: Packet) -> Result<(), Exit> {
        let Some(packet) = self.handle_packet_now(packet) else {
            return Ok(());
        };
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish).await,
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe) => {
                self.handle_unsubscribe(unsubscribe);
                Ok(())
            }
            Packet::Disconnect(disconnect) => {
                if let Some(expiry) = disconnect.properties.session_expiry_interval {
                    if self.record.expiry_secs == 0 && expiry != 0 {
                        return Err(self.protocol_error(
                            ReasonCode::PROTOCOL_ERROR,
                            "DISCONNECT set a session expiry on a session that had none",
                        ));
                    }
                    self.record.expiry_secs =
                        expiry.min(self.context.config.limits.max_session_expiry);
                }
                Err(Exit::Disconnect {
                    publish_will: disconnect.reason == ReasonCode::DISCONNECT_WITH_WILL,
                })
            }
            Packet::Connect(_) => {
                Err(self.protocol_error(ReasonCode::PROTOCOL_ERROR, "second CONNECT"))
            }
            Packet::Auth(_) => Err(self.protocol_error(
                ReasonCode::PROTOCOL_ERROR,
                "AUTH without an authentication method",
            )),
            other => Err(self.protocol_error(
                ReasonCode::PROTOCOL_ERROR,
                &format!("client sent server-only packet {}", other.name()),
            )),
        }
    }

    /// Cleans up after the loop: the will, the session record, the router and registry.
    async fn finish(&mut self, exit: Exit) {
        self.context.router.detach(
            self.session_key,
            self.subscriptions.iter().map(|(f, _)| f.clone()),
        );
        self.leave_shared();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer.flush()).await;
        self.writer.shutdown().await;
        tracing::debug!(client_id = %self.client_id, ?exit, "connection ended");
        // When 10,000 clients leave at once, those beyond the pool wait here holding only
        // what they held already (the 10k-clients benchmark's peak: 120 MB instead of
        // 160-175). A hand-over does not wait: the new owner is waiting for it.
        let _closing_slot = if matches!(exit, Exit::TakenOver) {
            None
        } else {
            self.context
                .closing_writes
                .clone()
                .acquire_owned()
                .await
                .ok()
        };
        match exit {
            // Each boxed: this future is then only as large as the step it is in.
            Exit::TakenOver => {
                // Written first: if the new owner claimed without waiting for this
                // connection (its node did not answer in time), it published the will.
                let will_now = self.record.will.take_if(|w| w.delay_secs == 0);
                let superseded = Box::pin(self.hand_over_session()).await;
                if let Some(will) = will_now.filter(|_| !superseded) {
                    Box::pin(self.send_will(&will)).await;
                }
            }
            Exit::Disconnect { publish_will } => {
                if publish_will {
                    Box::pin(self.publish_own_will()).await;
                }
                self.record.will = None;
                Box::pin(self.end_session(0)).await;
            }
            Exit::Abnormal => Box::pin(self.end_session(0)).await,
            Exit::Shutdown => {
                let min_will_delay = self.context.config.drain.will_delay_secs;
                Box::pin(self.end_session(min_will_delay)).await
            }
        }
        // Only now, with the session written: a new owner waiting in a hand-over watches
        // for this entry to go (see Registry::hand_over).
        self.context
            .registry
            .unregister(&self.client_id, self.connection);
    }
}

/// The monotonic instant of a wall-clock time (Unix seconds); past times are now.
fn unix_secs_to_instant(secs: u64) -> Instant {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let ahead = (secs as f64 - now_unix).max(0.0);
    Instant::now() + Duration::from_secs_f64(ahead.min(100.0 * 365.0 * 86_400.0))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
