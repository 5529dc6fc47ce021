use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jetmq_common::otel;
use jetmq_ingestor::config::{Config, Overrides};
use jetmq_ingestor::{ingest, mapping};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Consumes one share of jetmq's message stream (NATS JetStream) and writes it into Kafka.
///
/// Configuration: defaults < --config FILE.toml < JETMQ_<SECTION>__<KEY> environment
/// variables < flags. See docs/ingestor.md.
#[derive(Debug, Parser)]
#[command(
    name = "jetmq-ingestor",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Ingestor id, 1-based: consumes share N-1 (subjects jetmq.s.<N-1>.>).
    #[arg(long = "mqtt-id", value_name = "N")]
    mqtt_id: Option<u32>,
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// NATS server URLs, comma-separated (nats.urls).
    #[arg(long, value_name = "URL[,URL]")]
    nats: Option<String>,
    /// Kafka bootstrap servers, comma-separated (kafka.bootstrap_servers).
    #[arg(long, value_name = "HOST:PORT[,...]")]
    kafka: Option<String>,
    /// Prometheus endpoint address (metrics.listen).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Kafka record key: topic, client_id or none (routing.key_mode).
    #[arg(long, value_name = "MODE")]
    key_mode: Option<String>,
    /// Kafka topic for messages no rule matches (routing.default_topic).
    #[arg(long, value_name = "TOPIC")]
    default_topic: Option<String>,
    /// Dead-letter Kafka topic, empty to disable (routing.dead_letter_topic).
    #[arg(long, value_name = "TOPIC")]
    dead_letter_topic: Option<String>,
    /// Durable consumer name prefix (nats.consumer_prefix).
    #[arg(long, value_name = "PREFIX")]
    consumer_prefix: Option<String>,
    /// Print the effective configuration (as JSON) and exit.
    #[arg(long)]
    print_config: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print (or write) the nats-server `mappings` block that splits the flow over N shares.
    Mapping {
        /// Number of ingestors (shares).
        #[arg(long, value_name = "N")]
        ingestors: u32,
        /// partition: per-topic hash (keeps order); weighted: random per message.
        #[arg(long, value_enum, default_value = "partition")]
        mode: mapping::Mode,
        /// Weighted mode: one positive percentage per ingestor, summing to 100.
        #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
        weights: Option<Vec<u32>>,
        /// Write the block to FILE (atomically) instead of printing it.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal (and without NO_COLOR): container logs and log files get
    // plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn mapping_command(
    ingestors: u32,
    mode: mapping::Mode,
    weights: Option<Vec<u32>>,
    output: Option<PathBuf>,
) -> ExitCode {
    if mode == mapping::Mode::Partition && weights.is_some() {
        eprintln!("jetmq-ingestor mapping: --weights only applies to --mode weighted");
        return ExitCode::from(2);
    }
    let block = match mapping::generate(ingestors, mode, weights.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("jetmq-ingestor mapping: {e}");
            return ExitCode::from(2);
        }
    };
    match output {
        None => {
            print_out(&block);
            ExitCode::SUCCESS
        }
        Some(path) => match mapping::write_atomically(&path, &block) {
            Ok(()) => {
                eprintln!("wrote {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "jetmq-ingestor mapping: cannot write {}: {e}",
                    path.display()
                );
                ExitCode::from(1)
            }
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Mapping {
        ingestors,
        mode,
        weights,
        output,
    }) = cli.command
    {
        return mapping_command(ingestors, mode, weights, output);
    }
    let overrides = Overrides {
        nats_urls: cli.nats,
        kafka_bootstrap_servers: cli.kafka,
        metrics_listen: cli.metrics_listen,
        key_mode: cli.key_mode,
        default_topic: cli.default_topic,
        dead_letter_topic: cli.dead_letter_topic,
        consumer_prefix: cli.consumer_prefix,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jetmq-ingestor: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        match serde_json::to_string_pretty(&config.redacted()) {
            Ok(s) => {
                print_out(&format!("{s}\n"));
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("jetmq-ingestor: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let Some(mqtt_id) = cli.mqtt_id else {
        eprintln!(
            "jetmq-ingestor: --mqtt-id N is required (N >= 1; ingestor N consumes share N-1)"
        );
        return ExitCode::from(2);
    };
    if mqtt_id == 0 {
        eprintln!("jetmq-ingestor: --mqtt-id must be at least 1 (ingestor N consumes share N-1)");
        return ExitCode::from(2);
    }
    init_logging(cli.log_json || config.telemetry.log_format == otel::LogFormat::Json);
    // Before the runtime: the OTLP exporter's blocking HTTP client owns a runtime of its own.
    match otel::Tracing::init(
        &config.telemetry,
        "jetmq-ingestor",
        &format!("ingestor-{mqtt_id}"),
    ) {
        Ok(Some(t)) => otel::install(t),
        Ok(None) => {}
        Err(e) => {
            eprintln!("jetmq-ingestor: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetmq-ingestor: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = tx.send(true);
        });
        ingest::run(config, mqtt_id, rx).await
    });
    drop(runtime);
    otel::shutdown_global();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
