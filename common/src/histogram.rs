//! A latency histogram for Prometheus text exposition, cheap enough for the message path.
//!
//! Fixed bucket bounds and one relaxed atomic add per bucket hit: no lock and no allocation
//! per observation, so brokers and ingestors can time every publish and every produce.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, seconds, of the latency buckets: 100 µs to 10 s, roughly 1-2.5-5 steps.
/// JetStream publish acks on a healthy cluster land in the low milliseconds and Kafka
/// produce confirmations in the tens of milliseconds; the top buckets catch leader
/// elections and broker outages.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

const BUCKETS: usize = LATENCY_BUCKETS.len();

/// Observations in seconds, exported as `<name>_bucket`, `<name>_sum`, `<name>_count`.
#[derive(Debug)]
pub struct Histogram {
    /// Bucket upper bounds in nanoseconds, so an observation compares integers only.
    bounds_ns: [u64; BUCKETS],
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            bounds_ns: LATENCY_BUCKETS.map(|s| (s * 1e9).round() as u64),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // Bounds are sorted: the first bound not below the value is its bucket.
        let index = self.bounds_ns.partition_point(|&bound| bound < ns);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Appends the exposition of this histogram. `labels` is either empty or a
    /// comma-separated list such as `mqtt_id="1"` (without braces).
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        // Read the counts once: a concurrent observation may land between reads, and the
        // exposition must still be cumulative with +Inf equal to _count.
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let mut cumulative = 0u64;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += counts[BUCKETS];
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}");
            let _ = writeln!(out, "{name}_count {cumulative}");
        } else {
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    }

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50)); // <= 0.0001
        h.observe(Duration::from_micros(100)); // exactly on a bound: le is inclusive
        h.observe(Duration::from_millis(3)); // <= 0.005
        h.observe(Duration::from_secs(60)); // +Inf only
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Test.", "");
        assert!(out.starts_with("# HELP x_seconds Test.\n# TYPE x_seconds histogram\n"));
        assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.0001\"}"), 2.0);
        assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.0025\"}"), 2.0);
        assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.005\"}"), 3.0);
        assert_eq!(sample(&out, "x_seconds_bucket{le=\"10\"}"), 3.0);
        assert_eq!(sample(&out, "x_seconds_bucket{le=\"+Inf\"}"), 4.0);
        assert_eq!(sample(&out, "x_seconds_count"), 4.0);
        let sum = sample(&out, "x_seconds_sum");
        assert!((sum - 60.00315).abs() < 1e-9, "{sum}");
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn labels_go_before_le_and_on_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(20));
        let mut out = String::new();
        h.render(&mut out, "y_seconds", "Test.", "mqtt_id=\"2\"");
        assert_eq!(
            sample(&out, "y_seconds_bucket{mqtt_id=\"2\",le=\"0.025\"}"),
            1.0
        );
        assert_eq!(
            sample(&out, "y_seconds_bucket{mqtt_id=\"2\",le=\"0.01\"}"),
            0.0
        );
        assert_eq!(sample(&out, "y_seconds_count{mqtt_id=\"2\"}"), 1.0);
        assert!(out.contains("y_seconds_sum{mqtt_id=\"2\"} 0.02\n"), "{out}");
    }

    #[test]
    fn buckets_are_sorted_and_every_line_is_well_formed() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        let h = Histogram::default();
        let mut out = String::new();
        h.render(&mut out, "z_seconds", "Test.", "");
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples.len(), BUCKETS + 1 + 2);
        for line in samples {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().expect("numeric value");
        }
    }
}
