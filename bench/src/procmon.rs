//! Samples resident memory and CPU time of watched processes (the brokers, NATS servers and
//! this load generator itself) from /proc while a scenario runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// One watched process.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for Watched {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pid) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PID, got {s:?}"))?;
        let pid = pid
            .trim()
            .parse::<u32>()
            .map_err(|e| format!("bad pid in {s:?}: {e}"))?;
        Ok(Watched {
            name: name.trim().to_owned(),
            pid,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub rss_kb: u64,
    pub cpu_secs: f64,
}

/// Reads VmRSS (from statm) and utime+stime (from stat) of a process.
pub fn sample(pid: u32) -> Option<Sample> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the fields are numbered from 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Sample {
        rss_kb: resident_pages * page_size() / 1024,
        cpu_secs: (utime + stime) as f64 / clock_ticks(),
    })
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcReport {
    pub pid: u32,
    /// False if the process vanished (or was never there) during the scenario.
    pub alive_at_end: bool,
    pub rss_start_kb: u64,
    pub rss_end_kb: u64,
    pub rss_peak_kb: u64,
    /// Named points in the scenario (e.g. "connected") and the RSS then.
    pub rss_marks_kb: BTreeMap<String, u64>,
    /// CPU seconds (user + system) spent during the scenario.
    pub cpu_secs: f64,
}

#[derive(Debug)]
struct Entry {
    watched: Watched,
    start: Option<Sample>,
    last: Option<Sample>,
    peak_kb: u64,
    marks: BTreeMap<String, u64>,
}

/// Samples every 200 ms in a background task until dropped; [`Monitor::mark`] records a
/// named RSS point, [`Monitor::report`] the summary.
#[derive(Clone)]
pub struct Monitor {
    tcp_start: Option<TcpCounters>,
    entries: Arc<Mutex<Vec<Entry>>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Monitor {
    pub fn start(mut watched: Vec<Watched>) -> Monitor {
        watched.push(Watched {
            name: "loadgen".to_owned(),
            pid: std::process::id(),
        });
        let entries: Vec<Entry> = watched
            .into_iter()
            .map(|w| {
                let s = sample(w.pid);
                Entry {
                    start: s,
                    last: s,
                    peak_kb: s.map(|s| s.rss_kb).unwrap_or(0),
                    marks: BTreeMap::new(),
                    watched: w,
                }
            })
            .collect();
        let entries = Arc::new(Mutex::new(entries));
        let bg = entries.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let pids: Vec<u32> = match bg.lock() {
                    Ok(g) => g.iter().map(|e| e.watched.pid).collect(),
                    Err(_) => return,
                };
                // Read /proc outside the lock.
                let samples: Vec<Option<Sample>> = pids.iter().map(|&p| sample(p)).collect();
                let Ok(mut g) = bg.lock() else { return };
                for (e, s) in g.iter_mut().zip(samples) {
                    if let Some(s) = s {
                        e.peak_kb = e.peak_kb.max(s.rss_kb);
                        if e.start.is_none() {
                            e.start = Some(s);
                        }
                        e.last = Some(s);
                    }
                }
            }
        });
        Monitor {
            tcp_start: tcp_counters(),
            entries,
            task: Arc::new(task),
        }
    }

    /// Kernel listen-queue overflows since the monitor started (whole network namespace).
    pub fn tcp(&self) -> Option<TcpCounters> {
        Some(tcp_counters()?.since(self.tcp_start?))
    }

    /// Samples now and records the RSS of every process under `name`.
    pub fn mark(&self, name: &str) {
        let Ok(mut g) = self.entries.lock() else {
            return;
        };
        for e in g.iter_mut() {
            if let Some(s) = sample(e.watched.pid) {
                e.peak_kb = e.peak_kb.max(s.rss_kb);
                e.last = Some(s);
                e.marks.insert(name.to_owned(), s.rss_kb);
            }
        }
    }

    pub fn report(&self) -> BTreeMap<String, ProcReport> {
        let mut out = BTreeMap::new();
        let Ok(mut g) = self.entries.lock() else {
            return out;
        };
        for e in g.iter_mut() {
            let now = sample(e.watched.pid);
            if let Some(s) = now {
                e.peak_kb = e.peak_kb.max(s.rss_kb);
                e.last = Some(s);
            }
            let start = e.start.unwrap_or_default();
            let last = e.last.unwrap_or_default();
            out.insert(
                e.watched.name.clone(),
                ProcReport {
                    pid: e.watched.pid,
                    alive_at_end: now.is_some(),
                    rss_start_kb: start.rss_kb,
                    rss_end_kb: last.rss_kb,
                    rss_peak_kb: e.peak_kb,
                    rss_marks_kb: e.marks.clone(),
                    cpu_secs: (last.cpu_secs - start.cpu_secs).max(0.0),
                },
            );
        }
        out
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

/// Kernel TCP counters of this network namespace (/proc/net/netstat, TcpExt).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TcpCounters {
    /// SYNs or handshakes dropped because a listener's accept queue was full.
    pub listen_overflows: u64,
    pub listen_drops: u64,
}

pub fn tcp_counters() -> Option<TcpCounters> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let find = |key: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == key)?;
        values.get(i)?.parse().ok()
    };
    Some(TcpCounters {
        listen_overflows: find("ListenOverflows")?,
        listen_drops: find("ListenDrops")?,
    })
}

impl TcpCounters {
    pub fn since(self, start: TcpCounters) -> TcpCounters {
        TcpCounters {
            listen_overflows: self.listen_overflows.saturating_sub(start.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(start.listen_drops),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_tcp_counters() {
        let a = tcp_counters().expect("/proc/net/netstat");
        let b = tcp_counters().expect("/proc/net/netstat");
        assert!(b.listen_overflows >= a.listen_overflows);
    }

    use super::*;

    #[test]
    fn samples_self() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kb > 0);
        assert!(s.cpu_secs >= 0.0);
    }

    #[test]
    fn parses_watch() {
        let w: Watched = "jetmq-1=42".parse().expect("parse");
        assert_eq!(w.name, "jetmq-1");
        assert_eq!(w.pid, 42);
        assert!("nope".parse::<Watched>().is_err());
    }
}
