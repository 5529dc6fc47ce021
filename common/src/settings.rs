//! The one error type a configuration section's `validate()` returns.
//!
//! Each section (TLS, DNS, authentication, OpenTelemetry, ...) checks its own values and
//! names the offending key as the operator wrote it, so that the process can exit with
//! `config: <key>: <reason>` and nothing else to look up.

/// A setting that cannot be used: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}{}: {reason}", .within.as_deref().unwrap_or(""))]
pub struct InvalidSetting {
    /// The key as written in the config file, e.g. `tls.cert_file`.
    pub key: &'static str,
    /// Where inside a list or table key the bad value sits, e.g. `[2].filter` for the
    /// filter of the third of `routing.rules`; shown right after the key.
    pub within: Option<String>,
    /// What is wrong with its value, for a human.
    pub reason: String,
}

impl InvalidSetting {
    /// An invalid `key`, for `reason`.
    pub fn new(key: &'static str, reason: impl Into<String>) -> Self {
        InvalidSetting {
            key,
            within: None,
            reason: reason.into(),
        }
    }

    /// The same, about the element `within` of the key (`[2].filter`).
    pub fn within(mut self, within: impl Into<String>) -> Self {
        self.within = Some(within.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_key_first() {
        let err = InvalidSetting::new("tls.cert_file", "missing");
        assert_eq!(err.to_string(), "tls.cert_file: missing");
        let err = InvalidSetting::new("routing.rules", "bad").within("[2].filter");
        assert_eq!(err.key, "routing.rules");
        assert_eq!(err.to_string(), "routing.rules[2].filter: bad");
    }
}
