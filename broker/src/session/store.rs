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
                let record = serde_json::from_slice(&entry.value)
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
        let result = if revision == 0 {
            self.kv
                .create(&key, Bytes::from(value))
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => StoreError::Conflict,
                    _ => StoreError::Unavailable(e.to_string()),
                })
        } else {
            self.kv
                .update(&key, Bytes::from(value), revision)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict,
                    _ => classify_update(e.to_string()),
                })
        };
        result
    }

    /// Removes the record if it is still at `revision`.
    pub async fn delete(&self, client_id: &str, revision: u64) -> Result<(), StoreError> {
        self.kv
            .delete_expect_revision(session_key(client_id), Some(revision))
            .await
            .map_err(|e| classify_update(e.to_string()))
    }
}

fn classify_update(message: String) -> StoreError {
    // The server answers a failed expected-revision check with error code 10071.
    if message.contains("10071") || message.contains("wrong last sequence") {
        StoreError::Conflict
    } else {
        StoreError::Unavailable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
