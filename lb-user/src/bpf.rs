//! Loading the eBPF object, pinning its maps under `/sys/fs/bpf/mqttlb/<instance>/`, and
//! typed access to those maps for the daemon and for `mqttlb ctl`.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
};
use lb_common::{
    BackendInfo, ConnInfo, DaemonStat, LAG_STEP_GLOBAL, PIN_ROOT, SockInfo, Stat, StickyKey,
    StickyValue, VERDICT_PROGRAM, maps,
};

/// The compiled splice program (built by `build.rs`).
static SPLICE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splice.bpf.o"));

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
        "loading the eBPF splice program failed (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with sockmap): {0}"
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

/// Directory where an instance's maps are pinned.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe_zeroed_statfs();
    // SAFETY: `c` is a valid C string and `st` a valid statfs buffer.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type == BPF_FS_MAGIC
}

fn unsafe_zeroed_statfs() -> libc::statfs {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
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
    /// Servers as the daemon sees them.
    backends: Mutex<HashMap<MapData, u32, BackendInfo>>,
    /// The sticky table (kept across restarts).
    sticky: Mutex<HashMap<MapData, StickyKey, StickyValue>>,
    /// Published daemon counters.
    daemon_stats: Mutex<Array<MapData, u64>>,
    /// Events from the program; taken once by the event loop.
    events: Mutex<Option<RingBuf<MapData>>>,
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

impl Bpf {
    /// Loads and attaches the splice program for `instance`, pinning its maps.
    /// `lag_step` is the redirected byte count between two lag-check events;
    /// `sticky_size` the capacity of the sticky table. The caller holds the
    /// instance's [`InstanceLock`].
    pub fn load(instance: &str, lag_step: u64, sticky_size: u32) -> Result<Self, BpfError> {
        if !is_bpffs(Path::new("/sys/fs/bpf")) {
            return Err(BpfError::NoBpffs);
        }
        let dir = pin_dir(instance);
        own_dir(Path::new(PIN_ROOT))?;
        own_dir(&dir)?;
        // Maps describing a previous daemon's sockets are meaningless now.
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
        keep_sticky_if_compatible(&dir, sticky_size)?;
        let object = with_kfunc_ids(SPLICE_OBJECT)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
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
            backends: Mutex::new(backends),
            sticky: Mutex::new(sticky),
            daemon_stats: Mutex::new(daemon_stats),
            events: Mutex::new(Some(events)),
        })
    }

    /// Enters a pair: its sockets' counters and throttle words, its `conns` row and its
    /// redirect targets, then `sources` (from then on the program verdicts its skbs).
    /// On refusal, `in_sources` says which sockets the program already sees.
    pub fn insert_pair(
        &self,
        id: u32,
        info: ConnInfo,
        s: PairSockets,
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
            socks
                .insert(server, sock(client, lb_common::DIR_SERVER_TO_CLIENT), 0)
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

    /// Writes the daemon counters to the pinned `daemon_stats` map.
    pub fn publish(&self, stats: &crate::stats::Stats) {
        let mut map = self.daemon_stats.lock().expect("daemon_stats lock");
        for &s in DaemonStat::ALL {
            // An error here only leaves `ctl stats` one period behind.
            let _ = map.set(s as u32, stats.get(s), 0);
        }
    }
}

impl Bpf {
    /// Writes `rows` to the `backends` map (slot = position) and removes slots from
    /// `rows.len()` up to `previous` (servers gone in a reload).
    pub fn publish_backends(&self, rows: &[BackendInfo], previous: usize) {
        let mut map = self.backends.lock().expect("backends lock");
        for (slot, row) in rows.iter().enumerate() {
            // An error here only leaves `ctl backends` one period behind.
            let _ = map.insert(slot as u32, row, 0);
        }
        for slot in rows.len()..previous {
            let _ = map.remove(&(slot as u32));
        }
    }
}

/// Makes `path` a directory of ours that nobody else can change, or refuses: created
/// with mode 0700 when missing; when present it must be a real directory (not a
/// symlink), owned by this user, and writable by nobody else. `/sys/fs/bpf` is often
/// world-writable (1777): without this check, another user could plant
/// `mqttlb/<instance>` as a symlink and have the daemon pin, and delete stale pins,
/// wherever it points.
pub fn own_dir(path: &Path) -> Result<(), BpfError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let io = |what, source| BpfError::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", e)),
    }
    // lstat: a symlink is judged as itself, never followed.
    let meta = std::fs::symlink_metadata(path).map_err(|e| io("cannot inspect", e))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let why = if meta.file_type().is_symlink() {
        Some("is a symbolic link")
    } else if !meta.is_dir() {
        Some("is not a directory")
    } else if meta.uid() != me {
        Some("is owned by another user")
    } else if meta.mode() & 0o022 != 0 {
        Some("is writable by other users")
    } else {
        None
    };
    match why {
        Some(why) => Err(BpfError::Unsafe {
            path: path.display().to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// One running daemon per instance name: an exclusive `flock` on
/// `/run/mqttlb/<instance>.lock`, taken whatever the data plane, held for the
/// daemon's life and removed at a clean stop.
pub struct InstanceLock {
    /// Holds the lock.
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock of `instance`, or says which daemon holds it.
    pub fn acquire(instance: &str) -> Result<Self, BpfError> {
        Self::acquire_in(Path::new(crate::control::RUN_DIR), instance)
    }

    fn acquire_in(dir: &Path, instance: &str) -> Result<Self, BpfError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
        let io = |what, path: &Path, source| BpfError::Io {
            what,
            path: path.display().to_string(),
            source,
        };
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
        {
            return Err(io("cannot create", dir, e));
        }
        let path = dir.join(crate::control::lock_name(instance));
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| io("cannot create", &path, e))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(BpfError::InstanceBusy {
                    name: instance.to_owned(),
                    path: path.display().to_string(),
                });
            }
            // A daemon stopping removes its lock file after we opened it: then our lock
            // is on a file nobody else will open. Lock the current file instead.
            let opened = file
                .metadata()
                .map_err(|e| io("cannot inspect", &path, e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == opened.ino() && now.dev() == opened.dev() => {
                    return Ok(Self { _file: file, path });
                }
                _ => continue,
            }
        }
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Removed while still locked, so a daemon starting now locks a new file.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A copy of the object with the raw kfunc call's placeholder immediate replaced by the
/// BTF id of `bpf_cast_to_kern_ctx` in this kernel (aya 0.14 does not resolve kfuncs;
/// the program reads each skb's TCP sequence number through it). Returned as `u64`s so
/// the bytes keep the alignment the ELF parser needs.
fn with_kfunc_ids(object: &[u8]) -> Result<Vec<u64>, BpfError> {
    use aya_obj::btf::{Btf, BtfKind};
    let btf = Btf::from_sys_fs().map_err(|e| {
        BpfError::Load(format!(
            "kernel BTF (/sys/kernel/btf/vmlinux) is needed to find bpf_cast_to_kern_ctx: {e}"
        ))
    })?;
    let id = btf
        .id_by_type_name_kind("bpf_cast_to_kern_ctx", BtfKind::Func)
        .map_err(|e| {
            BpfError::Load(format!(
                "this kernel has no kfunc bpf_cast_to_kern_ctx (Linux 6.3 or later needed): {e}"
            ))
        })?;
    // code 0x85 (call), src_reg 2 (kfunc), off 0, imm placeholder; little endian.
    let mut call = [0x85, 0x20, 0, 0, 0, 0, 0, 0];
    call[4..].copy_from_slice(&lb_common::KFUNC_PLACEHOLDER.to_le_bytes());
    let mut words = vec![0u64; object.len().div_ceil(8)];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    bytes[..object.len()].copy_from_slice(object);
    let mut patched = 0;
    for insn in bytes[..object.len()].chunks_exact_mut(8) {
        if insn == call {
            insn[4..].copy_from_slice(&id.to_le_bytes());
            patched += 1;
        }
    }
    if patched == 0 {
        return Err(BpfError::Load(
            "the splice object has no kfunc call to patch (build mismatch)".into(),
        ));
    }
    Ok(words)
}

/// Keeps a pinned sticky table from an earlier daemon when its layout and size match
/// this one's; otherwise removes the pin (the entries are lost, and a warning says so).
fn keep_sticky_if_compatible(dir: &Path, size: u32) -> Result<(), BpfError> {
    let path = dir.join(maps::STICKY);
    if !path.exists() {
        return Ok(());
    }
    let same = MapData::from_pin(&path)
        .and_then(|m| m.info())
        .is_ok_and(|info| {
            info.key_size() as usize == std::mem::size_of::<StickyKey>()
                && info.value_size() as usize == std::mem::size_of::<StickyValue>()
                && info.max_entries() == size
                && matches!(info.map_type(), Ok(aya::maps::MapType::LruHash))
        });
    if same {
        tracing::info!(path = %path.display(), "sticky table kept from the previous run");
        return Ok(());
    }
    tracing::warn!(path = %path.display(), "pinned sticky table has another layout or size (sticky_table_size changed?): starting an empty one");
    std::fs::remove_file(&path).map_err(|source| BpfError::Io {
        what: "cannot remove stale pin",
        path: path.display().to_string(),
        source,
    })
}

/// Read-only view of a running instance's pinned maps (for `mqttlb ctl`).
pub struct Pinned {
    dir: PathBuf,
}

/// One spliced connection as `ctl conns` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnView {
    /// Connection id.
    pub id: u32,
    /// Client address.
    pub client: String,
    /// Server address.
    pub server: String,
    /// Server index in its cluster.
    pub server_index: u32,
    /// Bytes client to server (in-kernel).
    pub bytes_c2s: u64,
    /// Bytes server to client (in-kernel).
    pub bytes_s2c: u64,
    /// Throttled directions.
    pub throttled: Vec<&'static str>,
    /// Seconds since the epoch at hand-off.
    pub started_unix: u64,
}

impl Pinned {
    /// Opens the pin directory of `instance`.
    pub fn open(instance: &str) -> Result<Self, BpfError> {
        let dir = pin_dir(instance);
        let stats = dir.join(maps::STATS);
        match std::fs::symlink_metadata(&stats) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(BpfError::Privilege {
                    path: stats.display().to_string(),
                    source: e,
                });
            }
            _ => {}
        }
        if !stats.exists() {
            return Err(BpfError::Map {
                name: maps::STATS,
                reason: format!(
                    "no pinned maps under {}: no mqttlb instance named {instance:?} runs here with BPF (or it stopped cleanly)",
                    dir.display()
                ),
            });
        }
        Ok(Self { dir })
    }

    fn open_map(&self, name: &'static str) -> Result<Map, BpfError> {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).map_err(|e| match e {
            aya::maps::MapError::SyscallError(s)
                if matches!(s.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                BpfError::Privilege {
                    path: path.display().to_string(),
                    source: s.io_error,
                }
            }
            e => map_err(name, e),
        })?;
        Map::from_map_data(data).map_err(|e| map_err(name, e))
    }

    /// BPF program counters summed over CPUs, then daemon counters.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        let per_cpu: PerCpuArray<MapData, u64> = PerCpuArray::try_from(self.open_map(maps::STATS)?)
            .map_err(|e| map_err(maps::STATS, e))?;
        let mut out = Vec::new();
        for &s in Stat::ALL {
            let v = per_cpu
                .get(&(s as u32), 0)
                .map_err(|e| map_err(maps::STATS, e))?;
            out.push((s.name(), v.iter().sum()));
        }
        let daemon: Array<MapData, u64> = Array::try_from(self.open_map(maps::DAEMON_STATS)?)
            .map_err(|e| map_err(maps::DAEMON_STATS, e))?;
        for &s in DaemonStat::ALL {
            out.push((
                s.name(),
                daemon
                    .get(&(s as u32), 0)
                    .map_err(|e| map_err(maps::DAEMON_STATS, e))?,
            ));
        }
        out.extend(self.entries()?);
        Ok(out)
    }

    /// Entries in the per-connection maps (a leak shows here first).
    fn entries(&self) -> Result<[(&'static str, u64); 5], BpfError> {
        let count = |keys: &mut dyn Iterator<Item = Result<(), aya::maps::MapError>>| {
            keys.filter(Result::is_ok).count() as u64
        };
        let sockhash = |name: &'static str| -> Result<u64, BpfError> {
            let m: SockHash<MapData, u64> =
                SockHash::try_from(self.open_map(name)?).map_err(|e| map_err(name, e))?;
            Ok(count(&mut m.keys().map(|k| k.map(drop))))
        };
        let socks: HashMap<MapData, u64, SockInfo> =
            HashMap::try_from(self.open_map(maps::SOCKS)?).map_err(|e| map_err(maps::SOCKS, e))?;
        let ctrl: HashMap<MapData, u64, u64> =
            HashMap::try_from(self.open_map(maps::CTRL)?).map_err(|e| map_err(maps::CTRL, e))?;
        let conns: HashMap<MapData, u32, ConnInfo> =
            HashMap::try_from(self.open_map(maps::CONNS)?).map_err(|e| map_err(maps::CONNS, e))?;
        Ok([
            ("map_entries_sources", sockhash(maps::SOURCES)?),
            ("map_entries_targets", sockhash(maps::TARGETS)?),
            (
                "map_entries_socks",
                count(&mut socks.keys().map(|k| k.map(drop))),
            ),
            (
                "map_entries_ctrl",
                count(&mut ctrl.keys().map(|k| k.map(drop))),
            ),
            (
                "map_entries_conns",
                count(&mut conns.keys().map(|k| k.map(drop))),
            ),
        ])
    }

    /// Every spliced connection.
    pub fn conns(&self) -> Result<Vec<ConnView>, BpfError> {
        let conns: HashMap<MapData, u32, ConnInfo> =
            HashMap::try_from(self.open_map(maps::CONNS)?).map_err(|e| map_err(maps::CONNS, e))?;
        let socks: HashMap<MapData, u64, SockInfo> =
            HashMap::try_from(self.open_map(maps::SOCKS)?).map_err(|e| map_err(maps::SOCKS, e))?;
        let mut out = Vec::new();
        for item in conns.iter() {
            // An entry removed while we iterate is simply skipped.
            let Ok((id, c)) = item else { continue };
            let bytes = |cookie: u64| socks.get(&cookie, 0).map(|s| s.bytes).unwrap_or(0);
            let mut throttled = Vec::new();
            if c.flags & lb_common::CONN_THROTTLED_C2S != 0 {
                throttled.push("c2s");
            }
            if c.flags & lb_common::CONN_THROTTLED_S2C != 0 {
                throttled.push("s2c");
            }
            out.push(ConnView {
                id,
                client: addr_string(c.client_addr, c.client_port),
                server: addr_string(c.server_addr, c.server_port),
                server_index: c.server_index,
                bytes_c2s: bytes(c.client_cookie),
                bytes_s2c: bytes(c.server_cookie),
                throttled,
                started_unix: c.started_unix,
            });
        }
        out.sort_by_key(|c| c.id);
        Ok(out)
    }
}

impl Pinned {
    /// Every server, in slot order.
    pub fn backends(&self) -> Result<Vec<(u32, BackendInfo)>, BpfError> {
        let m: HashMap<MapData, u32, BackendInfo> =
            HashMap::try_from(self.open_map(maps::BACKENDS)?)
                .map_err(|e| map_err(maps::BACKENDS, e))?;
        let mut out: Vec<(u32, BackendInfo)> = m.iter().filter_map(Result::ok).collect();
        out.sort_by_key(|(slot, _)| *slot);
        Ok(out)
    }

    /// Every sticky entry (an entry evicted while we iterate is skipped).
    pub fn sticky(&self) -> Result<Vec<(StickyKey, StickyValue)>, BpfError> {
        let path = self.dir.join(maps::STICKY);
        let data = MapData::from_pin(&path).map_err(|e| map_err(maps::STICKY, e))?;
        let m: HashMap<MapData, StickyKey, StickyValue> =
            HashMap::try_from(Map::from_map_data(data).map_err(|e| map_err(maps::STICKY, e))?)
                .map_err(|e| map_err(maps::STICKY, e))?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }
}

/// Removes the pinned maps in `dir`, the sticky table too unless `keep_sticky`, then
/// the directory if that left it empty. Returns how many were removed. Best effort.
pub fn unpin_dir(dir: &Path, keep_sticky: bool) -> usize {
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if (!keep_sticky || e.file_name() != maps::STICKY)
                && std::fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    removed
}

/// Encodes an address as stored in [`ConnInfo`] (IPv4-mapped IPv6).
pub fn addr_bytes(addr: std::net::SocketAddr) -> [u8; 16] {
    crate::addr::ip_bytes(addr.ip())
}

/// Formats an address stored as [`addr_bytes`] does.
pub fn addr_string(bytes: [u8; 16], port: u16) -> String {
    crate::addr::from_bytes(bytes, port).to_string()
}

#[cfg(test)]
mod tests {
    use lb_common::{
        CTRL_THROTTLE, DIR_CLIENT_TO_SERVER, DIR_SERVER_TO_CLIENT, DaemonStat, EVENT_LAG_CHECK,
        EVENT_PEER_GONE, MAX_SPLICED, Stat,
    };

    const CONSTS_H: &str = include_str!("../../lb-ebpf/src/lb_consts.h");

    /// The value of `NAME` in lb_consts.h, as `#define NAME v` or enum `NAME = v,`.
    fn c_const(name: &str) -> u64 {
        let value = CONSTS_H
            .lines()
            .find_map(|line| {
                let line = line.split("/*").next().unwrap_or_default().trim();
                let rest = line.strip_prefix("#define").unwrap_or(line).trim_start();
                let rest = rest.strip_prefix(name)?;
                let v = rest
                    .trim()
                    .trim_start_matches('=')
                    .trim_end_matches(',')
                    .trim();
                (rest.starts_with([' ', '\t']) && !v.is_empty()).then(|| v.to_owned())
            })
            .unwrap_or_else(|| panic!("{name} not in lb_consts.h"));
        let v = value.trim_start_matches('(').trim_end_matches(')');
        if let Some(shift) = v.strip_prefix("1ULL << ") {
            return 1 << shift.parse::<u32>().expect("shift");
        }
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
        .unwrap_or_else(|| panic!("{name} = {value}"))
    }

    #[test]
    fn c_constants_match_lb_common() {
        assert_eq!(c_const("MAX_SPLICED"), u64::from(MAX_SPLICED));
        assert_eq!(
            c_const("KFUNC_PLACEHOLDER"),
            u64::from(lb_common::KFUNC_PLACEHOLDER)
        );
        assert_eq!(
            c_const("SOCK_SEQ_KNOWN"),
            u64::from(lb_common::SOCK_SEQ_KNOWN)
        );
        assert_eq!(
            c_const("EVENT_STREAM_BROKEN"),
            u64::from(lb_common::EVENT_STREAM_BROKEN)
        );
        assert_eq!(c_const("STAT_STREAM_BROKEN"), Stat::StreamBroken as u64);
        assert_eq!(c_const("MAX_BACKENDS"), u64::from(lb_common::MAX_BACKENDS));
        assert_eq!(
            c_const("DIR_CLIENT_TO_SERVER"),
            u64::from(DIR_CLIENT_TO_SERVER)
        );
        assert_eq!(
            c_const("DIR_SERVER_TO_CLIENT"),
            u64::from(DIR_SERVER_TO_CLIENT)
        );
        assert_eq!(c_const("EVENT_LAG_CHECK"), u64::from(EVENT_LAG_CHECK));
        assert_eq!(c_const("EVENT_FIN"), u64::from(lb_common::EVENT_FIN));
        assert_eq!(c_const("EVENT_PASSED"), u64::from(lb_common::EVENT_PASSED));
        assert_eq!(c_const("EVENT_PEER_GONE"), u64::from(EVENT_PEER_GONE));
        assert_eq!(c_const("STAT_COUNT"), u64::from(Stat::COUNT));
        assert_eq!(c_const("DAEMON_STAT_COUNT"), u64::from(DaemonStat::COUNT));
        assert_eq!(c_const("STAT_PASSED"), Stat::Passed as u64);
        assert_eq!(c_const("STAT_EVENT_DROPPED"), Stat::EventDropped as u64);
        assert_eq!(c_const("CTRL_THROTTLE"), CTRL_THROTTLE);
    }
}
