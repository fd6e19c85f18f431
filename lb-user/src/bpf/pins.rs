//! The pin directory of an instance (`/sys/fs/bpf/mqttlb/<instance>/`): made safely
//! ours, guarded by the instance lock, cleaned up; the sticky table kept across
//! restarts when its layout matches.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use lb_common::{PIN_ROOT, StickyKey, StickyValue, maps};

use super::BpfError;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Directory where an instance's maps are pinned.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

pub(super) fn is_bpffs(path: &Path) -> bool {
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

/// Makes `path` a directory of ours that nobody else can change, or refuses: created
/// with mode 0700 when missing; when present it must be a real directory (not a
/// symlink), owned by this user (or by `trusted`, the configured `[global] user`), and
/// writable by nobody else. `/sys/fs/bpf` is often
/// world-writable (1777): without this check, another user could plant
/// `mqttlb/<instance>` as a symlink and have the daemon pin, and delete stale pins,
/// wherever it points.
pub fn own_dir(path: &Path, trusted: Option<u32>) -> Result<(), BpfError> {
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
    } else if meta.uid() != me && Some(meta.uid()) != trusted {
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

/// Gives `dir` and the pins in it to `uid:gid` (never following a link) and makes
/// `root` traversable by others (mode 0711: names stay unlisted).
pub(super) fn hand_over(root: &Path, dir: &Path, uid: u32, gid: u32) -> Result<(), BpfError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what, path: &Path, source| BpfError::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    let mode = std::fs::symlink_metadata(root)
        .map_err(|e| io("cannot inspect", root, e))?
        .permissions()
        .mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(
            root,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o011),
        )
        .map_err(|e| io("cannot chmod", root, e))?;
    }
    let entries = std::fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))?;
    for path in entries
        .flatten()
        .map(|e| e.path())
        .chain(std::iter::once(dir.to_owned()))
    {
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| io("cannot chown", &path, e))?;
    }
    Ok(())
}

/// One running daemon per instance name: an exclusive `flock` on
/// `/run/mqttlb/<instance>.lock`, taken whatever the data plane, held for the
/// daemon's life and removed at a clean stop.
pub struct InstanceLock {
    /// Holds the lock.
    _file: File,
    path: PathBuf,
    /// Whether dropping it removes the file: not while a hot upgrade's new process
    /// shares it with the old one that may serve on ([`Self::own`]).
    owned: bool,
}

impl InstanceLock {
    /// Takes the lock of `instance`, or says which daemon holds it.
    pub fn acquire(instance: &str) -> Result<Self, BpfError> {
        Self::acquire_in(Path::new(crate::control::RUN_DIR), instance)
    }

    /// The lock a hot upgrade's old process handed over (the same open file, so
    /// the same lock, held by both until it exits).
    pub fn inherited(fd: std::os::fd::OwnedFd, instance: &str) -> Self {
        let path = Path::new(crate::control::RUN_DIR).join(crate::control::lock_name(instance));
        Self {
            _file: File::from(fd),
            path,
            owned: false,
        }
    }

    /// The hot upgrade took over: this process removes the file at its clean stop.
    pub fn own(&mut self) {
        self.owned = true;
    }

    /// The lock's open file (what an upgrade hands over).
    pub fn file(&self) -> &File {
        &self._file
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
                    return Ok(Self {
                        _file: file,
                        path,
                        owned: true,
                    });
                }
                _ => continue,
            }
        }
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Removed while still locked, so a daemon starting now locks a new file.
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Keeps a pinned sticky table from an earlier daemon when its layout and size match
/// this one's; otherwise removes the pin (the entries are lost, and a warning says so).
pub(super) fn keep_sticky_if_compatible(dir: &Path, size: u32) -> Result<(), BpfError> {
    let path = dir.join(maps::STICKY);
    if !path.exists() {
        return Ok(());
    }
    // A pin we may not read (a container's seccomp filter refusing bpf(), missing
    // capabilities) says nothing about its layout: keep it, and fail the load.
    let info = MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map_err(|e| BpfError::Map {
            name: maps::STICKY,
            reason: format!("cannot read the pinned table {}: {e}", path.display()),
        })?;
    let same = info.key_size() as usize == std::mem::size_of::<StickyKey>()
        && info.value_size() as usize == std::mem::size_of::<StickyValue>()
        && info.max_entries() == size
        && matches!(info.map_type(), Ok(aya::maps::MapType::LruHash));
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
