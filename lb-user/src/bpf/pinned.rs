//! Read-only views of a running instance's pinned maps, for `mqttlb ctl`.

use std::{io, path::PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, SockHash};
use lb_common::{BackendInfo, ConnInfo, DaemonStat, SockInfo, Stat, StickyKey, StickyValue, maps};

use super::{BpfError, addr_string, map_err, pin_dir};

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

    /// Opens the pin directory `dir` (a worker's, `[global] workers`).
    pub fn open_dir(dir: PathBuf) -> Result<Self, BpfError> {
        if !dir.join(maps::STATS).exists() {
            return Err(BpfError::Map {
                name: maps::STATS,
                reason: format!("no pinned maps under {}", dir.display()),
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
