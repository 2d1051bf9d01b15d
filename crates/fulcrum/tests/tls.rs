//! TLS termination on `https` listeners, against certificates made by the tests: SNI picks the
//! certificate, ALPN picks HTTP/2, old protocol versions and bad client certificates are refused,
//! certificates rotate by reload under load without a failed request, and real clients (curl,
//! `openssl s_client`) agree.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use fulcrum::runtime::Running;
use http::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A config with one `https` listener `web` whose `tls` table is `tls`, over `servers`.
fn https_config(servers: &[(String, SocketAddr, u32)], tls: &str, pool_extra: &str) -> String {
    config("round_robin", servers, &format!("tls = {tls}"), pool_extra).replacen(
        "protocol = \"http\"",
        "protocol = \"https\"",
        1,
    )
}

fn stats(lb: &Running) -> Arc<fulcrum::listener::ListenerStats> {
    lb.shared().state().listeners[0]
        .http()
        .unwrap()
        .stats
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_alpn_picks_http2() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("fulcrum test CA");
    let default = ca.leaf(&["default.test"]);
    let exact = ca.leaf(&["a.test"]);
    let wild = ca.leaf(&["*.wild.test"]);
    let (d_cert, d_key) = default.write(dir.path(), "default");
    let (a_cert, a_key) = exact.write(dir.path(), "a");
    let (w_cert, w_key) = wild.write(dir.path(), "wild");
    let tls = format!(
        "{{ certs = [{{ cert = {d_cert:?}, key = {d_key:?} }}, {{ cert = {a_cert:?}, key = {a_key:?} }}, \
         {{ cert = {w_cert:?}, key = {w_key:?} }}], hsts = \"1d\" }}"
    );
    let lb = fulcrum(&https_config(
        &servers(&apps),
        &tls,
        "[pools.sticky]\nkind = \"cookie\"",
    ));
    let web = web(&lb);
    let both = connector(&[&ca], &[b"h2", b"http/1.1"], None, false);
    for (sni, want) in [
        ("a.test", &exact.der),
        ("x.wild.test", &wild.der),
        ("other.test", &default.der),
        ("deep.x.wild.test", &default.der),
    ] {
        // The client checks the name, so the default certificate only verifies for its own name.
        let check = connector(&[&ca], &[b"h2"], None, false);
        let client = if want == &default.der && sni != "default.test" {
            insecure_for_name_check(&ca)
        } else {
            check
        };
        let stream = connect(&client, web, sni).await.unwrap();
        assert_eq!(&peer_cert(&stream), want, "certificate for {sni}");
    }
    // ALPN h2: the answer comes over HTTP/2, with HSTS and a Secure sticky cookie; the server is told
    // the client came over https.
    let stream = connect(&both, web, "a.test").await.unwrap();
    assert_eq!(alpn(&stream).as_deref(), Some(&b"h2"[..]));
    let mut sender = Sender::over(stream).await.unwrap();
    let reply = sender.get("a.test", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .body
            .to_ascii_lowercase()
            .contains("x-forwarded-proto: https"),
        "{}",
        reply.body
    );
    assert_eq!(reply.headers["strict-transport-security"], "max-age=86400");
    let cookie = reply.headers["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    // ALPN http/1.1 only: HTTP/1.1.
    let h1 = connector(&[&ca], &[b"http/1.1"], None, false);
    let stream = connect(&h1, web, "a.test").await.unwrap();
    assert_eq!(alpn(&stream).as_deref(), Some(&b"http/1.1"[..]));
    let mut sender = Sender::over(stream).await.unwrap();
    assert_eq!(
        sender.get("a.test", "/").await.unwrap().status,
        StatusCode::OK
    );
    assert!(reaches(&lb, |s| s.tls_handshakes.load(Ordering::Relaxed), 2).await);
    stop(lb).await;
}

/// A client that checks the chain but accepts any name (to see which certificate a name gets).
fn insecure_for_name_check(ca: &Ca) -> tokio_rustls::TlsConnector {
    #[derive(Debug)]
    struct AnyName(Arc<dyn rustls::client::danger::ServerCertVerifier>);
    impl rustls::client::danger::ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            intermediates: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            ocsp: &[u8],
            now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            let name = rustls::pki_types::ServerName::try_from("default.test").unwrap();
            self.0
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyName(inner)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_verified_when_asked_for() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let stranger = Ca::new("another CA");
    let (cert, key) = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let client_ca = clients.write(dir.path(), "clients");
    let good = clients.leaf(&["client.test"]);
    let bad = stranger.leaf(&["client.test"]);
    for optional in [false, true] {
        let auth = if optional {
            ", client_auth = \"optional\""
        } else {
            ""
        };
        let tls = format!("{{ cert = {cert:?}, key = {key:?}, client_ca = {client_ca:?}{auth} }}");
        let lb = fulcrum(&https_config(&servers(&apps), &tls, ""));
        let web = web(&lb);
        let with_good = connector(&[&ca], &[b"http/1.1"], Some(&good), false);
        let with_bad = connector(&[&ca], &[b"http/1.1"], Some(&bad), false);
        let without = connector(&[&ca], &[b"http/1.1"], None, false);
        let reply = get_once(&with_good, web, "a.test", "/").await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            get_once(&with_bad, web, "a.test", "/").await.is_err(),
            "a certificate of an unknown CA was let in"
        );
        let anonymous = get_once(&without, web, "a.test", "/").await;
        if optional {
            assert_eq!(anonymous.unwrap().status, StatusCode::OK);
        } else {
            assert!(
                anonymous.is_err(),
                "a client without certificate was let in"
            );
        }
        // Counted once the server is done with the connection, which may be just after the client
        // saw it fail.
        assert!(failures_reach(&lb, 1).await);
        stop(lb).await;
    }
}

/// Waits (at most 10 s) for the listener's failed handshakes to reach `n`.
async fn failures_reach(lb: &Running, n: u64) -> bool {
    reaches(lb, |s| s.tls_handshake_failures.load(Ordering::Relaxed), n).await
}

/// Waits (at most 10 s) for a counter of the listener to reach `n` (the server counts a handshake
/// when it is done with it, which may be just after the client is).
async fn reaches(
    lb: &Running,
    counter: fn(&fulcrum::listener::ListenerStats) -> u64,
    n: u64,
) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if counter(&stats(lb)) >= n {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `openssl s_client` with `args` against `addr`; true when the handshake succeeded.
async fn s_client(addr: SocketAddr, ca: &Path, args: &[&str]) -> bool {
    let out = tokio::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg("a.test")
        .arg("-CAfile")
        .arg(ca)
        .arg("-verify_return_error")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("openssl s_client hung")
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("Verify return code: 0 (ok)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_agree_and_old_protocols_are_refused() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("fulcrum test CA");
    let ca_path = ca.write(dir.path(), "ca");
    let (cert, key) = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let tls = format!("{{ cert = {cert:?}, key = {key:?} }}");
    let lb = fulcrum(&https_config(&servers(&apps), &tls, ""));
    let web = web(&lb);
    // curl negotiates HTTP/2 by ALPN and gets the app's answer.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "20", "--cacert"])
        .arg(&ca_path)
        .arg("--resolve")
        .arg(format!("a.test:{}:127.0.0.1", web.port()))
        .arg(format!("https://a.test:{}/", web.port()))
        .args(["-w", "\nversion=%{http_version}"])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("server: A"), "{text}");
    assert!(text.ends_with("version=2"), "{text}");
    // openssl: TLS 1.3 and 1.2 are served; 1.1 and 1.0 are refused by the server (the client is
    // allowed to offer them: security level 0).
    assert!(s_client(web, &ca_path, &["-tls1_3"]).await);
    assert!(s_client(web, &ca_path, &["-tls1_2"]).await);
    let failures = stats(&lb).tls_handshake_failures.load(Ordering::Relaxed);
    for old in ["-tls1_1", "-tls1"] {
        assert!(
            !s_client(web, &ca_path, &[old, "-cipher", "DEFAULT:@SECLEVEL=0"]).await,
            "{old} was accepted"
        );
    }
    assert!(
        failures_reach(&lb, failures + 2).await,
        "the server did not see (and refuse) the old handshakes"
    );
    stop(lb).await;
    // min_version = "1.3" refuses 1.2.
    let tls = format!("{{ cert = {cert:?}, key = {key:?}, min_version = \"1.3\" }}");
    let lb = fulcrum(&https_config(&servers(&apps), &tls, ""));
    let only13 = common::web(&lb);
    assert!(s_client(only13, &ca_path, &["-tls1_3"]).await);
    assert!(!s_client(only13, &ca_path, &["-tls1_2"]).await);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_time_out_and_sessions_resume() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("fulcrum test CA");
    let (cert, key) = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let tls = format!("{{ cert = {cert:?}, key = {key:?}, handshake_timeout = \"1s\" }}");
    let lb = fulcrum(&https_config(&servers(&apps), &tls, ""));
    let web = web(&lb);
    // A client that connects and says nothing is closed after the handshake timeout.
    let mut silent = TcpStream::connect(web).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a silent client kept its connection");
    assert!(failures_reach(&lb, 1).await);
    // The same client connecting again resumes its session (TLS 1.3 tickets; TLS 1.2 tickets).
    for tls12 in [false, true] {
        let client = connector(&[&ca], &[b"http/1.1"], None, tls12);
        let resumed_before = stats(&lb).tls_resumed.load(Ordering::Relaxed);
        for _ in 0..2 {
            let reply = get_once(&client, web, "a.test", "/").await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
        }
        let stream = connect(&client, web, "a.test").await.unwrap();
        assert_eq!(
            stream.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "tls1.2 only: {tls12}"
        );
        drop(stream);
        assert!(
            reaches(
                &lb,
                |s| s.tls_resumed.load(Ordering::Relaxed),
                resumed_before + 1
            )
            .await
        );
    }
    stop(lb).await;
    // resumption = false: every connection is a full handshake.
    let tls = format!("{{ cert = {cert:?}, key = {key:?}, resumption = false }}");
    let lb = fulcrum(&https_config(&servers(&apps), &tls, ""));
    let web = common::web(&lb);
    for tls12 in [false, true] {
        let client = connector(&[&ca], &[b"http/1.1"], None, tls12);
        for _ in 0..3 {
            let stream = connect(&client, web, "a.test").await.unwrap();
            assert_eq!(
                stream.get_ref().1.handshake_kind(),
                Some(rustls::HandshakeKind::Full),
                "tls1.2 only: {tls12}"
            );
        }
    }
    assert_eq!(stats(&lb).tls_resumed.load(Ordering::Relaxed), 0);
    stop(lb).await;
}

/// The certificate a new client (one that has no session to resume) gets.
async fn served_cert(ca: &Ca, web: SocketAddr) -> rustls::pki_types::CertificateDer<'static> {
    let client = connector(&[ca], &[b"http/1.1"], None, false);
    let stream = connect(&client, web, "a.test").await.unwrap();
    peer_cert(&stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_by_reload_under_load_without_a_failed_request() {
    let apps = apps(&["A", "B"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("fulcrum test CA");
    let first = ca.leaf(&["a.test"]);
    let second = ca.leaf(&["a.test"]);
    let (cert, key) = first.write(dir.path(), "a");
    let tls = format!("{{ cert = {cert:?}, key = {key:?} }}");
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, https_config(&servers(&apps), &tls, "")).unwrap();
    let lb = fulcrum_file(&path);
    let web = web(&lb);
    let client = connector(&[&ca], &[b"h2", b"http/1.1"], None, false);

    // Load: one keep-alive HTTP/2 connection, and a new connection per request; bounded in count
    // and time, stopped once the rotation has been checked.
    let done = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for fresh in [false, true] {
        let (client, done, ok, failed) = (client.clone(), done.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut kept = None;
            for _ in 0..20_000 {
                if done.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let result = if fresh {
                    get_once(&client, web, "a.test", "/").await
                } else {
                    if kept.is_none() {
                        let stream = connect(&client, web, "a.test").await.unwrap();
                        kept = Some(Sender::over(stream).await.unwrap());
                    }
                    let sender = kept.as_mut().unwrap();
                    sender
                        .get("a.test", "/")
                        .await
                        .map_err(|e| format!("keep-alive: {e}"))
                };
                match result {
                    Ok(r) if r.status == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed.lock().unwrap().push(format!("status {}", r.status)),
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        }));
    }
    let wait_for = |n: u64| {
        let ok = ok.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(30);
            while ok.load(Ordering::Relaxed) < n && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(50).await;
    assert_eq!(served_cert(&ca, web).await, first.der);
    // Rotate: the new files are read at reload; new handshakes get the new certificate.
    second.write(dir.path(), "a");
    let reload = tokio::task::block_in_place(|| lb.reload());
    assert!(reload.is_ok(), "{reload:?}");
    assert_eq!(served_cert(&ca, web).await, second.der);
    let after_rotation = ok.load(Ordering::Relaxed);
    wait_for(after_rotation + 50).await;
    // A key that does not match: the reload is refused, and the running certificate stays.
    std::fs::write(dir.path().join("a.key"), &first.key_pem).unwrap();
    let refused = tokio::task::block_in_place(|| lb.reload());
    let why = format!("{:?}", refused.expect_err("a mismatched key was loaded"));
    assert!(
        why.contains("tls.key") && why.contains("does not belong"),
        "{why}"
    );
    assert_eq!(served_cert(&ca, web).await, second.der);
    wait_for(ok.load(Ordering::Relaxed) + 20).await;
    done.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    let served = ok.load(Ordering::Relaxed);
    eprintln!(
        "rotation under load: {served} requests served, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        served > after_rotation,
        "no request was served after the rotation"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_can_redirect_to_https() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "https_redirect = 8443",
        "",
    ));
    let web = web(&lb);
    let req = http::Request::get(format!("http://{web}/login?next=%2Fhome"))
        .header("host", "shop.test")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        reply.headers["location"],
        "https://shop.test:8443/login?next=%2Fhome"
    );
    stop(lb).await;
}
