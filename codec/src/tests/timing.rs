//! A manual timing loop: `cargo test -p jetmq-codec --release -- --ignored --nocapture timing`.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::*;
use crate::*;

fn publish_256(version: ProtocolVersion) -> Vec<u8> {
    let topic = "devices/sensor-0042/telemetry/temperature".to_string();
    let mut p = Publish {
        qos: QoS::AtLeastOnce,
        topic,
        packet_id: 42,
        ..Default::default()
    };
    // Header and topic overhead, plus one more length byte once the body passes 127 bytes.
    let overhead = encoded_len(&Packet::Publish(p.clone()), version) + 1;
    p.payload = Bytes::from(vec![0x5Au8; 256 - overhead]);
    let bytes = enc(&Packet::Publish(p), version);
    assert_eq!(bytes.len(), 256);
    bytes
}

#[test]
#[ignore = "timing, run manually in release mode"]
fn timing_publish_256() {
    const N: u32 = 2_000_000;
    for version in [V311, V5] {
        let frame = publish_256(version);
        // Many frames back to back in one buffer, as a socket read would deliver them.
        let batch = 1000;
        let mut stream = BytesMut::with_capacity(frame.len() * batch);
        let start = Instant::now();
        let mut decoded = 0u32;
        while decoded < N {
            stream.clear();
            for _ in 0..batch {
                stream.extend_from_slice(&frame);
            }
            while let Some(packet) =
                decode_packet(&mut stream, Some(version), MAX).expect("decodes")
            {
                std::hint::black_box(&packet);
                decoded += 1;
            }
            stream.reserve(frame.len() * batch);
        }
        let decode_ns = start.elapsed().as_nanos() as f64 / f64::from(decoded);

        let packet = dec_ok(&frame, Some(version));
        let mut out = BytesMut::with_capacity(frame.len() * batch);
        let start = Instant::now();
        for i in 0..N {
            if i % batch as u32 == 0 {
                out.clear();
            }
            encode_packet(&packet, version, &mut out).expect("encodes");
        }
        let encode_ns = start.elapsed().as_nanos() as f64 / f64::from(N);
        println!(
            "{version:?}: 256-byte PUBLISH decode {decode_ns:.0} ns (incl. copying it into the buffer), encode {encode_ns:.0} ns"
        );
    }
}
