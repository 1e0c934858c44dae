//! Write-stall guard for the TCP client connections (HTTP/2 and HTTP/1.1 over TLS).
//!
//! A client that sends PINGs or SETTINGS without ever reading the answers (CVE-2019-9512,
//! CVE-2019-9515) makes `h2` stop reading once its one pending PONG / SETTINGS ACK cannot be
//! written: memory stays bounded, but the connection would stay open for as long as the client
//! likes. [`StallGuard`] wraps the connection's byte stream and ends it when the relay has bytes
//! for the client and none of them has been taken for longer than a timeout
//! (`http2.write_stall_timeout_secs`, default 30 s): the write fails with
//! [`io::ErrorKind::TimedOut`], so the protocol layer above closes the connection.
//!
//! The worker puts it around the TCP stream, under TLS, so progress means bytes the kernel took.
//! Around the TLS stream it would also count what rustls buffers (up to 64 KiB): each wake-up of
//! the timer would let `h2` hand over another 16 KiB of answers and restart the clock, and a
//! client that reads nothing would be cut only after about five timeouts.
//!
//! - Progress is any byte accepted by the wrapped stream's `poll_write`/`poll_write_vectored`, or a
//!   `poll_flush`/`poll_shutdown` that completes. The clock starts at the first write, flush or
//!   shutdown that returns `Pending` after the last progress, and stops at the next progress.
//! - An idle connection (nothing to write) never times out: only a pending write arms the clock.
//! - A client that reads slowly but steadily is never cut; one that reads nothing for the whole
//!   timeout while the relay has bytes waiting for it is.
//!
//! The timer is allocated the first time a write has to wait, then reused; nothing is allocated
//! per write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// Why a guarded write failed: the peer took none of the relay's bytes for this long.
#[derive(Debug, thiserror::Error)]
#[error("no write progress for {0:?}: the peer stopped reading")]
pub struct WriteStalled(pub Duration);

/// Tells whether a [`StallGuard`] cut its connection; readable after the guard has been moved
/// into the protocol layer (and dropped).
#[derive(Debug, Clone, Default)]
pub struct Stalled(Arc<AtomicBool>);

impl Stalled {
    /// True once the guard failed a write for lack of progress.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A byte stream whose writes fail with [`io::ErrorKind::TimedOut`] once they have made no
/// progress for `timeout`. Reads pass through untouched.
#[derive(Debug)]
pub struct StallGuard<T> {
    io: T,
    timeout: Duration,
    /// Fires `timeout` after the first write that had to wait since the last progress. Created
    /// on the first such write, then reset in place.
    timer: Option<Pin<Box<Sleep>>>,
    /// A write is waiting: the timer runs.
    armed: bool,
    stalled: Stalled,
}

impl<T> StallGuard<T> {
    /// Wraps `io`; writes that make no progress for `timeout` fail.
    pub fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            timer: None,
            armed: false,
            stalled: Stalled::default(),
        }
    }

    /// A handle that tells, after the connection ended, whether this guard cut it.
    pub fn stalled(&self) -> Stalled {
        self.stalled.clone()
    }

    fn error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, WriteStalled(self.timeout))
    }

    /// Bytes were taken: the clock stops.
    fn progress(&mut self) {
        self.armed = false;
    }

    /// The wrapped stream could not take anything now: start the clock if it is not running,
    /// and fail once it ran out. The timer is polled with the caller's context, so the task
    /// wakes at the deadline even if the peer never makes the stream writable again.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let deadline = Instant::now() + self.timeout;
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.armed {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.stalled.0.store(true, Ordering::Relaxed);
                debug!(timeout = ?self.timeout, "write stalled: closing the connection");
                Poll::Ready(Err(self.error()))
            }
        }
    }

    fn tripped(&self) -> bool {
        self.stalled.get()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.tripped() {
            return Poll::Ready(Err(this.error()));
        }
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.tripped() {
            return Poll::Ready(Err(this.error()));
        }
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.tripped() {
            return Poll::Ready(Err(this.error()));
        }
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                this.progress();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.tripped() {
            return Poll::Ready(Err(this.error()));
        }
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                this.progress();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.waiting(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(200);

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn stall_peer_that_never_reads_is_cut_after_the_timeout() {
        rt().block_on(async {
            let (a, _peer) = tokio::io::duplex(64);
            let mut g = StallGuard::new(a, TIMEOUT);
            let stalled = g.stalled();
            let started = Instant::now();
            // 4 KiB into a 64-byte pipe nobody reads: the first 64 bytes go, then it waits.
            let r = tokio::time::timeout(Duration::from_secs(5), g.write_all(&[7u8; 4096])).await;
            let elapsed = started.elapsed();
            let err = r.expect("the stalled write was not failed").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
            assert!(err.get_ref().is_some_and(|e| e.is::<WriteStalled>()));
            assert!(
                elapsed >= TIMEOUT,
                "cut after {elapsed:?}, before the timeout"
            );
            assert!(elapsed < TIMEOUT * 5, "cut only after {elapsed:?}");
            assert!(stalled.get());
            // It stays failed: a later write or flush does not hang either.
            assert_eq!(
                g.write(b"x").await.unwrap_err().kind(),
                io::ErrorKind::TimedOut
            );
            assert_eq!(g.flush().await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        });
    }

    #[test]
    fn stall_slow_but_steady_reader_is_never_cut() {
        rt().block_on(async {
            let (a, mut peer) = tokio::io::duplex(64);
            let mut g = StallGuard::new(a, TIMEOUT);
            let stalled = g.stalled();
            const TOTAL: usize = 1024;
            // The peer takes 64 bytes every 40 ms: the writer waits most of the time, in
            // total several timeouts, but never a whole timeout without progress.
            let reader = async {
                let mut got = 0;
                let mut buf = [0u8; 64];
                while got < TOTAL {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    // Gives up when the writer has stopped (cut), instead of hanging.
                    match tokio::time::timeout(Duration::from_secs(1), peer.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got += n,
                        _ => break,
                    }
                }
                got
            };
            let started = Instant::now();
            let writer = async {
                g.write_all(&[1u8; TOTAL]).await?;
                g.flush().await
            };
            let (w, got) = tokio::join!(writer, reader);
            let elapsed = started.elapsed();
            w.expect("a steady reader's connection was cut");
            assert_eq!(got, TOTAL);
            assert!(
                elapsed > TIMEOUT * 2,
                "the writer did not wait long enough ({elapsed:?}) to prove anything"
            );
            assert!(!stalled.get());
        });
    }

    #[test]
    fn stall_idle_connection_is_never_cut() {
        rt().block_on(async {
            let (a, mut peer) = tokio::io::duplex(64);
            let mut g = StallGuard::new(a, TIMEOUT);
            let stalled = g.stalled();
            // Nothing to write for several timeouts, then a write that fits.
            tokio::time::sleep(TIMEOUT * 3).await;
            g.write_all(b"hello").await.unwrap();
            g.flush().await.unwrap();
            // Idle again after some traffic, with the reader caught up.
            let mut buf = [0u8; 5];
            peer.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello");
            tokio::time::sleep(TIMEOUT * 3).await;
            g.write_all(b"again").await.unwrap();
            // A wait shorter than the timeout, then the reader catches up: no cut either,
            // and the clock starts afresh for the next wait.
            let fill = async {
                g.write_all(&[2u8; 200]).await.unwrap();
                tokio::time::sleep(TIMEOUT * 3).await;
                g.write_all(&[3u8; 100]).await.unwrap();
            };
            let drain = async {
                let mut buf = [0u8; 305];
                tokio::time::sleep(TIMEOUT / 2).await;
                peer.read_exact(&mut buf[..64]).await.unwrap();
                tokio::time::sleep(TIMEOUT / 2).await;
                peer.read_exact(&mut buf[64..]).await.unwrap();
            };
            tokio::join!(fill, drain);
            assert!(!stalled.get());
            // Reads pass through the guard.
            peer.write_all(b"up").await.unwrap();
            let mut up = [0u8; 2];
            g.read_exact(&mut up).await.unwrap();
            assert_eq!(&up, b"up");
        });
    }
}
