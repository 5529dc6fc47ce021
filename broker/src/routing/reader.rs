//! The stream reader: reads the whole message stream once, in order, and hands every
//! stream message to the [`Router`].
//!
//! [`run_stream_reader`] runs for the node's lifetime; after any error (a NATS server
//! dying, a leader election, a stall noticed by [`stall::StallWatch`]) it opens a new
//! consumer from the router's position, so nothing is skipped or delivered twice.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{decode_stream_messages, position, stall, Router};

/// Reads the message stream from `router.position() + 1` on, forever, and dispatches it.
pub async fn run_stream_reader(
    router: Arc<Router>,
    stream: async_nats::jetstream::stream::Stream,
    client: async_nats::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The reader must outlive any NATS trouble (a server dying, a leader election): it is
    // recreated from the router's position, so nothing is skipped or delivered twice.
    let mut watch = stall::StallWatch::default();
    loop {
        match read_stream(&router, &stream, &client, &mut watch, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::warn!(error = %err, position = router.position(), "message stream reader restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

async fn read_stream(
    router: &Router,
    stream: &async_nats::jetstream::stream::Stream,
    client: &async_nats::Client,
    watch: &mut stall::StallWatch,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy};
    let mut messages = stall::open_ordered(
        stream,
        push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{}.>", jetmq_common::subject::SHARE_PREFIX),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: position::first_stream_seq_after(router.position()),
            },
            ..Default::default()
        },
    )
    .await?;
    let mut checks = stall::check_interval();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = checks.tick() => {
                // Every message of the stream matches the reader's filter, so its last
                // sequence is where the router must get to.
                watch.check(stream, position::stream_seq(router.position())).await?;
                continue;
            }
            next = messages.next() => next,
        };
        let Some(message) = next else {
            anyhow::bail!("message stream reader ended");
        };
        // An error ends this consumer: it must not be polled again (see
        // [`stall::open_ordered`]); the reader is rebuilt from the router's position, so
        // nothing is skipped or delivered twice.
        let message = message.map_err(|err| anyhow::anyhow!("message stream reader: {err}"))?;
        let Some(seq) = message.reply.as_deref().and_then(stream_sequence) else {
            tracing::warn!(reply = ?message.reply, "message without JetStream metadata");
            continue;
        };
        let upto = position::end_of(seq);
        if upto <= router.position() {
            continue;
        }
        match decode_stream_messages(Some(seq), message.subject.as_str(), message.payload.clone()) {
            Ok(msgs) => router.dispatch(&msgs, upto),
            Err(err) => {
                tracing::warn!(seq, subject = %message.subject, error = %err, "skipping undecodable message");
                router.skip_to(upto);
            }
        }
    }
}

/// The stream sequence in a JetStream delivery's reply subject: `$JS.ACK.<stream>.<consumer>.
/// <delivered>.<stream seq>...` (7 tokens after the prefix), or with domain and account hash
/// first (9 or more). Only this one number is parsed: `Message::info` also converts the
/// timestamp, which showed up in profiles of the reader.
pub fn stream_sequence(reply: &str) -> Option<u64> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // One pass over the subject (it is read for every message): where tokens 3 and 5
    // start and end, and how many tokens there are.
    let mut bounds = [0usize; 7];
    let mut tokens = 1;
    for (i, _) in rest.match_indices('.') {
        if tokens < bounds.len() {
            bounds[tokens] = i + 1;
        }
        tokens += 1;
    }
    let index = match tokens {
        7 => 3,
        n if n >= 9 => 5,
        _ => return None,
    };
    rest[bounds[index]..bounds[index + 1] - 1].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_sequence_from_both_reply_subject_forms() {
        assert_eq!(
            stream_sequence("$JS.ACK.JETMQ_MSGS.abc.1.4242.17.1764500000000000000.0"),
            Some(4242)
        );
        assert_eq!(
            stream_sequence("$JS.ACK._.ACCHASH.JETMQ_MSGS.abc.1.99.17.1764500000000000000.3.tok"),
            Some(99)
        );
        assert_eq!(stream_sequence("$JS.ACK.S.c.1.x.1.1.0"), None);
        assert_eq!(stream_sequence("$JS.ACK.S.c.1"), None);
        assert_eq!(stream_sequence("_INBOX.x.y"), None);
        assert_eq!(stream_sequence("$JS.ACK.S.c.1..1.1.0"), None);
        assert_eq!(
            stream_sequence("$JS.ACK.S.c.1.99999999999999999999.1.1.0"),
            None
        );
        assert_eq!(
            stream_sequence("$JS.ACK.S.c.1.18446744073709551615.1.1.0"),
            Some(u64::MAX)
        );
        assert_eq!(stream_sequence("$JS.ACK.S.c.1.7.1.1.0."), None);
    }
}
