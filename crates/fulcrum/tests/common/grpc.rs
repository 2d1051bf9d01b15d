//! gRPC test kit: an `echo.Echo` service (tonic, hand-written messages, no protoc) and its client.
//!
//! The service, on plain-text HTTP/2 (h2c), answers:
//!
//! * `Unary(EchoRequest) -> EchoReply`: echoes `message` after `delay_ms`;
//! * `ServerStream(EchoRequest) -> stream EchoReply`: `count` replies (`index` 0, 1, …), `delay_ms`
//!   before each;
//! * `Bidi(stream EchoRequest) -> stream EchoReply`: one reply per request, as each arrives.
//!
//! A request with `fail_code != 0` fails with `Status::new(fail_code, "requested failure")` and the
//! metadata `x-detail: why` (a unary call: a trailers-only answer; a stream: in the trailers, after the
//! `count` replies). Every answer carries `x-server: NAME` in its headers. The server records the
//! headers of every call (so tests can see `te: trailers`, `grpc-timeout`, forwarded headers, …), and
//! also serves `grpc.health.v1.Health` (`health`; `""` and `echo.Echo` start `SERVING`).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use tonic::codegen::{Body, BoxFuture, BoxStream, Context, Poll, Service, StdError};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Code, IntoRequest, IntoStreamingRequest, Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;
use tonic_prost::ProstCodec;

/// The service's name (the health check's `service` for it).
pub const SERVICE: &str = "echo.Echo";

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    /// The server waits this long before answering (before each reply of a stream).
    #[prost(uint64, tag = "2")]
    pub delay_ms: u64,
    /// Not 0: the call fails with this gRPC status code.
    #[prost(int32, tag = "3")]
    pub fail_code: i32,
    /// `ServerStream`: how many replies.
    #[prost(uint32, tag = "4")]
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub server_name: String,
    /// The reply's position in its stream (0 for unary calls).
    #[prost(uint32, tag = "3")]
    pub index: u32,
}

impl EchoRequest {
    /// A request that echoes `message`.
    pub fn new(message: &str) -> Self {
        EchoRequest {
            message: message.to_owned(),
            ..Default::default()
        }
    }
}

/// A running echo server; it shuts down when dropped.
pub struct GrpcServer {
    pub addr: SocketAddr,
    pub name: String,
    /// Sets what `grpc.health.v1.Health/Check` answers.
    pub health: HealthReporter,
    state: Arc<State>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl GrpcServer {
    /// The request headers of every call so far (any method, in arrival order).
    pub fn request_headers(&self) -> Vec<HeaderMap> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Calls of `echo.Echo` so far.
    pub fn requests(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// True when every call so far arrived with `te: trailers` (as gRPC requires).
    pub fn all_had_te_trailers(&self) -> bool {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|h| h.get("te").is_some_and(|v| v == "trailers"))
    }

    /// Sets the health of the whole server (`service = ""`).
    pub async fn set_health(&self, serving: bool) {
        self.set_service_health("", serving).await;
    }

    /// Sets the health of one service.
    pub async fn set_service_health(&self, service: &str, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health.set_service_status(service, status).await;
    }
}

struct State {
    name: String,
    seen: Mutex<Vec<HeaderMap>>,
}

/// Starts an echo server named `name` on 127.0.0.1 (a free port).
pub async fn spawn_echo(name: &str) -> GrpcServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gRPC server");
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(State {
        name: name.to_owned(),
        seen: Mutex::new(Vec::new()),
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let echo = EchoServer {
        state: state.clone(),
    };
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(echo)
            .add_service(health_service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        if let Err(e) = result {
            eprintln!("gRPC server: {e}");
        }
    });
    GrpcServer {
        addr,
        name: name.to_owned(),
        health,
        state,
        _shutdown: shutdown,
    }
}

/// The `echo.Echo` server side.
#[derive(Clone)]
struct EchoServer {
    state: Arc<State>,
}

impl NamedService for EchoServer {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for EchoServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.state.seen.lock().unwrap().push(req.headers().clone());
        let state = self.state.clone();
        match req.uri().path() {
            "/echo.Echo/Unary" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(UnarySvc(state), req).await)
            }),
            "/echo.Echo/ServerStream" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.server_streaming(ServerStreamSvc(state), req).await)
            }),
            "/echo.Echo/Bidi" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.streaming(BidiSvc(state), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// `Status::new(code, "requested failure")` with `x-detail: why` (and `x-server`).
fn failure(code: i32, server: &str) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert("x-detail", MetadataValue::from_static("why"));
    metadata.insert("x-server", server.parse().unwrap());
    Status::with_metadata(Code::from_i32(code), "requested failure", metadata)
}

fn with_server<T>(message: T, server: &str) -> Response<T> {
    let mut response = Response::new(message);
    response
        .metadata_mut()
        .insert("x-server", server.parse().unwrap());
    response
}

async fn delay(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

struct UnarySvc(Arc<State>);

impl tonic::server::UnaryService<EchoRequest> for UnarySvc {
    type Response = EchoReply;
    type Future = BoxFuture<Response<EchoReply>, Status>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let request = request.into_inner();
            delay(request.delay_ms).await;
            if request.fail_code != 0 {
                return Err(failure(request.fail_code, &state.name));
            }
            let reply = EchoReply {
                message: request.message,
                server_name: state.name.clone(),
                index: 0,
            };
            Ok(with_server(reply, &state.name))
        })
    }
}

struct ServerStreamSvc(Arc<State>);

impl tonic::server::ServerStreamingService<EchoRequest> for ServerStreamSvc {
    type Response = EchoReply;
    type ResponseStream = BoxStream<EchoReply>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let request = request.into_inner();
            let name = state.name.clone();
            // (next index, failure sent) → the replies, then the failure if one was asked for.
            let replies = futures_util::stream::unfold((0u32, false), move |(i, done)| {
                let request = request.clone();
                let name = name.clone();
                async move {
                    if done {
                        return None;
                    }
                    if i >= request.count {
                        return (request.fail_code != 0)
                            .then(|| (Err(failure(request.fail_code, &name)), (i, true)));
                    }
                    delay(request.delay_ms).await;
                    let reply = EchoReply {
                        message: request.message,
                        server_name: name,
                        index: i,
                    };
                    Some((Ok(reply), (i + 1, false)))
                }
            });
            let replies: Self::ResponseStream = Box::pin(replies);
            Ok(with_server(replies, &state.name))
        })
    }
}

struct BidiSvc(Arc<State>);

impl tonic::server::StreamingService<EchoRequest> for BidiSvc {
    type Response = EchoReply;
    type ResponseStream = BoxStream<EchoReply>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<EchoRequest>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let incoming = request.into_inner();
            let name = state.name.clone();
            // (requests, next index, ended) → one reply per request; a failure ends the stream.
            let replies = futures_util::stream::unfold(
                (incoming, 0u32, false),
                move |(mut incoming, i, ended)| {
                    let name = name.clone();
                    async move {
                        if ended {
                            return None;
                        }
                        match incoming.message().await {
                            Ok(Some(request)) => {
                                delay(request.delay_ms).await;
                                if request.fail_code != 0 {
                                    let failed = failure(request.fail_code, &name);
                                    return Some((Err(failed), (incoming, i, true)));
                                }
                                let reply = EchoReply {
                                    message: request.message,
                                    server_name: name,
                                    index: i,
                                };
                                Some((Ok(reply), (incoming, i + 1, false)))
                            }
                            Ok(None) => None,
                            Err(status) => Some((Err(status), (incoming, i, true))),
                        }
                    }
                },
            );
            let replies: Self::ResponseStream = Box::pin(replies);
            Ok(with_server(replies, &state.name))
        })
    }
}

/// A client of `echo.Echo`, over plain-text HTTP/2.
#[derive(Clone)]
pub struct EchoClient {
    inner: tonic::client::Grpc<Channel>,
}

/// Connects to `http://addr` (h2c), within 10 s.
pub async fn client(addr: SocketAddr) -> EchoClient {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to gRPC server {addr}: {e}"));
    EchoClient {
        inner: tonic::client::Grpc::new(channel),
    }
}

impl EchoClient {
    async fn ready(&mut self) -> Result<(), Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("service was not ready: {e}")))
    }

    /// `Unary`: pass an [`EchoRequest`], or a [`Request`] to set metadata or a timeout.
    pub async fn unary(
        &mut self,
        request: impl IntoRequest<EchoRequest>,
    ) -> Result<Response<EchoReply>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/echo.Echo/Unary");
        self.inner
            .unary(request.into_request(), path, ProstCodec::default())
            .await
    }

    /// `ServerStream`: `request.count` replies.
    pub async fn server_stream(
        &mut self,
        request: impl IntoRequest<EchoRequest>,
    ) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/echo.Echo/ServerStream");
        self.inner
            .server_streaming(request.into_request(), path, ProstCodec::default())
            .await
    }

    /// `Bidi`: a reply per request (pass a stream, e.g. `tokio_stream::iter(requests)`).
    pub async fn bidi(
        &mut self,
        requests: impl IntoStreamingRequest<Message = EchoRequest>,
    ) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/echo.Echo/Bidi");
        self.inner
            .streaming(
                requests.into_streaming_request(),
                path,
                ProstCodec::default(),
            )
            .await
    }
}

/// Reads a stream of replies to its end: the replies, then `Err` if it ended with a failure.
pub async fn collect(stream: &mut Streaming<EchoReply>) -> (Vec<EchoReply>, Result<(), Status>) {
    let mut replies = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(reply)) => replies.push(reply),
            Ok(None) => return (replies, Ok(())),
            Err(status) => return (replies, Err(status)),
        }
    }
}
