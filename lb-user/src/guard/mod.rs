//! `[guard]`: the XDP front guard (`lb-ebpf/src/guard.bpf.c`). Loaded and attached to
//! the configured interfaces at start (native mode where the driver has it, generic
//! otherwise), fed the listeners' ports, the CIDR lists and the SYN rate, changed at
//! runtime by `mqttlb ctl guard deny|allow|remove CIDR` and the admin API, and
//! detached at a clean stop. Its maps are not pinned: the links are descriptors of
//! this process, so a killed daemon leaves no program behind.
//!
//! A hot upgrade hands the guard over without a moment unguarded: the old process
//! passes its links, and the maps that hold what the guard learnt (the sources'
//! SYN rates, the counters), with the runtime changes of its lists ([`Handed`]).
//! The new process loads its own program and maps, copies that state in, and puts
//! its program in place of the old one on each link at once (`BPF_LINK_UPDATE`).
//! If the new process does not take over, the old one puts its own back
//! ([`Guard::reclaim`]).

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    programs::Xdp,
};
use lb_common::{GUARD_STATS, GuardConf, GuardSource, guard_maps};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub mod cidr;

pub use cidr::Cidr;

use crate::config::GuardConfig;

static GUARD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard.bpf.o"));

/// Why the guard could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Loading the object or the verifier failed.
    #[error("loading the XDP guard failed (needs CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(String),
    /// An interface could not take the program in either mode.
    #[error("cannot attach the XDP guard to {interface:?}: {reason}")]
    Attach {
        /// Interface name.
        interface: String,
        /// What the kernel said.
        reason: String,
    },
    /// A map update failed.
    #[error("guard map {map}: {reason}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What failed.
        reason: String,
    },
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> GuardError {
    move |e| GuardError::Map {
        map,
        reason: e.to_string(),
    }
}

/// A change made at runtime, re-applied over the file's lists at each reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Add to the deny list (and take out of the allow list).
    Deny,
    /// Add to the allow list (and take out of the deny list).
    Allow,
    /// Take out of both lists.
    Remove,
}

/// The lists as the program sees them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Lists {
    deny: BTreeSet<Cidr>,
    allow: BTreeSet<Cidr>,
}

impl Lists {
    fn apply(&mut self, change: Change, cidr: Cidr) {
        self.deny.remove(&cidr);
        self.allow.remove(&cidr);
        match change {
            Change::Deny => self.deny.insert(cidr),
            Change::Allow => self.allow.insert(cidr),
            Change::Remove => false,
        };
    }
}

type Trie = LpmTrie<MapData, [u8; 16], u8>;

/// The lists: the file's, the runtime changes since start, and what the tries hold
/// (the file's with the changes laid over).
#[derive(Default)]
struct State {
    file: Lists,
    changes: Vec<(Change, Cidr)>,
    held: Lists,
}

/// The attachments made: their links, and `(interface, "native" | "generic")`.
type Attached = (Vec<OwnedFd>, Vec<(String, &'static str)>);

/// What a hot upgrade says of the guard besides its descriptors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Moving {
    /// Each interface and the mode it was attached in, in the order of the links.
    pub interfaces: Vec<(String, String)>,
    /// The runtime changes of the lists since start, oldest first: the new process
    /// keeps them over its reloads as this one did.
    pub changes: Vec<(Change, String)>,
}

/// The guard of the old process of a hot upgrade, as the new one receives it.
#[derive(Debug)]
pub struct Handed {
    /// What was said of it.
    pub moving: Moving,
    /// One link per entry of `moving.interfaces`.
    pub links: Vec<OwnedFd>,
    /// The old `guard_sources` map.
    pub sources: OwnedFd,
    /// The old `guard_stats` map.
    pub stats: OwnedFd,
}

impl Handed {
    /// How many descriptors follow for `moving`: its links and two maps.
    pub const fn descriptors(moving: &Moving) -> usize {
        moving.interfaces.len() + 2
    }

    /// Takes them from `fds`, in the order [`Guard::hand_over`] gives them; the
    /// caller counted them ([`Handed::descriptors`]).
    pub fn from_descriptors(moving: Moving, fds: impl Iterator<Item = OwnedFd>) -> Self {
        let mut fds: Vec<OwnedFd> = fds.collect();
        let stats = fds.pop().expect("counted");
        let sources = fds.pop().expect("counted");
        Self {
            moving,
            links: fds,
            sources,
            stats,
        }
    }
}

/// The loaded, attached guard.
pub struct Guard {
    ebpf: Mutex<Ebpf>,
    /// One per attached interface; dropping one detaches (unless another process
    /// holds the link too).
    links: Mutex<Vec<OwnedFd>>,
    deny: Mutex<Trie>,
    allow: Mutex<Trie>,
    ports: Mutex<HashMap<MapData, u16, u8>>,
    sources: HashMap<MapData, [u8; 16], GuardSource>,
    conf: Mutex<Array<MapData, GuardConf>>,
    stats: PerCpuArray<MapData, u64>,
    /// `(interface, "native" | "generic")`.
    attached: Vec<(String, &'static str)>,
    /// The file's lists, the runtime changes since, and what the tries hold.
    lists: Mutex<State>,
    rate: Mutex<(u32, u32)>,
}

/// `ctl guard` and `GET /api/v1/guard`.
#[derive(Debug, Serialize)]
pub struct GuardView {
    /// Interfaces and the XDP mode each got.
    pub interfaces: Vec<AttachedView>,
    /// Denied blocks.
    pub deny: Vec<String>,
    /// Allowed blocks.
    pub allow: Vec<String>,
    /// SYNs a second per source (0: not limited).
    pub syn_rate: u32,
    /// SYNs at once per source.
    pub syn_burst: u32,
    /// Counters by name (`lb_common::GUARD_STATS`).
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    /// The sources with the most drops (then the most SYNs), at most 20.
    pub top: Vec<SourceView>,
}

/// One attachment.
#[derive(Debug, Serialize)]
pub struct AttachedView {
    /// Interface name.
    pub interface: String,
    /// `native` or `generic`.
    pub mode: &'static str,
}

/// One source in `guard_sources`.
#[derive(Debug, Serialize)]
pub struct SourceView {
    /// Its address.
    pub source: String,
    /// SYNs it sent to guarded ports.
    pub syns: u64,
    /// Its packets dropped.
    pub dropped: u64,
}

impl Guard {
    /// Loads the program, attaches it to every interface of `config` and feeds it
    /// `ports` and the lists. An interface that refuses stops the start. With
    /// `handed` (a hot upgrade), the old guard's state is copied in first and its
    /// links run this program from then on; an interface it was not attached to is
    /// attached anew, and one it was that `config` no longer names comes off when
    /// the old process exits.
    pub fn load(
        config: &GuardConfig,
        ports: &[u16],
        handed: Option<Handed>,
    ) -> Result<Self, GuardError> {
        let mut ebpf = EbpfLoader::new()
            .load(GUARD_OBJECT)
            .map_err(|e| GuardError::Load(e.to_string()))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(GuardError::Map {
                map: name,
                reason: "missing from the object".into(),
            })
        };
        let deny = Trie::try_from(take(&mut ebpf, guard_maps::DENY)?)
            .map_err(map_err(guard_maps::DENY))?;
        let allow = Trie::try_from(take(&mut ebpf, guard_maps::ALLOW)?)
            .map_err(map_err(guard_maps::ALLOW))?;
        let ports_map = HashMap::try_from(take(&mut ebpf, guard_maps::PORTS)?)
            .map_err(map_err(guard_maps::PORTS))?;
        let mut sources = HashMap::try_from(take(&mut ebpf, guard_maps::SOURCES)?)
            .map_err(map_err(guard_maps::SOURCES))?;
        let conf = Array::try_from(take(&mut ebpf, guard_maps::CONF)?)
            .map_err(map_err(guard_maps::CONF))?;
        let mut stats = PerCpuArray::try_from(take(&mut ebpf, guard_maps::STATS)?)
            .map_err(map_err(guard_maps::STATS))?;
        load_program(&mut ebpf)?;
        let mut changes = Vec::new();
        if let Some(h) = &handed {
            inherit(h, &mut sources, &mut stats);
            for (change, cidr) in &h.moving.changes {
                match cidr.parse() {
                    Ok(cidr) => changes.push((*change, cidr)),
                    Err(e) => {
                        warn!(cidr, error = %e, "upgrade: a runtime guard change could not be kept")
                    }
                }
            }
        }
        let lists = State {
            changes,
            ..State::default()
        };
        let guard = Self {
            ebpf: Mutex::new(ebpf),
            links: Mutex::new(Vec::new()),
            deny: Mutex::new(deny),
            allow: Mutex::new(allow),
            ports: Mutex::new(ports_map),
            sources,
            conf: Mutex::new(conf),
            stats,
            attached: Vec::new(),
            lists: Mutex::new(lists),
            rate: Mutex::new((0, 0)),
        };
        // Fed before it is attached: it never runs with empty lists.
        guard.configure(config, ports)?;
        let (links, attached) = {
            let mut ebpf = guard.ebpf.lock().expect("guard lock");
            attach(program(&mut ebpf)?, &config.interfaces, handed)?
        };
        *guard.links.lock().expect("links lock") = links;
        Ok(Self { attached, ..guard })
    }

    /// What a hot upgrade gives the new process: what to say, then the descriptors
    /// (a duplicate of each link, the `guard_sources` and `guard_stats` maps).
    pub fn hand_over(&self) -> std::io::Result<(Moving, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        for link in self.links.lock().expect("links lock").iter() {
            fds.push(link.try_clone()?);
        }
        fds.push(self.sources.map().fd().as_fd().try_clone_to_owned()?);
        fds.push(self.stats.map().fd().as_fd().try_clone_to_owned()?);
        let changes = self.lists.lock().expect("lists lock").changes.clone();
        let moving = Moving {
            interfaces: self
                .attached
                .iter()
                .map(|(i, mode)| (i.clone(), (*mode).to_owned()))
                .collect(),
            changes: changes
                .into_iter()
                .map(|(change, cidr)| (change, cidr.to_string()))
                .collect(),
        };
        Ok((moving, fds))
    }

    /// A hot upgrade that did not happen: this program back on every link, in case
    /// the new process put its own there before it failed (otherwise a no-op).
    pub fn reclaim(&self) {
        let mut ebpf = self.ebpf.lock().expect("guard lock");
        let Ok(xdp) = program(&mut ebpf) else { return };
        let Ok(fd) = xdp.fd() else { return };
        for (link, (interface, _)) in self
            .links
            .lock()
            .expect("links lock")
            .iter()
            .zip(&self.attached)
        {
            if let Err(e) = crate::sys::link_update(link.as_fd(), fd.as_fd()) {
                warn!(interface, error = %e, "upgrade: could not put this process's XDP guard back");
            }
        }
    }

    /// Applies a (re)loaded `[guard]`: ports, SYN rate, and the file's lists with the
    /// runtime changes made since start laid over them. (Interfaces are attached at
    /// start only.)
    pub fn configure(&self, config: &GuardConfig, ports: &[u16]) -> Result<(), GuardError> {
        {
            let mut map = self.ports.lock().expect("ports lock");
            let old: Vec<u16> = map.keys().filter_map(Result::ok).collect();
            for p in old.iter().filter(|p| !ports.contains(p)) {
                map.remove(p).map_err(map_err(guard_maps::PORTS))?;
            }
            for p in ports {
                map.insert(p, 1, 0).map_err(map_err(guard_maps::PORTS))?;
            }
        }
        let interval_ns = if config.syn_rate == 0 {
            0
        } else {
            1_000_000_000 / u64::from(config.syn_rate)
        };
        let tolerance_ns = interval_ns * u64::from(config.syn_burst.saturating_sub(1));
        self.conf
            .lock()
            .expect("conf lock")
            .set(
                0,
                GuardConf {
                    interval_ns,
                    tolerance_ns,
                },
                0,
            )
            .map_err(map_err(guard_maps::CONF))?;
        *self.rate.lock().expect("rate lock") = (config.syn_rate, config.syn_burst);
        let mut state = self.lists.lock().expect("lists lock");
        state.file = Lists {
            deny: config.deny.iter().copied().collect(),
            allow: config.allow.iter().copied().collect(),
        };
        let mut want = state.file.clone();
        for &(change, cidr) in &state.changes {
            want.apply(change, cidr);
        }
        self.sync(&state.held, &want)?;
        state.held = want;
        Ok(())
    }

    /// A runtime change (`ctl guard deny|allow|remove`): in force at once, kept over
    /// reloads until the daemon stops.
    pub fn change(&self, change: Change, cidr: Cidr) -> Result<(), GuardError> {
        let mut state = self.lists.lock().expect("lists lock");
        let mut want = state.held.clone();
        want.apply(change, cidr);
        self.sync(&state.held, &want)?;
        state.held = want;
        // The last change of a block decides: earlier ones for it can go (the list
        // stays as long as the blocks changed, however often they change).
        state.changes.retain(|&(_, c)| c != cidr);
        state.changes.push((change, cidr));
        info!(change = ?change, cidr = %cidr, "guard list changed at runtime");
        Ok(())
    }

    /// Makes the tries hold `want` where they held `have`; additions first, so a
    /// block moving from one list to the other is never in neither.
    fn sync(&self, have: &Lists, want: &Lists) -> Result<(), GuardError> {
        let key = |c: &Cidr| {
            let (prefix, addr) = c.key();
            Key::new(prefix, addr)
        };
        for (map, name, have, want) in [
            (&self.allow, guard_maps::ALLOW, &have.allow, &want.allow),
            (&self.deny, guard_maps::DENY, &have.deny, &want.deny),
        ] {
            let mut trie = map.lock().expect("trie lock");
            for c in want.difference(have) {
                trie.insert(&key(c), 1, 0).map_err(map_err(name))?;
            }
        }
        for (map, name, have, want) in [
            (&self.allow, guard_maps::ALLOW, &have.allow, &want.allow),
            (&self.deny, guard_maps::DENY, &have.deny, &want.deny),
        ] {
            let mut trie = map.lock().expect("trie lock");
            for c in have.difference(want) {
                trie.remove(&key(c)).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// The counters summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        GUARD_STATS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = self
                    .stats
                    .get(&(i as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (*name, total)
            })
            .collect()
    }

    /// What `ctl guard` shows.
    pub fn view(&self) -> GuardView {
        let lists = self.lists.lock().expect("lists lock").held.clone();
        let (syn_rate, syn_burst) = *self.rate.lock().expect("rate lock");
        let mut top: Vec<SourceView> = self
            .sources
            .iter()
            .filter_map(Result::ok)
            .map(|(addr, s)| SourceView {
                source: cidr::source(addr).to_string(),
                syns: s.syns,
                dropped: s.dropped,
            })
            .collect();
        top.sort_by_key(|s| std::cmp::Reverse((s.dropped, s.syns)));
        top.truncate(20);
        GuardView {
            interfaces: self
                .attached
                .iter()
                .map(|(interface, mode)| AttachedView {
                    interface: interface.clone(),
                    mode,
                })
                .collect(),
            deny: lists.deny.iter().map(ToString::to_string).collect(),
            allow: lists.allow.iter().map(ToString::to_string).collect(),
            syn_rate,
            syn_burst,
            counters: self.counters().into_iter().collect(),
            top,
        }
    }

    /// Detaches from every interface (at a clean stop): the links are closed.
    pub fn detach(&self) {
        self.links.lock().expect("links lock").clear();
        info!("XDP guard detached");
    }
}

/// A change as the control socket and the admin API name it (`deny`, `allow`,
/// `remove` and a CIDR block); the error says what was wrong.
pub fn change_from_words(guard: &Guard, change: &str, cidr: &str) -> Result<(), String> {
    let change = match change {
        "deny" => Change::Deny,
        "allow" => Change::Allow,
        "remove" => Change::Remove,
        other => {
            return Err(format!(
                "unknown guard change {other:?}: deny, allow or remove"
            ));
        }
    };
    let cidr: Cidr = cidr.parse()?;
    guard.change(change, cidr).map_err(|e| e.to_string())
}

/// `XDP_FLAGS_SKB_MODE` and `XDP_FLAGS_DRV_MODE` (linux/if_link.h).
const GENERIC: u32 = 1 << 1;
const NATIVE: u32 = 1 << 2;

/// The object's program.
fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, GuardError> {
    ebpf.program_mut("guard")
        .ok_or_else(|| GuardError::Load("program guard missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| GuardError::Load(e.to_string()))
}

fn load_program(ebpf: &mut Ebpf) -> Result<(), GuardError> {
    program(ebpf)?
        .load()
        .map_err(|e| GuardError::Load(format!("verifier: {e}")))
}

/// Attaches the loaded program to each interface as a BPF link (needs Linux 5.9):
/// native mode first, generic when the driver has no XDP support. An interface in
/// `handed` keeps its link and mode, and runs this program from now on.
fn attach(
    xdp: &mut Xdp,
    interfaces: &[String],
    handed: Option<Handed>,
) -> Result<Attached, GuardError> {
    let program = xdp
        .fd()
        .map_err(|e| GuardError::Load(e.to_string()))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| GuardError::Load(e.to_string()))?;
    let mut inherited: Vec<(String, String, OwnedFd)> = match handed {
        Some(h) => h
            .moving
            .interfaces
            .into_iter()
            .zip(h.links)
            .map(|((i, m), l)| (i, m, l))
            .collect(),
        None => Vec::new(),
    };
    let mut links = Vec::new();
    let mut attached = Vec::new();
    for interface in interfaces {
        let (link, mode) = match inherited.iter().position(|(i, _, _)| i == interface) {
            Some(at) => {
                let (_, mode, link) = inherited.swap_remove(at);
                crate::sys::link_update(link.as_fd(), program.as_fd()).map_err(|e| {
                    GuardError::Attach {
                        interface: interface.clone(),
                        reason: format!("taking over the old process's link: {e}"),
                    }
                })?;
                let mode = if mode == "native" {
                    "native"
                } else {
                    "generic"
                };
                info!(interface = %interface, mode, "XDP guard taken over from the old process");
                (link, mode)
            }
            None => attach_one(program.as_fd(), interface)?,
        };
        links.push(link);
        attached.push((interface.clone(), mode));
    }
    for (interface, _, _) in &inherited {
        info!(interface = %interface, "the configuration no longer guards this interface: the old process's guard comes off it when that process exits");
    }
    Ok((links, attached))
}

/// A new link of `program` on `interface`, native mode first.
fn attach_one(
    program: std::os::fd::BorrowedFd<'_>,
    interface: &str,
) -> Result<(OwnedFd, &'static str), GuardError> {
    let failed = |reason: String| GuardError::Attach {
        interface: interface.to_owned(),
        reason,
    };
    let ifindex = crate::sys::interface_index(interface).map_err(|e| failed(e.to_string()))?;
    let (link, mode) = match crate::sys::xdp_link_create(program, ifindex, NATIVE) {
        Ok(link) => (link, "native"),
        Err(native) => match crate::sys::xdp_link_create(program, ifindex, GENERIC) {
            Ok(link) => (link, "generic"),
            Err(e) => return Err(failed(format!("native: {native}; generic: {e}"))),
        },
    };
    info!(interface = %interface, mode, "XDP guard attached");
    Ok((link, mode))
}

/// Copies what the old guard learnt into this one's maps: each source's SYN rate
/// and counts, and the counters (per CPU). A map of another layout (another
/// version's) is left behind with a warning: the guard then starts afresh.
fn inherit(
    handed: &Handed,
    sources: &mut HashMap<MapData, [u8; 16], GuardSource>,
    stats: &mut PerCpuArray<MapData, u64>,
) {
    let mut copy = || -> Result<(usize, usize), String> {
        let e = |e: aya::maps::MapError| e.to_string();
        let open = |fd: &OwnedFd| {
            let fd = fd.try_clone().map_err(|e| e.to_string())?;
            Map::from_map_data(MapData::from_fd(fd).map_err(e)?).map_err(e)
        };
        let old_sources: HashMap<MapData, [u8; 16], GuardSource> =
            HashMap::try_from(open(&handed.sources)?).map_err(e)?;
        let old_stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open(&handed.stats)?).map_err(e)?;
        let mut n = 0;
        for entry in old_sources.iter() {
            let (addr, source) = entry.map_err(e)?;
            sources.insert(addr, source, 0).map_err(e)?;
            n += 1;
        }
        for i in 0..old_stats.len() {
            let old = old_stats.get(&i, 0).map_err(e)?;
            let values: Vec<u64> = old.iter().copied().collect();
            stats
                .set(
                    i,
                    PerCpuValues::try_from(values).map_err(|e| e.to_string())?,
                    0,
                )
                .map_err(e)?;
        }
        Ok((n, old_stats.len() as usize))
    };
    match copy() {
        Ok((sources, counters)) => {
            info!(
                sources,
                counters, "upgrade: the guard's sources and counters taken over"
            );
        }
        Err(e) => {
            warn!(error = %e, "upgrade: the old guard's sources and counters could not be read; they start afresh");
        }
    }
}
