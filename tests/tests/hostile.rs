//! Hostile input and exhaustion: what exists before a client is identified is bounded
//! (WebSocket ping floods, oversized frames), a bad frame after the CONNECT ends both
//! sides at once, the process's own descriptor limit is never blamed on a server,
//! spliced idle connections close on time, and the pin directory cannot be hijacked.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{wsc::*, *};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// How an in-test server connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
}

/// A plain MQTT server for WebSocket termination tests: it answers any first bytes with
/// a CONNACK, then records every byte it receives and how and when its connection
/// ended. (The tests are about bytes and closes, not MQTT semantics.)
struct Sink {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<SinkConn>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct SinkConn {
    bytes: Vec<u8>,
    ended: Option<(End, Instant)>,
}

impl Sink {
    async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<SinkConn>>> = Arc::default();
        let all = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let all = all.clone();
                let i = {
                    let mut v = all.lock().expect("lock");
                    v.push(SinkConn::default());
                    v.len() - 1
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut answered = false;
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break End::Eof,
                            Ok(n) => {
                                all.lock().expect("lock")[i]
                                    .bytes
                                    .extend_from_slice(&buf[..n]);
                                if !answered {
                                    answered = true;
                                    let _ = s.write_all(&[0x20, 2, 0, 0]).await;
                                }
                            }
                            Err(_) => break End::Reset,
                        }
                    };
                    all.lock().expect("lock")[i].ended = Some((end, Instant::now()));
                });
            }
        });
        Self { addr, conns, task }
    }

    fn count(&self) -> usize {
        self.conns.lock().expect("lock").len()
    }

    /// The bytes and end of connection `i`.
    fn conn(&self, i: usize) -> (Vec<u8>, Option<(End, Instant)>) {
        let v = self.conns.lock().expect("lock");
        (v[i].bytes.clone(), v[i].ended)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `ws` and a `wss` listener in front of one server; `ws_server` set: the server's
/// WebSocket address (frames forwarded), else mqttlb terminates the WebSocket.
fn ws_config(
    instance: &str,
    ports: (u16, u16),
    pki: &Pki,
    listener_keys: &str,
    server: SocketAddr,
) -> String {
    format!(
        "[global]\nworkers = 1\nname = \"{instance}\"\n\n[[listeners]]\nname = \"ws\"\nbind = \"127.0.0.1:{}\"\nkind = \"ws\"\ncluster = \"c\"\n{listener_keys}\n\n[[listeners]]\nname = \"wss\"\nbind = \"127.0.0.1:{}\"\nkind = \"wss\"\ncluster = \"c\"\n{listener_keys}\n\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[clusters]]\nname = \"c\"\nconnect_timeout = \"1s\"\n\n[clusters.health]\nkind = \"none\"\n\n[[clusters.servers]]\nname = \"node1\"\naddress = \"{server}\"\n",
        ports.0,
        ports.1,
        pki.path("server.pem"),
        pki.path("server.key"),
    )
}

/// Starts mqttlb (`auto`) with [`ws_config`]; returns it and the wss address.
fn start_ws(pki: &Pki, listener_keys: &str, server: SocketAddr) -> (Daemon, SocketAddr) {
    let instance = format!("h{}x{}", std::process::id(), free_port());
    let ports = (free_port(), free_port());
    let text = ws_config(&instance, ports, pki, listener_keys, server);
    let lb = Daemon::start_text("auto", ports.0, &instance, &text);
    (lb, SocketAddr::from(([127, 0, 0, 1], ports.1)))
}

/// The header of a masked binary frame announcing `len` bytes (64-bit length form).
fn binary_header(len: u64) -> Vec<u8> {
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[9, 9, 9, 9]);
    frame
}

/// mqttlb terminating the WebSocket (ws and wss, with `listener_keys`) in front of a
/// [`Sink`]; returns the PKI, the sink, mqttlb and the wss address.
async fn terminated(listener_keys: &str) -> (Pki, Sink, Daemon, SocketAddr) {
    let pki = Pki::new();
    let sink = Sink::start().await;
    let (lb, wss) = start_ws(&pki, listener_keys, sink.addr);
    (pki, sink, lb, wss)
}

/// A client stream, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn open(addr: SocketAddr, pki: Option<&Pki>) -> Box<dyn Stream> {
    match pki {
        None => Box::new(TcpStream::connect(addr).await.expect("connect")),
        Some(p) => Box::new(p.connect(addr, None).await.expect("tls")),
    }
}

/// Upgrades and sends a CONNECT in one frame; returns the session after its CONNACK.
async fn session(addr: SocketAddr, pki: Option<&Pki>, id: &str) -> Box<dyn Stream> {
    let mut s = open(addr, pki).await;
    let head = upgrade_on(&mut s, &request("/mqtt")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(&masked(0x82, &mqttc::connect(id, true)))
        .await
        .expect("CONNECT");
    let (b0, payload) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
        .await
        .expect("CONNACK in time")
        .expect("frame");
    assert_eq!((b0, payload.as_slice()), (0x82, &[0x20, 2, 0, 0][..]));
    s
}

/// Upgrades, then streams empty masked pings until mqttlb closes the connection;
/// returns how long that took after the `101`.
async fn ping_flood(addr: SocketAddr, pki: Option<&Pki>, limit: Duration) -> Duration {
    let mut s = open(addr, pki).await;
    let head = upgrade_on(&mut s, &request("/mqtt")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let started = Instant::now();
    let pings: Vec<u8> = [0x89u8, 0x80, 0, 0, 0, 0].repeat(1024);
    let (mut r, mut w) = tokio::io::split(s);
    let flood = async {
        while w.write_all(&pings).await.is_ok() {}
        std::future::pending::<()>().await;
    };
    tokio::select! {
        closed = closed_within(&mut r, limit) => {
            assert!(closed, "a ping flood stayed open for {limit:?}");
        }
        () = flood => {}
    }
    started.elapsed()
}

/// Samples the daemon's resident memory until `stop`; returns the largest value seen.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let rss = || {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .unwrap_or(0)
                * 1024
        };
        let mut max = rss();
        while !stop.load(Ordering::Relaxed) {
            max = max.max(rss());
            std::thread::sleep(Duration::from_millis(20));
        }
        max
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_ping_floods_before_the_connect_are_cut_bounded_and_starve_nobody() {
    if !privileged("hostile input") {
        return;
    }
    const FLOODERS: usize = 20;
    const ROUNDS: usize = 3;
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let inspect = Duration::from_secs(2);
    let (lb, wss) = start_ws(&pki, "inspect_timeout = \"2s\"", broker.addr);
    let pki = Arc::new(pki);
    for (name, addr, tls) in [("ws", lb.addr, false), ("wss", wss, true)] {
        // Warm up (TLS contexts, the runtime's threads), then measure from there.
        drop(session(addr, tls.then_some(&*pki), "warm").await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = lb.rss();
        let counted_before = lb.stat("rejected_oversize") + lb.stat("rejected_inspect_timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let rss = watch_rss(lb.pid(), stop.clone());
        let mut flooders = Vec::new();
        for _ in 0..FLOODERS {
            let pki = pki.clone();
            flooders.push(tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..ROUNDS {
                    let limit = inspect + Duration::from_secs(5);
                    times.push(ping_flood(addr, tls.then_some(&*pki), limit).await);
                }
                times
            }));
        }
        // Meanwhile, well-behaved clients connect one after another.
        let mut connects = Vec::new();
        let good_deadline = Instant::now() + Duration::from_secs(2);
        let mut i = 0;
        while Instant::now() < good_deadline {
            let t = Instant::now();
            let s = session(addr, tls.then_some(&*pki), &format!("good-{name}-{i}")).await;
            connects.push(t.elapsed());
            drop(s);
            i += 1;
        }
        let mut closes = Vec::new();
        for f in flooders {
            closes.extend(f.await.expect("flooder"));
        }
        stop.store(true, Ordering::Relaxed);
        let peak = rss.join().expect("rss thread");
        connects.sort();
        let p99 = connects[(connects.len() * 99 / 100).min(connects.len() - 1)];
        let slowest_close = closes.iter().max().copied().unwrap_or_default();
        eprintln!(
            "{name}: {} flood connections closed within {slowest_close:?}; rss {} -> peak {} KiB; {} good connects, p99 {p99:?}",
            closes.len(),
            before / 1024,
            peak / 1024,
            connects.len()
        );
        assert!(
            slowest_close <= inspect + Duration::from_millis(500),
            "{name}: a flood connection lived {slowest_close:?}"
        );
        assert!(
            peak.saturating_sub(before) < 8 << 20,
            "{name}: RSS grew from {before} to {peak} under the flood"
        );
        assert!(
            p99 < Duration::from_millis(100),
            "{name}: p99 connect {p99:?} during the flood"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let counted =
            lb.stat("rejected_oversize") + lb.stat("rejected_inspect_timeout") - counted_before;
        assert_eq!(
            counted as usize,
            FLOODERS * ROUNDS,
            "{name}: {}",
            lb.ctl("stats")
        );
    }
    assert_eq!(
        lb.stat("rejected_client_eof"),
        1,
        "only the readiness probe"
    );
}

/// mqttlb terminating the WebSocket in front of a plain server: a frame against the
/// protocol after the CONNECT closes the client and the server connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_after_the_connect_close_both_sides_at_once() {
    if !privileged("hostile input") {
        return;
    }
    let (pki, sink, lb, wss) = terminated("").await;
    let mut unmasked = masked(0x82, &[0xc0, 0]);
    unmasked[1] &= 0x7f;
    let bad: [(&str, Vec<u8>); 3] = [
        ("text", masked(0x81, b"hello")),
        ("unmasked", unmasked),
        ("2^63 bytes", binary_header(1 << 63)),
    ];
    let mut n = 0;
    for (listener, addr, tls) in [("ws", lb.addr, None), ("wss", wss, Some(&pki))] {
        for (what, frame) in &bad {
            let mut s = session(addr, tls, &format!("bad-{n}")).await;
            let server = n;
            n += 1;
            wait_for("the server connection", Duration::from_secs(5), || {
                sink.count() > server
            })
            .await;
            // A good frame first: it reaches the server unchanged.
            s.write_all(&masked(0x82, &[0xc0, 0]))
                .await
                .expect("PINGREQ");
            let sent = Instant::now();
            s.write_all(frame).await.expect("bad frame");
            assert!(
                closed_within(&mut s, Duration::from_secs(1)).await,
                "{listener} {what}: client still open after 1 s"
            );
            wait_for("the server side to close", Duration::from_secs(1), || {
                sink.conn(server).1.is_some()
            })
            .await;
            let (bytes, ended) = sink.conn(server);
            let (_, at) = ended.expect("ended");
            assert!(
                at.duration_since(sent) < Duration::from_secs(1),
                "{listener} {what}"
            );
            assert!(
                bytes.ends_with(&[0xc0, 0]),
                "{listener} {what}: {bytes:02x?}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("ws_bad_frames"), 6, "{}", lb.ctl("stats"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_gets_exactly_one_close_frame_back() {
    if !privileged("hostile input") {
        return;
    }
    let (pki, _sink, lb, wss) = terminated("").await;
    for (addr, tls) in [(lb.addr, None), (wss, Some(&pki))] {
        let mut s = session(addr, tls, "closing").await;
        s.write_all(&masked(0x88, &1000u16.to_be_bytes()))
            .await
            .expect("close");
        // Everything mqttlb sends until it closes: frames, counted.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
        let mut closes = 0;
        let mut at = 0;
        while at + 2 <= rest.len() {
            let len = usize::from(rest[at + 1] & 0x7f);
            if rest[at] == 0x88 {
                closes += 1;
            }
            at += 2 + len;
        }
        assert_eq!(closes, 1, "{rest:02x?}");
        assert_eq!(rest[..2], [0x88, 2], "{rest:02x?}");
    }
    assert_eq!(lb.stat("aborted"), 0, "{}", lb.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_max_frame_size_are_refused_at_the_header_and_large_ones_stream() {
    if !privileged("hostile input") {
        return;
    }
    let (_pki, sink, lb, _) = terminated("max_frame_size = 1048576").await;
    // A PUBLISH just under the cap in one frame arrives byte for byte.
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let publish = mqttc::packet(0x30, &[&[0, 1, b't'][..], &payload].concat());
    let mut s = session(lb.addr, None, "big").await;
    s.write_all(&masked(0x82, &publish)).await.expect("publish");
    wait_for("the large frame", Duration::from_secs(5), || {
        sink.conn(0).0.len() >= publish.len()
    })
    .await;
    assert!(sink.conn(0).0.ends_with(&publish), "large frame changed");
    drop(s);
    // Ten clients each announce a 16 MiB frame and send 2 MiB of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = lb.rss();
    let part = vec![0x5a; 2 << 20];
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut s = session(lb.addr, None, &format!("partial-{i}")).await;
        s.write_all(&binary_header(16 << 20)).await.expect("header");
        let part = part.clone();
        clients.push(tokio::spawn(async move {
            let _ = s.write_all(&part).await;
            closed_within(&mut s, Duration::from_secs(1)).await
        }));
    }
    for c in clients {
        assert!(c.await.expect("client"), "a 16 MiB frame was not refused");
    }
    let grown = lb.rss().saturating_sub(before);
    assert!(grown < 8 << 20, "RSS grew {grown} bytes");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("ws_bad_frames"), 10, "{}", lb.ctl("stats"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pre_connect_memory_budget_refuses_past_its_limit_and_recovers() {
    if !privileged("pre-CONNECT budget") {
        return;
    }
    let echo = Echo::start().await;
    let lb = Daemon::start_edited("auto", &[echo.addr], |t| {
        t.replace("[global]\n", "[global]\nmax_preconnect_bytes = 65536\n")
    });
    // Each client sends the start of a CONNECT and stays: its buffer is charged.
    let partial = &connect_packet("budget")[..6];
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(lb.addr).await.expect("connect");
        s.write_all(partial).await.expect("partial CONNECT");
        held.push(s);
    }
    wait_for("budget refusals", Duration::from_secs(5), || {
        lb.stat("rejected_preconnect_budget") > 0
    })
    .await;
    let refused = lb.stat("rejected_preconnect_budget");
    assert!((10..40).contains(&refused), "{refused} of 40 refused");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let echoed = roundtrip(lb.addr, connect_packet("after"))
        .await
        .expect("served");
    assert_eq!(echoed, connect_packet("after"));
}

/// Config for the descriptor tests: two echo servers, tcp health checks every 200 ms.
fn fd_config(
    instance: &str,
    plane: &str,
    port: u16,
    servers: &[SocketAddr],
    global: &str,
) -> String {
    let mut t = format!(
        "[global]\nworkers = 1\nname = \"{instance}\"\ndata_plane = \"{plane}\"\n{global}\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nconnect_timeout = \"1s\"\n\n[clusters.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n"
    );
    for (i, s) in servers.iter().enumerate() {
        t += &format!(
            "\n[[clusters.servers]]\nname = \"s{i}\"\naddress = \"{s}\"\nmax_fails = 1\nfail_timeout = \"30s\"\n"
        );
    }
    t
}

/// Opens `n` clients that each send a CONNECT; returns those still open after `wait`.
async fn hold_clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..n {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            continue;
        };
        if s.write_all(&connect_packet(&format!("fd-{i}")))
            .await
            .is_ok()
        {
            held.push(s);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_blames_no_server() {
    if !privileged("descriptor exhaustion") {
        return;
    }
    for plane in PLANES {
        let a = Echo::start().await;
        let b = Echo::start().await;
        let instance = format!("fd{}x{}", std::process::id(), free_port());
        let port = free_port();
        // 400 descriptors, but max_connections far above what they carry.
        let text = fd_config(
            &instance,
            plane,
            port,
            &[a.addr, b.addr],
            "max_connections = 5000",
        );
        let lb = Daemon::start_limited(plane, port, &instance, &text, Some(400));
        let flood_started = Instant::now();
        let held = hold_clients(lb.addr, 450).await;
        eprintln!("{plane}: flood opened in {:?}", flood_started.elapsed());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let flood_secs = flood_started.elapsed().as_secs_f64();
        let backends = lb.ctl("backends");
        for s in backends["backends"].as_array().expect("backends") {
            assert_eq!(
                s["usable"],
                true,
                "{plane}: a server was blamed for our descriptors: {backends}\n{}",
                lb.log()
            );
            assert_eq!(s["connect_failures"], 0, "{plane}: {backends}");
        }
        let local = lb.stat("local_resource_errors");
        assert!(
            local > 0,
            "{plane}: no local resource error seen: {}",
            lb.ctl("stats")
        );
        let warnings = lb
            .log()
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    && (l.contains("accept failed") || l.contains("out of a resource"))
            })
            .count();
        for l in lb.log().lines().filter(|l| l.contains("WARN")).take(5) {
            eprintln!("{l}");
        }
        assert!(
            (warnings as f64) <= flood_secs + 2.0,
            "{plane}: {warnings} warnings in {flood_secs:.1} s"
        );
        eprintln!(
            "{plane}: {} clients held, local_resource_errors {local}, rejected_local_resource {}, {warnings} warnings",
            held.len(),
            lb.stat("rejected_local_resource")
        );
        // The flood ends: within a second, clients are served again.
        drop(held);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let echoed = tokio::time::timeout(
            Duration::from_secs(2),
            roundtrip(lb.addr, connect_packet("after")),
        )
        .await
        .expect("served in time")
        .expect("roundtrip");
        assert_eq!(echoed, connect_packet("after"), "{plane}");
        assert_eq!(lb.stat("rejected_no_server"), 0, "{plane}");
    }
}

/// Spliced pairs while the daemon is out of descriptors. One second into its splice a
/// pair's sockets go quiet (each re-registered on a duplicate descriptor first), and
/// they used to come back the same way at its end. A pair that cannot go quiet stays
/// watched as it was, carries its bytes and tries again later; one that ends closes as
/// it would have. Neither is aborted (both were reset before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_pairs_carry_on_when_descriptors_run_out() {
    if !privileged("descriptor exhaustion") {
        return;
    }
    let echo = Echo::start().await;
    let instance = format!("fdq{}x{}", std::process::id(), free_port());
    let port = free_port();
    let text = fd_config(
        &instance,
        "sockmap",
        port,
        &[echo.addr],
        "max_connections = 5000",
    );
    let lb = Daemon::start_limited("sockmap", port, &instance, &text, Some(300));
    let addr = lb.addr;
    let served = |tag: &'static str| async move {
        let mut pairs = Vec::new();
        for i in 0..10 {
            pairs.push(connected(addr, &format!("{tag}-{i}")).await);
        }
        pairs
    };
    // Ten pairs quiet before the table fills; they end in it.
    let early = served("early").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Ten more, then clients that send nothing fill the table (each waits for its
    // CONNECT for `inspect_timeout`, 10 s; the rest wait to be accepted): the later
    // pairs try to go quiet with no descriptor to spare.
    let late = served("late").await;
    let mut silent = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = TcpStream::connect(lb.addr).await {
            silent.push(s);
        }
    }
    wait_for("the table full", Duration::from_secs(3), || {
        lb.stat("local_resource_errors") > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut pairs: Vec<TcpStream> = early.into_iter().chain(late).collect();
    for (i, s) in pairs.iter_mut().enumerate() {
        let bytes = vec![i as u8; 4096];
        s.write_all(&bytes).await.expect("write");
        let mut back = vec![0u8; bytes.len()];
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("pair {i}: no echo\n{}", lb.log()))
            .unwrap_or_else(|e| panic!("pair {i}: {e}\n{}", lb.log()));
        assert!(back == bytes, "pair {i}: bytes came back differently");
    }
    // They end while the table is still full (within the silent clients' 10 s).
    for s in &mut pairs {
        s.shutdown().await.expect("shutdown");
    }
    for (i, s) in pairs.iter_mut().enumerate() {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("pair {i}: not closed"))
            .unwrap_or_else(|e| panic!("pair {i}: {e}\n{}", lb.log()));
        assert!(
            rest.is_empty(),
            "pair {i}: {} bytes after the echo",
            rest.len()
        );
    }
    wait_for("the pairs counted", Duration::from_secs(3), || {
        lb.stat("closed") >= 20
    })
    .await;
    assert_eq!(lb.stat("aborted"), 0, "{}\n{}", lb.ctl("stats"), lb.log());
    assert_eq!(lb.stat("spliced"), 20);
    // The later pairs did meet the full table.
    assert!(
        lb.log().contains("cannot quiet a spliced pair's sockets"),
        "{}",
        lb.log()
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_follows_the_descriptor_limit() {
    if !privileged("descriptor limit") {
        return;
    }
    let a = Echo::start().await;
    let instance = format!("fdd{}x{}", std::process::id(), free_port());
    let port = free_port();
    let text = fd_config(&instance, "auto", port, &[a.addr], "");
    let lb = Daemon::start_limited("auto", port, &instance, &text, Some(300));
    // (300 - 128 reserved) / 2.
    assert!(lb.log().contains("max_connections=86"), "{}", lb.log());
    let held = hold_clients(lb.addr, 120).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(lb.stat("active"), 86, "{}", lb.ctl("stats"));
    assert!(lb.stat("max_connections_reached") > 0);
    assert_eq!(lb.stat("local_resource_errors"), 0, "{}", lb.log());
    assert_eq!(
        lb.log().matches("max_connections reached").count(),
        1,
        "logged once: {}",
        lb.log()
    );
    let backends = lb.ctl("backends");
    assert_eq!(backends["backends"][0]["usable"], true, "{backends}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_at_idle_timeout_on_both_planes() {
    if !privileged("idle timeout") {
        return;
    }
    let echo = Echo::start().await;
    let idle = Duration::from_secs(3);
    for plane in PLANES {
        let lb = Daemon::start_edited(plane, &[echo.addr], |t| {
            t.replace(
                "connect_timeout = \"1s\"",
                "connect_timeout = \"1s\"\nidle_timeout = \"3s\"",
            )
        });
        let mut s = TcpStream::connect(lb.addr).await.expect("connect");
        let connect = connect_packet("idle");
        s.write_all(&connect).await.expect("CONNECT");
        let mut back = vec![0u8; connect.len()];
        s.read_exact(&mut back).await.expect("echo");
        // Wait for the hand-off to settle, then one more exchange: the last byte.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"last").await.expect("write");
        let mut four = [0u8; 4];
        s.read_exact(&mut four).await.expect("echo");
        let last = Instant::now();
        assert!(closed_within(&mut s, Duration::from_secs(10)).await);
        let after = last.elapsed();
        eprintln!("{plane}: closed {after:?} after the last byte (idle_timeout {idle:?})");
        assert!(
            after >= idle.mul_f64(0.9) && after <= idle.mul_f64(1.1),
            "{plane}: closed after {after:?}"
        );
        wait_for("idle_timeouts counted", Duration::from_secs(2), || {
            lb.stat("idle_timeouts") == 1
        })
        .await;
    }
}

/// Restores a directory's owner when dropped (the test changes a shared one).
struct Chowned(&'static str, u32);

impl Drop for Chowned {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0).expect("path");
        // SAFETY: chown on a valid C string.
        unsafe { libc::chown(c.as_ptr(), self.1, u32::MAX) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_directories_that_are_not_ours_stop_the_start() {
    if !privileged("pinning") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let echo = Echo::start().await;
    let root = "/sys/fs/bpf/mqttlb";
    let _ = std::fs::create_dir(root);
    // mqttlb/<instance> planted as a symlink to a directory of someone else's files.
    let victim = TempDir::new("victim");
    for name in [
        "sources", "targets", "socks", "ctrl", "conns", "events", "backends", "sticky",
    ] {
        std::fs::write(victim.0.join(name), name).expect("victim file");
    }
    let instance = format!("sym{}x{}", std::process::id(), free_port());
    let link = format!("{root}/{instance}");
    std::os::unix::fs::symlink(&victim.0, &link).expect("symlink in bpffs");
    for plane in ["auto", "sockmap"] {
        let port = free_port();
        let text = config_text(&instance, plane, port, &[echo.addr]);
        let dir = TempDir::new("sym");
        let config = dir.0.join("mqttlb.toml");
        std::fs::write(&config, text).expect("config");
        let out = std::process::Command::new(bin())
            .args(["run", "-c"])
            .arg(&config)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{plane}: {err}");
        assert!(
            err.contains(&link) && err.contains("symbolic link"),
            "{plane}: {err}"
        );
    }
    for name in [
        "sources", "targets", "socks", "ctrl", "conns", "events", "backends", "sticky",
    ] {
        assert_eq!(
            std::fs::read_to_string(victim.0.join(name)).expect("victim file kept"),
            name
        );
    }
    std::fs::remove_file(&link).expect("remove symlink");
    // mqttlb/ itself owned by another user.
    let owner = std::fs::metadata(root).expect("root").uid();
    let c = std::ffi::CString::new(root).expect("path");
    // SAFETY: chown on a valid C string; restored by the guard.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, u32::MAX) }, 0);
    let _restore = Chowned(root, owner);
    let port = free_port();
    let dir = TempDir::new("owner");
    let config = dir.0.join("mqttlb.toml");
    std::fs::write(&config, config_text(&instance, "auto", port, &[echo.addr])).expect("config");
    let out = std::process::Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(root) && err.contains("another user"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_per_instance_on_every_plane_and_the_lock_goes_at_stop() {
    if !privileged("instance lock") {
        return;
    }
    let echo = Echo::start().await;
    let mut lb = Daemon::start("copy", &[echo.addr]);
    let lock = format!("/run/mqttlb/{}.lock", lb.instance);
    assert!(std::path::Path::new(&lock).exists());
    let dir = TempDir::new("second");
    let config = dir.0.join("mqttlb.toml");
    std::fs::write(
        &config,
        config_text(&lb.instance, "copy", free_port(), &[echo.addr]),
    )
    .expect("config");
    let out = std::process::Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another mqttlb") && err.contains(&lock),
        "{err}"
    );
    assert!(lb.stop().success());
    assert!(
        !std::path::Path::new(&lock).exists(),
        "lock file left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_names_restart_only_keys_and_backends_count_open_spliced_bytes() {
    if !privileged("reload") {
        return;
    }
    let echo = Echo::start().await;
    let lb = Daemon::start("sockmap", &[echo.addr]);
    let text = lb.config_text();
    lb.reload(&text.replace(
        "data_plane = \"sockmap\"",
        "data_plane = \"copy\"\nmax_connections = 77",
    ));
    let log = lb.log();
    for key in ["global.data_plane", "global.max_connections"] {
        assert!(
            log.lines()
                .any(|l| l.contains(key) && l.contains("restart")),
            "{key} not named: {log}"
        );
    }
    // 8 MiB each way through a spliced connection that stays open.
    let mut s = TcpStream::connect(lb.addr).await.expect("connect");
    let connect = connect_packet("bytes");
    s.write_all(&connect).await.expect("CONNECT");
    let mut back = vec![0u8; connect.len()];
    s.read_exact(&mut back).await.expect("echo");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut r, mut w) = s.into_split();
    let total = 8u64 << 20;
    let read = Arc::new(AtomicU64::new(0));
    let counter = read.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while counter.load(Ordering::Relaxed) < total {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        r
    });
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..total / chunk.len() as u64 {
        w.write_all(&chunk).await.expect("write");
    }
    let _r = reader.await.expect("reader");
    assert_eq!(read.load(Ordering::Relaxed), total);
    assert!(lb.stat("spliced") >= 1);
    let lag_step = 1u64 << 20;
    let mut seen = (0, 0);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b = &lb.ctl("backends")["backends"][0];
        seen = (
            b["bytes_c2s"].as_u64().expect("c2s"),
            b["bytes_s2c"].as_u64().expect("s2c"),
        );
        if seen.0 + lag_step >= total && seen.1 + lag_step >= total {
            break;
        }
    }
    assert!(
        seen.0 + lag_step >= total && seen.1 + lag_step >= total,
        "ctl backends shows {seen:?} while {total} bytes moved each way"
    );
    drop(w);
}
