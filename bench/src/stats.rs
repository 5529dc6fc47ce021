//! Latency histograms, per-publisher sequence tracking and the JSON summaries.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms track: 10 minutes in microseconds (larger values clamp).
const MAX_US: u64 = 600_000_000;

fn new_histogram() -> Histogram<u64> {
    // 3 significant digits: 0.1% precision.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| {
        // Unreachable with these constants; fall back to an auto-resizing histogram.
        let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sigfig is valid"));
        h.auto(true);
        h
    })
}

/// A latency recorder shared by many tasks: a few mutex-protected shards, so that memory
/// stays bounded however many connections record into it.
pub struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Recorder {
    pub fn new(shards: usize) -> Recorder {
        Recorder {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
        }
    }

    /// Records a latency in nanoseconds, into the shard picked by `key`.
    pub fn record_ns(&self, key: usize, ns: u64) {
        let us = (ns / 1000).clamp(1, MAX_US);
        if let Some(shard) = self.shards.get(key % self.shards.len()) {
            if let Ok(mut h) = shard.lock() {
                let _ = h.record(us);
            }
        }
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for shard in &self.shards {
            if let Ok(h) = shard.lock() {
                let _ = out.add(&*h);
            }
        }
        out
    }

    pub fn summary(&self) -> Latency {
        Latency::from_histogram(&self.merged())
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Which sequence numbers of one publisher one subscriber has seen.
#[derive(Debug, Default)]
pub struct SeqTracker {
    bits: Vec<u64>,
    pub unique: u64,
    pub duplicates: u64,
    /// Arrivals with a lower sequence number than one already seen (reordering).
    pub out_of_order: u64,
    pub highest: Option<u64>,
}

/// Sequence numbers above this are not tracked (bounded memory: 2^27 bits = 16 MiB).
const MAX_TRACKED_SEQ: u64 = 1 << 27;

impl SeqTracker {
    /// Notes `seq`; returns false if it was a duplicate.
    pub fn record(&mut self, seq: u64) -> bool {
        if seq >= MAX_TRACKED_SEQ {
            self.unique += 1;
            return true;
        }
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if self.bits.len() <= word {
            let want = (word + 1).next_power_of_two().max(16);
            self.bits.resize(want, 0);
        }
        if let Some(w) = self.bits.get_mut(word) {
            if *w & bit != 0 {
                self.duplicates += 1;
                return false;
            }
            *w |= bit;
        }
        self.unique += 1;
        match self.highest {
            Some(h) if seq < h => self.out_of_order += 1,
            _ => self.highest = Some(seq),
        }
        true
    }

    /// How many of the sequence numbers `0..upto` were never seen.
    pub fn missing_below(&self, upto: u64) -> u64 {
        let upto = upto.min(MAX_TRACKED_SEQ);
        let full_words = (upto / 64) as usize;
        let mut seen: u64 = self
            .bits
            .iter()
            .take(full_words)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = upto % 64;
        if rest > 0 {
            if let Some(w) = self.bits.get(full_words) {
                seen += u64::from((w & ((1u64 << rest) - 1)).count_ones());
            }
        }
        upto - seen
    }
}

impl SeqTracker {
    /// How many sequence numbers seen by `other` this tracker has not seen (e.g. messages
    /// acknowledged to the publisher and never delivered).
    pub fn missing_of(&self, other: &SeqTracker) -> u64 {
        let words = other.bits.iter().enumerate().map(|(i, w)| {
            let mine = self.bits.get(i).copied().unwrap_or(0);
            u64::from((w & !mine).count_ones())
        });
        words.sum()
    }
}

/// Error messages by count (bounded number of distinct messages).
#[derive(Default)]
pub struct ErrorLog {
    inner: Mutex<BTreeMap<String, u64>>,
}

impl ErrorLog {
    pub fn add(&self, what: impl Into<String>) {
        let what: String = what.into();
        if let Ok(mut m) = self.inner.lock() {
            if m.len() < 32 || m.contains_key(&what) {
                *m.entry(what).or_default() += 1;
            } else {
                *m.entry("(other errors)".to_owned()).or_default() += 1;
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// `fetch_max` for "time of the last event" stamps.
pub fn stamp(cell: &AtomicU64, ns: u64) {
    cell.fetch_max(ns, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_gaps_and_duplicates() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 2, 4, 4, 3, 70] {
            t.record(s);
        }
        assert_eq!(t.unique, 6);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.out_of_order, 1);
        assert_eq!(t.missing_below(5), 0);
        assert_eq!(t.missing_below(71), 71 - 6);
        assert_eq!(t.missing_below(200), 200 - 6);
    }

    #[test]
    fn missing_of_counts_only_the_others_entries() {
        let mut acked = SeqTracker::default();
        let mut received = SeqTracker::default();
        for s in [0, 1, 2, 3, 100, 5000] {
            acked.record(s);
        }
        for s in [0, 2, 3, 7, 5000] {
            received.record(s);
        }
        // 1 and 100 were acknowledged and never received; 7 arrived without an ack.
        assert_eq!(received.missing_of(&acked), 2);
        assert_eq!(acked.missing_of(&received), 1);
        assert_eq!(received.missing_of(&SeqTracker::default()), 0);
    }

    #[test]
    fn recorder_percentiles() {
        let r = Recorder::new(4);
        for i in 1..=1000u64 {
            r.record_ns(i as usize, i * 1_000_000);
        }
        let s = r.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.max - 1000.0).abs() < 1.0, "{s:?}");
    }
}
