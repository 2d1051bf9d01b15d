//! `kind = "grpc"`: the standard gRPC health check (`grpc.health.v1.Health/Check`) over plain-text
//! HTTP/2 (h2c, prior knowledge). The messages are tiny and encoded by hand: no protobuf library.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

/// The most of a check's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;

/// `HealthCheckResponse.ServingStatus` names, by value.
const STATUS_NAMES: [&str; 4] = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

/// Asks the server behind `stream` (already connected) about `service` (`""`: the whole server).
pub(super) async fn grpc_probe<S>(
    service: &str,
    timeout: Duration,
    address: SocketAddr,
    stream: S,
) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {}", chain(&e)))?;
    // The connection ends with the probe, even when the probe is cut short by its timeout.
    let connection = AbortOnDrop(tokio::spawn(connection));
    let request = http::Request::post(format!("http://{address}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "fulcrum-health-check")
        .header(
            "grpc-timeout",
            format!("{}m", timeout.as_millis().min(99_999_999)),
        )
        .body(Full::new(Bytes::from(encode_request(service))))
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {}", chain(&e)))?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(format!("HTTP {}", head.status.as_u16()));
    }
    let collected = Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("read: {}", chain(&*e)))?;
    drop(connection);
    // A trailers-only answer (an error, usually) carries grpc-status in its headers.
    let status_from = match collected.trailers() {
        Some(t) if t.contains_key("grpc-status") => t,
        _ => &head.headers,
    };
    check_grpc_status(status_from)?;
    match decode_response(&collected.to_bytes())? {
        1 => Ok("gRPC SERVING".to_owned()),
        other => Err(format!("gRPC {}", status_name(other))),
    }
}

/// An error and its sources: hyper's own message alone is often just "connection error".
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `Err("grpc-status N: message")` unless the call succeeded.
fn check_grpc_status(headers: &HeaderMap) -> Result<(), String> {
    let code = headers
        .get("grpc-status")
        .ok_or("no grpc-status in the answer")?
        .to_str()
        .unwrap_or("?");
    if code == "0" {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Err(format!("grpc-status {code}: {message}"))
}

/// A gRPC message (uncompressed) holding `HealthCheckRequest { service = 1 }`.
pub(super) fn encode_request(service: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

/// The `status` (field 1) of the first gRPC message of `body`, a `HealthCheckResponse`.
pub(super) fn decode_response(body: &[u8]) -> Result<u64, String> {
    let (&[flag, a, b, c, d], rest) = body.split_first_chunk::<5>().ok_or("no gRPC message")?;
    if flag != 0 {
        return Err("compressed gRPC message".to_owned());
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    let mut message = rest.get(..len).ok_or("truncated gRPC message")?;
    let mut status = 0; // proto3: an absent field is its default, UNKNOWN
    while !message.is_empty() {
        let key = take_varint(&mut message)?;
        let skip = match key & 7 {
            0 => {
                let value = take_varint(&mut message)?;
                if key >> 3 == 1 {
                    status = value;
                }
                0
            }
            1 => 8,
            2 => take_varint(&mut message)? as usize,
            5 => 4,
            wire => return Err(format!("invalid protobuf (wire type {wire})")),
        };
        message = message.get(skip..).ok_or("truncated protobuf field")?;
    }
    Ok(status)
}

fn status_name(status: u64) -> String {
    match STATUS_NAMES.get(status as usize) {
        Some(name) => (*name).to_owned(),
        None => format!("status {status}"),
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or("truncated varint")?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err("varint too long".to_owned())
}

/// `grpc-message` is percent-encoded; undecodable sequences are kept as written.
fn percent_decode(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let hex = input
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (input[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_protobuf() {
        assert_eq!(encode_request(""), [0, 0, 0, 0, 0]);
        assert_eq!(
            encode_request("echo.Echo"),
            b"\0\0\0\0\x0b\x0a\x09echo.Echo".to_vec()
        );
        // A name of 200 bytes needs a two-byte length varint (200 = 0xc8 0x01).
        let long = "s".repeat(200);
        let framed = encode_request(&long);
        assert_eq!(&framed[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
        assert_eq!(&framed[8..], long.as_bytes());
    }

    #[test]
    fn responses_are_decoded() {
        assert_eq!(decode_response(&[0, 0, 0, 0, 2, 0x08, 1]), Ok(1));
        assert_eq!(decode_response(&[0, 0, 0, 0, 2, 0x08, 2]), Ok(2));
        // An empty message is the default status, UNKNOWN.
        assert_eq!(decode_response(&[0, 0, 0, 0, 0]), Ok(0));
        // Unknown fields of every wire type are skipped.
        let body = [
            0, 0, 0, 0, 18, 0x10, 0x96, 0x01, // field 2, varint 150
            0x19, 1, 2, 3, 4, 5, 6, 7, 8, // field 3, fixed64
            0x22, 2, b'h', b'i', // field 4, bytes
            0x08, 1, // status = SERVING
        ];
        assert_eq!(decode_response(&body), Ok(1));
        assert!(decode_response(&[0, 0, 0, 0]).is_err());
        assert!(decode_response(&[1, 0, 0, 0, 2, 0x08, 1]).is_err());
        assert!(decode_response(&[0, 0, 0, 0, 3, 0x08, 1]).is_err());
        assert!(decode_response(&[0, 0, 0, 0, 2, 0x08, 0x80]).is_err());
        assert!(decode_response(&[0, 0, 0, 0, 2, 0x0a, 5]).is_err());
        assert_eq!(status_name(2), "NOT_SERVING");
        assert_eq!(status_name(9), "status 9");
    }

    #[test]
    fn grpc_status_and_message() {
        let mut headers = HeaderMap::new();
        assert!(check_grpc_status(&headers).is_err());
        headers.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(check_grpc_status(&headers), Ok(()));
        headers.insert("grpc-status", "5".parse().unwrap());
        headers.insert("grpc-message", "service%20not registered%".parse().unwrap());
        assert_eq!(
            check_grpc_status(&headers),
            Err("grpc-status 5: service not registered%".to_owned())
        );
    }
}
