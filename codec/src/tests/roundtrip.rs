//! Round trips: every packet type in every version, with generated values that are valid for
//! that version, must decode to exactly what was encoded, also when fed in two pieces.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::*;
use crate::decode::{
    AUTH_CODES, CONNACK_CODES, DISCONNECT_CODES, PUBACK_CODES, PUBREL_CODES, SUBACK_CODES,
    UNSUBACK_CODES,
};
use crate::*;

// --- leaf strategies ----------------------------------------------------------------------------

/// Any string MQTT allows (no U+0000), mostly short.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9/_ -]{0,10}",
        1 => "[^\\x00]{0,6}",
    ]
}

/// A non-empty topic name without wildcards.
fn topic_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_-]{1,6}(/[a-z0-9_-]{0,6}){0,3}",
        1 => "[^\\x00+#]{1,6}",
    ]
}

/// A topic filter (the codec does not check filter syntax); no `$` so that "$share/" cannot
/// appear together with No Local.
fn topic_filter() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9+#/]{1,10}",
        1 => "[^\\x00$]{1,6}",
    ]
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn user_properties() -> impl Strategy<Value = UserProperties> {
    vec((text(), text()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn subscription_id() -> impl Strategy<Value = u32> {
    prop_oneof![1..=127u32, 1..=MAX_REMAINING_LENGTH as u32]
}

fn code(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(codes).prop_map(ReasonCode)
}

fn reason_properties(v5: bool) -> BoxedStrategy<ReasonProperties> {
    if !v5 {
        return Just(ReasonProperties::default()).boxed();
    }
    (option::of(text()), user_properties())
        .prop_map(|(reason_string, user_properties)| ReasonProperties {
            reason_string,
            user_properties,
        })
        .boxed()
}

// --- property sets ------------------------------------------------------------------------------

fn publish_properties(will: bool) -> impl Strategy<Value = PublishProperties> {
    (
        option::of(0..=1u8),
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(topic_name()),
        option::of(binary()),
        user_properties(),
        vec(subscription_id(), 0..3),
        option::of(text()),
    )
        .prop_map(
            move |(pfi, expiry, alias, response, correlation, user, ids, content)| {
                PublishProperties {
                    payload_format_indicator: pfi,
                    message_expiry_interval: expiry,
                    topic_alias: if will { None } else { alias },
                    response_topic: response,
                    correlation_data: correlation,
                    user_properties: user,
                    subscription_identifiers: if will { Vec::new() } else { ids },
                    content_type: content,
                }
            },
        )
}

fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(1..=u32::MAX),
        option::of(any::<u16>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        user_properties(),
        option::of(text()),
        option::of(binary()),
    )
        .prop_map(
            |(expiry, receive, max_size, alias_max, rri, rpi, user, method, data)| {
                ConnectProperties {
                    session_expiry_interval: expiry,
                    receive_maximum: receive,
                    maximum_packet_size: max_size,
                    topic_alias_maximum: alias_max,
                    request_response_information: rri,
                    request_problem_information: rpi,
                    user_properties: user,
                    // Authentication data needs a method.
                    authentication_data: if method.is_some() { data } else { None },
                    authentication_method: method,
                }
            },
        )
}

fn connack_properties() -> impl Strategy<Value = ConnAckProperties> {
    let a = (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
        option::of(any::<bool>()),
        option::of(1..=u32::MAX),
        option::of(text()),
        option::of(any::<u16>()),
        option::of(text()),
    );
    let b = (
        user_properties(),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<u16>()),
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(binary()),
    );
    (a, b).prop_map(
        |(
            (expiry, receive, max_qos, retain, max_size, assigned, alias_max, reason),
            (user, wildcard, sub_ids, shared, keep_alive, response, reference, method, data),
        )| ConnAckProperties {
            session_expiry_interval: expiry,
            receive_maximum: receive,
            maximum_qos: max_qos,
            retain_available: retain,
            maximum_packet_size: max_size,
            assigned_client_identifier: assigned,
            topic_alias_maximum: alias_max,
            reason_string: reason,
            user_properties: user,
            wildcard_subscription_available: wildcard,
            subscription_identifiers_available: sub_ids,
            shared_subscription_available: shared,
            server_keep_alive: keep_alive,
            response_information: response,
            server_reference: reference,
            authentication_method: method,
            authentication_data: data,
        },
    )
}

// --- packets ------------------------------------------------------------------------------------

fn connect(v5: bool) -> impl Strategy<Value = Packet> {
    let protocol = if v5 {
        Just(V5).boxed()
    } else {
        prop_oneof![Just(V311), Just(V31)].boxed()
    };
    let will = (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        option::of(any::<u32>()),
        publish_properties(true),
    )
        .prop_map(
            move |(topic, payload, qos, retain, delay, properties)| LastWill {
                topic,
                payload,
                qos,
                retain,
                delay_interval: if v5 { delay } else { None },
                properties: if v5 { properties } else { Default::default() },
            },
        );
    (
        protocol,
        any::<bool>(),
        any::<u16>(),
        text(),
        option::of(will),
        option::of(text()),
        option::of(binary()),
        connect_properties(),
    )
        .prop_map(
            move |(
                protocol,
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                password,
                props,
            )| {
                // 3.1.1 cannot carry a password without a user name.
                let username = if !v5 && password.is_some() && username.is_none() {
                    Some(String::new())
                } else {
                    username
                };
                Packet::Connect(Box::new(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties: if v5 { props } else { Default::default() },
                }))
            },
        )
}

fn connack(v5: bool) -> impl Strategy<Value = Packet> {
    let reason = if v5 {
        code(CONNACK_CODES).boxed()
    } else {
        // The reason codes 3.1.1 return codes map back to.
        code(&[0x00, 0x84, 0x85, 0x88, 0x86, 0x87]).boxed()
    };
    (any::<bool>(), reason, connack_properties()).prop_map(move |(present, reason, props)| {
        Packet::ConnAck(Box::new(ConnAck {
            session_present: present && reason == ReasonCode::SUCCESS,
            reason,
            properties: if v5 { props } else { Default::default() },
        }))
    })
}

fn publish(v5: bool) -> impl Strategy<Value = Packet> {
    let topic = if v5 {
        prop_oneof![4 => topic_name(), 1 => Just(String::new())].boxed()
    } else {
        topic_name().boxed()
    };
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic,
        packet_id(),
        publish_properties(false),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(
            move |(qos, dup, retain, topic, id, mut properties, payload)| {
                if !v5 {
                    properties = PublishProperties::default();
                } else if topic.is_empty() && properties.topic_alias.is_none() {
                    properties.topic_alias = Some(1);
                }
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic,
                    packet_id: if qos0 { 0 } else { id },
                    properties,
                    payload: Bytes::from(payload),
                })
            },
        )
}

fn pub_resp(v5: bool, codes: &'static [u8]) -> impl Strategy<Value = PubResp> {
    let reason = if v5 {
        code(codes).boxed()
    } else {
        Just(ReasonCode::SUCCESS).boxed()
    };
    (packet_id(), reason, reason_properties(v5)).prop_map(|(packet_id, reason, properties)| {
        PubResp {
            packet_id,
            reason,
            properties,
        }
    })
}

fn subscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let options = (qos(), any::<bool>(), any::<bool>(), 0..=2u8).prop_map(
        move |(qos, no_local, retain_as_published, retain_handling)| {
            if v5 {
                SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                }
            } else {
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                }
            }
        },
    );
    (
        packet_id(),
        option::of(subscription_id()),
        user_properties(),
        vec(
            (topic_filter(), options)
                .prop_map(|(filter, options)| SubscribeFilter { filter, options }),
            1..4,
        ),
    )
        .prop_map(move |(packet_id, id, user, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                subscription_identifier: if v5 { id } else { None },
                user_properties: if v5 { user } else { Vec::new() },
                filters,
            })
        })
}

fn suback(v5: bool) -> impl Strategy<Value = Packet> {
    let codes: &'static [u8] = if v5 {
        SUBACK_CODES
    } else {
        &[0x00, 0x01, 0x02, 0x80]
    };
    (packet_id(), reason_properties(v5), vec(code(codes), 1..5)).prop_map(
        |(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        },
    )
}

fn unsubscribe(v5: bool) -> impl Strategy<Value = Packet> {
    (packet_id(), user_properties(), vec(topic_filter(), 1..4)).prop_map(
        move |(packet_id, user, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                user_properties: if v5 { user } else { Vec::new() },
                filters,
            })
        },
    )
}

fn unsuback(v5: bool) -> impl Strategy<Value = Packet> {
    let reasons = if v5 {
        vec(code(UNSUBACK_CODES), 1..5).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (packet_id(), reason_properties(v5), reasons).prop_map(|(packet_id, properties, reasons)| {
        Packet::UnsubAck(UnsubAck {
            packet_id,
            properties,
            reasons,
        })
    })
}

fn disconnect(v5: bool) -> BoxedStrategy<Packet> {
    if !v5 {
        return Just(Packet::Disconnect(Disconnect::default())).boxed();
    }
    (
        code(DISCONNECT_CODES),
        option::of(any::<u32>()),
        option::of(text()),
        user_properties(),
        option::of(text()),
    )
        .prop_map(|(reason, expiry, reason_string, user, reference)| {
            Packet::Disconnect(Disconnect {
                reason,
                properties: DisconnectProperties {
                    session_expiry_interval: expiry,
                    reason_string,
                    user_properties: user,
                    server_reference: reference,
                },
            })
        })
        .boxed()
}

fn auth() -> impl Strategy<Value = Packet> {
    (
        code(AUTH_CODES),
        option::of(text()),
        option::of(binary()),
        option::of(text()),
        user_properties(),
    )
        .prop_map(|(reason, method, data, reason_string, user)| {
            Packet::Auth(Auth {
                reason,
                properties: AuthProperties {
                    authentication_data: if method.is_some() { data } else { None },
                    authentication_method: method,
                    reason_string,
                    user_properties: user,
                },
            })
        })
}

/// Any packet valid for `version`.
fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let common = prop_oneof![
        1 => connect(v5),
        1 => connack(v5),
        4 => publish(v5),
        1 => pub_resp(v5, PUBACK_CODES).prop_map(Packet::PubAck),
        1 => pub_resp(v5, PUBACK_CODES).prop_map(Packet::PubRec),
        1 => pub_resp(v5, PUBREL_CODES).prop_map(Packet::PubRel),
        1 => pub_resp(v5, PUBREL_CODES).prop_map(Packet::PubComp),
        1 => subscribe(v5),
        1 => suback(v5),
        1 => unsubscribe(v5),
        1 => unsuback(v5),
        1 => Just(Packet::PingReq),
        1 => Just(Packet::PingResp),
        1 => disconnect(v5),
    ];
    if v5 {
        prop_oneof![10 => common, 1 => auth()].boxed()
    } else {
        common.boxed()
    }
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(V31), Just(V311), Just(V5)]
}

/// Encodes, decodes whole and in two pieces, and compares.
fn check_round_trip(packet: &Packet, version: ProtocolVersion, split: usize) {
    let bytes = enc(packet, version);
    // CONNECT is decoded before the version is known.
    let decode_version = match packet {
        Packet::Connect(_) => None,
        _ => Some(version),
    };
    assert_eq!(
        &dec_ok(&bytes, decode_version),
        packet,
        "bytes {bytes:02x?}"
    );
    if matches!(packet, Packet::Connect(_)) {
        assert_eq!(&dec_ok(&bytes, Some(version)), packet);
    }

    let split = split % bytes.len();
    let mut buf = BytesMut::from(&bytes[..split]);
    assert_eq!(
        decode_packet(&mut buf, decode_version, MAX).expect("prefix is fine"),
        None
    );
    buf.extend_from_slice(&bytes[split..]);
    let decoded = decode_packet(&mut buf, decode_version, MAX)
        .expect("decodes")
        .expect("complete");
    assert_eq!(&decoded, packet);
    assert!(buf.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn round_trip((version, packet, split) in version().prop_flat_map(|v| (Just(v), packet(v), any::<usize>()))) {
        check_round_trip(&packet, version, split);
    }

    /// Whatever a 3.1.1 encoder writes for a v5 packet decodes as 3.1.1.
    #[test]
    fn v5_packets_encode_as_valid_v311(packet in packet(V5)) {
        if matches!(packet, Packet::Auth(_)) {
            return Ok(());
        }
        let mut buf = BytesMut::new();
        if let Err(e) = encode_packet(&packet, V311, &mut buf) {
            // Only an alias-only PUBLISH cannot be expressed in 3.1.1.
            prop_assert!(
                matches!(&packet, Packet::Publish(p) if p.topic.is_empty()),
                "{:?}: {}", packet, e
            );
            return Ok(());
        }
        prop_assert_eq!(buf.len(), encoded_len(&packet, V311));
        let version = match &packet {
            Packet::Connect(_) => None,
            _ => Some(V311),
        };
        let decoded = decode_packet(&mut buf, version, MAX);
        prop_assert!(matches!(decoded, Ok(Some(_))), "{:?} -> {:?}", packet, decoded);
        prop_assert!(buf.is_empty());
    }

    /// Arbitrary bytes never panic, and what decodes re-encodes to the same packet.
    #[test]
    fn arbitrary_bytes(data in vec(any::<u8>(), 0..200), which in 0..3usize) {
        let version = [None, Some(V311), Some(V5)][which];
        fuzz_one(&data, version);
    }

    /// Valid packets with one byte changed never panic either.
    #[test]
    fn mutated_packets((version, packet, at, byte) in version().prop_flat_map(|v| (Just(v), packet(v), any::<usize>(), any::<u8>()))) {
        let mut bytes = enc(&packet, version);
        let at = at % bytes.len();
        bytes[at] = byte;
        let decode_version = if matches!(packet, Packet::Connect(_)) { None } else { Some(version) };
        fuzz_one(&bytes, decode_version);
    }
}

/// What the fuzz target does, for proptest's benefit.
pub(crate) fn fuzz_one(data: &[u8], version: Option<ProtocolVersion>) {
    let mut buf = BytesMut::from(data);
    let mut version = version;
    while let Ok(Some(packet)) = decode_packet(&mut buf, version, MAX) {
        let encode_version = match (&packet, version) {
            (Packet::Connect(c), _) => c.protocol,
            (_, Some(v)) => v,
            (_, None) => unreachable!("only CONNECT decodes before the version is known"),
        };
        if let Packet::Connect(c) = &packet {
            version = Some(c.protocol);
        }
        let bytes = enc(&packet, encode_version);
        assert_eq!(dec_ok(&bytes, Some(encode_version)), packet);
    }
}

#[test]
fn every_packet_type_both_versions() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for version in [V31, V311, V5] {
        let v5 = version.is_v5();
        let strategies: Vec<BoxedStrategy<Packet>> = vec![
            connect(v5).boxed(),
            connack(v5).boxed(),
            publish(v5).boxed(),
            pub_resp(v5, PUBACK_CODES).prop_map(Packet::PubAck).boxed(),
            pub_resp(v5, PUBACK_CODES).prop_map(Packet::PubRec).boxed(),
            pub_resp(v5, PUBREL_CODES).prop_map(Packet::PubRel).boxed(),
            pub_resp(v5, PUBREL_CODES).prop_map(Packet::PubComp).boxed(),
            subscribe(v5).boxed(),
            suback(v5).boxed(),
            unsubscribe(v5).boxed(),
            unsuback(v5).boxed(),
            Just(Packet::PingReq).boxed(),
            Just(Packet::PingResp).boxed(),
            disconnect(v5),
        ];
        let mut strategies = strategies;
        if v5 {
            strategies.push(auth().boxed());
        }
        for strategy in strategies {
            for i in 0..50 {
                let packet = strategy.new_tree(&mut runner).expect("value").current();
                check_round_trip(&packet, version, i);
            }
        }
    }
}

#[test]
fn large_packet_round_trip() {
    // A 4-byte remaining length.
    let packet = Packet::Publish(Publish {
        qos: QoS::ExactlyOnce,
        topic: "big".into(),
        packet_id: 1,
        payload: vec![1u8; 3_000_000].into(),
        ..Default::default()
    });
    for version in [V311, V5] {
        let bytes = enc(&packet, version);
        assert_eq!(bytes[1..5].iter().filter(|b| *b & 0x80 != 0).count(), 3);
        let mut buf = BytesMut::from(&bytes[..]);
        let decoded = decode_packet(&mut buf, Some(version), 4_000_000)
            .expect("decodes")
            .expect("complete");
        assert_eq!(decoded, packet);
    }
}
