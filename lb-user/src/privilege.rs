//! `[global] user` / `group`: the account the daemon runs as once it has loaded its
//! BPF program, pinned its maps, bound its sockets and read its keys.
//!
//! The switch happens on the main thread before the async runtime starts any other
//! thread: capabilities are per thread in Linux, and threads made afterwards inherit
//! the main thread's. In order: the bounding set loses every capability not kept (so
//! nothing can regain them, not even through a set-uid binary), the ambient set is
//! cleared, then with `PR_SET_KEEPCAPS` the groups, gid and uid change, the permitted
//! and effective sets become exactly the kept ones, and `PR_SET_NO_NEW_PRIVS` is set.
//! A final check that uid 0 cannot be taken back guards against a half-done switch.

use std::{collections::HashSet, ffi::CString, io};

use caps::{CapSet, Capability};

/// The account `[global] user` (and `group`) name, resolved when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// User name as written.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// `group`'s gid, or the user's primary group.
    pub gid: u32,
}

/// Why the daemon could not become its configured account.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Not root (nor holding CAP_SETUID/CAP_SETGID) and asked to become someone else.
    #[error(
        "[global] user = {user:?} needs the daemon started as root (it switches after set-up); started as uid {uid}"
    )]
    NotRoot {
        /// Configured user.
        user: String,
        /// The uid the daemon runs as.
        uid: u32,
    },
    /// Other threads exist: their capabilities would not change.
    #[error("internal: {0} threads run before the privilege drop (must be 1)")]
    Threads(usize),
    /// A step of the switch failed.
    #[error("cannot {step}: {source}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The switch left the process able to become root again.
    #[error("the switch to uid {0} did not hold (uid 0 could be taken back); refusing to run")]
    Regained(u32),
}

/// `[global] user` or `group` names nobody on this host.
#[derive(Debug, thiserror::Error)]
pub enum UnknownAccount {
    /// No such user.
    #[error("no user {0:?} on this host (getpwnam)")]
    User(String),
    /// No such group.
    #[error("no group {0:?} on this host (getgrnam)")]
    Group(String),
}

/// Looks up `user` (a name, or a number when no such name exists) and `group` (the
/// user's primary group when `None`) in the host's user database.
pub fn resolve(user: &str, group: Option<&str>) -> Result<Account, UnknownAccount> {
    let (uid, primary) = lookup_user(user)
        .or_else(|| {
            let uid = user.parse().ok()?;
            Some((uid, uid))
        })
        .ok_or_else(|| UnknownAccount::User(user.to_owned()))?;
    let gid = match group {
        None => primary,
        Some(g) => lookup_group(g)
            .or_else(|| g.parse().ok())
            .ok_or_else(|| UnknownAccount::Group(g.to_owned()))?,
    };
    Ok(Account {
        user: user.to_owned(),
        uid,
        gid,
    })
}

/// `(uid, primary gid)` of the user named `name`.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: passwd is plain old data; all-zero is a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives it.
    let r = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    (r == 0 && !found.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

/// The gid of the group named `name`.
fn lookup_group(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: group is plain old data; all-zero is a valid value.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives it.
    let r = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    (r == 0 && !found.is_null()).then_some(gr.gr_gid)
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> PrivilegeError {
    move |source| PrivilegeError::Step { step, source }
}

fn caps_step(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivilegeError {
    move |e| PrivilegeError::Step {
        step: what,
        source: io::Error::other(e.to_string()),
    }
}

/// -1 from a libc call as the errno it set.
fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Becomes `account` keeping exactly `keep` (permitted and effective), nothing
/// inheritable or ambient, and no way back. Must run while this is the process's only
/// thread.
pub fn become_account(account: &Account, keep: &[Capability]) -> Result<(), PrivilegeError> {
    let n = threads();
    if n != 1 {
        return Err(PrivilegeError::Threads(n));
    }
    // SAFETY: getters without preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let switching = euid != account.uid || egid != account.gid;
    if switching && euid != 0 {
        return Err(PrivilegeError::NotRoot {
            user: account.user.clone(),
            uid: euid,
        });
    }
    let keep: HashSet<Capability> = keep.iter().copied().collect();
    // The bounding set needs CAP_SETPCAP; a daemon started without it (systemd's
    // CapabilityBoundingSet already did this) skips it.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::runtime::thread_all_supported() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)
                    .map_err(caps_step("drop from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_step("clear the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_step("clear the inheritable set"))?;
    if switching {
        caps::securebits::set_keepcaps(true).map_err(caps_step("set PR_SET_KEEPCAPS"))?;
        let groups = [account.gid];
        // SAFETY: plain syscalls; `groups` outlives setgroups.
        unsafe {
            check(libc::setgroups(1, groups.as_ptr())).map_err(step("setgroups"))?;
            check(libc::setresgid(account.gid, account.gid, account.gid))
                .map_err(step("setresgid"))?;
            check(libc::setresuid(account.uid, account.uid, account.uid))
                .map_err(step("setresuid"))?;
        }
        caps::securebits::set_keepcaps(false).map_err(caps_step("clear PR_SET_KEEPCAPS"))?;
    }
    let held = caps::read(None, CapSet::Permitted).map_err(caps_step("read the permitted set"))?;
    let kept: HashSet<Capability> = keep.intersection(&held).copied().collect();
    caps::set(None, CapSet::Permitted, &kept).map_err(caps_step("set the permitted set"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(caps_step("set the effective set"))?;
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("set PR_SET_NO_NEW_PRIVS"))?;
    // SAFETY: setresuid with plain integers; -1 leaves an id as it is.
    let back = unsafe { libc::setresuid(0, u32::MAX, u32::MAX) };
    if account.uid != 0 && back == 0 {
        return Err(PrivilegeError::Regained(account.uid));
    }
    Ok(())
}

/// Capability names for the log line.
pub fn names(keep: &[Capability]) -> String {
    if keep.is_empty() {
        return "none".to_owned();
    }
    keep.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
