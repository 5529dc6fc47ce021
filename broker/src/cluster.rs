//! The node's connection to the NATS backbone and the JetStream objects it uses.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::Stream};
use async_nats::ConnectOptions;
use jetmq_common::retry::Backoff;
use jetmq_common::streams::{self, MessageStreamSettings};

use crate::config::{Config, NatsConfig};
use crate::dns::{DnsConfig, NatsAddresses};
use crate::session::{OutagePolicy, SessionStore};

/// Largest session record we write; also the bucket's value limit.
pub const MAX_SESSION_RECORD: usize = 256 * 1024;

pub struct Cluster {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub messages: Stream,
    pub retained: Stream,
    pub sessions: SessionStore,
}

/// The position of the end of `messages` (the message stream) as JetStream has it now
/// (every message stored so far is at or before it); None if it does not answer within
/// `timeout`.
pub async fn stored_upto(messages: &Stream, timeout: Duration) -> Option<u64> {
    let info = tokio::time::timeout(timeout, messages.get_info()).await;
    info.ok()?
        .ok()
        .map(|info| crate::routing::position::end_of(info.state.last_sequence))
}

/// Subject on which node `node_id` receives "drop this connection" requests.
pub fn kick_subject(node_id: &str) -> String {
    format!("jetmq.node.{node_id}.kick")
}

/// Subject on which node `node_id` takes drain requests (`jetmq-broker drain`).
pub fn drain_subject(node_id: &str) -> String {
    format!("jetmq.node.{node_id}.drain")
}

/// Asks node `node_id` to drain (see `crate::server`); returns its answer.
pub async fn request_drain(
    config: &NatsConfig,
    dns: &DnsConfig,
    node_id: &str,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let client = connect_client(config, dns, "drain-command").await?;
    let reply = tokio::time::timeout(
        timeout,
        client.request(drain_subject(node_id), bytes::Bytes::new()),
    )
    .await
    .with_context(|| format!("node {node_id:?} did not answer within {timeout:?}"))?
    .with_context(|| format!("drain request to node {node_id:?} failed (is it running?)"))?;
    serde_json::from_slice(&reply.payload)
        .with_context(|| format!("node {node_id:?} sent an unreadable answer"))
}

async fn connect_client(
    config: &NatsConfig,
    dns: &DnsConfig,
    node_id: &str,
) -> anyhow::Result<async_nats::Client> {
    // Host names stand for all their addresses, re-resolved on reconnects (crate::dns).
    let resolver = crate::dns::Resolver::new(dns)?;
    let addresses = Arc::new(
        NatsAddresses::new(resolver, &config.urls)
            .map_err(|e| anyhow::anyhow!("nats.urls: {e}"))?
            .keeping_names(config.security.uses_tls()),
    );
    let urls = addresses.resolve().await;
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| u.parse().with_context(|| format!("invalid NATS URL {u:?}")))
        .collect::<anyhow::Result<_>>()?;
    tracing::info!(servers = ?urls, "connecting to NATS");
    let name = format!("jetmq-broker/{node_id}");
    let client = jetmq_common::natsconn::connect_first(
        || nats_options(config, name.clone(), &addresses),
        &addrs,
        INITIAL_CONNECT_PATIENCE,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    addresses.spawn_refresh(client.clone(), Duration::from_secs(dns.refresh_secs));
    Ok(client)
}

/// How long start-up waits for an unreachable NATS (wrong credentials or a TLS failure stop
/// the node at once; see docs/security.md).
const INITIAL_CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// The client options: identity, timeouts, and the TLS and authentication of `[nats]`.
async fn nats_options(
    config: &NatsConfig,
    name: String,
    addresses: &Arc<NatsAddresses>,
) -> std::io::Result<ConnectOptions> {
    let options = ConnectOptions::new()
        .name(name)
        // Its own inbox prefix, which the generated NATS permissions give only the broker.
        .custom_inbox_prefix(jetmq_common::natsauth::BROKER_INBOX_PREFIX)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .client_capacity(65_536)
        .event_callback(|event| async move {
            match event {
                // After start-up the client reconnects on its own; a refused reconnect
                // (credentials revoked or rotated on the server) must stand out in the log.
                async_nats::Event::ServerError(err) => {
                    tracing::error!(error = %err, "NATS server error")
                }
                async_nats::Event::ClientError(err) => {
                    tracing::warn!(error = %err, "NATS client error")
                }
                event => tracing::info!(%event, "NATS connection event"),
            }
        });
    config.security.apply(addresses.install(options)).await
}

pub async fn connect(config: &Config) -> anyhow::Result<Cluster> {
    let client = connect_client(&config.nats, &config.dns, &config.node_id).await?;
    // One permit per un-awaited publish ack. Connections bound their own windows, so the
    // node-wide limit only has to be large enough never to block one connection on
    // another's acknowledgements.
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(1 << 20)
        .backpressure_on_inflight(true)
        .timeout(Duration::from_secs(10))
        .build(client.clone());
    let replicas = match config.nats.replicas {
        Some(replicas) => replicas,
        None => detect_replicas(&js).await,
    };
    let settings = MessageStreamSettings {
        replicas,
        max_age: Duration::from_secs(config.nats.message_max_age_secs),
        max_bytes: config.nats.message_max_bytes,
        max_message_size: config
            .nats
            .effective_message_max_msg_size(config.limits.max_packet_size),
        ..MessageStreamSettings::default()
    };
    // The server refuses a stream whose max_bytes (x replicas) it cannot reserve in its
    // store: no retry helps, so that one stops the start-up at once, saying what to change.
    let messages = with_retries("message stream", || async {
        match streams::ensure_message_stream(&js, &settings).await {
            Err(err) if err.to_string().contains("insufficient storage") => Ok(Err(err)),
            other => other.map(Ok),
        }
    })
    .await?
    .map_err(|err| {
        anyhow::anyhow!(
            "{err}: the NATS server cannot reserve nats.message_max_bytes = {} bytes (x {replicas} \
             replicas) in its JetStream store; lower nats.message_max_bytes or raise the \
             server's jetstream max_file_store (keep the stream at most half of it: \
             docs/security.md, \"Quotas\")",
            settings.max_bytes
        )
    })?;
    let messages = streams::apply_message_limits(&js, messages, &settings).await;
    let retained = with_retries("retained stream", || {
        streams::ensure_retained_stream(&js, replicas)
    })
    .await?;
    let sessions_kv = with_retries("session bucket", || {
        streams::ensure_kv_bucket(
            &js,
            streams::SESSION_BUCKET,
            replicas,
            Duration::ZERO,
            MAX_SESSION_RECORD as i32,
        )
    })
    .await?;
    Ok(Cluster {
        client,
        js,
        messages,
        retained,
        sessions: SessionStore::new(
            sessions_kv,
            MAX_SESSION_RECORD,
            OutagePolicy::new(
                Duration::from_millis(config.session.store_outage_grace_ms),
                config.session.store_outage_max_waiting,
            ),
        ),
    })
}

/// Replicas when the configuration leaves them open: those of an existing message stream,
/// else 3 unless the server refuses replication because it is not clustered.
async fn detect_replicas(js: &jetstream::Context) -> usize {
    if let Ok(stream) = js.get_stream(streams::MESSAGE_STREAM).await {
        return stream.cached_info().config.num_replicas.max(1);
    }
    let probe = MessageStreamSettings {
        replicas: 3,
        ..MessageStreamSettings::default()
    };
    let replicas = match streams::ensure_message_stream(js, &probe).await {
        Ok(stream) => stream.cached_info().config.num_replicas.max(1),
        Err(err) if err.to_string().contains("non-clustered") => 1,
        Err(err) => {
            tracing::warn!(error = %err, "cannot probe JetStream replication; assuming a cluster");
            3
        }
    };
    tracing::info!(replicas, "JetStream replicas chosen from the NATS server");
    replicas
}

/// JetStream set-up calls fail for a while on a cluster that is still electing its meta
/// leader (all nodes just started) or has lost one: retry for about a minute, then give up.
pub async fn with_retries<T, E, F, Fut>(what: &str, mut call: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(err) => {
                let pause = backoff.next_pause();
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(err);
                }
                tracing::warn!(what, error = %err, "JetStream not ready; retrying");
                tokio::time::sleep(pause).await;
            }
        }
    }
}
