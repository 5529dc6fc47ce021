//! The scenario runner: the phase skeleton that `pubsub`, `reconnect` and `failover` share,
//! so that each scenario file holds only what is particular to it.
//!
//! A scenario builds its own shared state (counters, trackers, histograms), then creates a
//! [`Runner`] and walks it through the phases:
//!
//! 1. **Set-up.** One task per client, spawned with [`Runner::spawn`]. A client connects
//!    inside [`Connector::set_up`], which holds one of `--connect-concurrency` permits and
//!    counts the client as done whether or not it connected; [`Runner::wait_set_up`] waits
//!    for that count.
//! 2. **Measured phase.** [`Runner::start_run`] stamps its start and switches the clients to
//!    [`Phase::Run`]; [`Runner::sleep_until`] waits through it; [`Runner::end_run`] switches
//!    them to [`Phase::Drain`] and returns how long it lasted.
//! 3. **Drain.** [`Runner::drain`] waits until everything sent has arrived, or until nothing
//!    has moved for a while.
//! 4. **Close.** [`Runner::close`] switches the clients to [`Phase::Close`] and joins every
//!    task, aborting those that take too long.
//! 5. **Report.** [`Runner::finish`] wraps the scenario's `params` and `result` into the JSON
//!    document `main` prints (fields `scenario`, `params`, `ok`, `notes`, `result`,
//!    `processes`, `kernel_tcp`), which `scripts/bench` and `bench/report.py` read.
//!
//! ```ignore
//! let mut runner = Runner::new(c, c.hard_timeout(), run_id);
//! let connector = runner.connector();
//! for i in 0..n {
//!     let client = Client::new(i, &runner.prefix, runner.phases());
//!     runner.spawn(client.run(connector.clone()));
//! }
//! runner.wait_set_up(n, "hard timeout while connecting").await;
//! let run_start = runner.start_run(&shared.run_start_ns);
//! runner.sleep_until(run_start + secs(c.duration)).await;
//! let publish_secs = runner.end_run(run_start);
//! runner.drain(secs(args.drain), Duration::from_secs(3), progress, all_delivered).await;
//! runner.close(Duration::from_secs(10), Some("connections")).await;
//! Ok(runner.finish("name", params, ok, result))
//! ```
//!
//! Every wait is capped by the run's hard deadline (`--timeout`). What ran out is written to
//! `notes`; a run with notes is not `ok`. Scenarios with phases of their own (the reconnect
//! storm, the kill of a node) use the same pieces: the deadline, the notes, the monitor.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::common::{wait_until, Common, Deadline};
use crate::payload;
use crate::procmon::Monitor;

/// Where a run is; clients follow it through a [`watch::Receiver`] from [`Runner::phases`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and subscribing.
    Setup,
    /// The measured phase: publish.
    Run,
    /// Publishing stopped: answer acknowledgements and deliveries still arriving.
    Drain,
    /// Disconnect and end.
    Close,
}

/// One scenario run: its deadline, notes, process monitor, client tasks and phase.
pub struct Runner {
    /// The hard limit of the whole run (`--timeout`); every wait is capped by it.
    pub deadline: Deadline,
    /// Client identifier prefix: `--client-prefix`, or `jb-<run id>`.
    pub prefix: String,
    /// RSS and CPU time of the watched processes; scenarios `mark` their milestones.
    pub monitor: Monitor,
    /// What went wrong during the run, in order; any note makes the run not `ok`.
    pub notes: Vec<String>,
    connector: Connector,
    tasks: JoinSet<()>,
    phase: watch::Sender<Phase>,
    mqtt: String,
    targets: Vec<String>,
}

/// Lets clients set up at most `--connect-concurrency` at a time and counts the finished
/// set-ups (successful or not) for [`Runner::wait_set_up`]. Cheap to clone into every task.
#[derive(Clone)]
pub struct Connector {
    permits: Arc<Semaphore>,
    done: Arc<AtomicU64>,
}

impl Connector {
    /// Runs one client's set-up (TCP connect, CONNECT, SUBSCRIBE, ...) holding a permit, then
    /// counts it as done and returns its outcome.
    pub async fn set_up<T>(&self, setup: impl Future<Output = T>) -> T {
        let outcome = {
            let _permit = self.permits.acquire().await;
            setup.await
        };
        self.done.fetch_add(1, Ordering::Relaxed);
        outcome
    }
}

impl Runner {
    /// Starts a run: the deadline `hard_timeout` from now, the process monitor, no clients.
    pub fn new(c: &Common, hard_timeout: Duration, run_id: &str) -> Runner {
        let deadline = Deadline::after(hard_timeout);
        let prefix = c
            .client_prefix
            .clone()
            .unwrap_or_else(|| format!("jb-{run_id}"));
        let monitor = Monitor::start(c.watch.clone());
        Runner {
            deadline,
            prefix,
            monitor,
            notes: Vec::new(),
            connector: Connector {
                permits: Arc::new(Semaphore::new(c.connect_concurrency.max(1))),
                done: Arc::new(AtomicU64::new(0)),
            },
            tasks: JoinSet::new(),
            phase: watch::channel(Phase::Setup).0,
            mqtt: format!("{:?}", c.mqtt),
            targets: c.targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// The set-up gate to hand to client tasks.
    pub fn connector(&self) -> Connector {
        self.connector.clone()
    }

    /// A receiver of the run's phase, for one client.
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Runs a client task until it ends or [`Runner::close`] gives up on it.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Waits until `done()` holds; if the deadline comes first, notes `note`.
    pub async fn wait_for(&mut self, note: &str, done: impl FnMut() -> bool) -> bool {
        let held = wait_until(self.deadline.0, done).await;
        if !held {
            self.notes.push(note.to_owned());
        }
        held
    }

    /// Waits until `n` clients in all have finished [`Connector::set_up`]; if the deadline
    /// comes first, notes `note`.
    pub async fn wait_set_up(&mut self, n: usize, note: &str) -> bool {
        let done = self.connector.done.clone();
        self.wait_for(note, || done.load(Ordering::Relaxed) >= n as u64)
            .await
    }

    /// Sleeps until `at`, or until the deadline if that comes first.
    pub async fn sleep_until(&self, at: Instant) {
        tokio::time::sleep_until(self.deadline.cap(at).into()).await;
    }

    /// Starts the measured phase: stores its start in `run_start_ns` (for the clients'
    /// schedules and the report), switches to [`Phase::Run`]; returns the start.
    pub fn start_run(&self, run_start_ns: &AtomicU64) -> Instant {
        let run_start = Instant::now();
        run_start_ns.store(payload::instant_ns(run_start), Ordering::Relaxed);
        self.phase.send_replace(Phase::Run);
        run_start
    }

    /// Ends the measured phase begun at `run_start`: switches to [`Phase::Drain`], marks
    /// "published"; returns the seconds the phase lasted.
    pub fn end_run(&self, run_start: Instant) -> f64 {
        self.phase.send_replace(Phase::Drain);
        let secs = run_start.elapsed().as_secs_f64();
        self.monitor.mark("published");
        secs
    }

    /// Waits at most `limit` for `done()`, or until `progress()` has not changed for `quiet`
    /// (whatever has not arrived by then will not); notes "drain time ran out" if the limit
    /// came first; marks "drained".
    pub async fn drain<P: PartialEq + Default>(
        &mut self,
        limit: Duration,
        quiet: Duration,
        mut progress: impl FnMut() -> P,
        mut done: impl FnMut() -> bool,
    ) {
        let limit = self.deadline.cap(Instant::now() + limit);
        let mut last = P::default();
        let mut last_change = Instant::now();
        let drained = wait_until(limit, || {
            let now = progress();
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            done() || last_change.elapsed() > quiet
        })
        .await;
        if !drained {
            self.notes.push("drain time ran out".into());
        }
        self.monitor.mark("drained");
    }

    /// Waits for every task spawned so far to end, however long that takes.
    pub async fn join(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Switches to [`Phase::Close`] and waits at most `limit` for every task to end; aborts
    /// the rest and, with `stragglers` (what the tasks are: "connections"), notes how many.
    pub async fn close(&mut self, limit: Duration, stragglers: Option<&str>) {
        self.phase.send_replace(Phase::Close);
        let limit = self.deadline.cap(Instant::now() + limit);
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(limit.into(), self.tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    if let Some(what) = stragglers {
                        let left = self.tasks.len();
                        self.notes
                            .push(format!("{left} {what} did not close in time"));
                    }
                    self.tasks.abort_all();
                    break;
                }
            }
        }
    }

    /// Notes "hard timeout" if the deadline has passed.
    pub fn note_if_out_of_time(&mut self) {
        if self.deadline.passed() {
            self.notes.push("hard timeout".into());
        }
    }

    /// The result document: `params` (with `mqtt` and `targets` added), `ok` (the scenario's
    /// verdict, and no notes), `notes`, `result`, and the monitor's `processes` and
    /// `kernel_tcp`.
    pub fn finish(
        self,
        scenario: &str,
        mut params: serde_json::Value,
        ok: bool,
        result: impl Serialize,
    ) -> serde_json::Value {
        if let Some(p) = params.as_object_mut() {
            p.insert("mqtt".into(), json!(self.mqtt));
            p.insert("targets".into(), json!(self.targets));
        }
        json!({
            "scenario": scenario,
            "params": params,
            "ok": self.notes.is_empty() && ok,
            "notes": self.notes,
            "result": result,
            "processes": self.monitor.report(),
            "kernel_tcp": self.monitor.tcp(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common() -> Common {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            common: Common,
        }
        Cli::parse_from(["t", "--connect-concurrency", "2", "--client-prefix", "p"]).common
    }

    #[tokio::test]
    async fn set_up_counts_every_outcome_and_notes_what_ran_out() {
        let c = common();
        let mut runner = Runner::new(&c, Duration::from_secs(5), "r");
        assert_eq!(runner.prefix, "p");
        let connector = runner.connector();
        for i in 0..3 {
            let connector = connector.clone();
            runner.spawn(async move {
                let r: Result<(), ()> = connector
                    .set_up(async move {
                        if i == 1 {
                            Err(())
                        } else {
                            Ok(())
                        }
                    })
                    .await;
                let _ = r;
            });
        }
        assert!(runner.wait_set_up(3, "set-up").await);
        runner.deadline = Deadline::after(Duration::ZERO);
        assert!(!runner.wait_set_up(4, "set-up ran out").await);
        runner.note_if_out_of_time();
        assert_eq!(runner.notes, ["set-up ran out", "hard timeout"]);
    }

    #[tokio::test]
    async fn close_follows_phases_and_finish_wraps_the_result() {
        let c = common();
        let mut runner = Runner::new(&c, Duration::from_secs(5), "r");
        let mut phases = runner.phases();
        runner.spawn(async move {
            let _ = phases.wait_for(|p| *p == Phase::Close).await;
        });
        let start = runner.start_run(&AtomicU64::new(0));
        runner.end_run(start);
        runner
            .drain(Duration::from_secs(1), Duration::ZERO, || 0u64, || true)
            .await;
        runner.close(Duration::from_secs(1), Some("clients")).await;
        assert!(runner.notes.is_empty());
        let v = runner.finish("t", json!({"x": 1}), true, json!({"y": 2}));
        assert_eq!(v["scenario"], "t");
        assert_eq!(v["ok"], true);
        assert_eq!(v["params"]["x"], 1);
        assert_eq!(v["params"]["targets"], json!(["127.0.0.1:1883"]));
        assert_eq!(v["result"]["y"], 2);
        assert!(v.get("processes").is_some() && v.get("kernel_tcp").is_some());
    }
}
