//! End to end from NATS to Kafka: messages published as a broker publishes them (JetStream,
//! `publish_subject(topic)`, envelope body) reach Kafka (tansu) through jetmq-ingestor
//! processes, through failures of Kafka and of the ingestor.
//!
//! The tests run one at a time (they start several processes each on a 2-core machine).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use jetmq_common::envelope::{Envelope, MessageProperties};
use jetmq_common::subject::publish_subject;
use jetmq_ingestor::mapping::{generate, Mode};
use support::*;

static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn serial<F, Fut>(test: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _guard = SERIAL.lock();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test());
}

struct Setup {
    dir: tempfile::TempDir,
    nats: NatsServer,
    tansu: Tansu,
    js: jetstream::Context,
}

impl Setup {
    async fn new(tag: &str, shares: u32, topics: &[(&str, u32)]) -> Setup {
        let dir = temp_dir(tag);
        std::fs::create_dir_all(dir.path().join("nats")).expect("dir");
        std::fs::write(
            dir.path().join("nats/mappings.conf"),
            generate(shares, Mode::Partition, None).expect("mapping"),
        )
        .expect("mapping");
        let nats = NatsServer::start(dir.path(), "nats", "include ./mappings.conf");
        let tansu = Tansu::start(dir.path());
        for (topic, partitions) in topics {
            tansu.create_topic(topic, *partitions);
        }
        let js = jetstream::new(connect(&nats.url()).await);
        message_stream(&js, 1).await;
        Setup {
            dir,
            nats,
            tansu,
            js,
        }
    }

    fn ingestor(&self, mqtt_id: u32, tag: &str, extra: &str) -> IngestorProc {
        let toml = ingestor_toml(&self.nats.url(), &self.tansu.bootstrap(), extra);
        IngestorProc::start(self.dir.path(), mqtt_id, tag, &toml)
    }

    async fn read(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<KafkaRecord> {
        read_until(&self.tansu.bootstrap(), topic, expected, timeout).await
    }

    fn diagnostics(&self, ingestors: &[&IngestorProc]) -> String {
        let mut s = String::new();
        for i in ingestors {
            s.push_str(&format!(
                "--- ingestor {} metrics {:?}\n{}\n",
                i.log.display(),
                i.metrics(),
                i.log_tail()
            ));
        }
        s.push_str(&format!("--- tansu\n{}\n", self.tansu.log()));
        s
    }
}

/// Reads `topic` until `expected` distinct messages (by `jetmq.seq`) arrived, then 1 s more.
async fn read_until(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<KafkaRecord> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        read_topic(
            &bootstrap,
            &topic,
            timeout,
            Duration::from_secs(1),
            |records| dedup_stats(records).0 >= expected,
        )
    })
    .await
    .expect("reader thread")
}

/// `count` messages over `topics` topics: payload `<topic index>:<n-th message of topic>`.
fn numbered(count: usize, topics: usize, prefix: &str) -> Vec<(String, Envelope, Vec<u8>)> {
    (0..count)
        .map(|n| {
            let t = n % topics;
            (
                format!("{prefix}/{t}/data"),
                envelope((n % 3) as u8, &format!("client-{t}")),
                format!("{t}:{}", n / topics).into_bytes(),
            )
        })
        .collect()
}

/// Per MQTT topic, the message numbers in the order Kafka holds them.
fn order_by_topic(records: &[KafkaRecord]) -> BTreeMap<String, Vec<u64>> {
    let mut sorted: Vec<&KafkaRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in sorted {
        let topic = r.header_str("mqtt.topic").expect("mqtt.topic header");
        let n = String::from_utf8_lossy(&r.value)
            .split(':')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("numbered payload");
        out.entry(topic).or_default().push(n);
    }
    out
}

async fn wait_metric(
    ingestor: &IngestorProc,
    name: &str,
    at_least: f64,
    timeout: Duration,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = ingestor.metrics();
        if m.get(name).copied().unwrap_or(0.0) >= at_least {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not reach {at_least} in {timeout:?}: {m:?}\n{}",
            ingestor.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn messages_reach_kafka_with_key_value_and_headers() {
    serial(|| async {
        let s = Setup::new(
            "basic",
            1,
            &[("mqtt", 3), ("temps", 1), ("mqtt-dead-letter", 1)],
        )
        .await;
        let mut ingestor = s.ingestor(
            1,
            "1",
            r#"
[[routing.rules]]
filter = "sensors/+/temp"
topic = "temps"
"#,
        );

        // One message per QoS with every MQTT 5 property, routed to "temps".
        let mut special = Vec::new();
        for qos in 0..3u8 {
            let env = Envelope {
                qos,
                retain: qos == 1,
                client_id: format!("dev-{qos}"),
                timestamp_ms: 1_700_000_000_000 + u64::from(qos),
                properties: MessageProperties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(3600),
                    content_type: Some("application/json".into()),
                    response_topic: Some(format!("replies/{qos}")),
                    correlation_data: Some(Bytes::from(vec![0, 159, 146, 150, qos])),
                    user_properties: vec![
                        ("unit".into(), "celsius".into()),
                        ("note".into(), "two\nlines".into()),
                    ],
                },
            };
            special.push((
                format!("sensors/{qos}/temp"),
                env,
                format!("{{\"qos\":{qos}}}").into_bytes(),
            ));
        }
        assert_eq!(publish_all(&s.js, special, 16).await, 3);
        // Numbered messages over 20 topics, routed to the default topic.
        const N: usize = 1000;
        assert_eq!(publish_all(&s.js, numbered(N, 20, "dev"), 256).await, N);

        let temps = s.read("temps", 3, Duration::from_secs(30)).await;
        let mqtt = s.read("mqtt", N, Duration::from_secs(30)).await;
        let diag = s.diagnostics(&[&ingestor]);
        assert_eq!(temps.len(), 3, "temps: {temps:?}\n{diag}");
        assert_eq!(mqtt.len(), N, "mqtt records\n{diag}");

        for r in &temps {
            let qos: u8 = r
                .header_str("mqtt.qos")
                .and_then(|q| q.parse().ok())
                .expect("qos");
            let topic = format!("sensors/{qos}/temp");
            assert_eq!(r.key.as_deref(), Some(topic.as_bytes()), "key = MQTT topic");
            assert_eq!(
                r.value,
                format!("{{\"qos\":{qos}}}").into_bytes(),
                "value untouched"
            );
            assert_eq!(r.header_str("mqtt.topic"), Some(topic));
            assert_eq!(
                r.header_str("mqtt.retain").as_deref(),
                Some(if qos == 1 { "true" } else { "false" })
            );
            assert_eq!(r.header_str("mqtt.client_id"), Some(format!("dev-{qos}")));
            assert_eq!(
                r.header_str("mqtt.timestamp_ms"),
                Some((1_700_000_000_000 + u64::from(qos)).to_string())
            );
            assert_eq!(r.timestamp, Some(1_700_000_000_000 + i64::from(qos)));
            assert_eq!(r.header_str("mqtt.payload_format").as_deref(), Some("1"));
            assert_eq!(r.header_str("mqtt.message_expiry").as_deref(), Some("3600"));
            assert_eq!(
                r.header_str("mqtt.content_type").as_deref(),
                Some("application/json")
            );
            assert_eq!(
                r.header_str("mqtt.response_topic"),
                Some(format!("replies/{qos}"))
            );
            assert_eq!(
                r.header("mqtt.correlation_data"),
                Some(&[0, 159, 146, 150, qos][..])
            );
            assert_eq!(r.header_str("mqtt.user.unit").as_deref(), Some("celsius"));
            assert_eq!(
                r.header_str("mqtt.user.note").as_deref(),
                Some("two\nlines")
            );
            assert_eq!(r.header_str("jetmq.share").as_deref(), Some("0"));
        }
        // Per-topic order holds (key = topic: one partition per topic).
        let (distinct, dups) = dedup_stats(&mqtt);
        assert_eq!((distinct, dups), (N, 0));
        for (topic, numbers) in order_by_topic(&mqtt) {
            let expected: Vec<u64> = (0..(N / 20) as u64).collect();
            assert_eq!(numbers, expected, "order of {topic}");
        }
        let partitions_of: BTreeMap<String, BTreeSet<i32>> =
            mqtt.iter().fold(BTreeMap::new(), |mut m, r| {
                m.entry(r.header_str("mqtt.topic").unwrap_or_default())
                    .or_default()
                    .insert(r.partition);
                m
            });
        assert!(partitions_of.values().all(|p| p.len() == 1));

        let m = wait_metric(
            &ingestor,
            "acked_total",
            (N + 3) as f64,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(m.get("produced_total"), Some(&((N + 3) as f64)));
        assert_eq!(m.get("lag"), Some(&0.0));
        assert_eq!(m.get("ready"), Some(&1.0));
        // One produce-latency observation per record Kafka confirmed; tansu on loopback
        // confirms within seconds, not never and not instantly.
        assert_eq!(
            m.get("kafka_produce_seconds_count"),
            Some(&((N + 3) as f64)),
            "{m:?}"
        );
        let mean = m["kafka_produce_seconds_sum"] / m["kafka_produce_seconds_count"];
        assert!(mean > 0.0 && mean < 10.0, "mean produce latency {mean} s");
        // Graceful shutdown: exit 0.
        let status = ingestor.sigterm(Duration::from_secs(15));
        assert!(status.success(), "exit status {status:?}");
    });
}

#[test]
fn two_ingestors_split_the_flow_by_topic() {
    serial(|| async {
        let s = Setup::new("two", 2, &[("mqtt", 3), ("mqtt-dead-letter", 1)]).await;
        let one = s.ingestor(1, "1", "");
        let two = s.ingestor(2, "2", "");
        const N: usize = 2000;
        assert_eq!(publish_all(&s.js, numbered(N, 100, "split"), 256).await, N);
        let records = s.read("mqtt", N, Duration::from_secs(40)).await;
        let diag = s.diagnostics(&[&one, &two]);
        let (distinct, dups) = dedup_stats(&records);
        assert_eq!(distinct, N, "{diag}");
        assert_eq!(dups, 0);
        let mut shares_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in &records {
            shares_of
                .entry(r.header_str("mqtt.topic").unwrap_or_default())
                .or_default()
                .insert(r.header_str("jetmq.share").unwrap_or_default());
        }
        assert!(shares_of.values().all(|s| s.len() == 1), "{shares_of:?}");
        let used: BTreeSet<String> = shares_of.values().flatten().cloned().collect();
        assert_eq!(used, ["0", "1"].iter().map(|s| s.to_string()).collect());
        let m1 = wait_metric(&one, "acked_total", 1.0, Duration::from_secs(5)).await;
        let m2 = wait_metric(&two, "acked_total", 1.0, Duration::from_secs(5)).await;
        let produced = m1.get("produced_total").copied().unwrap_or(0.0)
            + m2.get("produced_total").copied().unwrap_or(0.0);
        eprintln!("ingestor 1: {m1:?}\ningestor 2: {m2:?}");
        assert_eq!(produced, N as f64);
        for (topic, numbers) in order_by_topic(&records) {
            assert!(numbers.windows(2).all(|w| w[0] < w[1]), "order of {topic}");
        }
    });
}

/// Publishes `messages` in the background, paced, returning the number acknowledged.
fn publish_in_background(
    js: &jetstream::Context,
    messages: Vec<(String, Envelope, Vec<u8>)>,
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<usize> {
    let js = js.clone();
    tokio::spawn(async move {
        let mut n = 0;
        for part in messages.chunks(chunk) {
            n += publish_all(&js, part.to_vec(), 64).await;
            tokio::time::sleep(pause).await;
        }
        n
    })
}

/// The documented scale-up: start the new ingestor, regenerate the mapping, reload the server,
/// all while messages flow. Every message reaches Kafka and both ingestors take part.
#[test]
fn adding_an_ingestor_on_a_live_system_loses_nothing() {
    serial(|| async {
        let s = Setup::new("scaleup", 1, &[("mqtt", 3), ("mqtt-dead-letter", 1)]).await;
        let one = s.ingestor(1, "1", "");
        const N: usize = 3000;
        let publisher = publish_in_background(
            &s.js,
            numbered(N, 60, "scale"),
            100,
            Duration::from_millis(100),
        );
        wait_metric(&one, "acked_total", 300.0, Duration::from_secs(20)).await;
        let two = s.ingestor(2, "2", "");
        s.nats
            .write_mapping(&generate(2, Mode::Partition, None).expect("mapping"));
        s.nats.reload();
        eprintln!("reloaded with 2 shares at {:?}", one.metrics());
        assert_eq!(publisher.await.expect("publisher"), N);
        let records = s.read("mqtt", N, Duration::from_secs(45)).await;
        let (distinct, dups) = dedup_stats(&records);
        let (m1, m2) = (one.metrics(), two.metrics());
        eprintln!("scale-up: {distinct} distinct of {N}, {dups} duplicates\n1: {m1:?}\n2: {m2:?}");
        // The new ingestor first: a long report is cut in the middle.
        assert_eq!(distinct, N, "{}", s.diagnostics(&[&two, &one]));
        assert!(
            m2.get("produced_total").copied().unwrap_or(0.0) > 0.0,
            "{m2:?}\n{}",
            two.log_tail()
        );
        assert!(
            std::fs::read_to_string(s.nats.dir.join("nats.log"))
                .unwrap_or_default()
                .contains("Reloaded server configuration"),
            "{}",
            s.nats.log()
        );
    });
}

#[test]
fn kafka_outage_loses_nothing() {
    serial(|| async {
        let mut s = Setup::new("outage", 1, &[("mqtt", 3), ("mqtt-dead-letter", 1)]).await;
        // A small window, so the backlog also waits in JetStream.
        let ingestor = s.ingestor(1, "1", "[ingest]\nmax_in_flight = 500\n");
        const N: usize = 3000;
        let publisher = publish_in_background(
            &s.js,
            numbered(N, 50, "outage"),
            100,
            Duration::from_millis(100),
        );
        wait_metric(&ingestor, "acked_total", 500.0, Duration::from_secs(20)).await;
        s.tansu.kill();
        eprintln!("tansu killed at {:?}", ingestor.metrics());
        tokio::time::sleep(Duration::from_secs(6)).await;
        let during = ingestor.metrics();
        eprintln!("after 6 s without Kafka: {during:?}");
        s.tansu.restart();
        eprintln!("tansu restarted");
        assert_eq!(publisher.await.expect("publisher"), N);
        let records = s.read("mqtt", N, Duration::from_secs(45)).await;
        let (distinct, dups) = dedup_stats(&records);
        eprintln!(
            "Kafka outage: {distinct} distinct of {N}, {dups} duplicates, metrics {:?}",
            ingestor.metrics()
        );
        assert_eq!(distinct, N, "{}", s.diagnostics(&[&ingestor]));
        assert_eq!(
            during.get("in_flight").copied(),
            Some(500.0),
            "the window fills while Kafka is away: {during:?}"
        );
        assert!(
            during.get("lag").copied().unwrap_or(0.0) > 0.0,
            "the rest waits in JetStream: {during:?}"
        );
        assert!(
            during.get("acked_total").copied().unwrap_or(0.0) < N as f64,
            "nothing acked without Kafka: {during:?}"
        );
    });
}

/// SIGTERM while Kafka is away: the ingestor waits (bounded) for confirmations, hands the
/// rest back to JetStream and exits 0; a new ingestor delivers everything once Kafka is back.
#[test]
fn sigterm_while_kafka_is_down_exits_in_time_and_loses_nothing() {
    serial(|| async {
        let mut s = Setup::new("sigterm", 1, &[("mqtt", 3), ("mqtt-dead-letter", 1)]).await;
        let extra = "[ingest]\nshutdown_timeout_secs = 2\n";
        let mut first = s.ingestor(1, "first", extra);
        assert_eq!(publish_all(&s.js, numbered(500, 10, "a"), 64).await, 500);
        wait_metric(&first, "acked_total", 500.0, Duration::from_secs(20)).await;
        s.tansu.kill();
        assert_eq!(publish_all(&s.js, numbered(500, 10, "b"), 64).await, 500);
        wait_metric(&first, "in_flight", 1.0, Duration::from_secs(10)).await;
        let started = Instant::now();
        let status = first.sigterm(Duration::from_secs(20));
        let took = started.elapsed();
        eprintln!("SIGTERM with Kafka down: {status:?} after {took:?}");
        assert!(status.success(), "{status:?}\n{}", first.log_tail());
        assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
        assert!(first.log_tail().contains("handed back to JetStream"));
        s.tansu.restart();
        let second = s.ingestor(1, "second", extra);
        let records = s.read("mqtt", 1000, Duration::from_secs(45)).await;
        let (distinct, dups) = dedup_stats(&records);
        eprintln!("after restart: {distinct} distinct of 1000, {dups} duplicates");
        assert_eq!(distinct, 1000, "{}", s.diagnostics(&[&first, &second]));
    });
}

#[test]
fn ingestor_killed_mid_stream_loses_nothing() {
    serial(|| async {
        let s = Setup::new("kill", 1, &[("mqtt", 3), ("mqtt-dead-letter", 1)]).await;
        let mut first = s.ingestor(1, "first", "");
        const N: usize = 3000;
        let publisher = publish_in_background(
            &s.js,
            numbered(N, 50, "kill"),
            100,
            Duration::from_millis(50),
        );
        wait_metric(&first, "acked_total", 600.0, Duration::from_secs(20)).await;
        first.sigkill();
        eprintln!("SIGKILLed the ingestor");
        let second = s.ingestor(1, "second", "");
        assert_eq!(publisher.await.expect("publisher"), N);
        let records = s.read("mqtt", N, Duration::from_secs(45)).await;
        let (distinct, dups) = dedup_stats(&records);
        eprintln!(
            "ingestor SIGKILL + restart: {distinct} distinct of {N}, {dups} duplicates, \
             restarted ingestor {:?}",
            second.metrics()
        );
        assert_eq!(distinct, N, "{}", s.diagnostics(&[&first, &second]));
    });
}

#[test]
fn poison_messages_go_to_the_dead_letter_topic() {
    serial(|| async {
        let s = Setup::new("poison", 1, &[("mqtt", 3), ("mqtt-dead-letter", 1)]).await;
        // A small client-side limit makes Kafka (librdkafka) refuse the large record.
        let ingestor = s.ingestor(
            1,
            "1",
            r#"
[kafka.client]
"message.max.bytes" = 20000
"batch.size" = 10000
"#,
        );
        assert_eq!(
            publish_all(&s.js, numbered(100, 10, "before"), 64).await,
            100
        );
        let big = vec![b'x'; 30_000];
        assert_eq!(
            publish_all(
                &s.js,
                vec![("big/one".to_owned(), envelope(1, "big"), big)],
                1
            )
            .await,
            1
        );
        // A body that is no envelope at all.
        s.js.publish(
            publish_subject("junk/one"),
            Bytes::from_static(b"\x07not an envelope"),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
        assert_eq!(
            publish_all(&s.js, numbered(100, 10, "after"), 64).await,
            100
        );

        let main = s.read("mqtt", 200, Duration::from_secs(30)).await;
        let dead = s.read("mqtt-dead-letter", 2, Duration::from_secs(30)).await;
        let diag = s.diagnostics(&[&ingestor]);
        assert_eq!(dedup_stats(&main).0, 200, "{diag}");
        assert_eq!(dead.len(), 2, "dead letters {dead:?}\n{diag}");
        let big = dead
            .iter()
            .find(|r| r.header_str("mqtt.topic").as_deref() == Some("big/one"))
            .expect("the large message is dead-lettered");
        let reason = big.header_str("jetmq.dlq.reason").expect("reason header");
        assert!(reason.to_lowercase().contains("too large"), "{reason}");
        assert_eq!(big.header_str("jetmq.dlq.topic").as_deref(), Some("mqtt"));
        assert_eq!(
            big.header_str("jetmq.dlq.truncated").as_deref(),
            Some("30000")
        );
        assert!(big.value.is_empty());
        let junk = dead
            .iter()
            .find(|r| r.header_str("mqtt.topic").is_none())
            .expect("the undecodable message is dead-lettered");
        assert_eq!(junk.value, b"\x07not an envelope");
        let reason = junk.header_str("jetmq.dlq.reason").expect("reason");
        assert!(reason.contains("envelope"), "{reason}");
        assert_eq!(
            junk.header_str("jetmq.dlq.subject").as_deref(),
            Some("jetmq.s.0.junk.one")
        );
        let m = wait_metric(&ingestor, "acked_total", 202.0, Duration::from_secs(10)).await;
        assert_eq!(m.get("dead_lettered_total"), Some(&2.0));
        assert_eq!(m.get("terminated_total"), Some(&0.0));
    });
}

#[test]
fn unusable_dead_letter_topic_terminates_instead_of_retrying_forever() {
    serial(|| async {
        let s = Setup::new("term", 1, &[("mqtt", 1)]).await;
        let ingestor = s.ingestor(
            1,
            "1",
            r#"
[routing]
dead_letter_topic = "no-such-topic"

[kafka.client]
"topic.metadata.propagation.max.ms" = 1000
"#,
        );
        s.js.publish(publish_subject("junk/x"), Bytes::from_static(b"junk"))
            .await
            .expect("publish")
            .await
            .expect("ack");
        assert_eq!(publish_all(&s.js, numbered(50, 5, "ok"), 64).await, 50);
        let main = s.read("mqtt", 50, Duration::from_secs(30)).await;
        assert_eq!(dedup_stats(&main).0, 50, "{}", s.diagnostics(&[&ingestor]));
        let m = wait_metric(&ingestor, "terminated_total", 1.0, Duration::from_secs(30)).await;
        assert_eq!(m.get("acked_total"), Some(&50.0), "{m:?}");
    });
}

#[test]
fn standby_takes_over_when_the_active_ingestor_dies() {
    serial(|| async {
        let s = Setup::new("standby", 1, &[("mqtt", 3), ("mqtt-dead-letter", 1)]).await;
        let a = s.ingestor(1, "a", "");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = s.ingestor(1, "b", "");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            publish_all(&s.js, numbered(1000, 20, "first"), 128).await,
            1000
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let (ma, mb) = loop {
            let (ma, mb) = (a.metrics(), b.metrics());
            let acked = |m: &HashMap<String, f64>| m.get("acked_total").copied().unwrap_or(0.0);
            if acked(&ma) + acked(&mb) >= 1000.0 {
                break (ma, mb);
            }
            assert!(Instant::now() < deadline, "{}", s.diagnostics(&[&a, &b]));
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("a: {ma:?}\nb: {mb:?}");
        let consumed = |m: &HashMap<String, f64>| m.get("consumed_total").copied().unwrap_or(0.0);
        // Exactly one of the two is active.
        assert!(
            (consumed(&ma) == 0.0) != (consumed(&mb) == 0.0),
            "one active, one standby: a {ma:?} b {mb:?}"
        );
        let (mut active, standby) = if consumed(&ma) > 0.0 { (a, b) } else { (b, a) };
        let publisher = publish_in_background(
            &s.js,
            numbered(2000, 20, "second"),
            100,
            Duration::from_millis(50),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        active.sigkill();
        eprintln!("SIGKILLed the active ingestor");
        assert_eq!(publisher.await.expect("publisher"), 2000);
        let records = s.read("mqtt", 3000, Duration::from_secs(45)).await;
        let (distinct, dups) = dedup_stats(&records);
        let ms = standby.metrics();
        eprintln!(
            "standby took over: {distinct} distinct of 3000, {dups} duplicates, standby {ms:?}"
        );
        assert_eq!(distinct, 3000, "{}", s.diagnostics(&[&active, &standby]));
        assert!(consumed(&ms) > 0.0);
    });
}

#[test]
fn three_node_cluster_with_r3_stream() {
    serial(|| async {
        let dir = temp_dir("cluster");
        let block = generate(1, Mode::Partition, None).expect("mapping");
        let mut nodes = nats_cluster(dir.path(), 3, &block);
        let tansu = Tansu::start(dir.path());
        tansu.create_topic("mqtt", 3);
        tansu.create_topic("mqtt-dead-letter", 1);
        let js = jetstream::new(connect(&nodes[1].url()).await);
        message_stream(&js, 3).await;
        let urls = nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let toml = ingestor_toml(&urls, &tansu.bootstrap(), "").replacen(
            "[nats]\n",
            "[nats]\nstream_replicas = 3\n",
            1,
        );
        let ingestor = IngestorProc::start(dir.path(), 1, "1", &toml);
        assert_eq!(publish_all(&js, numbered(1000, 20, "c1"), 128).await, 1000);
        wait_metric(&ingestor, "acked_total", 1000.0, Duration::from_secs(30)).await;
        // Lose one node (not the one the publisher uses); the flow goes on.
        let lost = nodes.remove(2);
        drop(lost);
        let published = tokio::time::timeout(
            Duration::from_secs(30),
            publish_all(&js, numbered(1000, 20, "c2"), 128),
        )
        .await
        .expect("publishing with one node down");
        assert_eq!(published, 1000);
        let records = read_until(&tansu.bootstrap(), "mqtt", 2000, Duration::from_secs(45)).await;
        let (distinct, dups) = dedup_stats(&records);
        eprintln!("cluster: {distinct} distinct of 2000, {dups} duplicates");
        assert_eq!(distinct, 2000, "{}\n{}", ingestor.log_tail(), tansu.log());
    });
}
