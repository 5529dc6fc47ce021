//! The tokio-util codec wrapper.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::*;
use crate::*;

fn connect(protocol: ProtocolVersion) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: true,
        keep_alive: 10,
        client_id: "codec".into(),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }))
}

#[test]
fn server_side_learns_version_from_connect() {
    let mut codec = MqttCodec::new(MAX);
    assert_eq!(codec.version, None);
    let mut buf = BytesMut::new();
    // Before CONNECT only CONNECT is accepted.
    buf.extend_from_slice(&[0xC0, 0x00]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(DecodeError::Protocol(_))
    ));

    let mut codec = MqttCodec::new(MAX);
    let mut buf = BytesMut::from(&enc(&connect(V5), V5)[..]);
    buf.extend_from_slice(&[0xF0, 0x00]);
    assert_eq!(codec.decode(&mut buf).expect("ok"), Some(connect(V5)));
    assert_eq!(codec.version, Some(V5));
    assert_eq!(
        codec.decode(&mut buf).expect("ok"),
        Some(Packet::Auth(Auth::default()))
    );

    // Replies use the learnt version.
    let mut out = BytesMut::new();
    codec
        .encode(
            Packet::PubAck(PubResp::new(1, ReasonCode::NO_MATCHING_SUBSCRIBERS)),
            &mut out,
        )
        .expect("encodes");
    assert_eq!(&out[..], &[0x40, 0x03, 0x00, 0x01, 0x10]);
}

#[test]
fn v311_connection_rejects_auth() {
    let mut codec = MqttCodec::new(MAX);
    let mut buf = BytesMut::from(&enc(&connect(V311), V311)[..]);
    buf.extend_from_slice(&[0xF0, 0x00]);
    codec.decode(&mut buf).expect("connect");
    assert_eq!(codec.version, Some(V311));
    assert!(matches!(
        codec.decode(&mut buf),
        Err(DecodeError::Protocol(_))
    ));
    let mut out = BytesMut::new();
    assert!(matches!(
        codec.encode(Packet::Auth(Auth::default()), &mut out),
        Err(EncodeError::UnsupportedPacket { .. })
    ));
}

#[test]
fn client_side_learns_version_from_encoded_connect() {
    let mut codec = MqttCodec::new(MAX);
    let mut out = BytesMut::new();
    codec.encode(&connect(V5), &mut out).expect("encodes");
    assert_eq!(codec.version, Some(V5));
    let mut buf = BytesMut::from(&[0x20u8, 0x03, 0x00, 0x00, 0x00][..]);
    assert_eq!(
        codec.decode(&mut buf).expect("ok"),
        Some(Packet::ConnAck(Box::default()))
    );
}

#[test]
fn default_encoding_is_v311_and_limit_applies() {
    let mut codec = MqttCodec::new(4);
    let mut out = BytesMut::new();
    codec
        .encode(
            Packet::Disconnect(Disconnect::new(ReasonCode::SERVER_BUSY)),
            &mut out,
        )
        .expect("encodes");
    assert_eq!(&out[..], &[0xE0, 0x00]);

    let mut codec = MqttCodec::with_version(V311, 4);
    let mut buf = BytesMut::from(&[0x30u8, 0x03][..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(DecodeError::TooLarge { size: 5, max: 4 })
    ));
}

#[test]
fn decode_eof_with_partial_packet_is_an_error() {
    let mut codec = MqttCodec::with_version(V311, MAX);
    let mut buf = BytesMut::from(&[0x30u8, 0x05, 0x00][..]);
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(DecodeError::Io(_))
    ));
}
