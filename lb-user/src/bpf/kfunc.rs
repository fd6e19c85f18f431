//! Resolving the kfunc the splice program calls (aya 0.14 cannot).

use super::BpfError;

/// A copy of the object with the raw kfunc call's placeholder immediate replaced by the
/// BTF id of `bpf_cast_to_kern_ctx` in this kernel (aya 0.14 does not resolve kfuncs;
/// the program reads each skb's TCP sequence number through it). Returned as `u64`s so
/// the bytes keep the alignment the ELF parser needs.
pub(super) fn with_kfunc_ids(object: &[u8]) -> Result<Vec<u64>, BpfError> {
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
