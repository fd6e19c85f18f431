//! The admin HTTP listener against two real mosquitto nodes: health endpoints, the
//! Prometheus metrics and the JSON API counting the connections the test made, the
//! stats page, runtime changes (drain, weight) refused without the token, applied with
//! it, surviving a reload, and the same changes through `mqttlb ctl`.

use std::net::SocketAddr;

use tests::{http::metric, *};

const TOKEN: &str = "test-token-4f1c";

/// Two nodes named n1 and n2, each answering `mqttlb/whoami` with its name.
fn two_nodes() -> Vec<Mosquitto> {
    ["n1", "n2"]
        .iter()
        .map(|name| {
            let m = Mosquitto::start();
            m.set_whoami(name);
            m
        })
        .collect()
}

/// Config text: round robin over the nodes, the admin listener on `admin` with the
/// token in `token_file`.
fn text(
    instance: &str,
    port: u16,
    admin: SocketAddr,
    token_file: &str,
    nodes: &[Mosquitto],
) -> String {
    let mut t = format!(
        "[global]\nname = \"{instance}\"\n\n[admin]\nbind = \"{admin}\"\ntoken_file = \"{token_file}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nbalance = \"round-robin\"\nhealth = {{ kind = \"none\" }}\n"
    );
    for (i, n) in nodes.iter().enumerate() {
        t += &format!(
            "\n[[clusters.servers]]\nname = \"n{}\"\naddress = \"{}\"\n",
            i + 1,
            n.addr
        );
    }
    t
}

/// The node each of `n` new clean sessions reaches.
async fn placements(lb: SocketAddr, prefix: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        out.push(mqttc::which_node(lb, &id).await.expect("session"));
    }
    out
}

fn count(placed: &[String], node: &str) -> usize {
    placed.iter().filter(|p| *p == node).count()
}

/// The server named `name` in `GET /api/v1/servers`.
async fn server(admin: SocketAddr, name: &str) -> serde_json::Value {
    let servers = http::get(admin, "/api/v1/servers").await.json();
    servers["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name}: {servers}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_metrics_page_and_runtime_changes() {
    if !privileged("admin") {
        return;
    }
    let nodes = two_nodes();
    let dir = TempDir::new("admin");
    let token_file = dir.secret("token", TOKEN);
    let token_file = token_file.display().to_string();
    let instance = format!("adm{}x{}", std::process::id(), free_port());
    let (port, admin) = (free_port(), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let config = |nodes: &[Mosquitto]| text(&instance, port, admin, &token_file, nodes);
    let lb = Daemon::start_text("auto", port, &instance, &config(&nodes));

    // Health endpoints.
    let health = http::get(admin, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(http::get(admin, "/readyz").await.status, 200);

    // Four held sessions: two per node (round robin).
    let mut held = Vec::new();
    for i in 0..4 {
        let s = mqttc::session(lb.addr, &format!("held-{i}"), true)
            .await
            .expect("session");
        held.push(s);
    }
    let metrics = http::get(admin, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.contains("text")),
        "{:?}",
        metrics.headers
    );
    let m = &metrics.body;
    assert_eq!(
        metric(m, "mqttlb_connections_active", &[]),
        Some(4.0),
        "{m}"
    );
    // Each of the four reached its server once; the readiness probe reached none.
    let reached = metric(m, "mqttlb_server_reached_seconds_count", &[]);
    assert_eq!(reached, Some(4.0), "{m}");
    assert!(
        metric(m, "mqttlb_server_reached_seconds_sum", &[]) > Some(0.0),
        "{m}"
    );
    // Each of the four got its CONNACK through the daemon (auto: copied first).
    let connack = metric(m, "mqttlb_connect_duration_seconds_count", &[]);
    assert_eq!(connack, Some(4.0), "{m}");
    for node in ["n1", "n2"] {
        let labels = [("cluster", "c"), ("server", node)];
        assert_eq!(
            metric(m, "mqttlb_server_connections_active", &labels),
            Some(2.0),
            "{m}"
        );
        assert_eq!(metric(m, "mqttlb_server_up", &labels), Some(1.0), "{m}");
    }
    let c2s = [("direction", "client_to_server"), ("plane", "userspace")];
    assert!(metric(m, "mqttlb_bytes_total", &c2s) > Some(0.0), "{m}");
    // Asked without `Accept: application/openmetrics-text`: the classic text format
    // (what curl and promtool read; Prometheus gets OpenMetrics, tests/observers.rs).
    assert!(
        m.contains("# TYPE mqttlb_connections_accepted_total counter") && !m.contains("# EOF"),
        "{m}"
    );

    // The JSON API and the NGINX-style status.
    assert_eq!(server(admin, "n1").await["active"], 2);
    let conns = http::get(admin, "/api/v1/conns?client_id=held-2")
        .await
        .json();
    let rows = conns["conns"].as_array().expect("conns");
    assert_eq!(rows.len(), 1, "{conns}");
    assert_eq!(rows[0]["client_id"], "held-2");
    let status = http::get(admin, "/status").await;
    assert!(
        status.body.starts_with("Active connections: 4 \n"),
        "{}",
        status.body
    );

    // The stats page: one self-contained document.
    for path in ["/", "/stats"] {
        let page = http::get(admin, path).await;
        assert_eq!(page.status, 200);
        assert!(page.body.contains("<title>mqttlb stats</title>"), "{path}");
        assert!(page.body.contains("api/v1/servers"), "{path}");
        // Nothing fetched from elsewhere (offline hosts): no external script, style
        // or image.
        for external in ["src=\"http", "href=\"http", "url(http", "@import"] {
            assert!(!page.body.contains(external), "{path}: {external}");
        }
    }

    // A write without the token, or with a wrong one, changes nothing.
    let drain = r#"{"state": "drain"}"#;
    for token in [None, Some("wrong")] {
        let r = http::request(admin, "POST", "/api/v1/servers/c/n1", token, drain).await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    assert_eq!(server(admin, "n1").await["state"], "up");

    // Drained with the token: no new connection goes to n1; held ones stay.
    let r = http::request(admin, "POST", "/api/v1/servers/c/n1", Some(TOKEN), drain).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["server"]["state"], "drain");
    let placed = placements(lb.addr, "after-drain", 6).await;
    assert_eq!(count(&placed, "n2"), 6, "{placed:?}");
    for s in &mut held {
        mqttc::ping(s)
            .await
            .expect("held session survives the drain");
    }
    let unknown = http::request(admin, "POST", "/api/v1/servers/c/nope", Some(TOKEN), drain).await;
    assert_eq!(unknown.status, 404);
    for bad in [
        "{}",
        "not json",
        r#"{"state": "sideways"}"#,
        r#"{"weight": 0}"#,
    ] {
        let r = http::request(admin, "POST", "/api/v1/servers/c/n2", Some(TOKEN), bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    assert_eq!(server(admin, "n2").await["state"], "up");

    // The change survives a reload of the unchanged file.
    lb.reload(&config(&nodes));
    let n1 = server(admin, "n1").await;
    assert_eq!(
        (n1["state"].as_str(), n1["overridden"].as_bool()),
        (Some("drain"), Some(true))
    );

    // Up again with weight 3: smooth round robin gives n1 three of every four.
    let up = r#"{"state": "up", "weight": 3}"#;
    let r = http::request(admin, "POST", "/api/v1/servers/c/n1", Some(TOKEN), up).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let placed = placements(lb.addr, "weighted", 40).await;
    assert_eq!(
        (count(&placed, "n1"), count(&placed, "n2")),
        (30, 10),
        "{placed:?}"
    );

    // The same through `mqttlb ctl` (the control socket): both drained, not ready.
    for node in ["n1", "n2"] {
        ctl_ok(&instance, &["drain", "c", node]);
    }
    let ready = http::get(admin, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    ctl_ok(&instance, &["enable", "c", "n2"]);
    // A change naming no server of the file fails and says why.
    let out = ctl_output(&instance, &["drain", "c", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no server \"nope\""),
        "{err}"
    );
    assert_eq!(http::get(admin, "/readyz").await.status, 200);
    assert_eq!(server(admin, "n2").await["state"], "up");
}

/// `--log-format json` and `access_log`: every log line is one JSON object, and each
/// connection that ends writes one access line with its client, client id, server,
/// plane, bytes and how it ended (and nothing of its credentials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_with_one_access_line_per_connection() {
    if !privileged("admin") {
        return;
    }
    let node = Mosquitto::start();
    let instance = format!("acc{}x{}", std::process::id(), free_port());
    let port = free_port();
    let text = format!(
        "[global]\nname = \"{instance}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\naccess_log = true\n\n[[clusters]]\nname = \"c\"\nhealth = {{ kind = \"none\" }}\n\n[[clusters.servers]]\nname = \"n1\"\naddress = \"{}\"\n",
        node.addr
    );
    let lb = Daemon::start_args("auto", port, &instance, &text, &["--log-format", "json"]);
    for i in 0..3 {
        let mut s = mqttc::session(lb.addr, &format!("logged-{i}"), true)
            .await
            .expect("session");
        mqttc::ping(&mut s).await.expect("ping");
        tokio::io::AsyncWriteExt::write_all(&mut s, &[0xe0, 0])
            .await
            .expect("disconnect");
        assert!(closed_within(&mut s, std::time::Duration::from_secs(5)).await);
    }
    let mut access = Vec::new();
    wait_for(
        "three access lines",
        std::time::Duration::from_secs(5),
        || {
            access = lb
                .log()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .unwrap_or_else(|e| panic!("{e}: {l}"))
                })
                .filter(|v| v["target"] == "mqttlb::access")
                .collect();
            access.len() >= 3
        },
    )
    .await;
    assert_eq!(access.len(), 3, "{access:?}");
    for (i, line) in access.iter().enumerate() {
        assert_eq!(line["client_id"], format!("logged-{i}"), "{line}");
        assert_eq!(line["server"], "n1", "{line}");
        assert_eq!(line["listener"], "mqtt", "{line}");
        assert_eq!(line["plane"], "copy", "{line}");
        assert_eq!(line["end"], "closed", "{line}");
        assert!(line["bytes_c2s"].as_u64() > Some(0), "{line}");
        assert!(line["bytes_s2c"].as_u64() > Some(0), "{line}");
        assert!(
            line["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("127.0.0.1:"))
        );
    }
}

/// SIGTERM with `shutdown_delay`: `/readyz` fails at once while new clients are still
/// served (so the load balancer in front moves them first), then the daemon stops
/// accepting and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readyz_first_for_shutdown_delay() {
    if !privileged("admin") {
        return;
    }
    let node = Mosquitto::start();
    let instance = format!("sd{}x{}", std::process::id(), free_port());
    let (port, admin) = (free_port(), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let text = format!(
        "[global]\nname = \"{instance}\"\nshutdown_delay = \"2s\"\nshutdown_grace = \"1s\"\n\n[admin]\nbind = \"{admin}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nhealth = {{ kind = \"mqtt\", interval = \"200ms\", timeout = \"150ms\" }}\n\n[[clusters.servers]]\nname = \"n1\"\naddress = \"{}\"\n",
        node.addr
    );
    let mut lb = Daemon::start_text("auto", port, &instance, &text);
    assert_eq!(http::get(admin, "/readyz").await.status, 200);
    // The MQTT health checks are timed, by server.
    let labels = [("cluster", "c"), ("server", "n1")];
    let name = "mqttlb_health_check_duration_seconds_count";
    let mut checks = None;
    for _ in 0..50 {
        checks = metric(&http::get(admin, "/metrics").await.body, name, &labels);
        if checks >= Some(2.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(checks >= Some(2.0), "{checks:?}");
    let sent = std::time::Instant::now();
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(lb.pid() as i32, libc::SIGTERM) };
    let mut ready = http::get(admin, "/readyz").await;
    while ready.status == 200 && sent.elapsed() < std::time::Duration::from_millis(500) {
        ready = http::get(admin, "/readyz").await;
    }
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("shutting down"), "{}", ready.body);
    // Still accepting during the delay.
    let mut s = mqttc::session(lb.addr, "late", true)
        .await
        .expect("a client during shutdown_delay");
    mqttc::ping(&mut s).await.expect("ping");
    assert!(sent.elapsed() < std::time::Duration::from_secs(2));
    drop(s);
    let status = lb.stop();
    assert!(status.success(), "{status}: {}", lb.log());
    assert!(
        sent.elapsed() >= std::time::Duration::from_secs(2),
        "stopped before shutdown_delay"
    );
    assert!(
        lb.log().contains("/readyz fails, still accepting"),
        "{}",
        lb.log()
    );
}

/// Bound to a non-loopback address, every read but the health endpoints needs the
/// token too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_reads_need_the_token() {
    if !privileged("admin") {
        return;
    }
    let node = Mosquitto::start();
    let dir = TempDir::new("admin-open");
    let token_file = dir.secret("token", TOKEN);
    let instance = format!("open{}x{}", std::process::id(), free_port());
    let (port, admin_port) = (free_port(), free_port());
    let text = format!(
        "[global]\nname = \"{instance}\"\n\n[admin]\nbind = \"0.0.0.0:{admin_port}\"\ntoken_file = \"{}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nhealth = {{ kind = \"none\" }}\n\n[[clusters.servers]]\nname = \"n1\"\naddress = \"{}\"\n",
        token_file.display(),
        node.addr
    );
    let _lb = Daemon::start_text("auto", port, &instance, &text);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    for path in [
        "/",
        "/metrics",
        "/status",
        "/api/v1/servers",
        "/api/v1/conns",
    ] {
        assert_eq!(http::get(admin, path).await.status, 401, "{path}");
        let r = http::request(admin, "GET", path, Some(TOKEN), "").await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(http::get(admin, path).await.status, 200, "{path}");
    }
}

/// `[admin.tls]`: the admin listener speaks HTTPS with the listeners' TLS settings
/// (curl verifies the chain and offers ALPN h2/http1.1); plain HTTP gets nothing; a
/// write with the token works over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_over_https() {
    if !privileged("admin") {
        return;
    }
    let node = Mosquitto::start();
    let pki = Pki::new();
    let dir = TempDir::new("admin-tls");
    let token_file = dir.secret("token", TOKEN);
    let instance = format!("https{}x{}", std::process::id(), free_port());
    let (port, admin_port) = (free_port(), free_port());
    let text = format!(
        "[global]\nname = \"{instance}\"\n\n[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"{}\"\n\n[admin.tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nhealth = {{ kind = \"none\" }}\n\n[[clusters.servers]]\nname = \"n1\"\naddress = \"{}\"\n",
        token_file.display(),
        pki.path("server.pem"),
        pki.path("server.key"),
        node.addr
    );
    let _lb = Daemon::start_text("auto", port, &instance, &text);
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert", &pki.path("ca.pem")])
            .args(args)
            .output()
            .expect("curl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let https = |path: &str| format!("https://localhost:{admin_port}{path}");
    assert_eq!(curl(&[&https("/healthz")]), (true, "ok\n".to_owned()));
    let (ok, metrics) = curl(&[&https("/metrics")]);
    assert!(
        ok && metrics.contains("mqttlb_connections_active"),
        "{metrics}"
    );
    // Plain HTTP on the HTTPS port: no answer.
    let (ok, _) = curl(&[&format!("http://127.0.0.1:{admin_port}/healthz")]);
    assert!(!ok, "plain HTTP answered");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (ok, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &auth,
        "-d",
        r#"{"state": "drain"}"#,
        &https("/api/v1/servers/c/n1"),
    ]);
    assert!(ok && body.contains("\"drain\""), "{body}");
}
