//! Unit tests of the codec: known byte vectors, strictness rules, incremental decoding, size
//! limits, 3.1.1 mappings, property-based round trips, and a (manual) timing loop.

mod codec;
mod incremental;
mod mapping;
mod roundtrip;
mod strict;
mod timing;
mod vectors;

use bytes::BytesMut;

use crate::{decode_packet, encode_packet, encoded_len, DecodeError, Packet, ProtocolVersion};

pub(crate) use ProtocolVersion::{V31, V311, V5};

/// Generous limit for tests that are not about sizes.
pub(crate) const MAX: usize = 1 << 20;

/// Encodes `packet` and checks [`encoded_len`] agrees.
pub(crate) fn enc(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_packet(packet, version, &mut buf).expect("encodes");
    assert_eq!(
        buf.len(),
        encoded_len(packet, version),
        "encoded_len of {packet:?}"
    );
    buf.to_vec()
}

/// Decodes one packet that must use exactly all of `bytes`.
pub(crate) fn dec(bytes: &[u8], version: Option<ProtocolVersion>) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    match decode_packet(&mut buf, version, MAX)? {
        Some(packet) => {
            assert!(buf.is_empty(), "{} bytes left after {packet:?}", buf.len());
            Ok(packet)
        }
        None => panic!("incomplete packet: {bytes:02x?}"),
    }
}

pub(crate) fn dec_ok(bytes: &[u8], version: Option<ProtocolVersion>) -> Packet {
    match dec(bytes, version) {
        Ok(packet) => packet,
        Err(e) => panic!("{bytes:02x?} failed to decode: {e}"),
    }
}

pub(crate) fn dec_err(bytes: &[u8], version: Option<ProtocolVersion>) -> DecodeError {
    match dec(bytes, version) {
        Ok(packet) => panic!("{bytes:02x?} decoded to {packet:?}"),
        Err(e) => e,
    }
}

/// A frame: first byte, remaining length, body.
pub(crate) fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string / binary field.
pub(crate) fn s(data: impl AsRef<[u8]>) -> Vec<u8> {
    let data = data.as_ref();
    let mut out = (data.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

/// Concatenates byte pieces.
pub(crate) fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A v5 property section: length prefix (one byte, tests keep it short) + contents.
pub(crate) fn props(contents: &[u8]) -> Vec<u8> {
    assert!(contents.len() < 128);
    let mut out = vec![contents.len() as u8];
    out.extend_from_slice(contents);
    out
}

/// A 3.1.1 CONNECT body header: "MQTT", level 4, `flags`, keep alive 60.
pub(crate) fn connect_head(level: u8, flags: u8) -> Vec<u8> {
    cat(&[&s("MQTT"), &[level, flags, 0, 60]])
}

pub(crate) fn assert_malformed(e: DecodeError) {
    assert!(
        matches!(e, DecodeError::Malformed(_)),
        "expected Malformed, got {e:?}"
    );
}

pub(crate) fn assert_protocol(e: DecodeError) {
    assert!(
        matches!(e, DecodeError::Protocol(_)),
        "expected Protocol, got {e:?}"
    );
}

pub(crate) fn assert_topic_invalid(e: DecodeError) {
    assert!(
        matches!(e, DecodeError::TopicNameInvalid(_)),
        "expected TopicNameInvalid, got {e:?}"
    );
}
