//! Reading a TLS ClientHello's server name (SNI) without terminating TLS, to route TLS passthrough
//! connections by name.
//!
//! [`read_client_hello`] reads the client's first bytes into a buffer and hands copies of them to
//! rustls' [`Acceptor`], which parses and checks the ClientHello (also when it spans several records);
//! the bytes themselves are returned unchanged ([`Hello::bytes`]) for the caller to forward to the
//! server, which then does the handshake with the client as if nothing stood between them.
//!
//! The read is bounded in time and size, and refuses fast: a first byte that is not a TLS handshake
//! record is refused at once, and so is a handshake record whose header announces more bytes than the
//! limit allows (without waiting for them).

use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The TLS record content type of handshake messages.
const HANDSHAKE: u8 = 0x16;
/// A TLS record header: content type, protocol version, length.
const RECORD_HEADER: usize = 5;
/// The most bytes one read asks for (a ClientHello is usually one small record).
const READ_SIZE: usize = 4096;

/// A ClientHello read from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server name the client asked for, lowercased (rustls' reading of the `server_name`
    /// extension); `None` when the client sent none, or sent an IP address, which RFC 6066 does not
    /// allow there.
    pub server_name: Option<String>,
    /// Every byte read from the connection, unchanged: the ClientHello and anything that came with
    /// it. To be forwarded to the server before the rest of the stream.
    pub bytes: Vec<u8>,
}

/// Why no ClientHello could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// The client did not send a complete ClientHello within the timeout.
    #[error("the TLS ClientHello did not arrive in time")]
    Timeout,
    /// The connection ended (or reading it failed, e.g. reset) before the ClientHello was complete.
    #[error("the connection closed before the TLS ClientHello was complete")]
    Closed,
    /// The client does not speak TLS: its first record is not a TLS handshake record.
    #[error("not TLS: the connection does not start with a TLS handshake record")]
    NotTls,
    /// The ClientHello (with the records carrying it) would be larger than the limit.
    #[error("the TLS ClientHello is larger than the limit")]
    TooLarge,
    /// The bytes are TLS records but not a valid ClientHello (rustls' reason).
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(String),
}

/// Reads the TLS ClientHello at the start of `stream` within `timeout`, reading at most `max` bytes,
/// and returns its server name and the bytes read.
///
/// It reads into its own buffer (never peeks), hands each new byte to a rustls [`Acceptor`] once, and
/// returns as soon as the Acceptor has the whole ClientHello. Bytes that come with the ClientHello are
/// kept in [`Hello::bytes`] too. Refused: a first byte that is not a handshake record or a second that
/// is not TLS' major version 3 ([`SniError::NotTls`]), a handshake record that would end past `max`
/// or no complete ClientHello within `max` bytes ([`SniError::TooLarge`]), anything rustls rejects
/// ([`SniError::Malformed`]: e.g. a record of another type before the ClientHello is complete, or a
/// `server_name` extension that is not one valid DNS name).
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
    max: usize,
) -> Result<Hello, SniError> {
    tokio::time::timeout(timeout, read_hello(stream, max))
        .await
        .unwrap_or(Err(SniError::Timeout))
}

async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> Result<Hello, SniError> {
    let mut acceptor = Acceptor::default();
    let mut buf = Vec::with_capacity(max.min(READ_SIZE));
    // Bytes handed to the Acceptor so far.
    let mut fed = 0;
    // Where the next record header not yet checked starts.
    let mut next_record = 0;
    loop {
        if buf.len() >= max {
            return Err(SniError::TooLarge);
        }
        let start = buf.len();
        buf.resize(start + (max - start).min(READ_SIZE), 0);
        let n = match stream.read(&mut buf[start..]).await {
            Ok(0) | Err(_) => return Err(SniError::Closed),
            Ok(n) => n,
        };
        buf.truncate(start + n);

        if buf[0] != HANDSHAKE || buf.get(1).is_some_and(|&major| major != 3) {
            return Err(SniError::NotTls);
        }
        // Handshake records announcing more than `max` allows: refused before their bytes arrive
        // (rustls would wait for them, or reject an oversized record as malformed).
        while let Some(header) = buf.get(next_record..next_record + RECORD_HEADER) {
            if header[0] != HANDSHAKE {
                // Not part of the ClientHello: rustls decides (it is either after a complete
                // ClientHello, or an error).
                break;
            }
            next_record += RECORD_HEADER + usize::from(u16::from_be_bytes([header[3], header[4]]));
            if next_record > max {
                return Err(SniError::TooLarge);
            }
        }

        while fed < buf.len() {
            match acceptor.read_tls(&mut &buf[fed..]) {
                Ok(0) => return Err(SniError::Malformed("rustls took no bytes".into())),
                Ok(n) => fed += n,
                Err(e) => return Err(SniError::Malformed(e.to_string())),
            }
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let server_name = accepted.client_hello().server_name().map(str::to_owned);
                return Ok(Hello {
                    server_name,
                    bytes: buf,
                });
            }
            // The alert is not sent: the caller just closes the connection.
            Err((e, _alert)) => return Err(SniError::Malformed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
    use tokio::io::{AsyncWriteExt, DuplexStream};

    const TIMEOUT: Duration = Duration::from_secs(5);
    const MAX: usize = 16 * 1024;

    fn client_config(roots: RootCertStore) -> ClientConfig {
        ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// The bytes a rustls client sends first (its ClientHello) when connecting to `name`.
    fn client_hello(config: ClientConfig, name: &str) -> Vec<u8> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// A client config whose ClientHello is about 2 KB and spans several records, like one with
    /// post-quantum key shares: many ALPN protocols, records of at most 512 bytes.
    fn big_client_config(roots: RootCertStore) -> ClientConfig {
        let mut config = client_config(roots);
        config.alpn_protocols = (0..30)
            .map(|i| format!("protocol-{i:02}-{}", "x".repeat(48)).into_bytes())
            .collect();
        config.max_fragment_size = Some(512);
        config
    }

    /// A stream that yields `bytes` and then stays open (the writer is returned to keep it so).
    async fn open_with(bytes: &[u8]) -> (DuplexStream, DuplexStream) {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        w.write_all(bytes).await.unwrap();
        (w, r)
    }

    /// The server name a fresh Acceptor finds in `bytes`.
    fn name_in(bytes: &[u8]) -> Option<String> {
        let mut acceptor = Acceptor::default();
        let mut rd = bytes;
        while !rd.is_empty() {
            acceptor.read_tls(&mut rd).unwrap();
        }
        let accepted = acceptor.accept().unwrap().unwrap();
        accepted.client_hello().server_name().map(str::to_owned)
    }

    fn records(bytes: &[u8]) -> usize {
        let mut at = 0;
        let mut n = 0;
        while at + RECORD_HEADER <= bytes.len() {
            at += RECORD_HEADER + usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
            n += 1;
        }
        assert_eq!(at, bytes.len());
        n
    }

    #[tokio::test]
    async fn a_real_client_s_server_name_and_exact_bytes() {
        let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(RootCertStore::empty())));
        let client = tokio::spawn(async move {
            let name = ServerName::try_from("a.example.com").unwrap();
            // Never completes: nothing answers.
            let _ = connector.connect(name, client_io).await;
        });
        let hello = read_client_hello(&mut server_io, TIMEOUT, MAX)
            .await
            .unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("a.example.com"));
        assert_eq!(&hello.bytes[..2], &[0x16, 0x03]);
        assert_eq!(name_in(&hello.bytes).as_deref(), Some("a.example.com"));
        client.abort();
    }

    #[tokio::test]
    async fn the_bytes_are_exactly_the_client_s() {
        let sent = client_hello(client_config(RootCertStore::empty()), "a.example.com");
        let (_w, mut r) = open_with(&sent).await;
        let hello = read_client_hello(&mut r, TIMEOUT, MAX).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("a.example.com"));
        assert_eq!(hello.bytes, sent);
        // What came with the ClientHello is kept as well.
        let mut more = sent.clone();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        let (_w, mut r) = open_with(&more).await;
        let hello = read_client_hello(&mut r, TIMEOUT, MAX).await.unwrap();
        assert_eq!(hello.bytes, more);
    }

    #[tokio::test]
    async fn the_name_is_lowercased() {
        let sent = client_hello(client_config(RootCertStore::empty()), "A.Example.COM");
        let (_w, mut r) = open_with(&sent).await;
        let hello = read_client_hello(&mut r, TIMEOUT, MAX).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("a.example.com"));
    }

    #[tokio::test]
    async fn a_client_without_sni_gives_no_name() {
        // rustls sends no server_name extension when connecting to an IP address.
        let sent = client_hello(client_config(RootCertStore::empty()), "192.0.2.1");
        let (_w, mut r) = open_with(&sent).await;
        let hello = read_client_hello(&mut r, TIMEOUT, MAX).await.unwrap();
        assert_eq!(hello.server_name, None);
        assert_eq!(hello.bytes, sent);
    }

    #[tokio::test]
    async fn a_large_hello_over_several_records_and_reads() {
        let sent = client_hello(big_client_config(RootCertStore::empty()), "a.example.com");
        assert!(sent.len() > 1800, "{} bytes", sent.len());
        assert!(records(&sent) >= 4, "{} records", records(&sent));
        // Delivered in small pieces: every read sees at most 100 bytes.
        let (mut w, mut r) = tokio::io::duplex(100);
        let wire = sent.clone();
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(37) {
                w.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            w
        });
        let hello = read_client_hello(&mut r, TIMEOUT, MAX).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("a.example.com"));
        assert_eq!(hello.bytes, sent);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_are_refused_at_once() {
        for not_tls in [
            &b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n"[..],
            b"G",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            // An SSLv2-style hello.
            b"\x80\x2e\x01\x00\x02",
            // Handshake type, but not TLS' version.
            b"\x16\x01\x00",
        ] {
            // The stream stays open: the refusal must not wait for more bytes.
            let (_w, mut r) = open_with(not_tls).await;
            assert_eq!(
                read_client_hello(&mut r, TIMEOUT, MAX).await,
                Err(SniError::NotTls),
                "{:?}",
                String::from_utf8_lossy(not_tls)
            );
        }
    }

    #[tokio::test]
    async fn a_record_announcing_more_than_the_limit_is_too_large() {
        // A handshake record header claiming 20 KB, a few bytes of it, then nothing.
        let mut wire = vec![0x16, 0x03, 0x01, 0x50, 0x00];
        wire.extend_from_slice(&[0x01, 0x00, 0x4f, 0xfc, 0x03, 0x03]);
        let (_w, mut r) = open_with(&wire).await;
        assert_eq!(
            read_client_hello(&mut r, TIMEOUT, MAX).await,
            Err(SniError::TooLarge)
        );
        // A real hello larger than a small limit.
        let sent = client_hello(big_client_config(RootCertStore::empty()), "a.example.com");
        let (_w, mut r) = open_with(&sent).await;
        assert_eq!(
            read_client_hello(&mut r, TIMEOUT, 1024).await,
            Err(SniError::TooLarge)
        );
        // Exactly at the limit is fine.
        let (_w, mut r) = open_with(&sent).await;
        let hello = read_client_hello(&mut r, TIMEOUT, sent.len())
            .await
            .unwrap();
        assert_eq!(hello.bytes, sent);
    }

    #[tokio::test]
    async fn tls_records_that_are_no_client_hello_are_malformed() {
        for bad in [
            // A ServerHello where a ClientHello belongs.
            &b"\x16\x03\x03\x00\x08\x02\x00\x00\x04\x03\x03\x00\x00"[..],
            // A ClientHello whose body is garbage.
            b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff",
            // An empty handshake record.
            b"\x16\x03\x01\x00\x00",
            // A complete ClientHello header announcing a body larger than its record, then an alert.
            b"\x16\x03\x01\x00\x05\x01\x00\x00\x40\x03\x15\x03\x03\x00\x02\x02\x28",
        ] {
            let (_w, mut r) = open_with(bad).await;
            match read_client_hello(&mut r, TIMEOUT, MAX).await {
                Err(SniError::Malformed(_)) => {}
                other => panic!("{bad:x?}: {other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_client_times_out() {
        let sent = client_hello(client_config(RootCertStore::empty()), "a.example.com");
        for cut in [0, 3, sent.len() / 2] {
            let (_w, mut r) = open_with(&sent[..cut]).await;
            let started = tokio::time::Instant::now();
            assert_eq!(
                read_client_hello(&mut r, TIMEOUT, MAX).await,
                Err(SniError::Timeout)
            );
            let waited = started.elapsed();
            assert!(waited >= TIMEOUT && waited < TIMEOUT + Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn a_client_that_closes_early_is_closed() {
        let sent = client_hello(client_config(RootCertStore::empty()), "a.example.com");
        for cut in [0, 3, 5, sent.len() - 1] {
            let (w, mut r) = open_with(&sent[..cut]).await;
            drop(w);
            assert_eq!(
                read_client_hello(&mut r, TIMEOUT, MAX).await,
                Err(SniError::Closed),
                "cut at {cut}"
            );
        }
    }

    /// The whole path of a passthrough connection: a client, a middle that reads the hello and then
    /// relays bytes, a TLS server. The handshake completing proves the hello reached the server as the
    /// client sent it (its transcript hash covers every byte).
    #[tokio::test]
    async fn forwarded_hello_lets_the_real_handshake_complete() {
        let ck = rcgen::generate_simple_self_signed(vec!["a.example.com".into()]).unwrap();
        let cert: CertificateDer<'static> = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let server_config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();

        for config in [client_config(roots.clone()), big_client_config(roots)] {
            let (client_io, mut front) = tokio::io::duplex(64 * 1024);
            let (mut back, server_io) = tokio::io::duplex(64 * 1024);

            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config.clone()));
            let server = tokio::spawn(async move {
                let mut tls = acceptor.accept(server_io).await.unwrap();
                let mut ping = [0u8; 4];
                tls.read_exact(&mut ping).await.unwrap();
                assert_eq!(&ping, b"ping");
                tls.write_all(b"pong").await.unwrap();
                tls.shutdown().await.unwrap();
            });
            let middle = tokio::spawn(async move {
                let hello = read_client_hello(&mut front, TIMEOUT, MAX).await.unwrap();
                back.write_all(&hello.bytes).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
                hello.server_name
            });

            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let name = ServerName::try_from("a.example.com").unwrap();
            let mut tls = connector.connect(name, client_io).await.unwrap();
            tls.write_all(b"ping").await.unwrap();
            let mut pong = Vec::new();
            tls.read_to_end(&mut pong).await.unwrap();
            assert_eq!(pong, b"pong");
            server.await.unwrap();
            drop(tls);
            assert_eq!(middle.await.unwrap().as_deref(), Some("a.example.com"));
        }
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            SniError::Malformed("bad".into()).to_string(),
            "malformed TLS ClientHello: bad"
        );
        assert_eq!(
            SniError::TooLarge.to_string(),
            "the TLS ClientHello is larger than the limit"
        );
    }
}
