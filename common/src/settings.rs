//! The one error type a configuration section's `validate()` returns.
//!
//! Each section (TLS, DNS, authentication, OpenTelemetry, ...) checks its own values and
//! names the offending key as the operator wrote it, so that the process can exit with
//! `config: <key>: <reason>` and nothing else to look up.

/// A setting that cannot be used: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InvalidSetting {
    /// The key as written in the config file, e.g. `tls.cert_file`.
    pub key: &'static str,
    /// What is wrong with its value, for a human.
    pub reason: String,
}

impl InvalidSetting {
    /// An invalid `key`, for `reason`.
    pub fn new(key: &'static str, reason: impl Into<String>) -> Self {
        InvalidSetting {
            key,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_key_first() {
        let err = InvalidSetting::new("tls.cert_file", "missing");
        assert_eq!(err.to_string(), "tls.cert_file: missing");
    }
}
