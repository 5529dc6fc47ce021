//! Known byte vectors (from the specifications' examples and captured client traffic), in
//! both directions.

use bytes::Bytes;

use super::*;
use crate::*;

/// `mosquitto_pub -V mqttv311 -i mosq-pub-1 -k 60 -t a/b -m hi`: CONNECT as captured.
const MOSQUITTO_CONNECT: &[u8] = &[
    0x10, 0x16, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x0A, b'm', b'o',
    b's', b'q', b'-', b'p', b'u', b'b', b'-', b'1',
];

fn mosquitto_connect() -> Connect {
    Connect {
        protocol: V311,
        clean_start: true,
        keep_alive: 60,
        client_id: "mosq-pub-1".into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

#[test]
fn mosquitto_pub_connect_v311() {
    let packet = dec_ok(MOSQUITTO_CONNECT, None);
    assert_eq!(packet, Packet::Connect(Box::new(mosquitto_connect())));
    assert_eq!(enc(&packet, V311), MOSQUITTO_CONNECT);
    // CONNECT carries its own version: the `version` argument does not matter.
    assert_eq!(enc(&packet, V5), MOSQUITTO_CONNECT);
}

#[test]
fn mqtt31_connect_mqisdp() {
    let bytes = frame(
        0x10,
        &cat(&[&s("MQIsdp"), &[3, 0x02, 0x00, 0x0A], &s("c31")]),
    );
    let packet = dec_ok(&bytes, None);
    let Packet::Connect(c) = &packet else {
        panic!("{packet:?}")
    };
    assert_eq!(c.protocol, V31);
    assert_eq!(c.client_id, "c31");
    assert_eq!(enc(&packet, V311), bytes);
}

#[test]
fn connect_v311_with_will_user_password() {
    // Flags: user name, password, will retain, will QoS 1, will, clean session.
    let bytes = frame(
        0x10,
        &cat(&[
            &connect_head(4, 0b1110_1110),
            &s("client"),
            &s("will/t"),
            &s("bye"),
            &s("user"),
            &s([0xFF, 0x00]),
        ]),
    );
    let packet = dec_ok(&bytes, None);
    let expected = Connect {
        protocol: V311,
        clean_start: true,
        keep_alive: 60,
        client_id: "client".into(),
        will: Some(LastWill {
            topic: "will/t".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay_interval: None,
            properties: PublishProperties::default(),
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(&[0xFF, 0x00])),
        properties: ConnectProperties::default(),
    };
    assert_eq!(packet, Packet::Connect(Box::new(expected)));
    assert_eq!(enc(&packet, V311), bytes);
}

#[test]
fn connect_v5_with_properties() {
    // Session expiry 120, receive maximum 20, user property ("k", "v"); will with delay 5.
    let connect_props = cat(&[
        &[0x11, 0, 0, 0, 120],
        &[0x21, 0, 20],
        &[0x26],
        &s("k"),
        &s("v"),
    ]);
    let will_props = [0x18, 0, 0, 0, 5];
    let bytes = frame(
        0x10,
        &cat(&[
            &connect_head(5, 0b0000_0110),
            &props(&connect_props),
            &s("c5"),
            &props(&will_props),
            &s("w"),
            &s("x"),
        ]),
    );
    let packet = dec_ok(&bytes, None);
    let Packet::Connect(c) = &packet else {
        panic!("{packet:?}")
    };
    assert_eq!(c.protocol, V5);
    assert_eq!(c.properties.session_expiry_interval, Some(120));
    assert_eq!(c.properties.receive_maximum, Some(20));
    assert_eq!(c.properties.user_properties, vec![("k".into(), "v".into())]);
    let will = c.will.as_ref().expect("will");
    assert_eq!(will.delay_interval, Some(5));
    assert_eq!(will.qos, QoS::AtMostOnce);
    assert_eq!(enc(&packet, V5), bytes);
}

#[test]
fn connack_v311() {
    let accepted = [0x20, 0x02, 0x00, 0x00];
    let packet = dec_ok(&accepted, Some(V311));
    assert_eq!(packet, Packet::ConnAck(Box::default()));
    assert_eq!(enc(&packet, V311), accepted);

    let present = [0x20, 0x02, 0x01, 0x00];
    let packet = dec_ok(&present, Some(V311));
    let Packet::ConnAck(c) = &packet else {
        panic!()
    };
    assert!(c.session_present);
    assert_eq!(enc(&packet, V311), present);

    let not_authorized = [0x20, 0x02, 0x00, 0x05];
    let packet = dec_ok(&not_authorized, Some(V311));
    let Packet::ConnAck(c) = &packet else {
        panic!()
    };
    assert_eq!(c.reason, ReasonCode::NOT_AUTHORIZED);
    assert_eq!(enc(&packet, V311), not_authorized);
}

#[test]
fn connack_v5() {
    let bytes = [0x20, 0x03, 0x00, 0x00, 0x00];
    let packet = dec_ok(&bytes, Some(V5));
    assert_eq!(packet, Packet::ConnAck(Box::default()));
    assert_eq!(enc(&packet, V5), bytes);

    let ack = ConnAck {
        session_present: false,
        reason: ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        properties: ConnAckProperties {
            maximum_qos: Some(QoS::AtLeastOnce),
            topic_alias_maximum: Some(10),
            ..Default::default()
        },
    };
    let bytes = enc(&Packet::ConnAck(Box::new(ack.clone())), V5);
    assert_eq!(
        bytes,
        [0x20, 0x08, 0x00, 0x86, 0x05, 0x24, 0x01, 0x22, 0x00, 0x0A]
    );
    assert_eq!(dec_ok(&bytes, Some(V5)), Packet::ConnAck(Box::new(ack)));
}

#[test]
fn publish_v311_qos1() {
    let bytes = [
        0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
    ];
    let packet = dec_ok(&bytes, Some(V311));
    let expected = Publish {
        qos: QoS::AtLeastOnce,
        topic: "a/b".into(),
        packet_id: 10,
        payload: Bytes::from_static(b"hi"),
        ..Default::default()
    };
    assert_eq!(packet, Packet::Publish(expected));
    assert_eq!(enc(&packet, V311), bytes);
}

#[test]
fn publish_v311_qos0_retained_empty_payload() {
    let bytes = [0x31, 0x03, 0x00, 0x01, b't'];
    let packet = dec_ok(&bytes, Some(V311));
    let expected = Publish {
        retain: true,
        topic: "t".into(),
        ..Default::default()
    };
    assert_eq!(packet, Packet::Publish(expected));
    assert_eq!(enc(&packet, V311), bytes);
}

#[test]
fn publish_v5_qos2_dup_with_properties() {
    // Payload format 1, topic alias 3, subscription identifiers 1 and 300.
    let properties = [0x01, 0x01, 0x23, 0x00, 0x03, 0x0B, 0x01, 0x0B, 0xAC, 0x02];
    let bytes = frame(
        0x3C,
        &cat(&[&s("x"), &[0x12, 0x34], &props(&properties), b"data"]),
    );
    let packet = dec_ok(&bytes, Some(V5));
    let expected = Publish {
        dup: true,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "x".into(),
        packet_id: 0x1234,
        properties: PublishProperties {
            payload_format_indicator: Some(1),
            topic_alias: Some(3),
            subscription_identifiers: vec![1, 300],
            ..Default::default()
        },
        payload: Bytes::from_static(b"data"),
    };
    assert_eq!(packet, Packet::Publish(expected));
    assert_eq!(enc(&packet, V5), bytes);
}

#[test]
fn publish_payload_is_a_slice_of_the_frame() {
    let bytes = [0x30, 0x07, 0x00, 0x01, b't', b'a', b'b', b'c', b'd'];
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let frame_start = buf.as_ptr() as usize;
    let packet = decode_packet(&mut buf, Some(V311), MAX)
        .expect("decodes")
        .expect("complete");
    let Packet::Publish(p) = packet else { panic!() };
    assert_eq!(
        p.payload.as_ptr() as usize,
        frame_start + 5,
        "payload was copied"
    );
}

#[test]
fn pub_acks_v311() {
    for (first, make) in [
        (0x40u8, Packet::PubAck as fn(PubResp) -> Packet),
        (0x50, Packet::PubRec),
        (0x62, Packet::PubRel),
        (0x70, Packet::PubComp),
    ] {
        let bytes = [first, 0x02, 0x00, 0x07];
        let packet = dec_ok(&bytes, Some(V311));
        assert_eq!(packet, make(PubResp::new(7, ReasonCode::SUCCESS)));
        assert_eq!(enc(&packet, V311), bytes);
        assert_eq!(enc(&packet, V5), bytes, "v5 short form");
        assert_eq!(dec_ok(&bytes, Some(V5)), packet);
    }
}

#[test]
fn pub_acks_v5_forms() {
    // Remaining length 3: reason code, no property length.
    let bytes = [0x40, 0x03, 0x00, 0x07, 0x10];
    let packet = dec_ok(&bytes, Some(V5));
    assert_eq!(
        packet,
        Packet::PubAck(PubResp::new(7, ReasonCode::NO_MATCHING_SUBSCRIBERS))
    );
    assert_eq!(enc(&packet, V5), bytes);

    // Remaining length 4: reason code and an empty property section.
    let bytes = [0x50, 0x04, 0x00, 0x07, 0x00, 0x00];
    assert_eq!(
        dec_ok(&bytes, Some(V5)),
        Packet::PubRec(PubResp::new(7, ReasonCode::SUCCESS))
    );

    // With a reason string.
    let bytes = frame(
        0x62,
        &cat(&[&[0x00, 0x07, 0x92], &props(&cat(&[&[0x1F], &s("gone")]))]),
    );
    let packet = dec_ok(&bytes, Some(V5));
    let Packet::PubRel(r) = &packet else { panic!() };
    assert_eq!(r.reason, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND);
    assert_eq!(r.properties.reason_string.as_deref(), Some("gone"));
    assert_eq!(enc(&packet, V5), bytes);
}

#[test]
fn subscribe_v311() {
    let bytes = frame(
        0x82,
        &cat(&[&[0x00, 0x01], &s("a/b"), &[0x01], &s("c/#"), &[0x02]]),
    );
    let packet = dec_ok(&bytes, Some(V311));
    let expected = Subscribe {
        packet_id: 1,
        subscription_identifier: None,
        user_properties: vec![],
        filters: vec![
            SubscribeFilter {
                filter: "a/b".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            },
            SubscribeFilter {
                filter: "c/#".into(),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            },
        ],
    };
    assert_eq!(packet, Packet::Subscribe(expected));
    assert_eq!(enc(&packet, V311), bytes);
}

#[test]
fn subscribe_v5_options_and_identifier() {
    // QoS 1, no local, retain as published, retain handling 2; subscription identifier 5.
    let bytes = frame(
        0x82,
        &cat(&[
            &[0x00, 0x02],
            &props(&[0x0B, 0x05]),
            &s("a/+"),
            &[0b0010_1101],
        ]),
    );
    let packet = dec_ok(&bytes, Some(V5));
    let Packet::Subscribe(sub) = &packet else {
        panic!()
    };
    assert_eq!(sub.subscription_identifier, Some(5));
    assert_eq!(
        sub.filters[0].options,
        SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
        }
    );
    assert_eq!(enc(&packet, V5), bytes);
}

#[test]
fn suback_unsubscribe_unsuback() {
    let suback = [0x90, 0x04, 0x00, 0x01, 0x01, 0x80];
    let packet = dec_ok(&suback, Some(V311));
    assert_eq!(
        packet,
        Packet::SubAck(SubAck {
            packet_id: 1,
            properties: ReasonProperties::default(),
            reasons: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::UNSPECIFIED_ERROR],
        })
    );
    assert_eq!(enc(&packet, V311), suback);

    let suback_v5 = [0x90, 0x05, 0x00, 0x01, 0x00, 0x01, 0x8F];
    let packet = dec_ok(&suback_v5, Some(V5));
    assert_eq!(enc(&packet, V5), suback_v5);

    let unsubscribe = frame(0xA2, &cat(&[&[0x00, 0x03], &s("a/b")]));
    let packet = dec_ok(&unsubscribe, Some(V311));
    assert_eq!(
        packet,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            user_properties: vec![],
            filters: vec!["a/b".into()],
        })
    );
    assert_eq!(enc(&packet, V311), unsubscribe);

    let unsubscribe_v5 = frame(0xA2, &cat(&[&[0x00, 0x03, 0x00], &s("a/b")]));
    assert_eq!(dec_ok(&unsubscribe_v5, Some(V5)), packet);
    assert_eq!(enc(&packet, V5), unsubscribe_v5);

    let unsuback = [0xB0, 0x02, 0x00, 0x03];
    let packet = dec_ok(&unsuback, Some(V311));
    assert_eq!(
        packet,
        Packet::UnsubAck(UnsubAck {
            packet_id: 3,
            ..Default::default()
        })
    );
    assert_eq!(enc(&packet, V311), unsuback);

    let unsuback_v5 = [0xB0, 0x05, 0x00, 0x03, 0x00, 0x00, 0x11];
    let packet = dec_ok(&unsuback_v5, Some(V5));
    let Packet::UnsubAck(u) = &packet else {
        panic!()
    };
    assert_eq!(
        u.reasons,
        vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
    );
    assert_eq!(enc(&packet, V5), unsuback_v5);
}

#[test]
fn ping_and_disconnect() {
    for version in [V31, V311, V5] {
        assert_eq!(dec_ok(&[0xC0, 0x00], Some(version)), Packet::PingReq);
        assert_eq!(dec_ok(&[0xD0, 0x00], Some(version)), Packet::PingResp);
        assert_eq!(enc(&Packet::PingReq, version), [0xC0, 0x00]);
        assert_eq!(enc(&Packet::PingResp, version), [0xD0, 0x00]);
        let disconnect = dec_ok(&[0xE0, 0x00], Some(version));
        assert_eq!(
            disconnect,
            Packet::Disconnect(Disconnect::new(ReasonCode::NORMAL_DISCONNECTION))
        );
        assert_eq!(enc(&disconnect, version), [0xE0, 0x00]);
    }
}

#[test]
fn disconnect_v5_forms() {
    let with_will = [0xE0, 0x01, 0x04];
    let packet = dec_ok(&with_will, Some(V5));
    assert_eq!(
        packet,
        Packet::Disconnect(Disconnect::new(ReasonCode::DISCONNECT_WITH_WILL))
    );
    assert_eq!(enc(&packet, V5), with_will);

    let empty_props = [0xE0, 0x02, 0x00, 0x00];
    assert_eq!(
        dec_ok(&empty_props, Some(V5)),
        Packet::Disconnect(Disconnect::default())
    );

    let session_expiry = [0xE0, 0x07, 0x8E, 0x05, 0x11, 0x00, 0x00, 0x00, 0x3C];
    let packet = dec_ok(&session_expiry, Some(V5));
    let Packet::Disconnect(d) = &packet else {
        panic!()
    };
    assert_eq!(d.reason, ReasonCode::SESSION_TAKEN_OVER);
    assert_eq!(d.properties.session_expiry_interval, Some(60));
    assert_eq!(enc(&packet, V5), session_expiry);
}

#[test]
fn auth_v5_forms() {
    let short = [0xF0, 0x00];
    let packet = dec_ok(&short, Some(V5));
    assert_eq!(packet, Packet::Auth(Auth::default()));
    assert_eq!(enc(&packet, V5), short);

    let bytes = frame(
        0xF0,
        &cat(&[
            &[0x18],
            &props(&cat(&[&[0x15], &s("SCRAM"), &[0x16], &s([1, 2, 3])])),
        ]),
    );
    let packet = dec_ok(&bytes, Some(V5));
    let Packet::Auth(a) = &packet else { panic!() };
    assert_eq!(a.reason, ReasonCode::CONTINUE_AUTHENTICATION);
    assert_eq!(a.properties.authentication_method.as_deref(), Some("SCRAM"));
    assert_eq!(
        a.properties.authentication_data.as_deref(),
        Some(&[1u8, 2, 3][..])
    );
    assert_eq!(enc(&packet, V5), bytes);
}

#[test]
fn utf8_multibyte_topic() {
    let bytes = frame(0x30, &cat(&[&s("température/°C/😀"), b"1"]));
    let packet = dec_ok(&bytes, Some(V311));
    let Packet::Publish(p) = &packet else {
        panic!()
    };
    assert_eq!(p.topic, "température/°C/😀");
    assert_eq!(enc(&packet, V311), bytes);
}

/// The fuzzer's seed inputs are whole sessions / packet sequences that must decode completely.
#[test]
fn fuzz_seeds_decode_completely() {
    let seeds: &[(&[u8], Option<ProtocolVersion>, usize)] = &[
        (
            include_bytes!("../../../fuzz/seeds/decode_packet/v311_session"),
            None,
            13,
        ),
        (
            include_bytes!("../../../fuzz/seeds/decode_packet/v5_session"),
            None,
            18,
        ),
        (
            include_bytes!("../../../fuzz/seeds/decode_packet/v311_packets"),
            Some(V311),
            11,
        ),
        (
            include_bytes!("../../../fuzz/seeds/decode_packet/v5_packets"),
            Some(V5),
            17,
        ),
        (
            include_bytes!("../../../fuzz/seeds/decode_packet/v31_connect"),
            None,
            2,
        ),
        (
            include_bytes!("../../../fuzz/seeds/decode_packet/mosquitto_connect"),
            None,
            1,
        ),
    ];
    for &(bytes, version, count) in seeds {
        let mut buf = bytes::BytesMut::from(bytes);
        let mut version = version;
        let mut decoded = 0;
        while !buf.is_empty() {
            let packet = decode_packet(&mut buf, version, MAX)
                .unwrap_or_else(|e| panic!("packet {decoded}: {e}"))
                .unwrap_or_else(|| panic!("packet {decoded} incomplete"));
            if let Packet::Connect(c) = &packet {
                version = Some(c.protocol);
            }
            decoded += 1;
        }
        assert_eq!(decoded, count);
    }
}
