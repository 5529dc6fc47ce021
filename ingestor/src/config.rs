//! Configuration: defaults, then a TOML file, then `JETMQ_<SECTION>__<KEY>` environment
//! variables, then command-line flags. Every key is documented in docs/ingestor.md.
//!
//! Entry points: [`Config::load`] (all sources, then [`Config::validate`]) and
//! [`Config::redacted`] for printing. The file stays whole: each section's keys, defaults
//! and checks are read together, and its non-test part (about 530 lines) is under the
//! size at which we split.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use jetmq_common::natsconn::NatsSecurity;
use jetmq_common::settings::InvalidSetting;

use crate::routing::{validate_filter, validate_kafka_topic};

/// Sections that environment variables may set; anything else under `JETMQ_` is left alone
/// (other jetmq programs and the test tools use that prefix too).
const SECTIONS: [&str; 6] = ["nats", "kafka", "ingest", "routing", "metrics", "telemetry"];

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(Box<figment::Error>),
    /// A value `validate()` refused (the key as written, and why).
    #[error("invalid configuration: {0}")]
    Invalid(#[from] InvalidSetting),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
}

fn invalid(key: &'static str, reason: impl Into<String>) -> InvalidSetting {
    InvalidSetting::new(key, reason)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub kafka: KafkaConfig,
    pub ingest: IngestConfig,
    pub routing: RoutingConfig,
    pub metrics: MetricsConfig,
    /// OpenTelemetry traces and the log format (shared with the broker).
    pub telemetry: jetmq_common::otel::TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs; a list or one comma-separated string.
    #[serde(deserialize_with = "string_or_list")]
    pub urls: Vec<String>,
    /// TLS and authentication towards NATS (keys shared with the broker).
    #[serde(flatten)]
    pub security: NatsSecurity,
    /// Replicas of the message stream if this ingestor is the first to create it.
    pub stream_replicas: usize,
    /// Durable consumer name: `<consumer_prefix>-<mqtt-id>`.
    pub consumer_prefix: String,
    /// Seconds JetStream waits for an ack before redelivering. In-flight messages get
    /// progress acks well within it, so a slow Kafka does not cause redeliveries.
    pub ack_wait_secs: u64,
    /// Messages asked for per pull request.
    pub fetch_batch: usize,
    /// Active/standby: pin the consumer to one process at a time (priority group,
    /// `pinned_client` policy). Other processes with the same `--mqtt-id` wait on standby.
    pub pinned: bool,
    /// Seconds without pulls after which the pin moves to a standby process.
    pub pin_timeout_secs: u64,
    pub connect_timeout_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            security: NatsSecurity::default(),
            stream_replicas: 1,
            consumer_prefix: "jetmq-ingestor".to_owned(),
            ack_wait_secs: 30,
            fetch_batch: 256,
            pinned: true,
            pin_timeout_secs: 30,
            connect_timeout_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port` list; a list or one comma-separated string.
    #[serde(deserialize_with = "string_or_list")]
    pub bootstrap_servers: Vec<String>,
    /// `linger.ms`: how long librdkafka waits to fill a batch.
    pub linger_ms: u64,
    /// `batch.size`: bytes per batch.
    pub batch_size: u64,
    /// `batch.num.messages`: records per batch.
    pub batch_num_messages: u64,
    /// `enable.idempotence` (with `acks=all`): no duplicates or reordering from retries.
    pub idempotence: bool,
    /// `max.in.flight.requests.per.connection`; at most 5 with idempotence to keep order.
    /// Default 1: librdkafka's idempotent producer sends only one request per partition at a
    /// time anyway, and while a partition waits for its answer with records queued behind it,
    /// a higher value leaves the broker thread polling without a timeout (a busy loop that
    /// cost a core per ingestor in the benchmark). With 1, a request waiting its turn stops
    /// that loop and the records behind it go out in the next, larger batch.
    pub max_in_flight_requests: u32,
    /// `message.timeout.ms`: 0 retries forever (the default: a Kafka outage only stalls
    /// the flow). A record that times out is handed back to JetStream (nak) and retried.
    pub message_timeout_ms: u64,
    /// Any librdkafka client setting (`"security.protocol" = "SASL_SSL"`, ...). Applied
    /// last, so it overrides the keys above. From the environment, `_` stands for `.`.
    #[serde(deserialize_with = "string_map")]
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: vec!["127.0.0.1:9092".to_owned()],
            linger_ms: 5,
            batch_size: 1_000_000,
            batch_num_messages: 10_000,
            idempotence: true,
            max_in_flight_requests: 1,
            message_timeout_ms: 0,
            client: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Records handed to Kafka but not yet confirmed (and so not yet acked in NATS). Also
    /// the consumer's `max_ack_pending`.
    pub max_in_flight: usize,
    /// Seconds to wait for in-flight confirmations on shutdown.
    pub shutdown_timeout_secs: u64,
    /// Prefix of the metadata headers (`mqtt.topic`, `mqtt.qos`, ...).
    pub header_prefix: String,
    /// Prefix of the headers that carry MQTT 5 user properties.
    pub user_property_prefix: String,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_in_flight: 2048,
            shutdown_timeout_secs: 30,
            header_prefix: "mqtt.".to_owned(),
            user_property_prefix: "mqtt.user.".to_owned(),
        }
    }
}

/// What the Kafka record key is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    /// The MQTT topic: one topic lands on one Kafka partition, in order.
    #[default]
    Topic,
    /// The publisher's client id.
    ClientId,
    /// No key: librdkafka spreads records over partitions.
    None,
}

impl std::str::FromStr for KeyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "topic" => Ok(KeyMode::Topic),
            "client_id" => Ok(KeyMode::ClientId),
            "none" => Ok(KeyMode::None),
            other => Err(format!(
                "unknown key mode {other:?}, expected topic, client_id or none"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// MQTT topic filter (`+`, `#`).
    pub filter: String,
    /// Kafka topic.
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Kafka topic of messages that match no rule.
    pub default_topic: String,
    /// Kafka topic of records Kafka refused for good and of undecodable messages; empty
    /// disables it (such messages are then terminated in JetStream and logged).
    pub dead_letter_topic: String,
    pub key_mode: KeyMode,
    /// Ordered: the first rule whose filter matches wins.
    pub rules: Vec<RouteRule>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            default_topic: "mqtt".to_owned(),
            dead_letter_topic: "mqtt-dead-letter".to_owned(),
            key_mode: KeyMode::Topic,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus text endpoint (`GET /metrics`); off when unset.
    pub listen: Option<SocketAddr>,
    /// Seconds between counter log lines (0: never).
    pub log_interval_secs: u64,
    /// Seconds between consumer-lag (num_pending) queries.
    pub lag_interval_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            log_interval_secs: 30,
            lag_interval_secs: 5,
        }
    }
}

/// Values given on the command line; each overrides the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub nats_urls: Option<String>,
    pub kafka_bootstrap_servers: Option<String>,
    pub metrics_listen: Option<String>,
    pub key_mode: Option<String>,
    pub default_topic: Option<String>,
    pub dead_letter_topic: Option<String>,
    pub consumer_prefix: Option<String>,
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => split_list(&s),
        OneOrMany::Many(v) => v.iter().flat_map(|s| split_list(s)).collect(),
    })
}

fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(String),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::Bool(b) => b.to_string(),
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Str(s) => s,
            };
            (k, v)
        })
        .collect())
}

impl Config {
    /// Loads defaults < `file` < environment (`JETMQ_<SECTION>__<KEY>`) < `overrides`, and
    /// checks the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from_env(file, overrides, Env::prefixed("JETMQ_"))
    }

    fn load_from_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: Env,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = env
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                key.split_once("__")
                    .is_some_and(|(section, _)| SECTIONS.contains(&section))
            })
            .split("__");
        figment = figment.merge(env);
        if let Some(v) = &overrides.nats_urls {
            figment = figment.merge(("nats.urls", split_list(v)));
        }
        if let Some(v) = &overrides.kafka_bootstrap_servers {
            figment = figment.merge(("kafka.bootstrap_servers", split_list(v)));
        }
        if let Some(v) = &overrides.metrics_listen {
            figment = figment.merge(("metrics.listen", v));
        }
        if let Some(v) = &overrides.key_mode {
            figment = figment.merge(("routing.key_mode", v));
        }
        if let Some(v) = &overrides.default_topic {
            figment = figment.merge(("routing.default_topic", v));
        }
        if let Some(v) = &overrides.dead_letter_topic {
            figment = figment.merge(("routing.dead_letter_topic", v));
        }
        if let Some(v) = &overrides.consumer_prefix {
            figment = figment.merge(("nats.consumer_prefix", v));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        // Environment variables cannot hold `.`: `JETMQ_KAFKA__CLIENT__SASL_USERNAME`
        // stands for `sasl.username`. librdkafka's own names use dots, never underscores.
        config.kafka.client = std::mem::take(&mut config.kafka.client)
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges, combinations, names; the error names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.telemetry.validate()?;
        let n = &self.nats;
        if n.urls.is_empty() {
            return Err(invalid(
                "nats.urls",
                "at least one NATS server URL is needed",
            ));
        }
        for url in &n.urls {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid("nats.urls", format!("{url:?} is not a NATS URL: {e}")))?;
        }
        n.security.validate()?;
        if !(1..=5).contains(&n.stream_replicas) {
            return Err(invalid("nats.stream_replicas", "must be between 1 and 5"));
        }
        if n.consumer_prefix.is_empty()
            || !n
                .consumer_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "nats.consumer_prefix",
                "must be non-empty and hold only letters, digits, '-' and '_'",
            ));
        }
        if n.ack_wait_secs < 3 {
            return Err(invalid("nats.ack_wait_secs", "must be at least 3"));
        }
        if n.fetch_batch == 0 {
            return Err(invalid("nats.fetch_batch", "must be at least 1"));
        }
        if n.pinned && n.pin_timeout_secs < 3 {
            return Err(invalid("nats.pin_timeout_secs", "must be at least 3"));
        }
        if n.connect_timeout_secs == 0 {
            return Err(invalid("nats.connect_timeout_secs", "must be at least 1"));
        }

        let k = &self.kafka;
        if k.bootstrap_servers.is_empty() {
            return Err(invalid(
                "kafka.bootstrap_servers",
                "at least one Kafka broker (host:port) is needed",
            ));
        }
        if k.batch_size == 0 {
            return Err(invalid("kafka.batch_size", "must be at least 1"));
        }
        if k.batch_num_messages == 0 {
            return Err(invalid("kafka.batch_num_messages", "must be at least 1"));
        }
        if k.max_in_flight_requests == 0 {
            return Err(invalid(
                "kafka.max_in_flight_requests",
                "must be at least 1",
            ));
        }
        if k.idempotence && k.max_in_flight_requests > 5 {
            return Err(invalid(
                "kafka.max_in_flight_requests",
                "must be at most 5 with kafka.idempotence (order and no duplicates)",
            ));
        }
        for key in k.client.keys() {
            if key.is_empty() {
                return Err(invalid("kafka.client", "empty setting name"));
            }
        }
        if let Some(v) = k.client.get("max.in.flight.requests.per.connection") {
            let idempotent = k
                .client
                .get("enable.idempotence")
                .map_or(k.idempotence, |v| v == "true");
            match v.parse::<u32>() {
                Ok(n) if n >= 1 && (!idempotent || n <= 5) => {}
                _ => {
                    return Err(invalid(
                        "kafka.client.max.in.flight.requests.per.connection",
                        "must be between 1 and 5 with idempotence",
                    ))
                }
            }
        }
        for forbidden in ["transactional.id", "bootstrap.servers"] {
            if k.client.contains_key(forbidden) {
                let why = if forbidden == "bootstrap.servers" {
                    "set kafka.bootstrap_servers instead"
                } else {
                    "transactions are not used"
                };
                let key = if forbidden == "bootstrap.servers" {
                    "kafka.client.bootstrap.servers"
                } else {
                    "kafka.client.transactional.id"
                };
                return Err(invalid(key, why));
            }
        }

        let i = &self.ingest;
        if i.max_in_flight == 0 || i.max_in_flight > 100_000 {
            return Err(invalid(
                "ingest.max_in_flight",
                "must be between 1 and 100000",
            ));
        }
        if i.header_prefix.is_empty() {
            return Err(invalid("ingest.header_prefix", "must not be empty"));
        }
        if i.user_property_prefix.is_empty() {
            return Err(invalid("ingest.user_property_prefix", "must not be empty"));
        }

        let r = &self.routing;
        validate_kafka_topic(&r.default_topic).map_err(|m| invalid("routing.default_topic", m))?;
        if !r.dead_letter_topic.is_empty() {
            validate_kafka_topic(&r.dead_letter_topic)
                .map_err(|m| invalid("routing.dead_letter_topic", m))?;
        }
        for (idx, rule) in r.rules.iter().enumerate() {
            validate_filter(&rule.filter)
                .map_err(|m| invalid("routing.rules", m).within(format!("[{idx}].filter")))?;
            validate_kafka_topic(&rule.topic)
                .map_err(|m| invalid("routing.rules", m).within(format!("[{idx}].topic")))?;
        }

        let m = &self.metrics;
        if m.lag_interval_secs == 0 {
            return Err(invalid("metrics.lag_interval_secs", "must be at least 1"));
        }
        Ok(())
    }

    /// A copy with secrets (NATS token, password, NKey seed, Kafka client settings whose
    /// name mentions a password, secret or key) replaced by `<redacted>`, for printing.
    pub fn redacted(&self) -> Config {
        const HIDDEN: &str = "<redacted>";
        let mut c = self.clone();
        c.nats.security.redact();
        for (key, value) in c.kafka.client.iter_mut() {
            let k = key.to_ascii_lowercase();
            if k.contains("password")
                || k.contains("secret")
                || k.ends_with(".pem") && k.contains("key")
            {
                *value = HIDDEN.to_owned();
            }
        }
        c
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.nats.ack_wait_secs)
    }

    pub fn pin_timeout(&self) -> Duration {
        Duration::from_secs(self.nats.pin_timeout_secs)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.ingest.shutdown_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // figment::Jail's closure type is figment's, error size included.
    #[allow(clippy::result_large_err)]
    fn load_str(toml: &str, env: &[(&str, &str)], o: &Overrides) -> Result<Config, String> {
        let mut result = Err(String::new());
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", toml)?;
            for (k, v) in env {
                jail.set_env(k, v);
            }
            result = Config::load(Some(Path::new("c.toml")), o).map_err(|e| e.to_string());
            Ok(())
        });
        result
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults valid");
        let c = load_str("", &[], &Overrides::default()).expect("empty file");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn file_then_env_then_flags() {
        let toml = r##"
            [nats]
            urls = "nats://10.0.0.1:4222, nats://10.0.0.2:4222"
            [kafka]
            bootstrap_servers = ["k1:9092"]
            linger_ms = 20
            [kafka.client]
            "security.protocol" = "SASL_SSL"
            "sasl.mechanism" = "PLAIN"
            "socket.keepalive.enable" = true
            "retries" = 7
            [routing]
            key_mode = "client_id"
            [[routing.rules]]
            filter = "sensors/+/temp"
            topic = "temps"
            [[routing.rules]]
            filter = "#"
            topic = "all"
        "##;
        let c = load_str(
            toml,
            &[
                ("JETMQ_KAFKA__BOOTSTRAP_SERVERS", "k2:9092,k3:9092"),
                ("JETMQ_KAFKA__LINGER_MS", "50"),
                ("JETMQ_KAFKA__CLIENT__SASL_PASSWORD", "secret"),
                ("JETMQ_NATS_SERVER", "/not/a/config/key"),
                ("JETMQ_CACHE", "/tmp"),
                ("JETMQ_BROKER__LISTEN", "other program"),
            ],
            &Overrides {
                nats_urls: Some("nats://127.0.0.1:5000".into()),
                metrics_listen: Some("127.0.0.1:9100".into()),
                ..Default::default()
            },
        )
        .expect("valid");
        assert_eq!(c.nats.urls, vec!["nats://127.0.0.1:5000"]);
        assert_eq!(c.kafka.bootstrap_servers, vec!["k2:9092", "k3:9092"]);
        assert_eq!(c.kafka.linger_ms, 50);
        assert_eq!(c.kafka.client["security.protocol"], "SASL_SSL");
        assert_eq!(c.kafka.client["sasl.password"], "secret");
        assert_eq!(c.kafka.client["socket.keepalive.enable"], "true");
        assert_eq!(c.kafka.client["retries"], "7");
        assert_eq!(c.routing.key_mode, KeyMode::ClientId);
        assert_eq!(c.routing.rules.len(), 2);
        assert_eq!(c.routing.rules[0].topic, "temps");
        assert_eq!(
            c.metrics.listen,
            Some("127.0.0.1:9100".parse().expect("addr"))
        );
    }

    #[test]
    fn file_urls_as_comma_string() {
        let c = load_str(
            "[nats]\nurls = \"nats://a:1,nats://b:2\"\n",
            &[],
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(c.nats.urls, vec!["nats://a:1", "nats://b:2"]);
    }

    fn err_of(toml: &str, env: &[(&str, &str)]) -> String {
        match load_str(toml, env, &Overrides::default()) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = err_of("[kafka]\nlingr_ms = 3\n", &[]);
        assert!(e.contains("lingr_ms"), "{e}");
        let e = err_of("[kafka]\nlinger_ms = \"soon\"\n", &[]);
        assert!(e.contains("linger_ms"), "{e}");
        let e = err_of("", &[("JETMQ_KAFKA__LINGER_MS", "-4")]);
        assert!(e.to_lowercase().contains("kafka.linger_ms"), "{e}");
        assert!(e.contains("JETMQ_"), "{e}");
        let e = err_of("[routing]\nkey_mode = \"partition\"\n", &[]);
        assert!(e.contains("key_mode"), "{e}");
        let e = err_of("[kafka]\nbootstrap_servers = \"\"\n", &[]);
        assert!(e.contains("kafka.bootstrap_servers"), "{e}");
        let e = err_of(
            "[[routing.rules]]\nfilter = \"a/#/b\"\ntopic = \"t\"\n",
            &[],
        );
        assert!(e.contains("routing.rules[0].filter"), "{e}");
        let e = err_of(
            "[[routing.rules]]\nfilter = \"a\"\ntopic = \"bad topic\"\n",
            &[],
        );
        assert!(e.contains("routing.rules[0].topic"), "{e}");
        let e = err_of("[routing]\ndefault_topic = \"\"\n", &[]);
        assert!(e.contains("routing.default_topic"), "{e}");
        let e = err_of("[kafka]\nmax_in_flight_requests = 6\n", &[]);
        assert!(e.contains("kafka.max_in_flight_requests"), "{e}");
        let e = err_of(
            "[kafka.client]\n\"max.in.flight.requests.per.connection\" = 10\n",
            &[],
        );
        assert!(e.contains("max.in.flight.requests.per.connection"), "{e}");
        let e = err_of("[nats]\nurls = []\n", &[]);
        assert!(e.contains("nats.urls"), "{e}");
        let e = err_of("[nats]\ntoken = \"t\"\nnkey_seed = \"SU\"\n", &[]);
        assert!(e.contains("nats"), "{e}");
        let e = err_of("[nats]\ncreds_file = \"/does/not/exist.creds\"\n", &[]);
        assert!(e.contains("nats.creds_file"), "{e}");
        let e = err_of("[ingest]\nmax_in_flight = 0\n", &[]);
        assert!(e.contains("ingest.max_in_flight"), "{e}");
        let e = err_of("[metrics]\nlisten = \"nowhere\"\n", &[]);
        assert!(e.contains("listen"), "{e}");
        let e = err_of("[nats]\nconsumer_prefix = \"a.b\"\n", &[]);
        assert!(e.contains("nats.consumer_prefix"), "{e}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/no/such/file.toml")), &Overrides::default())
            .expect_err("missing");
        assert!(e.to_string().contains("/no/such/file.toml"));
    }

    #[test]
    fn secrets_are_redacted_for_printing() {
        let mut c = Config::default();
        c.nats.security.token = Some("t0k3n".into());
        c.kafka
            .client
            .insert("sasl.password".into(), "hunter2".into());
        c.kafka
            .client
            .insert("sasl.username".into(), "jetmq".into());
        let printed = serde_json::to_string(&c.redacted()).expect("json");
        assert!(
            !printed.contains("t0k3n") && !printed.contains("hunter2"),
            "{printed}"
        );
        assert!(printed.contains("jetmq"));
    }

    #[test]
    fn key_mode_parses() {
        assert_eq!("topic".parse(), Ok(KeyMode::Topic));
        assert_eq!("client_id".parse(), Ok(KeyMode::ClientId));
        assert_eq!("none".parse(), Ok(KeyMode::None));
        assert!("x".parse::<KeyMode>().is_err());
    }
}
