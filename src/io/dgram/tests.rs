//! The engine on both backends, over loopback: echo both ways, GSO trains, ICMP errors,
//! truncation, pool exhaustion and the close lifecycle.

use std::net::{SocketAddr, UdpSocket};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;

fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Mmsg];
    if uring::probe().is_ok() {
        v.push(Backend::Uring);
    }
    v
}

fn sizes() -> Sizes {
    Sizes {
        target_buffer_size: 2048,
        target_buffers: 64,
        quic_buffers: 8,
    }
}

/// Runs `f` with an engine of `backend` on a current-thread runtime, its pass loop spawned.
fn with_engine<F, Fut>(backend: Backend, sizes: Sizes, f: F)
where
    F: FnOnce(Rc<Engine>, Arc<WorkerStats>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let stats = Arc::new(WorkerStats::default());
        let e = Engine::install(backend, sizes, stats.clone()).unwrap();
        let task = tokio::task::spawn_local(e.clone().run());
        tokio::time::timeout(Duration::from_secs(10), f(e.clone(), stats))
            .await
            .unwrap_or_else(|_| panic!("{backend:?}: timed out"));
        task.abort();
        Engine::uninstall();
    });
}

fn connected(peer: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(peer).unwrap();
    s
}

/// Lets the engine's pass run (sends are flushed there) before a blocking read.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

/// A blocking read that tolerates EINTR (io_uring's task work interrupts syscalls).
fn recv_from(s: &UdpSocket, buf: &mut [u8]) -> (usize, SocketAddr) {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    loop {
        match s.recv_from(buf) {
            Ok(x) => return x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

async fn recv_one(e: &Engine, id: SockId) -> io::Result<Vec<u8>> {
    loop {
        e.readable(id).await;
        if let Some(r) = e.try_recv(id) {
            return r.map(|rx| rx.data().to_vec());
        }
    }
}

#[test]
fn target_socket_relays_both_ways() {
    for b in backends() {
        with_engine(b, sizes(), |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sock = connected(peer.local_addr().unwrap());
            let local = sock.local_addr().unwrap();
            let id = e.register(sock, Role::Target(HttpVersion::Http2)).unwrap();
            for i in 0..20u8 {
                assert!(e.send(id, Bytes::from(vec![i; 100 + i as usize])));
            }
            let mut buf = [0u8; 4096];
            settle().await;
            for i in 0..20u8 {
                let (n, from) = recv_from(&peer, &mut buf);
                assert_eq!(from, local);
                assert_eq!(
                    &buf[..n],
                    &vec![i; 100 + i as usize][..],
                    "{b:?} datagram {i}"
                );
            }
            for i in 0..5u8 {
                peer.send_to(&[i; 33], local).unwrap();
            }
            for i in 0..5u8 {
                assert_eq!(recv_one(&e, id).await.unwrap(), vec![i; 33], "{b:?}");
            }
            // Sends are counted when the kernel took them.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                stats.datagrams_for(HttpVersion::Http2, Direction::ToTarget),
                20,
                "{b:?}: to-target count"
            );
            e.close(id);
        });
    }
}

#[test]
fn equal_sized_sends_in_one_pass_go_out_as_one_gso_message() {
    if !gso_supported() {
        return;
    }
    for b in backends() {
        with_engine(b, sizes(), |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sock = connected(peer.local_addr().unwrap());
            let id = e.register(sock, Role::Target(HttpVersion::Http3)).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            let before = stats.io_submissions.get();
            for i in 0..10u8 {
                e.send(id, Bytes::from(vec![i; 500]));
            }
            e.send(id, Bytes::from(vec![10; 120])); // a shorter last segment
            let mut buf = [0u8; 4096];
            settle().await;
            for i in 0..11u8 {
                let (n, _) = recv_from(&peer, &mut buf);
                let want = if i == 10 { 120 } else { 500 };
                assert_eq!(
                    n, want,
                    "{b:?}: the kernel cut the train at segment boundaries"
                );
                assert!(buf[..n].iter().all(|&x| x == i));
            }
            assert_eq!(
                stats.io_submissions.get() - before,
                1,
                "{b:?}: eleven datagrams, one message"
            );
        });
    }
}

#[test]
fn icmp_port_unreachable_surfaces_as_an_error() {
    for b in backends() {
        with_engine(b, sizes(), |e, _| async move {
            let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = gone.local_addr().unwrap();
            drop(gone);
            let id = e
                .register(connected(addr), Role::Target(HttpVersion::Http2))
                .unwrap();
            e.send(id, Bytes::from_static(b"hello"));
            let err = recv_one(&e, id).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{b:?}");
        });
    }
}

#[test]
fn oversize_datagrams_are_dropped_and_counted_never_relayed_cut() {
    for b in backends() {
        with_engine(b, sizes(), |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sock = connected(peer.local_addr().unwrap());
            let local = sock.local_addr().unwrap();
            let id = e.register(sock, Role::Target(HttpVersion::Http2)).unwrap();
            peer.send_to(&[7u8; 3000], local).unwrap();
            peer.send_to(&[8u8; 2048], local).unwrap();
            assert_eq!(recv_one(&e, id).await.unwrap(), vec![8u8; 2048], "{b:?}");
            assert_eq!(stats.drops_for(DropReason::Truncated), 1, "{b:?}");
        });
    }
}

#[test]
fn an_exhausted_pool_drops_and_counts_and_recovers() {
    for b in backends() {
        let small = Sizes {
            target_buffer_size: 256,
            target_buffers: 8,
            quic_buffers: 2,
        };
        with_engine(b, small, |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut ids = Vec::new();
            let mut locals = Vec::new();
            for _ in 0..12 {
                let s = connected(peer.local_addr().unwrap());
                locals.push(s.local_addr().unwrap());
                ids.push(e.register(s, Role::Target(HttpVersion::Http2)).unwrap());
            }
            // A socket whose consumer sleeps holds at most half of what is free (here 2 of
            // 8 buffers, its burst); beyond, datagrams are dropped and counted, not queued.
            for d in [b"a", b"b", b"c", b"d"] {
                peer.send_to(d, locals[0]).unwrap();
            }
            settle().await;
            assert_eq!(
                stats.drops_for(DropReason::NoBuffer),
                2,
                "{b:?}: backlog share"
            );
            assert_eq!(recv_one(&e, ids[0]).await.unwrap(), b"a");
            assert_eq!(recv_one(&e, ids[0]).await.unwrap(), b"b");
            // Eleven sleeping consumers take the eight buffers; three datagrams find none and
            // wait in their socket buffers: receiving pauses, nothing is lost.
            for (i, l) in locals.iter().enumerate().skip(1) {
                peer.send_to(&[i as u8], l).unwrap();
            }
            settle().await;
            assert_eq!(e.free_buffers()[0], 0, "{b:?}: pool used up");
            assert!(stats.receive_paused[0].get() >= 1, "{b:?}: pause counted");
            assert_eq!(stats.drops_for(DropReason::NoBuffer), 2, "{b:?}");
            // No stall: as consumers catch up, the datagrams that waited are delivered.
            for (i, id) in ids.iter().enumerate().skip(1) {
                assert_eq!(recv_one(&e, *id).await.unwrap(), vec![i as u8], "{b:?}");
            }
            settle().await;
            assert_eq!(e.free_buffers()[0], 8, "{b:?}: every buffer back");
            assert_eq!(stats.drops_for(DropReason::SocketBufferFull), 0, "{b:?}");
        });
    }
}

#[test]
fn datagrams_the_kernel_drops_are_counted() {
    for b in backends() {
        let small = Sizes {
            target_buffer_size: 256,
            target_buffers: 2,
            quic_buffers: 2,
        };
        with_engine(b, small, |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sock = connected(peer.local_addr().unwrap());
            // A small receive buffer the flood below overflows while the pool is empty.
            socket2::SockRef::from(&sock)
                .set_recv_buffer_size(4096)
                .unwrap();
            let local = sock.local_addr().unwrap();
            let id = e.register(sock, Role::Target(HttpVersion::Http2)).unwrap();
            for i in 0..200u32 {
                peer.send_to(&i.to_be_bytes(), local).unwrap();
            }
            settle().await;
            // Drain everything that survived; the next datagram carries the kernel's count.
            let mut got = 0u64;
            loop {
                let r = tokio::time::timeout(Duration::from_millis(200), recv_one(&e, id)).await;
                match r {
                    Ok(Ok(_)) => got += 1,
                    _ => break,
                }
                if got == 1 {
                    // Once the backlog moves, one more datagram brings the report.
                    peer.send_to(b"last", local).unwrap();
                }
            }
            let lost = stats.drops_for(DropReason::SocketBufferFull)
                + stats.drops_for(DropReason::NoBuffer);
            assert!(
                stats.drops_for(DropReason::SocketBufferFull) > 0,
                "{b:?}: kernel drops counted ({got} received)"
            );
            assert_eq!(
                got + lost,
                201,
                "{b:?}: every datagram delivered or counted"
            );
        });
    }
}

#[test]
fn closing_a_socket_releases_it_and_its_buffers() {
    for b in backends() {
        with_engine(b, sizes(), |e, _| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let full = e.free_buffers()[0];
            for round in 0..50 {
                let s = connected(peer.local_addr().unwrap());
                let local = s.local_addr().unwrap();
                let id = e.register(s, Role::Target(HttpVersion::Http2)).unwrap();
                peer.send_to(b"x", local).unwrap();
                if round % 2 == 0 {
                    e.readable(id).await; // one datagram waiting in the backlog
                }
                e.close(id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(e.free_buffers()[0], full, "{b:?}: every buffer back");
            let inner = e.inner.borrow();
            assert_eq!(inner.table.slots.len(), 0, "{b:?}: every socket closed");
        });
    }
}

#[test]
fn quic_role_reports_sender_and_sends_to_addresses() {
    for b in backends() {
        with_engine(b, sizes(), |e, _| async move {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let local = sock.local_addr().unwrap();
            let id = e.register(sock, Role::Quic).unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            client.send_to(&[1u8; 1200], local).unwrap();
            loop {
                e.readable(id).await;
                if let Some(r) = e.try_recv(id) {
                    let rx = r.unwrap();
                    assert_eq!(rx.addr, Some(client.local_addr().unwrap()), "{b:?}");
                    assert_eq!(rx.data(), &[1u8; 1200][..]);
                    break;
                }
            }
            let mut buf = e.tx_buf();
            buf.extend_from_slice(&[2u8; 2400]);
            assert!(e.send_to(
                id,
                Transmit {
                    dest: client.local_addr().unwrap(),
                    buf,
                    segment_size: Some(1200),
                    ecn: 0,
                    src_ip: None,
                }
            ));
            let mut rb = [0u8; 4096];
            settle().await;
            for _ in 0..2 {
                let (n, from) = recv_from(&client, &mut rb);
                assert_eq!((n, from), (1200, local), "{b:?}: two GSO segments");
            }
        });
    }
}

#[test]
fn a_datagram_reaches_an_idle_worker_at_once() {
    // Liveness, not speed: a datagram arriving while the worker sleeps in its reactor must
    // wake it by itself. (With io_uring's deferred task running the only wake-up was an
    // eventfd that the kernels measured here signalled a grace period, 13-20 ms, after the
    // datagram arrived; every lone round trip paid it.)
    for b in backends() {
        with_engine(b, sizes(), |e, _| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sock = connected(peer.local_addr().unwrap());
            let local = sock.local_addr().unwrap();
            let id = e.register(sock, Role::Target(HttpVersion::Http2)).unwrap();
            let mut waits = Vec::new();
            for i in 0..20u8 {
                // Sent from another thread after the worker has gone idle.
                let p = peer.try_clone().unwrap();
                let sender = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(5));
                    let at = std::time::Instant::now();
                    p.send_to(&[i], local).unwrap();
                    at
                });
                assert_eq!(recv_one(&e, id).await.unwrap(), vec![i], "{b:?}");
                let got = std::time::Instant::now();
                waits.push(got.saturating_duration_since(sender.join().unwrap()));
            }
            waits.sort();
            assert!(
                waits[waits.len() / 2] < Duration::from_millis(5),
                "{b:?}: a lone datagram waited {:?} (median) for the worker",
                waits[waits.len() / 2]
            );
        });
    }
}
