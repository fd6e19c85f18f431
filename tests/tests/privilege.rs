//! `[global] user`: the daemon loads BPF, pins, binds and reads its keys as root, then
//! runs as that user with no capability left, and still splices, runs its health
//! checks, reloads and drains; its pins stay removable at the clean stop; `ctl` by a
//! user without rights gets a clear error.

use std::{process::Command, time::Duration};

use tests::*;
use tokio::io::AsyncWriteExt;

/// `Name:` from `/proc/PID/status`.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn server(lb: &Daemon, name: &str) -> serde_json::Value {
    backend(&lb.ctl("backends"), name).clone()
}

fn health_down(lb: &Daemon, name: &str) -> bool {
    server(lb, name)["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "health-down"))
}

/// `n` numbered lines.
fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("message {i:05}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_to_nobody_the_daemon_keeps_no_capability_and_still_serves() {
    if !privileged("[global] user (switching user needs root)") {
        return;
    }
    let mut nodes = [Mosquitto::start(), Mosquitto::start()];
    let addrs = [nodes[0].addr, nodes[1].addr];
    let health = "[clusters.health]\nkind = \"mqtt\"\ninterval = \"250ms\"\ntimeout = \"250ms\"\nrise = 1\nfall = 1";
    let lb = Daemon::start_edited("sockmap", &addrs, |t| {
        // s1 a backup: both clients reach s0, s1 only answers health checks.
        t.replace("data_plane", "user = \"nobody\"\ndata_plane")
            .replace("[clusters.health]\nkind = \"none\"", health)
            .replace(
                &format!("address = \"{}\"\n", addrs[1]),
                &format!("address = \"{}\"\nbackup = true\n", addrs[1]),
            )
    });
    let pid = lb.pid();
    // The line may land in the log file a moment after the start returns (a fresh-clone
    // CI run read the log before it).
    let switched = "switched to [global] user user=nobody uid=65534 gid=65534 capabilities=none";
    wait_for(
        "the switch to nobody logged",
        Duration::from_secs(5),
        || lb.log().contains(switched),
    )
    .await;
    assert_eq!(status_field(pid, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Gid"), "65534\t65534\t65534\t65534");
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
        assert_eq!(status_field(pid, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Every thread, not only the main one (capabilities are per thread).
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let status =
            std::fs::read_to_string(task.expect("task").path().join("status")).expect("status");
        assert!(
            status.contains("CapEff:\t0000000000000000") && status.contains("Uid:\t65534"),
            "{status}"
        );
    }

    // Spliced traffic: 500 QoS 1 messages from a real client, all delivered, with
    // bytes redirected in the kernel.
    let mut sub = mqttc::session(lb.addr, "privilege-sub", true)
        .await
        .expect("subscriber");
    sub.write_all(&mqttc::subscribe(1, "least/privilege", 1))
        .await
        .expect("SUBSCRIBE");
    mqttc::read_packet(&mut sub).await.expect("SUBACK");
    let addr = lb.addr;
    let publisher = tokio::task::spawn_blocking(move || {
        publish_lines(
            addr.port(),
            "least/privilege",
            &numbered(500),
            Some("privilege-pub"),
        )
    });
    let got = mqttc::collect(&mut sub, Duration::from_secs(2))
        .await
        .expect("collect");
    publisher.await.expect("publisher");
    let want: Vec<Vec<u8>> = numbered(500).into_iter().map(String::into_bytes).collect();
    assert_eq!(got, want);
    assert!(lb.stat("spliced") >= 2, "{}", lb.log());
    assert!(lb.stat("bpf_redirected") > 0);
    assert_eq!(lb.stat("splice_fallback_to_copy"), 0, "{}", lb.log());

    // Health checks still run: a killed node goes down.
    nodes[1].kill();
    wait_for("s1 marked down", Duration::from_secs(5), || {
        health_down(&lb, "s1")
    })
    .await;
    assert!(!health_down(&lb, "s0"));

    // SIGHUP: the file (readable by nobody) is read again and applied.
    let text = lb.config_text().replace(
        &format!("address = \"{}\"\n", addrs[0]),
        &format!("address = \"{}\"\nweight = 7\n", addrs[0]),
    );
    lb.reload(&text);
    wait_for("weight 7 applied", Duration::from_secs(3), || {
        server(&lb, "s0")["weight"] == 7
    })
    .await;

    // A file nobody cannot read: the reload is refused, says which file and why, and
    // the daemon goes on.
    {
        use std::os::unix::fs::PermissionsExt;
        let config = lb.config_path();
        let mode = |m| std::fs::Permissions::from_mode(m);
        std::fs::set_permissions(config, mode(0o600)).expect("chmod 600");
        let failures = lb.stat("reload_failures");
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        wait_for("the reload refused", Duration::from_secs(5), || {
            lb.stat("reload_failures") == failures + 1
        })
        .await;
        std::fs::set_permissions(config, mode(0o644)).expect("chmod 644");
        let refused = format!(
            "reload refused; the running configuration stays file={} problem=file: cannot read it: Permission denied",
            config.display()
        );
        assert!(lb.log().contains(&refused), "{}", lb.log());
    }

    // A drain through the control socket.
    ctl_ok(&lb.instance, &["drain", "c", "s0"]);
    wait_for("s0 drained", Duration::from_secs(3), || {
        server(&lb, "s0")["state"] == "drain"
    })
    .await;

    // Another unprivileged user: a clear error, exit 2, no panic.
    let out = Command::new("runuser")
        .args(["-u", "daemon", "--"])
        .arg(bin())
        .args(["ctl", "stats", "--instance", &lb.instance])
        .output()
        .expect("runuser (Debian package util-linux)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.starts_with("mqttlb ctl: ")
            && said.contains("Permission denied")
            && said.contains("root"),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    drop(sub);

    // The clean stop, as nobody, still removes the pins (the sticky table stays).
    let mut lb = lb;
    let status = lb.stop();
    assert!(status.success(), "{status}: {}", lb.log());
    let left = pins_left(&lb.instance);
    assert!(left.iter().all(|n| n == "sticky"), "left: {left:?}");

    // Started again as root: the directory handed to nobody is accepted. The
    // listener accepts (into its backlog) from its bind, before the BPF load and the
    // switch: wait for the switch rather than race it.
    lb.restart();
    let nobody = "65534\t65534\t65534\t65534";
    wait_for("the switch to nobody", Duration::from_secs(10), || {
        status_field(lb.pid(), "Uid") == nobody
    })
    .await;
}
