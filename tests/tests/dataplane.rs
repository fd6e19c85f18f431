//! Acceptance tests of the data planes (issue: foundation). Each runs against both the
//! `sockmap` (real BPF, root) and the `copy` data plane, through the real binary.

use std::{
    os::fd::AsRawFd,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tests::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn planes(test: &str) -> Vec<&'static str> {
    PLANES
        .iter()
        .copied()
        .filter(|p| *p != "sockmap" || privileged(test))
        .collect()
}

/// 50 concurrent connections, each CONNECT + 16 MiB random bytes through an echo server,
/// with half-close: everything comes back (SHA-256), then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_echo_with_half_close_is_exact_copy() {
    bulk_echo("copy", "", false).await;
}

/// The same on the sockmap plane (throttling engages and resumes many times here, as
/// the 50 echoes compete for the loopback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_echo_with_half_close_is_exact_sockmap() {
    if privileged("bulk_echo") {
        bulk_echo("sockmap", "", false).await;
    }
}

/// The same on `auto`, each connection promoted from copy to the splice after its
/// first MiB, with bytes in flight both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_echo_with_half_close_is_exact_promoted_mid_stream() {
    if privileged("bulk_echo") {
        bulk_echo("auto", "promote_after_bytes = 1048576", false).await;
    }
}

/// The same on `auto`, each connection promoted after its first MiB and demoted back
/// to the copy plane a few MiB later (busier than `promote_max_rate` skbs a second),
/// with bytes in flight both ways at both moves. The clients' FIN goes only once all
/// their bytes came back: a pair whose client's FIN was forwarded stays spliced, so
/// an early FIN (a fast client, a slow host) would leave a pair undemoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_echo_is_exact_promoted_and_demoted_mid_stream() {
    if privileged("bulk_echo") {
        let keys = "promote_after_bytes = 1048576\npromote_max_rate = 10";
        bulk_echo("auto", keys, true).await;
    }
}

/// `cluster_keys`: config lines added to the cluster; `demoted`: every spliced pair
/// must have gone back to the copy plane (`auto`).
async fn bulk_echo(plane: &str, cluster_keys: &str, demoted: bool) {
    let echo = Echo::start().await;
    {
        let lb = Daemon::start_edited(plane, &[echo.addr], |t| with_cluster_keys(t, cluster_keys));
        // Payloads and digests first: CPU work inside the client tasks would starve the
        // test's own runtime and make CONNECTs late.
        let jobs: Vec<(Vec<u8>, Vec<u8>)> = (0..50)
            .map(|i| {
                let mut payload = connect_packet(&format!("bulk-{i}"));
                let mut data = vec![0u8; 16 << 20];
                rand::thread_rng().fill_bytes(&mut data);
                payload.extend_from_slice(&data);
                let want = Sha256::digest(&payload).to_vec();
                (payload, want)
            })
            .collect();
        let mut tasks = Vec::new();
        for (payload, want) in jobs {
            let addr = lb.addr;
            tasks.push(tokio::spawn(async move {
                let got = if demoted {
                    roundtrip_closing_last(addr, payload).await
                } else {
                    roundtrip(addr, payload).await
                };
                let got = got.unwrap_or_default();
                let len = got.len();
                let same =
                    tokio::task::spawn_blocking(move || Sha256::digest(&got).to_vec() == want)
                        .await
                        .expect("hash");
                (len, same)
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let (len, same) = t.await.expect("task");
            assert!(
                same,
                "{plane}: connection {i} got {len} bytes that differ from what it sent; log:\n{}",
                lb.log()
            );
        }
        if plane == "auto" {
            wait_for("50 promotions", Duration::from_secs(3), || {
                lb.stat("promoted") >= 50
            })
            .await;
            // Every promotion splices, or its hand-off drain does not go quiet (a
            // sender that keeps it busy) and the pair is promoted again later.
            let fallback = lb.stat("splice_fallback_to_copy");
            assert_eq!(
                lb.stat("spliced") + fallback,
                lb.stat("promoted"),
                "{}",
                lb.ctl("stats")
            );
            assert!(lb.stat("spliced") <= 50, "{}", lb.ctl("stats"));
            eprintln!(
                "auto: {} spliced, {} demoted, {} throttled",
                lb.stat("spliced"),
                lb.stat("demoted"),
                lb.stat("splice_throttled")
            );
            if demoted {
                // Every pair spliced at its first promotion goes back to copy; one
                // spliced only after a declined hand-off (thresholds doubled) may
                // end before its next lag check.
                let (demoted, spliced) = (lb.stat("demoted"), lb.stat("spliced"));
                assert!(
                    demoted <= spliced && demoted + fallback >= spliced,
                    "{}",
                    lb.ctl("stats")
                );
                // Carried on the copy plane after the splice too: each connection
                // copied about 1 MiB before its promotion, the process read far more.
                let copied = lb.stat("copied_bytes_c2s") + lb.stat("copied_bytes_s2c");
                assert!(copied > 50 * (3 << 20), "{}", lb.ctl("stats"));
            }
        }
        if plane != "copy" {
            let spliced = lb.stat("spliced");
            assert!(spliced > 0, "sockmap plane spliced nothing");
            assert_eq!(lb.stat("aborted"), 0, "{}", lb.log());
            assert_eq!(lb.stat("bpf_stream_broken"), 0);
            eprintln!(
                "sockmap: overlapping retransmissions cut: {}",
                lb.stat("bpf_overlap_trimmed")
            );
        }
    }
}

/// Bytes in the CONNECT's own segment and bytes sent while the server connection is
/// being set up arrive exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_early_bytes_arrive_once_in_order() {
    let echo = Echo::start().await;
    for plane in planes("pipelined") {
        let lb = Daemon::start(plane, &[echo.addr]);
        for round in 0..20 {
            let mut s = TcpStream::connect(lb.addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let mut want = connect_packet(&format!("pipe-{round}"));
            want.extend_from_slice(b"same-segment-bytes;");
            s.write_all(&want).await.expect("write");
            for k in 0..50u32 {
                let chunk = format!("early-{k};");
                s.write_all(chunk.as_bytes()).await.expect("write");
                want.extend_from_slice(chunk.as_bytes());
                if k % 10 == 0 {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
            s.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
                .await
                .expect("echo in time")
                .expect("read");
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "{plane} round {round}"
            );
        }
    }
}

/// A server that hands each accepted connection to the test.
async fn handing_server() -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// Client RST mid-stream closes the server side within 1 s; a server that dies closes
/// the client within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_dead_servers_close_the_other_side_promptly() {
    for plane in planes("resets") {
        let (addr, mut accepted) = handing_server().await;
        let lb = Daemon::start(plane, &[addr]);

        // Client RST mid-stream.
        let mut c = TcpStream::connect(lb.addr).await.expect("connect");
        c.write_all(&connect_packet("rst")).await.expect("write");
        c.write_all(&[1u8; 100_000]).await.expect("write");
        let mut server_side = accepted.recv().await.expect("server got the connection");
        let mut buf = vec![0u8; 200_000];
        let mut seen = 0;
        while seen < connect_packet("rst").len() + 100_000 {
            seen += server_side.read(&mut buf).await.expect("read");
        }
        let sock = c.into_std().expect("std");
        let raw = sock.as_raw_fd();
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid socket and linger struct.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as u32,
            )
        };
        drop(sock); // RST
        let t0 = Instant::now();
        assert!(
            closed_within(&mut server_side, Duration::from_secs(1)).await,
            "{plane}: server side still open 1 s after the client's RST"
        );
        eprintln!(
            "{plane}: server side closed {:?} after client RST",
            t0.elapsed()
        );

        // Server dies mid-stream.
        let mut c = TcpStream::connect(lb.addr).await.expect("connect");
        c.write_all(&connect_packet("die")).await.expect("write");
        let server_side = accepted.recv().await.expect("server got the connection");
        c.write_all(&[2u8; 10_000]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(server_side); // the kernel closes a killed process's sockets the same way
        let t0 = Instant::now();
        assert!(
            closed_within(&mut c, Duration::from_secs(1)).await,
            "{plane}: client still open 1 s after its server died"
        );
        eprintln!(
            "{plane}: client closed {:?} after server death",
            t0.elapsed()
        );
    }
}

/// After 10,000 short connections, fds, threads, tasks and map entries are back where
/// they started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_short_connections_leak_nothing() {
    let echo = Echo::start().await;
    for plane in planes("leaks") {
        let lb = Daemon::start(plane, &[echo.addr]);
        // Warm up (runtime threads, first allocations), then take the baseline.
        run_short_connections(lb.addr, 200).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (fds, threads) = (lb.fd_count(), lb.thread_count());
        let tasks = (plane == "sockmap").then(|| lb.stat("tasks_alive"));
        let before = echo.accepted.load(Ordering::SeqCst);
        run_short_connections(lb.addr, 10_000).await;
        assert_eq!(
            echo.accepted.load(Ordering::SeqCst) - before,
            10_000,
            "every connection reached the server"
        );
        wait_for("fds back to baseline", Duration::from_secs(10), || {
            lb.fd_count() <= fds
        })
        .await;
        assert!(
            lb.thread_count() <= threads,
            "{plane}: threads {} > {threads}",
            lb.thread_count()
        );
        if let Some(tasks) = tasks {
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(
                lb.stat("tasks_alive") <= tasks,
                "{plane}: tasks {} > {tasks}",
                lb.stat("tasks_alive")
            );
            assert_eq!(lb.stat("spliced_active"), 0);
            assert_eq!(
                lb.ctl("conns")["conns"].as_array().expect("conns").len(),
                0,
                "connections left in the maps"
            );
            for map in ["sources", "targets", "socks", "ctrl", "conns"] {
                let left = lb.stat(&format!("map_entries_{map}"));
                assert_eq!(left, 0, "{plane}: {left} entries left in {map}");
            }
            // A client that sent FIN before the hand-off cannot enter the sockmap
            // (CLOSE_WAIT); those go to the copy plane, counted.
            let (spliced, fallback) = (lb.stat("spliced"), lb.stat("splice_fallback_to_copy"));
            assert!(spliced > 0, "the sockmap plane carried none");
            assert!(
                spliced + fallback >= 10_200,
                "spliced {spliced} + fallback {fallback}"
            );
        }
    }
}

async fn run_short_connections(addr: std::net::SocketAddr, n: usize) {
    let mut tasks = Vec::new();
    let per = n / 50;
    for w in 0..50 {
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let p = connect_packet(&format!("short-{w}-{i}"));
                let got = roundtrip(addr, p.clone()).await.expect("short roundtrip");
                assert_eq!(got, p);
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
}

/// A server that stops reading: the client is throttled, memory stays bounded, and
/// every byte arrives once the server reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_reading_bounds_memory_copy() {
    slow_server("copy", "").await;
}

/// The same on the sockmap plane, where the kernel gives no backpressure by itself:
/// the daemon throttles the direction (its skbs are passed to the client socket's own
/// queue), then forwards what was passed and resumes the splice without losing or
/// reordering a byte.
///
/// Known defect (docs/ARCHITECTURE.md trap 4, CHANGELOG "Known issues"): in about 3
/// runs out of 10 one 65,483-byte skb reaches the verdict twice, in runs with TCP
/// retransmissions on the loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_reading_bounds_memory_sockmap() {
    if privileged("backpressure") {
        slow_server("sockmap", "").await;
    }
}

/// `auto` with a promotion threshold the client crosses while the server does not
/// read: the copy plane holds the pair (a write is pending) until the server reads
/// again, then it is promoted mid-stream and the rest is spliced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_reading_bounds_memory_promoted() {
    if privileged("backpressure") {
        slow_server("auto", "promote_after_bytes = 4194304").await;
    }
}

/// The generated config with `keys` added to its cluster.
fn with_cluster_keys(text: String, keys: &str) -> String {
    text.replace(
        "connect_timeout = \"1s\"\n",
        &format!("connect_timeout = \"1s\"\n{keys}\n"),
    )
}

async fn slow_server(plane: &str, cluster_keys: &str) {
    const TOTAL: u64 = 1 << 30;
    {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = l.local_addr().expect("addr");
        let lb = Daemon::start_edited(plane, &[server_addr], |t| {
            with_cluster_keys(t, cluster_keys)
        });
        let base = (kernel_bytes(), lb.rss());
        let mut client = TcpStream::connect(lb.addr).await.expect("connect");
        let hello = connect_packet("slow");
        client.write_all(&hello).await.expect("write");
        let (mut server, _) = l.accept().await.expect("accept");
        if plane == "sockmap" {
            // Bytes that outrun the hand-off keep the pair on the copy plane (the
            // drain does not go quiet): a CI host once got 9 MiB in first. The test
            // is about the spliced pair, so it pushes once the pair is in the maps.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while lb.stat("spliced") < 1 {
                assert!(std::time::Instant::now() < deadline, "never spliced");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let (_r, mut w) = client.into_split();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent2 = sent.clone();
        let writer = tokio::spawn(async move {
            let mut state = 42u64;
            let mut buf = vec![0u8; 256 * 1024];
            let mut hash = Sha256::new();
            let mut n = 0u64;
            while n < TOTAL {
                prng_fill(&mut state, &mut buf);
                w.write_all(&buf).await.expect("client write");
                hash.update(&buf);
                n += buf.len() as u64;
                sent2.store(n, Ordering::Relaxed);
            }
            w.shutdown().await.expect("shutdown");
            hash.finalize()
        });
        // Wait until the client is blocked (no progress for 1 s).
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = sent.load(Ordering::Relaxed);
            if now == last || now >= TOTAL {
                break;
            }
            last = now;
        }
        let pushed = sent.load(Ordering::Relaxed);
        // The kernel's (slab, TCP buffers) and the daemon's growth: not MemAvailable,
        // which moved by tens of MiB for reasons of its own on a CI host.
        let used = kernel_bytes().saturating_sub(base.0) + lb.rss().saturating_sub(base.1);
        eprintln!(
            "{plane}: client pushed {} MiB before blocking; kernel and daemon grew by {} MiB",
            pushed >> 20,
            used >> 20
        );
        assert!(pushed < TOTAL, "{plane}: the client was never throttled");
        assert!(
            used < 64 << 20,
            "{plane}: {} MiB held for one connection",
            used >> 20
        );
        if plane == "sockmap" {
            // Either the lag check throttled the direction, or the pump's write to
            // the full server socket was pending while the program passed bytes:
            // both leave them in the client socket's queue, where TCP holds the
            // client back.
            assert!(
                lb.stat("bpf_passed_throttled") >= 1,
                "{plane}: the program passed nothing while the client was blocked; {}",
                lb.ctl("stats")
            );
        }
        // Resume: the server must get the CONNECT then every byte.
        let mut head = vec![0u8; hello.len()];
        server.read_exact(&mut head).await.expect("read connect");
        assert_eq!(head, hello);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = server.read(&mut buf).await.expect("server read");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n as u64;
        }
        let counters = || lb.ctl("stats").to_string();
        assert_eq!(
            got,
            TOTAL,
            "{plane}: server got {got} of {TOTAL} bytes; {}",
            counters()
        );
        assert_eq!(
            hash.finalize(),
            writer.await.expect("writer"),
            "{plane}: bytes differ"
        );
        if plane == "auto" {
            // Promoted once, or again after hand-offs that did not go quiet.
            let promoted = lb.stat("promoted");
            let (spliced, fallback) = (lb.stat("spliced"), lb.stat("splice_fallback_to_copy"));
            assert!(promoted >= 1 && spliced <= 1, "{}", lb.ctl("stats"));
            assert_eq!(promoted, spliced + fallback, "{}", lb.ctl("stats"));
        }
        if plane != "copy" {
            assert_eq!(lb.stat("aborted"), 0, "{}", lb.log());
            let stats = lb.ctl("stats");
            eprintln!(
                "sockmap: overlapping retransmissions cut: {}, duplicate skbs dropped: {}",
                stats["stats"]["bpf_overlap_trimmed"], stats["stats"]["bpf_duplicate_dropped"]
            );
        }
    }
}

/// With sockmap, the bytes carried never pass through the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_bytes_bypass_the_process() {
    if !privileged("rchar/wchar") {
        return;
    }
    let echo = Echo::start().await;
    let mut lb = Daemon::start("sockmap", &[echo.addr]);
    let before = lb.io_chars();
    let mut payload = connect_packet("bypass");
    payload.extend(std::iter::repeat_n(7u8, 256 << 20));
    let len = payload.len() as u64;
    let got = roundtrip(lb.addr, payload).await.expect("roundtrip");
    assert_eq!(got.len() as u64, len);
    let carried = 2 * len;
    let used = lb.io_chars() - before;
    eprintln!("carried {carried} bytes; mqttlb rchar+wchar grew by {used}");
    assert!(
        used * 100 < carried,
        "rchar+wchar grew by {used} for {carried} bytes carried"
    );
    // A clean stop leaves only the sticky table pinned (it is kept for a restart).
    let pins = std::path::Path::new("/sys/fs/bpf/mqttlb").join(&lb.instance);
    assert!(
        pins.join("socks").exists(),
        "no pinned maps at {}",
        pins.display()
    );
    assert!(lb.stop().success());
    let left = pins_left(&lb.instance);
    assert_eq!(left, ["sticky"], "left in {} after SIGTERM", pins.display());
}

/// `auto` (where BPF loads, as root here) starts every connection on the copy plane:
/// a short session stays there; one that lives past `promote_after` is promoted to the
/// splice and the program carries what follows. `ctl stats` reads it all. (Promotion
/// mid-stream by bytes: the 50 x 16 MiB echo.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_copies_first_and_promotes_long_lived_connections() {
    if !privileged("auto data plane") {
        return;
    }
    let echo = Echo::start().await;
    let lb = Daemon::start_edited("auto", &[echo.addr], |t| {
        with_cluster_keys(t, "promote_after = \"300ms\"")
    });
    // A short session: CONNECT, echo, close. Never promoted.
    let connect = connect_packet("auto");
    assert_eq!(
        roundtrip(lb.addr, connect.clone()).await.expect("short"),
        connect
    );
    // A long-lived one: promoted after 300 ms, the bulk then spliced.
    let bulk = vec![3u8; 4 << 20];
    let s = connected(lb.addr, "auto").await;
    wait_for("the promotion", Duration::from_secs(3), || {
        lb.stat("spliced") == 1
    })
    .await;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&bulk).await.expect("bulk");
        w.shutdown().await.expect("shutdown");
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.expect("echo");
    writer.await.expect("writer");
    assert!(
        got == vec![3u8; 4 << 20],
        "{} bytes came back differently",
        got.len()
    );
    assert!(
        lb.log().contains("data_plane=\"auto\""),
        "auto not chosen:\n{}",
        lb.log()
    );
    // (`accepted` also counts the harness's readiness probe.)
    wait_for("the counters published", Duration::from_secs(3), || {
        lb.stat("closed") == 2
    })
    .await;
    assert_eq!(lb.stat("copied"), 2);
    assert_eq!(lb.stat("promoted"), 1);
    assert_eq!(lb.stat("spliced"), 1);
    assert_eq!(lb.stat("aborted"), 0);
    assert!(lb.stat("bpf_redirected") > 0);
}

/// `auto` leaves a busy connection on the copy plane (the splice loses there): above
/// `promote_max_rate` reads a second, promotion by age is put off and counted, and
/// the connection is looked at again one `promote_after` later; once it goes quiet it
/// is promoted, and every byte of both phases comes back exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_leaves_busy_connections_on_copy_until_they_quieten() {
    if !privileged("auto data plane") {
        return;
    }
    let echo = Echo::start().await;
    let lb = Daemon::start_edited("auto", &[echo.addr], |t| {
        with_cluster_keys(t, "promote_after = \"300ms\"\npromote_max_rate = 50")
    });
    let connect = connect_packet("busy");
    let s = TcpStream::connect(lb.addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    w.write_all(&connect).await.expect("CONNECT");
    let mut echoed = vec![0u8; connect.len()];
    r.read_exact(&mut echoed).await.expect("CONNECT echoed");
    assert_eq!(echoed, connect);
    // Busy: a 64-byte message every 2 ms for 1.5 s, about 500 reads a second each way.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("echo");
        got
    });
    let mut sent = Vec::new();
    let busy_until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut n = 0u8;
    while tokio::time::Instant::now() < busy_until {
        let msg = [n; 64];
        w.write_all(&msg).await.expect("message");
        sent.extend_from_slice(&msg);
        n = n.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(lb.stat("promoted"), 0, "a busy connection was promoted");
    assert!(
        lb.stat("promotion_deferred_busy") >= 2,
        "{}",
        lb.ctl("stats")
    );
    // Quiet: promoted at the next look, then the rest is spliced.
    wait_for("the promotion", Duration::from_secs(3), || {
        lb.stat("spliced") == 1
    })
    .await;
    let bulk = vec![7u8; 1 << 20];
    w.write_all(&bulk).await.expect("bulk");
    sent.extend_from_slice(&bulk);
    w.shutdown().await.expect("shutdown");
    let got = reader.await.expect("reader");
    assert!(
        got == sent,
        "{} of {} bytes came back, or differently",
        got.len(),
        sent.len()
    );
    assert_eq!(lb.stat("promoted"), 1);
    assert!(lb.stat("bpf_redirected") > 0);
}

/// `promote_min_rate`: `auto` leaves an idle connection on the copy plane (spliced it
/// would cost more memory and gain nothing), counting each look it puts off, and
/// promotes one that talks; both carry their bytes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_leaves_idle_connections_on_copy_under_promote_min_rate() {
    if !privileged("auto data plane") {
        return;
    }
    let echo = Echo::start().await;
    let lb = Daemon::start_edited("auto", &[echo.addr], |t| {
        with_cluster_keys(t, "promote_after = \"300ms\"\npromote_min_rate = 5")
    });
    let mut idle = connected(lb.addr, "idle").await;
    let mut chatty = connected(lb.addr, "chatty").await;
    // 1.5 s: the chatty one echoes a 32-byte message every 20 ms (about 100 reads a
    // second both ways), the idle one nothing.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut n = 0u8;
    while tokio::time::Instant::now() < until {
        let msg = [n; 32];
        chatty.write_all(&msg).await.expect("message");
        let mut back = [0u8; 32];
        chatty.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, msg);
        n = n.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let looks = "one promotion (the chatty one) and two looks put off (the idle one)";
    wait_for(looks, Duration::from_secs(3), || {
        lb.stat("promoted") == 1 && lb.stat("promotion_deferred_idle") >= 2
    })
    .await;
    assert_eq!(lb.stat("promotion_deferred_busy"), 0);
    // Both still carry bytes exactly: the idle one on copy, the other spliced.
    for (s, fill) in [(&mut idle, 5u8), (&mut chatty, 6u8)] {
        let bulk = vec![fill; 256 << 10];
        s.write_all(&bulk).await.expect("bulk");
        let mut back = vec![0u8; bulk.len()];
        s.read_exact(&mut back).await.expect("bulk echoed");
        assert!(back == bulk, "{fill}: bytes came back differently");
    }
    assert_eq!(lb.stat("spliced"), 1);
    assert!(lb.stat("bpf_redirected") > 0);
}

/// `promote_conversations` (on by default): `auto` promotes a busy conversation (a
/// request, its response, the next request) at once, where promotion by age would put
/// it off as busy for good, and keeps it spliced while it stays one, past many lag
/// checks above `promote_max_rate`; a busy pipelined connection stays on the copy
/// plane. Both carry their bytes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_promotes_busy_conversations_at_once_and_keeps_them_spliced() {
    use mqttlb::mqtt::Version;
    if !privileged("auto data plane") {
        return;
    }
    let echo = Echo::start().await;
    // The defaults: promotion by age after 10 s, put off above 1,000 reads a second.
    let lb = Daemon::start("auto", &[echo.addr]);

    // Pipelined: 4,000 writes of three small PUBLISHes each, the echo read meanwhile.
    let pipe = connected(lb.addr, "pipelined").await;
    let (mut r, mut w) = pipe.into_split();
    let three: Vec<u8> = (0..3u8)
        .flat_map(|i| tests::packets::publish(Version::V311, "t/pipe", &[i; 20], 0, 0))
        .collect();
    let total = three.len() * 4_000;
    let reader = tokio::spawn(async move {
        let mut back = vec![0u8; total];
        r.read_exact(&mut back).await.expect("pipelined echo");
        back
    });
    for _ in 0..4_000 {
        w.write_all(&three).await.expect("pipelined write");
    }
    let back = reader.await.expect("reader");
    assert!(
        back.chunks(three.len()).all(|c| c == three),
        "pipelined bytes differ"
    );
    assert_eq!(lb.stat("promoted"), 0, "a pipelined stream was promoted");

    // A conversation: 3,000 round trips of one 4 KiB PUBLISH (about 12 MiB each way,
    // a lag check every MiB), in well under a second on copy before the promotion.
    let mut talk = connected(lb.addr, "conversation").await;
    conversation(&mut talk, 3_000, 4096).await;
    assert_eq!(lb.stat("promoted_conversation"), 1);
    assert_eq!(lb.stat("promoted"), 1);
    assert_eq!(lb.stat("spliced"), 1);
    assert!(
        lb.stat("bpf_lag_events") >= 8,
        "too few lag checks to judge"
    );
    assert_eq!(lb.stat("demoted"), 0, "a conversation was demoted as busy");
    assert!(lb.stat("bpf_redirected") >= 4_000);
}

/// A promotion whose hand-off drain does not go quiet leaves the pair on the copy
/// plane (`splice_fallback_to_copy`), and a later one splices it. The server stops
/// reading while the client pushes, then reads slowly: the promotion after 8 MiB
/// comes while the client has megabytes queued and the server has room for little,
/// so the drain cannot finish. Then the server reads at full speed and the client
/// trickles small writes: promoted again (by bytes during the rest of the bulk, or by
/// age during the trickle, at doubled thresholds) and spliced.
/// Every byte arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_promotes_again_after_a_hand_off_that_did_not_go_quiet() {
    const BULK: usize = 32 << 20;
    const TRICKLE: usize = 40;
    if !privileged("auto promotion retry") {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server_addr = l.local_addr().expect("addr");
    let lb = Daemon::start_edited("auto", &[server_addr], |t| {
        with_cluster_keys(t, "promote_after = \"1s\"\npromote_after_bytes = 8388608")
    });
    let mut client = TcpStream::connect(lb.addr).await.expect("connect");
    let hello = connect_packet("retry");
    client.write_all(&hello).await.expect("write");
    let (mut server, _) = l.accept().await.expect("accept");
    // What the server has read (CONNECT included), and how fast it may read:
    // 0 not at all, 1 64 KiB every 5 ms, 2 as fast as it can.
    let got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pace = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let (_r, mut w) = client.into_split();
    let writer = {
        let got = got.clone();
        let total = (hello.len() + BULK) as u64;
        tokio::spawn(async move {
            let mut hash = Sha256::new();
            let mut state = 7u64;
            let mut buf = vec![0u8; 256 * 1024];
            for _ in 0..BULK / buf.len() {
                prng_fill(&mut state, &mut buf);
                w.write_all(&buf).await.expect("client write");
                hash.update(&buf);
            }
            // Then quiet: small writes, 200 ms apart, once the bulk is through.
            while got.load(Ordering::Relaxed) < total {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut small = vec![0u8; 1024];
            for _ in 0..TRICKLE {
                prng_fill(&mut state, &mut small);
                w.write_all(&small).await.expect("client write");
                hash.update(&small);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            w.shutdown().await.expect("shutdown");
            hash.finalize()
        })
    };
    let reader = {
        let (got, pace) = (got.clone(), pace.clone());
        let hello_len = hello.len();
        tokio::spawn(async move {
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut head = Vec::new();
            loop {
                match pace.load(Ordering::Relaxed) {
                    0 => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    1 => tokio::time::sleep(Duration::from_millis(5)).await,
                    _ => {}
                }
                let n = server.read(&mut buf).await.expect("server read");
                if n == 0 {
                    return (head, hash.finalize());
                }
                // The CONNECT first, then the client's bytes.
                let before = got.fetch_add(n as u64, Ordering::Relaxed) as usize;
                let skip = hello_len.saturating_sub(before).min(n);
                head.extend_from_slice(&buf[..skip]);
                hash.update(&buf[skip..n]);
            }
        })
    };
    // The client pushes until its buffers are full and the server's side is too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lb.stat("promoted"), 0, "{}", lb.ctl("stats"));
    pace.store(1, Ordering::Relaxed);
    wait_for(
        "a hand-off that did not go quiet",
        Duration::from_secs(20),
        || lb.stat("splice_fallback_to_copy") >= 1,
    )
    .await;
    assert_eq!(lb.stat("spliced"), 0, "{}", lb.ctl("stats"));
    pace.store(2, Ordering::Relaxed);
    wait_for("the splice, later", Duration::from_secs(20), || {
        lb.stat("spliced") == 1
    })
    .await;
    let (head, got_hash) = reader.await.expect("reader");
    assert_eq!(head, hello, "the CONNECT first");
    assert_eq!(
        got.load(Ordering::Relaxed),
        (hello.len() + BULK + TRICKLE * 1024) as u64,
        "{}",
        lb.ctl("stats")
    );
    assert_eq!(got_hash, writer.await.expect("writer"), "bytes differ");
    let (promoted, spliced, fallback) = (
        lb.stat("promoted"),
        lb.stat("spliced"),
        lb.stat("splice_fallback_to_copy"),
    );
    eprintln!("promoted {promoted}, spliced {spliced}, hand-offs declined {fallback}");
    assert_eq!(promoted, spliced + fallback, "{}", lb.ctl("stats"));
    assert_eq!(lb.stat("aborted"), 0, "{}", lb.log());
}
