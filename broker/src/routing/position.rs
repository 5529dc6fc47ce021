//! Positions: where an MQTT message sits in the message stream.
//!
//! A stream message holds one MQTT message, or up to 255 of one topic in a bundle
//! ([`jetmq_common::envelope::encode_bundle`]). Sessions count in positions, not stream
//! sequences: message `i` of stream message `s` is at `s << 8 | i`, so every MQTT message
//! has its own place in one ordered space (cursors, packet identifiers, replay ranges all
//! use it), and `s << 8 | 255` marks the end of stream message `s`.

const INDEX_BITS: u32 = 8;
const LAST_INDEX: u64 = (1 << INDEX_BITS) - 1;

/// Position of message `index` of stream message `stream_seq`.
pub const fn of(stream_seq: u64, index: usize) -> u64 {
    (stream_seq << INDEX_BITS) | (index as u64 & LAST_INDEX)
}

/// The highest position stream message `stream_seq` can hold: "everything of it".
pub const fn end_of(stream_seq: u64) -> u64 {
    (stream_seq << INDEX_BITS) | LAST_INDEX
}

/// The stream message that holds `position`.
pub const fn stream_seq(position: u64) -> u64 {
    position >> INDEX_BITS
}

/// The first stream message that may hold something after `position` (stream sequences
/// start at 1): the one holding `position` itself unless it ends there.
pub const fn first_stream_seq_after(position: u64) -> u64 {
    let seq = position.saturating_add(1) >> INDEX_BITS;
    if seq == 0 {
        1
    } else {
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_stream_messages_then_their_parts() {
        assert!(of(7, 0) < of(7, 1));
        assert!(of(7, 254) < end_of(7));
        assert!(end_of(7) < of(8, 0));
        assert_eq!(stream_seq(of(9, 3)), 9);
        assert_eq!(stream_seq(end_of(9)), 9);
    }

    #[test]
    fn reading_after_a_position_starts_where_something_may_be_left() {
        assert_eq!(first_stream_seq_after(0), 1);
        assert_eq!(first_stream_seq_after(end_of(0)), 1);
        // In the middle of a bundle: its stream message is read again.
        assert_eq!(first_stream_seq_after(of(5, 2)), 5);
        assert_eq!(first_stream_seq_after(end_of(5)), 6);
        assert_eq!(first_stream_seq_after(u64::MAX), u64::MAX >> INDEX_BITS);
    }
}
