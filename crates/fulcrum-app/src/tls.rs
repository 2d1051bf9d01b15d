//! TLS for the app: the certificate files, and the rustls server configuration
//! (ring provider, ALPN `h2` and `http/1.1`) built from them.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// ALPN protocol id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// ALPN protocol id of HTTP/1.1.
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The PEM files an app serves TLS with: `--tls cert.pem,key.pem`.
///
/// `cert` holds the certificate chain, leaf first; `key` the leaf's private key
/// (PKCS#8, PKCS#1 or SEC1). Both are read when the app starts
/// ([`crate::serve`], [`crate::spawn`]), so a missing or broken file fails the
/// start, not the first connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The certificate chain at `cert` with the private key at `key`.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
        }
    }

    /// Reads both files and builds the rustls server configuration the app
    /// uses: the ring crypto provider with its safe default protocol versions
    /// (TLS 1.2 and 1.3), no client authentication, and ALPN `h2` then
    /// `http/1.1`.
    ///
    /// Fails with the file's I/O error kind (e.g. [`io::ErrorKind::NotFound`])
    /// when a file cannot be read, and with [`io::ErrorKind::InvalidData`] when
    /// it holds no usable certificate or key, or the key does not match.
    pub fn server_config(&self) -> io::Result<Arc<ServerConfig>> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|err| pem_error(&self.cert, "certificate chain", err))?;
        if certs.is_empty() {
            return Err(invalid_data(format!(
                "{}: no PEM certificate found",
                self.cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|err| pem_error(&self.key, "private key", err))?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|err| invalid_data(format!("TLS setup failed: {err}")))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|err| {
                    invalid_data(format!(
                        "TLS certificate {} with key {}: {err}",
                        self.cert.display(),
                        self.key.display()
                    ))
                })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(Arc::new(config))
    }
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// An error reading `what` from the PEM file at `path`, keeping the I/O error
/// kind when there is one.
fn pem_error(path: &Path, what: &str, err: pem::Error) -> io::Error {
    let kind = match &err {
        pem::Error::Io(io) => io.kind(),
        _ => io::ErrorKind::InvalidData,
    };
    let reason = match err {
        pem::Error::NoItemsFound => "no PEM item of that kind found".to_owned(),
        err => err.to_string(),
    };
    io::Error::new(
        kind,
        format!("cannot read TLS {what} from {}: {reason}", path.display()),
    )
}

/// Shown as `CERT,KEY`, the form [`TlsFiles::from_str`] parses.
impl fmt::Display for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.cert.display(), self.key.display())
    }
}

/// Parses `CERT,KEY`: two non-empty paths separated by the first comma.
impl FromStr for TlsFiles {
    type Err = ParseTlsFilesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(',') {
            Some((cert, key)) if !cert.trim().is_empty() && !key.trim().is_empty() => {
                Ok(Self::new(cert.trim(), key.trim()))
            }
            _ => Err(ParseTlsFilesError(format!(
                "invalid TLS files {s:?}: expected CERT.pem,KEY.pem"
            ))),
        }
    }
}

/// Error returned when a `--tls` value is not `CERT,KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseTlsFilesError(String);

impl fmt::Display for ParseTlsFilesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseTlsFilesError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cert_and_key() {
        let files: TlsFiles = "certs/a.pem, keys/a.key".parse().unwrap();
        assert_eq!(files, TlsFiles::new("certs/a.pem", "keys/a.key"));
        assert_eq!(files.to_string(), "certs/a.pem,keys/a.key");
        for bad in ["", "cert.pem", "cert.pem,", ",key.pem", " , "] {
            assert!(bad.parse::<TlsFiles>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_files_keep_their_error_kind() {
        let dir = std::env::temp_dir().join("fulcrum-app-no-such-dir");
        let files = TlsFiles::new(dir.join("cert.pem"), dir.join("key.pem"));
        let err = files.server_config().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("cert.pem"), "{err}");
    }
}
