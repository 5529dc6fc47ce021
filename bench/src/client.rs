//! A minimal MQTT client connection over a non-blocking tokio TCP stream, using the
//! workspace's codec. One task drives one connection (no per-connection event loop, no
//! channels), so tens of thousands of connections stay cheap.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use jetmq_codec::{
    decode_packet, encode_packet, ConnAck, Connect, ConnectProperties, Disconnect, Packet,
    ProtocolVersion, PubResp, Publish, QoS, ReasonCode, Subscribe, SubscribeFilter,
    SubscriptionOptions,
};
use tokio::net::{TcpSocket, TcpStream};

/// Largest packet we accept from a broker.
const MAX_PACKET: usize = 16 * 1024 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct ConnOpts {
    pub target: SocketAddr,
    pub source: Option<IpAddr>,
    pub version: ProtocolVersion,
    pub client_id: String,
    pub clean: bool,
    pub keepalive: u16,
    /// MQTT 5 session expiry interval (seconds) sent in CONNECT.
    pub session_expiry: Option<u32>,
    pub timeout: Duration,
    /// CONNECT credentials (brokers that require a login).
    pub username: Option<String>,
    pub password: Option<String>,
}

pub enum ReadOutcome {
    Data,
    WouldBlock,
    Eof,
}

pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub version: ProtocolVersion,
    pub last_write: Instant,
}

/// Opens a socket bound to `source` (port chosen at connect time, so that the 4-tuple, not
/// the source address alone, must be unique) and connects it.
async fn tcp_connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = source {
        bind_no_port(&socket)?;
        socket.bind(SocketAddr::new(src, 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// IP_BIND_ADDRESS_NO_PORT: defer the ephemeral port choice to connect().
fn bind_no_port(socket: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd, a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Conn {
    /// TCP connect, CONNECT, CONNACK. Fails on a refusing CONNACK.
    pub async fn open(opts: &ConnOpts) -> Result<(Conn, ConnAck)> {
        let stream = tokio::time::timeout(opts.timeout, tcp_connect(opts.target, opts.source))
            .await
            .map_err(|_| anyhow!("tcp connect timed out"))?
            .map_err(|e| anyhow!("tcp connect: {}", e.kind()))?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            version: opts.version,
            last_write: Instant::now(),
        };
        let mut properties = ConnectProperties::default();
        if opts.version.is_v5() {
            properties.session_expiry_interval = opts.session_expiry;
            properties.receive_maximum = Some(u16::MAX);
        }
        let connect = Connect {
            protocol: opts.version,
            clean_start: opts.clean,
            keep_alive: opts.keepalive,
            client_id: opts.client_id.clone(),
            will: None,
            username: opts.username.clone(),
            password: opts.password.clone().map(bytes::Bytes::from),
            properties,
        };
        conn.queue(&Packet::Connect(Box::new(connect)))?;
        let packet = tokio::time::timeout(opts.timeout, async {
            conn.flush().await?;
            conn.recv().await
        })
        .await
        .map_err(|_| anyhow!("no CONNACK in time"))??;
        match packet {
            Some(Packet::ConnAck(ack)) => {
                if ack.reason.is_error() {
                    bail!("CONNACK refused: 0x{:02x}", ack.reason.0);
                }
                Ok((conn, *ack))
            }
            Some(other) => bail!("expected CONNACK, got {}", other.name()),
            None => bail!("closed before CONNACK"),
        }
    }

    pub fn queue(&mut self, packet: &Packet) -> Result<()> {
        encode_packet(packet, self.version, &mut self.wbuf).context("encode")
    }

    /// Acknowledges an incoming PUBLISH as a device does: PUBACK for QoS 1, PUBREC for
    /// QoS 2, nothing for QoS 0. `qos2_held` holds the QoS 2 packet ids received and not
    /// yet released; returns false for a QoS 2 message sent again before its PUBREL, which
    /// is not a new delivery.
    pub fn acknowledge(&mut self, publish: &Publish, qos2_held: &mut HashSet<u16>) -> Result<bool> {
        match publish.qos {
            QoS::AtMostOnce => Ok(true),
            QoS::AtLeastOnce => {
                self.queue(&Packet::PubAck(PubResp::new(
                    publish.packet_id,
                    ReasonCode::SUCCESS,
                )))?;
                Ok(true)
            }
            QoS::ExactlyOnce => {
                self.queue(&Packet::PubRec(PubResp::new(
                    publish.packet_id,
                    ReasonCode::SUCCESS,
                )))?;
                Ok(qos2_held.insert(publish.packet_id))
            }
        }
    }

    /// Answers a PUBREL: the QoS 2 message `packet_id` is complete.
    pub fn release(&mut self, packet_id: u16, qos2_held: &mut HashSet<u16>) -> Result<()> {
        qos2_held.remove(&packet_id);
        self.queue(&Packet::PubComp(PubResp::new(
            packet_id,
            ReasonCode::SUCCESS,
        )))
    }

    /// Writes what it can without waiting.
    pub fn try_flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = self.wbuf.split_to(n);
                    self.last_write = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        loop {
            self.try_flush()?;
            if self.wbuf.is_empty() {
                return Ok(());
            }
            self.stream.writable().await?;
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.stream.readable().await
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
    }

    /// Reads what is there without waiting.
    pub fn try_fill(&mut self) -> io::Result<ReadOutcome> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_CHUNK);
        }
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => Ok(ReadOutcome::Eof),
            Ok(_) => Ok(ReadOutcome::Data),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(ReadOutcome::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(ReadOutcome::WouldBlock),
            Err(e) => Err(e),
        }
    }

    /// The next complete packet in the read buffer, if any.
    pub fn next_packet(&mut self) -> Result<Option<Packet>> {
        let packet = decode_packet(&mut self.rbuf, Some(self.version), MAX_PACKET)
            .map_err(|e| anyhow!("decode: {e}"))?;
        if packet.is_none() && self.rbuf.is_empty() && self.rbuf.capacity() > 4 * READ_CHUNK {
            // Give back a buffer grown by a burst.
            self.rbuf = BytesMut::new();
        }
        Ok(packet)
    }

    /// Waits for the next packet; `None` when the peer closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Packet>> {
        loop {
            if let Some(p) = self.next_packet()? {
                return Ok(Some(p));
            }
            self.stream.readable().await?;
            if let ReadOutcome::Eof = self.try_fill()? {
                return Ok(None);
            }
        }
    }

    /// SUBSCRIBE and wait for SUBACK, answering anything else that arrives meanwhile through
    /// `other` (e.g. messages queued for a persistent session). Returns the reason codes.
    pub async fn subscribe(
        &mut self,
        packet_id: u16,
        filters: &[String],
        qos: QoS,
        timeout: Duration,
        mut other: impl FnMut(&mut Conn, Packet) -> Result<()>,
    ) -> Result<Vec<ReasonCode>> {
        let subscribe = Subscribe {
            packet_id,
            subscription_identifier: None,
            user_properties: Vec::new(),
            filters: filters
                .iter()
                .map(|f| SubscribeFilter {
                    filter: f.clone(),
                    options: SubscriptionOptions {
                        qos,
                        ..SubscriptionOptions::default()
                    },
                })
                .collect(),
        };
        self.queue(&Packet::Subscribe(subscribe))?;
        tokio::time::timeout(timeout, async {
            self.flush().await?;
            loop {
                match self.recv().await? {
                    Some(Packet::SubAck(ack)) if ack.packet_id == packet_id => {
                        return Ok(ack.reasons);
                    }
                    Some(p) => {
                        other(self, p)?;
                        self.flush().await?;
                    }
                    None => bail!("closed before SUBACK"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no SUBACK in time"))?
    }

    /// Sends DISCONNECT (best effort, bounded in time) and closes.
    pub async fn disconnect(mut self) {
        if self
            .queue(&Packet::Disconnect(Disconnect::new(
                ReasonCode::NORMAL_DISCONNECTION,
            )))
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            use tokio::io::AsyncWriteExt;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}
