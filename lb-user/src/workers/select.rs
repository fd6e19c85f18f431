//! The worker selection program on each listener's `SO_REUSEPORT` group (see
//! `lb-ebpf/src/reuseport.bpf.c`): a new connection goes to worker
//! [`worker_for_port`] of its source port, or on a listener with per-source limits to
//! the worker of its source address (so the quota is counted in one place).

use std::os::fd::AsFd;

use aya::{Ebpf, EbpfLoader, maps::ReusePortSockArray, programs::SkReuseport};

/// The compiled selection program (built by `build.rs`).
static SELECT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport.bpf.o"));

/// The worker a connection from source port `port` goes to, among `workers` (what
/// the selection program computes: a multiplicative hash of the port, so that ports
/// of one parity spread too).
pub fn worker_for_port(port: u16, workers: u32) -> u32 {
    ((u32::from(port).wrapping_mul(0x9E37_79B1)) >> 16) % workers.max(1)
}

/// The selection program could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
#[error(
    "worker selection (SO_REUSEPORT program) for listener {listener:?}: {why} (needs root or CAP_BPF and CAP_NET_ADMIN)"
)]
pub struct SelectError {
    /// The listener.
    pub listener: String,
    /// What failed.
    pub why: String,
}

/// How a listener's group chooses the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The listener.
    pub listener: String,
    /// By source address (per-source limits), else by source port.
    pub by_address: bool,
}

impl Choice {
    /// The choice for `listener`: by source address when it limits connections per
    /// source address and sees the client's own address (not one read from a PROXY
    /// header, which the kernel cannot see).
    pub fn of(listener: &crate::config::Listener) -> Self {
        let limits = &listener.limits;
        let per_source = limits.max_connections_per_source.is_some() || limits.per_source.is_some();
        Self {
            listener: listener.name.clone(),
            by_address: per_source && !listener.accept_proxy_protocol,
        }
    }
}

/// Loaded and attached selection programs, one per listener (kept for the
/// supervisor's life; the groups keep using them while any socket is open).
pub struct Selection {
    _programs: Vec<Ebpf>,
}

/// Attaches a selection program to each group: `groups[l][k]` is worker k's socket
/// of listener l (chosen as `choices[l]` says).
pub fn attach(
    choices: &[Choice],
    groups: &[&[std::net::TcpListener]],
) -> Result<Selection, SelectError> {
    let mut programs = Vec::new();
    for (choice, group) in choices.iter().zip(groups) {
        let fail = |why: String| SelectError {
            listener: choice.listener.clone(),
            why,
        };
        let workers = group.len() as u32;
        let by_address = u32::from(choice.by_address);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("worker_sockets", workers)
            .override_global("workers", &workers, true)
            .override_global("by_address", &by_address, true)
            .load(SELECT_OBJECT)
            .map_err(|e| fail(format!("load: {e}")))?;
        {
            let map = ebpf
                .map_mut("worker_sockets")
                .ok_or_else(|| fail("no worker_sockets map in the object".into()))?;
            let mut array = ReusePortSockArray::try_from(map).map_err(|e| fail(e.to_string()))?;
            for (k, socket) in (0..).zip(group.iter()) {
                array
                    .set(k, socket, 0)
                    .map_err(|e| fail(format!("worker {k}'s socket into the map: {e}")))?;
            }
        }
        let program: &mut SkReuseport = ebpf
            .program_mut("select_worker")
            .ok_or_else(|| fail("no select_worker program in the object".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| fail(e.to_string()))?;
        program.load().map_err(|e| fail(format!("verifier: {e}")))?;
        program
            .attach(group[0].as_fd())
            .map_err(|e| fail(format!("attach: {e}")))?;
        programs.push(ebpf);
    }
    Ok(Selection {
        _programs: programs,
    })
}
