//! Partial input and size limits.

use bytes::BytesMut;

use super::*;
use crate::*;

fn sample_packets() -> Vec<(Vec<u8>, Option<ProtocolVersion>)> {
    let connect = Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 30,
        client_id: "incremental".into(),
        will: None,
        username: Some("u".into()),
        password: Some(bytes::Bytes::from_static(b"p")),
        properties: ConnectProperties {
            session_expiry_interval: Some(10),
            ..Default::default()
        },
    };
    let publish = Publish {
        qos: QoS::AtLeastOnce,
        topic: "a/b/c".into(),
        packet_id: 9,
        payload: vec![7u8; 300].into(),
        ..Default::default()
    };
    vec![
        (enc(&Packet::Connect(Box::new(connect)), V5), None),
        (enc(&Packet::Publish(publish.clone()), V5), Some(V5)),
        (enc(&Packet::Publish(publish), V311), Some(V311)),
        (vec![0xE0, 0x00], Some(V311)),
        (vec![0x40, 0x02, 0x00, 0x01], Some(V5)),
    ]
}

#[test]
fn byte_by_byte_needs_more_until_complete() {
    for (bytes, version) in sample_packets() {
        let mut buf = BytesMut::new();
        for (i, &byte) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[byte]);
            let before = buf.clone();
            let result = decode_packet(&mut buf, version, MAX).expect("no error on a prefix");
            if i + 1 < bytes.len() {
                assert!(result.is_none(), "decoded early at byte {i}");
                assert_eq!(buf, before, "buffer changed while waiting");
            } else {
                let packet = result.expect("complete packet");
                assert!(buf.is_empty());
                assert_eq!(packet, dec_ok(&bytes, version));
            }
        }
    }
}

#[test]
fn empty_buffer_needs_more() {
    let mut buf = BytesMut::new();
    assert!(decode_packet(&mut buf, None, MAX).expect("ok").is_none());
}

#[test]
fn several_packets_in_one_buffer() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0xC0, 0x00]);
    buf.extend_from_slice(&[0x40, 0x02, 0x00, 0x05]);
    buf.extend_from_slice(&[0xE0, 0x00, 0x30]); // and the start of a PUBLISH
    assert_eq!(
        decode_packet(&mut buf, Some(V311), MAX).expect("ok"),
        Some(Packet::PingReq)
    );
    assert_eq!(
        decode_packet(&mut buf, Some(V311), MAX).expect("ok"),
        Some(Packet::PubAck(PubResp::new(5, ReasonCode::SUCCESS)))
    );
    assert_eq!(
        decode_packet(&mut buf, Some(V311), MAX).expect("ok"),
        Some(Packet::Disconnect(Disconnect::default()))
    );
    assert_eq!(decode_packet(&mut buf, Some(V311), MAX).expect("ok"), None);
    assert_eq!(&buf[..], &[0x30]);
}

#[test]
fn huge_length_prefix_rejected_after_five_bytes() {
    // Remaining length 268,435,455 (the largest MQTT allows, ~268 MB).
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    match decode_packet(&mut buf, Some(V311), 1024 * 1024) {
        Err(DecodeError::TooLarge { size, max }) => {
            assert_eq!(size, 268_435_455 + 5);
            assert_eq!(max, 1024 * 1024);
        }
        other => panic!("{other:?}"),
    }
    // No room was reserved for the body.
    assert!(buf.capacity() < 1024);
}

#[test]
fn two_hundred_megabyte_length_rejected() {
    // 200,000,000 = 0x0BEBC200 as a variable byte integer.
    let mut len = 200_000_000u32;
    let mut bytes = vec![0x32u8];
    while len > 0 {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        bytes.push(b);
    }
    assert_eq!(bytes.len(), 5);
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(
        decode_packet(&mut buf, Some(V5), 64 * 1024),
        Err(DecodeError::TooLarge {
            size: 200_000_005,
            ..
        })
    ));
}

#[test]
fn limit_counts_the_whole_packet() {
    let bytes = enc(
        &Packet::Publish(Publish {
            topic: "t".into(),
            payload: vec![0u8; 10].into(),
            ..Default::default()
        }),
        V311,
    );
    assert_eq!(bytes.len(), 15);
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(decode_packet(&mut buf, Some(V311), 15)
        .expect("fits")
        .is_some());
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(
        decode_packet(&mut buf, Some(V311), 14),
        Err(DecodeError::TooLarge { size: 15, max: 14 })
    ));
    // Rejected from the header alone.
    let mut buf = BytesMut::from(&bytes[..2]);
    assert!(matches!(
        decode_packet(&mut buf, Some(V311), 14),
        Err(DecodeError::TooLarge { size: 15, max: 14 })
    ));
}

#[test]
fn waiting_reserves_room_for_the_frame() {
    let mut buf = BytesMut::from(&[0x30u8, 0xE8, 0x07][..]); // remaining length 1000
    assert!(decode_packet(&mut buf, Some(V311), MAX)
        .expect("ok")
        .is_none());
    assert!(buf.capacity() >= 1003);
    assert_eq!(&buf[..], &[0x30, 0xE8, 0x07]);
}
