//! A tiny raw MQTT 3.1.1 client for the tests that need to know which broker node a
//! connection reached, or to hold sessions open.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use mqttlb::mqtt::Version;
pub use mqttlb::mqtt::encode::packet;

const WAIT: Duration = Duration::from_secs(10);

/// CONNECT (MQTT 3.1.1, keep-alive 60 s) with a client id and the clean-session flag.
pub fn connect(client_id: &str, clean: bool) -> Vec<u8> {
    crate::packets::connect(Version::V311, client_id, 60, clean)
}

/// SUBSCRIBE (MQTT 3.1.1) to one filter.
pub fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    crate::packets::subscribe(Version::V311, packet_id, filter, qos)
}

/// Reads one packet: (first byte, body).
pub async fn read_packet<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

/// Connects and expects an accepting CONNACK; returns the session's stream.
pub async fn session(addr: SocketAddr, client_id: &str, clean: bool) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    session_on(s, client_id, clean).await
}

/// [`session`] over an established stream (TLS...).
pub async fn session_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    client_id: &str,
    clean: bool,
) -> io::Result<S> {
    s.write_all(&connect(client_id, clean)).await?;
    let (first, body) = timeout(WAIT, read_packet(&mut s))
        .await
        .map_err(|_| io::Error::other("no CONNACK within 10 s"))??;
    if first != 0x20 || body.len() != 2 || body[1] != 0 {
        return Err(io::Error::other(format!("CONNACK {first:02x} {body:02x?}")));
    }
    Ok(s)
}

/// PINGREQ, expect PINGRESP.
pub async fn ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    s.write_all(&[0xc0, 0]).await?;
    let (first, _) = timeout(WAIT, read_packet(s))
        .await
        .map_err(|_| io::Error::other("no PINGRESP within 10 s"))??;
    if first != 0xd0 {
        return Err(io::Error::other(format!(
            "expected PINGRESP, got {first:02x}"
        )));
    }
    Ok(())
}

/// Reads PUBLISH packets until `quiet` passes without one (acknowledging QoS 1);
/// returns their payloads.
pub async fn collect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    quiet: Duration,
) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Ok(r) = timeout(quiet, read_packet(s)).await {
        let (first, body) = r?;
        if first >> 4 != 3 {
            continue;
        }
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let mut at = 2 + topic_len;
        if (first >> 1) & 3 > 0 {
            let id = [body[at], body[at + 1]];
            at += 2;
            s.write_all(&[0x40, 2, id[0], id[1]]).await?;
        }
        out.push(body[at..].to_vec());
    }
    Ok(out)
}

/// The node a new clean session for `client_id` through `addr` reaches: the
/// payload of the retained `mqttlb/whoami` message (set per node with
/// `Mosquitto::set_whoami`). Disconnects cleanly.
pub async fn which_node(addr: SocketAddr, client_id: &str) -> io::Result<String> {
    which_node_on(TcpStream::connect(addr).await?, client_id).await
}

/// [`which_node`] over an established stream (TLS...).
pub async fn which_node_on<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    client_id: &str,
) -> io::Result<String> {
    let mut s = session_on(s, client_id, true).await?;
    s.write_all(&subscribe(1, "mqttlb/whoami", 0)).await?;
    let node = loop {
        let (first, body) = timeout(WAIT, read_packet(&mut s))
            .await
            .map_err(|_| io::Error::other("no retained whoami within 10 s"))??;
        if first >> 4 == 3 {
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            break String::from_utf8_lossy(&body[2 + topic_len..]).into_owned();
        }
    };
    s.write_all(&[0xe0, 0]).await?;
    let _ = s.shutdown().await;
    Ok(node)
}
