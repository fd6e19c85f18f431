//! The nine workloads. Each returns its metrics as JSON.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mqttlb::mqtt::{Version, packet_len};
use serde_json::{Value, json};
use tests::packets;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinSet,
};

use crate::{
    Args, Workload,
    cpu::{self, CpuMeter},
    server::{self, Mode},
};

const V: Version = Version::V311;

/// Runs the workload `args` names and returns its report line.
pub async fn run(args: &Args) -> Result<Value> {
    let mode = match args.workload {
        Workload::W1 | Workload::W5 | Workload::W9 => Some(Mode::Echo),
        Workload::W2 | Workload::W3 | Workload::W4 | Workload::W7 | Workload::W8 => {
            Some(Mode::Sink)
        }
        Workload::W6 | Workload::Hold => None,
    };
    let counters = match (mode, args.server) {
        (Some(mode), Some(addr)) => Some(server::start(addr, mode)?),
        (Some(_), None) => bail!("{:?} needs --server", args.workload),
        (None, _) => None,
    };
    let meter = CpuMeter::new(&args.exclude_pids);
    let q = args.quick;
    let (metrics, errors) = match args.workload {
        Workload::W1 => bulk(args.target, if q { 256 << 20 } else { 1 << 30 }, &meter).await?,
        Workload::W2 => {
            let sink = counters.context("W2 needs the sink")?;
            // The full run measures steady state: 15 s of warm-up, past mqttlb's
            // default `promote_after` (10 s), as a device that stays connected for
            // minutes lives. `--quick` measures from the first message.
            let load = if q {
                SmallMessages {
                    conns: 500,
                    rate: 10_000,
                    warmup: 0,
                    secs: 3,
                }
            } else {
                SmallMessages {
                    conns: 5_000,
                    rate: 50_000,
                    warmup: 15,
                    secs: 10,
                }
            };
            small_messages(args.target, load, &sink.bytes, &meter).await?
        }
        Workload::W3 => {
            let (workers, secs) = if q { (16, 2) } else { (32, 10) };
            churn(args.target, workers, secs).await?
        }
        Workload::W4 => {
            let conns = if q { 2_000 } else { 7_000 };
            let after = Duration::from_secs(args.idle_secs);
            idle(args.target, conns, after, &args.proxy_pids).await?
        }
        Workload::W5 => ping_pong(args.target, if q { 3_000 } else { 50_000 }).await?,
        Workload::W6 => broker(args.target, if q { 10_000 } else { 100_000 }).await?,
        Workload::W7 | Workload::W8 => {
            let ca = args.ca.as_deref().context("TLS workloads need --ca")?;
            let resume = args.workload == Workload::W8;
            let tls = Arc::new(crate::tls::connector(ca, resume)?);
            let (workers, secs) = if q { (16, 2) } else { (32, 10) };
            churn_with(args.target, workers, secs, Some(tls)).await?
        }
        Workload::W9 => {
            let ca = args.ca.as_deref().context("TLS workloads need --ca")?;
            let tls = crate::tls::connector(ca, false)?;
            let (s, _) = session(args.target, 0, "w9-bulk", Some(&tls)).await?;
            bulk_on(s, if q { 256 << 20 } else { 1 << 30 }, &meter).await?
        }
        Workload::Hold => hold(args.target, args.connections).await?,
    };
    Ok(json!({
        "workload": format!("{:?}", args.workload),
        "metrics": metrics,
        "errors": errors,
    }))
}

/// Connects to `target` from 127.0.0.(1 + i % 16) when the target is on loopback, so
/// tens of thousands of connections do not run out of source ports.
async fn tcp_connect(target: SocketAddr, i: usize) -> Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    if target.ip().is_loopback() {
        let last = 1 + (i % 16) as u8;
        s.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))?;
    }
    let s = s.connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Longest wait for a session to be accepted: a proxy at its connection limit leaves
/// the client waiting, and that must count as an error, not hang the run.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and completes the MQTT handshake (CONNECT, CONNACK accepted).
async fn mqtt_connect(target: SocketAddr, i: usize, client_id: &str) -> Result<TcpStream> {
    tokio::time::timeout(SESSION_TIMEOUT, async {
        let mut s = tcp_connect(target, i).await?;
        mqtt_handshake(&mut s, client_id).await?;
        Ok(s)
    })
    .await
    .context("no CONNACK within 10 s")?
}

/// CONNECT, then a CONNACK that accepts it.
async fn mqtt_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    client_id: &str,
) -> Result<()> {
    s.write_all(&packets::connect(V, client_id, 600, true))
        .await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.context("reading CONNACK")?;
    ensure!(
        ack[0] == 0x20 && ack[3] == 0,
        "session refused: CONNACK {ack:02x?}"
    );
    Ok(())
}

/// A client stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects (TLS to "localhost" when `tls` is given) and completes the MQTT
/// handshake; returns the stream and whether the TLS session was resumed.
async fn session(
    target: SocketAddr,
    i: usize,
    client_id: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<(Box<dyn Io>, bool)> {
    tokio::time::timeout(SESSION_TIMEOUT, async {
        let tcp = tcp_connect(target, i).await?;
        let (mut s, resumed): (Box<dyn Io>, bool) = match tls {
            None => (Box::new(tcp), false),
            Some(c) => {
                let name = rustls_pki_types::ServerName::try_from("localhost")?;
                let t = c.connect(name, tcp).await.context("TLS handshake")?;
                let resumed =
                    t.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                (Box::new(t), resumed)
            }
        };
        mqtt_handshake(&mut s, client_id).await?;
        Ok((s, resumed))
    })
    .await
    .context("no CONNACK within 10 s")?
}

/// Reads whole MQTT packets from a stream.
struct Packets<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> Packets<R> {
    fn new(r: R) -> Self {
        Self {
            r,
            buf: vec![0; 256 * 1024],
            start: 0,
            end: 0,
        }
    }

    /// The next packet's first byte and its bytes.
    async fn next(&mut self) -> Result<&[u8]> {
        loop {
            let have = &self.buf[self.start..self.end];
            if let Some(len) = packet_len(have).map_err(|e| anyhow::anyhow!("{e}"))?
                && have.len() >= len
            {
                let p = self.start;
                self.start += len;
                return Ok(&self.buf[p..p + len]);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.r.read(&mut self.buf[self.end..]).await?;
            ensure!(n > 0, "connection closed");
            self.end += n;
        }
    }
}

/// Percentile of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// W1: one connection, `size` bytes each way through the echo server.
async fn bulk(target: SocketAddr, size: u64, meter: &CpuMeter) -> Result<(Value, u64)> {
    let (s, _) = session(target, 0, "w1-bulk", None).await?;
    bulk_on(s, size, meter).await
}

/// `size` bytes each way through the echo server on an established session (W1, W9).
async fn bulk_on(s: Box<dyn Io>, size: u64, meter: &CpuMeter) -> Result<(Value, u64)> {
    let (mut r, mut w) = tokio::io::split(s);
    let mark = meter.mark()?;
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0u64;
        while sent < size {
            let n = chunk.len().min((size - sent) as usize);
            w.write_all(&chunk[..n]).await?;
            sent += n as u64;
        }
        w.shutdown().await?;
        anyhow::Ok(w)
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer may close without close_notify once everything was echoed
            // (NGINX does); the byte count below still says whether all arrived.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = meter.proxy_seconds(&mark)?;
    let _w = writer.await??;
    // A wrong byte count is reported as an error of the run, not hidden.
    if got != size {
        eprintln!("mqttlb-loadgen: W1: echoed {got} of {size} bytes");
    }
    let gib_carried = 2.0 * size as f64 / f64::from(1u32 << 30);
    Ok((
        json!({ "MB/s": size as f64 / 1e6 / secs, "cpu_s_per_GiB": cpu / gib_carried }),
        u64::from(got != size),
    ))
}

/// W2's load: `conns` connections publish 256-byte QoS 0 messages at `rate` messages
/// per second in total, for `warmup` seconds unmeasured and then `secs` measured.
struct SmallMessages {
    conns: usize,
    rate: u64,
    warmup: u64,
    secs: u64,
}

/// W2: the connections publish to the sink at a steady rate; CPU and deliveries are
/// counted from the end of the warm-up until the last message is in.
async fn small_messages(
    target: SocketAddr,
    load: SmallMessages,
    sink_bytes: &AtomicU64,
    meter: &CpuMeter,
) -> Result<(Value, u64)> {
    let SmallMessages {
        conns,
        rate,
        warmup,
        secs,
    } = load;
    let msg = packets::publish(V, "bench/w2", &[0x42; 256], 0, 0);
    let mut streams = Vec::with_capacity(conns);
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(async move { mqtt_connect(target, i, &format!("w2-{i}")).await });
        if set.len() >= 256 {
            streams.push(set.join_next().await.context("join")???);
        }
    }
    while let Some(r) = set.join_next().await {
        streams.push(r??);
    }
    let first = sink_bytes.load(Ordering::Relaxed);
    let errors = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs_f64(conns as f64 / rate as f64);
    let per_conn_warm = (rate * warmup) / conns as u64;
    let per_conn = (rate * secs) / conns as u64;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let msg = msg.clone();
        let errors = errors.clone();
        set.spawn(async move {
            // Spread the first sends over one period.
            tokio::time::sleep(period.mul_f64(i as f64 / conns as f64)).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for _ in 0..per_conn_warm + per_conn {
                tick.tick().await;
                if s.write_all(&msg).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return s;
                }
            }
            s
        });
    }
    tokio::time::sleep_until((started + Duration::from_secs(warmup)).into()).await;
    let mark = meter.mark()?;
    let base = sink_bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut done = Vec::with_capacity(conns);
    while let Some(s) = set.join_next().await {
        done.push(s?);
    }
    let sent = (per_conn_warm + per_conn) * conns as u64;
    let want = sent * msg.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink_bytes.load(Ordering::Relaxed) - first < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs_taken = t0.elapsed().as_secs_f64();
    let cpu = meter.proxy_seconds(&mark)?;
    let now = sink_bytes.load(Ordering::Relaxed);
    let measured = (now - base) / msg.len() as u64;
    let lost = sent.saturating_sub((now - first) / msg.len() as u64);
    drop(done);
    Ok((
        json!({
            "msg/s": measured as f64 / secs_taken,
            "cpu_s_per_Mmsg": cpu / (measured.max(1) as f64 / 1e6),
            "lost": lost,
        }),
        errors.load(Ordering::Relaxed) + lost,
    ))
}

/// W3: `workers` parallel loops of CONNECT, CONNACK, DISCONNECT for `secs` seconds,
/// client ids from a pool of 1,000 (stickiness has something to remember).
async fn churn(target: SocketAddr, workers: usize, secs: u64) -> Result<(Value, u64)> {
    churn_with(target, workers, secs, None).await
}

/// Session churn, over TLS when `tls` is given (W7: every handshake full; W8: the
/// connector resumes sessions, and the share resumed is reported).
async fn churn_with(
    target: SocketAddr,
    workers: usize,
    secs: u64,
    tls: Option<Arc<tokio_rustls::TlsConnector>>,
) -> Result<(Value, u64)> {
    let end = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(ErrorKinds::default());
    let resumed = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for w in 0..workers {
        let (errors, resumed, tls) = (errors.clone(), resumed.clone(), tls.clone());
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut n = w;
            while Instant::now() < end {
                n += workers;
                let t0 = Instant::now();
                let r = async {
                    let id = format!("churn-{}", n % 1000);
                    let (mut s, was_resumed) = session(target, n, &id, tls.as_deref()).await?;
                    let took = t0.elapsed();
                    s.write_all(&packets::disconnect()).await?;
                    // The server closes first; wait for it.
                    let mut b = [0u8; 16];
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) => break,
                            Ok(_) => {}
                            // A TLS peer may close without close_notify (NGINX does).
                            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    anyhow::Ok((took, was_resumed))
                }
                .await;
                match r {
                    Ok((t, was_resumed)) => {
                        lat.push(t.as_secs_f64() * 1e3);
                        if was_resumed {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => errors.add(&e),
                }
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(l) = set.join_next().await {
        lat.extend(l?);
    }
    lat.sort_by(f64::total_cmp);
    let mut metrics = json!({
        "sessions/s": lat.len() as f64 / secs as f64,
        "p50_ms": pct(&lat, 0.5),
        "p99_ms": pct(&lat, 0.99),
    });
    if tls.is_some() {
        metrics["resumed_fraction"] =
            json!(resumed.load(Ordering::Relaxed) as f64 / lat.len().max(1) as f64);
    }
    Ok((metrics, errors.report()))
}

/// Failed sessions counted by what failed, so a run's errors say what they were.
#[derive(Default)]
struct ErrorKinds(std::sync::Mutex<std::collections::BTreeMap<String, u64>>);

impl ErrorKinds {
    fn add(&self, e: &anyhow::Error) {
        let mut kinds = self.0.lock().expect("error kinds");
        *kinds.entry(format!("{e:#}")).or_default() += 1;
    }

    /// Prints each kind to stderr; the total.
    fn report(&self) -> u64 {
        let kinds = self.0.lock().expect("error kinds");
        for (kind, n) in kinds.iter() {
            eprintln!("  {n} sessions failed: {kind}");
        }
        kinds.values().sum()
    }
}

/// W4: `conns` idle MQTT connections; proxy RSS and kernel memory per connection,
/// read `after` the last one connected.
async fn idle(
    target: SocketAddr,
    conns: usize,
    after: Duration,
    proxy_pids: &[u32],
) -> Result<(Value, u64)> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss0, kernel0) = (cpu::rss_bytes(proxy_pids), cpu::kernel_bytes()?);
    let mut streams = Vec::with_capacity(conns);
    let mut errors = 0u64;
    let mut set = JoinSet::new();
    for i in 0..conns {
        set.spawn(async move { mqtt_connect(target, i, &format!("idle-{i}")).await });
        if set.len() >= 256
            && let Some(r) = set.join_next().await
        {
            match r? {
                Ok(s) => streams.push(s),
                Err(_) => errors += 1,
            }
        }
    }
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(s) => streams.push(s),
            Err(_) => errors += 1,
        }
    }
    tokio::time::sleep(after).await;
    let (rss1, kernel1) = (cpu::rss_bytes(proxy_pids), cpu::kernel_bytes()?);
    let n = streams.len().max(1) as f64;
    drop(streams);
    Ok((
        json!({
            "rss_bytes_per_conn": rss1.saturating_sub(rss0) as f64 / n,
            "kernel_bytes_per_conn": kernel1.saturating_sub(kernel0) as f64 / n,
            "connections": conns as u64 - errors,
        }),
        errors,
    ))
}

/// `hold`: `conns` sessions (client ids unique to this process), a JSON line on
/// stdout once they are all up (`connected`, `errors`); then, after a line on stdin,
/// one PINGREQ on each, counting the PINGRESPs that come back within 30 s.
async fn hold(target: SocketAddr, conns: usize) -> Result<(Value, u64)> {
    use tokio::io::AsyncBufReadExt;
    let pid = std::process::id();
    let mut streams = Vec::with_capacity(conns);
    let mut errors = 0u64;
    let mut set = JoinSet::new();
    let mut first_error = None;
    for i in 0..conns {
        set.spawn(async move { mqtt_connect(target, i, &format!("hold-{pid}-{i}")).await });
        while set.len() >= 256 || (i + 1 == conns && !set.is_empty()) {
            match set.join_next().await.context("join")?? {
                Ok(s) => streams.push(s),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
    }
    println!(
        "{}",
        json!({"connected": streams.len(), "errors": errors, "first_error": first_error})
    );
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    let mut set = JoinSet::new();
    for mut s in streams.drain(..) {
        set.spawn(async move {
            let ping = async {
                s.write_all(&[0xC0, 0]).await?;
                let mut resp = [0u8; 2];
                s.read_exact(&mut resp).await?;
                anyhow::Ok(resp == [0xD0, 0])
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(30), ping).await,
                Ok(Ok(true))
            )
        });
    }
    let mut pongs = 0u64;
    while let Some(r) = set.join_next().await {
        if r? {
            pongs += 1;
        }
    }
    Ok((json!({"pingresp": pongs}), errors))
}

/// W5: `n` PUBLISH round trips on one connection through the echo server.
async fn ping_pong(target: SocketAddr, n: usize) -> Result<(Value, u64)> {
    let s = mqtt_connect(target, 0, "w5-ping").await?;
    let (r, mut w) = s.into_split();
    let mut packets = Packets::new(r);
    let msg = packets::publish(V, "bench/w5", &[0x17; 64], 0, 0);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t0 = Instant::now();
        w.write_all(&msg).await?;
        let p = packets.next().await?;
        ensure!(p == msg, "the echo differs");
        // The first tenth warms up.
        if i >= n / 10 {
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok((
        json!({
            "p50_us": pct(&lat, 0.5),
            "p99_us": pct(&lat, 0.99),
            "p999_us": pct(&lat, 0.999),
        }),
        0,
    ))
}

/// W6: `n` messages through a real broker, QoS 0 then QoS 1; delivered messages per
/// second at the subscriber.
async fn broker(target: SocketAddr, n: u64) -> Result<(Value, u64)> {
    let (qos0, lost0) = pubsub(target, n, 0).await?;
    let (qos1, lost1) = pubsub(target, n, 1).await?;
    Ok((
        json!({ "msg/s": qos1, "msg/s_qos0": qos0, "lost_qos0": lost0, "lost_qos1": lost1 }),
        lost1,
    ))
}

/// One pub/sub run at `qos`: (delivered messages per second, messages lost).
async fn pubsub(target: SocketAddr, n: u64, qos: u8) -> Result<(f64, u64)> {
    let topic = format!("bench/w6/{qos}");
    let sub = mqtt_connect(target, 1, &format!("w6-sub-{qos}")).await?;
    let (sr, mut sw) = sub.into_split();
    let mut sub_packets = Packets::new(sr);
    sw.write_all(&packets::subscribe(V, 1, &topic, qos)).await?;
    let ack = sub_packets.next().await?;
    ensure!(ack[0] == 0x90, "expected SUBACK, got {:02x}", ack[0]);
    let receiver = tokio::spawn(async move {
        let mut got = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while got < n {
            let p = match tokio::time::timeout_at(deadline.into(), sub_packets.next()).await {
                Ok(p) => p?,
                Err(_) => break,
            };
            if p[0] >> 4 == 3 {
                got += 1;
                if (p[0] >> 1) & 3 == 1 {
                    // QoS 1: topic length, topic, then the packet id.
                    let hdr = 1 + p[1..].iter().take_while(|b| **b & 0x80 != 0).count() + 1;
                    let tl = usize::from(u16::from_be_bytes([p[hdr], p[hdr + 1]]));
                    let id = u16::from_be_bytes([p[hdr + 2 + tl], p[hdr + 3 + tl]]);
                    sw.write_all(&packets::puback(id)).await?;
                }
            }
        }
        anyhow::Ok((got, Instant::now()))
    });
    let publisher = mqtt_connect(target, 2, &format!("w6-pub-{qos}")).await?;
    let (pr, mut pw) = publisher.into_split();
    let t0 = Instant::now();
    if qos == 0 {
        let mut batch = Vec::with_capacity(64 * 1024);
        for i in 0..n {
            batch.extend_from_slice(&packets::publish(V, &topic, &i.to_be_bytes(), 0, 0));
            if batch.len() >= 60 * 1024 {
                pw.write_all(&batch).await?;
                batch.clear();
            }
        }
        pw.write_all(&batch).await?;
    } else {
        // Up to 64 messages in flight, each acknowledged.
        let mut acks = Packets::new(pr);
        let mut inflight = 0u64;
        for i in 0..n {
            if inflight == 64 {
                let p = acks.next().await?;
                ensure!(p[0] == 0x40, "expected PUBACK, got {:02x}", p[0]);
                inflight -= 1;
            }
            let id = (i % 60_000 + 1) as u16;
            pw.write_all(&packets::publish(V, &topic, &i.to_be_bytes(), 1, id))
                .await?;
            inflight += 1;
        }
        while inflight > 0 {
            acks.next().await?;
            inflight -= 1;
        }
    }
    let (got, t1) = receiver.await??;
    let secs = t1.duration_since(t0).as_secs_f64();
    Ok((got as f64 / secs, n - got))
}
