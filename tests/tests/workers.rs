//! `[global] workers = 2` in front of two real mosquitto brokers: a connection goes
//! to the worker its source port selects, so a client that picks its source port
//! picks its worker. A sticky entry made through worker 0 is honoured by worker 1 (round robin
//! would send half the ids elsewhere); `ctl stats` totals are the sum of the
//! workers' counters, each worker having carried exactly the connections sent to
//! it, and the admin listener (worker 0's) shows the same totals; worker 1 follows
//! worker 0's health checks (before and after a reload: checked once per host); a runtime change through the admin
//! API (served by worker 0) reaches worker 1 (both run as `nobody`, `[global]
//! user`), and so does a reload; a killed worker is started again and
//! serves; SIGTERM stops everything and leaves no worker behind.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use mqttlb::workers::select::worker_for_port;
use tests::{http::metric, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

const IDS: usize = 20;
const TOKEN: &str = "workers-admin-token";

/// A connection from a loopback source port that selects worker `worker` of two.
async fn connect_from(lb: SocketAddr, worker: u32) -> TcpStream {
    connect_from_address(lb, [127, 0, 0, 1].into(), worker).await
}

/// [`connect_from`] with the source address `address`.
async fn connect_from_address(lb: SocketAddr, address: IpAddr, worker: u32) -> TcpStream {
    for _ in 0..1000 {
        let socket = match address {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .expect("socket");
        socket
            .bind((address, 0).into())
            .expect("bind an ephemeral port");
        let port = socket.local_addr().expect("local addr").port();
        if worker_for_port(port, 2) == worker {
            return socket.connect(lb).await.expect("connect");
        }
    }
    panic!("no ephemeral port selects worker {worker}");
}

/// A session with `client_id` through worker `worker`, CONNACK accepted.
async fn session(lb: SocketAddr, worker: u32, client_id: &str) -> TcpStream {
    let mut s = connect_from(lb, worker).await;
    s.write_all(&connect_packet(client_id))
        .await
        .expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "{client_id}");
    s
}

/// Client id -> server name, from `ctl conns` (every worker's connections).
fn servers_by_id(lb: &Daemon) -> BTreeMap<String, String> {
    let conns = lb.ctl("conns");
    conns["conns"]
        .as_array()
        .expect("conns")
        .iter()
        .filter_map(|r| {
            Some((
                r["client_id"].as_str()?.to_owned(),
                r["server"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// What worker `index` itself says of its servers (its control socket).
fn worker_backends(instance: &str, index: u32) -> serde_json::Value {
    let path = mqttlb::workers::socket_path(instance, index);
    mqttlb::control::query_at(&path, "backends").expect("worker's control socket")
}

/// Sets s0's state through the admin API (worker 0's) and checks worker 1 took it.
async fn set_state_through_admin(admin: SocketAddr, instance: &str, state: &str) {
    let body = format!(r#"{{"state":"{state}"}}"#);
    let r = http::request(admin, "POST", "/api/v1/servers/c/s0", Some(TOKEN), &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let views = worker_backends(instance, 1);
    assert_eq!(backend(&views, "s0")["state"], state, "{views}");
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_sticky_table_the_counters_and_the_health_checks() {
    if !privileged("workers (SO_REUSEPORT selection program, BPF maps)") {
        return;
    }
    let a = Mosquitto::start();
    let mut b = Mosquitto::start();
    let admin_port = free_port();
    let secrets = TempDir::new("workers-token");
    let token_file = secrets.secret("token", TOKEN);
    // The workers read it again at a reload, as `nobody`.
    std::os::unix::fs::chown(&token_file, Some(65534), Some(65534)).expect("chown token");
    let mut lb = Daemon::start_edited("auto", &[a.addr, b.addr], |t| {
        // The workers switch to `nobody` and still reach each other's sockets.
        t.replace("[global]\n", "[global]\nworkers = 2\nuser = \"nobody\"\n")
            .replace(
                "connect_timeout = \"1s\"\n",
                "connect_timeout = \"1s\"\nbalance = \"round-robin\"\nsticky = \"client-id\"\n",
            )
            .replace(
                "kind = \"none\"\n",
                "kind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n",
            )
            + &format!(
                "\n[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"{}\"\n",
                token_file.display()
            )
    });
    wait_for("both workers accepting", Duration::from_secs(20), || {
        lb.log().contains("all workers accepting")
    })
    .await;
    let ids: Vec<String> = (0..IDS).map(|i| format!("dev-{i:02}")).collect();

    // Through worker 0: round robin spreads the ids over both brokers.
    let mut held = Vec::new();
    for id in &ids {
        held.push(session(lb.addr, 0, id).await);
    }
    let mut first = BTreeMap::new();
    wait_for("every session listed", Duration::from_secs(5), || {
        first = servers_by_id(&lb);
        first.len() == IDS
    })
    .await;
    let used: std::collections::BTreeSet<&String> = first.values().collect();
    assert_eq!(used.len(), 2, "round robin used both brokers: {first:?}");
    drop(held);
    wait_for("the sessions gone", Duration::from_secs(5), || {
        servers_by_id(&lb).is_empty()
    })
    .await;

    // Through worker 1, in the reverse order (its own round robin would place every
    // id on the other broker): every id back on its broker, from the shared sticky
    // table.
    let mut held = Vec::new();
    for id in ids.iter().rev() {
        held.push(session(lb.addr, 1, id).await);
    }
    let mut second = BTreeMap::new();
    wait_for("every session listed", Duration::from_secs(5), || {
        second = servers_by_id(&lb);
        second.len() == IDS
    })
    .await;
    assert_eq!(second, first, "worker 1 honours worker 0's sticky entries");
    drop(held);

    // ctl stats: the totals are the workers' sums; each carried its own 20.
    let mut stats = serde_json::Value::Null;
    wait_for("counters published", Duration::from_secs(5), || {
        stats = lb.ctl("stats");
        stats["workers"][0]["copied"] == IDS as u64 && stats["workers"][1]["copied"] == IDS as u64
    })
    .await;
    let workers = stats["workers"].as_array().expect("per-worker counters");
    assert_eq!(workers.len(), 2);
    let total = stats["stats"].as_object().expect("totals");
    assert!(total.len() > 20, "{total:?}");
    for (name, value) in total {
        let sum: u64 = workers.iter().map(|w| w[name].as_u64().unwrap_or(0)).sum();
        assert_eq!(
            value.as_u64(),
            Some(sum),
            "{name}: total against the workers'"
        );
    }
    assert_eq!(total["copied"], 2 * IDS as u64);
    // The admin listener (worker 0's) shows the instance's totals too.
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let api = http::get(admin, "/api/v1/stats").await.json();
    assert_eq!(api["stats"]["copied"], 2 * IDS as u64, "{api}");
    let servers = http::get(admin, "/api/v1/servers").await.json();
    let connections: u64 = servers["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|v| v["connections"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(connections, 2 * IDS as u64, "{servers}");
    // `/metrics`: the durations and ends of both workers' sessions, not worker 0's
    // alone (each session's end is counted once it is closed).
    let sessions = 2.0 * IDS as f64;
    let mut m = String::new();
    for _ in 0..50 {
        m = http::get(admin, "/metrics").await.body;
        let ends: f64 = m
            .lines()
            .filter(|l| l.starts_with("mqttlb_connections_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if ends == sessions {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for name in [
        "mqttlb_server_reached_seconds_count",
        "mqttlb_connect_duration_seconds_count",
    ] {
        assert_eq!(metric(&m, name, &[]), Some(sessions), "{name}: {m}");
    }
    let closed = ["s0", "s1"].map(|s| {
        metric(
            &m,
            "mqttlb_connections_total",
            &[("server", s), ("result", "closed")],
        )
    });
    assert_eq!(closed.iter().flatten().sum::<f64>(), sessions, "{m}");

    // Health: worker 0 checks; worker 1 takes its verdict on broker b.
    b.kill();
    wait_for("worker 1 sees b down", Duration::from_secs(5), || {
        let views = worker_backends(&lb.instance, 1);
        backend(&views, "s1")["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "health-down"))
    })
    .await;
    // New ids through worker 1 all go to a (b would refuse them).
    for i in 0..6 {
        drop(session(lb.addr, 1, &format!("new-{i}")).await);
    }

    // The admin API (worker 0) drains s0 on worker 1 as well.
    set_state_through_admin(admin, &lb.instance, "drain").await;

    // A reload of the file (SIGHUP to the supervisor) reaches every worker.
    let s1 = format!("name = \"s1\"\naddress = \"{}\"\n", b.addr);
    let text = lb.config_text();
    assert!(text.contains(&s1), "{text}");
    lb.reload(&text.replace(&s1, &format!("{s1}weight = 3\n")));
    wait_for("worker 1 reloaded", Duration::from_secs(5), || {
        backend(&worker_backends(&lb.instance, 1), "s1")["weight"] == 3
    })
    .await;
    assert_eq!(
        backend(&worker_backends(&lb.instance, 0), "s1")["weight"],
        3
    );
    // Still checked once per host after the reload: b back on its port, worker 0's
    // check brings it up and worker 1 follows (its own check would log a second
    // "server up").
    let _b = Mosquitto::start_with(b.addr.port(), "");
    wait_for("worker 1 sees b up", Duration::from_secs(5), || {
        let views = worker_backends(&lb.instance, 1);
        backend(&views, "s1")["flags"]
            .as_array()
            .is_some_and(|f| !f.iter().any(|f| f == "health-down"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ups = lb.log().matches("server up (health check)").count();
    assert_eq!(ups, 1, "{}", lb.log());

    // Worker 1 killed: started again, and serving (s0 is enabled back first).
    set_state_through_admin(admin, &lb.instance, "up").await;
    let old = lb.worker_pid(1).expect("worker 1's pid in the log") as i32;
    // SAFETY: kill on a process of our test's daemon.
    unsafe { libc::kill(old, libc::SIGKILL) };
    wait_for("worker 1 started again", Duration::from_secs(15), || {
        lb.worker_pid(1).is_some_and(|p| p as i32 != old)
    })
    .await;
    let s = session(lb.addr, 1, &ids[0]).await;
    wait_for("listed", Duration::from_secs(5), || {
        servers_by_id(&lb).get(&ids[0]) == first.get(&ids[0])
    })
    .await;
    drop(s);

    // SIGTERM: the supervisor and both workers stop; only the sticky table stays.
    let pids = [
        lb.worker_pid(0).expect("worker 0") as i32,
        lb.worker_pid(1).expect("worker 1") as i32,
    ];
    let status = lb.stop();
    assert!(status.success(), "{status}: {}", lb.log());
    for pid in pids {
        assert!(!alive(pid), "worker {pid} left running");
    }
    assert_eq!(pins_left(&lb.instance), vec!["sticky".to_owned()]);
}

/// `max_connections_per_source = 4` on a listener of two workers: the quota is whole.
/// Six sessions from one address, from source ports of which three would select each
/// worker, get four CONNACKs 0 and two 0x97 (chosen by port, each worker would count
/// three and accept all six); another address has its own four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_source_quota_is_counted_whole_across_workers() {
    if !privileged("workers (SO_REUSEPORT selection program)") {
        return;
    }
    let broker = Mosquitto::start();
    let lb = two_workers(broker.addr, "max_connections_per_source = 4", "").await;
    assert!(
        lb.log().contains("each client address meets one worker"),
        "{}",
        lb.log()
    );
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for i in 0..6u32 {
        let mut s = connect_from(lb.addr, i % 2).await;
        answers.push(connack_v5(&mut s, &format!("quota-{i}")).await);
        held.push(s);
    }
    let accepted = answers.iter().filter(|c| c.get(3) == Some(&0)).count();
    let refused = answers.iter().filter(|c| c.get(3) == Some(&0x97)).count();
    assert_eq!((accepted, refused), (4, 2), "{answers:?}");
    // Another address: its own quota, whichever worker its address selects.
    for i in 0..4u32 {
        let mut s = connect_from_address(lb.addr, [127, 0, 0, 2].into(), i % 2).await;
        let connack = connack_v5(&mut s, &format!("other-{i}")).await;
        assert_eq!(connack.get(3), Some(&0), "{connack:?}");
        held.push(s);
    }
    wait_for("two refusals counted", Duration::from_secs(5), || {
        lb.stat("limit_source_connections") == 2
    })
    .await;
}

/// The same for IPv6 clients (the selection program reads their 16-byte source
/// address): on a listener bound to ::1, six sessions from ::1, from ports of which
/// three would select each worker, get four CONNACKs 0 and two 0x97.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_source_quota_is_counted_whole_across_workers() {
    if !privileged("workers (SO_REUSEPORT selection program)") {
        return;
    }
    let broker = Mosquitto::start();
    // A port free on ::1 (the harness's is free on 127.0.0.1 only), for a second
    // listener of the same cluster.
    let port = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free IPv6 port")
        .port();
    let v6 = format!(
        "\n[[listeners]]\nname = \"v6\"\nbind = \"[::1]:{port}\"\ncluster = \"c\"\nmax_connections_per_source = 4\n"
    );
    let _lb = two_workers(broker.addr, "", &v6).await;
    let target = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for i in 0..6u32 {
        let mut s = connect_from_address(target, Ipv6Addr::LOCALHOST.into(), i % 2).await;
        answers.push(connack_v5(&mut s, &format!("v6-{i}")).await);
        held.push(s);
    }
    let accepted = answers.iter().filter(|c| c.get(3) == Some(&0)).count();
    let refused = answers.iter().filter(|c| c.get(3) == Some(&0x97)).count();
    assert_eq!((accepted, refused), (4, 2), "{answers:?}");
}

/// `connect_rate_per_client_id` on a listener of two workers: a client id that
/// reconnects through the other worker meets the same rate (counted per worker, its
/// second connection was accepted); another id is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_rate_is_counted_whole_across_workers() {
    if !privileged("workers (SO_REUSEPORT selection program)") {
        return;
    }
    let broker = Mosquitto::start();
    let lb = two_workers(broker.addr, "connect_rate_per_client_id = 0.1", "").await;
    let mut held = Vec::new();
    for (worker, id, reason) in [(0, "again", 0), (1, "again", 0x9F), (1, "other", 0)] {
        let mut s = connect_from(lb.addr, worker).await;
        let connack = connack_v5(&mut s, id).await;
        assert_eq!(
            connack.get(3),
            Some(&reason),
            "{id} through worker {worker}: {connack:?}"
        );
        held.push(s);
    }
    wait_for("one refusal counted", Duration::from_secs(5), || {
        lb.stat("limit_client_id_rate") == 1
    })
    .await;
}

/// Two workers (copy plane) in front of `broker`, `listener_keys` added to the
/// listener and `more` to the file; once both accept.
async fn two_workers(broker: SocketAddr, listener_keys: &str, more: &str) -> Daemon {
    let lb = Daemon::start_edited("copy", &[broker], |t| {
        t.replace("[global]\n", "[global]\nworkers = 2\n").replace(
            "inspect_timeout = \"10s\"\n",
            &format!("inspect_timeout = \"10s\"\n{listener_keys}\n"),
        ) + more
    });
    wait_for("both workers accepting", Duration::from_secs(20), || {
        lb.log().contains("all workers accepting")
    })
    .await;
    lb
}

/// Sends an MQTT 5 CONNECT with `id` on `s`; the CONNACK (fixed header, length, body).
async fn connack_v5(s: &mut TcpStream, id: &str) -> Vec<u8> {
    s.write_all(&packets::connect(mqttlb::mqtt::Version::V5, id, 60, true))
        .await
        .expect("CONNECT");
    let (first, body) = tokio::time::timeout(Duration::from_secs(10), mqttc::read_packet(s))
        .await
        .expect("a CONNACK within 10 s")
        .expect("CONNACK");
    [vec![first, body.len() as u8], body].concat()
}

/// A TLS 1.3 session ticket sealed by worker 0 opens on worker 1 (a client that
/// reconnects comes from a new source port, so usually to the other worker), and
/// again after a reload: the workers derive their ticket keys from one secret the
/// supervisor drew before forking them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_session_from_one_worker_resumes_on_the_other() {
    if !privileged("workers (SO_REUSEPORT selection program)") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let lb = Daemon::start_edited("auto", &[broker.addr], |t| {
        t.replace("[global]\n", "[global]\nworkers = 2\n").replace(
            "inspect_timeout = \"10s\"\n",
            &format!(
                "inspect_timeout = \"10s\"\nkind = \"mqtts\"\n\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                pki.path("server.pem"),
                pki.path("server.key")
            ),
        )
    });
    wait_for("both workers accepting", Duration::from_secs(20), || {
        lb.log().contains("all workers accepting")
    })
    .await;
    let session = pki.dir.0.join("ticket.session").display().to_string();
    let through = |worker: u32, args: &[&str]| {
        let port = (0..1000)
            .map(|_| free_port())
            .find(|p| worker_for_port(*p, 2) == worker)
            .expect("a free port that selects the worker");
        let bind = format!("127.0.0.1:{port}");
        let mut all = vec!["-tls1_3", "-bind", &bind];
        all.extend_from_slice(args);
        pki.s_client(lb.addr, &all)
    };
    let first = through(0, &["-sess_out", &session]);
    assert!(
        first.iter().any(|l| l.starts_with("New, TLSv1.3")),
        "{first:?}"
    );
    let other = through(1, &["-sess_in", &session]);
    assert!(
        other.iter().any(|l| l.starts_with("Reused, TLSv1.3")),
        "worker 0's ticket on worker 1: {other:?}"
    );
    lb.reload(&lb.config_text());
    let after = through(1, &["-sess_in", &session]);
    assert!(
        after.iter().any(|l| l.starts_with("Reused, TLSv1.3")),
        "after a reload: {after:?}"
    );
}

/// `evict_rate = 10` with two workers: an evacuation of 20 sessions, ten on each
/// worker, takes about two seconds, not one (each worker evicting at the whole rate
/// closed them at twice the rate configured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evacuation_keeps_the_cluster_evict_rate_across_workers() {
    if !privileged("workers (SO_REUSEPORT selection program)") {
        return;
    }
    let broker = Mosquitto::start();
    let lb = Daemon::start_edited("copy", &[broker.addr], |t| {
        t.replace("[global]\n", "[global]\nworkers = 2\n").replace(
            "connect_timeout = \"1s\"\n",
            "connect_timeout = \"1s\"\nevict_rate = 10\n",
        )
    });
    let mut closed = tokio::task::JoinSet::new();
    for i in 0..20u32 {
        let mut s = session(lb.addr, i % 2, &format!("evicted-{i}")).await;
        closed.spawn(async move {
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            std::time::Instant::now()
        });
    }
    let started = std::time::Instant::now();
    ctl_ok(&lb.instance, &["evacuate", "c", "s0"]);
    let mut last = started;
    while let Some(at) = closed.join_next().await {
        last = last.max(at.expect("reader"));
    }
    let took = last.duration_since(started);
    // 20 at 10 a second: the last is asked to close 1.9 s after the first.
    assert!(
        took >= Duration::from_millis(1500),
        "20 sessions evicted in {took:?} at evict_rate 10"
    );
}

/// A worker that cannot start at first (here worker 1's control socket path is taken
/// by a directory) stops the whole instance: exit 2, the log naming the worker and
/// why, worker 0 stopped too, and its control socket gone.
#[test]
fn a_worker_that_cannot_start_stops_the_instance() {
    if !privileged("workers (SO_REUSEPORT selection program)") {
        return;
    }
    let dir = TempDir::new("worker-fails");
    let instance = format!("wf{}", std::process::id());
    let blocker = Path::new("/run/mqttlb").join(format!("{instance}.worker-1.sock"));
    std::fs::create_dir_all(blocker.join("occupied")).expect("a directory in the way");
    let config = dir.0.join("mqttlb.toml");
    let text = config_text(
        &instance,
        "copy",
        free_port(),
        &["127.0.0.1:1".parse().expect("addr")],
    )
    .replace("[global]\n", "[global]\nworkers = 2\n");
    std::fs::write(&config, text).expect("config");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .expect("mqttlb run");
    let _ = std::fs::remove_dir_all(&blocker);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        log.contains("a worker did not start; stopping the others") && log.contains("worker=1"),
        "{log}"
    );
    assert!(log.contains(&blocker.display().to_string()), "{log}");
    // Worker 0 (which had started) is gone with its control socket.
    assert!(
        !Path::new("/run/mqttlb")
            .join(format!("{instance}.sock"))
            .exists(),
        "{log}"
    );
    let left = std::process::Command::new("pgrep")
        .args(["-f", &config.display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "a process of the instance is left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
