//! The pipeline: pull one share from JetStream, produce to Kafka, ack each message in NATS
//! only after Kafka confirmed its record.
//!
//! Order: records are handed to librdkafka in the order JetStream delivered them, from this
//! one task; the idempotent producer keeps that order per Kafka partition. Confirmations are
//! taken (and acks sent) in the same order. While a record waits for Kafka, its NATS message
//! gets a progress ack every third of `ack_wait`, so a slow or absent Kafka does not cause
//! redeliveries; the consumer's `max_ack_pending` equals the in-flight window, so nothing
//! waits unseen in the client's buffer meanwhile.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer, message::Acker, AckKind};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use jetmq_common::envelope::{split_bundle, Envelope};
use jetmq_common::otel;
use jetmq_common::shares::share_for_ingestor;
use jetmq_common::streams::{ensure_message_stream, MessageStreamSettings};
use jetmq_common::subject::{parse_stream_subject, share_filter};
use opentelemetry::KeyValue;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::kafka::{
    self, is_permanent, is_too_large, record_headers, record_key, Record, HEADER_DLQ_REASON,
    HEADER_DLQ_SUBJECT, HEADER_DLQ_TOPIC, HEADER_DLQ_TRUNCATED, HEADER_PART, HEADER_SEQ,
    HEADER_SHARE,
};
use crate::metrics::{self, Stats};
use crate::routing::TopicMap;

/// The priority group every ingestor process of one id pulls in (active/standby).
pub const PRIORITY_GROUP: &str = "jetmq";

/// How many times start-up steps against NATS are tried before giving up (2 s apart).
const SETUP_ATTEMPTS: u32 = 30;
/// Attempts when NATS refuses the credentials or the TLS set-up (see `with_retries`).
const REFUSED_ATTEMPTS: u32 = 3;

/// Durable consumer name of ingestor `mqtt_id`.
pub fn consumer_name(prefix: &str, mqtt_id: u32) -> String {
    format!("{prefix}-{mqtt_id}")
}

/// What became of one message.
#[derive(Debug)]
enum Outcome {
    Produced,
    DeadLettered(String),
    /// Neither the target topic nor the dead-letter topic took it: terminate in JetStream.
    Terminated(String),
    /// The producer is unusable (fatal idempotence error): stop, let a restart recover.
    Fatal(String),
}

struct Pending {
    acker: Arc<StoredAck>,
    seq: u64,
    last_progress: Instant,
    /// The produce span (tracing on and sampled), ended when the outcome is settled.
    span: Option<otel::Span>,
}

/// The acknowledgement of one stream message, shared by the records made from it: a bundle
/// (several MQTT messages stored as one stream message) is acknowledged once Kafka
/// confirmed every one of its records.
struct StoredAck {
    acker: Acker,
    /// Records not settled yet.
    remaining: AtomicUsize,
    /// Some record of it could not be produced and was dropped.
    terminated: AtomicBool,
    /// Acknowledged, or handed back (Nak) at shutdown.
    done: AtomicBool,
}

impl StoredAck {
    fn new(acker: Acker, records: usize) -> Arc<StoredAck> {
        Arc::new(StoredAck {
            acker,
            remaining: AtomicUsize::new(records),
            terminated: AtomicBool::new(false),
            done: AtomicBool::new(false),
        })
    }

    /// One record settled; the kind of acknowledgement to send now that the last did.
    fn settled(&self, terminated: bool) -> Option<AckKind> {
        if terminated {
            self.terminated.store(true, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1
            || self.done.swap(true, Ordering::AcqRel)
        {
            return None;
        }
        Some(if self.terminated.load(Ordering::Relaxed) {
            AckKind::Term
        } else {
            AckKind::Ack
        })
    }

    /// Hands the message back to JetStream (once, whatever number of records share it).
    async fn nak(&self) -> bool {
        if self.done.swap(true, Ordering::AcqRel) {
            return false;
        }
        let _ = self.acker.ack_with(AckKind::Nak(None)).await;
        true
    }
}

/// With tracing on: a child span of the broker's (from the NATS `traceparent`) around the
/// Kafka produce, whose own `traceparent` goes on the record. With tracing off: the broker's
/// `traceparent` is passed on as it is, so downstream consumers can still join the trace.
fn trace_produce(
    nats_traceparent: Option<&[u8]>,
    record: &mut Record,
    seq: u64,
) -> Option<otel::Span> {
    let Some(tracing) = otel::global() else {
        if let Some(tp) = nats_traceparent {
            record
                .headers
                .push((otel::TRACEPARENT.to_owned(), Bytes::copy_from_slice(tp)));
        }
        return None;
    };
    let span = tracing.child_of(
        nats_traceparent,
        "kafka produce",
        otel::SpanKind::Producer,
        vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.destination.name", record.topic.clone()),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("jetmq.seq", i64::try_from(seq).unwrap_or(i64::MAX)),
        ],
    );
    let traceparent = otel::traceparent(&span)?;
    record
        .headers
        .push((otel::TRACEPARENT.to_owned(), Bytes::from(traceparent)));
    Some(span)
}

/// State shared with the in-flight futures.
struct Shared {
    producer: FutureProducer,
    dead_letter_topic: String,
    stats: Arc<Stats>,
}

fn is_fatal(err: &KafkaError) -> bool {
    matches!(err, KafkaError::MessageProduction(RDKafkaErrorCode::Fatal))
}

fn enqueue(producer: &FutureProducer, record: &Record) -> Result<DeliveryFuture, KafkaError> {
    let mut fr = FutureRecord::<[u8], [u8]>::to(&record.topic)
        .payload(record.value.as_ref())
        .headers(record.owned_headers());
    if let Some(key) = &record.key {
        fr = fr.key(key.as_ref());
    }
    if let Some(ts) = record.timestamp_ms {
        fr = fr.timestamp(ts);
    }
    producer.send_result(fr).map_err(|(e, _)| e)
}

/// Produces one record and waits for Kafka's answer (used for dead letters, off the ordered
/// path). A full local queue is retried for a bounded time.
async fn produce_and_wait(producer: &FutureProducer, record: &Record) -> Result<(), KafkaError> {
    let mut attempts = 0;
    let future = loop {
        match enqueue(producer, record) {
            Ok(f) => break f,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) if attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    match future.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

async fn dead_letter(shared: Arc<Shared>, mut record: Record, reason: String) -> Outcome {
    if shared.dead_letter_topic.is_empty() {
        return Outcome::Terminated(format!("{reason} (no dead-letter topic configured)"));
    }
    let target = std::mem::replace(&mut record.topic, shared.dead_letter_topic.clone());
    record
        .headers
        .push((HEADER_DLQ_REASON.to_owned(), Bytes::from(reason.clone())));
    record
        .headers
        .push((HEADER_DLQ_TOPIC.to_owned(), Bytes::from(target)));
    match produce_and_wait(&shared.producer, &record).await {
        Ok(()) => return Outcome::DeadLettered(reason),
        Err(e) if is_too_large(&e) => {
            Stats::inc(&shared.stats.failed);
            // Keep the metadata; the payload stays in JetStream under `jetmq.seq`.
            let size = record.value.len();
            record.value = Bytes::new();
            record.headers.push((
                HEADER_DLQ_TRUNCATED.to_owned(),
                Bytes::from(size.to_string()),
            ));
        }
        Err(e) => {
            Stats::inc(&shared.stats.failed);
            return Outcome::Terminated(format!("{reason}; dead-letter produce failed: {e}"));
        }
    }
    match produce_and_wait(&shared.producer, &record).await {
        Ok(()) => Outcome::DeadLettered(format!("{reason} (payload left out of the dead letter)")),
        Err(e) => {
            Stats::inc(&shared.stats.failed);
            Outcome::Terminated(format!("{reason}; dead-letter produce failed: {e}"))
        }
    }
}

/// Delay before retry `attempt` (1-based) of a record Kafka did not take: 0.5 s doubling
/// up to 30 s.
pub fn retry_delay(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(6);
    Duration::from_millis(500u64 << doublings).min(Duration::from_secs(30))
}

/// Waits for Kafka's answer about `record`. Errors librdkafka does not retry itself (a broker
/// failing requests, say) are retried here with backoff for as long as it takes: the message
/// stays in flight (with progress acks) and is acked only once Kafka has it. Records Kafka
/// refuses for good go to the dead-letter topic.
async fn await_delivery(
    shared: Arc<Shared>,
    first: Result<DeliveryFuture, KafkaError>,
    record: Record,
    seq: u64,
) -> Outcome {
    let mut current = first;
    let mut attempt = 0u32;
    // Per attempt: the latency of a confirmation, not of our retry back-off.
    let mut enqueued = Instant::now();
    loop {
        let err = match current {
            Ok(future) => match future.await {
                Ok(Ok(_)) => {
                    shared.stats.produce_latency.observe(enqueued.elapsed());
                    return Outcome::Produced;
                }
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            },
            Err(e) => e,
        };
        Stats::inc(&shared.stats.failed);
        if is_fatal(&err) {
            return Outcome::Fatal(err.to_string());
        }
        if is_permanent(&err) {
            let reason = format!("Kafka refused the record for topic {}: {err}", record.topic);
            return dead_letter(shared, record, reason).await;
        }
        attempt += 1;
        let delay = retry_delay(attempt);
        if attempt == 1 || attempt.is_multiple_of(10) {
            warn!(seq, attempt, error = %err, ?delay, "Kafka did not take the record, retrying");
        } else {
            debug!(seq, attempt, error = %err, ?delay, "Kafka did not take the record, retrying");
        }
        tokio::time::sleep(delay).await;
        enqueued = Instant::now();
        current = enqueue(&shared.producer, &record);
    }
}

type Prepared = Result<Record, Box<(Record, String)>>;

/// The Kafka records of a stored message: one, or one per MQTT message of a bundle (each
/// with its place in the bundle in `jetmq.part`); a dead letter for what cannot be read.
fn prepare_stored(
    config: &Config,
    topics: &TopicMap,
    subject: &str,
    body: Bytes,
    seq: u64,
) -> Vec<Prepared> {
    match split_bundle(body.clone()) {
        Ok(parts) if parts.len() > 1 => parts
            .into_iter()
            .enumerate()
            .map(|(index, part)| {
                let mut prepared = prepare(config, topics, subject, part, seq);
                let header = (HEADER_PART.to_owned(), Bytes::from(index.to_string()));
                match &mut prepared {
                    Ok(record) => record.headers.push(header),
                    Err(poison) => poison.0.headers.push(header),
                }
                prepared
            })
            .collect(),
        Ok(_) => vec![prepare(config, topics, subject, body, seq)],
        Err(e) => vec![Err(poison(
            subject,
            body,
            seq,
            format!("unreadable bundle: {e}"),
        ))],
    }
}

/// A stored message that cannot be read, as a dead letter.
fn poison(subject: &str, body: Bytes, seq: u64, reason: String) -> Box<(Record, String)> {
    let record = Record {
        topic: String::new(),
        key: None,
        value: body,
        headers: vec![
            (HEADER_SEQ.to_owned(), Bytes::from(seq.to_string())),
            (
                HEADER_DLQ_SUBJECT.to_owned(),
                Bytes::copy_from_slice(subject.as_bytes()),
            ),
        ],
        timestamp_ms: None,
    };
    Box::new((record, reason))
}

/// Turns one stored MQTT message into its Kafka record, or into a dead letter if it cannot
/// be read.
fn prepare(config: &Config, topics: &TopicMap, subject: &str, body: Bytes, seq: u64) -> Prepared {
    let poison = |reason: String| poison(subject, body.clone(), seq, reason);
    let (share, mqtt_topic) = parse_stream_subject(subject)
        .map_err(|e| poison(format!("unreadable subject {subject:?}: {e}")))?;
    let (envelope, payload) =
        Envelope::decode(body.clone()).map_err(|e| poison(format!("unreadable envelope: {e}")))?;
    let mut headers = record_headers(&config.ingest, &mqtt_topic, &envelope, seq);
    headers.push((HEADER_SHARE.to_owned(), Bytes::from(share.to_string())));
    Ok(Record {
        topic: topics.kafka_topic(&mqtt_topic).to_owned(),
        key: record_key(config.routing.key_mode, &mqtt_topic, &envelope),
        headers,
        value: payload,
        timestamp_ms: i64::try_from(envelope.timestamp_ms)
            .ok()
            .filter(|ts| *ts > 0),
    })
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

/// Retries `step` up to [`SETUP_ATTEMPTS`] times, 2 s apart, unless shut down.
async fn with_retries<T, F, Fut>(
    what: &str,
    shutdown: &mut watch::Receiver<bool>,
    mut step: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 1;
    loop {
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
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            changed = shutdown.changed() => if changed.is_err() { return Ok(None) },
        }
        if *shutdown.borrow() {
            return Ok(None);
        }
    }
}

fn consumer_config(config: &Config, mqtt_id: u32, share: u32) -> consumer::pull::Config {
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
fn pull_expires(config: &Config) -> Duration {
    let base = if config.nats.pinned {
        config.pin_timeout() / 3
    } else {
        Duration::from_secs(30)
    };
    base.clamp(Duration::from_secs(1), Duration::from_secs(30))
}

async fn open_messages(
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

fn abort_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        task.abort();
    }
}

/// Runs ingestor `mqtt_id` until `shutdown` turns true, then drains and returns.
pub async fn run(
    config: Config,
    mqtt_id: u32,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let share = share_for_ingestor(mqtt_id)?;
    let stats = Stats::new();
    let name = consumer_name(&config.nats.consumer_prefix, mqtt_id);
    info!(mqtt_id, share, consumer = %name, filter = %share_filter(share), "starting");

    let producer: FutureProducer = kafka::client_config(&config.kafka, &config.ingest)
        .create()
        .context("cannot create the Kafka producer (check kafka.* settings)")?;

    // The metrics endpoint comes first, so monitoring sees an ingestor that waits for NATS.
    let mut background = Vec::new();
    if let Some(addr) = config.metrics.listen {
        let listener = metrics::bind(addr)
            .await
            .with_context(|| format!("metrics.listen {addr}"))?;
        // The bound address: with port 0 the system chose it.
        let addr = listener.local_addr().unwrap_or(addr);
        info!(%addr, "metrics endpoint on /metrics");
        background.push(tokio::spawn(metrics::serve(
            listener,
            stats.clone(),
            mqtt_id,
        )));
    }

    let Some(client) = with_retries("NATS connect", &mut shutdown, || async {
        connect_nats(&config, mqtt_id).await
    })
    .await?
    else {
        abort_all(background);
        return Ok(());
    };
    let js = jetstream::new(client.clone());
    let settings = MessageStreamSettings {
        replicas: config.nats.stream_replicas,
        ..Default::default()
    };
    let Some(stream) = with_retries("open stream", &mut shutdown, || async {
        Ok(ensure_message_stream(&js, &settings).await?)
    })
    .await?
    else {
        abort_all(background);
        return Ok(());
    };
    let consumer_cfg = consumer_config(&config, mqtt_id, share);
    let Some(consumer) = with_retries("create consumer", &mut shutdown, || async {
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
        abort_all(background);
        return Ok(());
    };

    {
        let consumer = consumer.clone();
        let stats = stats.clone();
        let every = Duration::from_secs(config.metrics.lag_interval_secs);
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match consumer.get_info().await {
                    Ok(info) => stats.lag.store(
                        i64::try_from(info.num_pending).unwrap_or(i64::MAX),
                        Ordering::Relaxed,
                    ),
                    Err(e) => debug!(error = %e, "consumer info failed"),
                }
            }
        }));
    }
    if config.metrics.log_interval_secs > 0 {
        let stats = stats.clone();
        let every = Duration::from_secs(config.metrics.log_interval_secs);
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                info!(mqtt_id, "{}", stats.summary());
            }
        }));
    }

    let shared = Arc::new(Shared {
        producer: producer.clone(),
        dead_letter_topic: config.routing.dead_letter_topic.clone(),
        stats: stats.clone(),
    });
    let mut pipeline = Pipeline {
        config: &config,
        topics: TopicMap::new(&config.routing),
        shared,
        stats: stats.clone(),
        inflight: FuturesOrdered::new(),
        pending: VecDeque::new(),
        blocked: VecDeque::new(),
    };
    stats.ready.store(true, Ordering::Relaxed);
    let result = pipeline.run(&consumer, &mut shutdown).await;
    stats.ready.store(false, Ordering::Relaxed);

    // Drain: wait for the confirmations of what is in flight, ack them. Bounded even if NATS
    // itself is unreachable meanwhile.
    let grace = Duration::from_secs(5);
    let drained = tokio::time::timeout(
        config.shutdown_timeout() + grace,
        pipeline.drain(config.shutdown_timeout()),
    )
    .await
    .unwrap_or_else(|_| {
        warn!("drain did not finish in time; unacked messages will be redelivered");
        0
    });
    if config.nats.pinned {
        // Hand the pin to a standby at once instead of after the pin timeout.
        match tokio::time::timeout(grace, stream.unpin_consumer(&name, PRIORITY_GROUP)).await {
            Ok(Ok(())) => debug!("unpinned"),
            Ok(Err(e)) => debug!(error = %e, "unpin failed"),
            Err(_) => debug!("unpin timed out"),
        }
    }
    match tokio::time::timeout(grace, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "flushing acks to NATS failed"),
        Err(_) => warn!("flushing acks to NATS timed out"),
    }
    abort_all(background);
    info!(mqtt_id, drained, "stopped: {}", stats.summary());
    result
}

struct Pipeline<'a> {
    config: &'a Config,
    topics: TopicMap,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    inflight: FuturesOrdered<BoxFuture<'static, Outcome>>,
    pending: VecDeque<Pending>,
    /// Records librdkafka's queue had no room for, in order; retried before taking more
    /// messages.
    blocked: VecDeque<(Pending, Record)>,
}

impl Pipeline<'_> {
    fn window_open(&self) -> bool {
        self.blocked.is_empty() && self.pending.len() < self.config.ingest.max_in_flight
    }

    async fn run(
        &mut self,
        consumer: &consumer::PullConsumer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        if *shutdown.borrow() {
            return Ok(());
        }
        let mut messages = open_messages(self.config, consumer).await?;
        let progress_every = self.config.ack_wait() / 3;
        let mut progress_tick = tokio::time::interval(progress_every.max(Duration::from_secs(1)));
        let mut retry_tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        info!("shutdown requested: no more fetching");
                        return Ok(());
                    }
                }
                Some(outcome) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.settle(outcome).await?;
                }
                _ = retry_tick.tick(), if !self.blocked.is_empty() => self.retry_blocked()?,
                _ = progress_tick.tick() => self.progress(progress_every).await,
                next = messages.next(), if self.window_open() => match next {
                    Some(Ok(message)) => self.accept(message)?,
                    Some(Err(e)) => {
                        use consumer::pull::MessagesErrorKind as K;
                        match e.kind() {
                            K::MissingHeartbeat => debug!(error = %e, "pull stream"),
                            K::ConsumerDeleted | K::RequestLimitExceeded | K::PushBasedConsumer => {
                                bail!("pull stream ended: {e}");
                            }
                            _ => warn!(error = %e, "pull stream error"),
                        }
                    }
                    None => {
                        warn!("pull stream ended, reopening");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        messages = open_messages(self.config, consumer).await?;
                    }
                },
            }
        }
    }

    fn accept(&mut self, message: jetstream::Message) -> anyhow::Result<()> {
        Stats::inc(&self.stats.consumed);
        let (seq, delivered) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 1));
        if delivered > 1 {
            Stats::inc(&self.stats.redelivered);
        }
        let (message, acker) = message.split();
        let records = prepare_stored(
            self.config,
            &self.topics,
            message.subject.as_str(),
            message.payload,
            seq,
        );
        let acker = StoredAck::new(acker, records.len());
        let traceparent = message
            .headers
            .as_ref()
            .and_then(|h| h.get(otel::TRACEPARENT))
            .map(|v| v.as_str().as_bytes());
        for prepared in records {
            let mut pending = Pending {
                acker: acker.clone(),
                seq,
                last_progress: Instant::now(),
                span: None,
            };
            match prepared {
                Ok(mut record) => {
                    pending.span = trace_produce(traceparent, &mut record, seq);
                    self.submit(pending, record)?
                }
                Err(poison) => {
                    let (record, reason) = *poison;
                    warn!(seq, %reason, "message cannot be read, dead-lettering it");
                    self.push(
                        pending,
                        dead_letter(self.shared.clone(), record, reason).boxed(),
                    );
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, pending: Pending, outcome: BoxFuture<'static, Outcome>) {
        self.pending.push_back(pending);
        self.inflight.push_back(outcome);
        self.stats
            .in_flight
            .store(self.pending.len() as i64, Ordering::Relaxed);
    }

    /// Hands a record to librdkafka, in delivery order: behind those waiting for room.
    fn submit(&mut self, pending: Pending, record: Record) -> anyhow::Result<()> {
        if self.blocked.is_empty() {
            self.enqueue_or_block(pending, record)?;
        } else {
            self.blocked.push_back((pending, record));
        }
        Ok(())
    }

    /// Hands the records that waited for room to librdkafka, until it has none again.
    fn retry_blocked(&mut self) -> anyhow::Result<()> {
        while let Some((pending, record)) = self.blocked.pop_front() {
            if !self.enqueue_or_block(pending, record)? {
                break;
            }
        }
        Ok(())
    }

    /// False if librdkafka's queue is full: the record then waits first in line.
    fn enqueue_or_block(&mut self, pending: Pending, record: Record) -> anyhow::Result<bool> {
        let first = match enqueue(&self.shared.producer, &record) {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                self.blocked.push_front((pending, record));
                return Ok(false);
            }
            Err(e) if is_fatal(&e) => bail!("Kafka producer failed for good: {e}"),
            other => other,
        };
        let seq = pending.seq;
        self.push(
            pending,
            await_delivery(self.shared.clone(), first, record, seq).boxed(),
        );
        Ok(true)
    }

    /// Acts on the outcome of the oldest in-flight message.
    async fn settle(&mut self, outcome: Outcome) -> anyhow::Result<()> {
        let Some(mut pending) = self.pending.pop_front() else {
            bail!("internal error: outcome without a pending message");
        };
        self.stats
            .in_flight
            .store(self.pending.len() as i64, Ordering::Relaxed);
        let seq = pending.seq;
        if let Some(mut span) = pending.span.take() {
            use otel::SpanTrait as _;
            match &outcome {
                Outcome::Produced => {}
                Outcome::DeadLettered(reason) => {
                    span.set_attribute(KeyValue::new("jetmq.dead_letter", reason.clone()));
                }
                Outcome::Terminated(reason) | Outcome::Fatal(reason) => {
                    span.set_status(otel::Status::error(reason.clone()));
                }
            }
            span.end();
        }
        let terminated = match outcome {
            Outcome::Produced => {
                Stats::inc(&self.stats.produced);
                false
            }
            Outcome::DeadLettered(reason) => {
                Stats::inc(&self.stats.dead_lettered);
                warn!(seq, %reason, topic = %self.shared.dead_letter_topic, "dead-lettered");
                false
            }
            Outcome::Terminated(reason) => {
                Stats::inc(&self.stats.terminated);
                error!(seq, %reason, "message dropped: terminated in JetStream");
                true
            }
            Outcome::Fatal(reason) => {
                bail!("Kafka producer failed for good: {reason}");
            }
        };
        // A bundle's other records may still wait for Kafka.
        let Some(kind) = pending.acker.settled(terminated) else {
            return Ok(());
        };
        let ok = matches!(kind, AckKind::Ack);
        match pending.acker.acker.ack_with(kind).await {
            Ok(()) if ok => Stats::inc(&self.stats.acked),
            Ok(()) => {}
            Err(e) => warn!(seq, error = %e, "ack to NATS failed, the message will be redelivered"),
        }
        Ok(())
    }

    /// Keeps JetStream from redelivering messages that are still waiting for Kafka.
    async fn progress(&mut self, every: Duration) {
        let now = Instant::now();
        let waiting = self.pending.iter_mut();
        let blocked = self.blocked.iter_mut().map(|(p, _)| p);
        let mut last_acked: Option<Arc<StoredAck>> = None;
        for p in waiting.chain(blocked) {
            if now.duration_since(p.last_progress) < every {
                continue;
            }
            p.last_progress = now;
            // The records of a bundle follow each other and share one stream message.
            if last_acked
                .as_ref()
                .is_some_and(|a| Arc::ptr_eq(a, &p.acker))
            {
                continue;
            }
            last_acked = Some(p.acker.clone());
            if let Err(e) = p.acker.acker.ack_with(AckKind::Progress).await {
                debug!(seq = p.seq, error = %e, "progress ack failed");
            }
        }
    }

    /// Waits (up to `timeout`) for what is in flight, acks it; hands the rest back.
    async fn drain(&mut self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let progress_every = self.config.ack_wait() / 3;
        let mut drained = 0;
        if !self.inflight.is_empty() {
            info!(
                in_flight = self.pending.len(),
                "waiting for Kafka confirmations"
            );
        }
        while !self.inflight.is_empty() {
            let next = tokio::select! {
                next = self.inflight.next() => next,
                _ = tokio::time::sleep(progress_every.max(Duration::from_secs(1))) => {
                    self.progress(progress_every).await;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => break,
            };
            let Some(outcome) = next else { break };
            if let Outcome::Fatal(reason) = &outcome {
                error!(%reason, "Kafka producer failed while draining");
                break;
            }
            if self.settle(outcome).await.is_err() {
                break;
            }
            drained += 1;
        }
        let left = self.pending.len() + self.blocked.len();
        if left > 0 {
            warn!(
                left,
                "shutdown timeout: unconfirmed messages handed back to JetStream"
            );
            self.shared
                .producer
                .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            let blocked: Vec<Pending> = self.blocked.drain(..).map(|(p, _)| p).collect();
            for p in self.pending.drain(..).chain(blocked) {
                if p.acker.nak().await {
                    Stats::inc(&self.stats.nacked);
                }
            }
            self.inflight = FuturesOrdered::new();
        }
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetmq_common::envelope::MessageProperties;
    use jetmq_common::subject::encode_topic;

    fn body(env: &Envelope, payload: &[u8]) -> Bytes {
        env.encode(payload).expect("encodes")
    }

    #[test]
    fn retry_backoff_grows_and_is_capped() {
        assert_eq!(retry_delay(1), Duration::from_millis(500));
        assert_eq!(retry_delay(2), Duration::from_secs(1));
        assert_eq!(retry_delay(4), Duration::from_secs(4));
        assert_eq!(retry_delay(7), Duration::from_secs(30));
        assert_eq!(retry_delay(1000), Duration::from_secs(30));
    }

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

    #[test]
    fn prepare_builds_the_record() {
        let config = Config::default();
        let topics = TopicMap::new(&config.routing);
        let env = Envelope {
            qos: 1,
            retain: false,
            client_id: "c1".into(),
            timestamp_ms: 1234,
            properties: MessageProperties::default(),
        };
        let subject = format!("jetmq.s.0.{}", encode_topic("a/b.c"));
        let record = prepare(&config, &topics, &subject, body(&env, b"xyz"), 9).expect("record");
        assert_eq!(record.topic, "mqtt");
        assert_eq!(record.key.as_deref(), Some(&b"a/b.c"[..]));
        assert_eq!(&record.value[..], b"xyz");
        assert_eq!(record.timestamp_ms, Some(1234));
        assert_eq!(
            record.header("mqtt.topic").map(|v| v.as_ref()),
            Some(&b"a/b.c"[..])
        );
        assert_eq!(
            record.header(HEADER_SEQ).map(|v| v.as_ref()),
            Some(&b"9"[..])
        );
    }

    #[test]
    fn a_bundle_becomes_one_record_per_message_with_its_part() {
        let config = Config::default();
        let topics = TopicMap::new(&config.routing);
        let env = Envelope {
            qos: 1,
            client_id: "c1".into(),
            timestamp_ms: 1234,
            ..Envelope::default()
        };
        let subject = format!("jetmq.s.0.{}", encode_topic("a/b"));
        let bodies = [body(&env, b"one"), body(&env, b"two")];
        let bundle =
            jetmq_common::envelope::encode_bundle(bodies.iter().map(|b| &b[..])).expect("bundles");
        let records: Vec<Record> = prepare_stored(&config, &topics, &subject, bundle, 9)
            .into_iter()
            .map(|r| r.expect("record"))
            .collect();
        let values: Vec<&[u8]> = records.iter().map(|r| &r.value[..]).collect();
        assert_eq!(values, [&b"one"[..], &b"two"[..]]);
        for (index, record) in records.iter().enumerate() {
            assert_eq!(
                record.header(HEADER_SEQ).map(|v| v.as_ref()),
                Some(&b"9"[..])
            );
            let part = index.to_string();
            assert_eq!(
                record.header(HEADER_PART).map(|v| v.as_ref()),
                Some(part.as_bytes())
            );
            assert_eq!(record.key.as_deref(), Some(&b"a/b"[..]));
        }
        // A message stored on its own has no part.
        let single = prepare_stored(&config, &topics, &subject, bodies[0].clone(), 10);
        assert_eq!(single.len(), 1);
        let single = single.into_iter().next().expect("one").expect("record");
        assert!(single.header(HEADER_PART).is_none());
        // A bundle that cannot be read is one dead letter, whole.
        let broken = Bytes::from_static(&[2, 0, 0, 0, 9]);
        let dead = prepare_stored(&config, &topics, &subject, broken.clone(), 11);
        assert_eq!(dead.len(), 1);
        let Err(poison) = dead.into_iter().next().expect("one") else {
            panic!("a broken bundle must be a dead letter");
        };
        assert_eq!(poison.0.value, broken);
        assert!(poison.1.contains("bundle"), "{}", poison.1);
    }

    #[test]
    fn unreadable_messages_become_dead_letters() {
        let config = Config::default();
        let topics = TopicMap::new(&config.routing);
        let (record, reason) = *prepare(
            &config,
            &topics,
            "jetmq.s.0.a",
            Bytes::from_static(b"junk"),
            5,
        )
        .expect_err("poison");
        assert!(reason.contains("envelope"), "{reason}");
        assert_eq!(&record.value[..], b"junk");
        let (_, reason) = *prepare(
            &config,
            &topics,
            "other.subject",
            Bytes::from_static(b""),
            6,
        )
        .expect_err("poison");
        assert!(reason.contains("subject"), "{reason}");
    }

    /// Producer paths against librdkafka's mock cluster.
    mod mock {
        use super::*;
        use rdkafka::mocking::MockCluster;
        use rdkafka::ClientConfig;

        fn shared(bootstrap: &str, dead_letter_topic: &str) -> Arc<Shared> {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .set("enable.idempotence", "true")
                .set("message.max.bytes", "10000")
                .set("batch.size", "5000")
                .create()
                .expect("producer");
            Arc::new(Shared {
                producer,
                dead_letter_topic: dead_letter_topic.to_owned(),
                stats: Stats::new(),
            })
        }

        fn record(topic: &str, size: usize) -> Record {
            Record {
                topic: topic.to_owned(),
                key: Some(Bytes::from_static(b"a/b")),
                value: Bytes::from(vec![7u8; size]),
                headers: vec![(HEADER_SEQ.to_owned(), Bytes::from_static(b"1"))],
                timestamp_ms: Some(1),
            }
        }

        async fn deliver(shared: &Arc<Shared>, record: Record) -> Outcome {
            let first = enqueue(&shared.producer, &record);
            tokio::time::timeout(
                Duration::from_secs(20),
                await_delivery(shared.clone(), first, record, 1),
            )
            .await
            .expect("outcome in time")
        }

        #[tokio::test]
        async fn produced_dead_lettered_or_terminated() {
            let cluster = MockCluster::new(1).expect("mock cluster");
            cluster.create_topic("mqtt", 1, 1).expect("topic");
            cluster.create_topic("dlq", 1, 1).expect("topic");
            let with_dlq = shared(&cluster.bootstrap_servers(), "dlq");

            let outcome = deliver(&with_dlq, record("mqtt", 100)).await;
            assert!(matches!(outcome, Outcome::Produced), "{outcome:?}");

            // Too large for the client: dead-lettered without its payload.
            let outcome = deliver(&with_dlq, record("mqtt", 20_000)).await;
            match outcome {
                Outcome::DeadLettered(reason) => {
                    assert!(reason.contains("payload left out"), "{reason}")
                }
                other => panic!("expected a dead letter, got {other:?}"),
            }
            assert_eq!(with_dlq.stats.failed.load(Ordering::Relaxed), 2);

            // No dead-letter topic: terminated, not retried.
            let without = shared(&cluster.bootstrap_servers(), "");
            let outcome = deliver(&without, record("mqtt", 20_000)).await;
            assert!(matches!(outcome, Outcome::Terminated(_)), "{outcome:?}");
        }

        #[tokio::test]
        async fn transient_broker_errors_are_retried_until_they_pass() {
            use rdkafka::types::RDKafkaRespErr;
            let cluster = MockCluster::new(1).expect("mock cluster");
            cluster.create_topic("mqtt", 1, 1).expect("topic");
            // The next two produce requests fail with an error librdkafka hands back.
            cluster.request_errors(
                rdkafka::types::RDKafkaApiKey::Produce,
                &[
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN,
                ],
            );
            let s = shared(&cluster.bootstrap_servers(), "");
            let outcome = deliver(&s, record("mqtt", 10)).await;
            assert!(matches!(outcome, Outcome::Produced), "{outcome:?}");
            // librdkafka hands UNKNOWN back to us; the ingestor's own retry got it through.
            assert!(s.stats.failed.load(Ordering::Relaxed) >= 1);
        }
    }
}
