//! Frames over a byte stream: MQTT packets in, MQTT packets out.
//!
//! Reading and writing are separate halves so that the client loop can wait on both at once;
//! both halves' async methods are cancellation safe (a `select!` may drop them at any await).

use bytes::BytesMut;
use jetmq_codec::{
    decode_packet, encode_packet, encoded_len, DecodeError, EncodeError, Packet, ProtocolVersion,
};
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Bytes read at once into the stack buffer while a connection has nothing buffered.
const IDLE_READ_CHUNK: usize = 4096;
/// How long closing a connection's write side may take.
const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Anything a client can connect over: TCP, TLS, WebSocket.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("connection closed by peer")]
    Closed,
    #[error("connection closed mid-packet")]
    Truncated,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

pub struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
    pub version: Option<ProtocolVersion>,
    max_packet_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, max_packet_size: usize) -> Self {
        FrameReader {
            reader,
            buf: BytesMut::new(),
            version: None,
            max_packet_size,
        }
    }

    /// The next complete packet already buffered, if any.
    pub fn try_next(&mut self) -> Result<Option<Packet>, DecodeError> {
        let packet = decode_packet(&mut self.buf, self.version, self.max_packet_size)?;
        if let Some(Packet::Connect(connect)) = &packet {
            if self.version.is_none() {
                self.version = Some(connect.protocol);
            }
        }
        if packet.is_none() && self.buf.is_empty() && self.buf.capacity() > 0 {
            // An idle connection holds no read buffer: thousands of quiet devices per node
            // should cost their session state, not 4 KiB each.
            self.buf = BytesMut::new();
        }
        Ok(packet)
    }

    /// True while part of a packet is buffered (its first bytes arrived, the rest not yet).
    pub fn has_partial_packet(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Reads more bytes from the socket. Cancellation safe.
    pub async fn fill(&mut self) -> Result<(), ReadError> {
        let n = if self.buf.is_empty() {
            // Waiting between packets is what idle connections do all day: wait with a
            // stack buffer and copy what arrives, so that waiting costs no heap memory.
            let (reader, buf) = (&mut self.reader, &mut self.buf);
            std::future::poll_fn(|cx| {
                let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_READ_CHUNK];
                let mut read = ReadBuf::uninit(&mut stack);
                match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        buf.extend_from_slice(read.filled());
                        Poll::Ready(Ok(read.filled().len()))
                    }
                    Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?
        } else {
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(2048);
            }
            self.reader.read_buf(&mut self.buf).await?
        };
        if n == 0 {
            return Err(if self.buf.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Truncated
            });
        }
        Ok(())
    }

    /// Waits for the next packet.
    pub async fn next(&mut self) -> Result<Packet, ReadError> {
        loop {
            if let Some(packet) = self.try_next()? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }
}

pub struct FrameWriter<W> {
    writer: W,
    buf: BytesMut,
    pub version: ProtocolVersion,
    /// The client's Maximum Packet Size: larger packets are never sent to it.
    pub peer_max_packet_size: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(writer: W) -> Self {
        FrameWriter {
            writer,
            buf: BytesMut::new(),
            version: ProtocolVersion::V311,
            peer_max_packet_size: usize::MAX,
        }
    }

    /// Queues a packet. Returns false (and queues nothing) if it exceeds the peer's limit.
    pub fn queue(&mut self, packet: &Packet) -> Result<bool, EncodeError> {
        if self.peer_max_packet_size != usize::MAX
            && encoded_len(packet, self.version) > self.peer_max_packet_size
        {
            return Ok(false);
        }
        encode_packet(packet, self.version, &mut self.buf)?;
        Ok(true)
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Writes some of the queued bytes. Cancellation safe.
    pub async fn write_some(&mut self) -> std::io::Result<()> {
        let n = self.writer.write_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if self.buf.is_empty() {
            // See FrameReader::try_next: idle connections keep no buffers.
            self.buf = BytesMut::new();
        }
        Ok(())
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        while !self.buf.is_empty() {
            self.write_some().await?;
        }
        self.writer.flush().await
    }

    /// Closes the write side. Bounded: TLS sends close_notify first, which never completes
    /// towards a peer that stopped reading and filled the socket buffer.
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(SHUTDOWN_LIMIT, self.writer.shutdown()).await;
    }
}
