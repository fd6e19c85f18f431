//! 20,000 concurrent MQTT sessions through one host, each answering a PINGREQ at the
//! end with a real broker's PINGRESP. One process here may hold 20,000 descriptors,
//! so the load is spread: one mqttlb with three workers (`[global] workers`, the
//! default `auto` plane, idle sessions promoted to the splice after 2 s), three
//! mosquitto brokers behind it, and three client processes (`mqttlb-loadgen
//! --workload hold`, 16 source addresses each). Reports the RSS of the balancer (its
//! supervisor and workers) and the machine's kernel memory per session.
//! `MQTTLB_SCALE_SESSIONS=100000` runs the same with more of each (a worker, a broker
//! and a client process per 6,700 sessions), for the figure in docs/BENCHMARKS.md.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use tests::*;

/// Sessions in all (CI), spread over workers and client processes holding about
/// [`PER_PROCESS`] each (two descriptors a session in a worker, under 20,000).
const SESSIONS: usize = 20_000;
const PER_PROCESS: usize = 6_700;

/// A client process holding its sessions until told to ping.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Holder {
    fn start(target: std::net::SocketAddr, sessions: usize) -> Self {
        let loadgen = bin().with_file_name("mqttlb-loadgen");
        let mut child = Command::new(&loadgen)
            .args(["--workload", "hold", "--target", &target.to_string()])
            .args(["--connections", &sessions.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (built by cargo build --workspace --all-targets)",
                    loadgen.display()
                )
            });
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The next JSON line the process prints.
    fn line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("loadgen output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn ping(&mut self) {
        let mut stdin = self.stdin.take().expect("stdin");
        stdin.write_all(b"ping\n").expect("tell the holder");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn twenty_thousand_sessions_through_one_host_each_answer_a_ping() {
    if !privileged("20,000 sessions (BPF maps for the promoted ones)") {
        return;
    }
    let sessions: usize = std::env::var("MQTTLB_SCALE_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SESSIONS);
    let shards = sessions.div_ceil(PER_PROCESS);
    let brokers: Vec<Mosquitto> = (0..shards)
        .map(|_| Mosquitto::start_with(free_port(), "max_keepalive 65535\n"))
        .collect();
    let addrs: Vec<_> = brokers.iter().map(|b| b.addr).collect();
    let lb = Daemon::start_edited("auto", &addrs, |t| {
        t.replace(
            "data_plane = \"auto\"\n",
            "data_plane = \"auto\"\nmax_connections = 10000\n",
        )
        .replace("[global]\n", &format!("[global]\nworkers = {shards}\n"))
        .replace(
            "connect_timeout = \"1s\"\n",
            "connect_timeout = \"5s\"\npromote_after = \"2s\"\n",
        )
    });
    wait_for_sync("every worker accepting", Duration::from_secs(60), || {
        lb.log().contains("all workers accepting")
    });
    let rss = || tree_rss(lb.pid());
    let (rss0, kernel0) = (rss(), kernel_bytes());
    let started = Instant::now();
    let mut holders: Vec<Holder> = (0..shards)
        .map(|i| {
            Holder::start(
                lb.addr,
                sessions / shards + usize::from(i < sessions % shards),
            )
        })
        .collect();
    let mut connected = 0;
    for h in &mut holders {
        let up = h.line();
        assert_eq!(up["errors"], 0, "{up}");
        connected += up["connected"].as_u64().expect("connected") as usize;
    }
    let took = started.elapsed();
    assert_eq!(connected, sessions);
    let (rss_copy, kernel_copy) = (rss(), kernel_bytes());
    // Idle past `promote_after`: the sessions move to the splice.
    wait_for_sync("every session promoted", Duration::from_secs(30), || {
        let stats = lb.ctl("stats")["stats"].clone();
        stats["promoted"] == sessions as u64 && stats["spliced_active"] == sessions as u64
    });
    // Every worker carried its share (the selection program spreads source ports).
    let stats = lb.ctl("stats");
    for (k, w) in stats["workers"]
        .as_array()
        .expect("per worker")
        .iter()
        .enumerate()
    {
        let carried = w["promoted"].as_u64().unwrap_or(0) as usize;
        assert!(
            carried > sessions / shards / 2 && carried < PER_PROCESS * 3 / 2,
            "worker {k} carried {carried} of {sessions}"
        );
    }
    let (rss1, kernel1) = (rss(), kernel_bytes());
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / sessions as f64;
    eprintln!(
        "{sessions} sessions up in {:.1} s. Per session, on the copy plane: balancers' RSS \
         {:.0} bytes, kernel (whole machine: client, balancer and broker sockets) {:.0} \
         bytes; all spliced: RSS {:.0}, kernel {:.0}",
        took.as_secs_f64(),
        per(rss_copy, rss0),
        per(kernel_copy, kernel0),
        per(rss1, rss0),
        per(kernel1, kernel0)
    );
    for h in &mut holders {
        h.ping();
    }
    let mut pongs = 0;
    for h in &mut holders {
        let done = h.line();
        assert_eq!(done["errors"], 0, "{done}");
        pongs += done["metrics"]["pingresp"].as_u64().expect("pingresp");
    }
    assert_eq!(pongs, sessions as u64, "PINGRESPs");
    assert_eq!(lb.stat("aborted"), 0, "{}", lb.log());
    assert_eq!(lb.stat("local_resource_errors"), 0, "{}", lb.log());
}

/// Resident memory of `pid` and its children (the supervisor and its workers), bytes.
fn tree_rss(pid: u32) -> u64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let rss_of = |pid: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    rss_of(&pid.to_string()) + children.split_whitespace().map(rss_of).sum::<u64>()
}

/// Polls `ok` every 100 ms until it holds, or panics after `limit`.
fn wait_for_sync(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
