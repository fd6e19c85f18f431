//! The configuration checks, problem by problem.

use std::{num::NonZeroU32, time::Duration};

use super::*;

const GOOD: &str = r#"
[global]
name = "t1"
data_plane = "copy"

[[listeners]]
name = "mqtt"
bind = "127.0.0.1:1883"
cluster = "brokers"
inspect_timeout = "250ms"

[[clusters]]
name = "brokers"
connect_timeout = "2s"

[[clusters.servers]]
name = "node1"
address = "127.0.0.1:18831"
weight = 3

[[clusters.servers]]
name = "node2"
address = "127.0.0.1:18832"
state = "drain"
"#;

#[test]
fn every_problem_is_reported_at_once_with_its_key_and_what_to_write() {
    let text = GOOD
        .replace("bind = \"127.0.0.1:1883\"", "bind = \"localhost:1883\"")
        .replace("cluster = \"brokers\"\n", "")
        .replace("connect_timeout = \"2s\"", "connect_timeout = \"0s\"")
        .replace("address = \"127.0.0.1:18832\"", "address = \"10.0.0.1\"");
    let e = errors(&text);
    for want in [
        "line 8: listeners[0].bind: expected IP:port, e.g. 0.0.0.0:1883",
        "line 7: listeners[0].cluster: missing",
        "line 12: clusters[0].connect_timeout: must be more than 0s",
        "line 22: clusters[0].servers[1].address: expected IP:port or host:port",
    ] {
        assert!(e.iter().any(|l| l.contains(want)), "{want}: {e:?}");
    }
    assert_eq!(e.len(), 4, "{e:?}");
    let e = errors(&GOOD.replace("127.0.0.1:1883", "127.0.0.1:0"));
    assert!(e[0].contains("port 0"), "{e:?}");
}

#[test]
fn servers_may_be_given_by_host_name_resolved_at_load() {
    let c = Config::parse(&GOOD.replace("127.0.0.1:18831", "localhost:18831")).expect("valid");
    assert!(c.clusters[0].servers[0].address.ip().is_loopback());
    assert_eq!(c.clusters[0].servers[0].address.port(), 18831);
    let e = errors(&GOOD.replace("127.0.0.1:18831", "no-such-host.invalid:18831"));
    assert!(
        e[0].contains("cannot resolve host name \"no-such-host.invalid\""),
        "{e:?}"
    );
}

#[test]
fn parses_a_good_file_into_typed_values() {
    let c = Config::parse(GOOD).expect("valid");
    assert_eq!(c.global.name, "t1");
    assert_eq!(c.global.data_plane, DataPlaneKind::Copy);
    assert_eq!(c.global.max_connections, None);
    assert_eq!(c.global.max_preconnect_bytes, 64 << 20);
    let l = &c.listeners[0];
    assert_eq!(l.bind, "127.0.0.1:1883".parse().expect("addr"));
    assert_eq!(l.inspect_timeout, Duration::from_millis(250));
    assert_eq!(l.max_connect_size, 65536);
    let cl = &c.clusters[l.cluster];
    assert_eq!(cl.connect_timeout, Duration::from_secs(2));
    assert_eq!(cl.idle_timeout, Duration::from_secs(1800));
    assert_eq!(
        cl.promote,
        Promote {
            after_bytes: None,
            after: Some(Duration::from_secs(10)),
            max_rate: Some(DEFAULT_PROMOTE_MAX_RATE),
            min_rate: None,
            conversations: true,
        }
    );
    assert_eq!(cl.servers.len(), 2);
    assert_eq!(cl.servers[0].weight.get(), 3);
    assert_eq!(cl.servers[1].state, ServerState::Drain);
}

fn errors(text: &str) -> Vec<String> {
    Config::parse(text)
        .expect_err("invalid")
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn unknown_key_names_the_key_and_line() {
    let text = GOOD.replace("weight = 3", "wieght = 3");
    let e = errors(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("line 19: wieght: unknown field `wieght`"),
        "{e:?}"
    );
}

#[test]
fn bad_values_name_the_key() {
    let e = errors(&GOOD.replace("\"250ms\"", "\"fast\""));
    assert!(
        e[0].starts_with("line 10: inspect_timeout: invalid duration \"fast\""),
        "{e:?}"
    );
    let e = errors(&GOOD.replace("127.0.0.1:18832", "127.0.0.1:99999"));
    assert!(
        e[0].starts_with("line 23: clusters[0].servers[1].address: expected IP:port"),
        "{e:?}"
    );
    let e = errors(&GOOD.replace("\"drain\"", "\"sleepy\""));
    assert!(
        e[0].contains("state") && e[0].contains("unknown variant"),
        "{e:?}"
    );
}

#[test]
fn second_wave_keys_are_checked_by_name() {
    // An empty client id cannot fall back to hashing it.
    let e = errors(&GOOD.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\nempty_client_id = \"client-id\"",
    ));
    assert!(
        e[0].contains("clusters[0].empty_client_id: an empty"),
        "{e:?}"
    );
    let c = Config::parse(&GOOD.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\nempty_client_id = \"round-robin\"",
    ))
    .expect("valid");
    assert_eq!(c.clusters[0].empty_client_id, Balance::RoundRobin);
    // WebSocket-only keys on a plain listener.
    let plain = GOOD.replace(
        "inspect_timeout = \"250ms\"",
        "inspect_timeout = \"250ms\"\nmax_frame_size = 4096\npath = \"/mqtt\"",
    );
    let e = errors(&plain);
    assert_eq!(e.len(), 2, "{e:?}");
    for key in [
        "listeners[0].max_frame_size: only",
        "listeners[0].path: only",
    ] {
        assert!(e.iter().any(|l| l.contains(key)), "{key}: {e:?}");
    }
    let ws = GOOD.replace(
        "inspect_timeout = \"250ms\"",
        "inspect_timeout = \"250ms\"\nkind = \"ws\"\nmax_frame_size = 16",
    );
    let e = errors(&ws);
    assert!(e[0].contains("max_frame_size: must be between"), "{e:?}");
    let small = GOOD.replace("[global]\n", "[global]\nmax_preconnect_bytes = 1000\n");
    let e = errors(&small);
    assert!(e[0].contains("global.max_preconnect_bytes"), "{e:?}");
    // Thresholds: "0s" turns promotion by age off; bytes are taken as given.
    let c = Config::parse(&GOOD.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\npromote_after = \"0s\"\npromote_after_bytes = 65536\npromote_max_rate = 0\npromote_conversations = false",
    ))
    .expect("valid");
    assert_eq!(
        c.clusters[0].promote,
        Promote {
            after_bytes: Some(65536),
            after: None,
            max_rate: None,
            min_rate: None,
            conversations: false,
        }
    );
    // A floor on the rate, and one above the ceiling refused by name.
    let c = Config::parse(&GOOD.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\npromote_min_rate = 2",
    ))
    .expect("valid");
    assert_eq!(c.clusters[0].promote.min_rate, Some(2));
    let e = errors(&GOOD.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\npromote_min_rate = 20\npromote_max_rate = 10",
    ));
    assert!(
        e.iter()
            .any(|l| l.contains("promote_min_rate: must not be above")),
        "{e:?}"
    );
    let c = Config::parse(&GOOD.replace("data_plane = \"copy\"", "max_connections = 500"))
        .expect("valid");
    assert_eq!(c.global.max_connections.map(NonZeroU32::get), Some(500));
}

#[test]
fn semantic_problems_are_all_reported_with_lines() {
    let text = GOOD
        .replace("cluster = \"brokers\"", "cluster = \"nope\"")
        .replace("node2", "node1");
    let e = errors(&text);
    assert!(
        e.contains(
            &"line 9: listeners[0].cluster: no [[clusters]] entry is named \"nope\"".to_owned()
        ),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("line 22: clusters[0].servers[1].name: duplicate server name")),
        "{e:?}"
    );
}

#[test]
fn tls_problems_name_the_key() {
    let mqtts = GOOD.replace(
        "cluster = \"brokers\"\ninspect",
        "kind = \"mqtts\"\ncluster = \"brokers\"\ninspect",
    );
    let e = errors(&mqtts);
    assert!(
        e.iter()
            .any(|m| m.contains("listeners[0].tls: a TLS listener needs")),
        "{e:?}"
    );
    let missing = mqtts.replace(
        "inspect_timeout = \"250ms\"",
        "inspect_timeout = \"250ms\"\n[listeners.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"",
    );
    let e = errors(&missing);
    assert!(
        e.iter().any(|m| m.contains(
            "listeners[0].tls.cert: cannot read certificates from /nonexistent/cert.pem"
        )),
        "{e:?}"
    );
    let plain_with_tls = missing.replace("kind = \"mqtts\"\n", "");
    let e = errors(&plain_with_tls);
    assert!(
        e.iter()
            .any(|m| m.contains("listeners[0].tls: only \"mqtts\" and \"wss\"")),
        "{e:?}"
    );
    let rewrite = GOOD.replace(
        "inspect_timeout = \"250ms\"",
        "inspect_timeout = \"250ms\"\n[listeners.rewrite]\nclient_id = \"cert.serial\"",
    );
    let e = errors(&rewrite);
    assert!(
        e.iter()
            .any(|m| m.contains("listeners[0].rewrite: needs client certificates")),
        "{e:?}"
    );
    let bad_field = rewrite.replace("cert.serial", "cert.colour");
    let e = errors(&bad_field);
    assert!(e.iter().any(|m| m.contains("client_id")), "{e:?}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
    assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn instance_name_must_be_a_safe_path_component() {
    let e = errors(&GOOD.replace("\"t1\"", "\"../x\""));
    assert!(e[0].starts_with("line 3: global.name:"), "{e:?}");
}

#[test]
fn admin_token_must_be_private_and_stats_is_its_old_name() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("mqttlb-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = dir.join("token");
    std::fs::write(&token, "  s3cret\n").expect("token");
    let with_admin =
        |file: &str| format!("[admin]\nbind = \"127.0.0.1:8888\"\ntoken_file = \"{file}\"\n{GOOD}");

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = Config::parse_in(&with_admin("token"), &dir).expect_err("world-readable");
    assert!(e.to_string().contains("admin.token_file"), "{e}");
    assert!(e.to_string().contains("chmod 600"), "{e}");

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let c = Config::parse_in(&with_admin("token"), &dir).expect("valid");
    let admin = c.admin.expect("admin");
    assert_eq!(admin.token, Some(Token("s3cret".into())));
    // The secret never reaches a log line through Debug.
    assert!(!format!("{admin:?}").contains("s3cret"));

    let e = Config::parse_in(&with_admin("missing"), &dir).expect_err("missing");
    assert!(e.to_string().contains("cannot read"), "{e}");

    let old = format!("[stats]\nbind = \"127.0.0.1:8404\"\n{GOOD}");
    let c = Config::parse(&old).expect("valid");
    let admin = c.admin.expect("admin");
    assert_eq!(admin.bind, "127.0.0.1:8404".parse().expect("addr"));
    assert!(admin.from_stats_section && admin.token.is_none());

    let both =
        format!("[stats]\nbind = \"127.0.0.1:8404\"\n[admin]\nbind = \"127.0.0.1:8888\"\n{GOOD}");
    assert!(errors(&both)[0].contains("older name of [admin]"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_health_client_id_must_fit_a_connect() {
    let text = GOOD.replace(
        "connect_timeout = \"2s\"",
        &format!(
            "connect_timeout = \"2s\"\nhealth = {{ kind = \"mqtt\", client_id = \"{}\" }}",
            "x".repeat(300)
        ),
    );
    let e = errors(&text);
    assert!(
        e.iter()
            .any(|m| m.contains("clusters[0].health.client_id: at most 256 bytes")),
        "{e:?}"
    );
}

#[test]
fn the_account_to_run_as_is_looked_up_and_named_when_missing() {
    let with = |lines: &str| GOOD.replace("data_plane = \"copy\"", lines);
    let c = Config::parse(&with("user = \"root\"\ngroup = \"daemon\"")).expect("root");
    let account = c.global.run_as.expect("run_as");
    assert_eq!((account.user.as_str(), account.uid), ("root", 0));
    assert_ne!(
        account.gid, 0,
        "the group named, not the user's primary one"
    );
    let c = Config::parse(&with("user = \"nobody\"")).expect("nobody");
    let account = c.global.run_as.expect("run_as");
    assert_eq!((account.uid, account.gid), (65534, 65534));
    assert!(Config::parse(GOOD).expect("good").global.run_as.is_none());
    let e = errors(&with("user = \"no-such-user-here\""));
    assert_eq!(
        e,
        ["line 4: global.user: no user \"no-such-user-here\" on this host (getpwnam)"]
    );
    let e = errors(&with("user = \"nobody\"\ngroup = \"no-such-group\""));
    assert_eq!(
        e,
        ["line 5: global.group: no group \"no-such-group\" on this host (getgrnam)"]
    );
    let e = errors(&with("group = \"daemon\""));
    assert_eq!(
        e,
        ["line 4: global.group: needs global.user (the group alone is not switched to)"]
    );
}

#[test]
fn workers_share_the_listener_rate_not_the_per_source_limits() {
    let limits = Limits {
        max_connections_per_source: Some(4),
        per_source: Some(Rate {
            rate: 2.0,
            burst: 3,
        }),
        new_connections: Some(Rate {
            rate: 100.0,
            burst: 5,
        }),
        new_connection_queue: 9,
        per_client_id: Some(Rate {
            rate: 1.0,
            burst: 1,
        }),
    };
    assert_eq!(limits.per_worker(1), limits);
    let mine = limits.per_worker(4);
    assert_eq!(
        mine.new_connections,
        Some(Rate {
            rate: 25.0,
            burst: 2
        })
    );
    assert_eq!(mine.new_connection_queue, 3);
    assert_eq!(mine.max_connections_per_source, Some(4));
    assert_eq!(mine.per_source, limits.per_source);
    assert_eq!(mine.per_client_id, limits.per_client_id);
}

#[test]
fn workers_are_a_count_or_auto() {
    let with = |line: &str| GOOD.replace("data_plane = \"copy\"", line);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    // Not in the file: one per core.
    let c = Config::parse(GOOD).expect("good");
    assert_eq!(c.global.workers.get(), cores.min(MAX_WORKERS));
    assert!(c.global.workers_by_default);
    let c = Config::parse(&with("workers = 4")).expect("4");
    assert_eq!(c.global.workers.get(), 4);
    assert!(!c.global.workers_by_default);
    let c = Config::parse(&with("workers = \"auto\"")).expect("auto");
    assert_eq!(c.global.workers.get(), cores.min(MAX_WORKERS));
    assert!(!c.global.workers_by_default);
    for bad in [
        "workers = 0",
        "workers = 65",
        "workers = -1",
        "workers = \"many\"",
    ] {
        let e = errors(&with(bad));
        assert_eq!(
            e,
            ["line 4: global.workers: must be \"auto\" or a whole number from 1 to 64"],
            "{bad}"
        );
    }
}
