//! MQTT 3.1.1 output: dropped properties, mapped reason codes, fixed short forms.

use bytes::Bytes;

use super::*;
use crate::*;

#[test]
fn connack_return_codes() {
    let table: &[(u8, u8)] = &[
        (0x00, 0),
        (0x84, 1),
        (0x85, 2),
        (0x88, 3),
        (0x89, 3),
        (0x86, 4),
        (0x87, 5),
        (0x80, 3),
        (0x8A, 3),
        (0x9F, 3),
        (0x10, 3),
    ];
    for &(reason, code) in table {
        let ack = ConnAck {
            session_present: false,
            reason: ReasonCode(reason),
            properties: ConnAckProperties {
                reason_string: Some("dropped".into()),
                ..Default::default()
            },
        };
        assert_eq!(
            enc(&Packet::ConnAck(Box::new(ack)), V311),
            [0x20, 0x02, 0x00, code],
            "reason {reason:#04x}"
        );
        assert_eq!(ReasonCode(reason).to_v311_connack(), code);
    }
    for code in 0..=5u8 {
        let reason = ReasonCode::from_v311_connack(code).expect("defined");
        assert_eq!(reason.to_v311_connack(), code);
    }
    assert_eq!(ReasonCode::from_v311_connack(6), None);
}

#[test]
fn connack_session_present_only_on_success() {
    let ack = ConnAck {
        session_present: true,
        reason: ReasonCode::NOT_AUTHORIZED,
        properties: Default::default(),
    };
    assert_eq!(
        enc(&Packet::ConnAck(Box::new(ack.clone())), V311),
        [0x20, 0x02, 0x00, 0x05]
    );
    assert_eq!(
        enc(&Packet::ConnAck(Box::new(ack)), V5),
        [0x20, 0x03, 0x00, 0x87, 0x00]
    );
}

#[test]
fn suback_return_codes() {
    let ack = SubAck {
        packet_id: 4,
        properties: ReasonProperties {
            reason_string: Some("dropped".into()),
            user_properties: vec![],
        },
        reasons: [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x97, 0xA2]
            .into_iter()
            .map(ReasonCode)
            .collect(),
    };
    assert_eq!(
        enc(&Packet::SubAck(ack), V311),
        [0x90, 0x0B, 0x00, 0x04, 0x00, 0x01, 0x02, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80]
    );
}

#[test]
fn unsuback_has_no_payload() {
    let ack = UnsubAck {
        packet_id: 0x0102,
        properties: ReasonProperties::default(),
        reasons: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
    };
    assert_eq!(enc(&Packet::UnsubAck(ack), V311), [0xB0, 0x02, 0x01, 0x02]);
}

#[test]
fn pub_acks_are_just_the_packet_id() {
    let resp = PubResp {
        packet_id: 0x0A0B,
        reason: ReasonCode::QUOTA_EXCEEDED,
        properties: ReasonProperties {
            reason_string: Some("x".into()),
            user_properties: vec![("a".into(), "b".into())],
        },
    };
    assert_eq!(
        enc(&Packet::PubAck(resp.clone()), V311),
        [0x40, 0x02, 0x0A, 0x0B]
    );
    assert_eq!(
        enc(&Packet::PubRec(resp.clone()), V311),
        [0x50, 0x02, 0x0A, 0x0B]
    );
    assert_eq!(
        enc(&Packet::PubRel(resp.clone()), V311),
        [0x62, 0x02, 0x0A, 0x0B]
    );
    assert_eq!(enc(&Packet::PubComp(resp), V31), [0x70, 0x02, 0x0A, 0x0B]);
}

#[test]
fn disconnect_is_e0_00() {
    let d = Disconnect {
        reason: ReasonCode::SERVER_SHUTTING_DOWN,
        properties: DisconnectProperties {
            reason_string: Some("bye".into()),
            ..Default::default()
        },
    };
    assert_eq!(enc(&Packet::Disconnect(d.clone()), V311), [0xE0, 0x00]);
    // MQTT 5 keeps the reason and the properties.
    let v5 = enc(&Packet::Disconnect(d.clone()), V5);
    assert_eq!(v5[..3], [0xE0, 0x08, 0x8B]);
    assert_eq!(dec_ok(&v5, Some(V5)), Packet::Disconnect(d));
}

#[test]
fn publish_properties_dropped() {
    let p = Publish {
        qos: QoS::AtMostOnce,
        topic: "t".into(),
        properties: PublishProperties {
            message_expiry_interval: Some(5),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        },
        payload: Bytes::from_static(b"x"),
        ..Default::default()
    };
    assert_eq!(
        enc(&Packet::Publish(p), V311),
        [0x30, 0x04, 0x00, 0x01, b't', b'x']
    );
}

#[test]
fn subscribe_v311_keeps_only_qos() {
    let s = Subscribe {
        packet_id: 1,
        subscription_identifier: Some(3),
        user_properties: vec![("k".into(), "v".into())],
        filters: vec![SubscribeFilter {
            filter: "a".into(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
        }],
    };
    assert_eq!(
        enc(&Packet::Subscribe(s), V311),
        [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x02]
    );
}

#[test]
fn connect_v311_drops_properties() {
    let c = Connect {
        protocol: V311,
        clean_start: false,
        keep_alive: 0,
        client_id: String::new(),
        will: Some(LastWill {
            topic: "w".into(),
            payload: Bytes::new(),
            qos: QoS::ExactlyOnce,
            retain: false,
            delay_interval: Some(10),
            properties: PublishProperties {
                content_type: Some("text".into()),
                ..Default::default()
            },
        }),
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(1),
            ..Default::default()
        },
    };
    let bytes = enc(&Packet::Connect(Box::new(c)), V5);
    assert_eq!(
        bytes,
        frame(
            0x10,
            &cat(&[&s("MQTT"), &[4, 0x14, 0, 0], &s(""), &s("w"), &s("")])
        )
    );
}

#[test]
fn v5_short_forms() {
    assert_eq!(
        enc(&Packet::PubAck(PubResp::new(1, ReasonCode::SUCCESS)), V5),
        [0x40, 0x02, 0x00, 0x01]
    );
    assert_eq!(
        enc(
            &Packet::PubComp(PubResp::new(1, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)),
            V5
        ),
        [0x70, 0x03, 0x00, 0x01, 0x92]
    );
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::default()), V5),
        [0xE0, 0x00]
    );
    assert_eq!(enc(&Packet::Auth(Auth::default()), V5), [0xF0, 0x00]);
}

#[test]
fn dup_not_written_on_qos0() {
    let p = Publish {
        dup: true,
        topic: "t".into(),
        ..Default::default()
    };
    assert_eq!(
        enc(&Packet::Publish(p), V311),
        [0x30, 0x03, 0x00, 0x01, b't']
    );
}

#[test]
fn maximum_qos_2_is_omitted() {
    let ack = ConnAck {
        properties: ConnAckProperties {
            maximum_qos: Some(QoS::ExactlyOnce),
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(
        enc(&Packet::ConnAck(Box::new(ack)), V5),
        [0x20, 0x03, 0x00, 0x00, 0x00]
    );
}

#[test]
fn encoder_errors_leave_the_buffer_untouched() {
    let cases: Vec<(Packet, ProtocolVersion)> = vec![
        (Packet::Auth(Auth::default()), V311),
        (
            Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                topic: "t".into(),
                packet_id: 0,
                ..Default::default()
            }),
            V311,
        ),
        (
            Packet::Publish(Publish {
                topic: "t".repeat(70_000),
                ..Default::default()
            }),
            V311,
        ),
        (
            Packet::Publish(Publish {
                topic: "t".into(),
                properties: PublishProperties {
                    subscription_identifiers: vec![0],
                    ..Default::default()
                },
                ..Default::default()
            }),
            V5,
        ),
        (
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                ..Default::default()
            }),
            V5,
        ),
        (Packet::Publish(Publish::default()), V311),
        (Packet::Publish(Publish::default()), V5),
        (
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![SubscribeFilter {
                    filter: "a".into(),
                    options: SubscriptionOptions {
                        retain_handling: 3,
                        ..Default::default()
                    },
                }],
                ..Default::default()
            }),
            V5,
        ),
        (
            Packet::Connect(Box::new(Connect {
                protocol: V311,
                clean_start: true,
                keep_alive: 0,
                client_id: "c".into(),
                will: None,
                username: None,
                password: Some(Bytes::from_static(b"p")),
                properties: Default::default(),
            })),
            V311,
        ),
        (
            Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: true,
                keep_alive: 0,
                client_id: "c".into(),
                will: Some(LastWill {
                    topic: "w".into(),
                    payload: Bytes::new(),
                    qos: QoS::AtMostOnce,
                    retain: false,
                    delay_interval: None,
                    properties: PublishProperties {
                        topic_alias: Some(1),
                        ..Default::default()
                    },
                }),
                username: None,
                password: None,
                properties: Default::default(),
            })),
            V5,
        ),
    ];
    for (packet, version) in cases {
        let mut buf = bytes::BytesMut::from(&b"keep"[..]);
        assert!(
            encode_packet(&packet, version, &mut buf).is_err(),
            "{packet:?} encoded"
        );
        assert_eq!(&buf[..], b"keep");
    }
}

#[test]
fn oversized_packet_is_refused() {
    let p = Publish {
        topic: "t".into(),
        payload: vec![0u8; MAX_REMAINING_LENGTH].into(),
        ..Default::default()
    };
    let mut buf = bytes::BytesMut::new();
    assert!(matches!(
        encode_packet(&Packet::Publish(p), V311, &mut buf),
        Err(EncodeError::PacketTooLarge { .. })
    ));
    assert!(buf.is_empty());
}
