//! The committed benchmark results (`bench/results/latest.json`, written by
//! `cargo xtask bench`) have the documented shape: every system, workload and
//! required metric (the TLS workloads for every system but `direct`), each with median,
//! min and max. The numbers are not checked.

use std::collections::HashSet;

const SYSTEMS: [&str; 6] = [
    "direct",
    "mqttlb-auto",
    "mqttlb-sockmap",
    "mqttlb-copy",
    "haproxy",
    "nginx",
];
const REQUIRED: &[(&str, &str)] = &[
    ("W1", "MB/s"),
    ("W1", "cpu_s_per_GiB"),
    ("W2", "cpu_s_per_Mmsg"),
    ("W2", "msg/s"),
    ("W3", "sessions/s"),
    ("W3", "p99_ms"),
    ("W4", "rss_bytes_per_conn"),
    ("W4", "kernel_bytes_per_conn"),
    ("W5", "p50_us"),
    ("W5", "p99_us"),
    ("W5", "p999_us"),
    ("W6", "msg/s"),
    ("W10", "msg/s"),
    ("W10", "msg/s_qos0"),
];
/// TLS workloads: every system but `direct` (its servers speak plain MQTT).
const REQUIRED_TLS: &[(&str, &str)] = &[
    ("W7", "sessions/s"),
    ("W7", "p99_ms"),
    ("W8", "sessions/s"),
    ("W8", "resumed_fraction"),
    ("W9", "MB/s"),
    ("W9", "cpu_s_per_GiB"),
];

#[test]
fn latest_results_have_every_system_workload_and_metric() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/results/latest.json");
    let text = std::fs::read_to_string(path).expect("bench/results/latest.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let machine = doc["machine"].as_object().expect("machine object");
    for key in ["cpu", "cores", "kernel"] {
        assert!(machine.contains_key(key), "machine.{key} missing");
    }
    let results = doc["results"].as_array().expect("results array");
    let mut seen = HashSet::new();
    for r in results {
        let field = |k: &str| r[k].as_str().unwrap_or_else(|| panic!("{k} in {r}"));
        let (w, s, m) = (field("workload"), field("system"), field("metric"));
        assert!(SYSTEMS.contains(&s), "unknown system {s}");
        let num = |k: &str| {
            r[k].as_f64()
                .unwrap_or_else(|| panic!("{k} of {w}/{s}/{m}"))
        };
        let (median, min, max) = (num("median"), num("min"), num("max"));
        assert!(
            min <= median && median <= max,
            "{w}/{s}/{m}: min {min} <= median {median} <= max {max}"
        );
        seen.insert((w.to_owned(), s.to_owned(), m.to_owned()));
    }
    for s in SYSTEMS {
        let tls = if s == "direct" { &[][..] } else { REQUIRED_TLS };
        for (w, m) in REQUIRED.iter().chain(tls) {
            assert!(
                seen.contains(&((*w).to_owned(), s.to_owned(), (*m).to_owned())),
                "{w} {m} missing for {s}"
            );
        }
    }
}
