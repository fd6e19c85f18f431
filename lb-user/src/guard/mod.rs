//! `[guard]`: the XDP front guard (`lb-ebpf/src/guard.bpf.c`). Loaded and attached to
//! the configured interfaces at start (native mode where the driver has it, generic
//! otherwise), fed the listeners' ports, the CIDR lists and the SYN rate, changed at
//! runtime by `mqttlb ctl guard deny|allow|remove CIDR` and the admin API, and
//! detached at a clean stop. Its maps are not pinned: the links are descriptors of
//! this process, so a killed daemon leaves no program behind.

use std::{collections::BTreeSet, sync::Mutex};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{GUARD_STATS, GuardConf, GuardSource, guard_maps};
use serde::Serialize;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
type Attached = (Vec<XdpLinkId>, Vec<(String, &'static str)>);

/// The loaded, attached guard.
pub struct Guard {
    ebpf: Mutex<Ebpf>,
    links: Mutex<Vec<XdpLinkId>>,
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
    /// `ports` and the lists. An interface that refuses stops the start.
    pub fn load(config: &GuardConfig, ports: &[u16]) -> Result<Self, GuardError> {
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
        let sources = HashMap::try_from(take(&mut ebpf, guard_maps::SOURCES)?)
            .map_err(map_err(guard_maps::SOURCES))?;
        let conf = Array::try_from(take(&mut ebpf, guard_maps::CONF)?)
            .map_err(map_err(guard_maps::CONF))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, guard_maps::STATS)?)
            .map_err(map_err(guard_maps::STATS))?;
        let (links, attached) = attach(&mut ebpf, &config.interfaces)?;
        let guard = Self {
            ebpf: Mutex::new(ebpf),
            links: Mutex::new(links),
            deny: Mutex::new(deny),
            allow: Mutex::new(allow),
            ports: Mutex::new(ports_map),
            sources,
            conf: Mutex::new(conf),
            stats,
            attached,
            lists: Mutex::new(State::default()),
            rate: Mutex::new((0, 0)),
        };
        guard.configure(config, ports)?;
        Ok(guard)
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

    /// Detaches from every interface (at a clean stop).
    pub fn detach(&self) {
        let mut ebpf = self.ebpf.lock().expect("guard lock");
        let Some(program) = ebpf.program_mut("guard") else {
            return;
        };
        let Ok(xdp) = <&mut Xdp>::try_from(program) else {
            return;
        };
        for link in self.links.lock().expect("links lock").drain(..) {
            if let Err(e) = xdp.detach(link) {
                warn!(error = %e, "detaching the XDP guard failed");
            }
        }
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

/// Loads the program and attaches it to each interface: native mode first, generic
/// when the driver has no XDP support.
fn attach(ebpf: &mut Ebpf, interfaces: &[String]) -> Result<Attached, GuardError> {
    let xdp: &mut Xdp = ebpf
        .program_mut("guard")
        .ok_or_else(|| GuardError::Load("program guard missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| GuardError::Load(e.to_string()))?;
    xdp.load()
        .map_err(|e| GuardError::Load(format!("verifier: {e}")))?;
    let mut links = Vec::new();
    let mut attached = Vec::new();
    for interface in interfaces {
        let (link, mode) = match xdp.attach(interface, XdpMode::Driver) {
            Ok(link) => (link, "native"),
            Err(native) => match xdp.attach(interface, XdpMode::Skb) {
                Ok(link) => (link, "generic"),
                Err(e) => {
                    return Err(GuardError::Attach {
                        interface: interface.clone(),
                        reason: format!("native: {native}; generic: {e}"),
                    });
                }
            },
        };
        info!(interface = %interface, mode, "XDP guard attached");
        links.push(link);
        attached.push((interface.clone(), mode));
    }
    Ok((links, attached))
}
