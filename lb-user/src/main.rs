//! The `mqttlb` command: `run`, `check` and `ctl`.
//!
//! Exit codes: 0 success, 1 bad configuration or usage, 2 runtime failure.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mqttlb::{
    config::{Config, DataPlaneKind},
    ctl::{self, CtlCommand},
    daemon,
};

#[derive(Parser)]
#[command(
    name = "mqttlb",
    version,
    about = "Load balancer for MQTT broker clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer.
    Run {
        /// Configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Overrides [global] data_plane.
        #[arg(long, value_enum)]
        data_plane: Option<DataPlaneKind>,
        /// Log lines as text, or as one JSON object per line (stable field names:
        /// timestamp, level, target, message and the event's own fields).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Check a configuration file and exit.
    Check {
        /// Configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Hot upgrade of a running instance: a new process (this binary's file as it is
    /// now, or --binary) takes over the listeners and the established connections,
    /// and the old one exits.
    Upgrade {
        /// The binary to start (default: the file the daemon was started from).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Instance name ([global] name).
        #[arg(long, default_value = "default")]
        instance: String,
    },
    /// Inspect an instance: its pinned BPF maps and, while it runs, the daemon itself.
    Ctl {
        #[command(subcommand)]
        what: CtlCommand,
        /// Print one JSON document.
        #[arg(long, global = true)]
        json: bool,
        /// Instance name ([global] name).
        #[arg(long, global = true, default_value = "default")]
        instance: String,
    },
}

/// How log lines are written (on stderr).
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs on stderr at `RUST_LOG` (default `info`) in `format`.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only for a terminal, not for log files or journald.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// Asks the daemon of `instance` for a hot upgrade to `binary` and says what it did.
fn upgrade(binary: Option<PathBuf>, instance: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let binary = match binary {
        // The daemon runs elsewhere: it needs the whole path.
        Some(b) => {
            Some(std::fs::canonicalize(&b).with_context(|| format!("--binary {}", b.display()))?)
        }
        None => None,
    };
    let request = match &binary {
        Some(b) => format!("upgrade {}", b.display()),
        None => "upgrade".to_owned(),
    };
    // With `[global] workers` the supervisor upgrades (its workers with it).
    let supervisor = mqttlb::workers::supervisor_socket(instance);
    let socket = match supervisor.exists() {
        true => supervisor,
        false => mqttlb::control::socket_path(instance),
    };
    let wait = mqttlb::control::UPGRADE_WAIT + std::time::Duration::from_secs(5);
    let answer = mqttlb::control::query_waiting(&socket, &request, wait).with_context(|| {
        format!(
            "instance {instance:?} (control socket {}); is it running?",
            socket.display()
        )
    })?;
    let summary: mqttlb::upgrade::Summary =
        serde_json::from_value(answer["upgraded"].clone()).context("unexpected answer")?;
    Ok(format!(
        "upgraded: new process {}, {} connections handed over, {} kept by the old process until they end",
        summary.pid, summary.handed, summary.kept
    ))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in errors.0 {
                    eprintln!("{}: {e}", config.display());
                }
                ExitCode::from(1)
            }
        },
        Command::Upgrade { binary, instance } => match upgrade(binary, &instance) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mqttlb upgrade: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Ctl {
            what,
            json,
            instance,
        } => match ctl::run(what, &instance, json, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            // `mqttlb ctl conns | head`: the reader has all it wanted.
            Err(ctl::CtlError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mqttlb ctl: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run {
            config: path,
            data_plane,
            log_format,
        } => {
            init_logs(log_format);
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    for e in errors.0 {
                        eprintln!("{}: {e}", path.display());
                    }
                    return ExitCode::from(1);
                }
            };
            let mut config = config;
            if let Some(why) = mqttlb::workers::one_process_by_default(&config) {
                tracing::info!(
                    "one process, not one worker per core: {why}; each worker would keep its own sticky table (set [global] workers to choose)"
                );
                config.global.workers = std::num::NonZeroU32::MIN;
            }
            if config.global.workers.get() > 1 {
                return match mqttlb::workers::supervisor::run(path, config, data_plane) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("mqttlb: {e}");
                        ExitCode::from(2)
                    }
                };
            }
            // Started by a hot upgrade: the old process's sockets, instead of binding.
            let (arrival, inherited) = match mqttlb::upgrade::new::arrive() {
                None => (None, None),
                Some(Ok((arrival, inherited))) => (Some(arrival), Some(inherited)),
                Some(Err(e)) => {
                    eprintln!("mqttlb: {e}");
                    return ExitCode::from(2);
                }
            };
            // Before the runtime: its threads would keep the privileges dropped here.
            let prepared = match daemon::prepare(&config, data_plane, None, inherited) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("mqttlb: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mqttlb: cannot start the runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(daemon::run(path, config, prepared, arrival)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqttlb: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
