//! A test PKI made with the `openssl` command.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use tokio::net::TcpStream;

use crate::TempDir;

/// A test PKI made with the `openssl` command: a CA, a server certificate for
/// `localhost`/127.0.0.1, a client certificate (`O=Acme, CN=device-7`, serial
/// 0A1B2C3D, SAN e-mail and DNS), the same client with an expired certificate, and a
/// client certificate from another CA.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    /// Makes the certificates (runs `openssl`: not a `Default`).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let dir = TempDir::new("pki");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("openssl (apt-get install -y openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = |name: &str, subject: &str, csr: &str| {
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                name,
                "-out",
                csr,
                "-subj",
                subject,
            ]);
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "3650",
                "-subj",
                &format!("/CN=mqttlb test {ca}"),
            ]);
        }
        let sign = |name: &str, ca: &str, serial: &str, ext: &str| {
            std::fs::write(dir.0.join(format!("{name}.ext")), ext).expect("ext");
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-set_serial",
                serial,
                "-days",
                "365",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ]);
        };
        key("server.key", "/CN=localhost", "server.csr");
        sign(
            "server",
            "ca",
            "0x1001",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        let client_ext = "subjectAltName=email:device7@example.com,DNS:device7.example.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
        key("client.key", "/O=Acme/CN=device-7", "client.csr");
        sign("client", "ca", "0x0A1B2C3D", client_ext);
        key("stranger.key", "/CN=stranger", "stranger.csr");
        sign("stranger", "other-ca", "0x77", client_ext);
        // The client's key in a certificate that expired yesterday.
        run(&[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "0x78",
            "-days",
            "-1",
            "-out",
            "expired.pem",
            "-extfile",
            "client.ext",
        ]);
        std::fs::copy(dir.0.join("client.key"), dir.0.join("expired.key")).expect("key");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    /// A rustls client trusting the CA, presenting `cert` (`client`, `stranger`) if given.
    pub fn client(&self, cert: Option<&str>) -> tokio_rustls::TlsConnector {
        self.client_versions(cert, rustls::DEFAULT_VERSIONS)
    }

    /// TLS to `addr` as `localhost` with only this protocol version.
    pub async fn connect_version(
        &self,
        addr: SocketAddr,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        self.client_versions(None, &[version])
            .connect(name, tcp)
            .await
    }

    fn client_versions(
        &self,
        cert: Option<&str>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path("ca.pem")).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add ca");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
        let config = match cert {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let chain = CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("certs");
                let key =
                    PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).expect("key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
        };
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }

    /// TLS to `addr` as `localhost`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        cert: Option<&str>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        self.client(cert).connect(name, tcp).await
    }

    /// `openssl s_client` to `addr` (trusting the CA, SNI `localhost`) with `args`:
    /// its output lines starting with New/Reused.
    pub fn s_client(&self, addr: SocketAddr, args: &[&str]) -> Vec<String> {
        let mut out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-CAfile",
                &self.path("ca.pem"),
            ])
            .args(["-servername", "localhost"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        // Stdin open a moment: a TLS 1.3 ticket arrives after the handshake.
        std::thread::sleep(Duration::from_millis(500));
        drop(out.stdin.take());
        let out = out.wait_with_output().expect("s_client");
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("New,") || l.starts_with("Reused,"))
            .map(str::to_owned)
            .collect();
        if lines.is_empty() {
            eprintln!(
                "openssl s_client {args:?}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        lines
    }
}
