//! `mqttlb-loadgen`: the benchmark suite's load generator. Each `run` drives one
//! workload against a target (a proxy, or the server itself for `direct`), with an
//! in-process MQTT echo/sink server where the workload needs one, and prints one JSON
//! object: `{"workload": "W1", "metrics": {...}, "errors": N}`. Every workload is
//! bounded in count and time and stops by itself.
//!
//! Proxy CPU is the machine's busy CPU time (`/proc/stat`) minus this process's and
//! the excluded processes' (a broker): what the proxy spent, in its own process and in
//! the kernel work it causes. Packets come from the project's codec (`mqttlb::mqtt`).

mod cpu;
mod server;
mod tls;
mod workloads;

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

/// Workloads of the suite (docs/BENCHMARKS.md describes each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One connection, bulk bytes each way through an echo server.
    W1,
    /// Many connections publishing small QoS 0 messages at a fixed rate to a sink.
    W2,
    /// Session churn: CONNECT, CONNACK, DISCONNECT from parallel workers.
    W3,
    /// Idle connections: memory per connection.
    W4,
    /// PUBLISH ping-pong on one connection: round-trip latency.
    W5,
    /// Pub/sub through a real broker (QoS 0 and QoS 1).
    W6,
    /// TLS session churn, every handshake full.
    W7,
    /// TLS session churn, sessions resumed (tickets or cache).
    W8,
    /// One TLS connection, bulk bytes each way through an echo server.
    W9,
    /// Not a benchmark: `--connections` MQTT sessions held open through a broker
    /// (the scale test's clients); one JSON line once all are connected, then, after
    /// a line on stdin, a PINGREQ on each and the PINGRESPs counted.
    Hold,
}

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "mqttlb-loadgen",
    about = "Load generator of the mqttlb benchmark suite"
)]
pub struct Args {
    /// Workload to run.
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Where the clients connect (the proxy, or the server for `direct`).
    #[arg(long)]
    pub target: SocketAddr,
    /// Where the in-process echo/sink server listens (W1-W5).
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// The short variant (for `cargo xtask bench --quick`).
    #[arg(long)]
    pub quick: bool,
    /// Processes whose CPU is not the proxy's, besides this one (e.g. the broker).
    #[arg(long = "exclude-pid")]
    pub exclude_pids: Vec<u32>,
    /// The proxy's processes (W4 measures their RSS).
    #[arg(long = "proxy-pid")]
    pub proxy_pids: Vec<u32>,
    /// CA of the proxy's TLS certificate (W7-W9).
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Sessions to hold (`hold`).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// W4: seconds the connections stay idle before the proxy's memory is read (by
    /// hand, e.g. past `auto`'s `promote_after` to see a promoted pair's memory).
    #[arg(long, default_value_t = 2)]
    pub idle_secs: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqttlb-loadgen: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(workloads::run(&args)) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqttlb-loadgen: {:?}: {e:#}", args.workload);
            std::process::ExitCode::from(1)
        }
    }
}

/// Tens of thousands of sockets need more than the default descriptor limit; as root
/// the hard limit can be raised too.
fn raise_fd_limit() {
    let want = 1_000_000;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
