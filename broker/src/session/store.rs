//! Compare-and-set access to session records.
//!
//! A write either lands, or fails for a reason that decides something (a conflict: the
//! session was taken over), or fails because the store does not answer. The last happens
//! for a few seconds whenever the bucket's RAFT leader dies and the replicas elect a new
//! one. The `*_until` methods wait that out, retrying the same write until a deadline
//! (`session.store_outage_grace_ms` after the write began), so an election costs the
//! connections a pause and not their sessions. A retry keeps the compare-and-set chain: a
//! write that was applied but whose acknowledgement was lost makes its retry fail the
//! revision check, and is then recognized by reading the record back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use jetmq_common::retry::Backoff;
use tokio::time::Instant;

use super::{hex_encode, SessionRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session record changed underneath (taken over by another connection)")]
    Conflict,
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session record of {0} bytes exceeds the bucket's value limit")]
    TooLarge(usize),
    #[error("corrupt session record: {0}")]
    Corrupt(String),
    /// Error 10164: the stream leader refused the write without comparing revisions,
    /// because another conditional write to the same key was still in flight. It decides
    /// nothing: very often that write is this connection's own previous one, already
    /// acknowledged, whose in-flight mark the leader clears a moment after the
    /// acknowledgement. [`SessionStore`] waits and tries again; callers never see it.
    #[error("another write to the session record is in flight")]
    InFlight,
}

/// How session writes ride out a store that does not answer (see the module comment).
#[derive(Debug)]
pub struct OutagePolicy {
    /// How long one write (or claim) keeps trying.
    pub grace: Duration,
    /// Writes of this node that may be waiting out an outage at once.
    pub max_waiting: usize,
    waiting: AtomicUsize,
}

impl OutagePolicy {
    pub fn new(grace: Duration, max_waiting: usize) -> OutagePolicy {
        OutagePolicy {
            grace,
            max_waiting,
            waiting: AtomicUsize::new(0),
        }
    }
}

/// One try that gets no answer within this long is given up and tried again. A JetStream
/// request to a stream without a leader hangs for the context's whole timeout (10 s), and
/// the election is usually over long before; a healthy bucket answers in milliseconds even
/// under load. A try given up may still land: the revision check and the read-back below
/// make that harmless.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Pauses between tries while the store does not answer: growing, capped, with jitter so
/// that thousands of connections do not retry in lockstep when the new leader appears.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_millis(1000);

#[derive(Clone)]
pub struct SessionStore {
    kv: kv::Store,
    max_value_size: usize,
    outage: Arc<OutagePolicy>,
}

/// KV keys allow only `[-/_=.a-zA-Z0-9]`; client ids may be any UTF-8.
pub fn session_key(client_id: &str) -> String {
    let plain = !client_id.is_empty()
        && client_id.len() <= 200
        && client_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("p.{client_id}")
    } else {
        format!("h.{}", hex_encode(client_id.as_bytes()))
    }
}

impl SessionStore {
    pub fn new(kv: kv::Store, max_value_size: usize, outage: OutagePolicy) -> SessionStore {
        SessionStore {
            kv,
            max_value_size,
            outage: Arc::new(outage),
        }
    }

    /// The deadline of a write or claim that begins now (see [`OutagePolicy::grace`]).
    pub fn outage_deadline(&self) -> Instant {
        Instant::now() + self.outage.grace
    }

    /// [`Self::load`], waiting out an unavailable store until `deadline`.
    pub async fn load_until(
        &self,
        client_id: &str,
        deadline: Instant,
    ) -> Result<(Option<SessionRecord>, u64), StoreError> {
        let mut outage = None;
        loop {
            match attempt(deadline, self.load(client_id)).await {
                Err(err @ StoreError::Unavailable(_)) => {
                    self.wait_out(&mut outage, err, deadline, client_id).await?
                }
                other => return other,
            }
        }
    }

    /// [`Self::save`], waiting out an unavailable store until `deadline`. Tries are made one
    /// after the other, never overlapping, so the writes of one connection (which has one
    /// in flight at a time) stay in order.
    pub async fn save_until(
        &self,
        record: &SessionRecord,
        revision: u64,
        deadline: Instant,
    ) -> Result<u64, StoreError> {
        let value = self.encode(record)?;
        let key = session_key(&record.client_id);
        let mut outage = None;
        loop {
            match attempt(deadline, self.write(&key, &value, revision)).await {
                Err(StoreError::Conflict) if outage.is_some() => {
                    // An earlier try may have landed with its acknowledgement lost: then
                    // the stored record is exactly this one, at a newer revision, and the
                    // chain goes on from there. Anything else is a real conflict.
                    let stored = self.load_raw_until(&key, deadline).await?;
                    return match stored {
                        Some((Operation::Put, stored, stored_revision)) if stored == value => {
                            tracing::debug!(client_id = %record.client_id, revision = stored_revision, "a session write whose acknowledgement was lost had landed");
                            Ok(stored_revision)
                        }
                        _ => Err(StoreError::Conflict),
                    };
                }
                Err(err @ StoreError::Unavailable(_)) => {
                    self.wait_out(&mut outage, err, deadline, &record.client_id)
                        .await?
                }
                other => return other,
            }
        }
    }

    /// [`Self::delete`], waiting out an unavailable store until `deadline`.
    pub async fn delete_until(
        &self,
        client_id: &str,
        revision: u64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let key = session_key(client_id);
        let mut outage = None;
        loop {
            match attempt(deadline, self.delete(client_id, revision)).await {
                Err(StoreError::Conflict) if outage.is_some() => {
                    // A delete that landed unacknowledged left a delete marker; only the
                    // record's owner deletes a record it holds, so a marker is this one's.
                    let stored = self.load_raw_until(&key, deadline).await?;
                    return match stored {
                        None => Ok(()),
                        Some((operation, _, _)) if operation != Operation::Put => Ok(()),
                        Some(_) => Err(StoreError::Conflict),
                    };
                }
                Err(err @ StoreError::Unavailable(_)) => {
                    self.wait_out(&mut outage, err, deadline, client_id).await?
                }
                other => return other,
            }
        }
    }

    /// The stored entry as bytes: operation, value and revision.
    async fn load_raw_until(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<Option<(Operation, Bytes, u64)>, StoreError> {
        let mut outage = None;
        loop {
            let read = async {
                self.kv
                    .entry(key)
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))
            };
            match attempt(deadline, read).await {
                Ok(entry) => return Ok(entry.map(|e| (e.operation, e.value, e.revision))),
                Err(err) => self.wait_out(&mut outage, err, deadline, key).await?,
            }
        }
    }

    /// Pauses before the next try of a write the store did not answer, or hands `err` back
    /// when the deadline would pass or too many writes of this node already wait.
    async fn wait_out(
        &self,
        outage: &mut Option<OutageWait>,
        err: StoreError,
        deadline: Instant,
        what: &str,
    ) -> Result<(), StoreError> {
        let wait = match outage {
            Some(wait) => wait,
            None => {
                let Some(wait) = OutageWait::begin(&self.outage) else {
                    tracing::warn!(key = what, max_waiting = self.outage.max_waiting, error = %err, "session store unavailable and too many session writes already waiting; giving this one up");
                    return Err(err);
                };
                outage.insert(wait)
            }
        };
        let pause = wait.next_pause();
        if Instant::now() + pause >= deadline {
            return Err(err);
        }
        tracing::debug!(key = what, error = %err, tries = wait.tries(), pause_ms = pause.as_millis() as u64, "session store unavailable; waiting to try again");
        tokio::time::sleep(pause).await;
        Ok(())
    }

    fn encode(&self, record: &SessionRecord) -> Result<Bytes, StoreError> {
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if value.len() > self.max_value_size {
            return Err(StoreError::TooLarge(value.len()));
        }
        Ok(Bytes::from(value))
    }

    /// The record and its revision; revision 0 with `None` when there is none.
    pub async fn load(&self, client_id: &str) -> Result<(Option<SessionRecord>, u64), StoreError> {
        let entry = self
            .kv
            .entry(session_key(client_id))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match entry {
            None => Ok((None, 0)),
            Some(entry) if entry.operation != Operation::Put => Ok((None, entry.revision)),
            Some(entry) => {
                let record = SessionRecord::from_json(&entry.value)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((Some(record), entry.revision))
            }
        }
    }

    /// Writes `record` if the stored revision is still `revision` (0: if there is none).
    /// One try: an unavailable store is an error at once (see [`Self::save_until`]).
    pub async fn save(&self, record: &SessionRecord, revision: u64) -> Result<u64, StoreError> {
        let value = self.encode(record)?;
        self.write(&session_key(&record.client_id), &value, revision)
            .await
    }

    async fn write(&self, key: &str, value: &Bytes, revision: u64) -> Result<u64, StoreError> {
        let mut wait = InFlightWait::new();
        loop {
            let result = if revision == 0 {
                self.kv
                    .create(key, value.clone())
                    .await
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => StoreError::Conflict,
                        _ => classify_update(e.to_string()),
                    })
            } else {
                self.kv
                    .update(key, value.clone(), revision)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict,
                        _ => classify_update(e.to_string()),
                    })
            };
            match result {
                Err(StoreError::InFlight) => wait.pause().await?,
                other => return other,
            }
        }
    }

    /// Removes the record if it is still at `revision`.
    pub async fn delete(&self, client_id: &str, revision: u64) -> Result<(), StoreError> {
        let key = session_key(client_id);
        let mut wait = InFlightWait::new();
        loop {
            let result = self
                .kv
                .delete_expect_revision(&key, Some(revision))
                .await
                .map_err(|e| classify_update(e.to_string()));
            match result {
                Err(StoreError::InFlight) => wait.pause().await?,
                other => return other,
            }
        }
    }
}

/// One try of a store operation, given up (as unavailable) when it gets no answer within
/// [`ATTEMPT_TIMEOUT`] or by `deadline`, whichever is sooner (but never less than a short
/// moment, so that a last try still has a chance).
async fn attempt<T>(
    deadline: Instant,
    operation: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let limit = left.clamp(Duration::from_millis(200), ATTEMPT_TIMEOUT);
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {} ms",
            limit.as_millis()
        ))),
    }
}

/// One write's (or read's) stay in an outage: holds one of the node's waiting places, and
/// says when to try next.
struct OutageWait {
    policy: Arc<OutagePolicy>,
    backoff: Backoff,
    since: Instant,
}

impl OutageWait {
    fn begin(policy: &Arc<OutagePolicy>) -> Option<OutageWait> {
        let before = policy.waiting.fetch_add(1, Ordering::AcqRel);
        if before >= policy.max_waiting {
            policy.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if before == 0 {
            tracing::info!(
                grace_ms = policy.grace.as_millis() as u64,
                "session store unavailable; session writes wait for it"
            );
        }
        Some(OutageWait {
            policy: policy.clone(),
            // Up to half again on each pause, so that the waiters spread out.
            backoff: Backoff::new(FIRST_PAUSE, MAX_PAUSE).with_spread(0.5),
            since: Instant::now(),
        })
    }

    fn next_pause(&mut self) -> Duration {
        self.backoff.next_pause()
    }

    /// Pauses handed out so far.
    fn tries(&self) -> u32 {
        self.backoff.attempts()
    }
}

impl Drop for OutageWait {
    fn drop(&mut self) {
        let before = self.policy.waiting.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            tracing::info!(
                waited_ms = self.since.elapsed().as_millis() as u64,
                "no session write waits for the session store any more"
            );
        }
    }
}

/// Waiting out error 10164 (see [`StoreError::InFlight`]), for any conditional KV write.
pub(crate) struct InFlightWait {
    /// 1 ms, doubling up to 50 ms; its attempts count the tries.
    backoff: Backoff,
}

impl InFlightWait {
    /// The mark normally clears within a millisecond; a write still refused after this many
    /// tries (about 0.4 s) is racing a competitor that keeps writing: it has lost.
    const MAX_TRIES: u32 = 12;

    pub(crate) fn new() -> InFlightWait {
        InFlightWait {
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(50)),
        }
    }

    pub(crate) async fn pause(&mut self) -> Result<(), StoreError> {
        if self.backoff.attempts() >= Self::MAX_TRIES {
            return Err(StoreError::Conflict);
        }
        let pause = self.backoff.next_pause();
        tracing::debug!(
            tries = self.backoff.attempts(),
            "KV write refused while another write to the key was in flight; trying again"
        );
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

/// Is this KV write error the in-flight refusal (10164)? Its text is also "wrong last
/// sequence", so it must be told apart before a real mismatch (10071).
pub(crate) fn is_in_flight(message: &str) -> bool {
    message.contains("error code 10164")
}

fn classify_update(message: String) -> StoreError {
    if is_in_flight(&message) {
        StoreError::InFlight
    } else if message.contains("10071") || message.contains("wrong last sequence") {
        // The server answers a failed expected-revision check with error code 10071.
        StoreError::Conflict
    } else {
        StoreError::Unavailable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_refusal_is_not_a_conflict() {
        let in_flight = "other: wrong last sequence (code 400, error code 10164)".to_owned();
        let mismatch = "wrong last sequence: 41 (code 400, error code 10071)".to_owned();
        assert!(matches!(classify_update(in_flight), StoreError::InFlight));
        assert!(matches!(classify_update(mismatch), StoreError::Conflict));
        assert!(matches!(
            classify_update("timed out".to_owned()),
            StoreError::Unavailable(_)
        ));
    }

    #[test]
    fn keys_are_valid_kv_keys() {
        assert_eq!(session_key("sensor-1_a"), "p.sensor-1_a");
        assert_eq!(session_key("a/b"), "h.612f62");
        assert_eq!(session_key(""), "h.");
        assert!(session_key("é.*>")
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.'));
        assert!(session_key(&"x".repeat(300)).starts_with("h."));
    }
}
