//! TLS termination for `mqtts` (and later `wss`) listeners: the rustls server
//! configuration built from `[listeners.tls]`, and the client identity taken from a
//! verified client certificate for `[listeners.rewrite]` and PROXY v2 TLVs.
//!
//! - Certificates: a default chain and key, plus `[[listeners.tls.certs]]` chosen by
//!   SNI (exact names, or `*.example.com` for one label); clients without SNI, or
//!   with an unknown name, get the default.
//! - Client certificates (`client_ca`): `verify = "required"` refuses a handshake
//!   without a valid certificate, `"optional"` accepts one without; a `crl` revokes.
//! - Versions: TLS 1.3, and TLS 1.2 unless `min_version = "1.3"`. ALPN `mqtt` is
//!   offered; a client offering ALPN without `mqtt` is refused (RFC 7301).
//! - Resumption: a stateful session cache (`session_cache_size`, TLS 1.2 session ids
//!   and TLS 1.3) and stateless tickets (`session_tickets`), whose key rotates every
//!   six hours and is the same in every worker and across reloads ([`tickets`]).

pub mod records;
pub mod tickets;

use std::{collections::HashMap, fmt, path::Path, sync::Arc};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject,
};
use serde::Deserialize;

/// `verify`: whether a client certificate is needed when `client_ca` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verify {
    /// The handshake fails without a valid client certificate.
    Required,
    /// A client without a certificate is accepted; one with an invalid one is not.
    Optional,
}

/// `min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// One SNI certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    /// Names it serves (`*.example.com` matches one label).
    pub server_names: Vec<String>,
    /// PEM chain.
    pub cert: std::path::PathBuf,
    /// PEM key.
    pub key: std::path::PathBuf,
}

/// `[listeners.tls]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Default PEM chain.
    pub cert: std::path::PathBuf,
    /// Default PEM key.
    pub key: std::path::PathBuf,
    /// Certificates chosen by SNI.
    pub certs: Vec<SniCert>,
    /// PEM CA bundle for client certificates.
    pub client_ca: Option<std::path::PathBuf>,
    /// Whether a client certificate is needed.
    pub verify: Verify,
    /// PEM certificate revocation lists.
    pub crl: Option<std::path::PathBuf>,
    /// Oldest version accepted.
    pub min_version: MinVersion,
    /// Stateful session cache entries (0: none).
    pub session_cache_size: usize,
    /// Stateless session tickets.
    pub session_tickets: bool,
}

/// A TLS setup problem: the key at fault (relative to `[listeners.tls]`) and why.
#[derive(Debug)]
pub struct TlsError {
    /// Key, e.g. `cert`, `certs[1].key`, `client_ca`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn err(key: impl Into<String>, message: impl Into<String>) -> TlsError {
    TlsError {
        key: key.into(),
        message: message.into(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            err(
                key,
                format!("cannot read certificates from {}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("no PEM certificate in {}", path.display()),
        ));
    }
    Ok(certs)
}

fn certified_key(
    cert: &Path,
    key: &Path,
    prefix: &str,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert, &format!("{prefix}cert"))?;
    let key_key = format!("{prefix}key");
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        err(
            &key_key,
            format!("cannot read a private key from {}: {e}", key.display()),
        )
    })?;
    let signing = provider.key_provider.load_private_key(der).map_err(|e| {
        err(
            &key_key,
            format!("unusable private key {}: {e}", key.display()),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        err(
            &key_key,
            format!(
                "{} does not belong to {}: {e}",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok(Arc::new(certified))
}

/// Chooses the certificate by SNI.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return Some(k.clone());
        }
        Some(self.default.clone())
    }
}

/// Builds the rustls configuration of a listener (reads every file it names).
pub fn server_config(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let default = certified_key(&s.cert, &s.key, "", &provider)?;
    let mut resolver = SniResolver {
        default,
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    for (i, c) in s.certs.iter().enumerate() {
        let k = certified_key(&c.cert, &c.key, &format!("certs[{i}]."), &provider)?;
        if c.server_names.is_empty() {
            return Err(err(
                format!("certs[{i}].server_names"),
                "at least one name is needed",
            ));
        }
        for name in &c.server_names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.insert(parent.to_owned(), k.clone()),
                None => resolver.exact.insert(name, k.clone()),
            };
        }
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| err("min_version", e.to_string()))?;
    let builder = match &s.client_ca {
        None => {
            if s.crl.is_some() {
                return Err(err("crl", "needs client_ca"));
            }
            builder.with_no_client_auth()
        }
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca, "client_ca")? {
                roots
                    .add(c)
                    .map_err(|e| err("client_ca", format!("{}: {e}", ca.display())))?;
            }
            let mut v =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if let Some(crl) = &s.crl {
                let crls = CertificateRevocationListDer::pem_file_iter(crl)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| err("crl", format!("cannot read {}: {e}", crl.display())))?;
                v = v.with_crls(crls);
            }
            if s.verify == Verify::Optional {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| err("client_ca", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    // A hot upgrade moves TLS 1.3 connections with their traffic keys
    // (`records::Keys::extract`); they go to the new process only, over a private
    // socket pair, and are never logged.
    config.enable_secret_extraction = true;
    config.session_storage = if s.session_cache_size > 0 {
        rustls::server::ServerSessionMemoryCache::new(s.session_cache_size)
    } else {
        Arc::new(rustls::server::NoServerSessionStorage {})
    };
    if s.session_tickets {
        config.ticketer = Arc::new(tickets::SharedTickets);
    } else {
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// A field of the client certificate, for `[listeners.rewrite]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CertField {
    /// Serial number, upper-case hex without separators (as NGINX's `$ssl_client_serial`).
    #[serde(rename = "cert.serial")]
    Serial,
    /// The subject's first common name.
    #[serde(rename = "cert.cn")]
    Cn,
    /// The subject distinguished name (RFC 4514 order, as `openssl -nameopt RFC2253`).
    #[serde(rename = "cert.dn")]
    Dn,
    /// The first DNS subject alternative name.
    #[serde(rename = "cert.san_dns")]
    SanDns,
    /// The first e-mail subject alternative name.
    #[serde(rename = "cert.san_email")]
    SanEmail,
}

/// What a verified client certificate says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Serial, upper-case hex.
    pub serial: String,
    /// First CN.
    pub cn: Option<String>,
    /// Subject DN.
    pub dn: String,
    /// First DNS SAN.
    pub san_dns: Option<String>,
    /// First e-mail SAN.
    pub san_email: Option<String>,
}

impl Identity {
    /// Reads the fields of a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let subject = cert.subject();
        let cn = subject
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned);
        let mut rdns: Vec<String> = Vec::new();
        for rdn in subject.iter() {
            let parts: Vec<String> = rdn
                .iter()
                .map(|a| {
                    let oid = a.attr_type();
                    let name =
                        x509_parser::objects::oid2abbrev(oid, x509_parser::objects::oid_registry())
                            .map(str::to_owned)
                            .unwrap_or_else(|_| oid.to_id_string());
                    format!("{name}={}", a.as_str().unwrap_or("?"))
                })
                .collect();
            rdns.push(parts.join("+"));
        }
        rdns.reverse();
        let (mut san_dns, mut san_email) = (None, None);
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) if san_dns.is_none() => san_dns = Some((*d).to_owned()),
                    GeneralName::RFC822Name(m) if san_email.is_none() => {
                        san_email = Some((*m).to_owned());
                    }
                    _ => {}
                }
            }
        }
        let serial = cert
            .raw_serial()
            .iter()
            .skip_while(|&&b| b == 0)
            .map(|b| format!("{b:02X}"))
            .collect::<String>();
        Some(Self {
            serial: if serial.is_empty() {
                "00".into()
            } else {
                serial
            },
            cn,
            dn: rdns.join(","),
            san_dns,
            san_email,
        })
    }

    /// The value of `field`, when the certificate has it.
    pub fn get(&self, field: CertField) -> Option<&str> {
        match field {
            CertField::Serial => Some(&self.serial),
            CertField::Cn => self.cn.as_deref(),
            CertField::Dn => Some(&self.dn),
            CertField::SanDns => self.san_dns.as_deref(),
            CertField::SanEmail => self.san_email.as_deref(),
        }
    }
}

/// What PROXY v2 says about the TLS session (PP2_TYPE_SSL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// "TLSv1.2" or "TLSv1.3".
    pub version: String,
    /// The client certificate's CN, when a verified certificate was presented.
    pub client_cn: Option<String>,
    /// Whether a verified client certificate was presented.
    pub client_cert: bool,
}

/// The name a PROXY v2 header gives a negotiated version (PP2_SUBTYPE_SSL_VERSION, as
/// OpenSSL names it).
pub fn version_name(version: Option<rustls::ProtocolVersion>) -> &'static str {
    match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    }
}
