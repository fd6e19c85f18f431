//! The worker selection program on each listener's `SO_REUSEPORT` group (see
//! `lb-ebpf/src/reuseport.bpf.c`): a new connection goes to worker
//! [`worker_for_port`] of its source port.

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

/// Loaded and attached selection programs, one per listener (kept for the
/// supervisor's life; the groups keep using them while any socket is open).
pub struct Selection {
    _programs: Vec<Ebpf>,
}

/// Attaches a selection program to each group: `groups[l][k]` is worker k's socket
/// of listener l (named `names[l]`).
pub fn attach(
    names: &[String],
    groups: &[Vec<std::net::TcpListener>],
) -> Result<Selection, SelectError> {
    let mut programs = Vec::new();
    for (name, group) in names.iter().zip(groups) {
        let fail = |why: String| SelectError {
            listener: name.clone(),
            why,
        };
        let workers = group.len() as u32;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("worker_sockets", workers)
            .override_global("workers", &workers, true)
            .load(SELECT_OBJECT)
            .map_err(|e| fail(format!("load: {e}")))?;
        {
            let map = ebpf
                .map_mut("worker_sockets")
                .ok_or_else(|| fail("no worker_sockets map in the object".into()))?;
            let mut array = ReusePortSockArray::try_from(map).map_err(|e| fail(e.to_string()))?;
            for (k, socket) in (0..).zip(group) {
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
