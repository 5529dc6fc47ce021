//! Name resolution for NATS URLs (and for `jetmq-broker check`), with hickory-resolver.
//!
//! A host name in `nats.urls` stands for every A/AAAA record it has: round-robin DNS names a
//! cluster without a load balancer. The names are resolved at start-up, again on every
//! reconnect attempt of the NATS client, and every `dns.refresh_secs` while connected. See
//! docs/dns.md for what async-nats lets us do with the answers and where that stops.

use jetmq_common::settings::InvalidSetting;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, ReconnectToServer, ServerAddr};
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use serde::{Deserialize, Serialize};

/// `[dns]` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers as "IP" or "IP:PORT"; empty: the system's (/etc/resolv.conf, /etc/hosts).
    pub nameservers: Vec<String>,
    /// Seconds between re-resolutions of NATS host names while connected (0: only when
    /// the connection fails).
    pub refresh_secs: u64,
    /// Upper bound on one lookup, milliseconds.
    pub timeout_ms: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            refresh_secs: 30,
            timeout_ms: 2000,
        }
    }
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        for ns in &self.nameservers {
            parse_nameserver(ns).map_err(|e| InvalidSetting::new("dns.nameservers", e))?;
        }
        if self.timeout_ms == 0 {
            return Err(InvalidSetting::new("dns.timeout_ms", "must be positive"));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    #[error("invalid name server {0:?}: {1}")]
    Nameserver(String, String),
    #[error("cannot resolve {host}: {reason}")]
    Lookup { host: String, reason: String },
    #[error("resolving {0} timed out")]
    Timeout(String),
}

/// "IP" or "IP:PORT" (IPv6 with a port as "[::1]:53").
pub fn parse_nameserver(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

/// A hickory resolver set up from [`DnsConfig`]; cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
    /// True when the system configuration is used, so the system resolver (which async-nats
    /// uses for host names left in its server pool) gives the same answers.
    system: bool,
}

impl Resolver {
    pub fn new(config: &DnsConfig) -> Result<Resolver, DnsError> {
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().unwrap_or_else(|err| {
                // IP addresses in nats.urls must keep working on a host without resolv.conf.
                tracing::warn!(error = %err, "cannot read the system DNS configuration; host names will not resolve");
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                    TokioRuntimeProvider::default(),
                )
            })
        } else {
            let mut servers = Vec::new();
            for text in &config.nameservers {
                let addr =
                    parse_nameserver(text).map_err(|e| DnsError::Nameserver(text.clone(), e))?;
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                servers.push(NameServerConfig::new(addr.ip(), true, vec![udp, tcp]));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioRuntimeProvider::default(),
            )
        };
        let options: &mut ResolverOpts = builder.options_mut();
        // All A and AAAA records: every address is a node.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = timeout;
        options.attempts = 1;
        let inner = builder
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Resolver {
            inner,
            timeout,
            system: config.nameservers.is_empty(),
        })
    }

    /// Every address of `host` (an IP literal is returned as it is), sorted, without
    /// duplicates.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // hickory treats names without a trailing dot relative to the search list; a fully
        // qualified query is what operators mean by "the cluster's name".
        let fqdn = if host.ends_with('.') || !host.contains('.') {
            host.to_owned()
        } else {
            format!("{host}.")
        };
        let answer = tokio::time::timeout(self.timeout * 2, self.inner.lookup_ip(fqdn.as_str()))
            .await
            .map_err(|_| DnsError::Timeout(host.to_owned()))?
            .map_err(|e| DnsError::Lookup {
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
        let ips: BTreeSet<IpAddr> = answer.iter().collect();
        if ips.is_empty() {
            return Err(DnsError::Lookup {
                host: host.to_owned(),
                reason: "no A or AAAA records".to_owned(),
            });
        }
        Ok(ips.into_iter().collect())
    }
}

/// A number that differs between processes (std's per-process hash keys), without a
/// random-number dependency.
fn per_process_random() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one("jetmq")
}

/// One entry of `nats.urls`, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl {
    pub scheme: String,
    /// `user:pass` or a token, without the `@`.
    pub auth: Option<String>,
    pub host: String,
    pub port: u16,
}

impl NatsUrl {
    /// Parses `[scheme://][auth@]host[:port]`; `entry` may hold several, comma separated.
    pub fn parse_list(entry: &str) -> Result<Vec<NatsUrl>, String> {
        entry
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(NatsUrl::parse)
            .collect()
    }

    pub fn parse(text: &str) -> Result<NatsUrl, String> {
        let (scheme, rest) = text.split_once("://").unwrap_or(("nats", text));
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((auth, hp)) => (Some(auth.to_owned()), hp),
            None => (None, rest),
        };
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (ip, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: unterminated IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{text:?}: bad port"))?,
                None => 4222,
            };
            (format!("[{ip}]"), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("{text:?}: bad port"))?,
                ),
                None => (hostport.to_owned(), 4222),
            }
        };
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        Ok(NatsUrl {
            scheme: scheme.to_owned(),
            auth,
            host,
            port,
        })
    }

    fn is_ip(&self) -> bool {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
    }

    /// TLS verifies the server's name, so such URLs are given to the client as they are.
    fn keeps_name(&self) -> bool {
        self.scheme == "tls" || self.is_ip()
    }

    fn with_host(&self, host: &str) -> String {
        let auth = self
            .auth
            .as_deref()
            .map(|a| format!("{a}@"))
            .unwrap_or_default();
        format!("{}://{auth}{host}:{}", self.scheme, self.port)
    }

    fn with_ip(&self, ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => self.with_host(&v4.to_string()),
            IpAddr::V6(v6) => self.with_host(&format!("[{v6}]")),
        }
    }

    pub fn as_given(&self) -> String {
        self.with_host(&self.host)
    }
}

/// The configured NATS URLs and how to turn them into the client's server pool.
pub struct NatsAddresses {
    resolver: Resolver,
    urls: Vec<NatsUrl>,
    /// The latest expansion (see [`NatsAddresses::resolve`]), shared with the reconnect
    /// callback.
    latest: Mutex<Vec<String>>,
    /// Where this process starts in a name's sorted addresses: brokers that all know the
    /// cluster by one name spread over its nodes instead of all picking the lowest address.
    spread: usize,
    /// Rotates the callback's choice among equally good servers.
    turn: AtomicUsize,
    /// Set when the NATS connection uses TLS: certificates name hosts, not addresses.
    keep_names: bool,
}

impl NatsAddresses {
    pub fn new(resolver: Resolver, config_urls: &[String]) -> Result<NatsAddresses, String> {
        let mut urls = Vec::new();
        for entry in config_urls {
            urls.extend(NatsUrl::parse_list(entry)?);
        }
        if urls.is_empty() {
            return Err("no NATS URL configured".to_owned());
        }
        Ok(NatsAddresses {
            resolver,
            urls,
            latest: Mutex::new(Vec::new()),
            turn: AtomicUsize::new(0),
            keep_names: false,
            spread: per_process_random() as usize,
        })
    }

    /// Hands host names to the client unexpanded (for TLS, whose certificates name hosts).
    pub fn keeping_names(mut self, keep: bool) -> Self {
        self.keep_names = keep;
        self
    }

    /// Resolves every URL: one URL per address of each host name. A name that does not
    /// resolve stays as it is (async-nats then tries the system resolver on each attempt).
    ///
    /// The order is the configured one (the first URL is tried first: a broker lists its own
    /// host's NATS node first); a name's addresses are sorted and then rotated by a
    /// per-process offset, so that the order is stable across lookups (changes are real
    /// changes) while brokers knowing the cluster by one name spread over its addresses.
    pub async fn resolve(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |url: String| {
            if !out.contains(&url) {
                out.push(url);
            }
        };
        for url in &self.urls {
            if url.keeps_name() || self.keep_names {
                add(url.as_given());
                continue;
            }
            match self.resolver.lookup(&url.host).await {
                Ok(mut ips) => {
                    let len = ips.len();
                    ips.rotate_left(self.spread % len);
                    for ip in ips {
                        add(url.with_ip(ip));
                    }
                    // With the system configuration the client's own resolver sees the same
                    // records, so the name itself stays in the pool: async-nats resolves it
                    // afresh on every attempt, which covers addresses that appear while the
                    // client is disconnected (its pool cannot be changed then).
                    if self.resolver.system {
                        add(url.as_given());
                    }
                }
                Err(err) => {
                    tracing::warn!(url = %url.as_given(), error = %err, "cannot resolve NATS host; using it as given");
                    add(url.as_given());
                }
            }
        }
        *self.latest.lock() = out.clone();
        out
    }

    fn latest(&self) -> Vec<String> {
        self.latest.lock().clone()
    }

    /// Which server of the client's pool to try next: one the latest answer still lists,
    /// with the fewest failed attempts, rotating among equals. Servers the answer no longer
    /// lists (a node taken out of DNS) and servers the cluster announced come after those.
    fn choose(&self, pool: &[async_nats::Server], fresh: &[String]) -> Option<ServerAddr> {
        if pool.is_empty() {
            return None;
        }
        let listed = |s: &async_nats::Server| fresh.iter().any(|u| same_server(u, &s.addr));
        let best = pool.iter().map(|s| (s.failed_attempts, !listed(s))).min()?;
        let candidates: Vec<&async_nats::Server> = pool
            .iter()
            .filter(|s| (s.failed_attempts, !listed(s)) == best)
            .collect();
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % candidates.len();
        Some(candidates[i].addr.clone())
    }

    /// Sets up re-resolution on the client's reconnect attempts.
    pub fn install(self: &Arc<Self>, options: ConnectOptions) -> ConnectOptions {
        let this = self.clone();
        options.reconnect_to_server_callback(move |pool, _info| {
            let this = this.clone();
            // The callback's future must be Sync; the lookup runs in its own task and only
            // the join handle is held here.
            let lookup = tokio::spawn({
                let this = this.clone();
                async move { this.resolve().await }
            });
            async move {
                let fresh = lookup.await.unwrap_or_else(|_| this.latest());
                let choice = this.choose(&pool, &fresh)?;
                Some(ReconnectToServer {
                    addr: choice,
                    delay: None,
                })
            }
        })
    }

    /// Re-resolves every `refresh` and hands a changed answer to the client as its new
    /// server pool (servers the cluster announced are kept). async-nats applies a new pool
    /// only while connected; during a reconnect the command waits until it is.
    pub fn spawn_refresh(self: &Arc<Self>, client: async_nats::Client, refresh: Duration) {
        if refresh.is_zero() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut applied = this.latest();
            loop {
                tokio::time::sleep(refresh).await;
                let fresh = this.resolve().await;
                if fresh == applied {
                    continue;
                }
                let mut pool: Vec<String> = fresh.clone();
                if let Ok(current) = client.server_pool().await {
                    for server in current.iter().filter(|s| s.is_discovered) {
                        let url = server.addr.as_url_str().to_owned();
                        if !pool.contains(&url) {
                            pool.push(url);
                        }
                    }
                }
                tracing::info!(servers = ?fresh, "NATS host names resolve differently now; updating the server pool");
                match client.set_server_pool(pool).await {
                    Ok(()) => applied = fresh,
                    Err(err) => tracing::warn!(error = %err, "cannot update the NATS server pool"),
                }
            }
        });
    }
}

fn same_server(url: &str, addr: &ServerAddr) -> bool {
    url.parse::<ServerAddr>()
        .is_ok_and(|u| u.host() == addr.host() && u.port() == addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use hickory_server::proto::rr::rdata::{A, SOA};
    use hickory_server::proto::rr::{Name, RData, Record};
    use hickory_server::store::in_memory::InMemoryZoneHandler;
    use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

    /// An in-process authoritative DNS server for `jetmq.test.` on a free UDP port.
    struct TestDns {
        addr: SocketAddr,
        zone: Arc<InMemoryZoneHandler>,
        serial: u32,
        _server: hickory_server::Server<Catalog>,
    }

    impl TestDns {
        async fn start() -> TestDns {
            let origin = Name::from_ascii("jetmq.test.").expect("name");
            let mut zone: InMemoryZoneHandler =
                InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
            let soa = SOA::new(
                Name::from_ascii("ns.jetmq.test.").expect("name"),
                Name::from_ascii("admin.jetmq.test.").expect("name"),
                1,
                60,
                60,
                60,
                0,
            );
            zone.upsert_mut(Record::from_rdata(origin.clone(), 0, RData::SOA(soa)), 1);
            let zone = Arc::new(zone);
            let mut catalog = Catalog::new();
            catalog.upsert(origin.into(), vec![zone.clone()]);
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind udp");
            let addr = socket.local_addr().expect("addr");
            let mut server = hickory_server::Server::new(catalog);
            server.register_socket(socket);
            TestDns {
                addr,
                zone,
                serial: 1,
                _server: server,
            }
        }

        /// Replaces the A records of `name` (TTL 0, so nothing is cached).
        async fn set_a(&mut self, name: &str, ips: &[[u8; 4]]) {
            self.serial += 1;
            let name = Name::from_ascii(name).expect("name");
            {
                let mut records = self.zone.records_mut().await;
                records.retain(|key, _| key.name != name.clone().into());
            }
            for ip in ips {
                let record = Record::from_rdata(name.clone(), 0, RData::A(A(Ipv4Addr::from(*ip))));
                assert!(self.zone.upsert(record, self.serial).await);
            }
        }

        fn resolver(&self) -> Resolver {
            Resolver::new(&DnsConfig {
                nameservers: vec![self.addr.to_string()],
                ..DnsConfig::default()
            })
            .expect("resolver")
        }
    }

    #[test]
    fn urls_parse() {
        let urls = NatsUrl::parse_list("nats://u:p@nats.example:4333, 127.0.0.1,tls://[::1]")
            .expect("parses");
        assert_eq!(urls[0].auth.as_deref(), Some("u:p"));
        assert_eq!(
            (urls[0].host.as_str(), urls[0].port),
            ("nats.example", 4333)
        );
        assert_eq!((urls[1].scheme.as_str(), urls[1].port), ("nats", 4222));
        assert_eq!(urls[2].host, "[::1]");
        assert_eq!(urls[2].as_given(), "tls://[::1]:4222");
        assert!(NatsUrl::parse("nats://host:port").is_err());
        assert_eq!(
            parse_nameserver("127.0.0.1").expect("ip"),
            "127.0.0.1:53".parse().expect("addr")
        );
        assert!(parse_nameserver("dns.example").is_err());
    }

    #[tokio::test]
    async fn a_name_expands_to_all_its_addresses_and_follows_changes() {
        let mut dns = TestDns::start().await;
        dns.set_a(
            "nats.jetmq.test.",
            &[[127, 0, 0, 11], [127, 0, 0, 12], [127, 0, 0, 13]],
        )
        .await;
        let mut addresses = NatsAddresses::new(
            dns.resolver(),
            &[
                "nats://nats.jetmq.test:4999,127.0.0.1:4222".to_owned(),
                "tls://nats.jetmq.test:4998".to_owned(),
            ],
        )
        .expect("urls");
        addresses.spread = 0;
        assert_eq!(
            addresses.resolve().await,
            vec![
                "nats://127.0.0.11:4999",
                "nats://127.0.0.12:4999",
                "nats://127.0.0.13:4999",
                "nats://127.0.0.1:4222",
                "tls://nats.jetmq.test:4998",
            ]
        );
        dns.set_a("nats.jetmq.test.", &[[127, 0, 0, 12], [127, 0, 0, 14]])
            .await;
        assert_eq!(
            addresses.resolve().await,
            vec![
                "nats://127.0.0.12:4999",
                "nats://127.0.0.14:4999",
                "nats://127.0.0.1:4222",
                "tls://nats.jetmq.test:4998",
            ]
        );
    }

    /// A server of the client's pool, as async-nats hands it to the reconnect callback.
    fn pool_entry(url: &str, failed_attempts: usize) -> async_nats::Server {
        async_nats::Server {
            addr: url.parse().expect("addr"),
            failed_attempts,
            did_connect: false,
            is_discovered: false,
            last_error: None,
        }
    }

    #[tokio::test]
    async fn the_configured_order_is_kept_and_a_name_starts_where_this_process_does() {
        let mut dns = TestDns::start().await;
        dns.set_a(
            "nats.jetmq.test.",
            &[[127, 0, 0, 13], [127, 0, 0, 11], [127, 0, 0, 12]],
        )
        .await;
        let mut addresses = NatsAddresses::new(
            dns.resolver(),
            &[
                "nats://127.0.0.13:4222,nats://127.0.0.11:4222,nats://nats.jetmq.test:4222"
                    .to_owned(),
            ],
        )
        .expect("urls");
        addresses.spread = 4;
        assert_eq!(
            addresses.resolve().await,
            vec![
                "nats://127.0.0.13:4222",
                "nats://127.0.0.11:4222",
                "nats://127.0.0.12:4222",
            ],
            "own node first as configured, then the name's addresses from offset 4 % 3 = 1 \
             (.12, .13, .11), without repeating what is already there"
        );
        // The first choice of a fresh client (no failures yet) is the first of that order.
        let fresh = addresses.latest();
        let pool: Vec<async_nats::Server> = fresh.iter().map(|url| pool_entry(url, 0)).collect();
        assert_eq!(
            addresses.choose(&pool, &fresh).expect("choice").host(),
            "127.0.0.13"
        );
        let mut starts = std::collections::HashSet::new();
        for spread in 0..3 {
            let mut a =
                NatsAddresses::new(dns.resolver(), &["nats://nats.jetmq.test:4222".to_owned()])
                    .expect("urls");
            a.spread = spread;
            starts.insert(a.resolve().await[0].clone());
        }
        assert_eq!(
            starts.len(),
            3,
            "each offset starts at another node: {starts:?}"
        );
    }

    #[tokio::test]
    async fn system_configuration_reads_the_hosts_file() {
        let resolver = Resolver::new(&DnsConfig::default()).expect("system resolver");
        let ips = resolver
            .lookup("localhost")
            .await
            .expect("localhost resolves");
        assert!(ips.iter().all(|ip| ip.is_loopback()), "{ips:?}");
        assert_eq!(
            resolver.lookup("127.0.0.9").await.expect("literal"),
            vec![IpAddr::from([127, 0, 0, 9])]
        );
    }

    #[tokio::test]
    async fn unknown_names_are_errors_and_stay_as_given() {
        let dns = TestDns::start().await;
        let resolver = dns.resolver();
        assert!(matches!(
            resolver.lookup("missing.jetmq.test").await,
            Err(DnsError::Lookup { .. })
        ));
        let addresses =
            NatsAddresses::new(resolver, &["nats://missing.jetmq.test:4222".to_owned()])
                .expect("urls");
        assert_eq!(
            addresses.resolve().await,
            vec!["nats://missing.jetmq.test:4222"]
        );
    }

    #[tokio::test]
    async fn reconnect_choice_prefers_listed_servers_with_fewest_failures() {
        let mut dns = TestDns::start().await;
        dns.set_a("nats.jetmq.test.", &[[127, 0, 0, 11], [127, 0, 0, 12]])
            .await;
        let addresses =
            NatsAddresses::new(dns.resolver(), &["nats://nats.jetmq.test:4222".to_owned()])
                .expect("urls");
        let fresh = addresses.resolve().await;
        // .11 failed twice, .12 once, .13 (announced by the cluster, not in DNS) never.
        let pool = vec![
            pool_entry("nats://127.0.0.11:4222", 2),
            pool_entry("nats://127.0.0.12:4222", 1),
            pool_entry("nats://127.0.0.13:4222", 1),
        ];
        for _ in 0..4 {
            let chosen = addresses.choose(&pool, &fresh).expect("a choice");
            assert_eq!(chosen.host(), "127.0.0.12");
        }
        // The node is taken out of DNS: .11 and .13 are then equally good and alternate.
        dns.set_a("nats.jetmq.test.", &[[127, 0, 0, 11]]).await;
        let fresh = addresses.resolve().await;
        let pool = vec![
            pool_entry("nats://127.0.0.11:4222", 0),
            pool_entry("nats://127.0.0.12:4222", 0),
        ];
        assert_eq!(
            addresses.choose(&pool, &fresh).expect("choice").host(),
            "127.0.0.11"
        );
    }
}
