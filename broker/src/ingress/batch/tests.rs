//! The [`Book`]'s rules, without a server: what goes on the wire when, and what happens
//! to each message on every kind of answer, timeout and failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::book::{Failure, Wire};
use super::reply::alone_reply;
use super::*;
use crate::ingress::order::SUSPECT_AFTER;

const INBOX: &str = "_INBOX.node";

/// A book that batches from the first message (the batch rules' tests).
fn book() -> Book {
    let mut book = book_sending_alone_first();
    book.max_alone = 0;
    book
}

/// A book that publishes up to 32 messages alone (`nats.batch_publish_after`'s default)
/// before it batches.
fn book_sending_alone_first() -> Book {
    Book::new(
        INBOX.to_owned(),
        32,
        Arc::new(AtomicBool::new(true)),
        Arc::new(crate::telemetry::Metrics::default()),
    )
}

fn reply(subject: &str, status: Option<u16>, payload: &str) -> async_nats::Message {
    async_nats::Message {
        subject: subject.into(),
        reply: None,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        headers: None,
        status: status.and_then(|s| StatusCode::from_u16(s).ok()),
        description: None,
        length: 0,
    }
}

#[test]
fn light_load_publishes_alone_and_heavy_load_batches_until_the_batches_are_done() {
    let now = Instant::now();
    let mut book = book_sending_alone_first();
    book.max_alone = 2;
    let mut receivers = enqueue(&mut book, 4, now);
    let wires = drain(&mut book, now, true);
    let replies: Vec<&str> = wires.iter().map(|w| w.reply.as_str()).collect();
    assert_eq!(
        replies,
        [
            "_INBOX.node._s1",
            "_INBOX.node._s2",
            "_INBOX.node.node1.200.fail.1.0.$FI",
            "_INBOX.node.node1.200.fail.2.1.$FI",
            "_INBOX.node.node1.200.fail.3.3.$FI",
        ]
    );
    book.on_reply(
        &reply("_INBOX.node._s1", None, r#"{"stream":"S","seq":1}"#),
        now,
    );
    assert_eq!(state(&mut receivers[0]), Some(Ok(())));
    // While a batch is in flight, new messages join batches even with room for messages alone.
    let (m, _r) = message(now);
    book.enqueue(std::iter::once(m), now);
    let next = drain(&mut book, now, true);
    assert!(next[0].reply.contains(".node2."), "{next:?}");
    book.on_answer(
        0,
        serde_json::from_str(r#"{"stream":"S","count":2}"#).expect("json"),
        now,
    );
    book.on_answer(
        0,
        serde_json::from_str(r#"{"stream":"S","count":1}"#).expect("json"),
        now,
    );
    assert!(book.batches.is_empty());
    let (m, _r) = message(now);
    book.enqueue(std::iter::once(m), now);
    assert_eq!(drain(&mut book, now, true)[0].reply, "_INBOX.node._s3");
}

#[test]
fn a_message_alone_without_a_stream_leader_waits_and_goes_again_and_a_refusal_fails_it() {
    let now = Instant::now();
    let mut book = book_sending_alone_first();
    let (m1, mut r1) = message(now);
    let (m2, mut r2) = message(now);
    book.enqueue([m1, m2].into_iter(), now);
    drain(&mut book, now, true);
    book.on_reply(&reply("_INBOX.node._s1", Some(503), ""), now);
    assert_eq!(state(&mut r1), None);
    assert!(drain(&mut book, now, true).is_empty(), "backing off");
    // The second message alone was given up with the first: both go again, in their order.
    let again = drain(&mut book, now + BACKOFF_FIRST, true);
    let replies: Vec<&str> = again.iter().map(|w| w.reply.as_str()).collect();
    assert_eq!(replies, ["_INBOX.node._s3", "_INBOX.node._s4"]);
    // A late answer for a message alone given up is ignored.
    book.on_reply(
        &reply("_INBOX.node._s2", None, r#"{"stream":"S","seq":9}"#),
        now,
    );
    assert_eq!(state(&mut r2), None);
    book.on_reply(
        &reply(
            "_INBOX.node._s4",
            None,
            r#"{"error":{"code":400,"err_code":10054,"description":"maximum payload exceeded"}}"#,
        ),
        now,
    );
    assert!(matches!(
        state(&mut r2),
        Some(Err(BatchError::StoreFull(_)))
    ));
    // Silence: sent again after the timeout.
    book.on_timeout(now + BACKOFF_FIRST + ACK_TIMEOUT);
    assert!(book.alone.is_empty());
    let last = drain(&mut book, now + BACKOFF_FIRST + ACK_TIMEOUT, true);
    assert_eq!(last[0].reply, "_INBOX.node._s5");
    book.on_reply(
        &reply("_INBOX.node._s5", None, r#"{"stream":"S","seq":7}"#),
        now,
    );
    assert_eq!(state(&mut r1), Some(Ok(())));
}

/// The bodies a list of wires carries, bundles split.
fn bodies(wires: &[Wire]) -> Vec<Bytes> {
    wires
        .iter()
        .filter(|w| !w.body.is_empty())
        .flat_map(parts)
        .collect()
}

#[test]
fn messages_alone_that_time_out_go_again_in_their_order_not_reversed() {
    let now = Instant::now();
    let mut book = book_sending_alone_first();
    for body in ["44", "45", "46"] {
        let (m, _r) = from(8, "s.x", body, now);
        book.enqueue(std::iter::once(m), now);
    }
    assert_eq!(drain(&mut book, now, true).len(), 3);
    // The stream leader died: no answers at all.
    book.on_timeout(now + ACK_TIMEOUT);
    let again = drain(&mut book, now + ACK_TIMEOUT, true);
    assert_eq!(bodies(&again), ["44", "45", "46"]);
}

#[test]
fn a_failed_batch_takes_the_later_batches_in_flight_with_it_and_all_go_again_in_order() {
    let now = Instant::now();
    let mut book = book();
    let mut receivers = Vec::new();
    let mut sent = Vec::new();
    // Batch 1 with two messages, committed; then batch 2 with two more.
    for (body, idle) in [("1", false), ("2", true), ("3", false), ("4", true)] {
        let (m, r) = from(8, "s.x", body, now);
        book.enqueue(std::iter::once(m), now);
        receivers.push(r);
        sent.extend(drain(&mut book, now, idle));
    }
    assert_eq!(book.batches.len(), 2, "{sent:?}");
    assert_eq!(bodies(&sent), ["1", "2", "3", "4"]);
    // Batch 1 hears nothing (its stream leader died); batch 2 is still in flight.
    let later = now + ACK_TIMEOUT;
    book.batches[1].waiting_since = later;
    book.on_timeout(later);
    assert!(book.batches.is_empty(), "batch 2 is given up too");
    let again = drain(&mut book, later, true);
    assert_eq!(bodies(&again), ["1", "2", "3", "4"], "not 3, 4 before 1, 2");
    let commit = again.last().expect("commit");
    answer(
        &mut book,
        commit,
        r#"{"stream":"S","seq":9,"count":4}"#,
        later,
    );
    assert!(receivers.iter_mut().all(|r| state(r) == Some(Ok(()))));
}

#[test]
fn batches_that_fail_one_after_the_other_keep_their_order() {
    let now = Instant::now();
    let mut book = book();
    let mut sent = Vec::new();
    for (body, idle) in [("a", true), ("b", true)] {
        let (m, _r) = from(3, "s.x", body, now);
        book.enqueue(std::iter::once(m), now);
        sent.extend(drain(&mut book, now, idle));
    }
    // Publishing alone is off in `book()`: two batches in flight.
    assert_eq!(book.batches.len(), 2);
    // The later batch finds no stream leader first.
    let reply_b = &sent.iter().find(|w| w.body == "b").expect("b").reply;
    book.on_reply(&reply(reply_b, Some(503), ""), now);
    let again = drain(&mut book, now + BACKOFF_FIRST, true);
    assert_eq!(bodies(&again), ["a", "b"]);
}

#[test]
fn nothing_new_goes_while_the_oldest_in_flight_has_no_answer_for_long() {
    let now = Instant::now();
    let mut book = book_sending_alone_first();
    let (first, mut r_first) = from(5, "s.x", "1", now);
    book.enqueue(std::iter::once(first), now);
    let sent = drain(&mut book, now, true);
    let later = now + SUSPECT_AFTER;
    let (second, _r) = from(5, "s.x", "2", later);
    book.enqueue(std::iter::once(second), later);
    assert!(drain(&mut book, later, true).is_empty(), "held back");
    book.on_reply(
        &reply(&sent[0].reply, None, r#"{"stream":"S","seq":1}"#),
        later,
    );
    assert_eq!(state(&mut r_first), Some(Ok(())));
    assert_eq!(bodies(&drain(&mut book, later, true)), ["2"]);
}

#[test]
fn a_suspect_open_batch_is_committed_and_nothing_new_goes() {
    let now = Instant::now();
    let mut book = book();
    let (first, _r1) = from(5, "s.x", "1", now);
    book.enqueue(std::iter::once(first), now);
    assert_eq!(drain(&mut book, now, false).len(), 1, "open, not committed");
    let later = now + SUSPECT_AFTER;
    let (second, _r2) = from(5, "s.x", "2", later);
    book.enqueue(std::iter::once(second), later);
    let wires = drain(&mut book, later, false);
    assert_eq!(wires.len(), 1);
    assert!(
        wires[0].reply.ends_with(".3.$FI"),
        "only the commit: {wires:?}"
    );
}

#[test]
fn a_message_given_up_fails_the_queued_messages_of_its_publisher() {
    let now = Instant::now();
    let mut book = book_sending_alone_first();
    let (first, mut r_first) = from(5, "s.x", "1", now);
    book.enqueue(std::iter::once(first), now);
    drain(&mut book, now, true);
    let later = now + GIVE_UP_AFTER - Duration::from_millis(1);
    let (second, mut r_second) = from(5, "s.x", "2", later);
    let (other, mut r_other) = from(6, "s.x", "x", later);
    book.enqueue([second, other].into_iter(), later);
    // The first one's ack never comes and its time runs out.
    book.on_timeout(now + GIVE_UP_AFTER);
    assert!(matches!(state(&mut r_first), Some(Err(_))));
    assert!(
        matches!(state(&mut r_second), Some(Err(_))),
        "would be stored before the first once the client sends that again"
    );
    assert_eq!(state(&mut r_other), None, "other publishers go on");
    assert_eq!(bodies(&drain(&mut book, now + GIVE_UP_AFTER, true)), ["x"]);
}

fn message(now: Instant) -> (QueuedPublish, oneshot::Receiver<Result<(), BatchError>>) {
    let (done, rx) = oneshot::channel();
    (
        QueuedPublish {
            subject: Subject::from("jetmq.s.0.t"),
            body: Bytes::from_static(b"x"),
            headers: None,
            source: 1,
            done,
            give_up_at: Some(now + GIVE_UP_AFTER),
            taken: 0,
        },
        rx,
    )
}

/// `count` messages into the book, one at a time; their receivers.
fn enqueue(
    book: &mut Book,
    count: u64,
    now: Instant,
) -> Vec<oneshot::Receiver<Result<(), BatchError>>> {
    (0..count)
        .map(|_| {
            let (m, r) = message(now);
            book.enqueue(std::iter::once(m), now);
            r
        })
        .collect()
}

fn answer(book: &mut Book, wire: &Wire, json: &str, now: Instant) {
    let index = book.batch_of(&wire.reply).expect("batch of reply");
    book.on_answer(index, serde_json::from_str(json).expect("json"), now);
}

fn drain(book: &mut Book, now: Instant, idle: bool) -> Vec<Wire> {
    std::iter::from_fn(|| book.next_send(now, idle)).collect()
}

fn state(rx: &mut oneshot::Receiver<Result<(), BatchError>>) -> Option<Result<(), BatchError>> {
    rx.try_recv().ok()
}

/// A message of `source` on `subject` with `body`.
fn from(
    source: u64,
    subject: &str,
    body: &'static str,
    now: Instant,
) -> (QueuedPublish, oneshot::Receiver<Result<(), BatchError>>) {
    let (mut m, r) = message(now);
    m.source = source;
    m.subject = Subject::from(subject);
    m.body = Bytes::from_static(body.as_bytes());
    (m, r)
}

fn parts(wire: &Wire) -> Vec<Bytes> {
    jetmq_common::envelope::split_bundle(wire.body.clone()).expect("splits")
}

#[test]
fn queued_messages_of_one_subject_go_as_one_bundle_in_each_publishers_order() {
    let now = Instant::now();
    let mut book = book();
    book.max_bundle = 3;
    let mut receivers = Vec::new();
    // Publisher 1 sends x, y, x; publisher 2 sends x, x, x.
    for (source, subject, body) in [
        (1, "s.x", "1x1"),
        (2, "s.x", "2x1"),
        (1, "s.y", "1y1"),
        (1, "s.x", "1x2"),
        (2, "s.x", "2x2"),
        (2, "s.x", "2x3"),
    ] {
        let (m, r) = from(source, subject, body, now);
        book.enqueue(std::iter::once(m), now);
        receivers.push(r);
    }
    let wires = drain(&mut book, now, false);
    let bodies: Vec<Vec<Bytes>> = wires.iter().map(parts).collect();
    // 1x2 may not join 1x1's bundle: 1y1, sent after 1x1, would then come after it.
    // The bundle stops at three.
    assert_eq!(
        bodies,
        vec![
            vec![Bytes::from("1x1"), Bytes::from("2x1"), Bytes::from("2x2")],
            vec![Bytes::from("1y1")],
            vec![Bytes::from("1x2"), Bytes::from("2x3")],
        ]
    );
    assert_eq!(book.metrics.publish_bundles.get(), 2);
    assert_eq!(book.metrics.publish_bundled_messages.get(), 5);
    // One stream message per bundle: the flow ack of the first two covers four messages.
    book.on_answer(
        0,
        serde_json::from_str(r#"{"type":"ack","seq":2,"msgs":200}"#).expect("json"),
        now,
    );
    let done: Vec<bool> = receivers
        .iter_mut()
        .map(|r| state(r) == Some(Ok(())))
        .collect();
    assert_eq!(done, [true, true, true, false, true, false]);
}

#[test]
fn a_failed_bundle_is_sent_again_in_the_same_order() {
    let now = Instant::now();
    let mut book = book();
    book.max_bundle = 8;
    let mut receivers = Vec::new();
    for body in ["a", "b", "c"] {
        let (m, r) = from(1, "s.x", body, now);
        book.enqueue(std::iter::once(m), now);
        receivers.push(r);
    }
    let first = drain(&mut book, now, false);
    assert_eq!(first.len(), 1);
    answer(
        &mut book,
        &first[0],
        r#"{"type":"gap","last_seq":0,"seq":1}"#,
        now,
    );
    let again = drain(&mut book, now, false);
    assert_eq!(again.len(), 1);
    assert_eq!(
        parts(&again[0]),
        vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]
    );
    assert!(receivers.iter_mut().all(|r| state(r).is_none()));
}

#[test]
fn messages_with_headers_or_too_large_for_a_bundle_go_alone() {
    let now = Instant::now();
    let mut book = book();
    book.max_bundle = 8;
    let (mut traced, _r1) = from(1, "s.x", "t", now);
    traced.headers = Some(HeaderMap::new());
    let (plain, _r2) = from(2, "s.x", "p", now);
    let (mut big, _r3) = from(3, "s.x", "", now);
    big.body = Bytes::from(vec![b'x'; MAX_BUNDLE_BYTES]);
    book.enqueue([traced, plain, big].into_iter(), now);
    let wires = drain(&mut book, now, false);
    assert_eq!(wires.len(), 3);
    assert_eq!(wires[0].body, Bytes::from("t"), "no bundle: it has headers");
    assert_eq!(wires[1].body, Bytes::from("p"), "the next does not fit");
    assert_eq!(wires[2].body.len(), MAX_BUNDLE_BYTES);
}

#[test]
fn reply_subjects_carry_numbers_in_decimal() {
    for n in [0, 7, 10, 199, 200, u64::MAX] {
        assert_eq!(alone_reply(INBOX, n), format!("{INBOX}._s{n}"));
    }
}

#[test]
fn a_quiet_node_commits_at_once_and_the_final_answer_confirms() {
    let now = Instant::now();
    let mut book = book();
    let (m1, mut r1) = message(now);
    let (m2, mut r2) = message(now);
    book.enqueue([m1, m2].into_iter(), now);
    let wires = drain(&mut book, now, true);
    let replies: Vec<&str> = wires.iter().map(|w| w.reply.as_str()).collect();
    assert_eq!(
        replies,
        [
            "_INBOX.node.node1.200.fail.1.0.$FI",
            "_INBOX.node.node1.200.fail.2.1.$FI",
            "_INBOX.node.node1.200.fail.3.3.$FI",
        ]
    );
    assert!(
        wires[2].body.is_empty(),
        "end-of-batch commit carries no message"
    );
    answer(
        &mut book,
        &wires[0],
        r#"{"type":"ack","seq":0,"msgs":200}"#,
        now,
    );
    assert_eq!(state(&mut r1), None, "start answer confirms nothing");
    answer(
        &mut book,
        &wires[2],
        r#"{"stream":"S","seq":9,"batch":"node1","count":2}"#,
        now,
    );
    assert_eq!(state(&mut r1), Some(Ok(())));
    assert_eq!(state(&mut r2), Some(Ok(())));
    assert!(book.batches.is_empty());
}

#[test]
fn a_busy_node_keeps_the_batch_open_and_flow_acks_confirm() {
    let now = Instant::now();
    let mut book = book();
    let mut receivers = enqueue(&mut book, 5, now);
    // More input is waiting: no commit.
    let wires = drain(&mut book, now, false);
    assert_eq!(wires.len(), 5);
    assert!(wires.iter().all(|w| !w.reply.ends_with(".3.$FI")));
    answer(
        &mut book,
        &wires[0],
        r#"{"type":"ack","seq":3,"msgs":3}"#,
        now,
    );
    let done: Vec<bool> = receivers.iter_mut().map(|r| state(r).is_some()).collect();
    assert_eq!(done, [true, true, true, false, false]);
    // The server lowered the flow: later reply subjects say so.
    let (m, _r) = message(now);
    book.enqueue(std::iter::once(m), now);
    let next = drain(&mut book, now, false);
    assert_eq!(next[0].reply, "_INBOX.node.node1.3.fail.6.1.$FI");
}

#[test]
fn only_one_commit_waits_at_a_time() {
    let now = Instant::now();
    let mut book = book();
    let (m1, _r1) = message(now);
    book.enqueue(std::iter::once(m1), now);
    let first = drain(&mut book, now, true);
    assert_eq!(first.len(), 2, "message and commit");
    let (m2, mut r2) = message(now);
    book.enqueue(std::iter::once(m2), now);
    let second = drain(&mut book, now, true);
    assert_eq!(
        second.len(),
        1,
        "new batch started, its commit waits: {second:?}"
    );
    assert!(second[0].reply.contains(".node2."));
    answer(
        &mut book,
        &first[1],
        r#"{"stream":"S","seq":1,"count":1}"#,
        now,
    );
    let commit = drain(&mut book, now, true);
    assert_eq!(commit.len(), 1);
    assert!(commit[0].reply.ends_with("node2.200.fail.2.3.$FI"));
    answer(
        &mut book,
        &commit[0],
        r#"{"stream":"S","seq":2,"count":1}"#,
        now,
    );
    assert_eq!(state(&mut r2), Some(Ok(())));
}

#[test]
fn a_full_batch_is_committed_and_a_new_one_opened() {
    let now = Instant::now();
    let mut book = book();
    let _receivers = enqueue(&mut book, REQUESTED_FLOW * WINDOWS_PER_BATCH + 1, now);
    let wires = drain(&mut book, now, false);
    let commits: Vec<&Wire> = wires
        .iter()
        .filter(|w| w.reply.ends_with(".3.$FI"))
        .collect();
    assert_eq!(commits.len(), 1);
    assert_eq!(book.batches.len(), 2);
    assert!(wires
        .last()
        .is_some_and(|w| w.reply.contains(".node2.") && w.seq == 1));
}

#[test]
fn a_gap_sends_the_unconfirmed_messages_again_in_order() {
    let now = Instant::now();
    let mut book = book();
    let mut receivers = enqueue(&mut book, 4, now);
    let wires = drain(&mut book, now, false);
    answer(
        &mut book,
        &wires[0],
        r#"{"type":"ack","seq":2,"msgs":2}"#,
        now,
    );
    answer(
        &mut book,
        &wires[3],
        r#"{"type":"gap","last_seq":3,"seq":4}"#,
        now,
    );
    assert!(book.batches.is_empty());
    assert_eq!(book.queue.len(), 2);
    let again = drain(&mut book, now, true);
    assert_eq!(again.len(), 3, "two messages and a commit");
    assert!(again[0].reply.contains(".node2.") && again[0].seq == 1);
    // A late answer for the failed batch is ignored.
    assert!(book.batch_of(&wires[3].reply).is_none());
    answer(
        &mut book,
        &again[2],
        r#"{"stream":"S","seq":6,"count":2}"#,
        now,
    );
    assert!(receivers.iter_mut().all(|r| state(r) == Some(Ok(()))));
}

#[test]
fn no_responders_backs_off_and_silence_times_out() {
    let now = Instant::now();
    let mut book = book();
    let (m, mut r) = message(now);
    book.enqueue(std::iter::once(m), now);
    let wires = drain(&mut book, now, true);
    let index = book.batch_of(&wires[0].reply).expect("batch");
    book.fail(index, Failure::BackOff, now);
    assert!(drain(&mut book, now, true).is_empty(), "backing off");
    let later = now + BACKOFF_FIRST;
    let again = drain(&mut book, later, true);
    assert_eq!(again.len(), 2);
    assert_eq!(book.next_deadline(), Some(later + ACK_TIMEOUT));
    book.on_timeout(later + ACK_TIMEOUT);
    assert!(book.batches.is_empty());
    assert_eq!(book.queue.len(), 1, "sent again after the timeout");
    // Past the message's own limit it fails instead.
    assert!(drain(&mut book, now + GIVE_UP_AFTER, true).is_empty());
    assert!(matches!(state(&mut r), Some(Err(BatchError::Failed(_)))));
}

#[test]
fn a_refused_message_fails_alone_and_a_disabled_stream_turns_batches_off() {
    let now = Instant::now();
    let mut book = book();
    let (m1, mut r1) = message(now);
    let (m2, mut r2) = message(now);
    book.enqueue([m1, m2].into_iter(), now);
    let wires = drain(&mut book, now, false);
    answer(
        &mut book,
        &wires[1],
        r#"{"type":"err","seq":2,"error":{"code":400,"err_code":10999,"description":"bad"}}"#,
        now,
    );
    assert!(matches!(state(&mut r2), Some(Err(BatchError::Failed(_)))));
    assert_eq!(state(&mut r1), None);
    assert_eq!(book.queue.len(), 1, "the other message is sent again");
    assert!(
        drain(&mut book, now, false).is_empty(),
        "after a refusal: backing off"
    );
    let again = drain(&mut book, now + BACKOFF_FIRST, false);
    answer(
        &mut book,
        &again[0],
        r#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"},"stream":"S","seq":0}"#,
        now,
    );
    assert_eq!(state(&mut r1), Some(Err(BatchError::Unsupported)));
    assert!(!book.available.load(Ordering::Relaxed));
    let (m3, mut r3) = message(now);
    book.enqueue(std::iter::once(m3), now);
    assert_eq!(state(&mut r3), Some(Err(BatchError::Unsupported)));
}

#[test]
fn a_full_store_fails_the_whole_batch_and_a_full_message_alone_is_not_retried() {
    let now = Instant::now();
    let mut book = book();
    let (m1, mut r1) = message(now);
    let (m2, mut r2) = message(now);
    let (m3, mut r3) = message(now);
    book.enqueue([m1, m2, m3].into_iter(), now);
    let wires = drain(&mut book, now, false);
    // nats-server 2.15.1, stream at max_bytes with discard "new".
    answer(
        &mut book,
        &wires[1],
        r#"{"type":"err","seq":2,"error":{"code":503,"err_code":10077,"description":"maximum bytes exceeded"}}"#,
        now,
    );
    for r in [&mut r1, &mut r2, &mut r3] {
        assert!(matches!(state(r), Some(Err(BatchError::StoreFull(_)))));
    }
    assert!(book.queue.is_empty(), "nothing is sent again");
    assert!(book.batches.is_empty());

    let mut book = book_sending_alone_first();
    let (m4, mut r4) = message(now);
    book.enqueue(std::iter::once(m4), now);
    drain(&mut book, now, true);
    // A server whose max_file_store is used up: 503 too, but not "no leader".
    book.on_reply(
        &reply(
            "_INBOX.node._s1",
            None,
            r#"{"error":{"code":503,"err_code":10023,"description":"insufficient resources"},"stream":"S","seq":0}"#,
        ),
        now,
    );
    assert!(matches!(
        state(&mut r4),
        Some(Err(BatchError::StoreFull(_)))
    ));
    assert!(book.alone.is_empty() && book.queue.is_empty());
}
