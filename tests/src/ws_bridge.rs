//! A WebSocket terminator in front of a broker (Debian's mosquitto has none).

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A small WebSocket terminator in front of a real broker's TCP listener (Debian's
/// mosquitto is built without WebSocket support): it answers the upgrade on `/mqtt`
/// (subprotocol `mqtt`/`mqttv3.1`), unwraps client frames to the broker and wraps the
/// broker's bytes in binary frames. It records the `X-Forwarded-For` and `X-Real-IP`
/// headers of each upgrade it answers.
pub struct WsBridge {
    pub addr: SocketAddr,
    pub forwarded: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WsBridge {
    pub async fn start(broker: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let forwarded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = forwarded.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = Self::serve(s, broker, seen).await;
                });
            }
        });
        Self {
            addr,
            forwarded,
            task,
        }
    }

    async fn serve(
        mut s: TcpStream,
        broker: SocketAddr,
        seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let upgrade = loop {
            match mqttlb::ws::parse_request(&buf, "/mqtt") {
                mqttlb::ws::Request::Upgrade(u) => break u,
                mqttlb::ws::Request::Refuse(..) => return Ok(()),
                mqttlb::ws::Request::Incomplete => {
                    if s.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
            }
        };
        let head = String::from_utf8_lossy(&buf[..upgrade.len]).into_owned();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        };
        seen.lock()
            .expect("lock")
            .push((header("x-forwarded-for"), header("x-real-ip")));
        s.write_all(&mqttlb::ws::switching_protocols(&upgrade))
            .await?;
        let mut frames = buf.split_off(upgrade.len);
        let b = TcpStream::connect(broker).await?;
        let (mut sr, mut sw) = s.into_split();
        let (mut br, mut bw) = b.into_split();
        let up = async move {
            let mut chunk = vec![0u8; 16384];
            loop {
                // Whole frames at the front of `frames` go to the broker unwrapped.
                while let Some(n) = whole_frames(&frames) {
                    if frames[0] & 0x0f == 0x8 {
                        return bw.shutdown().await;
                    }
                    let payload = mqttlb::ws::client_payload(&frames[..n], 1 << 24)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    bw.write_all(&payload).await?;
                    frames.drain(..n);
                }
                let k = sr.read(&mut chunk).await?;
                if k == 0 {
                    return bw.shutdown().await;
                }
                frames.extend_from_slice(&chunk[..k]);
            }
        };
        let down = async move {
            let mut chunk = vec![0u8; 16384];
            loop {
                let k = br.read(&mut chunk).await?;
                if k == 0 {
                    return sw.shutdown().await;
                }
                sw.write_all(&mqttlb::ws::binary_frame(&chunk[..k])).await?;
            }
        };
        let (a, b) = tokio::join!(up, down);
        a.and(b)
    }
}

/// Length of the first complete frame of `buf`, if there is one.
fn whole_frames(buf: &[u8]) -> Option<usize> {
    if buf.len() < 2 {
        return None;
    }
    let masked = if buf[1] & 0x80 != 0 { 4 } else { 0 };
    let (len, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n) as usize, 10)
        }
        126 | 127 => return None,
        n => (usize::from(n), 2),
    };
    let total = header + masked + len;
    (buf.len() >= total).then_some(total)
}

impl Drop for WsBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}
