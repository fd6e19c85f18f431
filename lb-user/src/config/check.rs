//! Checking the raw file and building the typed configuration: one method per
//! section, every problem recorded (key, line, what to write) rather than the first.

use std::{
    collections::HashSet,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use toml::Spanned;

use super::{raw::*, *};

/// Stands in for an address that failed its check (the configuration is refused).
pub(super) const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Turns a TOML/serde error into one line: `line N: key: message`.
pub(super) fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of(text, s.start));
    // The key is what stands before `=` on the offending line, when there is one.
    let key = line
        .and_then(|l| text.lines().nth(l - 1))
        .and_then(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty() && !k.starts_with('['))
        .unwrap_or_else(|| "file".to_owned());
    ConfigError {
        line,
        key,
        message: e.message().trim().replace('\n', " "),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The state of one check: the text (for line numbers), the directory relative
/// paths start from, and every problem so far.
pub(super) struct Checker<'a> {
    pub text: &'a str,
    pub dir: &'a Path,
    pub errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// A server address: IP:port, or host:port resolved now (at start and at each
    /// reload; the address is then fixed until the next reload), first address given.
    pub(super) fn server_addr(&mut self, raw: &Spanned<String>, key: String) -> Option<SocketAddr> {
        use std::net::ToSocketAddrs;
        let text = raw.get_ref();
        if let Ok(a) = text.parse::<SocketAddr>() {
            return Some(a);
        }
        let parsed = text
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|(host, _)| !host.is_empty() && !host.contains(':'));
        let Some((host, port)) = parsed else {
            self.err(
                raw.span(),
                key,
                format!("expected IP:port or host:port, e.g. 127.0.0.1:1883 or broker-1:1883 (got {text:?})"),
            );
            return None;
        };
        match (host, port).to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => Some(a),
                None => {
                    self.err(
                        raw.span(),
                        key,
                        format!("host name {host:?} resolves to no address"),
                    );
                    None
                }
            },
            Err(e) => {
                self.err(
                    raw.span(),
                    key,
                    format!("cannot resolve host name {host:?} ({e}); give IP:port, or a name this host resolves"),
                );
                None
            }
        }
    }

    /// A duration that must not be zero.
    pub(super) fn positive(&mut self, span: Range<usize>, key: String, d: Duration) {
        if d.is_zero() {
            self.err(span, key, "must be more than 0s");
        }
    }

    pub(super) fn err(&mut self, span: Range<usize>, key: String, message: impl Into<String>) {
        let line = (span.end > 0).then(|| line_of(self.text, span.start));
        self.errors.push(ConfigError {
            line,
            key,
            message: message.into(),
        });
    }

    /// Checks every section and builds the configuration (meaningful only when no
    /// problem was recorded).
    pub(super) fn check(&mut self, raw: RawConfig) -> Config {
        let global = self.global(raw.global);
        let mut clusters = Vec::new();
        let mut names = HashSet::new();
        for (ci, rc) in raw.clusters.into_iter().enumerate() {
            if !names.insert(rc.name.get_ref().clone()) {
                self.err(
                    rc.name.span(),
                    format!("clusters[{ci}].name"),
                    format!("duplicate cluster name {:?}", rc.name.get_ref()),
                );
            }
            clusters.push(self.cluster(&format!("clusters[{ci}]"), rc));
        }
        if raw.listeners.is_empty() {
            self.err(
                0..0,
                "listeners".into(),
                "at least one [[listeners]] entry is required",
            );
        }
        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (li, rl) in raw.listeners.into_iter().enumerate() {
            let key = format!("listeners[{li}]");
            if !names.insert(rl.name.get_ref().clone()) {
                self.err(
                    rl.name.span(),
                    format!("{key}.name"),
                    format!("duplicate listener name {:?}", rl.name.get_ref()),
                );
            }
            let listener = self.listener(&key, rl, &clusters);
            let bind = listener.listener.bind;
            if bind != UNSPECIFIED && !binds.insert(bind) {
                self.err(
                    listener.bind_span,
                    format!("{key}.bind"),
                    format!("{bind} is already used by another listener"),
                );
            }
            listeners.push(listener.listener);
        }
        let admin = self.admin(raw.admin, raw.stats);
        let guard = raw.guard.map(|g| self.guard(g));
        Config {
            global,
            admin,
            listeners,
            clusters,
            guard,
        }
    }

    /// `[guard]`: interface names and CIDR blocks checked, the SYN burst defaulted.
    fn guard(&mut self, raw: Spanned<RawGuard>) -> GuardConfig {
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.interfaces.is_empty() {
            self.err(
                span,
                "guard.interfaces".into(),
                "name at least one interface to attach the XDP guard to, e.g. [\"eth0\"]",
            );
        }
        let mut interfaces = Vec::new();
        for (i, name) in raw.interfaces.into_iter().enumerate() {
            let n = name.get_ref();
            // IFNAMSIZ is 16 with the terminating NUL.
            if n.is_empty() || n.len() > 15 || n.contains(['/', ' ', '\0']) {
                self.err(
                    name.span(),
                    format!("guard.interfaces[{i}]"),
                    format!(
                        "{n:?} is not an interface name (1 to 15 characters, no '/' or spaces)"
                    ),
                );
            }
            interfaces.push(name.into_inner());
        }
        let mut cidrs = |list: Vec<Spanned<String>>, key: &str| {
            let mut out = Vec::new();
            for (i, c) in list.into_iter().enumerate() {
                match c.get_ref().parse::<crate::guard::Cidr>() {
                    Ok(cidr) => out.push(cidr),
                    Err(e) => self.err(c.span(), format!("guard.{key}[{i}]"), e),
                }
            }
            out
        };
        let deny = cidrs(raw.deny, "deny");
        let allow = cidrs(raw.allow, "allow");
        let syn_burst = match raw.syn_burst {
            Some(b) if *b.get_ref() == 0 => {
                self.err(b.span(), "guard.syn_burst".into(), "must be at least 1");
                1
            }
            Some(b) => *b.get_ref(),
            None => raw.syn_rate.max(1),
        };
        GuardConfig {
            interfaces,
            deny,
            allow,
            syn_rate: raw.syn_rate,
            syn_burst,
        }
    }

    /// `[admin]`, or the first wave's `[stats]` (its bind only) in its place.
    fn admin(&mut self, raw: Option<Spanned<RawAdmin>>, stats: Option<RawStats>) -> Option<Admin> {
        match (raw, stats) {
            (None, None) => None,
            (Some(a), Some(_)) => {
                self.err(
                    a.span(),
                    "stats".into(),
                    "[stats] is the older name of [admin]: keep [admin] only",
                );
                None
            }
            (None, Some(s)) => Some(Admin {
                bind: self
                    .bind_addr(&s.bind, "stats.bind".into())
                    .unwrap_or(UNSPECIFIED),
                token: None,
                tls: None,
                from_stats_section: true,
            }),
            (Some(a), None) => {
                let a = a.into_inner();
                let bind = self.bind_addr(&a.bind, "admin.bind".into());
                let token = a.token_file.and_then(|f| self.token(f));
                let tls = a.tls.and_then(|t| self.tls_setup("admin", t, b"http/1.1"));
                Some(Admin {
                    bind: bind.unwrap_or(UNSPECIFIED),
                    token,
                    tls,
                    from_stats_section: false,
                })
            }
        }
    }

    /// The token in `token_file` (surrounding white space removed): readable, not
    /// empty, and not readable by other users.
    fn token(&mut self, file: Spanned<PathBuf>) -> Option<Token> {
        use std::os::unix::fs::PermissionsExt;
        let span = file.span();
        let path = self.dir.join(file.into_inner());
        let key = "admin.token_file".to_owned();
        let shown = path.display();
        match std::fs::metadata(&path) {
            Ok(m) if m.permissions().mode() & 0o004 != 0 => {
                self.err(
                    span,
                    key,
                    format!("{shown} is readable by every user: chmod 600 it"),
                );
                return None;
            }
            Ok(_) => {}
            Err(e) => {
                self.err(span, key, format!("cannot read {shown}: {e}"));
                return None;
            }
        }
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => Some(Token(t.trim().to_owned())),
            Ok(_) => {
                self.err(span, key, format!("{shown} is empty"));
                None
            }
            Err(e) => {
                self.err(span, key, format!("cannot read {shown}: {e}"));
                None
            }
        }
    }

    /// `[global]`.
    fn global(&mut self, raw: RawGlobal) -> Global {
        let name = raw.name.get_ref().clone();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            self.err(
                raw.name.span(),
                "global.name".into(),
                "must be 1 to 64 characters of letters, digits, '-' or '_' (it names a bpffs directory)",
            );
        }
        if *raw.max_preconnect_bytes.get_ref() < 64 << 10 {
            self.err(
                raw.max_preconnect_bytes.span(),
                "global.max_preconnect_bytes".into(),
                "must be at least 65536 bytes",
            );
        }
        let run_as = self.run_as(raw.user, raw.group);
        let workers_by_default = raw.workers.is_none();
        let workers = self.workers(raw.workers);
        Global {
            workers,
            workers_by_default,
            name,
            run_as,
            data_plane: raw.data_plane,
            max_connections: raw.max_connections,
            max_preconnect_bytes: *raw.max_preconnect_bytes.get_ref() as usize,
            shutdown_delay: raw.shutdown_delay.0,
            shutdown_grace: raw.shutdown_grace.0,
        }
    }

    /// `[global] workers`: 1 to [`MAX_WORKERS`], or `"auto"` (one per core, at most
    /// that many), the default.
    fn workers(&mut self, raw: Option<Spanned<RawWorkers>>) -> std::num::NonZeroU32 {
        let one = std::num::NonZeroU32::MIN;
        let per_core = || {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores.min(MAX_WORKERS as usize) as i64
        };
        let Some(raw) = raw else {
            return u32::try_from(per_core())
                .ok()
                .and_then(std::num::NonZeroU32::new)
                .unwrap_or(one);
        };
        let n = match raw.get_ref() {
            RawWorkers::Word(w) if w == "auto" => per_core(),
            RawWorkers::Word(_) => 0,
            RawWorkers::Count(n) => *n,
        };
        match u32::try_from(n).ok().and_then(std::num::NonZeroU32::new) {
            Some(n) if n.get() <= MAX_WORKERS => n,
            _ => {
                self.err(
                    raw.span(),
                    "global.workers".into(),
                    format!("must be \"auto\" or a whole number from 1 to {MAX_WORKERS}"),
                );
                one
            }
        }
    }

    /// `[global] user` and `group`, looked up in the host's user database.
    fn run_as(
        &mut self,
        user: Option<Spanned<String>>,
        group: Option<Spanned<String>>,
    ) -> Option<crate::privilege::Account> {
        let Some(user) = user else {
            if let Some(g) = group {
                self.err(
                    g.span(),
                    "global.group".into(),
                    "needs global.user (the group alone is not switched to)",
                );
            }
            return None;
        };
        let group_name = group.as_ref().map(|g| g.get_ref().as_str());
        match crate::privilege::resolve(user.get_ref(), group_name) {
            Ok(account) => Some(account),
            Err(e) => {
                let (span, key) = match (&e, &group) {
                    (crate::privilege::UnknownAccount::Group(_), Some(g)) => {
                        (g.span(), "global.group")
                    }
                    _ => (user.span(), "global.user"),
                };
                self.err(span, key.into(), e.to_string());
                None
            }
        }
    }

    /// One `[[clusters]]` entry, its servers included.
    fn cluster(&mut self, key: &str, rc: RawCluster) -> Cluster {
        let span = rc.name.span();
        if rc.servers.len() > 1024 {
            self.err(
                span.clone(),
                format!("{key}.servers"),
                "at most 1024 servers per cluster",
            );
        }
        if *rc.empty_client_id.get_ref() == Balance::ClientId {
            self.err(
                rc.empty_client_id.span(),
                format!("{key}.empty_client_id"),
                "an empty client id cannot be hashed: least-conn, round-robin, random or source",
            );
        }
        if rc.sticky_table_size.get() > 10_000_000 {
            self.err(
                span.clone(),
                format!("{key}.sticky_table_size"),
                "at most 10000000 entries",
            );
        }
        if rc.servers.is_empty() {
            self.err(
                span.clone(),
                format!("{key}.servers"),
                "a cluster needs at least one [[clusters.servers]] entry",
            );
        }
        for (name, d) in [
            ("connect_timeout", rc.connect_timeout.0),
            ("idle_timeout", rc.idle_timeout.0),
        ] {
            self.positive(span.clone(), format!("{key}.{name}"), d);
        }
        if rc.promote_max_rate > 0 && rc.promote_min_rate > rc.promote_max_rate {
            // No rate would ever be promoted by age.
            self.err(
                span.clone(),
                format!("{key}.promote_min_rate"),
                "must not be above promote_max_rate",
            );
        }
        let evict_rate = std::num::NonZeroU32::new(rc.evict_rate);
        if evict_rate.is_none() {
            self.err(
                span.clone(),
                format!("{key}.evict_rate"),
                "connections a second, at least 1",
            );
        }
        if rc
            .server_reference
            .as_ref()
            .is_some_and(|r| r.is_empty() || r.len() > 1024 || r.contains('\0'))
        {
            self.err(
                span.clone(),
                format!("{key}.server_reference"),
                "1 to 1024 bytes of UTF-8 without U+0000, e.g. \"mqtt2.example.com:1883\"",
            );
        }
        let health = self.health(key, span.clone(), rc.health);
        let servers = self.servers(key, rc.servers);
        self.source_families(key, span, &rc.source_addresses, &servers);
        Cluster {
            name: rc.name.into_inner(),
            balance: rc.balance.into_inner(),
            empty_client_id: rc.empty_client_id.into_inner(),
            sticky: rc.sticky.into_inner(),
            sticky_expire: rc.sticky_expire.0,
            sticky_table_size: rc.sticky_table_size,
            proxy_protocol: rc.proxy_protocol,
            connect_timeout: rc.connect_timeout.0,
            idle_timeout: rc.idle_timeout.0,
            promote: Promote {
                after_bytes: rc.promote_after_bytes.filter(|&b| b > 0),
                after: rc.promote_after.map(|d| d.0).filter(|d| !d.is_zero()),
                max_rate: Some(rc.promote_max_rate).filter(|&r| r > 0),
                min_rate: Some(rc.promote_min_rate).filter(|&r| r > 0),
                conversations: rc.promote_conversations,
            },
            evict_rate: evict_rate.unwrap_or(std::num::NonZeroU32::MIN),
            server_reference: rc.server_reference,
            health,
            source_addresses: rc.source_addresses,
            servers,
        }
    }

    /// A cluster's `[clusters.health]`.
    fn health(&mut self, key: &str, span: Range<usize>, raw: RawHealth) -> Health {
        for (name, d) in [
            ("health.interval", raw.interval.0),
            ("health.timeout", raw.timeout.0),
        ] {
            self.positive(span.clone(), format!("{key}.{name}"), d);
        }
        if raw.timeout.0 > raw.interval.0 {
            self.err(
                span.clone(),
                format!("{key}.health.timeout"),
                "must not exceed health.interval",
            );
        }
        // The check's CONNECT carries it (and the server's name): an MQTT string.
        if raw.client_id.as_ref().is_some_and(|c| c.len() > 256) {
            self.err(span, format!("{key}.health.client_id"), "at most 256 bytes");
        }
        Health {
            kind: raw.kind,
            interval: raw.interval.0,
            timeout: raw.timeout.0,
            rise: raw.rise,
            fall: raw.fall,
            client_id: raw.client_id,
        }
    }

    /// A cluster's `[[clusters.servers]]`: unique names and addresses.
    fn servers(&mut self, key: &str, raw: Vec<RawServer>) -> Vec<Server> {
        let mut servers = Vec::new();
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for (si, rs) in raw.into_iter().enumerate() {
            let skey = format!("{key}.servers[{si}]");
            if !names.insert(rs.name.get_ref().clone()) {
                self.err(
                    rs.name.span(),
                    format!("{skey}.name"),
                    format!(
                        "duplicate server name {:?} in this cluster",
                        rs.name.get_ref()
                    ),
                );
            }
            let address = self.server_addr(&rs.address, format!("{skey}.address"));
            if address.is_some_and(|a| !addresses.insert(a)) {
                self.err(
                    rs.address.span(),
                    format!("{skey}.address"),
                    "duplicate server address in this cluster",
                );
            }
            let ws_address = rs
                .ws_address
                .as_ref()
                .and_then(|w| self.server_addr(w, format!("{skey}.ws_address")));
            servers.push(Server {
                name: rs.name.into_inner(),
                address: address.unwrap_or(UNSPECIFIED),
                weight: rs.weight,
                backup: rs.backup,
                state: rs.state,
                max_fails: rs.max_fails,
                fail_timeout: rs.fail_timeout.0,
                max_connections: rs.max_connections,
                ws_address,
            });
        }
        servers
    }

    /// `source_addresses`, when given, must hold an address of every server's family.
    fn source_families(
        &mut self,
        key: &str,
        span: Range<usize>,
        sources: &[std::net::IpAddr],
        servers: &[Server],
    ) {
        if sources.is_empty() {
            return;
        }
        for server in servers {
            let family = server.address.is_ipv4();
            if !sources.iter().any(|a| a.is_ipv4() == family) {
                self.err(
                    span.clone(),
                    format!("{key}.source_addresses"),
                    format!(
                        "no address of the family of server {:?} ({})",
                        server.name, server.address
                    ),
                );
            }
        }
    }
}
