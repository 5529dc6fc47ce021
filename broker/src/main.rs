//! `jetmq-broker`: command line, configuration, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jetmq_broker::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "jetmq-broker",
    version,
    about = "Stateless MQTT 3.1.1/5.0 node over NATS JetStream"
)]
struct Cli {
    /// TOML configuration file; every key can also be set as JETMQ_<SECTION>__<KEY>.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// MQTT over TCP (default 0.0.0.0:1883).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP for /healthz, /readyz and /metrics.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// NATS server URLs, comma separated; a name with several addresses means all of them.
    #[arg(long, value_delimiter = ',')]
    nats: Option<Vec<String>>,
    /// This node's id (default: host name).
    #[arg(long)]
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
    if let Some(Command::HashPassword) = cli.command {
        return hash_password();
    }
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
    if cli.check_config {
        return check_config(&config);
    }
    jetmq_broker::telemetry::init_logging(&config.log);
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
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signal(shutdown.clone()));
        match jetmq_broker::server::run(config, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(error = format!("{err:#}"), "fatal");
                ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
