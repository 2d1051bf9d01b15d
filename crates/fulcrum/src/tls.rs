//! TLS termination for `https` listeners: certificates chosen by SNI, ALPN, client certificates.
//!
//! Everything is loaded when the configuration is (so `fulcrum check` and a refused reload report a
//! missing file, a file without a certificate or key, or a key that does not belong to its
//! certificate, and a running fulcrum keeps its old certificates): [`load`] turns a listener's
//! [`TlsConfig`] into a rustls [`ServerConfig`].
//!
//! - Protocols: TLS 1.3 and 1.2 (`min_version = "1.3"` drops 1.2), with the ring provider's suites
//!   (AEAD only: AES-GCM and ChaCha20-Poly1305, ECDHE key exchange). 0-RTT is off.
//! - Certificates: [`CertStore`] answers by the client's server name: an exact name of a certificate's
//!   subject alternative names first, then a wildcard (`*.example.com` covers one label), then the
//!   default (the first certificate listed), which also serves clients that send no name.
//! - ALPN: `h2` and `http/1.1`.
//! - Resumption: session tickets (on by default) and a session cache; both are process-wide, so
//!   clients resume across reloads that rebuild the configuration.
//! - Client certificates (mTLS): `client_ca` verifies them, `client_auth = "optional"` also lets
//!   clients without one in.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClientAuth, TlsConfig, TlsVersion, UpstreamTls};

/// The crypto provider of every TLS connection fulcrum makes or accepts.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A problem with one of the files a TLS configuration names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The key whose file is at fault, relative to the `tls` table: `cert`, `key`, `certs[1].key`,
    /// `client_ca`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl LoadError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        LoadError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Builds the rustls configuration of an `https` listener from the files `tls` names.
///
/// # Errors
///
/// The first file that cannot be read or does not hold what it should, or a key that does not match
/// its certificate.
pub fn load(tls: &TlsConfig) -> Result<Arc<ServerConfig>, LoadError> {
    let provider = provider();
    let store = CertStore::load(tls, &provider)?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| LoadError::new("min_version", e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path).map_err(|m| LoadError::new("client_ca", m))? {
                roots.add(cert).map_err(|e| {
                    LoadError::new(
                        "client_ca",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = match tls.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| LoadError::new("client_ca", format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(store));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    if tls.resumption {
        config.session_storage = session_cache();
        if let Some(ticketer) = ticketer() {
            config.ticketer = ticketer;
        }
    } else {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// Builds the rustls client configuration of a pool's `tls` (ALPN `h2` when `http2`, else
/// `http/1.1`).
///
/// # Errors
///
/// A file that cannot be read or does not hold what it should (`ca`, `cert`, `key`), or no trusted
/// root at all (no `ca` and none in the system's store).
pub fn load_client(tls: &UpstreamTls, http2: bool) -> Result<Arc<rustls::ClientConfig>, LoadError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| LoadError::new("ca", e.to_string()))?;
    let builder = if !tls.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        match &tls.ca {
            Some(path) => {
                for cert in read_certs(path).map_err(|m| LoadError::new("ca", m))? {
                    roots.add(cert).map_err(|e| {
                        LoadError::new(
                            "ca",
                            format!("{}: not a usable CA certificate: {e}", path.display()),
                        )
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(LoadError::new(
                        "ca",
                        "required: the system has no trusted root certificates to verify the servers with",
                    ));
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = read_certs(&files.cert).map_err(|m| LoadError::new("cert", m))?;
            let key = read_key(&files.key).map_err(|m| LoadError::new("key", m))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| LoadError::new("key", format!("{}: {e}", files.key.display())))?
        }
    };
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// `verify = false`: any certificate is accepted (signatures are still checked, so the handshake is
/// sound; who holds the key is not).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The process-wide ticket keys (rotated by rustls every few hours), shared by every listener and
/// every reload so that tickets stay valid when the configuration is rebuilt.
fn ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| match rustls::crypto::ring::Ticketer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("TLS session tickets are off: {e}");
                None
            }
        })
        .clone()
}

/// The process-wide cache of TLS sessions (resumption by session id, TLS 1.2 clients without tickets).
fn session_cache() -> Arc<dyn StoresServerSessions> {
    static CACHE: OnceLock<Arc<dyn StoresServerSessions>> = OnceLock::new();
    CACHE
        .get_or_init(|| rustls::server::ServerSessionMemoryCache::new(16_384))
        .clone()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| format!("{}: no usable private key in it: {e}", path.display()))
}

/// The certificates of one listener, by the names they are valid for.
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is kept as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    fn load(tls: &TlsConfig, provider: &CryptoProvider) -> Result<Self, LoadError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        let several = tls.certs.len() > 1;
        for (i, files) in tls.certs.iter().enumerate() {
            let at = |key: &str| {
                if several {
                    format!("certs[{i}].{key}")
                } else {
                    key.to_owned()
                }
            };
            let chain = read_certs(&files.cert).map_err(|m| LoadError::new(at("cert"), m))?;
            let key = read_key(&files.key).map_err(|m| LoadError::new(at("key"), m))?;
            let names = dns_names(&chain[0]).map_err(|m| {
                LoadError::new(at("cert"), format!("{}: {m}", files.cert.display()))
            })?;
            let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
                let message = match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "{} does not belong to the certificate in {}",
                        files.key.display(),
                        files.cert.display()
                    ),
                    e => format!("{}: {e}", files.key.display()),
                };
                LoadError::new(at("key"), message)
            })?;
            let certified = Arc::new(certified);
            for name in names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()),
                    None => exact.entry(name),
                }
                .or_insert_with(|| certified.clone());
            }
            default.get_or_insert(certified);
        }
        let Some(default) = default else {
            return Err(LoadError::new("cert", "no certificate configured"));
        };
        Ok(CertStore {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for a client that asked for `name` (or for none).
    pub fn pick(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = name else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c;
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = self.wildcard.get(parent) {
                return c;
            }
        }
        &self.default
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}

/// The DNS names (subject alternative names) a certificate is valid for.
fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("not a usable X.509 certificate: {e}"))?;
    Ok(parsed.valid_dns_names().map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CertFiles;
    use std::time::Duration;

    fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> CertFiles {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        CertFiles { cert, key }
    }

    fn tls(certs: Vec<CertFiles>) -> TlsConfig {
        TlsConfig {
            certs,
            client_ca: None,
            client_auth: ClientAuth::Required,
            handshake_timeout: Duration::from_secs(10),
            min_version: TlsVersion::Tls12,
            hsts: None,
            resumption: true,
            server: None,
        }
    }

    #[test]
    fn certificates_are_picked_by_exact_name_then_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.example.com"]);
        let w = write_cert(dir.path(), "w", &["*.example.com", "example.com"]);
        let store = CertStore::load(&tls(vec![a, w]), &provider()).unwrap();
        let a_key = store.pick(Some("a.example.com")).clone();
        let w_key = store.pick(Some("b.example.com")).clone();
        assert!(!Arc::ptr_eq(&a_key, &w_key));
        assert!(Arc::ptr_eq(store.pick(Some("A.Example.COM.")), &a_key));
        assert!(Arc::ptr_eq(store.pick(Some("example.com")), &w_key));
        // A wildcard covers one label only; unknown names and no name get the default (the first).
        assert!(Arc::ptr_eq(store.pick(Some("x.b.example.com")), &a_key));
        assert!(Arc::ptr_eq(store.pick(Some("other.org")), &a_key));
        assert!(Arc::ptr_eq(store.pick(None), &a_key));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.test"]);
        let b = write_cert(dir.path(), "b", &["b.test"]);
        let mixed = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let err = load(&tls(vec![mixed])).unwrap_err();
        assert_eq!(err.key, "key");
        assert!(err.message.contains("does not belong"), "{}", err.message);
        let err = load(&tls(vec![
            a.clone(),
            b.clone(),
            CertFiles {
                cert: a.key.clone(),
                key: a.key.clone(),
            },
        ]))
        .unwrap_err();
        assert_eq!(err.key, "certs[2].cert");
        assert!(err.message.contains("no certificate"), "{}", err.message);
        let err = load(&tls(vec![CertFiles {
            cert: dir.path().join("missing.pem"),
            key: a.key,
        }]))
        .unwrap_err();
        assert_eq!(err.key, "cert");
        assert!(err.message.contains("cannot read"), "{}", err.message);
        let err = load(&tls(vec![CertFiles {
            cert: b.cert,
            key: a.cert,
        }]))
        .unwrap_err();
        assert_eq!(err.key, "key");
        assert!(
            err.message.contains("no usable private key"),
            "{}",
            err.message
        );
    }
}
