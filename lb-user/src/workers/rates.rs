//! `connect_rate_per_client_id` across workers. A client id's reconnections come
//! from new source ports, so they meet any worker: counted per worker, an id could
//! reconnect N times as often as the listener allows. The supervisor maps one table
//! of theoretical arrival times (GCRA, as `admission` counts) in memory shared with
//! its workers (`MAP_SHARED`, before it forks), and every worker counts there.
//!
//! The table has [`SLOTS`] places of one 64-bit word each, updated with
//! compare-and-swap: a 20-bit tag of the key's hash above a 44-bit arrival time in
//! [`TICK`]s since the table was made (55 years). A key is a keyed hash (a secret
//! drawn before the fork) of the listener's name and the client id, so ids are not
//! kept and nobody outside can aim two ids at one place. Two live keys in one place
//! take turns (with n ids inside their interval, a new id meets one of them with odds
//! n / 1,048,576: 10% at 100,000): the newer starts over, so the limit errs towards
//! admitting, never refusing a client that conforms.

use std::{
    hash::{BuildHasher, RandomState},
    io,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::config::Rate;

/// Places in the table (8 MiB of address space; a page is only resident once an id
/// lands in it).
const SLOTS: usize = 1 << 20;
/// The arrival times' unit.
const TICK: Duration = Duration::from_micros(100);
const TIME_BITS: u32 = 44;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;

/// The instance's table, once mapped.
static TABLE: OnceLock<Table> = OnceLock::new();

/// The shared table of one process tree.
pub struct Table {
    slots: &'static [AtomicU64],
    keys: RandomState,
    made: Instant,
}

/// Maps the table (the supervisor, before it forks its workers).
pub fn map() -> io::Result<()> {
    if TABLE.get().is_none() {
        let _ = TABLE.set(Table::new()?);
    }
    Ok(())
}

/// The table this process shares with its workers, if its supervisor mapped one.
pub fn shared() -> Option<&'static Table> {
    TABLE.get()
}

impl Table {
    /// A table in fresh shared memory, which children forked later share.
    fn new() -> io::Result<Self> {
        let bytes = SLOTS * size_of::<AtomicU64>();
        // SAFETY: a fresh anonymous mapping, no address asked for; checked below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the mapping is `bytes` long, zeroed, aligned to a page, and never
        // unmapped (it lives as long as the process); AtomicU64 is valid for any bits.
        let slots = unsafe { std::slice::from_raw_parts(at.cast::<AtomicU64>(), SLOTS) };
        Ok(Table {
            slots,
            keys: RandomState::new(),
            made: Instant::now(),
        })
    }

    /// GCRA for `client_id` on `listener`: whether a connection now conforms to
    /// `rate`, counting it when it does.
    pub fn conform(&self, listener: &str, client_id: &str, rate: Rate) -> bool {
        let hash = self.keys.hash_one((listener, client_id));
        let slot = &self.slots[hash as usize % SLOTS];
        let tag = (hash >> TIME_BITS) << TIME_BITS;
        let ticks = |d: Duration| (d.as_nanos() / TICK.as_nanos()) as u64;
        let now = ticks(self.made.elapsed());
        let interval = ticks(Duration::from_secs_f64(1.0 / rate.rate)).max(1);
        let tolerance = interval * u64::from(rate.burst - 1);
        let mut seen = slot.load(Ordering::Acquire);
        loop {
            // Another key's time (or none yet) is not this key's: it starts over.
            let tat = if seen & !TIME_MASK == tag {
                seen & TIME_MASK
            } else {
                0
            };
            let t = tat.max(now);
            if t - now > tolerance {
                return false;
            }
            let next = tag | ((t + interval) & TIME_MASK);
            match slot.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(current) => seen = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forked_child_counts_in_its_parents_table() {
        // Not the process's own table: the admission tests run without one.
        let table = Table::new().expect("mmap");
        let rate = Rate {
            rate: 0.1,
            burst: 2,
        };
        assert!(table.conform("mqtt", "dev-1", rate));
        // SAFETY: the child only counts in the table and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let second = table.conform("mqtt", "dev-1", rate);
            // SAFETY: ends the child without running the parent's test harness.
            unsafe { libc::_exit(if second { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(libc::WEXITSTATUS(status), 0, "the burst's second place");
        // The child took the burst's second place: the third is refused here.
        assert!(!table.conform("mqtt", "dev-1", rate));
        // Other ids and the same id on another listener count apart.
        assert!(table.conform("mqtt", "dev-2", rate));
        assert!(table.conform("mqtts", "dev-1", rate));
    }
}
