//! The TLS handshake of `mqtts`/`wss` listeners: a PROXY header in front of it when
//! the listener expects one, then the handshake within `handshake_timeout` and under
//! `max_handshakes`, and what it established (version, client certificate).

use std::{io, net::SocketAddr, os::fd::AsRawFd, sync::LazyLock, time::Duration};

use lb_common::DaemonStat;
use tokio::{net::TcpStream, time::timeout};
use tracing::{debug, info};

use super::first::Reject;
use crate::{
    config::Listener,
    limits::LogOnce,
    proxy_protocol,
    runtime::TlsRt,
    stats::Stats,
    sys,
    tls::{Identity, TlsInfo},
};

/// What the TLS handshake established.
pub(super) struct TlsSession {
    /// What a PROXY v2 header tells the server about it.
    pub info: TlsInfo,
    /// The client certificate's fields, when it sent one.
    pub identity: Option<Identity>,
}

/// A TLS client after its handshake: the stream, the client's address (as a PROXY
/// header named it, if any) and the session.
pub(super) type Accepted = (crate::dataplane::tls::TlsClient, SocketAddr, TlsSession);

/// One TLS refusal logged per second, process-wide.
static TLS_FAILURE_LOG: LazyLock<LogOnce> = LazyLock::new(|| LogOnce::new(Duration::from_secs(1)));

/// The TLS handshake (after a PROXY header when the listener expects one), within
/// `handshake_timeout` and under the listener's `max_handshakes`. None when the client
/// was turned away (counted and logged here).
pub(super) async fn accept(
    stats: &Stats,
    config: &Listener,
    tls: &TlsRt,
    client: TcpStream,
    peer: SocketAddr,
) -> Option<Accepted> {
    let peer = if config.accept_proxy_protocol {
        proxied_peer(stats, config, &client, peer).await?
    } else {
        peer
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let handshake = async {
        // A client that sends nothing takes no handshake slot: silent connections
        // cannot starve the others; they are cut at the same timeout.
        wait_for_bytes(&client).await?;
        let _permit = tls.handshakes.acquire().await.map_err(io::Error::other)?;
        // Record boundaries followed from the first byte: a hot upgrade hands over
        // what rustls holds of an incomplete record.
        acceptor.accept(crate::tls::records::Tap::new(client)).await
    };
    let stream = match timeout(tls.handshake_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.inc(DaemonStat::TlsHandshakeFailures);
            // Why a device is refused (an expired or untrusted certificate, a refused
            // version) is what an operator needs to see; a flood stays readable.
            if TLS_FAILURE_LOG.allow() {
                info!(%peer, listener = %config.name, reason = %e, "TLS handshake refused (at most one such line a second)");
            } else {
                debug!(%peer, listener = %config.name, reason = %e, "TLS handshake refused");
            }
            return None;
        }
        Err(_) => {
            stats.inc(DaemonStat::TlsHandshakeTimeouts);
            debug!(%peer, listener = %config.name, "TLS handshake timed out");
            return None;
        }
    };
    stats.inc(DaemonStat::TlsHandshakes);
    let session = session_of(stream.get_ref().1);
    if session.resumed {
        stats.inc(DaemonStat::TlsResumed);
    }
    Some((stream, peer, session.session))
}

/// A session and whether it was resumed.
struct Established {
    session: TlsSession,
    resumed: bool,
}

/// What the handshake of `conn` established.
fn session_of(conn: &rustls::ServerConnection) -> Established {
    let identity = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| Identity::from_der(der));
    let info = TlsInfo {
        version: crate::tls::version_name(conn.protocol_version()).to_owned(),
        client_cn: identity.as_ref().and_then(|i| i.cn.clone()),
        client_cert: identity.is_some(),
    };
    Established {
        session: TlsSession { info, identity },
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    }
}

/// The client a PROXY header in front of the handshake names (`peer` when it names
/// none), within `inspect_timeout`; None when the client is turned away.
async fn proxied_peer(
    stats: &Stats,
    config: &Listener,
    client: &TcpStream,
    peer: SocketAddr,
) -> Option<SocketAddr> {
    match timeout(config.inspect_timeout, proxy_header_before_tls(client)).await {
        Ok(Ok(source)) => Some(source.unwrap_or(peer)),
        Ok(Err(reject)) => {
            stats.inc(match reject {
                Reject::Proxy(_) => DaemonStat::RejectedProxy,
                _ => DaemonStat::RejectedEof,
            });
            debug!(%peer, listener = %config.name, %reject, "client rejected");
            None
        }
        Err(_) => {
            stats.inc(DaemonStat::RejectedTimeout);
            None
        }
    }
}

/// A PROXY header in front of a TLS handshake, read without consuming a byte of the
/// handshake: peeked, then exactly its length read.
async fn proxy_header_before_tls(client: &TcpStream) -> Result<Option<SocketAddr>, Reject> {
    let mut buf = [0u8; 536];
    loop {
        client.readable().await.map_err(Reject::Io)?;
        let n = match client.try_io(tokio::io::Interest::READABLE, || {
            sys::peek(client.as_raw_fd(), &mut buf)
        }) {
            Ok(0) => return Err(Reject::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Reject::Io(e)),
        };
        match proxy_protocol::decode(&buf[..n]) {
            proxy_protocol::Decoded::Header { len, source } => {
                read_exactly(client, len).await?;
                return Ok(source);
            }
            proxy_protocol::Decoded::Invalid(why) => return Err(Reject::Proxy(why)),
            // Peeking again returns the same bytes until more arrive.
            proxy_protocol::Decoded::Incomplete => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Reads and drops exactly `len` bytes.
async fn read_exactly(client: &TcpStream, len: usize) -> Result<(), Reject> {
    let mut skip = vec![0u8; len];
    let mut got = 0;
    while got < len {
        client.readable().await.map_err(Reject::Io)?;
        match client.try_read(&mut skip[got..]) {
            Ok(0) => return Err(Reject::Eof),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Reject::Io(e)),
        }
    }
    Ok(())
}

/// Waits until the client has sent something (or closed). `readable()` alone can
/// report a fresh socket ready: a peek that would block clears that.
async fn wait_for_bytes(client: &TcpStream) -> io::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        client.readable().await?;
        match client.try_io(tokio::io::Interest::READABLE, || {
            sys::peek(client.as_raw_fd(), &mut byte)
        }) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
