//! A server's response body copied into the cache while it streams to the client.
//!
//! Every chunk is passed on as soon as it arrives, and a reference to it (a `Bytes` clone, no copy)
//! is kept; when the body ends cleanly the chunks are joined and stored. Past `max_object_size` the
//! kept chunks are dropped and the rest streams through uncached; a body that fails or is abandoned by
//! its client is never stored. Either way the key's coalescing slot is released, so requests waiting
//! for it look again (and find the entry, or go to a server themselves).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::{Flight, Pending};
use crate::http::body::ProxyBody;

/// The body being copied.
#[derive(Debug)]
pub struct Tee {
    inner: ProxyBody,
    chunks: Vec<Bytes>,
    size: u64,
    limit: u64,
    /// What to store when the body completes; `None` once stored or given up.
    pending: Option<Pending>,
    /// The key's coalescing slot, released when the body ends or is dropped.
    flight: Option<Flight>,
}

impl Tee {
    pub(super) fn new(
        inner: ProxyBody,
        limit: u64,
        pending: Pending,
        flight: Option<Flight>,
    ) -> Self {
        let mut tee = Tee {
            inner,
            chunks: Vec::new(),
            size: 0,
            limit,
            pending: Some(pending),
            flight,
        };
        if tee.inner.is_end_stream() {
            tee.complete();
        }
        tee
    }

    /// The body ended cleanly: store it, then let waiters look again.
    fn complete(&mut self) {
        if let Some(pending) = self.pending.take() {
            let body = match self.chunks.len() {
                0 => Bytes::new(),
                1 => self.chunks.pop().unwrap_or_default(),
                _ => {
                    let mut all = BytesMut::with_capacity(self.size as usize);
                    for c in self.chunks.drain(..) {
                        all.extend_from_slice(&c);
                    }
                    all.freeze()
                }
            };
            pending.store(body);
        }
        self.chunks = Vec::new();
        self.flight = None;
    }

    fn give_up(&mut self) {
        self.pending = None;
        self.chunks = Vec::new();
        self.flight = None;
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if this.pending.is_some() {
                    if let Some(data) = frame.data_ref() {
                        this.size += data.len() as u64;
                        if this.size > this.limit {
                            // Too large to store: streamed through from here on.
                            this.give_up();
                        } else {
                            this.chunks.push(data.clone());
                        }
                    }
                }
                // hyper stops polling a body that says it has ended.
                if this.inner.is_end_stream() {
                    this.complete();
                }
            }
            Poll::Ready(None) => this.complete(),
            Poll::Ready(Some(Err(_))) => this.give_up(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
