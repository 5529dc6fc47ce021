//! How the message flow is split into shares, one per ingestor, and the NATS server mapping
//! that does the split.
//!
//! Brokers publish to `jetmq.in.<topic>`. The NATS server config maps `jetmq.in.>` to
//! `jetmq.s.<share>.>` before the message stream captures it, so every stored subject carries
//! its share token. Share tokens are 0-based (NATS `{{partition(n)}}` yields `0..n`), ingestor
//! ids (`jetmq-ingestor --mqtt-id N`) are 1-based: ingestor `N` consumes share `N - 1`.
//!
//! Verified against nats-server 2.15.1: `"jetmq.in.>": "jetmq.s.{{partition(n)}}.>"` hashes
//! the whole subject (all topic levels, any depth), keeps `>` in the destination, and a weighted
//! list of `{destination, weight}` entries picks one destination per message at random. A
//! subscription on `jetmq.in.>` sees nothing once the mapping is loaded: mappings apply before
//! subscriptions and stream capture. Subscribers therefore listen across all shares with
//! [`all_shares_subject`].

use std::fmt::Write as _;

use thiserror::Error;

use crate::subject::{PUBLISH_PREFIX, SHARE_PREFIX};

/// Upper bound on the number of shares a generated mapping may have.
pub const MAX_SHARES: u32 = 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShareError {
    #[error("ingestor id must be at least 1 (ingestor N consumes share N-1), got {0}")]
    BadIngestorId(u32),
    #[error("the number of ingestors must be between 1 and {MAX_SHARES}, got {0}")]
    BadIngestorCount(u32),
    #[error(
        "weighted mode needs one weight per ingestor: {ingestors} ingestors but {weights} weights"
    )]
    WeightCount { ingestors: u32, weights: usize },
    #[error("weight {index} is 0: every weight must be a positive integer (percent)")]
    ZeroWeight { index: usize },
    #[error(
        "weights sum to {sum}, they must sum to exactly 100: under 100 NATS silently drops \
         the rest of the messages, over 100 it refuses the config"
    )]
    WeightSum { sum: u64 },
    #[error("weighted mode needs weights (--weights 50,50 ...)")]
    MissingWeights,
}

/// The share ingestor `mqtt_id` consumes (`mqtt_id - 1`).
pub fn share_for_ingestor(mqtt_id: u32) -> Result<u32, ShareError> {
    mqtt_id
        .checked_sub(1)
        .ok_or(ShareError::BadIngestorId(mqtt_id))
}

/// The ingestor id (`--mqtt-id`) that consumes `share` (`share + 1`).
pub fn ingestor_for_share(share: u32) -> u32 {
    share.saturating_add(1)
}

/// The stored subject of `tokens` (encoded topic, see [`crate::subject::encode_topic`]) in any
/// share: `jetmq.s.*.<tokens>`. `tokens` may itself be a subject filter (`a.*`, `a.>`).
pub fn all_shares_subject(tokens: &str) -> String {
    format!("{SHARE_PREFIX}.*.{tokens}")
}

/// The subject filter a server mapping rewrites: everything brokers publish.
pub fn mapping_source() -> String {
    format!("{PUBLISH_PREFIX}.>")
}

/// The mapping destination of one share: `jetmq.s.<share>.>`.
pub fn mapping_destination(share: u32) -> String {
    format!("{SHARE_PREFIX}.{share}.>")
}

/// How messages are spread over the shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingMode {
    /// Deterministic hash of the whole subject: one MQTT topic always lands on the same
    /// share, so per-topic order holds end to end.
    Partition,
    /// Random per message with the given percentages (one per share, summing to 100):
    /// messages of one topic spread over all shares and lose their relative order.
    Weighted(Vec<u32>),
}

/// Checks weights for `ingestors` shares: one each, all positive, summing to exactly 100.
pub fn validate_weights(ingestors: u32, weights: &[u32]) -> Result<(), ShareError> {
    if weights.len() != ingestors as usize {
        return Err(ShareError::WeightCount {
            ingestors,
            weights: weights.len(),
        });
    }
    if let Some(index) = weights.iter().position(|w| *w == 0) {
        return Err(ShareError::ZeroWeight { index: index + 1 });
    }
    let sum: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if sum != 100 {
        return Err(ShareError::WeightSum { sum });
    }
    Ok(())
}

/// The `mappings` block of a nats-server config that splits the flow over `ingestors`
/// shares. With one ingestor both modes are a plain mapping to share 0.
pub fn mapping_block(ingestors: u32, mode: &MappingMode) -> Result<String, ShareError> {
    if ingestors == 0 || ingestors > MAX_SHARES {
        return Err(ShareError::BadIngestorCount(ingestors));
    }
    if let MappingMode::Weighted(weights) = mode {
        validate_weights(ingestors, weights)?;
    }
    let source = mapping_source();
    let mut out = String::new();
    let describe = match mode {
        MappingMode::Partition => "partition".to_owned(),
        MappingMode::Weighted(w) => format!(
            "weighted {}",
            w.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        ),
    };
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# Generated by `jetmq-ingestor mapping --ingestors {ingestors}`: {describe}."
    );
    let _ = writeln!(
        out,
        "# Share s is consumed by `jetmq-ingestor --mqtt-id <s+1>`. Regenerate, then reload"
    );
    let _ = writeln!(
        out,
        "# every server (nats-server --signal reload=PID); see docs/nats-config.md."
    );
    let _ = writeln!(out, "mappings: {{");
    match mode {
        _ if ingestors == 1 => {
            let _ = writeln!(out, "  \"{source}\": \"{}\"", mapping_destination(0));
        }
        MappingMode::Partition => {
            let _ = writeln!(
                out,
                "  \"{source}\": \"{SHARE_PREFIX}.{{{{partition({ingestors})}}}}.>\""
            );
        }
        MappingMode::Weighted(weights) => {
            let _ = writeln!(out, "  \"{source}\": [");
            for (share, weight) in weights.iter().enumerate() {
                let comma = if share + 1 < weights.len() { "," } else { "" };
                let _ = writeln!(
                    out,
                    "    {{ destination: \"{}\", weight: {weight}% }}{comma}",
                    mapping_destination(share as u32)
                );
            }
            let _ = writeln!(out, "  ]");
        }
    }
    let _ = writeln!(out, "}}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_shares() {
        assert_eq!(share_for_ingestor(1), Ok(0));
        assert_eq!(share_for_ingestor(3), Ok(2));
        assert_eq!(share_for_ingestor(0), Err(ShareError::BadIngestorId(0)));
        assert_eq!(ingestor_for_share(0), 1);
        assert_eq!(all_shares_subject("a.b"), "jetmq.s.*.a.b");
        assert_eq!(mapping_destination(2), "jetmq.s.2.>");
    }

    #[test]
    fn partition_block() {
        let block = mapping_block(3, &MappingMode::Partition).expect("valid");
        assert!(block.contains("\"jetmq.in.>\": \"jetmq.s.{{partition(3)}}.>\""));
        let one = mapping_block(1, &MappingMode::Partition).expect("valid");
        assert!(one.contains("\"jetmq.in.>\": \"jetmq.s.0.>\""));
        assert!(!one.contains("partition("));
    }

    #[test]
    fn weighted_block() {
        let block = mapping_block(3, &MappingMode::Weighted(vec![50, 30, 20])).expect("valid");
        assert!(block.contains("{ destination: \"jetmq.s.0.>\", weight: 50% },"));
        assert!(block.contains("{ destination: \"jetmq.s.2.>\", weight: 20% }"));
        let one = mapping_block(1, &MappingMode::Weighted(vec![100])).expect("valid");
        assert!(one.contains("\"jetmq.in.>\": \"jetmq.s.0.>\""));
    }

    #[test]
    fn bad_weights_are_refused() {
        let w = |v: Vec<u32>| MappingMode::Weighted(v);
        assert_eq!(
            mapping_block(2, &w(vec![50, 40])),
            Err(ShareError::WeightSum { sum: 90 })
        );
        assert_eq!(
            mapping_block(2, &w(vec![60, 50])),
            Err(ShareError::WeightSum { sum: 110 })
        );
        assert_eq!(
            mapping_block(2, &w(vec![100, 0])),
            Err(ShareError::ZeroWeight { index: 2 })
        );
        assert_eq!(
            mapping_block(3, &w(vec![50, 50])),
            Err(ShareError::WeightCount {
                ingestors: 3,
                weights: 2
            })
        );
        assert_eq!(
            mapping_block(0, &MappingMode::Partition),
            Err(ShareError::BadIngestorCount(0))
        );
        assert_eq!(
            mapping_block(1, &w(vec![50])),
            Err(ShareError::WeightSum { sum: 50 })
        );
    }
}
