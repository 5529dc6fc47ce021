//! Token buckets: the node-wide CONNECT rate, per-source-address connection limits and
//! per-connection read limits.
//!
//! Per-connection limits delay *reading* instead of disconnecting: once a connection has
//! used up its PUBLISH or byte budget, its socket is not read until the budget has grown
//! back, so TCP flow control slows the client down. A connection that is not read cannot
//! cost the node anything but its socket, and no well-behaved client is ever cut off for a
//! burst.
//!
//! The per-user budget is the same pair of buckets shared by every connection of one
//! username on this node ([`UserBudgets`]): a user who opens many connections gets no more
//! than one user's rate in all. It is attached once CONNECT is authenticated; until then
//! only the connection's own budget applies.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// A classic token bucket. Tokens may go negative ("debt"): whoever took them waits until
/// the debt is paid back, which keeps the long-run rate exact even when one read brings
/// in a large batch.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// `rate` tokens per second, at most `capacity` saved up (the burst).
    pub fn new(rate: f64, capacity: f64) -> Bucket {
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True when the bucket has refilled completely: it is as good as a new one.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }

    /// Tokens available now (negative: debt).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Takes `n` tokens, going into debt if needed.
    pub fn charge(&mut self, now: Instant, n: f64) {
        self.refill(now);
        self.tokens -= n;
    }

    /// How long until the debt is paid, if there is one.
    pub fn debt_delay(&self) -> Option<Duration> {
        if self.tokens >= 0.0 {
            return None;
        }
        let secs = -self.tokens / self.rate;
        // Bounded, so that a huge charge cannot produce an absurd Duration.
        Some(Duration::from_secs_f64(secs.min(3600.0)))
    }
}

/// The node-wide limit on new connections per second (shared by all listeners).
#[derive(Debug)]
pub struct ConnectRate {
    bucket: Option<Mutex<Bucket>>,
}

impl ConnectRate {
    /// `per_second` = 0 disables the limit. The burst is one second's worth.
    pub fn new(per_second: u32) -> ConnectRate {
        ConnectRate {
            bucket: (per_second > 0).then(|| {
                let rate = f64::from(per_second);
                Mutex::new(Bucket::new(rate, rate))
            }),
        }
    }

    /// True if one more connection may start now.
    pub fn admit(&self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> bool {
        match &self.bucket {
            None => true,
            Some(bucket) => bucket.lock().try_take(now),
        }
    }
}

/// Per-source-address limits: connections open at once and new connections per second
/// from one address (`limits.max_connections_per_ip`, `limits.max_connect_rate_per_ip`).
///
/// An IPv6 client is counted by its /64 (one subscriber line or host usually gets a whole
/// /64, so counting single addresses would be no limit at all); an IPv4-mapped IPv6 address
/// counts as its IPv4 address.
///
/// Memory: an address has an entry while it has connections open or its rate bucket is not
/// full again (at most one second after its last new connection). Entries are removed when
/// their last connection closes with a full bucket, and the others are swept whenever the
/// table has doubled since the last sweep, so the table holds at most about twice the
/// addresses with open connections (bounded by `limits.max_connections`) plus those that
/// connected in the last second.
#[derive(Debug)]
pub struct PerIp {
    max_connections: usize,
    rate: u32,
    table: Mutex<PerIpTable>,
}

#[derive(Debug, Default)]
struct PerIpTable {
    entries: HashMap<IpAddr, PerIpEntry>,
    /// Sweep when the table grows beyond this.
    sweep_at: usize,
}

#[derive(Debug)]
struct PerIpEntry {
    open: usize,
    bucket: Option<Bucket>,
}

/// Smallest table size that triggers a sweep.
const PER_IP_MIN_SWEEP: usize = 1024;

/// Why [`PerIp::admit`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerIpRefusal {
    /// `limits.max_connections_per_ip` connections are open from this address.
    TooMany,
    /// Over `limits.max_connect_rate_per_ip`.
    TooFast,
}

/// Holds one connection's place in its address's count; gives it back when dropped.
#[derive(Debug)]
pub struct PerIpGuard {
    limits: Arc<PerIp>,
    key: IpAddr,
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        self.limits.release(self.key, Instant::now());
    }
}

/// The address a client is counted under: IPv4 as is, IPv6 by its /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

impl PerIp {
    /// None when both limits are off (0).
    pub fn new(max_connections: usize, per_second: u32) -> Option<Arc<PerIp>> {
        if max_connections == 0 && per_second == 0 {
            return None;
        }
        Some(Arc::new(PerIp {
            max_connections,
            rate: per_second,
            table: Mutex::new(PerIpTable {
                entries: HashMap::new(),
                sweep_at: PER_IP_MIN_SWEEP,
            }),
        }))
    }

    /// Counts one more connection from `ip`, or says why it may not open.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<PerIpGuard, PerIpRefusal> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<PerIpGuard, PerIpRefusal> {
        let key = ip_key(ip);
        let mut table = self.table.lock();
        if !table.entries.contains_key(&key) && table.entries.len() >= table.sweep_at {
            table.sweep(now);
        }
        let rate = self.rate;
        let entry = table.entries.entry(key).or_insert_with(|| PerIpEntry {
            open: 0,
            bucket: (rate > 0).then(|| Bucket::new(f64::from(rate), f64::from(rate))),
        });
        let verdict = if self.max_connections > 0 && entry.open >= self.max_connections {
            Err(PerIpRefusal::TooMany)
        } else if entry.bucket.as_mut().is_some_and(|b| !b.try_take(now)) {
            Err(PerIpRefusal::TooFast)
        } else {
            entry.open += 1;
            Ok(())
        };
        if verdict.is_err()
            && entry.open == 0
            && entry.bucket.as_mut().is_none_or(|b| b.is_full(now))
        {
            table.entries.remove(&key);
        }
        verdict.map(|()| PerIpGuard {
            limits: self.clone(),
            key,
        })
    }

    fn release(&self, key: IpAddr, now: Instant) {
        let mut table = self.table.lock();
        let Some(entry) = table.entries.get_mut(&key) else {
            return;
        };
        entry.open = entry.open.saturating_sub(1);
        if entry.open == 0 && entry.bucket.as_mut().is_none_or(|b| b.is_full(now)) {
            table.entries.remove(&key);
        }
    }

    /// Addresses tracked now (for tests and the bound above).
    pub fn tracked(&self) -> usize {
        self.table.lock().entries.len()
    }
}

impl PerIpTable {
    /// Drops entries that no longer limit anything: no connection open and a full bucket.
    fn sweep(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| e.open > 0 || e.bucket.as_mut().is_some_and(|b| !b.is_full(now)));
        self.sweep_at = (self.entries.len() * 2).max(PER_IP_MIN_SWEEP);
    }
}

/// Finds where MQTT packets start in a byte stream, to count PUBLISH packets before the
/// decoder sees them. It only reads fixed headers and skips bodies without buffering.
#[derive(Debug, Default)]
pub struct PacketScanner {
    state: Scan,
}

#[derive(Debug, Default)]
enum Scan {
    #[default]
    Header,
    Length {
        value: u64,
        shift: u32,
    },
    Body {
        remaining: u64,
    },
    /// The stream is not valid MQTT; the decoder will close the connection.
    Lost,
}

const PUBLISH: u8 = 3;

impl PacketScanner {
    /// Feeds bytes; returns how many PUBLISH packets started in them.
    pub fn scan(&mut self, mut bytes: &[u8]) -> u64 {
        let mut publishes = 0;
        while !bytes.is_empty() {
            match &mut self.state {
                Scan::Header => {
                    if bytes[0] >> 4 == PUBLISH {
                        publishes += 1;
                    }
                    bytes = &bytes[1..];
                    self.state = Scan::Length { value: 0, shift: 0 };
                }
                Scan::Length { value, shift } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    *value |= u64::from(b & 0x7f) << *shift;
                    if b & 0x80 == 0 {
                        self.state = if *value == 0 {
                            Scan::Header
                        } else {
                            Scan::Body { remaining: *value }
                        };
                    } else if *shift >= 21 {
                        self.state = Scan::Lost;
                    } else {
                        *shift += 7;
                    }
                }
                Scan::Body { remaining } => {
                    let skip = (*remaining).min(bytes.len() as u64);
                    // `skip` <= bytes.len(), so the cast back cannot truncate.
                    bytes = &bytes[skip as usize..];
                    *remaining -= skip;
                    if *remaining == 0 {
                        self.state = Scan::Header;
                    }
                }
                Scan::Lost => break,
            }
        }
        publishes
    }
}

/// Smallest read while a byte rate applies.
pub const MIN_LIMITED_READ: usize = 512;
/// Largest read while a byte rate applies (the size of the bounce buffer).
pub const MAX_LIMITED_READ: usize = 8192;

/// The read budget all connections of one username on this node share.
#[derive(Debug)]
pub struct UserBudget {
    publishes: Option<Mutex<Bucket>>,
    bytes: Option<Mutex<Bucket>>,
}

impl UserBudget {
    /// Charges what one of the user's connections read; returns how long it waits.
    fn charge(&self, now: Instant, bytes: f64, publishes: f64) -> Option<Duration> {
        let charge = |bucket: &Option<Mutex<Bucket>>, n: f64| {
            bucket.as_ref().and_then(|b| {
                let mut b = b.lock();
                b.charge(now, n);
                b.debt_delay()
            })
        };
        charge(&self.bytes, bytes).max(charge(&self.publishes, publishes))
    }
}

/// The node's per-username budgets (`limits.max_user_publish_rate`,
/// `limits.max_user_inbound_bytes_rate`). An entry lives as long as one of the user's
/// connections holds it, so the table is bounded by the open connections: dead entries are
/// swept whenever it has doubled since the last sweep.
#[derive(Debug)]
pub struct UserBudgets {
    publish_rate: u32,
    bytes_rate: u64,
    table: Mutex<UserTable>,
}

#[derive(Debug, Default)]
struct UserTable {
    budgets: HashMap<String, Weak<UserBudget>>,
    sweep_at: usize,
}

/// Entries below which the table is not swept.
const USER_TABLE_MIN_SWEEP: usize = 1024;

impl UserBudgets {
    pub fn new(publish_rate: u32, bytes_rate: u64) -> UserBudgets {
        UserBudgets {
            publish_rate,
            bytes_rate,
            table: Mutex::new(UserTable::default()),
        }
    }

    /// Whether any per-user limit is set.
    pub fn enabled(&self) -> bool {
        self.publish_rate > 0 || self.bytes_rate > 0
    }

    /// The budget of `username`, shared with its other connections on this node.
    pub fn budget(&self, username: &str) -> Option<Arc<UserBudget>> {
        if !self.enabled() {
            return None;
        }
        let mut table = self.table.lock();
        if let Some(budget) = table.budgets.get(username).and_then(Weak::upgrade) {
            return Some(budget);
        }
        if table.budgets.len() >= table.sweep_at.max(USER_TABLE_MIN_SWEEP) {
            table.budgets.retain(|_, budget| budget.strong_count() > 0);
            table.sweep_at = table.budgets.len() * 2;
        }
        // One second's worth of burst, as for a connection.
        let bucket = |rate: f64| (rate > 0.0).then(|| Mutex::new(Bucket::new(rate, rate)));
        let budget = Arc::new(UserBudget {
            publishes: bucket(f64::from(self.publish_rate)),
            bytes: bucket(self.bytes_rate as f64),
        });
        table
            .budgets
            .insert(username.to_owned(), Arc::downgrade(&budget));
        Some(budget)
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.table.lock().budgets.len()
    }
}

/// Where a connection's per-user budget goes once its username is known (set at most once,
/// by the CONNECT handling, read by the connection's reads).
pub type UserSlot = Arc<OnceLock<Arc<UserBudget>>>;

/// Per-connection read budget: PUBLISH packets per second and bytes per second, and the
/// user's shared budget once attached.
#[derive(Debug)]
pub struct ReadLimiter {
    publishes: Option<Bucket>,
    bytes: Option<Bucket>,
    scanner: PacketScanner,
    user: Option<UserSlot>,
}

impl ReadLimiter {
    /// None when both limits are off (0).
    pub fn new(publishes_per_second: u32, bytes_per_second: u64) -> Option<ReadLimiter> {
        Self::with_user(publishes_per_second, bytes_per_second, None)
    }

    /// With `user`, the per-user budget put there later applies too. None when no limit
    /// is on at all.
    pub fn with_user(
        publishes_per_second: u32,
        bytes_per_second: u64,
        user: Option<UserSlot>,
    ) -> Option<ReadLimiter> {
        if publishes_per_second == 0 && bytes_per_second == 0 && user.is_none() {
            return None;
        }
        Some(ReadLimiter {
            user,
            publishes: (publishes_per_second > 0).then(|| {
                let rate = f64::from(publishes_per_second);
                Bucket::new(rate, rate)
            }),
            bytes: (bytes_per_second > 0).then(|| {
                let rate = bytes_per_second as f64;
                Bucket::new(rate, rate)
            }),
            scanner: PacketScanner::default(),
        })
    }

    /// How many bytes the next read may bring in, of `want`: all of it within the budget;
    /// else no more than the budget (but at least [`MIN_LIMITED_READ`], at most
    /// [`MAX_LIMITED_READ`]), so a large packet is read at the rate rather than in one go.
    pub fn allowance(&mut self, want: usize) -> usize {
        let Some(bytes) = &mut self.bytes else {
            return want;
        };
        let budget = bytes.available(Instant::now()).max(MIN_LIMITED_READ as f64);
        if budget >= want as f64 {
            // Within budget: the whole read, straight into the caller's buffer (the limits
            // are on by default, so the usual case must cost nothing extra).
            return want;
        }
        // `budget` is at least MIN_LIMITED_READ and capped below, so the cast is exact enough.
        want.min(budget.min(MAX_LIMITED_READ as f64) as usize)
    }

    /// True when reads have to be cut to [`ReadLimiter::allowance`].
    pub fn limits_bytes(&self) -> bool {
        self.bytes.is_some()
    }

    /// Accounts for bytes just read; returns how long to wait before reading again.
    pub fn account(&mut self, data: &[u8]) -> Option<Duration> {
        self.account_at(Instant::now(), data)
    }

    fn account_at(&mut self, now: Instant, data: &[u8]) -> Option<Duration> {
        if data.is_empty() {
            return None;
        }
        let mut delay: Option<Duration> = None;
        if let Some(bytes) = &mut self.bytes {
            bytes.charge(now, data.len() as f64);
            delay = bytes.debt_delay();
        }
        let user = self.user.as_ref().and_then(|slot| slot.get());
        let n = if self.publishes.is_some() || user.is_some() {
            self.scanner.scan(data)
        } else {
            0
        };
        if let Some(publishes) = &mut self.publishes {
            // Charging 0 still brings the bucket up to date.
            publishes.charge(now, n as f64);
            delay = delay.max(publishes.debt_delay());
        }
        if let Some(user) = user {
            delay = delay.max(user.charge(now, data.len() as f64, n as f64));
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_counts_publishes_across_chunk_boundaries() {
        // PUBLISH qos0 "a" payload "xy": 30 05 00 01 61 78 79; PINGREQ: c0 00;
        // PUBLISH with a 200-byte body (two length bytes).
        let mut stream = vec![0x30, 0x05, 0x00, 0x01, b'a', b'x', b'y', 0xc0, 0x00];
        stream.extend([0x32, 0xc8, 0x01]);
        stream.extend(std::iter::repeat_n(0u8, 200));
        stream.extend([0x30, 0x00]);
        for chunk in [1, 2, 3, 7, 64, 1000] {
            let mut scanner = PacketScanner::default();
            let n: u64 = stream.chunks(chunk).map(|c| scanner.scan(c)).sum();
            assert_eq!(n, 3, "chunk size {chunk}");
        }
    }

    #[test]
    fn scanner_gives_up_on_garbage_lengths() {
        let mut scanner = PacketScanner::default();
        assert_eq!(
            scanner.scan(&[0x30, 0xff, 0xff, 0xff, 0xff, 0xff, 0x30, 0x00]),
            1
        );
        assert_eq!(scanner.scan(&[0x30, 0x00]), 0);
    }

    #[test]
    fn publish_debt_is_paid_back_at_the_rate() {
        let mut limiter = ReadLimiter::new(10, 0).expect("limited");
        let start = Instant::now();
        // 10 publishes are the burst; 20 more are 2 s of debt.
        let many: Vec<u8> = [0x30u8, 0x00].iter().copied().cycle().take(60).collect();
        let delay = limiter.account_at(start, &many).expect("in debt");
        assert!(
            delay > Duration::from_millis(1990) && delay <= Duration::from_secs(2),
            "{delay:?}"
        );
        // PINGREQ costs no publish token; after the delay the debt is gone.
        assert_eq!(limiter.account_at(start + delay, &[0xc0, 0x00]), None);
    }

    #[test]
    fn byte_rate_delays_by_the_excess() {
        let mut limiter = ReadLimiter::new(0, 1000).expect("limited");
        let start = Instant::now();
        assert_eq!(limiter.account_at(start, &[0u8; 1000]), None);
        let delay = limiter.account_at(start, &[0u8; 500]).expect("in debt");
        assert!(delay > Duration::from_millis(490) && delay <= Duration::from_millis(500));
        assert!(ReadLimiter::new(0, 0).is_none());
        let mut fresh = ReadLimiter::new(0, 100_000).expect("limited");
        assert_eq!(fresh.allowance(100), 100);
        assert_eq!(fresh.allowance(1 << 20), MAX_LIMITED_READ);
        let mut slow = ReadLimiter::new(0, 10).expect("limited");
        assert_eq!(slow.allowance(1 << 20), MIN_LIMITED_READ);
        assert_eq!(
            ReadLimiter::new(5, 0).expect("limited").allowance(77_777),
            77_777
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn per_ip_count_is_per_address_and_given_back() {
        let limits = PerIp::new(2, 0).expect("on");
        let a1 = limits.admit(ip("127.0.0.2")).expect("first");
        let a2 = limits.admit(ip("127.0.0.2")).expect("second");
        assert_eq!(
            limits.admit(ip("127.0.0.2")).unwrap_err(),
            PerIpRefusal::TooMany
        );
        // Another address is not affected; an IPv4-mapped address is the same IPv4 one.
        let b = limits.admit(ip("127.0.0.3")).expect("other address");
        assert_eq!(
            limits.admit(ip("::ffff:127.0.0.2")).unwrap_err(),
            PerIpRefusal::TooMany
        );
        drop(a1);
        let a3 = limits
            .admit(ip("127.0.0.2"))
            .expect("a place was given back");
        assert_eq!(limits.tracked(), 2);
        drop((a2, a3, b));
        assert_eq!(
            limits.tracked(),
            0,
            "entries go when their count drops to 0"
        );
        assert!(PerIp::new(0, 0).is_none());
    }

    #[test]
    fn per_ip_ipv6_counts_by_slash_64() {
        let limits = PerIp::new(1, 0).expect("on");
        let _a = limits.admit(ip("2001:db8:1:2::1")).expect("first");
        assert!(limits.admit(ip("2001:db8:1:2:ffff::9")).is_err());
        assert!(limits.admit(ip("2001:db8:1:3::1")).is_ok());
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn per_ip_rate_refuses_beyond_the_burst_and_forgets_idle_addresses() {
        let limits = PerIp::new(0, 3).expect("on");
        let start = Instant::now();
        let addr = ip("10.0.0.1");
        let admitted: Vec<_> = (0..5)
            .filter_map(|_| limits.admit_at(addr, start).ok())
            .collect();
        assert_eq!(admitted.len(), 3);
        assert_eq!(
            limits.admit_at(addr, start).unwrap_err(),
            PerIpRefusal::TooFast
        );
        assert!(limits.admit_at(ip("10.0.0.2"), start).is_ok());
        drop(admitted);
        // Refilled after a second: admitted again.
        assert!(limits
            .admit_at(addr, start + Duration::from_millis(1100))
            .is_ok());
        // Many one-off addresses: the table is swept, not grown without bound.
        let later = start + Duration::from_secs(10);
        for i in 0..(PER_IP_MIN_SWEEP as u32 * 8) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            drop(limits.admit_at(a, later + Duration::from_secs(u64::from(i))));
        }
        assert!(
            limits.tracked() <= PER_IP_MIN_SWEEP + 1,
            "{}",
            limits.tracked()
        );
    }

    #[test]
    fn connect_rate_refuses_beyond_the_burst_and_recovers() {
        let rate = ConnectRate::new(5);
        let start = Instant::now();
        assert_eq!((0..10).filter(|_| rate.admit_at(start)).count(), 5);
        let later = start + Duration::from_millis(400);
        assert_eq!((0..10).filter(|_| rate.admit_at(later)).count(), 2);
        assert!(ConnectRate::new(0).admit());
    }

    #[test]
    fn connections_of_one_user_share_its_budget_and_the_table_forgets_closed_ones() {
        let budgets = UserBudgets::new(10, 0);
        let start = Instant::now();
        let slot = |name: &str| {
            let slot: UserSlot = Arc::default();
            let _ = slot.set(budgets.budget(name).expect("enabled"));
            slot
        };
        let mut a = ReadLimiter::with_user(0, 0, Some(slot("alice"))).expect("limited");
        let mut b = ReadLimiter::with_user(0, 0, Some(slot("alice"))).expect("limited");
        let mut c = ReadLimiter::with_user(0, 0, Some(slot("carol"))).expect("limited");
        let five: Vec<u8> = [0x30u8, 0x00].iter().copied().cycle().take(10).collect();
        // alice's two connections: 10 publishes are her burst, 5 more are half a second.
        assert_eq!(a.account_at(start, &five), None);
        assert_eq!(b.account_at(start, &five), None);
        let delay = a.account_at(start, &five).expect("alice in debt");
        assert!(delay > Duration::from_millis(490) && delay <= Duration::from_millis(500));
        // carol is not held up by alice.
        assert_eq!(c.account_at(start, &five), None);
        assert_eq!(budgets.entries(), 2);
        drop((a, b, c));
        assert!(budgets.budget("alice").is_some());
        assert!(UserBudgets::new(0, 0).budget("alice").is_none());
        // Closed users' entries are swept once the table has grown.
        let live: Vec<_> = (0..USER_TABLE_MIN_SWEEP)
            .map(|i| budgets.budget(&format!("u{i}")))
            .collect();
        assert!(budgets.entries() <= USER_TABLE_MIN_SWEEP + 1);
        drop(live);
        for i in 0..3 * USER_TABLE_MIN_SWEEP {
            let _ = budgets.budget(&format!("v{i}"));
            assert!(budgets.entries() <= 2 * USER_TABLE_MIN_SWEEP);
        }
    }

    #[test]
    fn an_unattached_user_slot_limits_nothing() {
        let slot: UserSlot = Arc::default();
        let mut limiter = ReadLimiter::with_user(0, 0, Some(slot)).expect("limited");
        let many = [0x30u8, 0x00].repeat(1000);
        assert_eq!(limiter.account(&many), None);
        assert_eq!(limiter.allowance(100_000), 100_000);
    }
}
