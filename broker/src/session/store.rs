//! Compare-and-set access to session records.

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;

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

#[derive(Clone)]
pub struct SessionStore {
    kv: kv::Store,
    max_value_size: usize,
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
    pub fn new(kv: kv::Store, max_value_size: usize) -> SessionStore {
        SessionStore { kv, max_value_size }
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
    pub async fn save(&self, record: &SessionRecord, revision: u64) -> Result<u64, StoreError> {
        let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if value.len() > self.max_value_size {
            return Err(StoreError::TooLarge(value.len()));
        }
        let key = session_key(&record.client_id);
        let value = Bytes::from(value);
        let mut wait = InFlightWait::new();
        loop {
            let result = if revision == 0 {
                self.kv
                    .create(&key, value.clone())
                    .await
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => StoreError::Conflict,
                        _ => classify_update(e.to_string()),
                    })
            } else {
                self.kv
                    .update(&key, value.clone(), revision)
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

/// Waiting out error 10164 (see [`StoreError::InFlight`]), for any conditional KV write.
pub(crate) struct InFlightWait {
    tries: u32,
    pause: std::time::Duration,
}

impl InFlightWait {
    /// The mark normally clears within a millisecond; a write still refused after this many
    /// tries (about 0.4 s) is racing a competitor that keeps writing: it has lost.
    const MAX_TRIES: u32 = 12;

    pub(crate) fn new() -> InFlightWait {
        InFlightWait {
            tries: 0,
            pause: std::time::Duration::from_millis(1),
        }
    }

    pub(crate) async fn pause(&mut self) -> Result<(), StoreError> {
        self.tries += 1;
        if self.tries > Self::MAX_TRIES {
            return Err(StoreError::Conflict);
        }
        tracing::debug!(
            tries = self.tries,
            "KV write refused while another write to the key was in flight; trying again"
        );
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(std::time::Duration::from_millis(50));
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
