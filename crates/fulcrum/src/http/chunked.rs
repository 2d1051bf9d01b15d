//! Incremental decoder for HTTP/1.1 `Transfer-Encoding: chunked` bodies (RFC 9112 §7.1).
//!
//! It consumes bytes from a read buffer as they arrive, in any split, and hands out chunk data as
//! zero-copy slices of that buffer. Chunk extensions and trailers are checked and dropped.
//!
//! The decoder is strict where a lenient reading could disagree with the server about where the
//! body ends (and so put a pooled connection out of step): every line ends with CRLF (a bare LF or
//! CR is an error), a chunk size is hexadecimal digits only (no sign, no `0x`), optionally followed
//! by whitespace and `;` extensions of visible characters, and a trailer line is a field name, a
//! colon and a value without control characters. Trailing whitespace after a chunk size is
//! tolerated (as Go's and nginx's parsers do); it cannot change where the chunk ends.

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
    /// Reading the hex digits of a chunk size (`digits` so far).
    Size { value: u64, digits: u8 },
    /// Whitespace after the chunk size.
    SizeWs(u64),
    /// A chunk extension, up to the end of the line.
    Ext(u64),
    /// The LF after the size line's CR.
    SizeLf(u64),
    /// Chunk data: this many bytes remain.
    Data(u64),
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer line (or of the final CRLF).
    TrailerStart,
    /// A trailer field name.
    TrailerName,
    /// A trailer field value.
    TrailerValue,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The LF of the final CRLF.
    FinalLf,
    /// The body is complete.
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
            },
            control: 0,
        }
    }
}

/// `tchar` of RFC 9110 §5.6.2: a character of a token (a field name).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A character allowed inside a field value or a chunk extension: visible ASCII, SP, HTAB or
/// obs-text (RFC 9110 §5.5), that is anything but control characters and DEL.
fn is_text(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

impl ChunkedDecoder {
    /// True once the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes control bytes from `buf` and returns the next data slice, or what is needed next.
    ///
    /// After an error the decoder is not to be used again.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ChunkedError> {
        let (control, data) = self.advance(buf)?;
        buf.advance(control);
        if data > 0 {
            return Ok(Step::Data(buf.split_to(data).freeze()));
        }
        Ok(if self.state == State::Done {
            Step::Done
        } else {
            Step::NeedMore
        })
    }

    /// Checks the start of a body, `input`, without consuming it: an error when these bytes cannot
    /// begin a valid chunked body (from this decoder's state). Bytes after the end of the body are
    /// not looked at.
    pub fn check(&self, mut input: &[u8]) -> Result<(), ChunkedError> {
        let mut d = self.clone();
        loop {
            let (control, data) = d.advance(input)?;
            if control + data == 0 {
                return Ok(());
            }
            input = &input[control + data..];
        }
    }

    /// Runs the state machine over `input` up to the next chunk data, the end of the body or the
    /// end of `input`: returns how many control bytes it consumed and how many data bytes follow them
    /// (already accounted for in the state).
    fn advance(&mut self, input: &[u8]) -> Result<(usize, usize), ChunkedError> {
        let mut i = 0;
        loop {
            match self.state {
                State::Done => return Ok((i, 0)),
                State::Data(remaining) => {
                    let n = remaining.min((input.len() - i) as u64);
                    if n > 0 {
                        self.state = if n == remaining {
                            State::DataCr
                        } else {
                            State::Data(remaining - n)
                        };
                    }
                    return Ok((i, n as usize));
                }
                _ => {
                    let Some(&b) = input.get(i) else {
                        return Ok((i, 0));
                    };
                    i += 1;
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
        if matches!(
            self.state,
            State::Size { .. } | State::SizeWs(_) | State::Ext(_) | State::SizeLf(_)
        ) && self.control > MAX_SIZE_LINE
        {
            return Err(ChunkedError("chunk size line too long"));
        }
        Ok(match self.state {
            State::Size { value, digits } => {
                if let Some(d) = (b as char).to_digit(16) {
                    if value > u64::MAX >> 4 {
                        return Err(ChunkedError("chunk size too large"));
                    }
                    State::Size {
                        value: value * 16 + u64::from(d),
                        digits: digits.saturating_add(1),
                    }
                } else if digits == 0 {
                    return Err(ChunkedError("chunk size expected"));
                } else {
                    match b {
                        b' ' | b'\t' => State::SizeWs(value),
                        b';' => State::Ext(value),
                        b'\r' => State::SizeLf(value),
                        _ => return Err(ChunkedError("invalid character in chunk size")),
                    }
                }
            }
            State::SizeWs(value) => match b {
                b' ' | b'\t' => State::SizeWs(value),
                b';' => State::Ext(value),
                b'\r' => State::SizeLf(value),
                _ => return Err(ChunkedError("invalid character after chunk size")),
            },
            State::Ext(value) => match b {
                b'\r' => State::SizeLf(value),
                b if is_text(b) => State::Ext(value),
                _ => return Err(ChunkedError("invalid character in chunk extension")),
            },
            State::SizeLf(value) => match b {
                b'\n' => self.after_size(value),
                _ => return Err(ChunkedError("expected LF after chunk size")),
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(ChunkedError("expected CRLF after chunk data")),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.control = 0;
                    State::Size {
                        value: 0,
                        digits: 0,
                    }
                }
                _ => return Err(ChunkedError("expected LF after chunk data")),
            },
            State::TrailerStart
            | State::TrailerName
            | State::TrailerValue
            | State::TrailerLf
            | State::FinalLf
                if self.control > MAX_TRAILERS =>
            {
                return Err(ChunkedError("trailers too large"));
            }
            State::TrailerStart => match b {
                b'\r' => State::FinalLf,
                b if is_tchar(b) => State::TrailerName,
                _ => return Err(ChunkedError("invalid trailer line")),
            },
            State::TrailerName => match b {
                b':' => State::TrailerValue,
                b if is_tchar(b) => State::TrailerName,
                _ => return Err(ChunkedError("invalid trailer field name")),
            },
            State::TrailerValue => match b {
                b'\r' => State::TrailerLf,
                b if is_text(b) => State::TrailerValue,
                _ => return Err(ChunkedError("invalid trailer field value")),
            },
            State::TrailerLf => match b {
                b'\n' => State::TrailerStart,
                _ => return Err(ChunkedError("expected LF after a trailer line")),
            },
            State::FinalLf => match b {
                b'\n' => State::Done,
                _ => return Err(ChunkedError("expected LF after the last chunk")),
            },
            State::Data(_) | State::Done => unreachable!("handled by advance"),
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
            // Signs, prefixes and separators are not hex digits.
            b"+4\r\nWiki\r\n",
            b"-4\r\nWiki\r\n",
            b"0x4\r\nWiki\r\n",
            b"4 4\r\nWiki\r\n",
            // Every line ends with CRLF.
            b"4\nWiki\r\n0\r\n\r\n",
            b"4\r\nWiki\n0\r\n\r\n",
            b"4\r\nWiki\r\n0\n\r\n",
            b"4\r\nWiki\r\n0\r\n\n",
            b"4;a\nb\r\nWiki\r\n",
            b"4\r\nWiki\r\n0\r\nX: 1\n\r\n",
            // Control characters in extensions and trailers; trailer lines need a name and a colon.
            b"4;a=\x00\r\nWiki\r\n",
            b"4\r\nWiki\r\n0\r\nX: \x01\r\n\r\n",
            b"4\r\nWiki\r\n0\r\nno colon\r\n\r\n",
            b"4\r\nWiki\r\n0\r\n: v\r\n\r\n",
            b"4\r\nWiki\r\n0\r\n folded\r\n\r\n",
        ] {
            assert!(
                decode_in_pieces(bad, 3).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn whitespace_after_the_size_and_extensions_are_accepted() {
        for ok in [
            &b"4 \r\nWiki\r\n0\r\n\r\n"[..],
            b"4\t ;a=b\r\nWiki\r\n0;last\r\n\r\n",
            b"0004\r\nWiki\r\n00\r\nX-T: 1\r\nY:\r\n\r\n",
        ] {
            let (out, done) = decode_in_pieces(ok, 2).unwrap();
            assert_eq!((out.as_slice(), done), (&b"Wiki"[..], true));
        }
    }

    #[test]
    fn check_reads_ahead_without_consuming() {
        let d = ChunkedDecoder::default();
        assert!(d.check(b"4\r\nWi").is_ok());
        assert!(d.check(b"4\r\nWiki\r\n0\r\n\r\nanything after").is_ok());
        assert!(d.check(b"zz\r\n").is_err());
        assert!(d.check(b"4\r\nWiki\r\nzz").is_err());
        assert!(d.check(b"").is_ok());
        // From the middle of a body.
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"4\r\nWi"[..]);
        assert_eq!(
            d.step(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"Wi"))
        );
        assert!(d.check(b"ki\r\n0\r\n\r\n").is_ok());
        assert!(d.check(b"kiX").is_err());
    }

    #[test]
    fn size_line_encoding() {
        let mut out = Vec::new();
        encode_size_line(255, &mut out);
        assert_eq!(out, b"ff\r\n");
    }
}
