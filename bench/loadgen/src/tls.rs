//! The TLS client of the TLS workloads (rustls, like the proxies' clients would use any
//! library; X25519 and the server's P-256 certificate for every system).

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use rustls::{ClientConfig, RootCertStore, client::Resumption};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio_rustls::TlsConnector;

/// A connector trusting the CA at `ca`; `resume` keeps sessions (tickets and ids) in
/// memory and offers them, otherwise every handshake is full.
pub fn connector(ca: &Path, resume: bool) -> Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = if resume {
        Resumption::in_memory_sessions(4096)
    } else {
        Resumption::disabled()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}
