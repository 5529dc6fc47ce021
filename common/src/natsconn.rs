//! How jetmq-broker and jetmq-ingestor authenticate to NATS and secure the connection:
//! the `[nats]` keys both programs share (flattened into their own `[nats]` sections), and
//! the start-up policy for the first connection.
//!
//! The backbone may run across VPSes over the internet, so the NATS connection supports
//! TLS (own CA, client certificate, TLS required) and every NATS authentication method: a
//! `.creds` file (decentralized JWT auth), an NKEY seed, user/password, and a token.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectError, ConnectErrorKind, ConnectOptions};
use serde::{Deserialize, Serialize};

use crate::retry::Backoff;
use crate::settings::InvalidSetting;

/// `[nats]` security keys. Used with `#[serde(flatten)]`, so the keys sit directly in each
/// program's `[nats]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsSecurity {
    /// Credentials file (user JWT and NKEY seed) from `nsc` or a NATS account server.
    pub creds_file: Option<PathBuf>,
    /// Token auth.
    pub token: Option<String>,
    /// User/password auth (both or neither).
    pub user: Option<String>,
    pub password: Option<String>,
    /// NKEY auth: the user's seed (`SU...`). Better set through the environment
    /// (`JETMQ_NATS__NKEY_SEED`) than written in a file.
    pub nkey_seed: Option<String>,
    /// NKEY auth: a file holding the user's seed (what `jetmq-broker nats-auth` writes,
    /// mode 0600), so the secret is neither in the configuration nor in the environment.
    pub nkey_seed_file: Option<PathBuf>,
    /// Refuse to talk to a server that does not offer TLS.
    pub tls_required: bool,
    /// CA certificates (PEM) that sign the NATS servers' certificates; unset: the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients (`verify: true`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> InvalidSetting {
    InvalidSetting::new(key, reason)
}

impl NatsSecurity {
    /// Checks the combination of keys and that the named files exist, so a typo stops the
    /// program at start-up with the key's name rather than at the first connection.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid(
                "nats.user",
                "nats.user and nats.password go together",
            ));
        }
        let methods = [
            self.creds_file.is_some(),
            self.token.is_some(),
            self.user.is_some(),
            self.nkey_seed.is_some(),
            self.nkey_seed_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "nats",
                "set only one of creds_file, token, user/password, nkey_seed, nkey_seed_file",
            ));
        }
        if let Some(seed) = &self.nkey_seed {
            check_user_seed("nats.nkey_seed", seed)?;
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = read_seed_file(path).map_err(|e| invalid("nats.nkey_seed_file", e))?;
            check_user_seed("nats.nkey_seed_file", &seed)?;
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "nats.tls_cert_file",
                "nats.tls_cert_file and nats.tls_key_file go together",
            ));
        }
        for (key, path) in [
            ("nats.creds_file", &self.creds_file),
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(invalid(key, format!("file {} does not exist", p.display())));
                }
            }
        }
        Ok(())
    }

    /// True when the connection is meant to be TLS (so URLs must keep their host names
    /// for certificate verification).
    pub fn uses_tls(&self) -> bool {
        self.tls_required || self.tls_ca_file.is_some() || self.tls_cert_file.is_some()
    }

    /// Adds authentication and TLS to `options`. Reads the credentials file.
    pub async fn apply(&self, mut options: ConnectOptions) -> std::io::Result<ConnectOptions> {
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("nats.creds_file {}: {e}", path.display()))
            })?;
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = read_seed_file(path)
                .map_err(|e| std::io::Error::other(format!("nats.nkey_seed_file: {e}")))?;
            options = options.nkey(seed);
        }
        if self.tls_required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }

    /// Replaces secrets by `<redacted>` (for printing a configuration).
    pub fn redact(&mut self) {
        for secret in [&mut self.token, &mut self.password, &mut self.nkey_seed] {
            if secret.is_some() {
                *secret = Some("<redacted>".to_owned());
            }
        }
    }
}

fn check_user_seed(key: &'static str, seed: &str) -> Result<(), InvalidSetting> {
    let pair = nkeys::KeyPair::from_seed(seed.trim())
        .map_err(|e| invalid(key, format!("not an NKEY seed: {e}")))?;
    if pair.key_pair_type() != nkeys::KeyPairType::User {
        return Err(invalid(key, "must be a user seed (starting with SU)"));
    }
    Ok(())
}

/// The seed in a seed file: its first non-empty line that is not a comment.
fn read_seed_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| format!("{} holds no seed", path.display()))
}

/// Whether retrying a failed first connection can help. A server that refused our
/// credentials or a TLS set-up that failed (wrong CA, no TLS on the server while
/// `tls_required`, a missing or refused client certificate) will fail the same way again:
/// those stop the program with [`explain`]'s message. Unreachable servers are retried.
pub fn is_permanent(err: &ConnectError) -> bool {
    matches!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation
            | ConnectErrorKind::Authentication
            | ConnectErrorKind::Tls
            | ConnectErrorKind::ServerParse
    ) || tls_failure(err).is_some()
}

/// The TLS error behind a connection error. async-nats reports a failed handshake (and an
/// alert the server sends right after it, such as "certificate required") as an I/O
/// error; the rustls error inside tells them apart from a network problem.
fn tls_failure(err: &ConnectError) -> Option<&async_nats::rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<async_nats::rustls::Error>())
        {
            return Some(tls);
        }
        source = e.source();
    }
    None
}

/// A message for a failed connection that tells the operator which keys to look at.
pub fn explain(err: &ConnectError) -> String {
    if let Some(tls) = tls_failure(err) {
        return format!(
            "TLS towards NATS failed: {tls}; check nats.tls_ca_file, nats.tls_cert_file/nats.tls_key_file, nats.tls_required and that the URL's host name is in the server's certificate"
        );
    }
    match err.kind() {
        ConnectErrorKind::AuthorizationViolation => format!(
            "NATS refused this client's credentials (authorization violation): check nats.creds_file, nats.nkey_seed, nats.nkey_seed_file, nats.user/nats.password or nats.token ({err})"
        ),
        ConnectErrorKind::Authentication => format!(
            "cannot authenticate to NATS (signing the server's nonce failed): check nats.creds_file / nats.nkey_seed / nats.nkey_seed_file ({err})"
        ),
        ConnectErrorKind::Tls => format!(
            "TLS towards NATS failed: check nats.tls_ca_file, nats.tls_cert_file/nats.tls_key_file, nats.tls_required and that the URL's host name is in the server's certificate ({err})"
        ),
        _ => format!("cannot connect to NATS: {err}"),
    }
}

/// Connects for the first time, retrying unreachable servers for up to `patience`
/// (`options` must not use `retry_on_initial_connect`: that would hide permanent errors).
/// `make_options` builds fresh options for each attempt (ConnectOptions is not Clone).
/// Once connected, async-nats reconnects on its own.
pub async fn connect_first<F, Fut>(
    mut make_options: F,
    addrs: &[async_nats::ServerAddr],
    patience: Duration,
) -> Result<async_nats::Client, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<ConnectOptions>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        let options = make_options().await.map_err(|e| e.to_string())?;
        let err = match options.connect(addrs.to_vec()).await {
            Ok(client) => return Ok(client),
            Err(err) if is_permanent(&err) => return Err(explain(&err)),
            Err(err) => err,
        };
        let delay = backoff.next_pause();
        if tokio::time::Instant::now() + delay >= deadline {
            return Err(format!(
                "{} (gave up after {}s)",
                explain(&err),
                patience.as_secs()
            ));
        }
        tracing::warn!(error = %err, retry_in = ?delay, "NATS not reachable yet; retrying");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_are_checked() {
        let ok = NatsSecurity::default();
        assert!(ok.validate().is_ok());
        let two = NatsSecurity {
            token: Some("t".into()),
            user: Some("u".into()),
            password: Some("p".into()),
            ..Default::default()
        };
        assert_eq!(two.validate().unwrap_err().key, "nats");
        let half = NatsSecurity {
            user: Some("u".into()),
            ..Default::default()
        };
        assert_eq!(half.validate().unwrap_err().key, "nats.user");
        let cert_only = NatsSecurity {
            tls_cert_file: Some("/etc/hostname".into()),
            ..Default::default()
        };
        assert_eq!(cert_only.validate().unwrap_err().key, "nats.tls_cert_file");
        let missing = NatsSecurity {
            tls_ca_file: Some("/does/not/exist.pem".into()),
            ..Default::default()
        };
        assert_eq!(missing.validate().unwrap_err().key, "nats.tls_ca_file");
        assert!(missing.uses_tls());
        assert!(!ok.uses_tls());
    }

    #[test]
    fn nkey_seeds_are_checked() {
        let user = nkeys::KeyPair::new_user();
        let good = NatsSecurity {
            nkey_seed: Some(user.seed().expect("seed")),
            ..Default::default()
        };
        assert!(good.validate().is_ok());
        let account = nkeys::KeyPair::new_account();
        for bad in [account.seed().expect("seed"), "SUnotaseed".to_owned()] {
            let config = NatsSecurity {
                nkey_seed: Some(bad),
                ..Default::default()
            };
            assert_eq!(config.validate().unwrap_err().key, "nats.nkey_seed");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let mut config = NatsSecurity {
            token: Some("t0k3n".into()),
            ..Default::default()
        };
        config.redact();
        assert_eq!(config.token.as_deref(), Some("<redacted>"));
        assert_eq!(config.password, None);
    }

    #[tokio::test]
    async fn unreachable_servers_are_retried_until_patience_runs_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let addr: async_nats::ServerAddr =
            format!("nats://127.0.0.1:{port}").parse().expect("addr");
        let mut attempts = 0;
        let started = std::time::Instant::now();
        let err = connect_first(
            || {
                attempts += 1;
                async { Ok(ConnectOptions::new().connection_timeout(Duration::from_secs(1))) }
            },
            &[addr],
            Duration::from_secs(2),
        )
        .await
        .expect_err("nothing listens");
        assert!(attempts >= 2, "retried: {attempts}");
        assert!(err.contains("gave up"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
