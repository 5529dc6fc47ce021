//! Feeds arbitrary bytes through `decode_packet` for each starting version (before CONNECT,
//! 3.1.1, 5), packet after packet until an error or a need for more bytes. Every packet that
//! decodes must encode (to exactly `encoded_len` bytes) and decode back to the same value.

#![no_main]

use bytes::BytesMut;
use jetmq_codec::{decode_packet, encode_packet, encoded_len, Packet, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

const MAX_PACKET_SIZE: usize = 1 << 16;

fn run(data: &[u8], mut version: Option<ProtocolVersion>) {
    let mut buf = BytesMut::from(data);
    // Decoding stops at the first error or incomplete packet; errors are expected here, only
    // panics and mismatches are failures.
    while let Ok(Some(packet)) = decode_packet(&mut buf, version, MAX_PACKET_SIZE) {
        if let Packet::Connect(connect) = &packet {
            version = Some(connect.protocol);
        }
        let Some(encode_version) = version else {
            panic!("{} decoded before CONNECT", packet.name());
        };

        let mut encoded = BytesMut::new();
        if let Err(e) = encode_packet(&packet, encode_version, &mut encoded) {
            panic!("decoded packet does not encode: {e}\n{packet:?}");
        }
        assert_eq!(
            encoded.len(),
            encoded_len(&packet, encode_version),
            "encoded_len is wrong for {packet:?}"
        );

        let mut again = encoded.clone();
        match decode_packet(&mut again, Some(encode_version), usize::MAX) {
            Ok(Some(decoded)) => {
                assert_eq!(decoded, packet, "re-encoded bytes {:02x?}", &encoded[..]);
                assert!(again.is_empty(), "re-encoded packet left bytes behind");
            }
            other => panic!("re-encoded {packet:?} as {:02x?}: {other:?}", &encoded[..]),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    for version in [None, Some(ProtocolVersion::V311), Some(ProtocolVersion::V5)] {
        run(data, version);
    }
});
