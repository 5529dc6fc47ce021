//! Configuration: defaults, then the TOML file, then `JETMQ_*` environment variables, then
//! command-line flags. Every key is documented in docs/configuration.md.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use jetmq_common::natsconn::NatsSecurity;
use jetmq_common::settings::InvalidSetting;

use crate::auth::AclConfig;
use crate::authn::AuthConfig;
use crate::dns::DnsConfig;
use crate::transport::tls::TlsConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identifies this node in session ownership records and logs (default: host name).
    pub node_id: String,
    pub listen: ListenConfig,
    pub nats: NatsConfig,
    /// How host names in `nats.urls` are resolved.
    pub dns: DnsConfig,
    pub limits: Limits,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub acl: AclConfig,
    pub log: LogConfig,
    pub drain: DrainConfig,
    pub telemetry: jetmq_common::otel::TelemetryConfig,
    pub session: SessionConfig,
}

/// Each listener is an `IP:port`, or `"off"` (also `""`): plain TCP is on by default, and
/// leaving the key out of a file keeps that default, so turning it off needs a word for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// MQTT over TCP.
    #[serde(deserialize_with = "listener_address")]
    pub tcp: Option<SocketAddr>,
    /// HTTP for /healthz and /readyz.
    #[serde(deserialize_with = "listener_address")]
    pub http: Option<SocketAddr>,
    /// MQTT over TLS (certificates in [`TlsConfig`]).
    #[serde(deserialize_with = "listener_address")]
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSocket.
    #[serde(deserialize_with = "listener_address")]
    pub ws: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS.
    #[serde(deserialize_with = "listener_address")]
    pub wss: Option<SocketAddr>,
    /// HTTP path of the WebSocket listeners.
    pub ws_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs; a host name that resolves to several addresses means all of them.
    pub urls: Vec<String>,
    /// JetStream replicas for streams and buckets this node creates (1..=5); unset: 3 when
    /// the NATS server is part of a cluster, else 1.
    pub replicas: Option<usize>,
    /// How long stored messages are kept for offline sessions, seconds.
    pub message_max_age_secs: u64,
    /// Upper bound on the message stream's size in bytes (-1: unlimited). When it is
    /// reached, new messages are refused (MQTT 5: reason 0x97) instead of old ones deleted.
    pub message_max_bytes: i64,
    /// Largest message the message stream takes, bytes (0: `limits.max_packet_size` plus
    /// 64 KiB for jetmq's envelope; -1: the NATS server's `max_payload`).
    pub message_max_msg_size: i32,
    /// Messages kept in memory per node for fast session resume and catch-up.
    pub replay_buffer_messages: usize,
    /// Upper bound on that buffer's memory, bytes.
    pub replay_buffer_bytes: usize,
    /// Publish QoS 1 messages in fast-ingest batches (nats-server 2.14+).
    pub batch_publish: bool,
    /// QoS 1 messages published one by one and waiting for their acks before the node
    /// switches to batches (0: always batch).
    pub batch_publish_after: usize,
    /// Most QoS 1 messages of one topic stored together as one stream message while they
    /// queue for a batch (1: each on its own).
    pub bundle_max_messages: usize,
    /// Node-wide bound on messages published one by one (QoS 2, QoS 1 outside batches,
    /// retained copies, wills) that wait for their JetStream acks; more wait to be sent.
    pub max_publishes_alone: usize,
    /// TLS and authentication towards NATS (keys shared with the ingestor).
    #[serde(flatten)]
    pub security: NatsSecurity,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest packet accepted from a client and advertised in CONNACK, bytes.
    pub max_packet_size: u32,
    /// How many QoS 1/2 PUBLISHes a client may have unacknowledged towards us.
    pub receive_maximum: u16,
    /// How many QoS 1/2 messages we keep in flight towards one client.
    pub max_inflight: u16,
    /// Messages queued for one session (online backlog or offline replay) before dropping.
    pub max_queued_messages: usize,
    /// Payload bytes queued for one session before it stops taking new messages.
    pub max_queued_bytes: usize,
    pub max_topic_levels: usize,
    pub max_topic_length: usize,
    pub max_client_id_length: usize,
    /// Keep alive granted at most, seconds; MQTT 5 clients asking for more get this value.
    pub max_keepalive: u16,
    /// Session expiry granted at most, seconds.
    pub max_session_expiry: u32,
    /// A socket that has not completed CONNECT by then is closed.
    pub connect_timeout_ms: u64,
    /// After CONNECT, each packet must arrive completely within this time of its first byte.
    pub packet_read_timeout_ms: u64,
    /// Topic aliases a client may use towards us (MQTT 5).
    pub topic_alias_maximum: u16,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Bytes that may wait in one connection's outgoing buffer before it counts as stuck.
    pub max_write_buffer: usize,
    /// Connections this node accepts at once.
    pub max_connections: usize,
    /// New connections per second this node accepts (0: no limit).
    pub max_connect_rate: u32,
    /// PUBLISH packets per second read from one connection (0: no limit).
    pub max_publish_rate: u32,
    /// Bytes per second read from one connection (0: no limit).
    pub max_inbound_bytes_rate: u64,
    /// Connections open at once from one source address (IPv6: one /64); 0: no limit.
    pub max_connections_per_ip: usize,
    /// New connections per second from one source address (IPv6: one /64); 0: no limit.
    pub max_connect_rate_per_ip: u32,
    /// PUBLISH packets per second read from all connections of one username on this node
    /// together (0: no limit).
    pub max_user_publish_rate: u32,
    /// Bytes per second read from all connections of one username on this node together
    /// (0: no limit).
    pub max_user_inbound_bytes_rate: u64,
}

/// Graceful drain (SIGTERM, SIGINT, `jetmq-broker drain`): see docs/drain.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Client disconnects are spread evenly over this time, milliseconds.
    pub duration_ms: u64,
    /// At most this many waves; each wave disconnects an equal share of the clients.
    pub waves: u32,
    /// Hard deadline from the start of the drain to the process exit, milliseconds.
    pub timeout_ms: u64,
    /// When set, MQTT 5 clients get DISCONNECT 0x9C (use another server) with this Server
    /// Reference instead of 0x8B (server shutting down).
    pub server_reference: Option<String>,
    /// Wills of drained clients with a persistent session wait at least this long, seconds,
    /// so a client that reconnects elsewhere in time cancels its will (0: MQTT's rule).
    pub will_delay_secs: u32,
}

/// How session records ride out trouble in the `JETMQ_SESSIONS` bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// How long a session write (and a CONNECT's claim) waits out a session store that does
    /// not answer, e.g. during the bucket's leader election, before the connection is given
    /// up, milliseconds.
    pub store_outage_grace_ms: u64,
    /// Session writes per node that may wait out an outage at once; a write beyond them
    /// fails at once (its connection closes), so an outage cannot pile up unbounded work.
    pub store_outage_max_waiting: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "jetmq_broker=debug".
    pub level: String,
    /// The old switch for JSON logs, now `telemetry.log_format` (which the ingestor shares):
    /// read only to refuse it with a message that names the new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<bool>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: default_node_id(),
            listen: ListenConfig::default(),
            nats: NatsConfig::default(),
            dns: DnsConfig::default(),
            limits: Limits::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            acl: AclConfig::default(),
            log: LogConfig::default(),
            drain: DrainConfig::default(),
            telemetry: Default::default(),
            session: SessionConfig::default(),
        }
    }
}

fn listener_address<'de, D>(deserializer: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    match text.trim() {
        "" | "off" => Ok(None),
        address => address.parse().map(Some).map_err(|err| {
            D::Error::custom(format!(
                "{address:?} is not a listener address ({err}): IP:port, or \"off\""
            ))
        }),
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
            http: None,
            tls: None,
            ws: None,
            wss: None,
            ws_path: "/mqtt".to_owned(),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            replicas: None,
            message_max_age_secs: 7 * 24 * 3600,
            message_max_bytes: DEFAULT_MESSAGE_MAX_BYTES,
            message_max_msg_size: 0,
            replay_buffer_messages: 32_768,
            replay_buffer_bytes: 8 * 1024 * 1024,
            batch_publish: true,
            batch_publish_after: 32,
            bundle_max_messages: 64,
            max_publishes_alone: 4096,
            security: NatsSecurity::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1024 * 1024,
            receive_maximum: 128,
            max_inflight: 128,
            max_queued_messages: 1000,
            max_queued_bytes: 8 * 1024 * 1024,
            max_topic_levels: 32,
            max_topic_length: 1024,
            max_client_id_length: 256,
            max_keepalive: 3600,
            max_session_expiry: 7 * 24 * 3600,
            connect_timeout_ms: 10_000,
            packet_read_timeout_ms: 60_000,
            topic_alias_maximum: 16,
            max_subscriptions: 1000,
            max_write_buffer: 4 * 1024 * 1024,
            max_connections: 100_000,
            max_connect_rate: 0,
            max_publish_rate: 50_000,
            max_inbound_bytes_rate: 16 * 1024 * 1024,
            max_user_publish_rate: 100_000,
            max_user_inbound_bytes_rate: 32 * 1024 * 1024,
            max_connections_per_ip: 0,
            max_connect_rate_per_ip: 0,
        }
    }
}

/// 2 GiB: half of the smallest `max_file_store` jetmq ships (compose, tests: 4 GB), so the
/// session and retained buckets always keep the other half (see docs/security.md, "Quotas").
pub const DEFAULT_MESSAGE_MAX_BYTES: i64 = 2 * 1024 * 1024 * 1024;

/// Room for jetmq's envelope (publisher id, MQTT 5 properties) above the MQTT packet size.
const ENVELOPE_ALLOWANCE: i32 = 64 * 1024;

impl NatsConfig {
    /// The message stream's `max_msg_size` this configuration asks for.
    pub fn effective_message_max_msg_size(&self, max_packet_size: u32) -> i32 {
        match self.message_max_msg_size {
            0 => i32::try_from(max_packet_size)
                .unwrap_or(i32::MAX)
                .saturating_add(ENVELOPE_ALLOWANCE),
            size => size,
        }
    }
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            duration_ms: 10_000,
            waves: 10,
            timeout_ms: 30_000,
            server_reference: None,
            will_delay_secs: 0,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            // A bucket leader election measured 3-7 s here (nats-server draws its election
            // timeout from 4-9 s); two of them back to back still fit.
            store_outage_grace_ms: 15_000,
            store_outage_max_waiting: 100_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            json: None,
        }
    }
}

fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "jetmq".to_owned())
}

/// Which `JETMQ_*` variables are configuration: `JETMQ_NODE_ID` and `JETMQ_<SECTION>__<KEY>`.
/// Others (`JETMQ_LOG`, read by the logger; the test harness's `JETMQ_BROKER_BIN`, ...)
/// are not, and must not fail the start-up as unknown keys.
fn is_config_env(key: &str) -> bool {
    const SECTIONS: [&str; 11] = [
        "listen",
        "nats",
        "limits",
        "tls",
        "auth",
        "acl",
        "log",
        "dns",
        "drain",
        "telemetry",
        "session",
    ];
    let key = key.to_ascii_lowercase();
    key == "node_id"
        || key
            .split_once('.')
            .is_some_and(|(section, _)| SECTIONS.contains(&section))
}

/// Values given on the command line; they win over file and environment.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_tcp: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_http: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_urls: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Setting(#[from] InvalidSetting),
}

impl Config {
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: Overrides,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_owned()));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed("JETMQ_")
                .split("__")
                .filter(|key| is_config_env(key.as_str())),
        );
        let mut flags = Figment::new();
        if let Some(v) = overrides.node_id {
            flags = flags.merge(Serialized::default("node_id", v));
        }
        if let Some(v) = overrides.listen_tcp {
            flags = flags.merge(Serialized::default("listen.tcp", v));
        }
        if let Some(v) = overrides.listen_http {
            flags = flags.merge(Serialized::default("listen.http", v));
        }
        if let Some(v) = overrides.nats_urls {
            flags = flags.merge(Serialized::default("nats.urls", v));
        }
        let config: Config = figment
            .merge(flags)
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, key: &'static str, reason: &str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(InvalidSetting::new(key, reason).into())
            }
        }
        check(
            self.log.json.is_none(),
            "log.json",
            "was replaced by telemetry.log_format = \"json\" (or \"text\")",
        )?;
        let l = &self.limits;
        check(!self.node_id.is_empty(), "node_id", "must not be empty")?;
        check(
            self.node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "node_id",
            "only ASCII letters, digits, '-' and '_' are allowed",
        )?;
        check(
            !self.nats.urls.is_empty(),
            "nats.urls",
            "at least one URL is needed",
        )?;
        check(
            self.nats.replicas.is_none_or(|r| (1..=5).contains(&r)),
            "nats.replicas",
            "must be between 1 and 5",
        )?;
        check(
            self.nats.message_max_bytes == -1 || self.nats.message_max_bytes >= 1024 * 1024,
            "nats.message_max_bytes",
            "must be -1 (no limit) or at least 1048576",
        )?;
        check(
            self.nats.message_max_msg_size >= -1,
            "nats.message_max_msg_size",
            "must be -1 (no limit), 0 (max_packet_size + 64 KiB) or a size in bytes",
        )?;
        check(
            (1..=1 << 24).contains(&self.nats.max_publishes_alone),
            "nats.max_publishes_alone",
            "must be between 1 and 16777216",
        )?;
        check(
            l.max_packet_size >= 64,
            "limits.max_packet_size",
            "must be at least 64 bytes",
        )?;
        check(
            l.max_packet_size < 256 * 1024 * 1024,
            "limits.max_packet_size",
            "MQTT cannot carry packets over 268435455 bytes",
        )?;
        check(
            l.receive_maximum > 0,
            "limits.receive_maximum",
            "must be at least 1",
        )?;
        check(
            l.max_inflight > 0,
            "limits.max_inflight",
            "must be at least 1",
        )?;
        check(
            l.max_queued_messages > 0,
            "limits.max_queued_messages",
            "must be at least 1",
        )?;
        check(
            l.max_topic_levels > 0,
            "limits.max_topic_levels",
            "must be at least 1",
        )?;
        check(
            l.max_client_id_length > 0,
            "limits.max_client_id_length",
            "must be at least 1",
        )?;
        check(
            l.connect_timeout_ms > 0,
            "limits.connect_timeout_ms",
            "must be positive",
        )?;
        check(
            l.packet_read_timeout_ms > 0,
            "limits.packet_read_timeout_ms",
            "must be positive",
        )?;
        check(
            l.max_write_buffer >= 4096,
            "limits.max_write_buffer",
            "must be at least 4096 bytes",
        )?;
        self.nats.security.validate()?;
        check(
            self.nats.replay_buffer_messages > 0,
            "nats.replay_buffer_messages",
            "must be at least 1",
        )?;
        check(
            (1..=jetmq_common::envelope::MAX_BUNDLE_MESSAGES)
                .contains(&self.nats.bundle_max_messages),
            "nats.bundle_max_messages",
            "must be between 1 and 255",
        )?;
        check(self.drain.waves > 0, "drain.waves", "must be at least 1")?;
        check(
            (1..=3_600_000).contains(&self.session.store_outage_grace_ms),
            "session.store_outage_grace_ms",
            "must be between 1 and 3600000",
        )?;
        check(
            self.session.store_outage_max_waiting > 0,
            "session.store_outage_max_waiting",
            "must be at least 1",
        )?;
        check(
            self.drain.timeout_ms > self.drain.duration_ms,
            "drain.timeout_ms",
            "must be longer than drain.duration_ms",
        )?;
        check(
            self.drain
                .server_reference
                .as_ref()
                .is_none_or(|r| !r.is_empty() && r.len() < 65_536),
            "drain.server_reference",
            "must be a non-empty string shorter than 64 KiB",
        )?;
        self.acl.validate()?;
        check(
            self.listen.ws_path.starts_with('/'),
            "listen.ws_path",
            "must start with '/'",
        )?;
        let tls_listener = self.listen.tls.is_some() || self.listen.wss.is_some();
        self.tls.validate(tls_listener)?;
        self.auth.validate()?;
        self.dns.validate()?;
        self.telemetry.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn file_values_are_read_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("jetmq-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("broker.toml");
        std::fs::write(
            &path,
            "node_id = \"file-node\"\n[limits]\nmax_packet_size = 2048\n",
        )
        .expect("write config");
        let config = Config::load(
            Some(&path),
            Overrides {
                node_id: Some("flag-node".into()),
                ..Default::default()
            },
        )
        .expect("loads");
        assert_eq!(config.node_id, "flag-node");
        assert_eq!(config.limits.max_packet_size, 2048);
    }

    #[test]
    fn a_listener_that_is_on_by_default_can_be_turned_off() {
        let dir = std::env::temp_dir().join(format!("jetmq-config-off-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("broker.toml");
        std::fs::write(&path, "[listen]\ntcp = \"off\"\nws = \"127.0.0.1:8083\"\n").expect("write");
        let config = Config::load(Some(&path), Overrides::default()).expect("loads");
        assert_eq!(config.listen.tcp, None);
        assert_eq!(
            config.listen.ws,
            Some(SocketAddr::from(([127, 0, 0, 1], 8083)))
        );
        // Left out, plain TCP keeps its default.
        std::fs::write(&path, "[listen]\nws = \"127.0.0.1:8083\"\n").expect("write");
        let config = Config::load(Some(&path), Overrides::default()).expect("loads");
        assert_eq!(config.listen.tcp, ListenConfig::default().tcp);
        std::fs::write(&path, "[listen]\ntcp = \"nowhere\"\n").expect("write");
        let err = Config::load(Some(&path), Overrides::default()).expect_err("refused");
        assert!(err.to_string().contains("\"off\""), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure type
    fn environment_sections_are_read_and_other_jetmq_variables_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("JETMQ_LIMITS__MAX_CONNECT_RATE", "7");
            jail.set_env("JETMQ_AUTH__JWT__AUDIENCE", "aud");
            jail.set_env("JETMQ_BROKER_BIN", "/somewhere/jetmq-broker");
            jail.set_env("JETMQ_LOG", "debug");
            let config = Config::load(None, Overrides::default()).expect("loads");
            assert_eq!(config.limits.max_connect_rate, 7);
            assert_eq!(config.auth.jwt.audience.as_deref(), Some("aud"));
            Ok(())
        });
    }

    #[test]
    fn drain_deadline_must_exceed_duration() {
        let mut config = Config::default();
        config.drain.timeout_ms = config.drain.duration_ms;
        let err = config.validate().expect_err("rejects");
        assert!(err.to_string().contains("drain.timeout_ms"), "{err}");
        config.drain.timeout_ms = config.drain.duration_ms + 1;
        config.drain.waves = 0;
        let err = config.validate().expect_err("rejects");
        assert!(err.to_string().contains("drain.waves"), "{err}");
    }

    #[test]
    fn unknown_and_invalid_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("jetmq-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("broker.toml");
        std::fs::write(&path, "[limits]\nmax_pakcet_size = 1\n").expect("write");
        let err = Config::load(Some(&path), Overrides::default()).expect_err("rejects");
        assert!(err.to_string().contains("max_pakcet_size"), "{err}");

        // [nats] takes the shared security keys flattened in; typos there are still caught.
        std::fs::write(&path, "[nats]\ntls_ca_fiel = \"x\"\n").expect("write");
        let err = Config::load(Some(&path), Overrides::default()).expect_err("rejects");
        assert!(err.to_string().contains("tls_ca_fiel"), "{err}");
        std::fs::write(
            &path,
            "[nats]\ntoken = \"t\"\ncreds_file = \"/etc/hostname\"\n",
        )
        .expect("write");
        let err = Config::load(Some(&path), Overrides::default()).expect_err("rejects");
        assert!(err.to_string().contains("only one of"), "{err}");
        std::fs::write(&path, "[nats]\ntls_required = true\ntoken = \"t\"\n").expect("write");
        let config = Config::load(Some(&path), Overrides::default()).expect("loads");
        assert!(config.nats.security.tls_required);
        assert_eq!(config.nats.security.token.as_deref(), Some("t"));

        std::fs::write(&path, "[limits]\nreceive_maximum = 0\n").expect("write");
        let err = Config::load(Some(&path), Overrides::default()).expect_err("rejects");
        assert!(err.to_string().contains("limits.receive_maximum"), "{err}");
    }

    fn reference_block() -> String {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc.find("```toml\n").expect("doc has a toml block") + 8;
        let end = doc[start..].find("```").expect("block ends") + start;
        doc[start..end].to_owned()
    }

    fn leaf_keys(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    leaf_keys(&path, value, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }

    #[test]
    fn the_old_log_json_switch_is_refused_naming_its_replacement() {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[log]\njson = true\n"))
            .extract()
            .expect("parses");
        let err = config.validate().expect_err("log.json must be refused");
        let text = err.to_string();
        assert!(
            text.contains("log.json") && text.contains("telemetry.log_format"),
            "{text}"
        );
    }

    #[test]
    fn documented_reference_parses_and_names_every_key() {
        let block = reference_block();
        let documented: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&block))
            .extract()
            .expect("docs/configuration.md block is a valid configuration");
        documented.validate().expect("documented values validate");
        let mut keys = Vec::new();
        leaf_keys(
            "",
            &serde_json::to_value(Config::default()).expect("serializes"),
            &mut keys,
        );
        // Optional keys that default to "unset" are documented commented out.
        let text = block.replace("# ", "");
        for key in keys {
            let name = key.rsplit('.').next().unwrap_or(&key);
            assert!(
                text.contains(&format!("{name} =")) || text.contains(&format!(".{name}]]")),
                "docs/configuration.md does not document `{key}`"
            );
        }
    }
}
