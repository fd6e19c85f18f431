//! Checking `[[listeners]]`: address, protocol with its TLS and WebSocket settings,
//! rewrite, cluster.

use std::{net::SocketAddr, ops::Range, path::PathBuf};

use toml::Spanned;

use super::{
    check::{Checker, UNSPECIFIED},
    raw::*,
    *,
};

impl Checker<'_> {
    /// One `[[listeners]]` entry (its bind address is checked against the others by
    /// the caller).
    pub(super) fn listener(&mut self, key: &str, rl: RawListener, clusters: &[Cluster]) -> Checked {
        let bind = self.bind_addr(&rl.bind, format!("{key}.bind"));
        let limits = self.limits(key, &rl);
        self.positive(
            rl.name.span(),
            format!("{key}.inspect_timeout"),
            rl.inspect_timeout.0,
        );
        if !(16..=16 * 1024 * 1024).contains(rl.max_connect_size.get_ref()) {
            self.err(
                rl.max_connect_size.span(),
                format!("{key}.max_connect_size"),
                "must be between 16 and 16777216 bytes",
            );
        }
        let kind = *rl.kind.get_ref();
        let websocket = self.websocket(key, kind, rl.path, rl.max_frame_size);
        let tls = self.listener_tls(key, kind, &rl.name, rl.tls);
        let rewrite = self.rewrite(key, rl.rewrite, tls.as_ref());
        let cluster = self.listener_cluster(key, &rl.name, rl.cluster.as_ref(), clusters);
        let protocol = match (tls, websocket) {
            (None, None) => Protocol::Mqtt,
            (Some(tls), None) => Protocol::Mqtts(tls),
            (None, Some(ws)) => Protocol::Ws(ws),
            (Some(tls), Some(ws)) => Protocol::Wss(tls, ws),
        };
        Checked {
            bind_span: rl.bind.span(),
            listener: Listener {
                name: rl.name.into_inner(),
                bind: bind.unwrap_or(UNSPECIFIED),
                cluster: cluster.unwrap_or(0),
                inspect_timeout: rl.inspect_timeout.0,
                accept_proxy_protocol: rl.accept_proxy_protocol.into_inner(),
                access_log: rl.access_log,
                max_connect_size: rl.max_connect_size.into_inner(),
                rewrite,
                protocol,
                limits,
            },
        }
    }

    /// The admission limits of a listener: rates above 0, bursts defaulting to one
    /// second's worth, the wait queue to ten seconds' worth.
    fn limits(&mut self, key: &str, rl: &RawListener) -> Limits {
        let mut rate = |rate: &Option<Spanned<f64>>,
                        burst: &Option<Spanned<u32>>,
                        name: &str,
                        burst_name: &str| {
            let r = rate.as_ref()?;
            let value = *r.get_ref();
            if !(value > 0.0 && value.is_finite()) {
                self.err(
                    r.span(),
                    format!("{key}.{name}"),
                    "must be a number above 0 (a second)",
                );
                return None;
            }
            let burst = match burst {
                Some(b) if *b.get_ref() == 0 => {
                    self.err(
                        b.span(),
                        format!("{key}.{burst_name}"),
                        "must be at least 1",
                    );
                    1
                }
                Some(b) => *b.get_ref(),
                None => value.ceil() as u32,
            };
            Some(Rate {
                rate: value,
                burst: burst.max(1),
            })
        };
        let per_source = rate(
            &rl.connect_rate_per_source,
            &rl.connect_burst_per_source,
            "connect_rate_per_source",
            "connect_burst_per_source",
        );
        let per_client_id = rate(
            &rl.connect_rate_per_client_id,
            &rl.connect_burst_per_client_id,
            "connect_rate_per_client_id",
            "connect_burst_per_client_id",
        );
        // The listener's rate smooths: a tenth of a second's worth at once.
        let new_connections =
            rate(&rl.new_connection_rate, &None, "new_connection_rate", "").map(|r| Rate {
                burst: (r.rate / 10.0).ceil().max(1.0) as u32,
                ..r
            });
        let new_connection_queue = match (&rl.new_connection_queue, new_connections) {
            (Some(q), _) => *q.get_ref(),
            (None, Some(r)) => (r.rate * 10.0).ceil().max(100.0) as u32,
            (None, None) => 0,
        };
        let max_connections_per_source = match &rl.max_connections_per_source {
            Some(m) if *m.get_ref() == 0 => {
                self.err(
                    m.span(),
                    format!("{key}.max_connections_per_source"),
                    "must be at least 1",
                );
                None
            }
            m => m.as_ref().map(|m| *m.get_ref()),
        };
        Limits {
            max_connections_per_source,
            per_source,
            new_connections,
            new_connection_queue,
            per_client_id,
        }
    }

    /// The WebSocket settings of `ws`/`wss` listeners (`path`, `max_frame_size`);
    /// on other kinds those keys are errors.
    fn websocket(
        &mut self,
        key: &str,
        kind: ListenerKind,
        path: Option<Spanned<String>>,
        max_frame_size: Option<Spanned<u32>>,
    ) -> Option<WebSocket> {
        let websocket = matches!(kind, ListenerKind::Ws | ListenerKind::Wss);
        let path = match self.websocket_only(path, websocket, key, "path") {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.err(p.span(), format!("{key}.path"), "must start with '/'");
                String::new()
            }
            Some(p) => p.into_inner(),
            None => "/mqtt".to_owned(),
        };
        let max_frame_size =
            match self.websocket_only(max_frame_size, websocket, key, "max_frame_size") {
                Some(m) if !(128..=256 << 20).contains(m.get_ref()) => {
                    self.err(
                        m.span(),
                        format!("{key}.max_frame_size"),
                        "must be between 128 and 268435456 bytes",
                    );
                    0
                }
                Some(m) => m.into_inner(),
                None => default_max_frame_size().into_inner(),
            };
        websocket.then_some(WebSocket {
            path,
            max_frame_size,
        })
    }

    /// `[listeners.rewrite]`: only with verified client certificates.
    fn rewrite(
        &mut self,
        key: &str,
        raw: Option<Spanned<RawRewrite>>,
        tls: Option<&TlsListener>,
    ) -> Rewrite {
        let Some(r) = raw else {
            return Rewrite::default();
        };
        let span = r.span();
        let r = r.into_inner();
        if tls.is_none_or(|t| t.settings.client_ca.is_none()) {
            self.err(
                span,
                format!("{key}.rewrite"),
                "needs client certificates: a TLS listener with tls.client_ca",
            );
        }
        Rewrite {
            client_id: r.client_id,
            username: r.username,
        }
    }

    /// The index of the cluster a listener names.
    fn listener_cluster(
        &mut self,
        key: &str,
        name: &Spanned<String>,
        cluster: Option<&Spanned<String>>,
        clusters: &[Cluster],
    ) -> Option<usize> {
        let Some(cluster) = cluster else {
            self.err(
                name.span(),
                format!("{key}.cluster"),
                "missing: name the [[clusters]] entry this listener feeds",
            );
            return None;
        };
        let found = clusters.iter().position(|c| &c.name == cluster.get_ref());
        if found.is_none() {
            self.err(
                cluster.span(),
                format!("{key}.cluster"),
                format!("no [[clusters]] entry is named {:?}", cluster.get_ref()),
            );
        }
        found
    }

    /// Checks a listener's `[listeners.tls]` against its kind and builds it (reading
    /// the files it names).
    fn listener_tls(
        &mut self,
        key: &str,
        kind: ListenerKind,
        name: &Spanned<String>,
        raw: Option<Spanned<RawTls>>,
    ) -> Option<TlsListener> {
        let wants_tls = matches!(kind, ListenerKind::Mqtts | ListenerKind::Wss);
        let Some(raw) = raw else {
            if wants_tls {
                self.err(
                    name.span(),
                    format!("{key}.tls"),
                    "a TLS listener needs [listeners.tls] with cert and key",
                );
            }
            return None;
        };
        let span = raw.span();
        if !wants_tls {
            self.err(
                span,
                format!("{key}.tls"),
                "only \"mqtts\" and \"wss\" listeners use TLS",
            );
            return None;
        }
        self.tls_setup(key, raw, b"mqtt")
    }

    /// TLS settings under `key` (`[listeners.tls]`, `[admin.tls]`), the rustls
    /// configuration built from them (files read now) offering ALPN `alpn`.
    pub(super) fn tls_setup(
        &mut self,
        key: &str,
        raw: Spanned<RawTls>,
        alpn: &[u8],
    ) -> Option<TlsListener> {
        let span = raw.span();
        let raw = raw.into_inner();
        let at = |p: PathBuf| self.dir.join(p);
        let settings = crate::tls::TlsSettings {
            cert: at(raw.cert),
            key: at(raw.key),
            certs: raw
                .certs
                .into_iter()
                .map(|c| crate::tls::SniCert {
                    server_names: c.server_names,
                    cert: at(c.cert),
                    key: at(c.key),
                })
                .collect(),
            verify: raw.verify.unwrap_or(crate::tls::Verify::Required),
            client_ca: raw.client_ca.map(at),
            crl: raw.crl.map(at),
            min_version: raw.min_version,
            session_cache_size: raw.session_cache_size,
            session_tickets: raw.session_tickets,
        };
        self.positive(
            span.clone(),
            format!("{key}.tls.handshake_timeout"),
            raw.handshake_timeout.0,
        );
        if raw.verify.is_some() && settings.client_ca.is_none() {
            self.err(
                span.clone(),
                format!("{key}.tls.verify"),
                "needs tls.client_ca",
            );
        }
        match crate::tls::server_config(&settings) {
            Ok(mut config) => {
                std::sync::Arc::make_mut(&mut config).alpn_protocols = vec![alpn.to_vec()];
                Some(TlsListener {
                    settings,
                    config,
                    handshake_timeout: raw.handshake_timeout.0,
                    max_handshakes: raw.max_handshakes,
                })
            }
            Err(e) => {
                self.err(span, format!("{key}.tls.{}", e.key), e.message);
                None
            }
        }
    }

    /// `value` of a listener key only `ws` and `wss` listeners have; on another kind
    /// it is an error and treated as absent.
    fn websocket_only<T>(
        &mut self,
        value: Option<Spanned<T>>,
        websocket: bool,
        listener: &str,
        name: &str,
    ) -> Option<Spanned<T>> {
        match value {
            Some(v) if !websocket => {
                self.err(
                    v.span(),
                    format!("{listener}.{name}"),
                    "only \"ws\" and \"wss\" listeners have this key",
                );
                None
            }
            v => v,
        }
    }

    /// A listener address: an IP and a port (host names are not taken: a listener
    /// binds an address of this host).
    pub(super) fn bind_addr(&mut self, raw: &Spanned<String>, key: String) -> Option<SocketAddr> {
        match raw.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                self.err(
                    raw.span(),
                    key,
                    "port 0 would pick a random port: give the port clients connect to",
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    raw.span(),
                    key,
                    format!(
                        "expected IP:port, e.g. 0.0.0.0:1883 or [::]:1883 (got {:?})",
                        raw.get_ref()
                    ),
                );
                None
            }
        }
    }
}

/// A checked listener and where its bind address stands in the file.
pub(super) struct Checked {
    pub bind_span: Range<usize>,
    pub listener: Listener,
}
