//! The first packet: a PROXY header in front when the listener expects one, then a
//! complete, valid CONNECT within `inspect_timeout` (inside WebSocket frames on
//! `ws`/`wss`, see [`super::websocket`]), its memory charged to the pre-CONNECT
//! budget; and the rewrite of its client id and username from the client certificate.

use std::net::SocketAddr;

use lb_common::DaemonStat;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::timeout,
};
use tracing::debug;

use super::{Client, Conn, websocket};
use crate::{
    config::Rewrite,
    limits::Charge,
    mqtt::{self, Decode},
    proxy_protocol,
    tls::{CertField, Identity},
    ws,
};

/// Why a client was turned away before a server was involved.
#[derive(Debug, thiserror::Error)]
pub(super) enum Reject {
    #[error("invalid first packet: {0}")]
    Invalid(mqtt::Invalid),
    #[error("client closed before a complete CONNECT")]
    Eof,
    #[error("client read failed: {0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Proxy(&'static str),
    #[error("not a WebSocket upgrade: HTTP {0}")]
    Http(u16),
    #[error("WebSocket: {0}")]
    Frame(ws::FrameError),
    #[error("pre-CONNECT memory budget (max_preconnect_bytes) exhausted")]
    Budget,
}

impl Reject {
    /// The counter of this refusal.
    fn stat(&self) -> DaemonStat {
        match self {
            Self::Invalid(_) => DaemonStat::RejectedInvalid,
            Self::Eof | Self::Io(_) => DaemonStat::RejectedEof,
            Self::Proxy(_) => DaemonStat::RejectedProxy,
            Self::Http(_) => DaemonStat::WsRejectedHttp,
            Self::Frame(e) if e.is_oversize() => DaemonStat::RejectedOversize,
            Self::Frame(_) => DaemonStat::WsBadFrames,
            Self::Budget => DaemonStat::RejectedBudget,
        }
    }
}

/// The first packet, read and validated.
pub(super) struct First {
    /// Every byte read from the client so far from the CONNECT on (a PROXY header
    /// before it is not forwarded; on WebSocket listeners, the frames as received).
    pub bytes: Vec<u8>,
    pub version: mqtt::Version,
    /// Length of the CONNECT at the start of `bytes` (of its payload, for frames).
    pub connect_len: usize,
    pub client_id: String,
    pub username: Option<String>,
    /// The client's address as a PROXY header in front named it.
    pub proxied_source: Option<SocketAddr>,
}

impl First {
    /// The fields of `c`, with `bytes`.
    pub fn of(c: &mqtt::Connect<'_>, proxied_source: Option<SocketAddr>, bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            version: c.version,
            connect_len: c.len,
            client_id: c.client_id.to_owned(),
            username: c.username.map(str::to_owned),
            proxied_source,
        }
    }
}

impl Conn<'_> {
    /// Step 1: the first packet, within `inspect_timeout`, with the WebSocket upgrade
    /// on `ws`/`wss`. None when the client was turned away (counted, answered in
    /// WebSocket terms after a `101`, logged at debug).
    pub(super) async fn read_first(
        &self,
        client: &mut Client,
        proxy_header: bool,
    ) -> Option<(First, Option<websocket::Handshake>)> {
        let listener = &self.listener.config;
        let stats = &self.shared.stats;
        let max = listener.max_connect_size as usize;
        let mut charge = self.shared.preconnect.charge();
        let websocket = self.listener.websocket();
        let read = async {
            match websocket {
                Some(ws) => {
                    websocket::read_connect(client, &ws.path, max, proxy_header, stats, &mut charge)
                        .await
                        .map(|(f, h)| (f, Some(h)))
                }
                None => read_connect(client, max, proxy_header, &mut charge)
                    .await
                    .map(|f| (f, None)),
            }
        };
        let reject = match timeout(listener.inspect_timeout, read).await {
            Ok(Ok(first)) => return Some(first),
            Ok(Err(reject)) => reject,
            Err(_) => {
                stats.inc(DaemonStat::RejectedTimeout);
                debug!(peer = %self.peer, listener = %listener.name, "no CONNECT within inspect_timeout");
                return None;
            }
        };
        if let Reject::Invalid(why) = &reject {
            stats.inc(invalid_stat(*why));
        }
        stats.inc(reject.stat());
        if websocket.is_some() && matches!(reject, Reject::Invalid(_) | Reject::Frame(_)) {
            // After the 101: say why in WebSocket terms.
            let close = ws::close_frame(ws::CloseCode::ProtocolError);
            let _ = client.write_all(&close).await;
        }
        let _ = client.shutdown().await;
        debug!(peer = %self.peer, listener = %listener.name, %reject, "client rejected");
        None
    }

    /// Step 1b: the CONNECT's client id and/or username replaced with client
    /// certificate fields (`[listeners.rewrite]`). False when the client was closed
    /// because it cannot be done.
    pub(super) async fn rewrite(&self, client: &mut Client, first: &mut First) -> bool {
        let listener = &self.listener.config;
        if listener.rewrite == Rewrite::default() {
            return true;
        }
        let identity = self.tls.as_ref().and_then(|t| t.identity.as_ref());
        let max = listener.max_connect_size as usize;
        let websocket = self.listener.websocket().is_some();
        let rewritten = if websocket {
            websocket::rewrite_in_frames(first, listener.rewrite, identity, max)
        } else {
            apply_rewrite(first, listener.rewrite, identity, max)
        };
        let Err(why) = rewritten else {
            return true;
        };
        self.shared.stats.inc(DaemonStat::RewriteFailed);
        debug!(peer = %self.peer, listener = %listener.name, %why, "CONNECT rewrite failed; closing");
        if websocket {
            let close = ws::close_frame(ws::CloseCode::PolicyViolation);
            let _ = client.write_all(&close).await;
        }
        false
    }
}

/// Replaces the client id and/or username of the CONNECT with client certificate
/// fields (`[listeners.rewrite]`); bytes after the CONNECT are kept.
pub(super) fn apply_rewrite(
    first: &mut First,
    rewrite: Rewrite,
    identity: Option<&Identity>,
    max: usize,
) -> Result<(), String> {
    let Some(identity) = identity else {
        return Err("no client certificate".into());
    };
    let field = |f: Option<CertField>| -> Result<Option<String>, String> {
        f.map(|f| {
            identity
                .get(f)
                .map(str::to_owned)
                .ok_or_else(|| format!("the certificate has no {f:?}"))
        })
        .transpose()
    };
    let client_id = field(rewrite.client_id)?.unwrap_or_else(|| first.client_id.clone());
    let username = field(rewrite.username)?;
    let packet = &first.bytes[..first.connect_len];
    let mut new = match (&first.username, &username) {
        (None, Some(u)) => mqtt::rewrite_connect(packet, max, &client_id, None)
            .and_then(|p| mqtt::add_username(&p, max, u)),
        _ => mqtt::rewrite_connect(packet, max, &client_id, username.as_deref()),
    }
    .map_err(|e| format!("the CONNECT cannot take the certificate fields: {e}"))?;
    new.extend_from_slice(&first.bytes[first.connect_len..]);
    first.connect_len = new.len() - (first.bytes.len() - first.connect_len);
    first.bytes = new;
    first.client_id = client_id;
    if username.is_some() {
        first.username = username;
    }
    Ok(())
}

/// The counter of one reason for refusing a first packet.
fn invalid_stat(why: mqtt::Invalid) -> DaemonStat {
    use mqtt::Invalid as I;
    match why {
        I::NotConnect => DaemonStat::InvalidNotConnect,
        I::RemainingLength => DaemonStat::InvalidRemainingLength,
        I::TooLarge => DaemonStat::InvalidTooLarge,
        I::Protocol => DaemonStat::InvalidProtocol,
        I::Flags => DaemonStat::InvalidFlags,
        I::Utf8 => DaemonStat::InvalidUtf8,
        I::Property => DaemonStat::InvalidProperty,
        I::Length => DaemonStat::InvalidLength,
    }
}

/// Reads until the buffer starts with a complete CONNECT (bytes after it are kept),
/// after a PROXY v1/v2 header when `proxy_header` is set.
async fn read_connect(
    client: &mut Client,
    max: usize,
    proxy_header: bool,
    charge: &mut Charge<'_>,
) -> Result<First, Reject> {
    let mut bytes = Vec::with_capacity(256);
    let mut proxy = ProxyPrefix::expected(proxy_header);
    loop {
        if proxy.strip(&mut bytes)? {
            match mqtt::decode_connect(&bytes, max) {
                Decode::Connect(c) => {
                    let first = First::of(&c, proxy.source, Vec::new());
                    return Ok(First { bytes, ..first });
                }
                Decode::Invalid(e) => return Err(Reject::Invalid(e)),
                Decode::Incomplete => {}
            }
        }
        read_more(client, &mut bytes, charge).await?;
    }
}

/// A PROXY header a listener expects in front of the client's first bytes.
pub(super) struct ProxyPrefix {
    expected: bool,
    /// The client the header named.
    pub source: Option<SocketAddr>,
}

impl ProxyPrefix {
    pub fn expected(expected: bool) -> Self {
        Self {
            expected,
            source: None,
        }
    }

    /// Removes the header from the front of `buf` once it is complete; true when what
    /// follows may be parsed (no header expected, or it has been removed).
    pub fn strip(&mut self, buf: &mut Vec<u8>) -> Result<bool, Reject> {
        if self.expected {
            match proxy_protocol::decode(buf) {
                proxy_protocol::Decoded::Header { len, source } => {
                    buf.drain(..len);
                    self.source = source;
                    self.expected = false;
                }
                proxy_protocol::Decoded::Invalid(why) => return Err(Reject::Proxy(why)),
                proxy_protocol::Decoded::Incomplete => {}
            }
        }
        Ok(!self.expected)
    }
}

/// Appends what the client sends next to `buf`, whose memory is charged to the
/// pre-CONNECT budget.
pub(super) async fn read_more(
    client: &mut Client,
    buf: &mut Vec<u8>,
    charge: &mut Charge<'_>,
) -> Result<(), Reject> {
    buf.reserve(4096);
    if !charge.hold(buf.capacity()) {
        return Err(Reject::Budget);
    }
    match client.read_buf(buf).await {
        Ok(0) => Err(Reject::Eof),
        Ok(_) => Ok(()),
        Err(e) => Err(Reject::Io(e)),
    }
}
