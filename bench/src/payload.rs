//! The message payload: a small header that lets a subscriber compute end-to-end latency and
//! detect loss and duplicates, padded to the requested size.
//!
//! Layout (little endian): magic `JMQB` (4 bytes), publisher id (u32), sequence number (u64),
//! send time in nanoseconds since the process's start (u64). Publishers and subscribers run in
//! the same process, so one monotonic clock serves both.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

pub const MAGIC: [u8; 4] = *b"JMQB";
pub const HEADER_LEN: usize = 24;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The process-wide clock origin for payload timestamps.
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub fn instant_ns(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

pub fn ns_to_instant(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub publisher: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// Builds a payload of `size` bytes (at least [`HEADER_LEN`]).
pub fn encode(header: Header, size: usize) -> Bytes {
    let size = size.max(HEADER_LEN);
    let mut buf = BytesMut::with_capacity(size);
    buf.put_slice(&MAGIC);
    buf.put_u32_le(header.publisher);
    buf.put_u64_le(header.seq);
    buf.put_u64_le(header.sent_ns);
    buf.resize(size, b'x');
    buf.freeze()
}

/// Reads the header back; `None` for payloads that are not ours (short or wrong magic).
pub fn decode(payload: &[u8]) -> Option<Header> {
    let magic = payload.get(0..4)?;
    if magic != MAGIC {
        return None;
    }
    let publisher = u32::from_le_bytes(payload.get(4..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    let sent_ns = u64::from_le_bytes(payload.get(16..24)?.try_into().ok()?);
    Some(Header {
        publisher,
        seq,
        sent_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header {
            publisher: 7,
            seq: 123_456_789,
            sent_ns: 42,
        };
        let p = encode(h, 256);
        assert_eq!(p.len(), 256);
        assert_eq!(decode(&p), Some(h));
        let short = encode(h, 3);
        assert_eq!(short.len(), HEADER_LEN);
        assert_eq!(decode(&short), Some(h));
    }

    #[test]
    fn rejects_foreign_payloads() {
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"JMQB\x01"), None);
        assert_eq!(decode(&[0u8; 64]), None);
    }
}
