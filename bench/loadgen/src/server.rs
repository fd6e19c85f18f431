//! The in-process MQTT test server: answers the CONNECT with a CONNACK, then echoes
//! every byte (`Echo`) or counts and drops them (`Sink`); a DISCONNECT closes the
//! connection from the server side (so TIME_WAIT stays off the clients' ports).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result};
use mqttlb::mqtt::{Version, packet_len};
use tests::packets;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What the server does after the CONNACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Sink,
}

/// Bytes the server received after the CONNECTs.
#[derive(Default)]
pub struct Counters {
    pub bytes: AtomicU64,
}

/// Starts the server on `addr` on its own thread and runtime (so its wake-ups do not
/// queue behind the clients'); it runs until the process exits.
pub fn start(addr: SocketAddr, mode: Mode) -> Result<Arc<Counters>> {
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("server runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx
                            .send(Err(anyhow::anyhow!("server cannot listen on {addr}: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok((s, _)) = listener.accept().await {
                    let c = c.clone();
                    tokio::spawn(async move {
                        // A connection error only ends that connection.
                        let _ = serve(s, mode, &c).await;
                    });
                }
            });
        })
        .context("server thread")?;
    ready_rx.recv().context("server thread ended")??;
    Ok(counters)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(65_535)
}

async fn serve(mut s: TcpStream, mode: Mode, c: &Counters) -> Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    // The CONNECT.
    let connect_len = loop {
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        if let Some(len) = packet_len(&buf[..have]).map_err(|e| anyhow::anyhow!("{e}"))?
            && have >= len
        {
            break len;
        }
    };
    s.write_all(packets::connack_accepted(Version::V311))
        .await?;
    let mut rest = have - connect_len;
    buf.copy_within(connect_len..have, 0);
    loop {
        if rest > 0 {
            c.bytes.fetch_add(rest as u64, Ordering::Relaxed);
            // A DISCONNECT on its own: close from this side.
            if buf[..rest] == packets::disconnect()[..] {
                return Ok(());
            }
            if mode == Mode::Echo {
                s.write_all(&buf[..rest]).await?;
            }
        }
        rest = s.read(&mut buf).await?;
        if rest == 0 {
            return Ok(());
        }
    }
}
