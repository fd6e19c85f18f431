//! Worker processes (`[global] workers = N`, N > 1): one supervisor and N workers,
//! each worker a whole daemon for the connections it accepts, past the descriptor
//! limit of one process.
//!
//! - The supervisor ([`supervisor`]) holds the instance lock, binds one listening
//!   socket per worker per listener in an `SO_REUSEPORT` group, attaches the
//!   selection program ([`select`]: the worker is a hash of the client's source
//!   port), starts the
//!   workers one after the other, restarts one that dies, passes SIGHUP on and stops
//!   them all at SIGTERM. It serves no traffic and keeps no async runtime.
//! - Each worker loads its own splice program and maps (its sockets, its event ring,
//!   its counters) under `<pin dir>/worker-K/` (worker 0: the instance's own
//!   directory, as without workers), with one sticky table for all: the pinned
//!   `sticky` map of the instance, so a client id's server chosen through one worker
//!   is the one every worker honours.
//! - Worker 0 is the host's control plane as well: it runs the health checks, the
//!   admin listener and the XDP guard. The others follow its health results
//!   ([`peers::follow_health`]); a runtime change (ctl, admin API) reaches every
//!   worker ([`peers::forward`]), and `ctl` sums the counters of all of them.
//! - `connect_rate_per_client_id` is counted in one table the supervisor maps shared
//!   before it forks ([`rates`]): an id reconnecting through another worker meets the
//!   same rate.
//!
//! Each worker has its own control socket: worker 0 the instance's
//! (`/run/mqttlb/<name>.sock`), worker K `/run/mqttlb/<name>.worker-K.sock`. The
//! supervisor has one for `mqttlb upgrade` (`/run/mqttlb/<name>.supervisor.ctl`),
//! and a link to each worker ([`link`]) through which a hot upgrade reaches it
//! ([`handover`]).

use std::path::{Path, PathBuf};

pub mod handover;
pub mod link;
pub mod peers;
pub mod rates;
pub mod select;
pub mod supervisor;

/// A worker's place among its instance's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    /// From 0; worker 0 also runs the control plane.
    pub index: u32,
    /// How many workers the instance runs.
    pub count: u32,
}

impl Seat {
    /// Whether this worker runs the host's health checks, admin listener and guard.
    pub fn control_plane(self) -> bool {
        self.index == 0
    }
}

/// What the supervisor hands a worker: its seat, its listening socket of each
/// listener (in file order), the pipe it says "ready" on, its link to the
/// supervisor, and in a hot upgrade the channel to the old worker it succeeds.
pub struct Assigned {
    /// Its seat.
    pub seat: Seat,
    /// One listening socket per listener.
    pub sockets: Vec<std::net::TcpListener>,
    /// Written once when the worker accepts.
    pub ready: std::os::fd::OwnedFd,
    /// Its end of the link to the supervisor ([`link`]).
    pub link: crate::upgrade::channel::Channel,
    /// In a hot upgrade: the channel on which the old worker of the same index
    /// hands over.
    pub arrival: Option<std::os::fd::OwnedFd>,
}

/// Tells the supervisor the worker accepts, on the pipe it gave (best effort: a
/// supervisor gone away only misses the word).
pub fn say_ready(pipe: std::os::fd::OwnedFd) {
    use std::io::Write;
    let _ = std::fs::File::from(pipe).write_all(b"r");
}

/// The control socket of worker `index` of `instance`.
pub fn socket_path(instance: &str, index: u32) -> PathBuf {
    match index {
        0 => crate::control::socket_path(instance),
        k => Path::new(crate::control::RUN_DIR).join(format!("{instance}.worker-{k}.sock")),
    }
}

/// Why `config`, without `[global] workers` in its file, runs as one process here
/// rather than one worker per core: the workers could not share one sticky table (no
/// bpffs, or BPF refused to this process: no CAP_BPF, a seccomp filter), so a client
/// id reconnecting through another worker could meet another broker.
pub fn one_process_by_default(config: &crate::config::Config) -> Option<String> {
    if !config.global.workers_by_default || config.global.workers.get() == 1 {
        return None;
    }
    if !crate::bpf::bpffs_mounted() {
        return Some("bpffs is not mounted at /sys/fs/bpf".to_owned());
    }
    crate::sys::bpf_map_probe()
        .err()
        .map(|e| format!("the kernel refuses BPF maps to this process ({e})"))
}

/// The supervisor's control socket of `instance` (it answers `mqttlb upgrade`).
/// Not `.sock`: no instance's control socket has this name.
pub fn supervisor_socket(instance: &str) -> PathBuf {
    Path::new(crate::control::RUN_DIR).join(format!("{instance}.supervisor.ctl"))
}

/// The pin directory of worker `index` of `instance`.
pub fn pin_dir(instance: &str, index: u32) -> PathBuf {
    let dir = crate::bpf::pin_dir(instance);
    match index {
        0 => dir,
        k => dir.join(format!("worker-{k}")),
    }
}

/// The workers of `instance` that have a control socket now, from 0, in order (one
/// when it runs without workers).
pub fn running(instance: &str) -> Vec<u32> {
    let mut found = vec![0];
    found.extend(extra_indexes(
        Path::new(crate::control::RUN_DIR),
        instance,
        ".sock",
    ));
    found.sort_unstable();
    found
}

/// The indexes K >= 1 with an entry `<instance>.worker-K<suffix>` in `dir`.
fn extra_indexes(dir: &Path, instance: &str, suffix: &str) -> Vec<u32> {
    let prefix = format!("{instance}.worker-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix(&prefix)?
                .strip_suffix(suffix)?
                .parse::<u32>()
                .ok()
                .filter(|&k| k > 0)
        })
        .collect()
}

/// The worker pin directories under the instance's (`worker-K`), in order.
pub fn pin_dirs(instance: &str) -> Vec<(u32, PathBuf)> {
    let dir = crate::bpf::pin_dir(instance);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let k = name.strip_prefix("worker-")?.parse::<u32>().ok()?;
            Some((k, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The pinned maps of every worker of `instance`, worker 0's (the instance's own
/// directory) first.
pub fn pinned(instance: &str) -> Result<Vec<crate::bpf::Pinned>, crate::bpf::BpfError> {
    let mut all = vec![crate::bpf::Pinned::open(instance)?];
    for (_, dir) in pin_dirs(instance) {
        all.push(crate::bpf::Pinned::open_dir(dir)?);
    }
    Ok(all)
}

/// Removes what workers K > 0 and the supervisor of an earlier run left (their
/// pins and control sockets); returns how many pins went. The caller holds the instance lock (or
/// knows no daemon runs).
pub fn remove_left_behind(instance: &str) -> usize {
    let mut removed = 0;
    for (_, dir) in pin_dirs(instance) {
        removed += crate::bpf::unpin_dir(&dir, true);
    }
    for k in extra_indexes(Path::new(crate::control::RUN_DIR), instance, ".sock") {
        let _ = std::fs::remove_file(socket_path(instance, k));
    }
    let _ = std::fs::remove_file(supervisor_socket(instance));
    removed
}
