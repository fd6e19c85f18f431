//! MQTT over WebSocket on `ws`/`wss` listeners, up to the hand-off: the upgrade
//! (answered here with `101`), client frames until their payload holds the CONNECT,
//! the CONNECT rewritten inside frames, and toward a server that speaks WebSocket
//! itself (`ws_address`) the client's upgrade forwarded and the server's `101` read.
//! The frames after the hand-off are [`crate::dataplane::stream::ws_terminate`]'s.

use lb_common::DaemonStat;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tracing::{debug, warn};

use super::{
    Client, Conn,
    first::{self, First, ProxyPrefix, Reject},
};
use crate::{
    balance::Lease,
    config::Rewrite,
    limits::Charge,
    mqtt::{self, Decode},
    runtime::ClusterRt,
    stats::Stats,
    tls::Identity,
    ws::{self, CloseCode},
};

/// A WebSocket client's upgrade, answered by mqttlb.
pub(super) struct Handshake {
    upgrade: ws::Upgrade,
    /// The request head as received.
    head: Vec<u8>,
    /// Bytes of the `101` sent to the client.
    pub answered: usize,
}

/// The upgrade request (answered with `101`, or with an HTTP error and closed), then
/// client frames until their payload starts with a complete CONNECT. The returned
/// `First` holds the frames as received (masked), to be forwarded unchanged.
pub(super) async fn read_connect(
    client: &mut Client,
    path: &str,
    max: usize,
    proxy_header: bool,
    stats: &Stats,
    charge: &mut Charge<'_>,
) -> Result<(First, Handshake), Reject> {
    let mut buf = Vec::with_capacity(1024);
    let mut proxy = ProxyPrefix::expected(proxy_header);
    let upgrade = loop {
        if proxy.strip(&mut buf)? {
            match ws::parse_request(&buf, path) {
                ws::Request::Upgrade(u) => break u,
                ws::Request::Refuse(status, reason) => {
                    let _ = client.write_all(&ws::error_response(status, reason)).await;
                    return Err(Reject::Http(status));
                }
                ws::Request::Incomplete => {}
            }
        }
        first::read_more(client, &mut buf, charge).await?;
    };
    let answer = ws::switching_protocols(&upgrade);
    client.write_all(&answer).await.map_err(Reject::Io)?;
    stats.inc(DaemonStat::WsUpgrades);
    let mut frames = buf.split_off(upgrade.len);
    let head = buf;
    let mut parsed = ws::PreConnectFrames::default();
    loop {
        let payload = parsed.feed(&frames, max).map_err(Reject::Frame)?;
        match mqtt::decode_connect(payload, max) {
            Decode::Connect(c) => {
                let first = First::of(&c, proxy.source, frames);
                let handshake = Handshake {
                    upgrade,
                    head,
                    answered: answer.len(),
                };
                return Ok((first, handshake));
            }
            Decode::Invalid(e) => return Err(Reject::Invalid(e)),
            Decode::Incomplete => {}
        }
        first::read_more(client, &mut frames, charge).await?;
    }
}

/// [`first::apply_rewrite`] for a CONNECT inside WebSocket frames: the complete frames
/// are replaced by one masked binary frame carrying the rewritten CONNECT and whatever
/// followed it (MQTT over WebSocket does not depend on frame boundaries,
/// MQTT-6.0.0-2); bytes of an incomplete frame after them are kept as they were.
pub(super) fn rewrite_in_frames(
    first: &mut First,
    rewrite: Rewrite,
    identity: Option<&Identity>,
    max: usize,
) -> Result<(), String> {
    let (payload, used) = ws::client_frames(&first.bytes, max).map_err(|e| e.to_string())?;
    let rest = first.bytes.split_off(used);
    first.bytes = payload;
    first::apply_rewrite(first, rewrite, identity, max)?;
    let mut frames = ws::masked_binary_frame(&first.bytes, rand::random());
    frames.extend_from_slice(&rest);
    first.bytes = frames;
    Ok(())
}

/// The payload of the complete client frames of `first` (the CONNECT and what followed
/// it), for a server that speaks plain MQTT; `first.bytes` keeps the bytes of an
/// incomplete frame after them. None when the frames are refused (counted).
pub(super) fn unwrap(first: &mut First, max: usize, stats: &Stats) -> Option<Vec<u8>> {
    match ws::client_frames(&first.bytes, max) {
        Ok((payload, used)) => {
            first.bytes.drain(..used);
            Some(payload)
        }
        Err(e) => {
            stats.inc(DaemonStat::WsBadFrames);
            debug!(error = %e, "client frames");
            None
        }
    }
}

impl Conn<'_> {
    /// Toward a server that speaks WebSocket itself: `head` (a PROXY header) and the
    /// client's upgrade, then the server's `101` within `connect_timeout`; frames the
    /// server sent with it go to the client. Returns the bytes written to the server
    /// and to the client so far (our `101` and those frames), None when the client
    /// was closed (a close frame 1011 when the server refused).
    pub(super) async fn forward_upgrade(
        &self,
        client: &mut Client,
        server: &mut TcpStream,
        (cluster, lease): (&ClusterRt, &Lease),
        mut head: Vec<u8>,
        handshake: &Handshake,
    ) -> Option<(usize, u64)> {
        let stats = &self.shared.stats;
        let peer = self.peer;
        head.extend_from_slice(&ws::forward_request(&handshake.head, peer.ip()));
        if let Err(e) = server.write_all(&head).await {
            debug!(%peer, server = lease.name(), error = %e, "server write failed");
            stats.inc(DaemonStat::Aborted);
            return None;
        }
        let answer = timeout(
            cluster.config.connect_timeout,
            read_answer(server, &handshake.upgrade),
        );
        let why = match answer.await {
            Ok(Ok(early)) => {
                if !early.is_empty() && client.write_all(&early).await.is_err() {
                    stats.inc(DaemonStat::Aborted);
                    return None;
                }
                return Some((head.len(), (handshake.answered + early.len()) as u64));
            }
            Ok(Err(why)) => why,
            Err(_) => "no answer within connect_timeout".to_owned(),
        };
        stats.inc(DaemonStat::WsServerRefused);
        warn!(%peer, server = lease.name(), %why, "server refused the WebSocket upgrade");
        let _ = client
            .write_all(&ws::close_frame(CloseCode::InternalError))
            .await;
        None
    }
}

/// Reads the server's answer to the forwarded upgrade; returns the bytes after its
/// `101` (frames the server sent at once), or why it is refused.
async fn read_answer(server: &mut TcpStream, upgrade: &ws::Upgrade) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(512);
    loop {
        match ws::parse_answer(&buf, upgrade) {
            ws::ServerAnswer::Switched(len) => return Ok(buf.split_off(len)),
            ws::ServerAnswer::Refused(why) => return Err(why),
            ws::ServerAnswer::Incomplete => {}
        }
        buf.reserve(1024);
        match server.read_buf(&mut buf).await {
            Ok(0) => return Err("closed".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}
