//! One pubsub client connection: a subscriber, or a publisher sending as fast as its
//! windows allow (or at a fixed rate), each driven by one task through the run's phases.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use jetmq_codec::{Packet, PubResp, Publish, QoS, ReasonCode};
use tokio::sync::watch;

use super::{PubState, PubsubArgs, Shared};
use crate::client::{Conn, ConnOpts, ReadOutcome};
use crate::payload::{self, Header};
use crate::scenario::{Connector, Phase};
use crate::stats::stamp;

#[derive(Debug, Clone, Copy)]
pub(super) enum Role {
    Pub(usize),
    Sub(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sent,
    Released,
    Done,
}

struct Inflight {
    seq: u64,
    sent_ns: u64,
    stage: Stage,
}

/// The publishing half of a worker.
struct Publisher {
    idx: usize,
    qos: QoS,
    seq: u64,
    max: u64,
    window: usize,
    inflight: VecDeque<Inflight>,
    rate: f64,
    /// Offset of this publisher's schedule within one period, so that publishers at a fixed
    /// rate do not all fire at once.
    phase_offset: Duration,
    payload: usize,
    e2e_window: u64,
    e2e_allowed: u64,
    e2e_forgiven: u64,
    e2e_blocked_since: Option<Instant>,
}

pub(super) struct Worker {
    shared: Arc<Shared>,
    role: Role,
    publisher: Option<Publisher>,
    phase: watch::Receiver<Phase>,
    filter_qos: QoS,
    qos2_pending: HashSet<u16>,
    keepalive: Duration,
    connect_timeout: Duration,
}

enum Event {
    Readable(std::io::Result<()>),
    Writable(std::io::Result<()>),
    Phase(bool),
    Wake,
}

impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        role: Role,
        args: &PubsubArgs,
        phase: watch::Receiver<Phase>,
    ) -> Worker {
        let publisher = match role {
            Role::Pub(idx) => {
                let period = if args.rate > 0.0 {
                    1.0 / args.rate
                } else {
                    0.0
                };
                // Golden-ratio spread of start offsets over one period.
                let frac = (idx as f64 * 0.618_033_988_75).fract();
                Some(Publisher {
                    idx,
                    qos: shared.pub_qos,
                    seq: 0,
                    max: args.max_messages,
                    window: usize::from(args.window.max(1)),
                    inflight: VecDeque::new(),
                    rate: args.rate,
                    phase_offset: Duration::from_secs_f64(period * frac),
                    payload: args.payload,
                    e2e_window: args.e2e_window,
                    e2e_allowed: 0,
                    e2e_forgiven: 0,
                    e2e_blocked_since: None,
                })
            }
            Role::Sub(_) => None,
        };
        Worker {
            filter_qos: shared.sub_qos,
            shared,
            role,
            publisher,
            phase,
            qos2_pending: HashSet::new(),
            keepalive: Duration::from_secs(u64::from(args.common.keepalive)),
            connect_timeout: args.common.connect_timeout(),
        }
    }

    /// Connects (counted by `connector`), then drives the connection until the run closes.
    pub(super) async fn run(mut self, opts: ConnOpts, connector: Connector) {
        let conn = connector.set_up(self.setup(&opts)).await;
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                self.shared.connect_failed.fetch_add(1, Ordering::Relaxed);
                self.shared.errors.add(format!("setup: {e:#}"));
                return;
            }
        };
        self.set_alive(true);
        let result = self.drive(&mut conn).await;
        self.set_alive(false);
        match result {
            Ok(true) => conn.disconnect().await,
            Ok(false) => {}
            Err(e) => {
                self.shared.unexpected_close.fetch_add(1, Ordering::Relaxed);
                self.shared.errors.add(format!("{e:#}"));
            }
        }
    }

    fn set_alive(&self, v: bool) {
        match self.role {
            Role::Pub(i) => self.shared.pubs[i].alive.store(v, Ordering::Relaxed),
            Role::Sub(i) => self.shared.subs[i].alive.store(v, Ordering::Relaxed),
        }
    }

    async fn setup(&mut self, opts: &ConnOpts) -> Result<Conn> {
        let (mut conn, ack) = Conn::open(opts).await?;
        self.shared.connected.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &mut self.publisher {
            if let Some(rm) = ack.properties.receive_maximum {
                p.window = p.window.min(usize::from(rm));
            }
        }
        if let Role::Sub(s) = self.role {
            let filter = self.shared.subs[s].filter.clone();
            let reasons = conn
                .subscribe(
                    1,
                    std::slice::from_ref(&filter),
                    self.filter_qos,
                    self.connect_timeout,
                    |conn, packet| self.handle(conn, packet),
                )
                .await?;
            match reasons.first() {
                Some(r) if !r.is_error() => {}
                Some(r) => bail!("SUBACK refused: 0x{:02x}", r.0),
                None => bail!("SUBACK without reason codes"),
            }
        }
        Ok(conn)
    }

    /// The connection's loop. Ok(true): close cleanly; Ok(false): the peer closed.
    async fn drive(&mut self, conn: &mut Conn) -> Result<bool> {
        loop {
            let phase = *self.phase.borrow();
            if phase == Phase::Close {
                return Ok(true);
            }
            let now = Instant::now();
            let mut wake: Option<Instant> = None;
            let mut again = false;
            let mut write_full = false;
            if phase == Phase::Run {
                if let Some(p) = &mut self.publisher {
                    match p.fill(conn, &self.shared, now)? {
                        Fill::Blocked => {}
                        Fill::WriteFull => write_full = true,
                        Fill::At(t) => wake = Some(t),
                        Fill::Again => again = true,
                    }
                }
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
            if write_full && conn.wbuf.len() < MAX_WBUF {
                again = true;
            }
            let want_write = !conn.wbuf.is_empty();
            let sleep_to = wake.unwrap_or(now + Duration::from_secs(3600));
            let event = tokio::select! {
                r = conn.readable() => Event::Readable(r),
                r = conn.writable(), if want_write => Event::Writable(r),
                r = self.phase.changed() => Event::Phase(r.is_ok()),
                _ = tokio::time::sleep_until(sleep_to.into()), if wake.is_some() => Event::Wake,
                _ = tokio::task::yield_now(), if again => Event::Wake,
            };
            match event {
                Event::Readable(r) => {
                    r?;
                    match conn.try_fill()? {
                        ReadOutcome::Eof => {
                            if *self.phase.borrow() != Phase::Close {
                                bail!("connection closed by broker");
                            }
                            return Ok(false);
                        }
                        ReadOutcome::WouldBlock => {}
                        ReadOutcome::Data => {
                            while let Some(packet) = conn.next_packet()? {
                                self.handle(conn, packet)?;
                            }
                        }
                    }
                }
                Event::Writable(r) => r?,
                Event::Phase(true) => {}
                Event::Phase(false) => return Ok(true),
                Event::Wake => {}
            }
        }
    }

    fn handle(&mut self, conn: &mut Conn, packet: Packet) -> Result<()> {
        match packet {
            Packet::Publish(p) => self.on_publish(conn, p)?,
            Packet::PubRel(r) => conn.release(r.packet_id, &mut self.qos2_pending)?,
            Packet::PubAck(r) => self.on_ack(conn, r, AckKind::Ack)?,
            Packet::PubRec(r) => self.on_ack(conn, r, AckKind::Rec)?,
            Packet::PubComp(r) => self.on_ack(conn, r, AckKind::Comp)?,
            Packet::PingResp | Packet::SubAck(_) | Packet::UnsubAck(_) => {}
            Packet::Disconnect(d) => bail!("DISCONNECT from broker: 0x{:02x}", d.reason.0),
            other => bail!("unexpected {} from broker", other.name()),
        }
        Ok(())
    }

    fn on_publish(&mut self, conn: &mut Conn, p: Publish) -> Result<()> {
        if !conn.acknowledge(&p, &mut self.qos2_pending)? {
            return Ok(());
        }
        let Role::Sub(s) = self.role else {
            return Ok(());
        };
        let now = payload::now_ns();
        let shared = &self.shared;
        let sub = &shared.subs[s];
        shared.received.fetch_add(1, Ordering::Relaxed);
        sub.received.fetch_add(1, Ordering::Relaxed);
        shared.first_recv_ns.fetch_min(now, Ordering::Relaxed);
        stamp(&shared.last_recv_ns, now);
        let Some(h) = payload::decode(&p.payload) else {
            sub.foreign.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        shared.latency.record_ns(s, now.saturating_sub(h.sent_ns));
        let fresh = match sub.trackers.lock() {
            Ok(mut t) => t.entry(h.publisher).or_default().record(h.seq),
            Err(_) => true,
        };
        if fresh {
            match sub.e2e.get(&h.publisher) {
                Some(cell) => {
                    cell.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    sub.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, conn: &mut Conn, r: PubResp, kind: AckKind) -> Result<()> {
        let Some(p) = &mut self.publisher else {
            bail!("acknowledgement on a subscriber connection");
        };
        let Some(front) = p.inflight.front().map(|f| f.seq) else {
            self.shared
                .errors
                .add(format!("{kind:?} for unknown packet id"));
            return Ok(());
        };
        // Packet ids are seq mod 65535 + 1 and the window is below 65535, so the id names
        // exactly one in-flight entry.
        let off = (u64::from(r.packet_id.wrapping_sub(1)) + 65535 - front % 65535) % 65535;
        let Some(entry) = p.inflight.get_mut(off as usize) else {
            self.shared
                .errors
                .add(format!("{kind:?} for unknown packet id"));
            return Ok(());
        };
        let ps = &self.shared.pubs[p.idx];
        let mut done = false;
        match (p.qos, kind) {
            (QoS::AtLeastOnce, AckKind::Ack) | (QoS::ExactlyOnce, AckKind::Comp) => {
                done = true;
            }
            (QoS::ExactlyOnce, AckKind::Rec) => {
                if r.reason.is_error() {
                    done = true;
                } else {
                    entry.stage = Stage::Released;
                    conn.queue(&Packet::PubRel(PubResp::new(
                        r.packet_id,
                        ReasonCode::SUCCESS,
                    )))?;
                }
            }
            _ => {
                self.shared
                    .errors
                    .add(format!("{kind:?} does not fit QoS {}", p.qos as u8));
            }
        }
        if done && entry.stage != Stage::Done {
            entry.stage = Stage::Done;
            if r.reason.is_error() {
                ps.rejected.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .errors
                    .add(format!("{kind:?} with reason 0x{:02x}", r.reason.0));
            } else {
                let now = payload::now_ns();
                ps.acked.fetch_add(1, Ordering::Relaxed);
                stamp(&self.shared.last_ack_ns, now);
                self.shared
                    .ack_latency
                    .record_ns(p.idx, now.saturating_sub(entry.sent_ns));
            }
            while p.inflight.front().is_some_and(|f| f.stage == Stage::Done) {
                p.inflight.pop_front();
            }
            let prefix = p.inflight.front().map_or(p.seq, |f| f.seq);
            ps.acked_prefix.store(prefix, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum AckKind {
    /// PUBACK
    Ack,
    /// PUBREC
    Rec,
    /// PUBCOMP
    Comp,
}

enum Fill {
    /// Nothing to do until an ack arrives (or the publisher is finished).
    Blocked,
    /// The write buffer is full: continue once the socket took some of it.
    WriteFull,
    /// Next publish is due then.
    At(Instant),
    /// More could be sent right away (yielded to let acks in).
    Again,
}

const MAX_WBUF: usize = 64 * 1024;
const BATCH: usize = 64;

impl Publisher {
    fn fill(&mut self, conn: &mut Conn, shared: &Shared, now: Instant) -> Result<Fill> {
        let ps = &shared.pubs[self.idx];
        for _ in 0..BATCH {
            if self.seq >= self.max {
                return Ok(Fill::Blocked);
            }
            if conn.wbuf.len() >= MAX_WBUF {
                return Ok(Fill::WriteFull);
            }
            if self.qos != QoS::AtMostOnce && self.inflight.len() >= self.window {
                return Ok(Fill::Blocked);
            }
            if self.e2e_blocked(ps, now) {
                return Ok(Fill::At(now + Duration::from_millis(1)));
            }
            if self.rate > 0.0 {
                let run_start = payload::ns_to_instant(shared.run_start_ns.load(Ordering::Relaxed));
                let due = run_start
                    + self.phase_offset
                    + Duration::from_secs_f64(self.seq as f64 / self.rate);
                if due > now {
                    return Ok(Fill::At(due));
                }
            }
            self.publish_one(conn, ps)?;
        }
        Ok(Fill::Again)
    }

    fn e2e_blocked(&mut self, ps: &PubState, now: Instant) -> bool {
        if self.e2e_window == 0 || ps.e2e.is_empty() || self.seq < self.e2e_allowed {
            return false;
        }
        let slowest = ps
            .e2e
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        self.e2e_allowed = slowest + self.e2e_forgiven + self.e2e_window;
        if self.seq < self.e2e_allowed {
            self.e2e_blocked_since = None;
            return false;
        }
        let since = *self.e2e_blocked_since.get_or_insert(now);
        if now.duration_since(since) > Duration::from_secs(2) {
            // A subscriber stopped receiving (loss or stall): give up on those messages.
            ps.e2e_stalls.fetch_add(1, Ordering::Relaxed);
            self.e2e_forgiven = self.seq.saturating_sub(slowest);
            self.e2e_allowed = slowest + self.e2e_forgiven + self.e2e_window;
            self.e2e_blocked_since = None;
            return false;
        }
        true
    }

    fn publish_one(&mut self, conn: &mut Conn, ps: &PubState) -> Result<()> {
        let seq = self.seq;
        let sent_ns = payload::now_ns();
        let payload = payload::encode(
            Header {
                publisher: self.idx as u32,
                seq,
                sent_ns,
            },
            self.payload,
        );
        let packet_id = if self.qos == QoS::AtMostOnce {
            0
        } else {
            (seq % 65535) as u16 + 1
        };
        conn.queue(&Packet::Publish(Publish {
            dup: false,
            qos: self.qos,
            retain: false,
            topic: ps.topic.clone(),
            packet_id,
            properties: Default::default(),
            payload,
        }))?;
        if self.qos != QoS::AtMostOnce {
            self.inflight.push_back(Inflight {
                seq,
                sent_ns,
                stage: Stage::Sent,
            });
        }
        self.seq += 1;
        ps.sent.store(self.seq, Ordering::Relaxed);
        if self.qos == QoS::AtMostOnce || self.inflight.len() == 1 {
            let prefix = self.inflight.front().map_or(self.seq, |f| f.seq);
            ps.acked_prefix.store(prefix, Ordering::Relaxed);
        }
        Ok(())
    }
}
