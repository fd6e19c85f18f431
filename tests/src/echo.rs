//! In-test byte servers and clients, for tests about bytes rather than MQTT: an echo
//! server, round trips, and deterministic streams too large to keep.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// An in-test echo server: every connection gets its bytes back, then FIN after EOF.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if w.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = w.shutdown().await;
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection through the proxy at `addr` to an echo server, its CONNECT
/// (`client_id`) written and echoed back whole.
pub async fn connected(addr: SocketAddr, client_id: &str) -> TcpStream {
    let connect = crate::connect_packet(client_id);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&connect).await.expect("CONNECT");
    let mut echoed = vec![0u8; connect.len()];
    s.read_exact(&mut echoed).await.expect("CONNECT echoed");
    assert_eq!(echoed, connect, "{client_id}: CONNECT echoed differently");
    s
}

/// A conversation on `s` (through an echo server): `n` round trips of one QoS 0
/// PUBLISH with a `size`-byte payload, each written whole, then read back whole and
/// compared.
pub async fn conversation(s: &mut TcpStream, n: u32, size: usize) {
    let mut back = Vec::new();
    for i in 0..n {
        let msg = crate::packets::publish(
            mqttlb::mqtt::Version::V311,
            "t/talk",
            &vec![i as u8; size],
            0,
            0,
        );
        s.write_all(&msg).await.expect("request");
        back.resize(msg.len(), 0);
        s.read_exact(&mut back).await.expect("response");
        assert!(back == msg, "round trip {i}: the response differs");
    }
}

/// Sends `payload` (then FIN) on a connection to `addr` while reading everything back
/// until EOF; returns what was read.
pub async fn roundtrip(addr: SocketAddr, payload: Vec<u8>) -> std::io::Result<Vec<u8>> {
    exchange(addr, payload, false).await
}

/// The same, but the FIN only goes once as many bytes as were sent came back: no
/// direction is half-closed while bytes flow (a spliced pair with a forwarded FIN is
/// never demoted).
pub async fn roundtrip_closing_last(
    addr: SocketAddr,
    payload: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    exchange(addr, payload, true).await
}

async fn exchange(
    addr: SocketAddr,
    payload: Vec<u8>,
    close_last: bool,
) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let len = payload.len();
    let (echoed_tx, echoed_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        if close_last {
            let _ = echoed_rx.await;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::new();
    if close_last {
        let mut head = (&mut r).take(len as u64);
        head.read_to_end(&mut got).await?;
        let _ = echoed_tx.send(());
    }
    r.read_to_end(&mut got).await?;
    let _w = writer.await.expect("writer task")?;
    Ok(got)
}

/// Reads and drops bytes until EOF or an error; whether that happened within `limit`.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(limit, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// Connects, sends `bytes`, and returns everything received until the other side
/// closes (panics if that takes longer than `limit`).
pub async fn reply_until_close(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut reply = Vec::new();
    let r = tokio::time::timeout(limit, s.read_to_end(&mut reply))
        .await
        .expect("closed in time");
    // A reset after the reply is a close too.
    if let Err(e) = r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "read: {e}");
    }
    reply
}

/// Deterministic pseudo-random bytes (xorshift64*), for streams too large to keep.
pub fn prng_fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}
