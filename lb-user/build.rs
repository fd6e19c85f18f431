//! Compiles the eBPF programs in `../lb-ebpf/src` with clang (from `$CLANG`, else
//! `clang-19`) and leaves the objects in `OUT_DIR` for `include_bytes_aligned!`.

use std::{env, path::PathBuf, process::Command};

/// Programs (one object each) and the headers they include.
const PROGRAMS: &[&str] = &["splice.bpf.c", "guard.bpf.c", "reuseport.bpf.c"];
const HEADERS: &[&str] = &["lb_consts.h", "lb_structs.h", "lb_maps.h", "lb_helpers.h"];

fn main() {
    let src =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../lb-ebpf/src");
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang-19".to_owned());
    println!("cargo:rerun-if-env-changed=CLANG");
    for file in PROGRAMS.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed={}", src.join(file).display());
    }
    let arch_include = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);
    for program in PROGRAMS {
        let object = out.join(program.replace(".c", ".o"));
        let status = Command::new(&clang)
            .args([
                "-g", "-O2", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
            ])
            .arg(format!("-I{arch_include}"))
            .arg("-c")
            .arg(src.join(program))
            .arg("-o")
            .arg(&object)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{clang} failed on {program} ({s}); see the compiler output above"),
            Err(e) => panic!(
                "cannot run {clang} ({e}): install it with \
                 `apt-get install -y clang-19 llvm-19 libbpf-dev` (or run `cargo xtask test`, \
                 which installs it), or point $CLANG at a clang that targets BPF"
            ),
        }
    }
}
