//! Set-up against NATS: connect (with the ingestor's own inbox prefix), make sure the
//! message stream exists, create or update the durable consumer of the share; each step
//! retried until it works, NATS refuses us for good, or shutdown is asked for.

use std::time::Duration;

use anyhow::anyhow;
use async_nats::jetstream::{self, consumer};
use jetmq_common::retry::Backoff;
use jetmq_common::streams::{ensure_message_stream, MessageStreamSettings};
use jetmq_common::subject::share_filter;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::Config;

/// The priority group every ingestor process of one id pulls in (active/standby).
pub const PRIORITY_GROUP: &str = "jetmq";

/// How many times start-up steps against NATS are tried before giving up (2 s apart).
const SETUP_ATTEMPTS: u32 = 30;
/// The pause between two attempts of a start-up step.
const SETUP_PAUSE: Duration = Duration::from_secs(2);
/// Attempts when NATS refuses the credentials or the TLS set-up (see `with_retries`).
const REFUSED_ATTEMPTS: u32 = 3;

/// Durable consumer name of ingestor `mqtt_id`.
pub fn consumer_name(prefix: &str, mqtt_id: u32) -> String {
    format!("{prefix}-{mqtt_id}")
}

/// What the ingestor holds in NATS once set up.
pub(super) struct Nats {
    pub(super) client: async_nats::Client,
    pub(super) stream: jetstream::stream::Stream,
    pub(super) consumer: consumer::PullConsumer,
    /// The durable consumer's name.
    pub(super) name: String,
}

/// Connects, opens the message stream and creates the consumer of `share`, each step
/// retried (see [`with_retries`]). `None` if shutdown was asked for meanwhile.
pub(super) async fn connect(
    config: &Config,
    mqtt_id: u32,
    share: u32,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Nats>> {
    let name = consumer_name(&config.nats.consumer_prefix, mqtt_id);
    let Some(client) = with_retries("NATS connect", shutdown, || async {
        connect_nats(config, mqtt_id).await
    })
    .await?
    else {
        return Ok(None);
    };
    let js = jetstream::new(client.clone());
    let settings = MessageStreamSettings {
        replicas: config.nats.stream_replicas,
        ..Default::default()
    };
    let Some(stream) = with_retries("open stream", shutdown, || async {
        Ok(ensure_message_stream(&js, &settings).await?)
    })
    .await?
    else {
        return Ok(None);
    };
    let consumer_cfg = consumer_config(config, mqtt_id, share);
    let Some(consumer) = with_retries("create consumer", shutdown, || async {
        stream
            .create_consumer(consumer_cfg.clone())
            .await
            .map_err(|e| {
                anyhow!(
                    "consumer {name}: {e} (if it exists with settings NATS cannot change, \
                     remove it: nats consumer rm JETMQ_MSGS {name})"
                )
            })
    })
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(Nats {
        client,
        stream,
        consumer,
        name,
    }))
}

impl Nats {
    /// On the way out: hands the pin to a standby at once (instead of after the pin
    /// timeout) and flushes the acks; each bounded by `grace`.
    pub(super) async fn release(&self, config: &Config, grace: Duration) {
        if config.nats.pinned {
            match tokio::time::timeout(
                grace,
                self.stream.unpin_consumer(&self.name, PRIORITY_GROUP),
            )
            .await
            {
                Ok(Ok(())) => debug!("unpinned"),
                Ok(Err(e)) => debug!(error = %e, "unpin failed"),
                Err(_) => debug!("unpin timed out"),
            }
        }
        match tokio::time::timeout(grace, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "flushing acks to NATS failed"),
            Err(_) => warn!("flushing acks to NATS timed out"),
        }
    }
}

async fn connect_nats(config: &Config, mqtt_id: u32) -> anyhow::Result<async_nats::Client> {
    let n = &config.nats;
    let opts = async_nats::ConnectOptions::new()
        .name(format!("jetmq-ingestor-{mqtt_id}"))
        // Its own inbox prefix, which the generated NATS permissions give only ingestors.
        .custom_inbox_prefix(jetmq_common::natsauth::INGESTOR_INBOX_PREFIX)
        .connection_timeout(Duration::from_secs(n.connect_timeout_secs))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => info!("NATS connected"),
                async_nats::Event::Disconnected => warn!("NATS disconnected"),
                async_nats::Event::ServerError(err) => error!(error = %err, "NATS server error"),
                other => debug!(event = %other, "NATS event"),
            }
        });
    let opts = n.security.apply(opts).await?;
    opts.connect(n.urls.clone()).await.map_err(|err| {
        let message = jetmq_common::natsconn::explain(&err);
        if jetmq_common::natsconn::is_permanent(&err) {
            anyhow::Error::new(Permanent(message))
        } else {
            anyhow::anyhow!(message)
        }
    })
}

/// An error that retrying cannot fix (NATS refused our credentials, TLS set-up failed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Permanent(String);

/// Retries `step` up to [`SETUP_ATTEMPTS`] times, [`SETUP_PAUSE`] apart, unless shut down.
async fn with_retries<T, F, Fut>(
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
    mut step: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    // A fixed pause: NATS either comes back or the attempts run out.
    let mut pauses = Backoff::new(SETUP_PAUSE, SETUP_PAUSE);
    loop {
        let attempt = pauses.attempts() + 1;
        match step().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.downcast_ref::<Permanent>().is_some() && attempt >= REFUSED_ATTEMPTS => {
                return Err(e.context(format!("{what}: refused {attempt} times, not retried")))
            }
            // A NATS server reloading its configuration refuses valid credentials for a
            // moment (seen when an ingestor started during a mapping reload): a refusal is
            // tried again twice before it stops the program.
            Err(e) if e.downcast_ref::<Permanent>().is_some() => {
                warn!(attempt, error = %format!("{e:#}"), "{what} refused, trying again")
            }
            Err(e) if attempt >= SETUP_ATTEMPTS => {
                return Err(e.context(format!("{what}: gave up after {attempt} attempts")))
            }
            Err(e) => warn!(attempt, error = %format!("{e:#}"), "{what} failed, retrying"),
        }
        let pause = pauses.next_pause();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            changed = shutdown.changed() => if changed.is_err() { return Ok(None) },
        }
        if *shutdown.borrow() {
            return Ok(None);
        }
    }
}

pub(super) fn consumer_config(config: &Config, mqtt_id: u32, share: u32) -> consumer::pull::Config {
    let name = consumer_name(&config.nats.consumer_prefix, mqtt_id);
    let mut c = consumer::pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: Some(format!(
            "jetmq-ingestor --mqtt-id {mqtt_id}: share {share} into Kafka"
        )),
        filter_subject: share_filter(share),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait(),
        max_ack_pending: i64::try_from(config.ingest.max_in_flight).unwrap_or(i64::MAX),
        ..Default::default()
    };
    if config.nats.pinned {
        c.priority_policy = consumer::PriorityPolicy::PinnedClient;
        c.priority_groups = vec![PRIORITY_GROUP.to_owned()];
        c.priority_timeout = config.pin_timeout();
    }
    c
}

/// Pull expiry: well below the pin timeout so the active process keeps its pin.
pub(super) fn pull_expires(config: &Config) -> Duration {
    let base = if config.nats.pinned {
        config.pin_timeout() / 3
    } else {
        Duration::from_secs(30)
    };
    base.clamp(Duration::from_secs(1), Duration::from_secs(30))
}

pub(super) async fn open_messages(
    config: &Config,
    consumer: &consumer::PullConsumer,
) -> anyhow::Result<consumer::pull::Stream> {
    let expires = pull_expires(config);
    let mut builder = consumer
        .stream()
        .max_messages_per_batch(config.nats.fetch_batch.min(config.ingest.max_in_flight))
        .expires(expires)
        .heartbeat(expires / 4);
    if config.nats.pinned {
        builder = builder.group(PRIORITY_GROUP);
    }
    Ok(builder.messages().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_pull_timing() {
        assert_eq!(consumer_name("jetmq-ingestor", 2), "jetmq-ingestor-2");
        let mut config = Config::default();
        assert_eq!(pull_expires(&config), Duration::from_secs(10));
        config.nats.pin_timeout_secs = 3;
        assert_eq!(pull_expires(&config), Duration::from_secs(1));
        config.nats.pinned = false;
        assert_eq!(pull_expires(&config), Duration::from_secs(30));
        let c = consumer_config(&Config::default(), 2, 1);
        assert_eq!(c.filter_subject, "jetmq.s.1.>");
        assert_eq!(c.durable_name.as_deref(), Some("jetmq-ingestor-2"));
        assert_eq!(c.max_ack_pending, 2048);
        assert_eq!(c.priority_policy, consumer::PriorityPolicy::PinnedClient);
    }
}
