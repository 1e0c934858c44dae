//! What the TCP connection tasks (HTTP/2, HTTP/1.1) and the worker's pass say to each other,
//! and the credit that bounds what a connection task may hand the pass before the pass has
//! taken it.
//!
//! A connection task reads as fast as its client writes; the pass does much more per byte
//! (capsules, the flow table, the target send). Without a bound, what the task read and the
//! pass had not yet taken would pile up in the channel between them: memory grows with a fast
//! client, and flow control (HTTP/2 windows, TCP) never pushes back. With a [`Credit`], the task
//! stops reading once [`CREDIT_BYTES`] are in flight to the pass, and goes on when the pass has
//! taken half of them: the client is then held back by HTTP/2 flow control or TCP.
//!
//! Each chunk counts at least [`CHUNK_COST`] bytes, so one connection never has more than 256
//! chunks waiting. The pass takes chunks of all connections in the order they came: a client
//! writing tiny DATA frames (one datagram each) as fast as it can would otherwise put a
//! thousand chunks ahead of every other client's next datagram, and a well-behaved client's
//! round trip would grow with the flood (measured: 5 ms at 600 000 datagrams/s).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::proto::connect_udp::{HttpVersion, OwnedRequest, Rejection};
use crate::relay::flow::CloseReason;

/// Bytes a connection task may have handed to the pass that the pass has not taken yet.
pub const CREDIT_BYTES: usize = 64 * 1024;

/// What a chunk counts against the credit at least, whatever its size.
pub const CHUNK_COST: usize = 256;

fn cost(len: usize) -> usize {
    len.max(CHUNK_COST)
}

/// A TCP connection's handle in the pass (the accept loop numbers them).
pub(crate) type TcpConnId = u32;

/// What a connection task (or a resolution) tells the pass.
#[derive(Debug)]
pub(crate) enum CoreMsg {
    /// An HTTP/2 or HTTP/1.1 connection completed its handshake.
    TcpOpen {
        conn: TcpConnId,
        version: HttpVersion,
        tls_identity: Option<String>,
        ctl: mpsc::UnboundedSender<TcpCtl>,
        /// What the task has handed on; the pass gives it back as it takes each chunk.
        credit: Arc<Credit>,
    },
    /// A request head; the pass answers it through `answer`.
    Request {
        conn: TcpConnId,
        stream: u32,
        request: OwnedRequest,
        started: Instant,
        answer: TcpAnswer,
    },
    /// Bytes of a flow's capsule stream, as the client sent them.
    Chunk {
        conn: TcpConnId,
        stream: u32,
        data: Bytes,
    },
    /// The client ended (END_STREAM, EOF) or aborted (reset, I/O error) a stream.
    ClientEnd {
        conn: TcpConnId,
        stream: u32,
        reason: CloseReason,
    },
    /// The connection is gone.
    TcpClosed { conn: TcpConnId },
    /// A host name resolved (or not) for a pending request.
    Resolved {
        key: usize,
        serial: u64,
        result: Result<Vec<SocketAddr>, Rejection>,
    },
}

/// How a TCP connection's request is answered.
pub(crate) enum TcpAnswer {
    /// HTTP/2: the pass sends the response itself and keeps the stream's send half.
    H2(h2::server::SendResponse<Bytes>),
    /// HTTP/1.1: the connection task writes `101` or the refusal; target datagrams come to it
    /// as encoded capsules through `out`.
    H1 {
        reply: oneshot::Sender<Result<(), Rejection>>,
        out: mpsc::Sender<Bytes>,
    },
}

impl std::fmt::Debug for TcpAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcpAnswer::H2(_) => "H2",
            TcpAnswer::H1 { .. } => "H1",
        })
    }
}

/// What the pass tells a connection task.
#[derive(Debug)]
pub(crate) enum TcpCtl {
    /// The flow on this stream ended from the relay's side: stop reading its body.
    Drop(u32),
}

/// The bytes in flight from one connection task to the pass (see the module docs). The task and
/// the pass run on one thread; the atomics make it `Sync` and cost nothing uncontended.
#[derive(Debug)]
pub(crate) struct Credit {
    used: AtomicUsize,
    limit: usize,
    waiting: AtomicBool,
    room: Notify,
}

impl Credit {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Credit {
            used: AtomicUsize::new(0),
            limit: limit.max(1),
            waiting: AtomicBool::new(false),
            room: Notify::new(),
        })
    }

    /// The task handed on a chunk of `len` bytes.
    pub fn spend(&self, len: usize) {
        self.used.fetch_add(cost(len), Ordering::SeqCst);
    }

    /// Whether the task may hand on more.
    pub fn has_room(&self) -> bool {
        self.used.load(Ordering::SeqCst) < self.limit
    }

    /// Resolves once the pass has taken enough for the task to go on (at once if it may).
    pub async fn room(&self) {
        loop {
            // Flag first, then look: the pass either sees the flag or this check sees what it
            // took (a wake-up before the wait is kept as a permit).
            self.waiting.store(true, Ordering::SeqCst);
            if self.has_room() {
                self.waiting.store(false, Ordering::SeqCst);
                return;
            }
            self.room.notified().await;
        }
    }

    /// The pass took a chunk of `len` bytes; a waiting task goes on once half the credit is
    /// back.
    pub fn give_back(&self, len: usize) {
        let n = cost(len);
        let before = self.used.fetch_sub(n, Ordering::SeqCst);
        debug_assert!(before >= n, "credit given back twice");
        if before - n <= self.limit / 2 && self.waiting.swap(false, Ordering::SeqCst) {
            self.room.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_out_of_credit_waits_until_half_is_given_back() {
        const K: usize = CHUNK_COST;
        let c = Credit::new(100 * K);
        c.spend(60 * K);
        assert!(c.has_room());
        c.spend(60 * K);
        assert!(!c.has_room());
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.room().await })
        };
        tokio::task::yield_now().await;
        // 70 in flight: room, but not yet half of the credit back.
        c.give_back(50 * K);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        c.give_back(20 * K);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken once half is back")
            .unwrap();
        assert_eq!(c.used.load(Ordering::SeqCst), 50 * K);
    }

    #[test]
    fn tiny_chunks_count_as_chunks_not_bytes() {
        let c = Credit::new(CREDIT_BYTES);
        let mut handed = 0;
        while c.has_room() {
            c.spend(64);
            handed += 1;
        }
        assert_eq!(
            handed,
            CREDIT_BYTES / CHUNK_COST,
            "64-byte chunks in flight"
        );
        for _ in 0..handed {
            c.give_back(64);
        }
        assert_eq!(c.used.load(Ordering::SeqCst), 0);
        // Large chunks count their size.
        c.spend(CREDIT_BYTES - 1);
        assert!(c.has_room());
        c.spend(1);
        assert!(!c.has_room());
    }

    #[tokio::test]
    async fn room_given_back_before_the_wait_is_not_lost() {
        let c = Credit::new(10 * CHUNK_COST);
        c.spend(10 * CHUNK_COST);
        c.waiting.store(true, Ordering::SeqCst);
        c.give_back(10 * CHUNK_COST);
        // The permit is kept: the wait returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), c.room())
            .await
            .unwrap();
    }
}
