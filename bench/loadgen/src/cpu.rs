//! CPU and memory readings from /proc.

use anyhow::{Context, Result};

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Busy CPU ticks of the whole machine (every state but idle and iowait).
fn machine_busy() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Ok(v.iter().take(8).sum::<u64>()
        - v.get(3).copied().unwrap_or(0)
        - v.get(4).copied().unwrap_or(0))
}

/// utime + stime of a process (all its threads), in ticks; 0 for a process that is gone.
fn process_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// A reading of machine and excluded-process CPU.
pub struct CpuMark {
    busy: u64,
    excluded: u64,
}

/// Measures what everything but this process and `exclude` spends.
pub struct CpuMeter {
    exclude: Vec<String>,
}

impl CpuMeter {
    pub fn new(exclude: &[u32]) -> Self {
        let mut e: Vec<String> = exclude.iter().map(u32::to_string).collect();
        e.push("self".into());
        Self { exclude: e }
    }

    pub fn mark(&self) -> Result<CpuMark> {
        Ok(CpuMark {
            busy: machine_busy()?,
            excluded: self.exclude.iter().map(|p| process_ticks(p)).sum(),
        })
    }

    /// CPU-seconds the proxy (and the kernel work it causes) spent since `start`.
    pub fn proxy_seconds(&self, start: &CpuMark) -> Result<f64> {
        let end = self.mark()?;
        let busy = end.busy.saturating_sub(start.busy);
        let excluded = end.excluded.saturating_sub(start.excluded);
        Ok(busy.saturating_sub(excluded) as f64 / ticks_per_second())
    }
}

/// Resident set size of the processes, bytes.
pub fn rss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 1024
}

/// Kernel memory that sockets use: slab plus TCP buffer pages, bytes.
pub fn kernel_bytes() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("/proc/meminfo")?;
    let slab = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .context("Slab in /proc/meminfo")?
        * 1024;
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").context("/proc/net/sockstat")?;
    let pages = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "mem")?;
            f.get(i + 1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    Ok(slab + pages * 4096)
}
