//! Write coalescing between the `h2` crate and TLS.
//!
//! `h2` writes a DATA frame whose payload is over 256 bytes by reference, and must flush it
//! before it takes the next frame: every flush goes down to TLS, which seals a record and
//! writes it to the socket at once. A connection with 100 flows and a pass that has a datagram
//! for each of them would make 100 records and 100 `writev` calls, one per datagram (measured:
//! one `writev` per relayed datagram at HTTP/2 1200 B echo).
//!
//! [`Coalesce`] sits between them: what `h2` writes is copied into one buffer, and `h2`'s
//! flushes only mark it for flushing and wake the connection task. The task then writes the
//! whole buffer to TLS in one go ([`Flusher::flush`]): several frames per record, one `writev`
//! for all of them. Nothing waits: the wake-up runs the task again at once, after the frames
//! that one poll of `h2` produced. The buffer is bounded ([`LIMIT`]): past it, a write first
//! drains the buffer into TLS, and waits (back-pressure to `h2`) if the socket is full.
//!
//! Both halves live in the one connection task (never shared across tasks or threads).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes buffered before a write drains the buffer into the transport first.
pub const LIMIT: usize = 64 * 1024;

struct Inner<T> {
    io: T,
    buf: BytesMut,
    /// `h2` asked for a flush that has not been done yet.
    flush_asked: bool,
    /// A flush the task did failed: the transport is broken, and `h2` learns it from its
    /// next read or write.
    failed: Option<io::ErrorKind>,
}

impl<T> Inner<T> {
    fn check(&self) -> io::Result<()> {
        match self.failed {
            Some(kind) => Err(io::Error::new(kind, "the connection failed while flushing")),
            None => Ok(()),
        }
    }
}

impl<T: AsyncWrite + Unpin> Inner<T> {
    /// Writes the buffer into the transport, then flushes it.
    fn poll_drain(&mut self, cx: &mut Context<'_>, flush: bool) -> Poll<io::Result<()>> {
        self.check()?;
        let r = std::task::ready!(self.poll_drain_inner(cx, flush));
        if let Err(e) = &r {
            self.failed = Some(e.kind());
        }
        Poll::Ready(r)
    }

    fn poll_drain_inner(&mut self, cx: &mut Context<'_>, flush: bool) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
        }
        if flush {
            std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.flush_asked = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: drains the buffer first if they would take it past the
    /// limit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && self.buf.len() + len > LIMIT {
            std::task::ready!(self.poll_drain(cx, false))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// The transport as `h2` sees it: reads go straight through, writes are coalesced.
pub struct Coalesce<T> {
    inner: Rc<RefCell<Inner<T>>>,
}

/// The connection task's handle: does the flushes `h2` asked for.
pub struct Flusher<T> {
    inner: Rc<RefCell<Inner<T>>>,
}

/// Wraps `io`; the [`Flusher`] must be polled by the task that polls `h2`'s connection.
pub fn coalesce<T>(io: T) -> (Coalesce<T>, Flusher<T>) {
    let inner = Rc::new(RefCell::new(Inner {
        io,
        buf: BytesMut::with_capacity(16 * 1024),
        flush_asked: false,
        failed: None,
    }));
    (
        Coalesce {
            inner: inner.clone(),
        },
        Flusher { inner },
    )
}

impl<T: AsyncWrite + Unpin> Flusher<T> {
    /// Whether `h2` has asked for a flush that has not been done (and the transport has not
    /// failed).
    pub fn pending(&self) -> bool {
        let inner = self.inner.borrow();
        inner.flush_asked && inner.failed.is_none()
    }

    /// Writes what is buffered to the transport and flushes it.
    pub async fn flush(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.inner.borrow_mut().poll_drain(cx, true)).await
    }

    /// Resolves once it has done a flush `h2` asked for. Poll it beside `h2`'s connection in
    /// the same `select!`, on every poll (no guard): `h2`'s flush wakes the task, and this
    /// then finds it pending. Never resolves after a failure (`h2` reports that).
    pub async fn flushed(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            if !self.pending() {
                return Poll::Pending;
            }
            self.inner.borrow_mut().poll_drain(cx, true)
        })
        .await
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        Pin::new(&mut inner.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        std::task::ready!(inner.poll_room(cx, data.len()))?;
        inner.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        std::task::ready!(inner.poll_room(cx, len))?;
        for b in bufs {
            inner.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        // Vectored writes cost no more than plain ones here, and `h2` then chains payloads
        // (no copy into its own buffer) from 256 bytes on.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.inner.borrow_mut();
        inner.check()?;
        if !inner.buf.is_empty() && !inner.flush_asked {
            inner.flush_asked = true;
            // The task runs again right after this poll and flushes everything `h2` wrote
            // in it (see `Flusher`).
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.inner.borrow_mut();
        std::task::ready!(inner.poll_drain(cx, true))?;
        Pin::new(&mut inner.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes and flushes that reach the transport.
    #[derive(Default)]
    struct Counting {
        data: Vec<u8>,
        writes: usize,
        flushes: usize,
        /// Accept at most this many bytes per write (0: all).
        max_write: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = if self.max_write == 0 {
                data.len()
            } else {
                data.len().min(self.max_write)
            };
            self.writes += 1;
            self.data.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Counting {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            buf.put_slice(b"read through");
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_and_flushes_of_one_poll_reach_the_transport_as_one_write() {
        let (mut co, flusher) = coalesce(Counting::default());
        for i in 0..100u8 {
            co.write_all(&[i; 1200]).await.unwrap();
            co.flush().await.unwrap();
        }
        {
            // Nothing flushed; written only once, when the buffer reached its limit.
            let inner = co.inner.borrow();
            assert_eq!((inner.io.writes, inner.io.flushes), (1, 0));
        }
        assert!(flusher.pending());
        flusher.flush().await.unwrap();
        assert!(!flusher.pending());
        let inner = co.inner.borrow();
        // 120 000 bytes: past the limit once, so two writes; one flush.
        assert_eq!((inner.io.writes, inner.io.flushes), (2, 1));
        assert_eq!(inner.io.data.len(), 120_000);
        assert!(inner
            .io
            .data
            .chunks(1200)
            .enumerate()
            .all(|(i, c)| c == [i as u8; 1200]));
    }

    #[tokio::test]
    async fn the_buffer_is_bounded_and_partial_writes_keep_the_order() {
        let (mut co, flusher) = coalesce(Counting {
            max_write: 1000,
            ..Default::default()
        });
        let mut want = Vec::new();
        for i in 0..200u32 {
            let chunk = vec![(i % 251) as u8; 700];
            co.write_all(&chunk).await.unwrap();
            want.extend_from_slice(&chunk);
            assert!(co.inner.borrow().buf.len() <= LIMIT);
        }
        flusher.flush().await.unwrap();
        co.shutdown().await.unwrap();
        assert_eq!(co.inner.borrow().io.data, want);
        let mut read = [0u8; 12];
        co.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"read through");
    }

    /// A transport that fails every write.
    struct Broken;

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// A failed flush is not retried, and the next read or write reports it (so `h2` ends the
    /// connection with an I/O error).
    #[tokio::test]
    async fn a_failed_flush_reaches_h2_through_its_next_read_or_write() {
        let (mut co, flusher) = coalesce(Broken);
        co.write_all(b"frame").await.unwrap();
        co.flush().await.unwrap();
        assert!(flusher.pending());
        assert_eq!(
            flusher.flush().await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        assert!(!flusher.pending());
        let mut b = [0u8; 4];
        assert_eq!(
            co.read(&mut b).await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        assert_eq!(
            co.write(b"x").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[tokio::test]
    async fn a_flush_with_nothing_buffered_asks_for_nothing() {
        let (mut co, flusher) = coalesce(Counting::default());
        co.flush().await.unwrap();
        assert!(!flusher.pending());
    }
}
