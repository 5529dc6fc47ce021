//! TLS for the `listen.tls` and `listen.wss` listeners: certificates from PEM files,
//! optional client certificates (mutual TLS), reload without dropping connections.
//!
//! The current `rustls::ServerConfig` sits behind a lock and is cloned (an `Arc`) for each
//! handshake; a reload builds a new one and swaps it in, so connections already up keep
//! the session they negotiated and new handshakes use the new certificate. A reload that
//! fails (missing file, key not matching) is logged and the old configuration stays.

use jetmq_common::settings::InvalidSetting;
use parking_lot::{Mutex, RwLock};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, ServerConnection};

/// Whether TLS clients must present a certificate signed by `client_ca_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No certificate is asked for.
    #[default]
    None,
    /// A certificate is asked for; without one the client still connects (and has to log
    /// in by other means), with an invalid one the handshake fails.
    Optional,
    /// No valid certificate, no connection.
    Required,
}

/// Which name of a verified client certificate becomes the MQTT username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertName {
    /// The certificate authenticates the connection only; the CONNECT decides the username.
    #[default]
    None,
    /// The subject's common name.
    Cn,
    /// The first DNS subject alternative name.
    SanDns,
    /// The first e-mail (rfc822) subject alternative name.
    SanEmail,
    /// The first URI subject alternative name (e.g. a SPIFFE id).
    SanUri,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain, PEM (leaf first).
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates that sign client certificates, PEM.
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// Certificate revocation lists (PEM, one or more) of the CAs in `client_ca_file`;
    /// a client certificate they revoke fails the handshake.
    pub crl_file: Option<PathBuf>,
    pub username_from_cert: CertName,
    /// How often the files are checked for changes, seconds; 0: only on SIGHUP.
    pub reload_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_auth: ClientAuth::None,
            crl_file: None,
            username_from_cert: CertName::None,
            reload_interval_secs: 30,
        }
    }
}

impl TlsConfig {
    /// Checks what can be checked without reading files. `needed`: a TLS listener is on.
    pub fn validate(&self, needed: bool) -> Result<(), InvalidSetting> {
        if needed && self.cert_file.is_none() {
            return Err(InvalidSetting::new(
                "tls.cert_file",
                "required by listen.tls / listen.wss",
            ));
        }
        if needed && self.key_file.is_none() {
            return Err(InvalidSetting::new(
                "tls.key_file",
                "required by listen.tls / listen.wss",
            ));
        }
        if self.client_auth != ClientAuth::None && self.client_ca_file.is_none() {
            return Err(InvalidSetting::new(
                "tls.client_ca_file",
                "required when tls.client_auth is optional or required",
            ));
        }
        if self.crl_file.is_some() && self.client_auth == ClientAuth::None {
            return Err(InvalidSetting::new(
                "tls.crl_file",
                "needs tls.client_auth = \"optional\" or \"required\"",
            ));
        }
        if self.username_from_cert != CertName::None && self.client_auth == ClientAuth::None {
            return Err(InvalidSetting::new(
                "tls.username_from_cert",
                "needs tls.client_auth = \"optional\" or \"required\"",
            ));
        }
        Ok(())
    }
}

/// The files' contents as last loaded, to notice changes.
#[derive(Debug, PartialEq, Eq)]
struct Loaded {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    crl: Option<Vec<u8>>,
}

/// The live TLS server configuration.
pub struct TlsState {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

impl TlsState {
    pub fn load(config: &TlsConfig) -> anyhow::Result<TlsState> {
        let loaded = read_files(config)?;
        let server = build(config, &loaded)?;
        Ok(TlsState {
            config: config.clone(),
            current: RwLock::new(Arc::new(server)),
            loaded: Mutex::new(loaded),
        })
    }

    /// The configuration for a new handshake.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.read().clone()
    }

    /// Re-reads the files; swaps the configuration in if they changed and are valid.
    /// Ok(true): reloaded; Ok(false): nothing changed.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let loaded = read_files(&self.config)?;
        let mut last = self.loaded.lock();
        if *last == loaded {
            return Ok(false);
        }
        let server = build(&self.config, &loaded)?;
        *self.current.write() = Arc::new(server);
        *last = loaded;
        Ok(true)
    }

    pub fn reload_interval(&self) -> Option<std::time::Duration> {
        (self.config.reload_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(self.config.reload_interval_secs))
    }

    /// The MQTT username a verified client certificate stands for, if configured.
    pub fn cert_username(&self, connection: &ServerConnection) -> Option<String> {
        if self.config.username_from_cert == CertName::None {
            return None;
        }
        // rustls only hands out certificates that passed verification.
        let leaf = connection.peer_certificates()?.first()?;
        cert_name(leaf, self.config.username_from_cert)
    }
}

fn read_files(config: &TlsConfig) -> anyhow::Result<Loaded> {
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        anyhow::bail!("tls.cert_file and tls.key_file are required");
    };
    Ok(Loaded {
        cert: read(cert, "certificate")?,
        key: read(key, "private key")?,
        client_ca: config
            .client_ca_file
            .as_deref()
            .map(|p| read(p, "client CA bundle"))
            .transpose()?,
        crl: config
            .crl_file
            .as_deref()
            .map(|p| read(p, "certificate revocation list"))
            .transpose()?,
    })
}

fn build(config: &TlsConfig, files: &Loaded) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("tls.cert_file: {e}"))?;
    anyhow::ensure!(!certs.is_empty(), "tls.cert_file holds no certificate");
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|e| anyhow::anyhow!("tls.key_file: {e}"))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match (&files.client_ca, config.client_auth) {
        (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| anyhow::anyhow!("tls.client_ca_file: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("tls.client_ca_file: {e}"))?;
            }
            anyhow::ensure!(!roots.is_empty(), "tls.client_ca_file holds no certificate");
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if let Some(crl) = &files.crl {
                let crls: Vec<CertificateRevocationListDer<'static>> =
                    CertificateRevocationListDer::pem_slice_iter(crl)
                        .collect::<Result<_, _>>()
                        .map_err(|e| anyhow::anyhow!("tls.crl_file: {e}"))?;
                anyhow::ensure!(!crls.is_empty(), "tls.crl_file holds no CRL");
                // Like mosquitto's crlfile: the client's own certificate is checked, and
                // the CRL of its issuer must be there (a certificate whose issuer has no CRL
                // in the file is refused). Intermediate CAs are not checked. A CRL past its
                // next update still counts: a stalled CRL publisher must not lock out
                // every device.
                verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
            }
            let verifier = if config.client_auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| anyhow::anyhow!("tls.client_ca_file: {e}"))?,
            )
        }
        _ => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .context("tls.cert_file / tls.key_file do not fit together")
}

/// The chosen name from a DER certificate.
pub fn cert_name(der: &[u8], which: CertName) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = match which {
        CertName::None => None,
        CertName::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        CertName::SanDns | CertName::SanEmail | CertName::SanUri => cert
            .subject_alternative_name()
            .ok()
            .flatten()?
            .value
            .general_names
            .iter()
            .find_map(|name| match (which, name) {
                (CertName::SanDns, GeneralName::DNSName(s))
                | (CertName::SanEmail, GeneralName::RFC822Name(s))
                | (CertName::SanUri, GeneralName::URI(s)) => Some((*s).to_owned()),
                _ => None,
            }),
    };
    name.filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(cn: &str, sans: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn names_are_taken_from_the_certificate() {
        let der = cert_with("device-42", &["dev42.example.com"]);
        assert_eq!(cert_name(&der, CertName::Cn).as_deref(), Some("device-42"));
        assert_eq!(
            cert_name(&der, CertName::SanDns).as_deref(),
            Some("dev42.example.com")
        );
        assert_eq!(cert_name(&der, CertName::SanEmail), None);
        assert_eq!(cert_name(&der, CertName::None), None);
        assert_eq!(cert_name(b"garbage", CertName::Cn), None);
    }

    #[test]
    fn validation_names_the_missing_key() {
        let mut config = TlsConfig::default();
        assert!(config.validate(false).is_ok());
        assert_eq!(config.validate(true).unwrap_err().key, "tls.cert_file");
        config.cert_file = Some("c.pem".into());
        config.key_file = Some("k.pem".into());
        config.username_from_cert = CertName::Cn;
        assert_eq!(
            config.validate(true).unwrap_err().key,
            "tls.username_from_cert"
        );
        config.client_auth = ClientAuth::Required;
        assert_eq!(config.validate(true).unwrap_err().key, "tls.client_ca_file");
        config.client_ca_file = Some("ca.pem".into());
        assert!(config.validate(true).is_ok());
        config.crl_file = Some("crl.pem".into());
        assert!(config.validate(true).is_ok());
        config.client_auth = ClientAuth::None;
        config.username_from_cert = CertName::None;
        assert_eq!(config.validate(true).unwrap_err().key, "tls.crl_file");
    }

    #[test]
    fn reload_swaps_only_on_change_and_keeps_the_old_config_on_error() {
        let dir = std::env::temp_dir().join(format!("jetmq-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let write_pair = |name: &str| {
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
                .expect("params")
                .self_signed(&key)
                .expect("cert");
            std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
            std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
        };
        write_pair("one.test");
        let config = TlsConfig {
            cert_file: Some(dir.join("cert.pem")),
            key_file: Some(dir.join("key.pem")),
            ..TlsConfig::default()
        };
        let state = TlsState::load(&config).expect("loads");
        let first = state.server_config();
        assert!(!state.reload().expect("unchanged"));
        assert!(Arc::ptr_eq(&first, &state.server_config()));
        write_pair("two.test");
        assert!(state.reload().expect("changed"));
        let second = state.server_config();
        assert!(!Arc::ptr_eq(&first, &second));
        std::fs::write(dir.join("key.pem"), "not a key").expect("write");
        assert!(state.reload().is_err());
        assert!(Arc::ptr_eq(&second, &state.server_config()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
