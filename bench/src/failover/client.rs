//! One failover client: a persistent session that publishes to its neighbour's topic,
//! receives from its own, and on losing its connection reconnects to the next address and
//! resumes its session (resending what was in flight), as the specification asks of a client.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use jetmq_codec::{Packet, PubResp, Publish, QoS, ReasonCode};
use tokio::sync::watch;

use super::{FailoverArgs, QosMix, Shared};
use crate::client::{Conn, ConnOpts, ReadOutcome};
use crate::common::{secs, Deadline};
use crate::payload::{self, Header};
use crate::scenario::{Connector, Phase};
use crate::stats::stamp;
use crate::topic;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK / PUBREC.
    Sent,
    /// PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

struct Inflight {
    seq: u64,
    packet_id: u16,
    qos: QoS,
    sent_ns: u64,
    stage: Stage,
}

pub(super) struct Client {
    idx: usize,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    opts: ConnOpts,
    filter: String,
    pub_topic: String,
    qos: QosMix,
    rate: f64,
    window: usize,
    payload: usize,
    seq: u64,
    next_due: Option<Instant>,
    inflight: VecDeque<Inflight>,
    /// Incoming QoS 2 packet ids between PUBREC and PUBREL (the client's session state).
    qos2_pending: HashSet<u16>,
    expected_publisher: u32,
    subscribed: bool,
    reconnect_delay: Duration,
    reconnect_jitter: f64,
    keepalive: Duration,
    puback_delay: Duration,
    /// PUBACKs held back by --puback-delay-ms: when they are due, and for which packet id.
    delayed_acks: VecDeque<(Instant, u16)>,
}

enum Event {
    Readable(std::io::Result<()>),
    Writable(std::io::Result<()>),
    Phase(bool),
    Wake,
}

impl Client {
    pub(super) fn new(
        idx: usize,
        args: &FailoverArgs,
        prefix: &str,
        run_id: &str,
        shared: Arc<Shared>,
        phase: watch::Receiver<Phase>,
    ) -> Client {
        let c = &args.common;
        let n = args.clients;
        let mut opts = c.conn_opts(idx, format!("{prefix}-f{idx}"), false);
        opts.session_expiry = Some(args.session_expiry);
        let peer = (idx + args.peer_offset) % n;
        // The client publishing to this one's topic.
        let publisher = (idx + n - args.peer_offset % n) % n;
        Client {
            idx,
            shared,
            phase,
            opts,
            filter: topic::expand(&args.topic, idx, 1, run_id),
            pub_topic: topic::expand(&args.topic, peer, 1, run_id),
            qos: args.qos,
            rate: args.rate,
            window: usize::from(args.window.max(1)),
            payload: args.payload,
            seq: 0,
            next_due: None,
            inflight: VecDeque::new(),
            qos2_pending: HashSet::new(),
            expected_publisher: publisher as u32,
            subscribed: false,
            reconnect_delay: secs(args.reconnect_delay),
            reconnect_jitter: args.reconnect_jitter.max(0.0),
            keepalive: Duration::from_secs(u64::from(c.keepalive)),
            puback_delay: Duration::from_millis(args.puback_delay_ms),
            delayed_acks: VecDeque::new(),
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Connects (counted by `connector`), then publishes and receives until the run closes,
    /// reconnecting whenever the connection is lost.
    pub(super) async fn run(mut self, connector: Connector, deadline: Deadline) {
        // First connection: to this client's own node (clients spread evenly), counted as a
        // set-up failure if it does not succeed.
        let first = connector.set_up(self.connect(true)).await;
        let mut conn = match first {
            Ok(conn) => conn,
            Err(e) => {
                self.shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                self.shared.errors.add(format!("setup: {e:#}"));
                return;
            }
        };
        let mut avoid: Vec<SocketAddr> = Vec::new();
        loop {
            self.shared.connected.fetch_add(1, Ordering::Relaxed);
            let r = self.drive(&mut conn).await;
            self.shared.connected.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => {
                    conn.disconnect().await;
                    return;
                }
                Err(e) => {
                    if self.phase() == Phase::Close {
                        return;
                    }
                    self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
                    self.shared.errors.add(format!("connection lost: {e:#}"));
                }
            }
            // Lost: wait, then try the other addresses until one takes us.
            let down_at = Instant::now();
            let down_ns = payload::instant_ns(down_at);
            self.shared.down.fetch_add(1, Ordering::Relaxed);
            let after_kill = {
                let k = self.shared.kill_ns.load(Ordering::Relaxed);
                k > 0 && down_ns >= k
            };
            if after_kill && !self.shared.down_since_kill[self.idx].swap(true, Ordering::Relaxed) {
                self.shared
                    .dropped_after_kill
                    .fetch_add(1, Ordering::Relaxed);
                let k = self.shared.kill_ns.load(Ordering::Relaxed);
                self.shared
                    .detection
                    .record_ns(self.idx, down_ns.saturating_sub(k));
            }
            avoid.clear();
            avoid.push(self.opts.target);
            let reconnected = loop {
                if self.phase() == Phase::Close || deadline.passed() {
                    break None;
                }
                let jitter = self.reconnect_jitter * fraction(self.idx, self.seq);
                tokio::time::sleep_until(
                    deadline
                        .cap(Instant::now() + self.reconnect_delay + secs(jitter))
                        .into(),
                )
                .await;
                self.opts.target = self.shared.next_target(&avoid);
                self.shared
                    .reconnect_attempts
                    .fetch_add(1, Ordering::Relaxed);
                match self.connect(false).await {
                    Ok(c) => break Some(c),
                    Err(e) => {
                        self.shared
                            .reconnect_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.shared.errors.add(format!("reconnect: {e:#}"));
                        avoid.push(self.opts.target);
                    }
                }
            };
            self.shared.down.fetch_sub(1, Ordering::Relaxed);
            match reconnected {
                Some(c) => {
                    conn = c;
                    self.shared
                        .outage
                        .record_ns(self.idx, down_at.elapsed().as_nanos() as u64);
                }
                None => return,
            }
        }
    }

    /// TCP connect, CONNECT, CONNACK; subscribes when there is no session (first time, or a
    /// session the broker lost), and resends what was in flight.
    async fn connect(&mut self, first: bool) -> Result<Conn> {
        let opened_at = Instant::now();
        let (mut conn, ack) = Conn::open(&self.opts).await?;
        let open_ns = opened_at.elapsed().as_nanos() as u64;
        // Held PUBACKs belonged to the old connection; the broker sends those messages again.
        self.delayed_acks.clear();
        let now = payload::now_ns();
        self.shared.bump(&self.shared.timeline.connacks, now, 1);
        if let Some(rm) = ack.properties.receive_maximum {
            self.window = self.window.min(usize::from(rm.max(1)));
        }
        if !first {
            let k = self.shared.kill_ns.load(Ordering::Relaxed);
            if self.shared.down_since_kill[self.idx].load(Ordering::Relaxed) && k > 0 {
                if ack.session_present {
                    self.shared
                        .resumed_after_kill
                        .fetch_add(1, Ordering::Relaxed);
                    self.shared.resume_connect.record_ns(self.idx, open_ns);
                    stamp(&self.shared.last_resume_ns, now);
                } else {
                    self.shared
                        .session_lost_after_kill
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.shared.down_since_kill[self.idx].store(false, Ordering::Relaxed);
            }
            if !ack.session_present {
                self.shared
                    .errors
                    .add("CONNACK without session present on reconnect");
                self.subscribed = false;
            }
        }
        if !self.subscribed {
            let filter = self.filter.clone();
            let timeout = self.opts.timeout;
            let reasons = conn
                .subscribe(
                    1,
                    std::slice::from_ref(&filter),
                    QoS::ExactlyOnce,
                    timeout,
                    |conn, packet| self.handle(conn, packet),
                )
                .await?;
            match reasons.first() {
                Some(r) if !r.is_error() => self.subscribed = true,
                Some(r) => bail!("SUBACK refused: 0x{:02x}", r.0),
                None => bail!("SUBACK without reason codes"),
            }
        }
        // The client's half of session resumption: resend in order.
        for f in &self.inflight {
            match f.stage {
                Stage::Sent => conn.queue(&Packet::Publish(self.publish_packet(
                    f.seq,
                    f.sent_ns,
                    f.qos,
                    f.packet_id,
                    true,
                )))?,
                Stage::Released => conn.queue(&Packet::PubRel(PubResp::new(
                    f.packet_id,
                    ReasonCode::SUCCESS,
                )))?,
            }
        }
        Ok(conn)
    }

    fn publish_packet(
        &self,
        seq: u64,
        sent_ns: u64,
        qos: QoS,
        packet_id: u16,
        dup: bool,
    ) -> Publish {
        Publish {
            dup,
            qos,
            retain: false,
            topic: self.pub_topic.clone(),
            packet_id,
            properties: Default::default(),
            payload: payload::encode(
                Header {
                    publisher: self.idx as u32,
                    seq,
                    sent_ns,
                },
                self.payload,
            ),
        }
    }

    /// The connection's loop. Ok: close cleanly (phase Close); Err: the connection is lost.
    async fn drive(&mut self, conn: &mut Conn) -> Result<()> {
        loop {
            let phase = self.phase();
            if phase == Phase::Close {
                return Ok(());
            }
            let now = Instant::now();
            let mut wake: Option<Instant> = None;
            while let Some(&(due, id)) = self.delayed_acks.front() {
                if due > now {
                    wake = Some(due);
                    break;
                }
                conn.queue(&Packet::PubAck(PubResp::new(id, ReasonCode::SUCCESS)))?;
                self.delayed_acks.pop_front();
            }
            if phase == Phase::Run && self.inflight.len() < self.window {
                let period = Duration::from_secs_f64(1.0 / self.rate);
                let due = *self.next_due.get_or_insert_with(|| {
                    // Spread the clients' schedules over one period.
                    now + period.mul_f64(fraction(self.idx, 0))
                });
                if due <= now {
                    self.publish_next(conn)?;
                    // Slots missed while disconnected or blocked are skipped, not caught up.
                    let next = due + period;
                    self.next_due = Some(if next + period < now { now } else { next });
                }
                wake = match (wake, self.next_due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            if !self.keepalive.is_zero() {
                let ping_at = conn.last_write + self.keepalive * 3 / 4;
                if now >= ping_at {
                    conn.queue(&Packet::PingReq)?;
                } else {
                    wake = Some(wake.map_or(ping_at, |w| w.min(ping_at)));
                }
            }
            conn.try_flush()?;
            let want_write = !conn.wbuf.is_empty();
            let sleep_to = wake.unwrap_or(now + Duration::from_secs(3600));
            let event = tokio::select! {
                r = conn.readable() => Event::Readable(r),
                r = conn.writable(), if want_write => Event::Writable(r),
                r = self.phase.changed() => Event::Phase(r.is_ok()),
                _ = tokio::time::sleep_until(sleep_to.into()) => Event::Wake,
            };
            match event {
                Event::Readable(r) => {
                    r?;
                    match conn.try_fill()? {
                        ReadOutcome::Eof => bail!("closed by broker"),
                        ReadOutcome::WouldBlock => {}
                        ReadOutcome::Data => {
                            while let Some(packet) = conn.next_packet()? {
                                self.handle(conn, packet)?;
                            }
                        }
                    }
                }
                Event::Writable(r) => r?,
                Event::Phase(true) | Event::Wake => {}
                Event::Phase(false) => return Ok(()),
            }
        }
    }

    fn publish_next(&mut self, conn: &mut Conn) -> Result<()> {
        let seq = self.seq;
        let qos = self.qos.for_seq(seq);
        let packet_id = (seq % 65535) as u16 + 1;
        let sent_ns = payload::now_ns();
        conn.queue(&Packet::Publish(
            self.publish_packet(seq, sent_ns, qos, packet_id, false),
        ))?;
        self.inflight.push_back(Inflight {
            seq,
            packet_id,
            qos,
            sent_ns,
            stage: Stage::Sent,
        });
        self.seq += 1;
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        self.shared.bump(&self.shared.timeline.sent, sent_ns, 1);
        Ok(())
    }

    fn handle(&mut self, conn: &mut Conn, packet: Packet) -> Result<()> {
        match packet {
            Packet::Publish(p) => self.on_publish(conn, p)?,
            Packet::PubRel(r) => conn.release(r.packet_id, &mut self.qos2_pending)?,
            Packet::PubAck(r) => self.on_ack(conn, r, QoS::AtLeastOnce, false)?,
            Packet::PubRec(r) => self.on_ack(conn, r, QoS::ExactlyOnce, false)?,
            Packet::PubComp(r) => self.on_ack(conn, r, QoS::ExactlyOnce, true)?,
            Packet::PingResp | Packet::SubAck(_) | Packet::UnsubAck(_) => {}
            Packet::Disconnect(d) => bail!("DISCONNECT from broker: 0x{:02x}", d.reason.0),
            other => bail!("unexpected {} from broker", other.name()),
        }
        Ok(())
    }

    fn on_publish(&mut self, conn: &mut Conn, p: Publish) -> Result<()> {
        if p.qos == QoS::AtLeastOnce && !self.puback_delay.is_zero() {
            let due = Instant::now() + self.puback_delay;
            self.delayed_acks.push_back((due, p.packet_id));
        } else if !conn.acknowledge(&p, &mut self.qos2_pending)? {
            return Ok(());
        }
        let now = payload::now_ns();
        let shared = &self.shared;
        shared.received.fetch_add(1, Ordering::Relaxed);
        shared.bump(&shared.timeline.received, now, 1);
        let Ok(mut st) = shared.stats[self.idx].lock() else {
            return Ok(());
        };
        let Some(h) = payload::decode(&p.payload) else {
            st.foreign += 1;
            return Ok(());
        };
        if h.publisher != self.expected_publisher {
            st.foreign += 1;
            return Ok(());
        }
        shared
            .latency
            .record_ns(self.idx, now.saturating_sub(h.sent_ns));
        if st.received.record(h.seq) {
            shared.unique_received.fetch_add(1, Ordering::Relaxed);
            // MQTT keeps order per topic and QoS: each QoS has its own high-water mark.
            let q = usize::from(p.qos == QoS::ExactlyOnce);
            match st.received_high[q] {
                Some(high) if h.seq < high => st.order_violations[q] += 1,
                _ => st.received_high[q] = Some(h.seq),
            }
        } else if p.qos == QoS::ExactlyOnce {
            st.dup_qos2 += 1;
        } else {
            st.dup_qos1 += 1;
        }
        Ok(())
    }

    fn on_ack(&mut self, conn: &mut Conn, r: PubResp, qos: QoS, comp: bool) -> Result<()> {
        let Some(pos) = self
            .inflight
            .iter()
            .position(|f| f.packet_id == r.packet_id && f.qos == qos)
        else {
            // A late answer to a message already finished on an earlier connection.
            self.shared
                .errors
                .add("acknowledgement for unknown packet id");
            return Ok(());
        };
        let entry = &mut self.inflight[pos];
        let done = match (qos, comp, entry.stage) {
            (QoS::AtLeastOnce, _, _) => true,
            (_, false, Stage::Sent) if r.reason.is_error() => true,
            (_, false, _) => {
                entry.stage = Stage::Released;
                conn.queue(&Packet::PubRel(PubResp::new(
                    r.packet_id,
                    ReasonCode::SUCCESS,
                )))?;
                false
            }
            (_, true, Stage::Released) => true,
            (_, true, Stage::Sent) => {
                self.shared.errors.add("PUBCOMP before PUBREC");
                return Ok(());
            }
        };
        if !done {
            return Ok(());
        }
        let Some(entry) = self.inflight.remove(pos) else {
            return Ok(());
        };
        // PUBCOMP carries no verdict on the message (it was taken at PUBREC); a PUBACK or
        // PUBREC with an error reason is a refusal.
        if r.reason.is_error() && !comp {
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            self.shared
                .errors
                .add(format!("publish refused: 0x{:02x}", r.reason.0));
            return Ok(());
        }
        if r.reason.is_error() {
            self.shared
                .errors
                .add(format!("PUBCOMP with reason 0x{:02x}", r.reason.0));
        }
        let now = payload::now_ns();
        self.shared.acked.fetch_add(1, Ordering::Relaxed);
        self.shared.bump(&self.shared.timeline.acked, now, 1);
        if let Ok(mut st) = self.shared.stats[self.idx].lock() {
            st.acked.record(entry.seq);
        }
        Ok(())
    }
}

/// A deterministic number in [0, 1) from a client index and a counter (golden-ratio spread).
fn fraction(idx: usize, k: u64) -> f64 {
    ((idx as f64 + k as f64 * 0.754_877_666) * 0.618_033_988_75).fract()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_in_unit_interval() {
        for i in 0..1000 {
            let f = fraction(i, i as u64 * 7);
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }
}
