//! The admin listener as real observers see it: Debian's Prometheus scraping
//! `/metrics` every second (and `promtool check metrics` on the exposition), and
//! headless Chromium rendering the stats page while three mosquitto nodes serve 200
//! clients, then showing a drain made through the API.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tests::*;

const TOKEN: &str = "observer-token-77e2";

/// Config text: round robin over `nodes`, the admin listener on `admin` with a token.
fn text(
    instance: &str,
    port: u16,
    admin: SocketAddr,
    token_file: &Path,
    nodes: &[Mosquitto],
) -> String {
    let mut t = format!(
        "[global]\nname = \"{instance}\"\n\n[admin]\nbind = \"{admin}\"\ntoken_file = \"{}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nbalance = \"round-robin\"\nsticky = \"none\"\nhealth = {{ kind = \"none\" }}\n\n[guard]\ninterfaces = [\"lo\"]\nsyn_rate = 100000\n",
        token_file.display()
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

/// A daemon with the admin listener in front of `nodes`; returns it and the admin
/// address.
fn start(tag: &str, nodes: &[Mosquitto], dir: &TempDir) -> (Daemon, SocketAddr) {
    let token_file = dir.secret("token", TOKEN);
    let instance = format!("{tag}{}x{}", std::process::id(), free_port());
    let (port, admin) = (free_port(), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let config = text(&instance, port, admin, &token_file, nodes);
    (Daemon::start_text("auto", port, &instance, &config), admin)
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str) -> &str {
    assert!(
        Path::new(&format!("/usr/bin/{name}")).exists(),
        "{name} missing: `cargo xtask test` installs it (apt-get install -y prometheus chromium)"
    );
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_connections_the_test_made() {
    if !privileged("admin metrics") {
        return;
    }
    let node = Mosquitto::start();
    let dir = TempDir::new("prom");
    let (lb, admin) = start("prom", std::slice::from_ref(&node), &dir);
    let mut held = Vec::new();
    for i in 0..25 {
        held.push(
            mqttc::session(lb.addr, &format!("p-{i}"), true)
                .await
                .expect("session"),
        );
    }

    // The exposition passes Prometheus' own linter.
    let body = http::get(admin, "/metrics").await.body;
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("write");
    }
    let out = check.wait_with_output().expect("promtool");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );

    // The guard (on lo) saw the 25 sessions' SYNs, and let them through.
    let syns = http::metric(
        &body,
        "mqttlb_guard_packets_total",
        &[("verdict", "syn_passed")],
    );
    assert!(syns >= Some(25.0), "{syns:?}");
    let limited = http::metric(
        &body,
        "mqttlb_guard_packets_total",
        &[("verdict", "syn_limited")],
    );
    assert_eq!(limited, Some(0.0));

    // The guard's lists through the admin API: a write needs the token.
    let change = r#"{"change": "deny", "cidr": "192.0.2.0/24"}"#;
    let refused = http::request(admin, "POST", "/api/v1/guard", None, change).await;
    assert_eq!(refused.status, 401);
    let changed = http::request(admin, "POST", "/api/v1/guard", Some(TOKEN), change).await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    let guard = http::get(admin, "/api/v1/guard").await.json();
    assert_eq!(
        guard["guard"]["deny"],
        serde_json::json!(["192.0.2.0/24"]),
        "{guard}"
    );
    assert_eq!(
        guard["guard"]["interfaces"][0]["interface"], "lo",
        "{guard}"
    );
    let bad = r#"{"change": "deny", "cidr": "192.0.2.0/33"}"#;
    let bad = http::request(admin, "POST", "/api/v1/guard", Some(TOKEN), bad).await;
    assert_eq!(bad.status, 400, "{}", bad.body);

    // A real Prometheus, scraping every second, counts them.
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let conf = dir.0.join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mqttlb\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .expect("prometheus.yml");
    let _prometheus = Killed(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    );
    let query = "/api/v1/query?query=mqttlb_connections_active";
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            let s = tokio::net::TcpStream::connect(web).await.ok()?;
            drop(s);
            Some(http::get(web, query).await)
        })
        .await
        .ok()
        .flatten();
        let v = answer.filter(|a| a.status == 200).and_then(|a| {
            let j = a.json();
            j["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned)
        });
        if let Some(v) = v {
            break v;
        }
        assert!(Instant::now() < deadline, "Prometheus never had the series");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(value, "25", "mqttlb_connections_active through Prometheus");
    let per_server = "/api/v1/query?query=sum(mqttlb_server_connections_active)";
    let j = http::get(web, per_server).await.json();
    assert_eq!(j["data"]["result"][0]["value"][1], "25", "{j}");

    // Their ends, by listener, cluster, server and result.
    drop(held);
    let labels = [
        ("listener", "mqtt"),
        ("cluster", "c"),
        ("server", "n1"),
        ("result", "closed"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = http::get(admin, "/metrics").await.body;
        let closed = http::metric(&body, "mqttlb_connections_total", &labels);
        if closed == Some(25.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closed connections counted: {closed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stats page's rows as Chromium rendered them: (server, open connections, state).
fn rows(dom: &str) -> Vec<(String, u64, String)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let at = tag.find(&format!("{name}=\""))? + name.len() + 2;
        Some(tag[at..].split('"').next()?.to_owned())
    };
    dom.split("<tr ")
        .skip(1)
        .filter_map(|tag| {
            let tag = tag.split('>').next()?;
            Some((
                attr(tag, "data-server")?,
                attr(tag, "data-active")?.parse().ok()?,
                attr(tag, "data-state")?,
            ))
        })
        .collect()
}

/// Headless Chromium on `url`, given `wait` of the page's own time (its timers run;
/// time stands still while a request is out, so every refresh completes), then
/// exiting with what `args` ask (`--dump-dom`, `--screenshot`).
fn chromium(args: &[String], url: &str, wait: Duration) -> std::process::Output {
    // Bounded: a browser that hangs fails the test instead of stalling the suite.
    let out = Command::new("timeout")
        .args(["120", tool("chromium")])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--virtual-time-budget={}", wait.as_millis()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .expect("chromium");
    assert!(out.status.success(), "chromium failed");
    out
}

/// The DOM after `wait` of the page's time, and how many times it refreshed itself.
async fn dom(url: &str, wait: Duration) -> (String, u64) {
    let url = url.to_owned();
    let out = tokio::task::spawn_blocking(move || chromium(&["--dump-dom".to_owned()], &url, wait))
        .await
        .expect("chromium");
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    let refreshes = page
        .split("data-refreshes=\"")
        .nth(1)
        .and_then(|r| r.split('"').next()?.parse().ok())
        .unwrap_or(0);
    (page, refreshes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_servers_and_a_drain_on_the_stats_page() {
    if !privileged("stats page") {
        return;
    }
    let nodes: Vec<Mosquitto> = (0..3).map(|_| Mosquitto::start()).collect();
    let dir = TempDir::new("page");
    let (lb, admin) = start("page", &nodes, &dir);
    let mut held = Vec::new();
    for i in 0..200 {
        held.push(
            mqttc::session(lb.addr, &format!("c-{i}"), true)
                .await
                .expect("session"),
        );
    }
    let url = format!("http://{admin}/");

    // The three servers with the counts the API gives, the page refreshing itself
    // every second (three times in 3.5 s of its time).
    let (page, refreshes) = dom(&url, Duration::from_millis(3500)).await;
    assert!(refreshes >= 3, "{refreshes} refreshes");
    let shown = rows(&page);
    let api = http::get(admin, "/api/v1/servers").await.json();
    let mut total = 0;
    for s in api["servers"].as_array().expect("servers") {
        let name = s["name"].as_str().expect("name");
        let active = s["active"].as_u64().expect("active");
        let row = shown.iter().find(|r| r.0 == name);
        assert_eq!(
            row.map(|r| (r.1, r.2.as_str())),
            Some((active, "up")),
            "{name}: {shown:?}"
        );
        total += active;
    }
    assert_eq!((shown.len(), total), (3, 200), "{shown:?}");

    // A screenshot at a phone's width, for a human to look at.
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/stats-page.png");
    let _ = std::fs::remove_file(&shot);
    let args = vec![
        format!("--screenshot={}", shot.display()),
        "--window-size=412,1200".to_owned(),
    ];
    let page_url = url.clone();
    tokio::task::spawn_blocking(move || chromium(&args, &page_url, Duration::from_secs(2)))
        .await
        .expect("chromium");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "screenshot {} is {size} bytes",
        shot.display()
    );

    // A drain through the API: the page shows it at its next refresh (within 2 s).
    let drained = http::request(
        admin,
        "POST",
        "/api/v1/servers/c/n2",
        Some(TOKEN),
        r#"{"state": "drain"}"#,
    )
    .await;
    assert_eq!(drained.status, 200, "{}", drained.body);
    let (page, _) = dom(&url, Duration::from_secs(2)).await;
    let shown = rows(&page);
    let n2 = shown.iter().find(|r| r.0 == "n2").expect("n2 row");
    assert_eq!(n2.2, "drain", "{shown:?}");
    assert!(page.contains(">drain"), "status text");
    drop(held);
}
