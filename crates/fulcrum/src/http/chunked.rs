//! Incremental decoder for HTTP/1.1 `Transfer-Encoding: chunked` bodies (RFC 9112 §7.1).
//!
//! It consumes bytes from a read buffer as they arrive, in any split, and hands out chunk data as
//! zero-copy slices of that buffer. Chunk extensions and trailers are read and dropped.

use bytes::{Buf, Bytes, BytesMut};

/// The longest chunk-size line accepted (hex digits plus extensions).
const MAX_SIZE_LINE: usize = 4096;
/// The most trailer bytes accepted.
const MAX_TRAILERS: usize = 16 * 1024;

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Chunk data, in order.
    Data(Bytes),
    /// The buffer is used up; read more and call again.
    NeedMore,
    /// The last chunk and the trailers have been read: the body is complete.
    Done,
}

/// A malformed chunked body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body: {0}")]
pub struct ChunkedError(&'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { value: u64, digits: u8, ext: bool },
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    FinalLf,
    Done,
}

/// The decoder's state between reads.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes of the current size line or of the trailers, against the limits.
    control: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
                ext: false,
            },
            control: 0,
        }
    }
}

impl ChunkedDecoder {
    /// True once the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes control bytes from `buf` and returns the next data slice, or what is needed next.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ChunkedError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = remaining.min(buf.len() as u64) as usize;
                    let data = buf.split_to(n).freeze();
                    self.state = if n as u64 == remaining {
                        State::DataCr
                    } else {
                        State::Data(remaining - n as u64)
                    };
                    return Ok(Step::Data(data));
                }
                _ => {
                    let Some(&b) = buf.first() else {
                        return Ok(Step::NeedMore);
                    };
                    buf.advance(1);
                    self.control += 1;
                    self.state = self.next(b)?;
                }
            }
        }
    }

    fn after_size(&mut self, value: u64) -> State {
        self.control = 0;
        if value == 0 {
            State::TrailerStart
        } else {
            State::Data(value)
        }
    }

    fn next(&mut self, b: u8) -> Result<State, ChunkedError> {
        Ok(match self.state {
            State::Size { value, digits, ext } => {
                if self.control > MAX_SIZE_LINE {
                    return Err(ChunkedError("chunk size line too long"));
                }
                if ext {
                    match b {
                        b'\r' => State::SizeLf(value),
                        b'\n' => self.after_size(value),
                        _ => self.state,
                    }
                } else if let Some(d) = (b as char).to_digit(16) {
                    if digits >= 16 {
                        return Err(ChunkedError("chunk size too large"));
                    }
                    State::Size {
                        value: value * 16 + u64::from(d),
                        digits: digits + 1,
                        ext: false,
                    }
                } else if digits == 0 {
                    return Err(ChunkedError("chunk size expected"));
                } else {
                    match b {
                        b';' | b' ' | b'\t' => State::Size {
                            value,
                            digits,
                            ext: true,
                        },
                        b'\r' => State::SizeLf(value),
                        b'\n' => self.after_size(value),
                        _ => return Err(ChunkedError("invalid character in chunk size")),
                    }
                }
            }
            State::SizeLf(value) => match b {
                b'\n' => self.after_size(value),
                _ => return Err(ChunkedError("expected LF after chunk size")),
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                    ext: false,
                },
                _ => return Err(ChunkedError("expected CRLF after chunk data")),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.control = 0;
                    State::Size {
                        value: 0,
                        digits: 0,
                        ext: false,
                    }
                }
                _ => return Err(ChunkedError("expected LF after chunk data")),
            },
            State::TrailerStart | State::TrailerLine if self.control > MAX_TRAILERS => {
                return Err(ChunkedError("trailers too large"));
            }
            State::TrailerStart => match b {
                b'\r' => State::FinalLf,
                b'\n' => State::Done,
                _ => State::TrailerLine,
            },
            State::TrailerLine => match b {
                b'\n' => State::TrailerStart,
                _ => State::TrailerLine,
            },
            State::FinalLf => match b {
                b'\n' => State::Done,
                _ => return Err(ChunkedError("expected LF after the last chunk")),
            },
            State::Data(_) | State::Done => unreachable!("handled by step"),
        })
    }
}

/// Writes the chunk-size line for a chunk of `len` bytes into `out`.
pub fn encode_size_line(len: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Result<(Vec<u8>, bool), ChunkedError> {
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for part in input.chunks(piece.max(1)) {
            buf.extend_from_slice(part);
            loop {
                match d.step(&mut buf)? {
                    Step::Data(b) => out.extend_from_slice(&b),
                    Step::NeedMore => break,
                    Step::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, d.is_done()))
    }

    #[test]
    fn decodes_whatever_the_read_boundaries() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for piece in 1..=body.len() {
            let (out, done) = decode_in_pieces(body, piece).unwrap();
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "piece size {piece}");
            assert!(done);
        }
    }

    #[test]
    fn bytes_after_the_body_are_left_for_the_next_response() {
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200"[..]);
        assert_eq!(
            d.step(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"a"))
        );
        assert_eq!(d.step(&mut buf).unwrap(), Step::Done);
        assert_eq!(&buf[..], b"HTTP/1.1 200");
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"4\r\nWikiX\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
            b"4\rX",
        ] {
            assert!(
                decode_in_pieces(bad, 3).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn size_line_encoding() {
        let mut out = Vec::new();
        encode_size_line(255, &mut out);
        assert_eq!(out, b"ff\r\n");
    }
}
