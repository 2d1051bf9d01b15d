//! gRPC: the `kind = "grpc"` health check against real tonic servers (`grpc.health.v1`), and the
//! self-test of the gRPC test kit (`common/grpc.rs`) that later proxy tests build on.

mod common;
#[path = "common/grpc.rs"]
mod grpc;

use std::time::{Duration, Instant};

use fulcrum::runtime::Running;
use grpc::{EchoReply, EchoRequest};
use tonic::Code;

/// How long a state change may take on a loaded machine (checks run every 100 ms).
const LIMIT: Duration = Duration::from_secs(10);

/// A pool `name` of one server `A` at `addr` with a gRPC check (`extra`: more check keys).
fn grpc_pool(name: &str, addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\nservers = [{{ name = \"A\", address = \"{addr}\" }}]\n\n\
         [pools.health_check]\nkind = \"grpc\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nrise = 1\nfall = 1\n{extra}\n\n"
    )
}

/// A balancer whose listener `web` sends to the first of `pools`.
fn balancer(pools: &[String]) -> Running {
    let first = pools[0]
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    common::fulcrum(&format!(
        "shutdown_timeout = \"5s\"\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"{first}\"\n\n{}",
        pools.concat()
    ))
}

/// (state, last check's message) of server `A` of `pool`.
fn state(lb: &Running, pool: &str) -> (&'static str, String) {
    let snap = lb.shared().pool(pool).expect("pool").snapshot_full();
    let server = snap.servers.iter().find(|s| s.name == "A").expect("A");
    let message = server
        .health
        .last_check()
        .map(|c| c.message)
        .unwrap_or_default();
    (server.effective_state().as_str(), message)
}

/// Waits (at most [`LIMIT`]) until server `A` of `pool` is `want` after a check that said `seen`.
async fn wait_for(lb: &Running, pool: &str, want: &str, seen: &str) {
    let started = Instant::now();
    loop {
        let (now, message) = state(lb, pool);
        if now == want && message.contains(seen) {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "pool {pool}: A is {now} (last check: {message:?}), not {want} after {seen:?} within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_check_follows_the_serving_status() {
    let server = grpc::spawn_echo("A").await;
    let lb = balancer(&[grpc_pool("p", server.addr, "initial_state = \"down\"")]);
    // Down until a check has said SERVING.
    wait_for(&lb, "p", "up", "gRPC SERVING").await;

    server.set_health(false).await;
    wait_for(&lb, "p", "down", "gRPC NOT_SERVING").await;

    server.set_health(true).await;
    wait_for(&lb, "p", "up", "gRPC SERVING").await;
    common::stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_check_asks_about_its_service() {
    let server = grpc::spawn_echo("A").await;
    let app = common::apps(&["H"]).await;
    let raw = common::raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", true).await;
    let lb = balancer(&[
        grpc_pool("known", server.addr, "service = \"echo.Echo\""),
        grpc_pool("unknown", server.addr, "service = \"no.such.Service\""),
        // An HTTP server (that also speaks h2c) is no gRPC server: it answers 404.
        grpc_pool("not_grpc", app[0].addr(), ""),
        // A server that speaks HTTP/1.1 only fails the HTTP/2 exchange.
        grpc_pool("http1", raw.addr, ""),
    ]);
    wait_for(
        &lb,
        "unknown",
        "down",
        "grpc-status 5: service not registered",
    )
    .await;
    wait_for(&lb, "not_grpc", "down", "HTTP 404").await;
    wait_for(&lb, "http1", "down", "").await;
    // The known service is checked on its own: NOT_SERVING for it, SERVING for the whole server.
    server.set_service_health(grpc::SERVICE, false).await;
    wait_for(&lb, "known", "down", "gRPC NOT_SERVING").await;
    server.set_service_health(grpc::SERVICE, true).await;
    wait_for(&lb, "known", "up", "gRPC SERVING").await;
    let (_, message) = state(&lb, "http1");
    eprintln!("a gRPC check of an HTTP/1.1-only server: {message}");
    assert!(
        !message.is_empty() && !message.contains("SERVING"),
        "{message}"
    );
    common::stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_grpc_server_is_marked_down() {
    let server = grpc::spawn_echo("A").await;
    let lb = balancer(&[grpc_pool("p", server.addr, "initial_state = \"down\"")]);
    wait_for(&lb, "p", "up", "gRPC SERVING").await;
    drop(server);
    wait_for(&lb, "p", "down", "").await;
    common::stop(lb).await;
}

// ---- the gRPC test kit itself ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_kit_answers_unary_streaming_and_bidi_calls() {
    let server = grpc::spawn_echo("E1").await;
    let mut client = grpc::client(server.addr).await;

    let reply = client.unary(EchoRequest::new("hello")).await.unwrap();
    assert_eq!(reply.metadata().get("x-server").unwrap(), "E1");
    assert_eq!(
        reply.into_inner(),
        EchoReply {
            message: "hello".into(),
            server_name: "E1".into(),
            index: 0
        }
    );

    let request = EchoRequest {
        count: 5,
        ..EchoRequest::new("tick")
    };
    let mut stream = client.server_stream(request).await.unwrap();
    assert_eq!(stream.metadata().get("x-server").unwrap(), "E1");
    let (replies, end) = grpc::collect(stream.get_mut()).await;
    end.unwrap();
    assert_eq!(
        replies.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert!(replies
        .iter()
        .all(|r| r.message == "tick" && r.server_name == "E1"));

    let requests = ["a", "b", "c"].map(EchoRequest::new);
    let mut stream = client
        .bidi(tonic::codegen::tokio_stream::iter(requests))
        .await
        .unwrap();
    assert_eq!(stream.metadata().get("x-server").unwrap(), "E1");
    let (replies, end) = grpc::collect(stream.get_mut()).await;
    end.unwrap();
    let echoed: Vec<_> = replies.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(echoed, ["a", "b", "c"]);

    // Bidi is interactive: each reply arrives before the next request is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut stream = client
        .bidi(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await
        .unwrap()
        .into_inner();
    for word in ["x", "y", "z"] {
        tx.send(EchoRequest::new(word)).await.unwrap();
        let reply = tokio::time::timeout(LIMIT, stream.message())
            .await
            .expect("reply in time")
            .unwrap()
            .unwrap();
        assert_eq!(reply.message, word);
    }
    drop(tx);
    assert!(stream.message().await.unwrap().is_none());

    assert_eq!(server.requests(), 4);
    assert!(
        server.all_had_te_trailers(),
        "{:?}",
        server.request_headers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_kit_fails_on_request_with_code_and_trailer() {
    let server = grpc::spawn_echo("E2").await;
    let mut client = grpc::client(server.addr).await;

    // Unary: a trailers-only answer.
    let request = EchoRequest {
        fail_code: Code::FailedPrecondition as i32,
        ..EchoRequest::new("boom")
    };
    let status = client.unary(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "requested failure");
    assert_eq!(status.metadata().get("x-detail").unwrap(), "why");
    assert_eq!(status.metadata().get("x-server").unwrap(), "E2");

    // A stream: two replies, then the status and `x-detail` in the trailers.
    let request = EchoRequest {
        count: 2,
        fail_code: Code::ResourceExhausted as i32,
        ..EchoRequest::new("boom")
    };
    let mut stream = client.server_stream(request).await.unwrap();
    assert_eq!(stream.metadata().get("x-server").unwrap(), "E2");
    let (replies, end) = grpc::collect(stream.get_mut()).await;
    assert_eq!(replies.len(), 2);
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "requested failure");
    assert_eq!(status.metadata().get("x-detail").unwrap(), "why");

    // Bidi: the failing request ends the stream.
    let requests = vec![
        EchoRequest::new("ok"),
        EchoRequest {
            fail_code: Code::Aborted as i32,
            ..EchoRequest::new("boom")
        },
        EchoRequest::new("never"),
    ];
    let mut stream = client
        .bidi(tonic::codegen::tokio_stream::iter(requests))
        .await
        .unwrap();
    let (replies, end) = grpc::collect(stream.get_mut()).await;
    assert_eq!(replies.len(), 1);
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.metadata().get("x-detail").unwrap(), "why");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_kit_sends_deadlines() {
    let server = grpc::spawn_echo("E3").await;
    let mut client = grpc::client(server.addr).await;
    let mut request = tonic::Request::new(EchoRequest {
        delay_ms: 2000,
        ..EchoRequest::new("slow")
    });
    request.set_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let status = client.unary(request).await.unwrap_err();
    let took = started.elapsed();
    eprintln!("deadline: {status:?} after {took:?}");
    // tonic enforces `grpc-timeout` itself, on both sides (the client's timer fires first), and
    // calls an expired one CANCELLED, "Timeout expired" — not DEADLINE_EXCEEDED, gRPC's name for it.
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired");
    assert!(took < Duration::from_millis(1900), "took {took:?}");
    let headers = server.request_headers();
    let timeout = headers[0].get("grpc-timeout").expect("grpc-timeout sent");
    assert_eq!(timeout, "200000u");
    // A deadline that is long enough is no failure.
    let mut request = tonic::Request::new(EchoRequest {
        delay_ms: 50,
        ..EchoRequest::new("fast")
    });
    request.set_timeout(LIMIT);
    assert_eq!(
        client.unary(request).await.unwrap().into_inner().message,
        "fast"
    );
}
