//! `cargo xtask fuzz [--seconds N]`: runs each cargo-fuzz target (`fuzz/`) for N seconds
//! (default 60), the CONNECT target's corpus seeded with the shared first-packet
//! vectors and the PROXY target's with v1/v2 headers. Fails on any crash; prints the
//! executions per second.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{root, sh};

const TARGETS: [&str; 2] = ["connect", "proxy_header"];

pub fn fuzz(args: &[String]) -> Result<()> {
    let seconds: u64 = match args.iter().position(|a| a == "--seconds") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .context("--seconds needs a whole number")?,
        None => 60,
    };
    let root = root();
    let installed = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        sh(Command::new(env!("CARGO")).args(["install", "cargo-fuzz", "--locked"]))
            .context("cannot install cargo-fuzz from crates.io")?;
    }
    seed(&root)?;
    for target in TARGETS {
        let out = Command::new(env!("CARGO"))
            .current_dir(root.join("fuzz"))
            // libFuzzer's instrumentation flags are unstable options of rustc; the
            // stable toolchain accepts them this way (no sanitizer: `-s none`).
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "-s", "none", "--release", "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .output()
            .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{log}");
            bail!("fuzz target {target} failed; the input is under fuzz/artifacts/{target}/");
        }
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        println!(
            "fuzz {target}: {runs} executions in {seconds} s ({} per second), no failure",
            runs / seconds.max(1)
        );
    }
    Ok(())
}

/// Writes the seed inputs (existing corpus files are kept).
fn seed(root: &Path) -> Result<()> {
    let connect = root.join("fuzz/corpus/connect");
    std::fs::create_dir_all(&connect)?;
    let vectors = std::fs::read_to_string(root.join("tests/data/mqtt-connect-vectors.tsv"))
        .context("tests/data/mqtt-connect-vectors.tsv")?;
    for line in vectors.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        let (Some(name), Some(hex)) = (f.first(), f.get(2)) else {
            continue;
        };
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect();
        std::fs::write(connect.join(name), bytes)?;
    }
    let proxy = root.join("fuzz/corpus/proxy_header");
    std::fs::create_dir_all(&proxy)?;
    let v2 = |fam: u8, addrs: &[u8]| {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.extend_from_slice(&[0x21, fam, 0, addrs.len() as u8]);
        h.extend_from_slice(addrs);
        h
    };
    let seeds: [(&str, Vec<u8>); 5] = [
        (
            "v1_tcp4",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 1883\r\n".to_vec(),
        ),
        (
            "v1_tcp6",
            b"PROXY TCP6 2001:db8::7 2001:db8::1 61000 8883\r\n".to_vec(),
        ),
        ("v1_unknown", b"PROXY UNKNOWN\r\n".to_vec()),
        (
            "v2_tcp4",
            v2(
                0x11,
                &[192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0x07, 0x5b],
            ),
        ),
        ("v2_tcp6", v2(0x21, &[0x20; 36])),
    ];
    for (name, bytes) in seeds {
        std::fs::write(proxy.join(name), bytes)?;
    }
    Ok(())
}
