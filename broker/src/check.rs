//! `jetmq-broker check NAME[:PORT]`: resolve a cluster's DNS name, connect to every address
//! with MQTT 5 and report what each node says about itself in `$SYS/broker/...`.
//!
//! Meant for operators changing DNS records: every A/AAAA record should be a live node with
//! its own node id. The exit code is non-zero when any address is unreachable.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use jetmq_codec::{
    Connect, ConnectProperties, Disconnect, MqttCodec, Packet, ProtocolVersion, QoS, ReasonCode,
    Subscribe, SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::dns::{DnsConfig, Resolver};
use crate::sys_topics;

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The cluster's DNS name (or an IP address), optionally with the MQTT port (default
    /// 1883, 8883 with --tls).
    pub target: String,
    /// Name server to ask, IP or IP:PORT (repeatable); default: the system's.
    #[arg(long = "nameserver")]
    pub nameservers: Vec<String>,
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long, env = "JETMQ_CHECK_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// MQTT over TLS; the server certificate must be valid for the DNS name.
    #[arg(long)]
    pub tls: bool,
    /// PEM bundle of CAs trusted for --tls (required with --tls).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Per-address time limit for connecting and reading $SYS, milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// What one address answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// TCP (+ TLS) connect and CONNECT..CONNACK.
    pub latency: Duration,
    pub node_id: Option<String>,
    pub version: Option<String>,
    /// Clients connected to that node, this check's connection included.
    pub clients_connected: Option<String>,
}

#[derive(Debug)]
pub struct NodeReport {
    pub addr: SocketAddr,
    pub result: Result<NodeInfo, String>,
}

impl NodeReport {
    pub fn reachable(&self) -> bool {
        self.result.is_ok()
    }
}

/// `NAME[:PORT]` or `[v6]:PORT`.
pub fn split_target(target: &str, default_port: u16) -> anyhow::Result<(String, u16)> {
    if let Ok(addr) = target.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Ok(ip) = target.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok((ip.to_string(), default_port));
    }
    match target.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse()
                .with_context(|| format!("{target:?}: bad port"))?;
            if host.is_empty() {
                bail!("{target:?}: no host name");
            }
            Ok((host.to_owned(), port))
        }
        None if target.is_empty() => bail!("no host name given"),
        None => Ok((target.to_owned(), default_port)),
    }
}

/// Resolves the target and checks every address at once.
pub async fn run(args: &CheckArgs) -> anyhow::Result<Vec<NodeReport>> {
    let (host, port) = split_target(&args.target, if args.tls { 8883 } else { 1883 })?;
    let resolver = Resolver::new(&DnsConfig {
        nameservers: args.nameservers.clone(),
        timeout_ms: args.timeout_ms,
        ..DnsConfig::default()
    })?;
    let ips = resolver.lookup(&host).await?;
    let tls = match (args.tls, &args.ca_file) {
        (false, _) => None,
        (true, None) => bail!("--tls needs --ca-file"),
        (true, Some(path)) => Some(tls_connector(path)?),
    };
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let checks = ips.into_iter().enumerate().map(|(i, ip)| {
        let addr = SocketAddr::new(ip, port);
        let tls = tls.clone();
        let host = host.clone();
        async move {
            let result = tokio::time::timeout(timeout, check_one(addr, &host, tls, args, i))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {timeout:?}")))
                .map_err(|e| format!("{e:#}"));
            NodeReport { addr, result }
        }
    });
    Ok(futures::future::join_all(checks).await)
}

fn tls_connector(ca_file: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use tokio_rustls::rustls::{crypto::ring, ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("cannot read {}", ca_file.display()))?
    {
        roots
            .add(cert.with_context(|| format!("{}: bad PEM", ca_file.display()))?)
            .context("CA certificate rejected")?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn check_one(
    addr: SocketAddr,
    host: &str,
    tls: Option<tokio_rustls::TlsConnector>,
    args: &CheckArgs,
    index: usize,
) -> anyhow::Result<NodeInfo> {
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).await.context("TCP connect")?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => talk(tcp, started, args, index).await,
        Some(connector) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .context("not a valid TLS server name")?;
            let stream = connector
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            talk(stream, started, args, index).await
        }
    }
}

async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    started: Instant,
    args: &CheckArgs,
    index: usize,
) -> anyhow::Result<NodeInfo> {
    let mut framed = Framed::new(
        stream,
        MqttCodec::with_version(ProtocolVersion::V5, 1024 * 1024),
    );
    let connect = Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 30,
        client_id: format!("jetmq-check-{}-{index}", std::process::id()),
        will: None,
        username: args.username.clone(),
        password: args.password.clone().map(Bytes::from),
        properties: ConnectProperties::default(),
    };
    framed
        .send(Packet::Connect(Box::new(connect)))
        .await
        .context("sending CONNECT")?;
    match framed.next().await {
        Some(Ok(Packet::ConnAck(ack))) if !ack.reason.is_error() => {}
        Some(Ok(Packet::ConnAck(ack))) => bail!("CONNACK refused: 0x{:02x}", ack.reason.0),
        Some(Ok(other)) => bail!("expected CONNACK, got {}", other.name()),
        Some(Err(err)) => bail!("bad CONNACK: {err}"),
        None => bail!("closed before CONNACK"),
    }
    let mut info = NodeInfo {
        latency: started.elapsed(),
        ..NodeInfo::default()
    };
    let wanted = [
        sys_topics::NODE_ID,
        sys_topics::VERSION,
        sys_topics::CLIENTS_CONNECTED,
    ];
    let subscribe = Subscribe {
        packet_id: 1,
        filters: wanted
            .iter()
            .map(|t| SubscribeFilter {
                filter: (*t).to_owned(),
                options: SubscriptionOptions {
                    qos: QoS::AtMostOnce,
                    ..SubscriptionOptions::default()
                },
            })
            .collect(),
        ..Subscribe::default()
    };
    framed
        .send(Packet::Subscribe(subscribe))
        .await
        .context("sending SUBSCRIBE")?;
    let mut missing = wanted.len();
    while missing > 0 {
        match framed.next().await {
            Some(Ok(Packet::SubAck(ack))) => {
                let denied = ack.reasons.iter().filter(|r| r.is_error()).count();
                if denied == wanted.len() {
                    bail!("$SYS subscriptions refused (ACL?)");
                }
                missing -= denied;
            }
            Some(Ok(Packet::Publish(p))) => {
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                let slot = match p.topic.as_str() {
                    sys_topics::NODE_ID => &mut info.node_id,
                    sys_topics::VERSION => &mut info.version,
                    sys_topics::CLIENTS_CONNECTED => &mut info.clients_connected,
                    _ => continue,
                };
                if slot.replace(text).is_none() {
                    missing -= 1;
                }
            }
            Some(Ok(Packet::Disconnect(d))) => bail!("disconnected: 0x{:02x}", d.reason.0),
            Some(Ok(_)) => {}
            Some(Err(err)) => bail!("bad packet: {err}"),
            None => bail!("closed while reading $SYS"),
        }
    }
    let _ = framed
        .send(Packet::Disconnect(Disconnect::new(ReasonCode::SUCCESS)))
        .await;
    Ok(info)
}

/// The report as an aligned text table.
pub fn render(reports: &[NodeReport]) -> String {
    let dash = || "-".to_owned();
    let mut rows = vec![[
        "ADDRESS".to_owned(),
        "REACHABLE".to_owned(),
        "NODE_ID".to_owned(),
        "VERSION".to_owned(),
        "CLIENTS".to_owned(),
        "LATENCY_MS".to_owned(),
        "ERROR".to_owned(),
    ]];
    for r in reports {
        rows.push(match &r.result {
            Ok(info) => [
                r.addr.to_string(),
                "yes".to_owned(),
                info.node_id.clone().unwrap_or_else(dash),
                info.version.clone().unwrap_or_else(dash),
                info.clients_connected.clone().unwrap_or_else(dash),
                format!("{:.1}", info.latency.as_secs_f64() * 1000.0),
                String::new(),
            ],
            Err(err) => [
                r.addr.to_string(),
                "no".to_owned(),
                dash(),
                dash(),
                dash(),
                dash(),
                err.clone(),
            ],
        });
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_into_host_and_port() {
        let t = |s| split_target(s, 1883).expect(s);
        assert_eq!(t("mqtt.example"), ("mqtt.example".to_owned(), 1883));
        assert_eq!(t("mqtt.example:2883"), ("mqtt.example".to_owned(), 2883));
        assert_eq!(t("127.0.0.1:1"), ("127.0.0.1".to_owned(), 1));
        assert_eq!(t("[::1]:1884"), ("::1".to_owned(), 1884));
        assert_eq!(t("::1"), ("::1".to_owned(), 1883));
        assert!(split_target("mqtt.example:x", 1883).is_err());
        assert!(split_target("", 1883).is_err());
    }

    #[test]
    fn table_has_a_row_per_address() {
        let reports = vec![
            NodeReport {
                addr: "127.0.0.11:1883".parse().expect("addr"),
                result: Ok(NodeInfo {
                    latency: Duration::from_micros(2500),
                    node_id: Some("b1".into()),
                    version: Some("jetmq-broker 0.1.0".into()),
                    clients_connected: Some("4".into()),
                }),
            },
            NodeReport {
                addr: "127.0.0.12:1883".parse().expect("addr"),
                result: Err("TCP connect: refused".into()),
            },
        ];
        let table = render(&reports);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ADDRESS"));
        assert!(lines[1].contains("yes") && lines[1].contains("b1") && lines[1].contains("2.5"));
        assert!(lines[2].contains("no") && lines[2].contains("refused"));
    }
}
