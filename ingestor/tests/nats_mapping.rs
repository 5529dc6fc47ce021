//! Every generated mapping, loaded into a real nats-server: where messages land, that none
//! is lost, and that the mapping can change on a live server.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jetmq_common::subject::parse_stream_subject;
use jetmq_ingestor::mapping::{generate, Mode};
use support::*;

const TOTAL: usize = 3000;

/// 300 topics of varying depth (1 to 7 levels, some with characters that need escaping),
/// 10 messages each, interleaved.
fn messages(total: usize) -> Vec<(String, jetmq_common::envelope::Envelope, Vec<u8>)> {
    let topics: Vec<String> = (0..300)
        .map(|i| match i % 5 {
            0 => format!("t{i}"),
            1 => format!("dev/{i}/temp"),
            2 => format!("a/b/c/{i}/d/e/f"),
            3 => format!("site {i}/room.{i}//x"),
            _ => format!("$SYS/n/{i}"),
        })
        .collect();
    (0..total)
        .map(|n| {
            let topic = topics[n % topics.len()].clone();
            (topic, envelope(1, "pub"), format!("m{n}").into_bytes())
        })
        .collect()
}

struct Split {
    per_share: BTreeMap<u32, u64>,
    shares_of_topic: BTreeMap<String, BTreeSet<u32>>,
    total: u64,
}

async fn split_of(stream: &jetstream::stream::Stream) -> Split {
    let mut per_share = BTreeMap::new();
    let mut shares_of_topic: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut total = 0;
    for (subject, count) in subject_counts(stream).await {
        let (share, topic) = parse_stream_subject(&subject).expect("stored subject parses");
        *per_share.entry(share).or_insert(0) += count;
        shares_of_topic.entry(topic).or_default().insert(share);
        total += count;
    }
    Split {
        per_share,
        shares_of_topic,
        total,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Starts a server with `block` as its mappings.conf, publishes TOTAL messages, returns the
/// split.
async fn run_mapping(tag: &str, block: &str) -> Split {
    let dir = temp_dir(tag);
    std::fs::create_dir_all(dir.path().join("nats")).expect("dir");
    std::fs::write(dir.path().join("nats/mappings.conf"), block).expect("mapping");
    let server = NatsServer::start(dir.path(), "nats", "include ./mappings.conf");
    let client = connect(&server.url()).await;
    let js = jetstream::new(client);
    let stream = message_stream(&js, 1).await;
    let acked = publish_all(&js, messages(TOTAL), 256).await;
    assert_eq!(acked, TOTAL, "every publish acknowledged");
    let split = split_of(&stream).await;
    assert_eq!(
        split.total,
        TOTAL as u64,
        "stored == sent (nothing dropped); split {:?}\n{}",
        split.per_share,
        server.log()
    );
    split
}

#[test]
fn partition_mappings_keep_each_topic_on_one_share() {
    runtime().block_on(async {
        for n in 1..=3u32 {
            let block = generate(n, Mode::Partition, None).expect("mapping");
            let split = run_mapping(&format!("partition{n}"), &block).await;
            eprintln!("partition({n}): {:?}", split.per_share);
            let shares: BTreeSet<u32> = split.per_share.keys().copied().collect();
            assert_eq!(
                shares,
                (0..n).collect(),
                "every share 0..{n} non-empty, no other share"
            );
            assert_eq!(split.shares_of_topic.len(), 300, "all topics stored");
            for (topic, shares) in &split.shares_of_topic {
                assert_eq!(shares.len(), 1, "topic {topic:?} spread over {shares:?}");
            }
        }
    });
}

#[test]
fn weighted_mappings_follow_the_weights() {
    runtime().block_on(async {
        for weights in [vec![50u32, 50], vec![50, 30, 20]] {
            let n = weights.len() as u32;
            let block = generate(n, Mode::Weighted, Some(&weights)).expect("mapping");
            let split = run_mapping(&format!("weighted{n}"), &block).await;
            eprintln!("weighted {weights:?}: {:?}", split.per_share);
            for (share, weight) in weights.iter().enumerate() {
                let got = split.per_share.get(&(share as u32)).copied().unwrap_or(0);
                let expected = TOTAL as f64 * f64::from(*weight) / 100.0;
                // 5 percentage points: more than 6 standard deviations at 3000 messages.
                let tolerance = TOTAL as f64 * 0.05;
                assert!(
                    (got as f64 - expected).abs() <= tolerance,
                    "share {share}: {got} messages, expected {expected} +- {tolerance}"
                );
            }
            assert_eq!(split.per_share.len(), weights.len());
        }
    });
}

#[test]
fn one_ingestor_is_a_plain_mapping_in_both_modes() {
    runtime().block_on(async {
        for mode in [Mode::Partition, Mode::Weighted] {
            let block = generate(1, mode, None).expect("mapping");
            let split = run_mapping("one", &block).await;
            assert_eq!(split.per_share.keys().copied().collect::<Vec<_>>(), vec![0]);
        }
    });
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_jetmq-ingestor"))
        .args(args)
        .output()
        .expect("run jetmq-ingestor")
}

#[test]
fn cli_generates_and_refuses_bad_weights() {
    let out = cli(&["mapping", "--ingestors", "3"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"jetmq.in.>\": \"jetmq.s.{{partition(3)}}.>\""),
        "{text}"
    );

    let dir = temp_dir("cli");
    let file = dir.path().join("mappings.conf");
    let file_arg = file.to_string_lossy().into_owned();
    let out = cli(&[
        "mapping",
        "--ingestors",
        "3",
        "--mode",
        "weighted",
        "--weights",
        "50,30,20",
        "--output",
        &file_arg,
    ]);
    assert!(out.status.success(), "{out:?}");
    let written = std::fs::read_to_string(&file).expect("written");
    assert!(written.contains("weight: 20%"), "{written}");
    // The written file is a valid nats-server config fragment.
    let conf = dir.path().join("check.conf");
    std::fs::write(&conf, "listen: 127.0.0.1:-1\ninclude ./mappings.conf\n").expect("conf");
    let check = Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .expect("nats-server -t");
    assert!(check.status.success(), "nats-server -t: {check:?}");

    for (weights, why) in [
        ("50,40", "sum to 90"),
        ("60,50", "sum to 110"),
        ("100,0", "positive"),
        ("50,30,20", "3 weights"),
        ("50,x", "invalid"),
    ] {
        let out = cli(&[
            "mapping",
            "--ingestors",
            "2",
            "--mode",
            "weighted",
            "--weights",
            weights,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{weights} accepted");
        assert!(err.contains(why), "{weights}: {err}");
    }
    let out = cli(&["mapping", "--ingestors", "2", "--mode", "weighted"]);
    assert!(!out.status.success());
    let out = cli(&["mapping", "--ingestors", "0"]);
    assert!(!out.status.success());
}

/// The documented procedure: regenerate mappings.conf, reload the server, while brokers keep
/// publishing. Every acknowledged message is stored, and the new shares fill.
#[test]
fn changing_the_number_of_ingestors_on_a_live_server_loses_nothing() {
    runtime().block_on(async {
        let dir = temp_dir("reload");
        std::fs::create_dir_all(dir.path().join("nats")).expect("dir");
        std::fs::write(
            dir.path().join("nats/mappings.conf"),
            generate(1, Mode::Partition, None).expect("mapping"),
        )
        .expect("mapping");
        let server = NatsServer::start(dir.path(), "nats", "include ./mappings.conf");
        let client = connect(&server.url()).await;
        let js = jetstream::new(client);
        let stream = message_stream(&js, 1).await;

        const N: usize = 9000;
        let sent = Arc::new(AtomicUsize::new(0));
        let publisher = {
            let js = js.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let all = messages(N);
                for chunk in all.chunks(100) {
                    let n = publish_all(&js, chunk.to_vec(), 32).await;
                    sent.fetch_add(n, Ordering::SeqCst);
                    // Pace the flow so the reloads land mid-stream.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let wait_sent = |target: usize| {
            let sent = sent.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(40);
                while sent.load(Ordering::SeqCst) < target {
                    assert!(Instant::now() < deadline, "publisher stalled");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        // 1 -> 2 ingestors, then 2 -> 3 (partition), then 3 -> 2 (weighted).
        wait_sent(N / 4).await;
        server.write_mapping(&generate(2, Mode::Partition, None).expect("mapping"));
        server.reload();
        wait_sent(N / 2).await;
        server.write_mapping(&generate(3, Mode::Partition, None).expect("mapping"));
        server.reload();
        wait_sent(3 * N / 4).await;
        server.write_mapping(&generate(2, Mode::Weighted, Some(&[50, 50])).expect("mapping"));
        server.reload();
        publisher.await.expect("publisher ran to the end");

        assert_eq!(sent.load(Ordering::SeqCst), N, "every publish acknowledged");
        let split = split_of(&stream).await;
        eprintln!("after reloads: {:?}", split.per_share);
        assert_eq!(
            split.total,
            N as u64,
            "every message stored\n{}",
            server.log()
        );
        for share in 0..3 {
            assert!(
                split.per_share.get(&share).copied().unwrap_or(0) > 0,
                "share {share} empty: {:?}",
                split.per_share
            );
        }
    });
}

/// The same mapping on every node of a 3-node cluster with an R3 stream: messages published
/// through any node land by the same rule.
#[test]
fn cluster_nodes_share_the_mapping() {
    runtime().block_on(async {
        let dir = temp_dir("cluster");
        let block = generate(2, Mode::Partition, None).expect("mapping");
        let servers = nats_cluster(dir.path(), 3, &block);
        let first = connect(&servers[0].url()).await;
        let third = connect(&servers[2].url()).await;
        let js1 = jetstream::new(first);
        let js3 = jetstream::new(third);
        let stream = message_stream(&js1, 3).await;
        let all = messages(2000);
        let (a, b) = all.split_at(1000);
        let n1 = publish_all(&js1, a.to_vec(), 128).await;
        let n3 = publish_all(&js3, b.to_vec(), 128).await;
        assert_eq!(n1 + n3, 2000);
        let split = split_of(&stream).await;
        eprintln!("cluster: {:?}", split.per_share);
        assert_eq!(split.total, 2000);
        assert_eq!(split.per_share.len(), 2);
        for (topic, shares) in &split.shares_of_topic {
            assert_eq!(shares.len(), 1, "topic {topic:?} on {shares:?}");
        }
    });
}
