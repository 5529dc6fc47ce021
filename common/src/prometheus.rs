//! A tiny renderer of the Prometheus text exposition format (version 0.0.4): counters,
//! gauges and [`Histogram`]s, each announced once with its `# HELP` and `# TYPE` lines.
//!
//! The values live wherever the program keeps them (atomics, mostly); a [`Page`] is built
//! on each scrape and turned into the body of `GET /metrics` (see [`crate::http`]).
//! Labels every series of a page shares (the ingestor's `mqtt_id`) are given once, to
//! [`Page::with_labels`]; a family with one label per series (`qos="1"`) goes through
//! [`Page::counters`] or [`Page::gauges`]. Label values and help texts are escaped as the
//! format requires.
//!
//! ```
//! use jetmq_common::prometheus::Page;
//!
//! let mut page = Page::with_labels(&[("mqtt_id", "3")]);
//! page.counter("x_consumed_total", "Messages taken.", 2);
//! page.gauges("x_ready", "Ready.", "state", [("up", 1)]);
//! let expected = [
//!     "# HELP x_consumed_total Messages taken.",
//!     "# TYPE x_consumed_total counter",
//!     "x_consumed_total{mqtt_id=\"3\"} 2",
//!     "# HELP x_ready Ready.",
//!     "# TYPE x_ready gauge",
//!     "x_ready{mqtt_id=\"3\",state=\"up\"} 1",
//! ];
//! assert_eq!(page.finish(), expected.join("\n") + "\n");
//! ```

use std::fmt::{Display, Write as _};

use crate::histogram::Histogram;

/// One metrics page being written.
#[derive(Debug, Default)]
pub struct Page {
    out: String,
    /// The shared labels, rendered (`a="1",b="2"`), without braces.
    labels: String,
}

impl Page {
    /// A page without shared labels.
    pub fn new() -> Self {
        Page::default()
    }

    /// A page whose every series carries `labels` (name, value), in that order.
    pub fn with_labels(labels: &[(&str, &str)]) -> Self {
        let mut rendered = String::new();
        for (name, value) in labels {
            push_label(&mut rendered, name, value);
        }
        Page {
            out: String::new(),
            labels: rendered,
        }
    }

    /// A counter (a count that only goes up; by convention its name ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, help, "counter");
        self.sample(name, None, value);
        self
    }

    /// A gauge (a value that goes up and down).
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> &mut Self {
        self.family(name, help, "gauge");
        self.sample(name, None, value);
        self
    }

    /// A counter family with one series per value of `label`.
    pub fn counters<L: Display>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (L, u64)>,
    ) -> &mut Self {
        self.family(name, help, "counter");
        for (value, count) in series {
            self.sample(name, Some((label, &value.to_string())), count);
        }
        self
    }

    /// A gauge family with one series per value of `label`.
    pub fn gauges<L: Display>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (L, i64)>,
    ) -> &mut Self {
        self.family(name, help, "gauge");
        for (value, level) in series {
            self.sample(name, Some((label, &value.to_string())), level);
        }
        self
    }

    /// A latency histogram: `<name>_bucket`, `<name>_sum`, `<name>_count`.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) -> &mut Self {
        histogram.render(&mut self.out, name, &escape_help(help), &self.labels);
        self
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        self.out
    }

    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {kind}",
            escape_help(help)
        );
    }

    fn sample(&mut self, name: &str, label: Option<(&str, &str)>, value: impl Display) {
        let mut labels = self.labels.clone();
        if let Some((label, label_value)) = label {
            push_label(&mut labels, label, label_value);
        }
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Appends `name="value"` (comma-separated from what is there already).
fn push_label(out: &mut String, name: &str, value: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(name);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A help text as the format wants it: backslash and line feed escaped.
fn escape_help(help: &str) -> std::borrow::Cow<'_, str> {
    if help.contains(['\\', '\n']) {
        help.replace('\\', "\\\\").replace('\n', "\\n").into()
    } else {
        help.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unlabelled_series_have_no_braces() {
        let mut page = Page::new();
        page.counter("a_total", "A.", 3).gauge("b", "B.", -1);
        assert_eq!(
            page.finish(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n# HELP b B.\n# TYPE b gauge\nb -1\n"
        );
    }

    #[test]
    fn families_add_their_label_after_the_shared_ones() {
        let mut page = Page::with_labels(&[("node", "n1")]);
        page.counters(
            "m_total",
            "M.",
            "qos",
            (0..2u8).map(|q| (q, u64::from(q) * 5)),
        );
        assert_eq!(
            page.finish(),
            "# HELP m_total M.\n# TYPE m_total counter\nm_total{node=\"n1\",qos=\"0\"} 0\nm_total{node=\"n1\",qos=\"1\"} 5\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut page = Page::with_labels(&[("path", "a\\b\"c\nd")]);
        page.gauge("g", "Line one\nback\\slash.", 1);
        let text = page.finish();
        assert!(
            text.contains("# HELP g Line one\\nback\\\\slash.\n"),
            "{text}"
        );
        assert!(text.contains("g{path=\"a\\\\b\\\"c\\nd\"} 1\n"), "{text}");
    }

    #[test]
    fn histograms_carry_the_shared_labels() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(20));
        let mut page = Page::with_labels(&[("mqtt_id", "2")]);
        page.histogram("h_seconds", "H.", &h);
        let text = page.finish();
        assert!(text.starts_with("# HELP h_seconds H.\n# TYPE h_seconds histogram\n"));
        assert!(text.contains("h_seconds_bucket{mqtt_id=\"2\",le=\"0.025\"} 1\n"));
        assert!(text.contains("h_seconds_count{mqtt_id=\"2\"} 1\n"));
    }
}
