//! Loading the eBPF object, pinning its maps under `/sys/fs/bpf/mqttlb/<instance>/`, and
//! typed access to those maps for the daemon and for `mqttlb ctl`.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, RingBuf, SockHash},
    programs::SkSkb,
};
use lb_common::{
    BackendInfo, ConnInfo, DaemonStat, LAG_STEP_GLOBAL, PIN_ROOT, SockInfo, StickyKey, StickyValue,
    VERDICT_PROGRAM, maps,
};

/// The compiled splice program (built by `build.rs`).
static SPLICE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splice.bpf.o"));

mod kfunc;
mod pinned;
mod pins;
#[cfg(test)]
mod tests;

use kfunc::with_kfunc_ids;
pub use pinned::{ConnView, Pinned};
pub use pins::{InstanceLock, own_dir, pin_dir, unpin_dir};
use pins::{is_bpffs, keep_sticky_if_compatible};

/// Whether bpffs is mounted where the pins go (`/sys/fs/bpf`): without it nothing
/// is pinned, so workers cannot share the sticky table.
pub fn bpffs_mounted() -> bool {
    is_bpffs(Path::new("/sys/fs/bpf"))
}

/// Why BPF could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// bpffs is not mounted where the pins go.
    #[error("bpffs is not mounted at /sys/fs/bpf: run `mount -t bpf bpf /sys/fs/bpf` as root")]
    NoBpffs,
    /// Another daemon holds this instance.
    #[error(
        "another mqttlb with instance name {name:?} is running (lock {path}); give this one another [global] name"
    )]
    InstanceBusy {
        /// Instance name.
        name: String,
        /// Lock file.
        path: String,
    },
    /// Filesystem work under the pin directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path involved.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// `ctl` may not read the pins.
    #[error(
        "reading {path} needs root (or CAP_BPF and CAP_SYS_ADMIN for pinned BPF objects): {source}"
    )]
    Privilege {
        /// What could not be read.
        path: String,
        /// The refusal (EACCES, EPERM).
        source: io::Error,
    },
    /// The kernel refused the object, a map or the program.
    #[error(
        "loading the eBPF splice program failed (needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and a kernel with sockmap): {0}"
    )]
    Load(String),
    /// A directory on the pin path is not safely ours.
    #[error(
        "refusing to use {path}: it {why}; remove it (or fix its owner and mode) and start again"
    )]
    Unsafe {
        /// The directory.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A map is missing or of the wrong type in the object or pin directory.
    #[error("BPF map {name:?}: {reason}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The two sockets of a spliced pair, by socket cookie, with their descriptors.
#[derive(Debug, Clone, Copy)]
pub struct PairSockets {
    /// Client socket cookie and descriptor.
    pub client: (u64, std::os::fd::RawFd),
    /// Server socket cookie and descriptor.
    pub server: (u64, std::os::fd::RawFd),
}

/// A map operation the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("BPF map {map:?}: {source}")]
pub struct MapOpError {
    /// The map.
    pub map: &'static str,
    /// The refusal.
    pub source: aya::maps::MapError,
}

/// The kernel refused a pair at insertion.
#[derive(Debug)]
pub struct InsertRefused {
    /// Why.
    pub error: MapOpError,
    /// Which sockets (client, server) made it into `sources` (their verdict runs).
    pub in_sources: [bool; 2],
}

/// The loaded splice program and the maps the daemon writes. The maps are private:
/// the methods below keep the order the kernel needs (a pair's bookkeeping before its
/// redirect targets, `sources` last in and first out).
pub struct Bpf {
    /// Keeps the program (and its attachment) alive.
    _ebpf: Ebpf,
    /// Where the maps are pinned.
    pin_dir: PathBuf,
    /// Sockets whose bytes are redirected.
    sources: Mutex<SockHash<MapData, u64>>,
    /// Redirect destinations.
    targets: Mutex<SockHash<MapData, u64>>,
    /// Per-socket info and counters.
    socks: Mutex<HashMap<MapData, u64, SockInfo>>,
    /// Per-socket throttle words (`lb_common::CTRL_THROTTLE`).
    ctrl: Mutex<HashMap<MapData, u64, u64>>,
    /// Per-connection info.
    conns: Mutex<HashMap<MapData, u32, ConnInfo>>,
    /// Servers as the daemon sees them, and the rows last written there.
    backends: Mutex<Published<HashMap<MapData, u32, BackendInfo>, BackendInfo>>,
    /// The sticky table (kept across restarts).
    sticky: Mutex<HashMap<MapData, StickyKey, StickyValue>>,
    /// Published daemon counters, and the values last written there (none yet: the
    /// first publication writes every slot).
    daemon_stats: Mutex<Published<Array<MapData, u64>, Option<u64>>>,
    /// Events from the program; taken once by the event loop.
    events: Mutex<Option<RingBuf<MapData>>>,
}

/// A map the daemon publishes to four times a second, with the values it last wrote
/// there (only changes are written).
struct Published<M, V> {
    map: M,
    last: Vec<V>,
}

fn map_err(name: &'static str, e: impl std::fmt::Display) -> BpfError {
    BpfError::Map {
        name,
        reason: e.to_string(),
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, BpfError> {
    ebpf.take_map(name)
        .ok_or_else(|| map_err(name, "missing from the object"))
}

/// Removes the pins of maps that describe a previous daemon's sockets (meaningless
/// now).
fn remove_per_process_pins(dir: &Path) -> Result<(), BpfError> {
    for name in maps::PER_PROCESS {
        let p = dir.join(name);
        if let Err(e) = std::fs::remove_file(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(BpfError::Io {
                what: "cannot remove stale pin",
                path: p.display().to_string(),
                source: e,
            });
        }
    }
    Ok(())
}

/// Checks that every per-process map pinned in `dir` has the layout `object` defines
/// (type, key and value sizes, capacity): what a new binary loading over a running
/// daemon's maps needs.
fn same_layout_as_pinned(dir: &Path, object: &[u64]) -> Result<(), BpfError> {
    let parsed = aya_obj::Object::parse(bytemuck::cast_slice(object))
        .map_err(|e| BpfError::Load(e.to_string()))?;
    for name in maps::PER_PROCESS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let differs = |why: String| BpfError::Map {
            name,
            reason: format!(
                "the running daemon's pinned map {} {why}: this binary cannot take over its connections; restart instead",
                path.display()
            ),
        };
        let ours = parsed
            .maps
            .get(name)
            .ok_or_else(|| differs("is not in this binary's program".to_owned()))?;
        let pinned = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| differs(format!("cannot be read ({e})")))?;
        let theirs = (pinned.key_size(), pinned.value_size(), pinned.max_entries());
        let mine = (ours.key_size(), ours.value_size(), ours.max_entries());
        if theirs != mine || pinned.map_type().ok().map(|t| t as u32) != Some(ours.map_type()) {
            return Err(differs(format!(
                "has another layout (key, value, entries {theirs:?}; this binary's {mine:?})"
            )));
        }
    }
    Ok(())
}

impl Bpf {
    /// Loads and attaches the splice program for `instance`, pinning its maps.
    /// `lag_step` is the redirected byte count between two lag-check events;
    /// `sticky_size` the capacity of the sticky table; `trusted_owner` a uid besides
    /// this process's that may own the instance's pin directory (`[global] user`,
    /// which an earlier run handed it to). The caller holds the instance's
    /// [`InstanceLock`] (with workers, their supervisor does). `worker`: its index
    /// with `[global] workers` (0 without): worker K > 0 pins under `worker-K/` and
    /// shares worker 0's sticky table, which worker 0 (started first) has checked.
    ///
    /// `adopt` (the new process of a hot upgrade): the per-process maps the running
    /// daemon pinned are loaded over instead of removed, so its spliced sockets stay
    /// where they are; a map whose layout differs from this object's refuses the
    /// load (the upgrade then fails and the old process serves on).
    pub fn load(
        instance: &str,
        worker: u32,
        lag_step: u64,
        sticky_size: u32,
        (trusted_owner, adopt): (Option<u32>, bool),
    ) -> Result<Self, BpfError> {
        if !bpffs_mounted() {
            return Err(BpfError::NoBpffs);
        }
        let instance_dir = pin_dir(instance);
        let dir = crate::workers::pin_dir(instance, worker);
        own_dir(Path::new(PIN_ROOT), None)?;
        own_dir(&instance_dir, trusted_owner)?;
        own_dir(&dir, trusted_owner)?;
        let object = with_kfunc_ids(SPLICE_OBJECT)?;
        if adopt {
            same_layout_as_pinned(&dir, &object)?;
        } else {
            remove_per_process_pins(&dir)?;
        }
        if worker == 0 {
            keep_sticky_if_compatible(&dir, sticky_size)?;
        }
        let sticky_pin = instance_dir.join(maps::STICKY);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_pin_path(maps::STICKY, sticky_pin.as_path())
            .map_max_entries(maps::STICKY, sticky_size)
            .override_global(LAG_STEP_GLOBAL, &lag_step, true)
            .load(bytemuck::cast_slice(&object))
            .map_err(|e| BpfError::Load(e.to_string()))?;

        let sources: SockHash<MapData, u64> = SockHash::try_from(take(&mut ebpf, maps::SOURCES)?)
            .map_err(|e| map_err(maps::SOURCES, e))?;
        {
            let prog: &mut SkSkb = ebpf
                .program_mut(VERDICT_PROGRAM)
                .ok_or_else(|| {
                    BpfError::Load(format!("program {VERDICT_PROGRAM} missing from the object"))
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| BpfError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| BpfError::Load(format!("verifier: {e}")))?;
            let fd = sources
                .fd()
                .try_clone()
                .map_err(|e| BpfError::Load(e.to_string()))?;
            prog.attach(&fd)
                .map_err(|e| BpfError::Load(format!("attach to sources: {e}")))?;
        }
        let targets = SockHash::try_from(take(&mut ebpf, maps::TARGETS)?)
            .map_err(|e| map_err(maps::TARGETS, e))?;
        let socks = HashMap::try_from(take(&mut ebpf, maps::SOCKS)?)
            .map_err(|e| map_err(maps::SOCKS, e))?;
        let ctrl =
            HashMap::try_from(take(&mut ebpf, maps::CTRL)?).map_err(|e| map_err(maps::CTRL, e))?;
        let conns = HashMap::try_from(take(&mut ebpf, maps::CONNS)?)
            .map_err(|e| map_err(maps::CONNS, e))?;
        let backends = HashMap::try_from(take(&mut ebpf, maps::BACKENDS)?)
            .map_err(|e| map_err(maps::BACKENDS, e))?;
        let sticky = HashMap::try_from(take(&mut ebpf, maps::STICKY)?)
            .map_err(|e| map_err(maps::STICKY, e))?;
        let daemon_stats = Array::try_from(take(&mut ebpf, maps::DAEMON_STATS)?)
            .map_err(|e| map_err(maps::DAEMON_STATS, e))?;
        let events = RingBuf::try_from(take(&mut ebpf, maps::EVENTS)?)
            .map_err(|e| map_err(maps::EVENTS, e))?;
        Ok(Self {
            _ebpf: ebpf,
            pin_dir: dir,
            sources: Mutex::new(sources),
            targets: Mutex::new(targets),
            socks: Mutex::new(socks),
            ctrl: Mutex::new(ctrl),
            conns: Mutex::new(conns),
            backends: Mutex::new(Published {
                map: backends,
                last: Vec::new(),
            }),
            sticky: Mutex::new(sticky),
            daemon_stats: Mutex::new(Published {
                map: daemon_stats,
                last: vec![None; DaemonStat::ALL.len()],
            }),
            events: Mutex::new(Some(events)),
        })
    }

    /// Enters a pair: its sockets' counters and throttle words, its `conns` row and its
    /// redirect targets, then `sources` (from then on the program verdicts its skbs).
    /// `track_server`: the program follows the MQTT packets the server sends from this
    /// position (`mqtt::boundary::Boundary::raw`). On refusal, `in_sources` says which
    /// sockets the program already sees.
    pub fn insert_pair(
        &self,
        id: u32,
        info: ConnInfo,
        s: PairSockets,
        track_server: Option<u64>,
    ) -> Result<(), InsertRefused> {
        let refused = |map, in_sources| {
            move |source| InsertRefused {
                error: MapOpError { map, source },
                in_sources,
            }
        };
        let (client, server) = (s.client.0, s.server.0);
        let sock = |peer_cookie, dir| SockInfo {
            peer_cookie,
            conn_id: id,
            dir,
            ..SockInfo::default()
        };
        {
            let mut socks = self.socks.lock().expect("socks lock");
            socks
                .insert(client, sock(server, lb_common::DIR_CLIENT_TO_SERVER), 0)
                .map_err(refused(maps::SOCKS, [false; 2]))?;
            let mut from_server = sock(client, lb_common::DIR_SERVER_TO_CLIENT);
            if let Some(position) = track_server {
                from_server.flags = lb_common::SOCK_TRACK_MQTT;
                from_server.mqtt = position;
            }
            socks
                .insert(server, from_server, 0)
                .map_err(refused(maps::SOCKS, [false; 2]))?;
        }
        {
            let mut ctrl = self.ctrl.lock().expect("ctrl lock");
            for cookie in [client, server] {
                ctrl.insert(cookie, 0, 0)
                    .map_err(refused(maps::CTRL, [false; 2]))?;
            }
        }
        self.conns
            .lock()
            .expect("conns lock")
            .insert(id, info, 0)
            .map_err(refused(maps::CONNS, [false; 2]))?;
        {
            let mut targets = self.targets.lock().expect("targets lock");
            for (cookie, fd) in [s.client, s.server] {
                targets
                    .insert(cookie, fd, 0)
                    .map_err(refused(maps::TARGETS, [false; 2]))?;
            }
        }
        let mut sources = self.sources.lock().expect("sources lock");
        let mut in_sources = [false; 2];
        for (i, (cookie, fd)) in [s.client, s.server].into_iter().enumerate() {
            sources
                .insert(cookie, fd, 0)
                .map_err(refused(maps::SOURCES, in_sources))?;
            in_sources[i] = true;
        }
        Ok(())
    }

    /// Removes every entry of a pair, `sources` first (nothing is verdicted after);
    /// absent entries are fine.
    pub fn remove_pair(&self, id: u32, cookies: [u64; 2]) {
        for cookie in cookies {
            let _ = self.sources.lock().expect("sources lock").remove(&cookie);
        }
        for cookie in cookies {
            let _ = self.targets.lock().expect("targets lock").remove(&cookie);
            let _ = self.socks.lock().expect("socks lock").remove(&cookie);
            let _ = self.ctrl.lock().expect("ctrl lock").remove(&cookie);
        }
        let _ = self.conns.lock().expect("conns lock").remove(&id);
    }

    /// Sets or clears `flag` (`CONN_THROTTLED_*`) in a pair's `conns` row, for `ctl`.
    pub fn set_conn_flag(&self, id: u32, flag: u32, on: bool) {
        let mut conns = self.conns.lock().expect("conns lock");
        if let Ok(mut info) = conns.get(&id, 0) {
            if on {
                info.flags |= flag;
            } else {
                info.flags &= !flag;
            }
            let _ = conns.insert(id, info, 0);
        }
    }

    /// The events ring buffer, once (for the event loop).
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        self.events.lock().expect("events lock").take()
    }

    /// The sticky entry of `k`, whatever its expiry.
    pub fn sticky_get(&self, k: &StickyKey) -> Option<StickyValue> {
        self.sticky.lock().expect("sticky lock").get(k, 0).ok()
    }

    /// Writes a sticky entry.
    pub fn sticky_put(&self, k: &StickyKey, v: StickyValue) -> Result<(), MapOpError> {
        self.sticky
            .lock()
            .expect("sticky lock")
            .insert(k, v, 0)
            .map_err(|source| MapOpError {
                map: maps::STICKY,
                source,
            })
    }

    /// Removes a sticky entry (absent is fine).
    pub fn sticky_remove(&self, k: &StickyKey) {
        let _ = self.sticky.lock().expect("sticky lock").remove(k);
    }

    /// Every sticky entry (one evicted while we iterate is skipped).
    pub fn sticky_entries(&self) -> Vec<(StickyKey, StickyValue)> {
        self.sticky
            .lock()
            .expect("sticky lock")
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Gives the pin directory and the pins in it to `uid:gid`, and lets others
    /// traverse the pin root, so that after the switch to `[global] user` the daemon
    /// can still remove its pins at a clean stop (and that user's `ctl` read them).
    pub fn hand_over(&self, uid: u32, gid: u32) -> Result<(), BpfError> {
        pins::hand_over(Path::new(PIN_ROOT), &self.pin_dir, uid, gid)
    }

    /// Removes the instance's pinned maps (at a clean stop: nothing is left under
    /// /sys/fs/bpf for a daemon that is gone). Best effort.
    pub fn unpin(&self) {
        unpin_dir(&self.pin_dir, true);
    }

    /// The program's counters for the socket with this cookie (one direction).
    pub fn sock(&self, cookie: u64) -> io::Result<SockInfo> {
        self.socks
            .lock()
            .expect("socks lock")
            .get(&cookie, 0)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Bytes redirected so far from the socket with this cookie (one direction).
    pub fn redirected(&self, cookie: u64) -> io::Result<u64> {
        self.sock(cookie).map(|s| s.bytes)
    }

    /// Writes a socket's throttle word (`lb_common::CTRL_THROTTLE` | bytes consumed).
    pub fn set_ctrl(&self, cookie: u64, word: u64) -> io::Result<()> {
        self.ctrl
            .lock()
            .expect("ctrl lock")
            .insert(cookie, word, 0)
            .map_err(|e| io::Error::other(format!("ctrl map: {e}")))
    }

    /// Writes the daemon counters that changed since the last call to the pinned
    /// `daemon_stats` map (one system call each: an idle daemon makes none).
    pub fn publish(&self, stats: &crate::stats::Stats) {
        let Published { map, last } = &mut *self.daemon_stats.lock().expect("daemon_stats lock");
        for (&s, last) in DaemonStat::ALL.iter().zip(last.iter_mut()) {
            let value = stats.get(s);
            if *last == Some(value) {
                continue;
            }
            // An error here only leaves `ctl stats` one period behind.
            *last = map.set(s as u32, value, 0).is_ok().then_some(value);
        }
    }
}

impl Bpf {
    /// Writes `rows` to the `backends` map (slot = position), those that changed since
    /// the last call, and removes the slots past them (servers gone in a reload).
    pub fn publish_backends(&self, rows: &[BackendInfo]) {
        let Published { map, last } = &mut *self.backends.lock().expect("backends lock");
        for (slot, row) in rows.iter().enumerate() {
            if last.get(slot) == Some(row) {
                continue;
            }
            // An error here only leaves `ctl backends` one period behind (the slot
            // is written again next time).
            if map.insert(slot as u32, row, 0).is_err() {
                last.truncate(slot);
                return;
            }
            match last.get_mut(slot) {
                Some(l) => *l = *row,
                None => last.push(*row),
            }
        }
        for slot in rows.len()..last.len() {
            let _ = map.remove(&(slot as u32));
        }
        last.truncate(rows.len());
    }
}

/// Encodes an address as stored in [`ConnInfo`] (IPv4-mapped IPv6).
pub fn addr_bytes(addr: std::net::SocketAddr) -> [u8; 16] {
    crate::addr::ip_bytes(addr.ip())
}

/// Formats an address stored as [`addr_bytes`] does.
pub fn addr_string(bytes: [u8; 16], port: u16) -> String {
    crate::addr::from_bytes(bytes, port).to_string()
}
