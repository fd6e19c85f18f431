//! `mqttlb ctl` tells the truth: `conns` lists every connection the daemon holds,
//! whatever carries it (inspecting, copy, spliced), with the same count as `active`;
//! against a killed instance it says so before showing what it left, and `cleanup`
//! removes that; `ctl ... | head` exits quietly.

use std::{process::Command, time::Duration};

use tests::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn rows(conns: &serde_json::Value) -> Vec<serde_json::Value> {
    conns["conns"].as_array().expect("conns array").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_conns_lists_every_plane_and_names_a_killed_instance() {
    if !privileged("ctl against BPF pins") {
        return;
    }
    let echo = Echo::start().await;
    let mut lb = Daemon::start_edited("auto", &[echo.addr], |t| {
        t.replace(
            "connect_timeout = \"1s\"\n",
            "connect_timeout = \"1s\"\npromote_after = \"3s\"\n",
        )
    });
    // A: a device on the copy plane, promoted to the splice after 3 s (long enough
    // for the rows below to be read first on a busy host: 500 ms was not, once).
    let connect = connect_packet("dev-a");
    let mut a = TcpStream::connect(lb.addr).await.expect("connect a");
    a.write_all(&connect).await.expect("CONNECT");
    let mut echoed = vec![0u8; connect.len()];
    a.read_exact(&mut echoed).await.expect("echo");
    // B: connected, nothing sent yet.
    let _b = TcpStream::connect(lb.addr).await.expect("connect b");
    let mut listed = Vec::new();
    wait_for("two rows", Duration::from_secs(3), || {
        listed = rows(&lb.ctl("conns"));
        listed.len() == 2 && listed[1]["plane"] == "inspecting"
    })
    .await;
    let row_a = &listed[0];
    assert_eq!(row_a["client_id"], "dev-a", "{row_a}");
    assert_eq!(row_a["listener"], "mqtt");
    assert_eq!(row_a["server"], "s0");
    assert_eq!(row_a["server_address"], echo.addr.to_string());
    assert_eq!(row_a["plane"], "copy", "{row_a}");
    assert_eq!(row_a["bytes_c2s"], connect.len() as u64);
    assert_eq!(row_a["bytes_s2c"], connect.len() as u64);
    assert_eq!(listed[1]["client_id"], serde_json::Value::Null);
    wait_for("active published", Duration::from_secs(3), || {
        lb.stat("active") == 2
    })
    .await;
    let id_a = row_a["id"].as_u64().expect("id");
    wait_for("the promotion", Duration::from_secs(8), || {
        rows(&lb.ctl("conns"))[0]["plane"] == "sockmap"
    })
    .await;

    // Text output to a reader that is gone (`ctl ... | head`): no error.
    let piped = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} ctl stats --instance {} | true",
            bin().display(),
            lb.instance
        ))
        .output()
        .expect("bash");
    assert!(piped.status.success(), "{piped:?}");
    assert!(
        piped.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );

    // Without root, ctl names the privilege it needs and the refusal.
    for what in ["stats", "conns"] {
        use std::os::unix::process::CommandExt;
        let out = Command::new(bin())
            .args(["ctl", what, "--instance", &lb.instance])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("ctl as nobody");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("needs root") && stderr.contains("os error"),
            "{what}: {stderr}"
        );
    }

    // Cleanup refuses a running instance.
    let refused = ctl_output(&lb.instance, &["cleanup"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is running"));

    // kill -9: the pins stay; ctl says the instance is not running before showing them.
    lb.child.kill().expect("kill -9");
    lb.child.wait().expect("reaped");
    let out = ctl_output(&lb.instance, &["conns", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not running"), "{stderr}");
    let left: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(left["running"], false);
    let left = rows(&left);
    assert!(
        left.iter()
            .any(|r| r["id"] == id_a && r["plane"] == "sockmap"),
        "{left:?}"
    );
    let out = ctl_output(&lb.instance, &["stats"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not running"));

    // Cleanup removes all but the sticky table, then with --sticky everything.
    let pins = std::path::Path::new("/sys/fs/bpf/mqttlb").join(&lb.instance);
    let out = ctl_output(&lb.instance, &["cleanup"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(pins_left(&lb.instance), ["sticky"], "{}", pins.display());
    let out = ctl_output(&lb.instance, &["cleanup", "--sticky"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!pins.exists(), "{} left", pins.display());
    let out = ctl_output(&lb.instance, &["conns"]);
    assert!(!out.status.success(), "nothing left to show");
}

/// Where BPF cannot load at all (here: root without CAP_BPF, CAP_SYS_ADMIN,
/// CAP_NET_ADMIN and CAP_PERFMON), the daemon runs on the copy plane and every `ctl`
/// view comes from the daemon itself over its control socket: never "nothing to read"
/// for a running instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bpf_ctl_asks_the_daemon() {
    if !privileged("dropping capabilities") {
        return;
    }
    let echo = Echo::start().await;
    let dir = TempDir::new("nobpf");
    let instance = format!("nobpf{}", std::process::id());
    let port = free_port();
    let text = config_text(&instance, "auto", port, &[echo.addr]).replace(
        "connect_timeout = \"1s\"\n",
        "connect_timeout = \"1s\"\nsticky = \"client-id\"\n",
    );
    let config = dir.0.join("mqttlb.toml");
    std::fs::write(&config, text).expect("config");
    let log = std::fs::File::create(dir.0.join("mqttlb.log")).expect("log");
    let caps = "-bpf,-sys_admin,-net_admin,-perfmon";
    /// Stops the daemon however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let _daemon = Stop(
        Command::new("setpriv")
            .args([
                &format!("--bounding-set={caps}"),
                &format!("--inh-caps={caps}"),
            ])
            .arg(bin())
            .args(["run", "-c"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("setpriv (util-linux)"),
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for("the listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    let connect = connect_packet("no-bpf-1");
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(&connect).await.expect("CONNECT");
    let mut echoed = vec![0u8; connect.len()];
    c.read_exact(&mut echoed).await.expect("echo");
    let json = |what: &str| -> serde_json::Value {
        let out = ctl_output(&instance, &[what, "--json"]);
        assert!(out.status.success(), "ctl {what}: {out:?}");
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let log_text = std::fs::read_to_string(dir.0.join("mqttlb.log")).expect("log");
    assert!(log_text.contains("data_plane=\"copy\""), "{log_text}");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/mqttlb")
            .join(&instance)
            .exists(),
        "BPF loaded after all, or its pin directory was left"
    );
    let conns = json("conns");
    assert_eq!(conns["conns"][0]["client_id"], "no-bpf-1", "{conns}");
    assert_eq!(conns["conns"][0]["plane"], "copy", "{conns}");
    let stats = json("stats");
    assert_eq!(stats["stats"]["active"], 1, "{stats}");
    assert_eq!(stats["stats"]["copied"], 1, "{stats}");
    let backends = json("backends");
    assert_eq!(backends["backends"][0]["name"], "s0", "{backends}");
    assert_eq!(backends["backends"][0]["active"], 1, "{backends}");
    let sticky = json("sticky");
    assert_eq!(sticky["sticky"][0]["key"], "no-bpf-1", "{sticky}");
    assert_eq!(sticky["sticky"][0]["server"], "s0", "{sticky}");
}
