//! Options shared by every scenario and helpers around them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use jetmq_codec::ProtocolVersion;

use crate::client::ConnOpts;
use crate::procmon::Watched;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttVersion {
    #[value(name = "3.1.1", alias = "4", alias = "311")]
    V311,
    #[value(name = "5", alias = "5.0")]
    V5,
}

impl MqttVersion {
    pub fn protocol(self) -> ProtocolVersion {
        match self {
            MqttVersion::V311 => ProtocolVersion::V311,
            MqttVersion::V5 => ProtocolVersion::V5,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Broker address; repeat for several nodes (clients are spread round-robin).
    #[arg(long = "target", default_value = "127.0.0.1:1883")]
    pub targets: Vec<SocketAddr>,
    /// Local address to connect from; repeat to get past ~28k ports per address pair.
    #[arg(long = "source-ip")]
    pub source_ips: Vec<IpAddr>,
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value = "3.1.1")]
    pub mqtt: MqttVersion,
    /// Length of the measured phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Hard limit on the whole run, seconds (default: 3 x duration + 120).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Connection attempts in progress at once while setting up.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Limit for one TCP connect + CONNACK (and for SUBACK), seconds.
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
    /// MQTT keep alive, seconds (0 = off).
    #[arg(long, default_value_t = 120)]
    pub keepalive: u16,
    /// A process whose RSS and CPU time to record, as NAME=PID; repeatable.
    #[arg(long = "watch")]
    pub watch: Vec<Watched>,
    /// Write the JSON result here (default: stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Free-form label copied into the result.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Client identifier prefix (default: jb-<run id>).
    #[arg(long)]
    pub client_prefix: Option<String>,
    /// Username every client logs in with (brokers that refuse anonymous clients).
    #[arg(long)]
    pub username: Option<String>,
    /// Password that goes with --username (from the environment, so it is not in `ps`).
    #[arg(long, env = "JETMQ_BENCH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

impl Common {
    pub fn hard_timeout(&self) -> Duration {
        secs(self.timeout.unwrap_or(self.duration * 3.0 + 120.0))
    }

    pub fn connect_timeout(&self) -> Duration {
        secs(self.connect_timeout)
    }

    pub fn target(&self, i: usize) -> SocketAddr {
        self.targets[i % self.targets.len()]
    }

    /// Source address for connection `i`: rotates over the source list, but only changes
    /// every `targets.len()` connections so that every (source, target) pair is used.
    pub fn source(&self, i: usize) -> Option<IpAddr> {
        if self.source_ips.is_empty() {
            None
        } else {
            let t = self.targets.len().max(1);
            Some(self.source_ips[(i / t) % self.source_ips.len()])
        }
    }

    pub fn conn_opts(&self, i: usize, client_id: String, clean: bool) -> ConnOpts {
        ConnOpts {
            target: self.target(i),
            source: self.source(i),
            version: self.mqtt.protocol(),
            client_id,
            clean,
            keepalive: self.keepalive,
            session_expiry: None,
            timeout: self.connect_timeout(),
            username: self.username.clone(),
            // The password is only for a target that gets --username (scripts/bench exports
            // it for the whole run; 3.1.1 cannot send a password alone).
            password: self.username.as_ref().and(self.password.clone()),
        }
    }
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() && s > 0.0 { s } else { 0.0 })
}

/// A short id for this run, used in topics and client ids so runs never collide.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:04x}", std::process::id() % 0xffff, nanos % 0xffff)
}

/// A deadline that scenarios check in every wait.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn after(d: Duration) -> Deadline {
        Deadline(Instant::now() + d)
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.0
    }

    /// `at`, but never later than the deadline.
    pub fn cap(&self, at: Instant) -> Instant {
        at.min(self.0)
    }
}

/// Raises the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Waits until `done()` holds, polling, or until `limit` passes; true if it held.
pub async fn wait_until(limit: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
