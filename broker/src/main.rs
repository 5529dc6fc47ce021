//! `jetmq-broker`: command line, configuration, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jetmq_broker::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;

// glibc malloc showed up as ~20% of the broker's CPU in a QoS 1 fan-in profile
// (_int_malloc, malloc_consolidate, unlink_chunk); mimalloc's thread-local free lists avoid it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "jetmq-broker",
    version,
    about = "Stateless MQTT 3.1.1/5.0 node over NATS JetStream"
)]
struct Cli {
    /// TOML configuration file; every key can also be set as JETMQ_<SECTION>__<KEY>.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// MQTT over TCP (default 0.0.0.0:1883).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP for /healthz, /readyz and /metrics.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// NATS server URLs, comma separated; a name with several addresses means all of them.
    #[arg(long, value_delimiter = ',', global = true)]
    nats: Option<Vec<String>>,
    /// This node's id (default: host name); for `drain`, the node to drain.
    #[arg(long, global = true)]
    node_id: Option<String>,
    /// Load and validate the configuration (file, environment, flags), print it, exit 0
    /// if it is valid and 2 if not. Reads certificate files but connects to nothing.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a password from stdin (first line) and print its argon2id hash for auth.users.
    HashPassword,
    /// Resolve a cluster's DNS name, connect to every address with MQTT and print what each
    /// node reports in $SYS (exit 1 if any address is unreachable).
    Check(jetmq_broker::check::CheckArgs),
    /// Ask the node --node-id, reached over NATS (--nats, or nats.* of --config), to drain:
    /// unready, stop accepting, send its clients away in waves, write their sessions back, exit.
    Drain {
        /// How long to wait for the node's answer, seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Generate the NATS credentials of a new cluster into --out: NKEY seeds broker.nk and
    /// ingestor.nk (mode 0600), the server include auth.conf (users and permissions), and
    /// with --routes a route secret and routes.conf to include inside `cluster { }`.
    NatsAuth {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// host:port of every NATS route listener of the cluster, comma separated.
        #[arg(long, value_delimiter = ',', value_name = "HOST:PORT")]
        routes: Vec<String>,
        /// Replace existing keys (every server and client then needs the new files).
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Keep the keys that exist, create what is missing, rewrite the includes.
        #[arg(long)]
        if_missing: bool,
    },
}

fn current_thread_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(err) => {
            eprintln!("jetmq-broker: cannot start runtime: {err}");
            None
        }
    }
}

fn check(args: jetmq_broker::check::CheckArgs) -> ExitCode {
    let Some(runtime) = current_thread_runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(jetmq_broker::check::run(&args)) {
        Ok(reports) => {
            print!("{}", jetmq_broker::check::render(&reports));
            if reports.iter().all(|r| r.reachable()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("jetmq-broker check: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn drain(config: &Config, timeout: u64) -> ExitCode {
    let Some(runtime) = current_thread_runtime() else {
        return ExitCode::FAILURE;
    };
    let answer = runtime.block_on(jetmq_broker::cluster::request_drain(
        &config.nats,
        &config.dns,
        &config.node_id,
        std::time::Duration::from_secs(timeout),
    ));
    match answer {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("jetmq-broker: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(err) = std::io::stdin().read_line(&mut line) {
        eprintln!("jetmq-broker: cannot read the password from stdin: {err}");
        return ExitCode::FAILURE;
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("jetmq-broker: empty password");
        return ExitCode::from(2);
    }
    match jetmq_broker::authn::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("jetmq-broker: {err}");
            ExitCode::FAILURE
        }
    }
}

fn nats_auth(options: jetmq_common::natsauth::Options) -> ExitCode {
    match jetmq_common::natsauth::generate(&options) {
        Ok(generated) => {
            for path in &generated.written {
                println!("wrote {}", path.display());
            }
            for path in &generated.kept {
                println!("kept {}", path.display());
            }
            for (role, key) in &generated.public_keys {
                println!("{}: {key}", role.name());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("jetmq-broker nats-auth: {err}");
            ExitCode::from(2)
        }
    }
}

fn check_config(config: &Config) -> ExitCode {
    // What Config::load cannot see: certificate and key files are read at start-up.
    if let Err(err) = jetmq_broker::transport::Edge::new(config) {
        eprintln!("jetmq-broker: {err:#}");
        return ExitCode::from(2);
    }
    if let Err(err) = jetmq_broker::authn::Authenticator::new(&config.auth) {
        eprintln!("jetmq-broker: {err:#}");
        return ExitCode::from(2);
    }
    // A summary rather than the whole configuration: that holds secrets (NATS token,
    // JWT key, password hashes) that do not belong in a terminal or a CI log.
    let listeners: Vec<String> = jetmq_broker::transport::listeners(&config.listen)
        .into_iter()
        .map(|(kind, addr)| format!("{kind} {addr}"))
        .collect();
    println!(
        "configuration ok: node_id={} mqtt=[{}] http={} nats=[{}]",
        config.node_id,
        listeners.join(", "),
        config
            .listen
            .http
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        config.nats.urls.join(", ")
    );
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let drain_timeout = match cli.command {
        Some(Command::HashPassword) => return hash_password(),
        Some(Command::Check(args)) => return check(args),
        Some(Command::NatsAuth {
            out,
            routes,
            force,
            if_missing,
        }) => {
            return nats_auth(jetmq_common::natsauth::Options {
                dir: out,
                force,
                if_missing,
                routes,
            })
        }
        Some(Command::Drain { timeout }) => {
            if cli.node_id.is_none() {
                eprintln!("jetmq-broker: drain needs --node-id (the node to drain)");
                return ExitCode::from(2);
            }
            Some(timeout)
        }
        _ => None,
    };
    let overrides = Overrides {
        node_id: cli.node_id,
        listen_tcp: cli.listen,
        listen_http: cli.http_listen,
        nats_urls: cli.nats,
    };
    let config = match Config::load(cli.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("jetmq-broker: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(timeout) = drain_timeout {
        return drain(&config, timeout);
    }
    if cli.check_config {
        return check_config(&config);
    }
    jetmq_broker::telemetry::init_logging(&config);
    if let Err(err) = jetmq_broker::telemetry::init_tracing(&config) {
        eprintln!("jetmq-broker: {err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("jetmq-broker: cannot start runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let drain = CancellationToken::new();
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signal(drain.clone(), shutdown.clone()));
        match jetmq_broker::server::run(config, drain, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(error = format!("{err:#}"), "fatal");
                ExitCode::FAILURE
            }
        }
    });
    drop(runtime);
    jetmq_broker::telemetry::shutdown_tracing();
    code
}

/// The first SIGTERM / SIGINT drains the node; a second one stops it at once.
async fn wait_for_signal(drain: CancellationToken, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested: draining (signal again to stop at once)");
    drain.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: stopping at once");
    shutdown.cancel();
}
