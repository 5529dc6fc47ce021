//! The node's connection to the NATS backbone and the JetStream objects it uses.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::Stream};
use async_nats::ConnectOptions;
use jetmq_common::streams::{self, MessageStreamSettings};

use crate::config::{Config, NatsConfig};
use crate::session::SessionStore;

/// Largest session record we write; also the bucket's value limit.
pub const MAX_SESSION_RECORD: usize = 256 * 1024;

pub struct Cluster {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub messages: Stream,
    pub retained: Stream,
    pub sessions: SessionStore,
}

/// Subject on which node `node_id` receives "drop this connection" requests.
pub fn kick_subject(node_id: &str) -> String {
    format!("jetmq.node.{node_id}.kick")
}

/// Subject on which node `node_id` takes drain requests (`jetmq-broker drain`).
pub fn drain_subject(node_id: &str) -> String {
    format!("jetmq.node.{node_id}.drain")
}

/// Expands every URL whose host resolves to several addresses into one URL per address,
/// so that a round-robin DNS name for the NATS cluster means all of its nodes.
pub async fn expand_urls(urls: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for url in urls {
        for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (scheme, rest) = part.split_once("://").unwrap_or(("nats", part));
            let (auth, hostport) = match rest.rsplit_once('@') {
                Some((auth, hp)) => (Some(auth), hp),
                None => (None, rest),
            };
            let with_port = if hostport
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                hostport.to_owned()
            } else {
                format!("{hostport}:4222")
            };
            let is_ip = with_port.parse::<std::net::SocketAddr>().is_ok();
            // TLS needs the host name for verification: keep those URLs as they are.
            let resolved = if is_ip || scheme == "tls" {
                Vec::new()
            } else {
                match tokio::net::lookup_host(with_port.as_str()).await {
                    Ok(addrs) => addrs.collect::<Vec<_>>(),
                    Err(err) => {
                        tracing::warn!(url = %part, error = %err, "cannot resolve NATS host; using it as given");
                        Vec::new()
                    }
                }
            };
            if resolved.is_empty() {
                out.push(format!("{scheme}://{}", rest));
            } else {
                for addr in resolved {
                    let auth = auth.map(|a| format!("{a}@")).unwrap_or_default();
                    out.push(format!("{scheme}://{auth}{addr}"));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Asks node `node_id` to drain (see `crate::server`); returns its answer.
pub async fn request_drain(
    config: &NatsConfig,
    node_id: &str,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let client = connect_client(config, "drain-command").await?;
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

async fn connect_client(config: &NatsConfig, node_id: &str) -> anyhow::Result<async_nats::Client> {
    let urls = expand_urls(&config.urls).await;
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| u.parse().with_context(|| format!("invalid NATS URL {u:?}")))
        .collect::<anyhow::Result<_>>()?;
    let mut options = ConnectOptions::new()
        .name(format!("jetmq-broker/{node_id}"))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .client_capacity(65_536)
        .event_callback(|event| async move {
            tracing::info!(%event, "NATS connection event");
        });
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("cannot read NATS credentials {}", path.display()))?;
    }
    tracing::info!(servers = ?urls, "connecting to NATS");
    let client = tokio::time::timeout(Duration::from_secs(30), options.connect(addrs))
        .await
        .context("timed out connecting to NATS")?
        .context("cannot connect to NATS")?;
    Ok(client)
}

pub async fn connect(config: &Config) -> anyhow::Result<Cluster> {
    let client = connect_client(&config.nats, &config.node_id).await?;
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
        ..MessageStreamSettings::default()
    };
    let messages = with_retries("message stream", || {
        streams::ensure_message_stream(&js, &settings)
    })
    .await?;
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
        sessions: SessionStore::new(sessions_kv, MAX_SESSION_RECORD),
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
    let mut delay = Duration::from_millis(250);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(err) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(what, error = %err, "JetStream not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_urls_are_kept_and_lists_split() {
        let urls = expand_urls(&["nats://127.0.0.1:4222,127.0.0.2:4223".to_owned()]).await;
        assert_eq!(urls, vec!["nats://127.0.0.1:4222", "nats://127.0.0.2:4223"]);
    }

    #[tokio::test]
    async fn host_names_expand_to_addresses() {
        let urls = expand_urls(&["nats://localhost:4222".to_owned()]).await;
        assert!(!urls.is_empty());
        assert!(urls.iter().all(|u| !u.contains("localhost")), "{urls:?}");
    }
}
