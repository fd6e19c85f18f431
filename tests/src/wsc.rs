//! A raw WebSocket client: the upgrade request, masked client frames of any length,
//! server frames read back.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An upgrade request for `path` (subprotocol `mqtt`).
pub fn request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
}

/// Sends `request` on `s`; returns the response head.
pub async fn upgrade_on<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, request: &str) -> String {
    s.write_all(request.as_bytes()).await.expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Connects and sends an upgrade request; returns the stream and the response head.
pub async fn upgrade(addr: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = upgrade_on(&mut s, request).await;
    (s, head)
}

/// A masked client frame: first byte `opcode_fin`, any payload length.
pub fn masked(opcode_fin: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = mqttlb::ws::masked_binary_frame(payload, [0x11, 0x22, 0x33, 0x44]);
    f[0] = opcode_fin;
    f
}

/// Reads one server frame: (first byte, payload).
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let b0 = s.read_u8().await?;
    let len = match s.read_u8().await? & 0x7f {
        126 => usize::from(s.read_u16().await?),
        127 => s.read_u64().await? as usize,
        n => usize::from(n),
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await?;
    Ok((b0, p))
}
