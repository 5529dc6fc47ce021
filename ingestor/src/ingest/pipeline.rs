//! The ordered path from JetStream to Kafka: take messages while the in-flight window has
//! room, hand their records to librdkafka in delivery order, settle Kafka's answers in the
//! same order (ack, dead letter, terminate), keep waiting messages alive with progress
//! acks, and drain at shutdown.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream::{self, consumer, message::Acker, AckKind};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use jetmq_common::otel;
use opentelemetry::KeyValue;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::dead_letter::dead_letter;
use super::produce::{await_delivery, enqueue, is_fatal, Outcome, Shared};
use super::records::{prepare_stored, trace_produce};
use super::setup::open_messages;
use crate::config::Config;
use crate::kafka::Record;
use crate::metrics::Stats;
use crate::routing::TopicMap;

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

pub(super) struct Pipeline<'a> {
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

impl<'a> Pipeline<'a> {
    /// An empty pipeline producing with `producer`.
    pub(super) fn new(config: &'a Config, producer: FutureProducer, stats: Arc<Stats>) -> Self {
        let shared = Arc::new(Shared {
            producer,
            dead_letter_topic: config.routing.dead_letter_topic.clone(),
            stats: stats.clone(),
        });
        Pipeline {
            config,
            topics: TopicMap::new(&config.routing),
            shared,
            stats,
            inflight: FuturesOrdered::new(),
            pending: VecDeque::new(),
            blocked: VecDeque::new(),
        }
    }

    /// [`Pipeline::drain`] within `config.ingest.shutdown_timeout_secs`, and `grace` more at
    /// most even if NATS itself is unreachable meanwhile.
    pub(super) async fn drain_in_time(&mut self, grace: Duration) -> usize {
        let timeout = self.config.shutdown_timeout();
        tokio::time::timeout(timeout + grace, self.drain(timeout))
            .await
            .unwrap_or_else(|_| {
                warn!("drain did not finish in time; unacked messages will be redelivered");
                0
            })
    }

    fn window_open(&self) -> bool {
        self.blocked.is_empty() && self.pending.len() < self.config.ingest.max_in_flight
    }

    /// Takes messages and produces them until `shutdown` turns true (or the pull stream
    /// fails for good).
    pub(super) async fn run(
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
