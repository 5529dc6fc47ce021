//! MQTT topics and filters as NATS subjects.
//!
//! A topic's levels become subject tokens. Characters NATS gives meaning to (`.`, `*`, `>`,
//! whitespace, control characters) and the escape character `%` itself are written as `%XX`
//! (the hex of each UTF-8 byte). An empty level, which NATS tokens cannot express, is the
//! lone token `%`: a real `%` is always followed by two hex digits, so the two never collide.
//!
//! Subjects on the wire:
//! - `jetmq.in.<topic>`: where a broker publishes. The NATS server's mapping rewrites it to
//! - `jetmq.s.<share>.<topic>`: what the message stream stores and ingestor `share` consumes.
//! - `jetmq.r.<topic>`: the retained-message stream, one message per topic.

use thiserror::Error;

/// Brokers publish here; never stored under this name (the server mapping rewrites it).
pub const PUBLISH_PREFIX: &str = "jetmq.in";
/// Stored messages: `jetmq.s.<share>.<topic tokens>`.
pub const SHARE_PREFIX: &str = "jetmq.s";
/// Retained messages: `jetmq.r.<topic tokens>`.
pub const RETAINED_PREFIX: &str = "jetmq.r";

const ESCAPE: char = '%';
const EMPTY_LEVEL: &str = "%";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubjectError {
    #[error("subject {0:?} does not start with a jetmq prefix")]
    UnknownPrefix(String),
    #[error("bad escape sequence in subject token {0:?}")]
    BadEscape(String),
    #[error("subject token {0:?} does not decode to UTF-8")]
    NotUtf8(String),
}

fn needs_escape(c: char) -> bool {
    matches!(c, '.' | '*' | '>' | ESCAPE) || c.is_whitespace() || c.is_control()
}

/// [`needs_escape`] for one byte of ASCII (every ASCII whitespace and control is <= 0x20 or
/// 0x7f), so that typical topics are copied a run at a time instead of a char at a time.
fn ascii_needs_escape(byte: u8) -> bool {
    byte <= b' ' || byte == 0x7f || matches!(byte, b'.' | b'*' | b'>' | b'%')
}

fn push_encoded_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push_str(EMPTY_LEVEL);
        return;
    }
    let mut clean_from = 0;
    for (at, c) in level.char_indices() {
        let escape = if c.is_ascii() {
            ascii_needs_escape(c as u8)
        } else {
            needs_escape(c)
        };
        if !escape {
            continue;
        }
        out.push_str(&level[clean_from..at]);
        let mut utf8 = [0u8; 4];
        for byte in c.encode_utf8(&mut utf8).bytes() {
            out.push(ESCAPE);
            out.push(hex_digit(byte >> 4));
            out.push(hex_digit(byte & 0x0f));
        }
        clean_from = at + c.len_utf8();
    }
    out.push_str(&level[clean_from..]);
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(nibble & 0x0f)])
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    }
}

/// The subject tokens of an MQTT topic name (no prefix).
pub fn encode_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 8);
    push_encoded_topic(&mut out, topic);
    out
}

fn push_encoded_topic(out: &mut String, topic: &str) {
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_encoded_level(out, level);
    }
}

/// `<prefix>.<encoded topic>` in one allocation.
fn prefixed_subject(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + topic.len() + 8);
    out.push_str(prefix);
    out.push('.');
    push_encoded_topic(&mut out, topic);
    out
}

/// The MQTT topic name that [`encode_topic`] turned into `tokens`.
pub fn decode_topic(tokens: &str) -> Result<String, SubjectError> {
    let mut out = Vec::with_capacity(tokens.len());
    for (i, token) in tokens.split('.').enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        if token == EMPTY_LEVEL {
            continue;
        }
        let mut rest = token.as_bytes();
        while let Some(at) = rest.iter().position(|&b| b == b'%') {
            out.extend_from_slice(&rest[..at]);
            let high = rest.get(at + 1).copied().and_then(hex_value);
            let low = rest.get(at + 2).copied().and_then(hex_value);
            match (high, low) {
                (Some(h), Some(l)) => out.push(h << 4 | l),
                _ => return Err(SubjectError::BadEscape(token.to_owned())),
            }
            rest = &rest[at + 3..];
        }
        out.extend_from_slice(rest);
    }
    String::from_utf8(out).map_err(|_| SubjectError::NotUtf8(tokens.to_owned()))
}

/// Where a broker publishes a message for `topic`.
pub fn publish_subject(topic: &str) -> String {
    prefixed_subject(PUBLISH_PREFIX, topic)
}

/// Where the retained message of `topic` is stored.
pub fn retained_subject(topic: &str) -> String {
    prefixed_subject(RETAINED_PREFIX, topic)
}

/// Subject filter that selects every message of one share.
pub fn share_filter(share: u32) -> String {
    format!("{SHARE_PREFIX}.{share}.>")
}

/// Splits a stored subject `jetmq.s.<share>.<tokens>` into its share and MQTT topic.
pub fn parse_stream_subject(subject: &str) -> Result<(u32, String), SubjectError> {
    let unknown = || SubjectError::UnknownPrefix(subject.to_owned());
    let rest = subject
        .strip_prefix(SHARE_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(unknown)?;
    let (share, tokens) = rest.split_once('.').ok_or_else(unknown)?;
    let share = share.parse().map_err(|_| unknown())?;
    Ok((share, decode_topic(tokens)?))
}

/// The MQTT topic of a retained-stream subject `jetmq.r.<tokens>`.
pub fn parse_retained_subject(subject: &str) -> Result<String, SubjectError> {
    let tokens = subject
        .strip_prefix(RETAINED_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| SubjectError::UnknownPrefix(subject.to_owned()))?;
    decode_topic(tokens)
}

/// Subject filters (tokens only, no prefix) that together select every topic an MQTT topic
/// filter matches. `a/#` matches `a` itself in MQTT, so it needs two NATS filters.
///
/// NATS filters are a superset for `$` topics (`+`/`#` at the first level must not match
/// them in MQTT): callers that need exact MQTT semantics match the topic again.
pub fn filter_to_subjects(filter: &str) -> Vec<String> {
    let mut tokens = String::with_capacity(filter.len() + 8);
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if *level == "#" {
            if i == 0 {
                return vec![">".to_owned()];
            }
            let parent = tokens.clone();
            tokens.push_str(".>");
            return vec![parent, tokens];
        }
        if i > 0 {
            tokens.push('.');
        }
        if *level == "+" {
            tokens.push('*');
        } else {
            push_encoded_level(&mut tokens, level);
        }
    }
    vec![tokens]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_topics_read_naturally() {
        assert_eq!(encode_topic("sensors/room-1/temp"), "sensors.room-1.temp");
        assert_eq!(publish_subject("a/b"), "jetmq.in.a.b");
        assert_eq!(retained_subject("$SYS/x"), "jetmq.r.$SYS.x");
    }

    #[test]
    fn nats_special_characters_are_escaped() {
        assert_eq!(encode_topic("a.b/c*d/>/e f/%"), "a%2Eb.c%2Ad.%3E.e%20f.%25");
        assert_eq!(encode_topic("tab\there"), "tab%09here");
    }

    #[test]
    fn empty_levels_survive() {
        for topic in ["/", "a//b", "/a", "a/", "//", ""] {
            let tokens = encode_topic(topic);
            assert!(
                tokens.split('.').all(|t| !t.is_empty()),
                "{topic:?} -> {tokens:?}"
            );
            assert_eq!(decode_topic(&tokens).as_deref(), Ok(topic));
        }
    }

    #[test]
    fn stream_subject_parses() {
        assert_eq!(
            parse_stream_subject("jetmq.s.3.a.%.b%2Ec"),
            Ok((3, "a//b.c".to_owned()))
        );
        assert!(parse_stream_subject("jetmq.in.a").is_err());
        assert!(parse_stream_subject("jetmq.s.x.a").is_err());
        assert!(parse_stream_subject("jetmq.s.1").is_err());
        assert_eq!(parse_retained_subject("jetmq.r.a.b"), Ok("a/b".to_owned()));
    }

    #[test]
    fn bad_escapes_are_errors_not_panics() {
        for tokens in ["%", "a%", "a%4", "a%ZZ", "%C3%28"] {
            if tokens == "%" {
                continue; // the empty level
            }
            assert!(decode_topic(tokens).is_err(), "{tokens:?}");
        }
    }

    #[test]
    fn filters_map_to_subject_filters() {
        assert_eq!(filter_to_subjects("#"), vec![">"]);
        assert_eq!(filter_to_subjects("a/+/c"), vec!["a.*.c"]);
        assert_eq!(filter_to_subjects("a/#"), vec!["a", "a.>"]);
        assert_eq!(filter_to_subjects("+/#"), vec!["*", "*.>"]);
        assert_eq!(filter_to_subjects("a.b/+"), vec!["a%2Eb.*"]);
        assert_eq!(filter_to_subjects("a//b"), vec!["a.%.b"]);
    }

    fn mqtt_topic() -> impl Strategy<Value = String> {
        // Any UTF-8 without U+0000 and without wildcards: exactly the valid topic names.
        proptest::collection::vec(
            any::<char>().prop_filter("valid topic char", |c| !matches!(c, '\0' | '+' | '#')),
            0..40,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #[test]
        fn topic_round_trips(topic in mqtt_topic()) {
            let tokens = encode_topic(&topic);
            prop_assert!(tokens.split('.').all(|t| !t.is_empty()));
            prop_assert!(!tokens.chars().any(|c| c.is_whitespace() || c == '*' || c == '>'));
            prop_assert_eq!(decode_topic(&tokens), Ok(topic));
        }

        #[test]
        fn slash_heavy_topics_round_trip(levels in proptest::collection::vec("[./ *>%a-c]{0,3}", 1..6)) {
            let topic = levels.join("/");
            prop_assert_eq!(decode_topic(&encode_topic(&topic)), Ok(topic));
        }
    }
}
