//! One test per strictness rule of the decoder.

use super::*;
use crate::*;

fn v5_publish(properties: &[u8]) -> Vec<u8> {
    frame(0x32, &cat(&[&s("t"), &[0, 1], &props(properties), b"p"]))
}

fn v5_connect(connect_props: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[&connect_head(5, 0x02), &props(connect_props), &s("c")]),
    )
}

fn v5_connect_with_will(will_props: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[
            &connect_head(5, 0x06),
            &[0],
            &s("c"),
            &props(will_props),
            &s("w"),
            &s("p"),
        ]),
    )
}

fn v311_connect(flags: u8, payload: &[u8]) -> Vec<u8> {
    frame(0x10, &cat(&[&connect_head(4, flags), payload]))
}

// --- fixed header ------------------------------------------------------------------------------

#[test]
fn reserved_packet_type_0_is_malformed() {
    assert_malformed(dec_err(&[0x00, 0x00], Some(V311)));
    assert_malformed(dec_err(&[0x00, 0x00], None));
}

#[test]
fn reserved_flag_bits_are_malformed() {
    let cases: &[(u8, &[u8])] = &[
        (0x11, &[]),
        (0x28, &[0, 0]),
        (0x41, &[0, 1]),
        (0x52, &[0, 1]),
        (0x60, &[0, 1]),
        (0x63, &[0, 1]),
        (0x6A, &[0, 1]),
        (0x74, &[0, 1]),
        (0x80, &[0, 1, 0, 1, b'a', 0]),
        (0x83, &[0, 1, 0, 1, b'a', 0]),
        (0x91, &[0, 1, 0]),
        (0xA0, &[0, 1, 0, 1, b'a']),
        (0xA6, &[0, 1, 0, 1, b'a']),
        (0xB1, &[0, 1]),
        (0xC1, &[]),
        (0xD8, &[]),
        (0xE1, &[]),
    ];
    for &(first, body) in cases {
        let e = dec_err(&frame(first, body), Some(V311));
        assert!(
            matches!(e, DecodeError::Malformed(_)),
            "{first:#04x}: {e:?}"
        );
    }
    assert_malformed(dec_err(&[0xF1, 0x00], Some(V5)));
}

#[test]
fn reserved_flags_rejected_from_the_first_byte() {
    let mut buf = bytes::BytesMut::from(&[0x63u8][..]);
    assert_malformed(decode_packet(&mut buf, Some(V311), MAX).unwrap_err());
}

#[test]
fn publish_qos_3_is_malformed() {
    assert_malformed(dec_err(&frame(0x36, &cat(&[&s("t"), &[0, 1]])), Some(V311)));
    assert_malformed(dec_err(&frame(0x37, &cat(&[&s("t"), &[0, 1]])), Some(V5)));
}

#[test]
fn dup_on_qos0_publish_is_malformed() {
    assert_malformed(dec_err(&frame(0x38, &s("t")), Some(V311)));
    assert_malformed(dec_err(&frame(0x38, &cat(&[&s("t"), &[0]])), Some(V5)));
}

#[test]
fn remaining_length_of_five_bytes_is_malformed() {
    // Detected as soon as the fourth length byte still has its continuation bit.
    let mut buf = bytes::BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF][..]);
    assert_malformed(decode_packet(&mut buf, Some(V311), usize::MAX).unwrap_err());
    let mut buf = bytes::BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x80, 0x01][..]);
    assert_malformed(decode_packet(&mut buf, Some(V311), usize::MAX).unwrap_err());
}

#[test]
fn non_minimal_remaining_length_is_malformed() {
    // 0 encoded in two bytes.
    assert_malformed(dec_err(&[0xC0, 0x80, 0x00], Some(V311)));
}

// --- before CONNECT / protocol versions ---------------------------------------------------------

#[test]
fn first_packet_must_be_connect() {
    assert_protocol(dec_err(&[0xC0, 0x00], None));
    assert_protocol(dec_err(&frame(0x30, &cat(&[&s("t"), b"x"])), None));
    // Rejected from the first byte, without waiting for the body.
    let mut buf = bytes::BytesMut::from(&[0x30u8][..]);
    assert_protocol(decode_packet(&mut buf, None, MAX).unwrap_err());
}

#[test]
fn unknown_protocol_name_is_protocol_error() {
    let bytes = frame(0x10, &cat(&[&s("MQTX"), &[4, 2, 0, 60], &s("c")]));
    assert_protocol(dec_err(&bytes, None));
    let bytes = frame(0x10, &cat(&[&s([0xFF, 0xFE]), &[4, 2, 0, 60], &s("c")]));
    assert_protocol(dec_err(&bytes, None));
}

#[test]
fn unknown_level_is_unsupported_protocol() {
    for (name, level) in [
        ("MQTT", 6u8),
        ("MQTT", 3),
        ("MQTT", 0),
        ("MQIsdp", 4),
        ("MQTT", 0x84),
    ] {
        let v311_shaped = frame(0x10, &cat(&[&s(name), &[level, 2, 0, 60], &s("c")]));
        let v5_shaped = frame(0x10, &cat(&[&s(name), &[level, 2, 0, 60, 0], &s("c")]));
        for (bytes, shaped_as_v5) in [(v311_shaped, false), (v5_shaped, true)] {
            match dec_err(&bytes, None) {
                DecodeError::UnsupportedProtocol {
                    level: l,
                    v5_shaped,
                } => {
                    assert_eq!((l, v5_shaped), (level, shaped_as_v5), "{name} {level}")
                }
                e => panic!("{name} {level}: {e:?}"),
            }
        }
    }
    // Decided before the rest of the packet is looked at: an unreadable rest is not MQTT 5.
    let bytes = frame(0x10, &cat(&[&s("MQTT"), &[6, 0xFF]]));
    assert!(matches!(
        dec_err(&bytes, None),
        DecodeError::UnsupportedProtocol {
            level: 6,
            v5_shaped: false
        }
    ));
    // A 3.1.1 CONNECT with a longer client id does not read as MQTT 5 either.
    let bytes = frame(
        0x10,
        &cat(&[&s("MQTT"), &[99, 2, 0, 30], &s("test3122abcdefgh")]),
    );
    assert!(matches!(
        dec_err(&bytes, None),
        DecodeError::UnsupportedProtocol {
            level: 99,
            v5_shaped: false
        }
    ));
}

#[test]
fn auth_on_v311_is_protocol_error() {
    assert_protocol(dec_err(&[0xF0, 0x00], Some(V311)));
    assert_protocol(dec_err(&[0xF0, 0x00], Some(V31)));
}

// --- packet identifiers -------------------------------------------------------------------------

#[test]
fn packet_id_zero_is_protocol_error() {
    let cases: Vec<(Vec<u8>, ProtocolVersion)> = vec![
        (frame(0x32, &cat(&[&s("t"), &[0, 0]])), V311),
        (frame(0x34, &cat(&[&s("t"), &[0, 0], &[0]])), V5),
        (vec![0x40, 0x02, 0, 0], V311),
        (vec![0x50, 0x02, 0, 0], V5),
        (vec![0x62, 0x02, 0, 0], V311),
        (vec![0x70, 0x02, 0, 0], V311),
        (frame(0x82, &cat(&[&[0, 0], &s("a"), &[0]])), V311),
        (vec![0x90, 0x03, 0, 0, 0], V311),
        (frame(0xA2, &cat(&[&[0, 0], &s("a")])), V311),
        (vec![0xB0, 0x02, 0, 0], V311),
    ];
    for (bytes, version) in cases {
        let e = dec_err(&bytes, Some(version));
        assert!(matches!(e, DecodeError::Protocol(_)), "{bytes:02x?}: {e:?}");
    }
}

#[test]
fn qos0_publish_has_no_packet_id() {
    // The two bytes after the topic are payload, not an identifier.
    let packet = dec_ok(&frame(0x30, &cat(&[&s("t"), &[0, 0]])), Some(V311));
    let Packet::Publish(p) = packet else { panic!() };
    assert_eq!(p.packet_id, 0);
    assert_eq!(&p.payload[..], &[0, 0]);
}

// --- strings and topics -------------------------------------------------------------------------

#[test]
fn invalid_utf8_is_malformed() {
    // A lone continuation byte, an overlong encoding, and a UTF-16 surrogate (U+D800).
    for bad in [&[0x80u8][..], &[0xC0, 0xAF], &[0xED, 0xA0, 0x80]] {
        assert_malformed(dec_err(&frame(0x30, &s(bad)), Some(V311)));
    }
    let bytes = v311_connect(0x02, &s([b'c', 0xFF]));
    assert_malformed(dec_err(&bytes, None));
}

#[test]
fn nul_in_string_is_malformed() {
    assert_malformed(dec_err(&frame(0x30, &s("a\0b")), Some(V311)));
    assert_malformed(dec_err(&v311_connect(0x02, &s("c\0")), None));
    let user = cat(&[&[0x26], &s("k\0"), &s("v")]);
    assert_malformed(dec_err(&v5_publish(&user), Some(V5)));
    let filter = frame(0x82, &cat(&[&[0, 1], &s("a\0"), &[0]]));
    assert_malformed(dec_err(&filter, Some(V311)));
}

#[test]
fn string_longer_than_packet_is_malformed() {
    assert_malformed(dec_err(&frame(0x30, &[0x00, 0x05, b'a']), Some(V311)));
    assert_malformed(dec_err(&frame(0x30, &[0x00]), Some(V311)));
}

#[test]
fn wildcard_in_publish_topic_is_topic_name_invalid() {
    for topic in ["a/+", "a/#", "#", "+", "a+b"] {
        assert_topic_invalid(dec_err(&frame(0x30, &s(topic)), Some(V311)));
        assert_topic_invalid(dec_err(&frame(0x30, &cat(&[&s(topic), &[0]])), Some(V5)));
    }
}

#[test]
fn empty_topic_v311_is_topic_name_invalid() {
    assert_topic_invalid(dec_err(&frame(0x30, &cat(&[&s(""), b"x"])), Some(V311)));
}

#[test]
fn empty_topic_v5_needs_topic_alias() {
    let without = frame(0x30, &cat(&[&s(""), &[0], b"x"]));
    assert_protocol(dec_err(&without, Some(V5)));
    let with = frame(0x30, &cat(&[&s(""), &props(&[0x23, 0, 7]), b"x"]));
    let Packet::Publish(p) = dec_ok(&with, Some(V5)) else {
        panic!()
    };
    assert_eq!(p.topic, "");
    assert_eq!(p.properties.topic_alias, Some(7));
}

#[test]
fn will_topic_rules() {
    let wildcard = v311_connect(0x06, &cat(&[&s("c"), &s("w/#"), &s("p")]));
    assert_topic_invalid(dec_err(&wildcard, None));
    let empty = v311_connect(0x06, &cat(&[&s("c"), &s(""), &s("p")]));
    assert_topic_invalid(dec_err(&empty, None));
}

// --- CONNECT flags ------------------------------------------------------------------------------

#[test]
fn connect_reserved_flag_is_malformed() {
    assert_malformed(dec_err(&v311_connect(0x03, &s("c")), None));
    let v5 = frame(0x10, &cat(&[&connect_head(5, 0x01), &[0], &s("c")]));
    assert_malformed(dec_err(&v5, None));
}

#[test]
fn will_qos_without_will_flag_is_malformed() {
    assert_malformed(dec_err(&v311_connect(0x0A, &s("c")), None));
}

#[test]
fn will_retain_without_will_flag_is_malformed() {
    assert_malformed(dec_err(&v311_connect(0x22, &s("c")), None));
}

#[test]
fn will_qos_3_is_malformed() {
    let bytes = v311_connect(0x1E, &cat(&[&s("c"), &s("w"), &s("p")]));
    assert_malformed(dec_err(&bytes, None));
}

#[test]
fn password_without_username_v311_is_malformed_but_allowed_in_v5() {
    assert_malformed(dec_err(
        &v311_connect(0x42, &cat(&[&s("c"), &s("pw")])),
        None,
    ));
    let v5 = frame(
        0x10,
        &cat(&[&connect_head(5, 0x42), &[0], &s("c"), &s("pw")]),
    );
    let Packet::Connect(c) = dec_ok(&v5, None) else {
        panic!()
    };
    assert_eq!(c.username, None);
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
}

#[test]
fn connect_missing_payload_fields_is_malformed() {
    // User name flag set, no user name.
    assert_malformed(dec_err(&v311_connect(0x82, &s("c")), None));
    // Will flag set, no will.
    assert_malformed(dec_err(&v311_connect(0x06, &s("c")), None));
}

// --- SUBSCRIBE / UNSUBSCRIBE --------------------------------------------------------------------

#[test]
fn subscribe_without_filters_is_protocol_error() {
    assert_protocol(dec_err(&[0x82, 0x02, 0, 1], Some(V311)));
    assert_protocol(dec_err(&[0x82, 0x03, 0, 1, 0], Some(V5)));
}

#[test]
fn unsubscribe_without_filters_is_protocol_error() {
    assert_protocol(dec_err(&[0xA2, 0x02, 0, 1], Some(V311)));
    assert_protocol(dec_err(&[0xA2, 0x03, 0, 1, 0], Some(V5)));
}

#[test]
fn subscribe_filter_without_options_is_malformed() {
    assert_malformed(dec_err(&frame(0x82, &cat(&[&[0, 1], &s("a")])), Some(V311)));
}

#[test]
fn subscription_options_reserved_bits_are_malformed() {
    for options in [0x40u8, 0x80, 0xC1] {
        let bytes = frame(0x82, &cat(&[&[0, 1, 0], &s("a"), &[options]]));
        assert_malformed(dec_err(&bytes, Some(V5)));
    }
}

#[test]
fn retain_handling_3_is_protocol_error() {
    let bytes = frame(0x82, &cat(&[&[0, 1, 0], &s("a"), &[0x30]]));
    assert_protocol(dec_err(&bytes, Some(V5)));
}

#[test]
fn subscription_maximum_qos_3_v5_is_protocol_error() {
    let bytes = frame(0x82, &cat(&[&[0, 1, 0], &s("a"), &[0x03]]));
    assert_protocol(dec_err(&bytes, Some(V5)));
}

#[test]
fn v311_requested_qos_upper_bits_are_malformed() {
    for options in [0x04u8, 0x08, 0x10, 0x80, 0x03] {
        let bytes = frame(0x82, &cat(&[&[0, 1], &s("a"), &[options]]));
        assert_malformed(dec_err(&bytes, Some(V311)));
    }
}

#[test]
fn no_local_on_shared_subscription_is_protocol_error() {
    let bytes = frame(0x82, &cat(&[&[0, 1, 0], &s("$share/g/a"), &[0x04]]));
    assert_protocol(dec_err(&bytes, Some(V5)));
    let ok = frame(0x82, &cat(&[&[0, 1, 0], &s("$share/g/a"), &[0x01]]));
    dec_ok(&ok, Some(V5));
}

#[test]
fn suback_without_reason_codes_is_protocol_error() {
    assert_protocol(dec_err(&[0x90, 0x02, 0, 1], Some(V311)));
    assert_protocol(dec_err(&[0x90, 0x03, 0, 1, 0], Some(V5)));
    assert_protocol(dec_err(&[0xB0, 0x03, 0, 1, 0], Some(V5)));
}

// --- properties ---------------------------------------------------------------------------------

#[test]
fn property_not_allowed_on_packet_is_protocol_error() {
    // Topic alias on CONNECT, session expiry on PUBLISH, reason string on SUBSCRIBE.
    assert_protocol(dec_err(&v5_connect(&[0x23, 0, 1]), None));
    assert_protocol(dec_err(&v5_publish(&[0x11, 0, 0, 0, 1]), Some(V5)));
    let sub = frame(
        0x82,
        &cat(&[&[0, 1], &props(&cat(&[&[0x1F], &s("r")])), &s("a"), &[0]]),
    );
    assert_protocol(dec_err(&sub, Some(V5)));
    // Will delay interval is only allowed among the will properties.
    assert_protocol(dec_err(&v5_publish(&[0x18, 0, 0, 0, 1]), Some(V5)));
}

#[test]
fn unknown_property_is_malformed() {
    assert_malformed(dec_err(&v5_publish(&[0x7F, 0]), Some(V5)));
    assert_malformed(dec_err(&v5_publish(&[0x00]), Some(V5)));
    assert_malformed(dec_err(&v5_connect(&[0x2B, 0]), None));
}

#[test]
fn duplicate_property_is_protocol_error() {
    assert_protocol(dec_err(
        &v5_publish(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]),
        Some(V5),
    ));
    assert_protocol(dec_err(&v5_connect(&[0x21, 0, 1, 0x21, 0, 2]), None));
    let sub = frame(
        0x82,
        &cat(&[&[0, 1], &props(&[0x0B, 1, 0x0B, 2]), &s("a"), &[0]]),
    );
    assert_protocol(dec_err(&sub, Some(V5)));
}

#[test]
fn repeatable_properties_may_repeat() {
    let user = cat(&[&[0x26], &s("k"), &s("1"), &[0x26], &s("k"), &s("2")]);
    let Packet::Publish(p) = dec_ok(&v5_publish(&cat(&[&user, &[0x0B, 1, 0x0B, 2]])), Some(V5))
    else {
        panic!()
    };
    assert_eq!(p.properties.user_properties.len(), 2);
    assert_eq!(p.properties.subscription_identifiers, vec![1, 2]);
}

#[test]
fn subscription_identifier_0_is_protocol_error() {
    let sub = frame(0x82, &cat(&[&[0, 1], &props(&[0x0B, 0]), &s("a"), &[0]]));
    assert_protocol(dec_err(&sub, Some(V5)));
    assert_protocol(dec_err(&v5_publish(&[0x0B, 0]), Some(V5)));
}

#[test]
fn property_varint_over_4_bytes_is_malformed() {
    assert_malformed(dec_err(
        &v5_publish(&[0x0B, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        Some(V5),
    ));
    // Property length itself.
    let bytes = frame(
        0x32,
        &cat(&[&s("t"), &[0, 1], &[0x80, 0x80, 0x80, 0x80, 0x01]]),
    );
    assert_malformed(dec_err(&bytes, Some(V5)));
}

#[test]
fn property_length_past_packet_is_malformed() {
    let bytes = frame(0x32, &cat(&[&s("t"), &[0, 1], &[0x10, 0x01, 0x01]]));
    assert_malformed(dec_err(&bytes, Some(V5)));
}

#[test]
fn property_value_past_property_section_is_malformed() {
    // Section of 2 bytes holding a 4-byte message expiry interval (the payload follows).
    let bytes = frame(
        0x32,
        &cat(&[&s("t"), &[0, 1], &[0x02, 0x02, 0x00], b"abcdef"]),
    );
    assert_malformed(dec_err(&bytes, Some(V5)));
}

#[test]
fn topic_alias_0_is_protocol_error() {
    assert_protocol(dec_err(&v5_publish(&[0x23, 0, 0]), Some(V5)));
}

#[test]
fn receive_maximum_0_is_protocol_error() {
    assert_protocol(dec_err(&v5_connect(&[0x21, 0, 0]), None));
    let connack = frame(0x20, &cat(&[&[0, 0], &props(&[0x21, 0, 0])]));
    assert_protocol(dec_err(&connack, Some(V5)));
}

#[test]
fn maximum_packet_size_0_is_protocol_error() {
    assert_protocol(dec_err(&v5_connect(&[0x27, 0, 0, 0, 0]), None));
}

#[test]
fn payload_format_indicator_must_be_0_or_1() {
    assert_protocol(dec_err(&v5_publish(&[0x01, 2]), Some(V5)));
    assert_protocol(dec_err(&v5_connect_with_will(&[0x01, 0xFF]), None));
    dec_ok(&v5_publish(&[0x01, 0]), Some(V5));
}

#[test]
fn boolean_properties_must_be_0_or_1() {
    assert_protocol(dec_err(&v5_connect(&[0x17, 2]), None));
    assert_protocol(dec_err(&v5_connect(&[0x19, 2]), None));
    let connack = frame(0x20, &cat(&[&[0, 0], &props(&[0x25, 2])]));
    assert_protocol(dec_err(&connack, Some(V5)));
    let connack = frame(0x20, &cat(&[&[0, 0], &props(&[0x24, 2])]));
    assert_protocol(dec_err(&connack, Some(V5)));
}

#[test]
fn will_properties_reject_topic_alias_and_subscription_identifier() {
    assert_protocol(dec_err(&v5_connect_with_will(&[0x23, 0, 1]), None));
    assert_protocol(dec_err(&v5_connect_with_will(&[0x0B, 1]), None));
    let Packet::Connect(c) = dec_ok(&v5_connect_with_will(&[0x18, 0, 0, 0, 9]), None) else {
        panic!()
    };
    assert_eq!(c.will.expect("will").delay_interval, Some(9));
}

#[test]
fn authentication_data_without_method_is_protocol_error() {
    assert_protocol(dec_err(&v5_connect(&cat(&[&[0x16], &s("x")])), None));
    let auth = frame(0xF0, &cat(&[&[0x18], &props(&cat(&[&[0x16], &s("x")]))]));
    assert_protocol(dec_err(&auth, Some(V5)));
}

#[test]
fn response_topic_with_wildcard_is_protocol_error() {
    assert_protocol(dec_err(&v5_publish(&cat(&[&[0x08], &s("r/#")])), Some(V5)));
}

#[test]
fn reason_code_not_allowed_is_protocol_error() {
    assert_protocol(dec_err(&[0x40, 0x03, 0, 1, 0x92], Some(V5)));
    assert_protocol(dec_err(&[0x62, 0x03, 0, 1, 0x10], Some(V5)));
    assert_protocol(dec_err(&[0xE0, 0x01, 0x01], Some(V5)));
    assert_protocol(dec_err(&[0xF0, 0x01, 0x01], Some(V5)));
    assert_protocol(dec_err(&[0x20, 0x03, 0, 0x10, 0], Some(V5)));
    assert_protocol(dec_err(&[0x90, 0x04, 0, 1, 0, 0x03], Some(V5)));
    assert_protocol(dec_err(&[0xB0, 0x04, 0, 1, 0, 0x01], Some(V5)));
    assert_protocol(dec_err(&[0x90, 0x03, 0, 1, 0x03], Some(V311)));
    assert_protocol(dec_err(&[0x20, 0x02, 0, 6], Some(V311)));
}

#[test]
fn connack_flags() {
    assert_malformed(dec_err(&[0x20, 0x02, 0x02, 0x00], Some(V311)));
    assert_malformed(dec_err(&[0x20, 0x03, 0x80, 0x00, 0x00], Some(V5)));
    // Session present on a refused connection.
    assert_protocol(dec_err(&[0x20, 0x02, 0x01, 0x05], Some(V311)));
    assert_protocol(dec_err(&[0x20, 0x03, 0x01, 0x87, 0x00], Some(V5)));
}

// --- trailing bytes -----------------------------------------------------------------------------

#[test]
fn trailing_bytes_are_malformed() {
    let cases: Vec<(Vec<u8>, Option<ProtocolVersion>)> = vec![
        (v311_connect(0x02, &cat(&[&s("c"), &[0]])), None),
        (vec![0x20, 0x03, 0, 0, 0], Some(V311)),
        (vec![0x20, 0x04, 0, 0, 0, 0], Some(V5)),
        (vec![0x40, 0x03, 0, 1, 0], Some(V311)),
        (vec![0x40, 0x05, 0, 1, 0, 0, 0], Some(V5)),
        (vec![0xB0, 0x03, 0, 1, 0], Some(V311)),
        (vec![0xC0, 0x01, 0], Some(V311)),
        (vec![0xD0, 0x01, 0], Some(V5)),
        (vec![0xE0, 0x01, 0], Some(V311)),
        (vec![0xE0, 0x03, 0, 0, 0], Some(V5)),
        (vec![0xF0, 0x03, 0, 0, 0], Some(V5)),
        (frame(0xA2, &cat(&[&[0, 1], &s("a"), &[0]])), Some(V311)),
    ];
    for (bytes, version) in cases {
        let e = dec_err(&bytes, version);
        assert!(
            matches!(e, DecodeError::Malformed(_)),
            "{bytes:02x?}: {e:?}"
        );
    }
}

#[test]
fn reason_codes_of_errors() {
    assert_eq!(
        DecodeError::Malformed("x").reason_code(),
        ReasonCode::MALFORMED_PACKET
    );
    assert_eq!(
        DecodeError::Protocol("x").reason_code(),
        ReasonCode::PROTOCOL_ERROR
    );
    assert_eq!(
        DecodeError::TooLarge { size: 2, max: 1 }.reason_code(),
        ReasonCode::PACKET_TOO_LARGE
    );
    assert_eq!(
        DecodeError::UnsupportedProtocol {
            level: 9,
            v5_shaped: true
        }
        .reason_code(),
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
    );
    assert_eq!(
        DecodeError::TopicNameInvalid("x").reason_code(),
        ReasonCode::TOPIC_NAME_INVALID
    );
}
