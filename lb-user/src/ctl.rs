//! `mqttlb ctl`: reads a running instance's pinned BPF maps directly, so it answers
//! even while the daemon is busy.

use std::io::Write;

use clap::Subcommand;

use crate::bpf::{BpfError, Pinned};

/// What `ctl` shows.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum CtlCommand {
    /// Spliced connection pairs: client, server, bytes each way.
    Conns,
    /// Global counters of the BPF programs and the daemon.
    Stats,
}

/// Prints the answer to `cmd` for `instance` on `out`.
pub fn run(
    cmd: CtlCommand,
    instance: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let pinned = Pinned::open(instance)?;
    match cmd {
        CtlCommand::Conns => {
            let conns = pinned.conns()?;
            if json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({ "instance": instance, "conns": conns }),
                )?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:>8}  {:<22} {:<22} {:>14} {:>14}  throttled",
                    "id", "client", "server", "bytes_c2s", "bytes_s2c"
                )?;
                for c in &conns {
                    writeln!(
                        out,
                        "{:>8}  {:<22} {:<22} {:>14} {:>14}  {}",
                        c.id,
                        c.client,
                        c.server,
                        c.bytes_c2s,
                        c.bytes_s2c,
                        c.throttled.join(",")
                    )?;
                }
                writeln!(out, "{} spliced connection(s)", conns.len())?;
            }
        }
        CtlCommand::Stats => {
            let stats = pinned.stats()?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> = stats
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).into()))
                    .collect();
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({ "instance": instance, "stats": map }),
                )?;
                writeln!(out)?;
            } else {
                for (k, v) in stats {
                    writeln!(out, "{k:<28} {v}")?;
                }
            }
        }
    }
    Ok(())
}

/// Why `ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The maps could not be read.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// Output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    /// JSON encoding failed.
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}
