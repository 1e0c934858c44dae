//! The engine on both backends, over loopback: egress sockets both ways with source addresses,
//! GSO trains out and GRO trains in, ICMP errors through the error queue, truncation, pool
//! exhaustion, the close lifecycle, the QUIC socket, and waking an idle worker.

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
    } else {
        println!("SKIP (io_uring): {:?}", uring::probe());
    }
    v
}

fn sizes() -> Sizes {
    Sizes {
        target_buffer_size: 65_536,
        target_buffers: 64,
        quic_buffers: 8,
    }
}

/// Runs `f` with an engine of `backend` on a current-thread runtime.
fn with_engine<F, Fut>(backend: Backend, sizes: Sizes, f: F)
where
    F: FnOnce(Rc<Engine>, Arc<EngineStats>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let stats = Arc::new(EngineStats::default());
        let e = Rc::new(Engine::new(backend, sizes, stats.clone()).unwrap());
        tokio::time::timeout(Duration::from_secs(10), f(e.clone(), stats))
            .await
            .unwrap_or_else(|_| panic!("{backend:?}: timed out"));
    });
}

/// An egress socket on loopback, registered; returns its id and address.
fn egress(e: &Engine, gro: bool) -> (SockId, SocketAddr) {
    let s = crate::io::udp::open_egress(false, Some("127.0.0.1".parse().unwrap()), 1 << 20, gro)
        .unwrap();
    let local = s.local_addr().unwrap();
    (e.register(s, Role::Egress).unwrap(), local)
}

/// One pass: completions in, sends out.
fn pass(e: &Engine) {
    e.complete();
    e.flush();
}

/// Passes until the kernel has had time to deliver and take what was queued.
async fn settle(e: &Engine) {
    for _ in 0..6 {
        pass(e);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pass(e);
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

/// The next datagram on `id` and its source, waiting on the engine like the worker does.
async fn recv_one(e: &Engine, id: SockId) -> (Vec<u8>, Option<SocketAddr>) {
    loop {
        e.complete();
        if let Some(rx) = e.try_recv(id) {
            return (rx.data().to_vec(), rx.addr);
        }
        e.flush();
        let _ = tokio::time::timeout(Duration::from_millis(20), e.wait()).await;
    }
}

#[test]
fn egress_socket_relays_both_ways_with_source_addresses() {
    for b in backends() {
        with_engine(b, sizes(), |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = peer.local_addr().unwrap();
            let (id, local) = egress(&e, false);
            for i in 0..20u8 {
                assert!(e.send(id, to, Bytes::from(vec![i; 100 + i as usize]), 1));
            }
            let mut buf = [0u8; 4096];
            settle(&e).await;
            for i in 0..20u8 {
                let (n, from) = recv_from(&peer, &mut buf);
                assert_eq!(from, local);
                assert_eq!(&buf[..n], &vec![i; 100 + i as usize][..], "{b:?} {i}");
            }
            // Replies come with their source; a third host's too (the worker filters).
            let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
            for i in 0..5u8 {
                peer.send_to(&[i; 33], local).unwrap();
            }
            stranger.send_to(b"spoof", local).unwrap();
            for i in 0..5u8 {
                assert_eq!(recv_one(&e, id).await, (vec![i; 33], Some(to)), "{b:?}");
            }
            let (d, from) = recv_one(&e, id).await;
            assert_eq!(
                (d.as_slice(), from),
                (&b"spoof"[..], stranger.local_addr().ok())
            );
            // Sends are counted per tag when the kernel took them.
            assert_eq!(stats.sent[1][0].get(), 20, "{b:?}: to-target count");
            assert_eq!(stats.sent[0][0].get(), 0);
            e.close(id);
        });
    }
}

#[test]
fn sends_to_one_destination_in_one_pass_go_out_as_one_gso_message() {
    if !gso_supported() {
        println!("SKIP: no UDP GSO here");
        return;
    }
    for b in backends() {
        with_engine(b, sizes(), |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let other = UdpSocket::bind("127.0.0.1:0").unwrap();
            let (id, _) = egress(&e, false);
            settle(&e).await;
            let before = stats.submissions.get();
            // Interleaved with datagrams to another destination: each destination's run is
            // gathered (in order) into one message.
            for i in 0..10u8 {
                e.send(id, peer.local_addr().unwrap(), Bytes::from(vec![i; 500]), 0);
                e.send(
                    id,
                    other.local_addr().unwrap(),
                    Bytes::from(vec![i; 300]),
                    0,
                );
            }
            e.send(
                id,
                peer.local_addr().unwrap(),
                Bytes::from(vec![10; 120]),
                0,
            );
            pass(&e);
            let mut buf = [0u8; 4096];
            for i in 0..11u8 {
                let (n, _) = recv_from(&peer, &mut buf);
                let want = if i == 10 { 120 } else { 500 };
                assert_eq!(n, want, "{b:?}: cut at segment boundaries");
                assert!(buf[..n].iter().all(|&x| x == i));
            }
            for i in 0..10u8 {
                let (n, _) = recv_from(&other, &mut buf);
                assert_eq!((n, buf[0]), (300, i), "{b:?}");
            }
            settle(&e).await;
            assert_eq!(
                stats.submissions.get() - before,
                2,
                "{b:?}: 21 datagrams to two destinations, two messages"
            );
        });
    }
}

#[test]
fn gro_trains_arrive_whole_and_split_into_their_datagrams() {
    if !gso_supported() {
        println!("SKIP: no UDP GSO here");
        return;
    }
    for b in backends() {
        with_engine(b, sizes(), |e, _| async move {
            let (tx, _) = egress(&e, false);
            let (rx, rx_addr) = egress(&e, true);
            for i in 0..10u8 {
                e.send(tx, rx_addr, Bytes::from(vec![i; 1200]), 0);
            }
            pass(&e);
            let mut got = Vec::new();
            while got.len() < 10 {
                e.complete();
                if let Some(r) = e.try_recv(rx) {
                    got.extend(r.datagrams().map(<[u8]>::to_vec));
                    continue;
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), e.wait()).await;
            }
            for (i, d) in got.iter().enumerate() {
                assert_eq!(d, &vec![i as u8; 1200], "{b:?}");
            }
        });
    }
}

#[test]
fn icmp_errors_name_the_destination_they_were_about() {
    for b in backends() {
        with_engine(b, sizes(), |e, _| async move {
            let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
            let dead = gone.local_addr().unwrap();
            drop(gone);
            let live = UdpSocket::bind("127.0.0.1:0").unwrap();
            let (id, _) = egress(&e, false);
            e.send(id, dead, Bytes::from_static(b"hello"), 0);
            e.send(id, live.local_addr().unwrap(), Bytes::from_static(b"hi"), 0);
            let mut errors = Vec::new();
            for _ in 0..100 {
                settle(&e).await;
                e.take_errors(&mut errors);
                if !errors.is_empty() {
                    break;
                }
            }
            assert_eq!(
                errors,
                vec![SockError {
                    sock: id,
                    dest: dead,
                    errno: libc::ECONNREFUSED
                }],
                "{b:?}"
            );
            // The socket goes on for its other destinations.
            let mut buf = [0u8; 16];
            assert_eq!(recv_from(&live, &mut buf).0, 2);
            live.send_to(b"back", e.local_addr(id).unwrap()).unwrap();
            assert_eq!(recv_one(&e, id).await.0, b"back");
        });
    }
}

#[test]
fn oversize_datagrams_are_dropped_and_counted_never_relayed_cut() {
    for b in backends() {
        let s = Sizes {
            target_buffer_size: 2048,
            ..sizes()
        };
        with_engine(b, s, |e, stats| async move {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            let (id, local) = egress(&e, false);
            peer.send_to(&[7u8; 3000], local).unwrap();
            peer.send_to(&[8u8; 2048], local).unwrap();
            assert_eq!(recv_one(&e, id).await.0, vec![8u8; 2048], "{b:?}");
            assert_eq!(stats.drops_for(IoDrop::Truncated), 1, "{b:?}");
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
                let (id, local) = egress(&e, false);
                ids.push(id);
                locals.push(local);
            }
            // A socket whose consumer sleeps holds at most half of what is free (here 2 of
            // 8 buffers, its burst); beyond, datagrams are dropped and counted, not queued.
            for d in [b"a", b"b", b"c", b"d"] {
                peer.send_to(d, locals[0]).unwrap();
            }
            settle(&e).await;
            assert_eq!(
                stats.drops_for(IoDrop::BacklogFull),
                2,
                "{b:?}: backlog share"
            );
            assert_eq!(recv_one(&e, ids[0]).await.0, b"a");
            assert_eq!(recv_one(&e, ids[0]).await.0, b"b");
            // Eleven sleeping consumers take the eight buffers; three datagrams find none and
            // wait in their socket buffers: receiving pauses, nothing is lost.
            for (i, l) in locals.iter().enumerate().skip(1) {
                peer.send_to(&[i as u8], l).unwrap();
            }
            settle(&e).await;
            assert_eq!(e.free_buffers()[0], 0, "{b:?}: pool used up");
            assert!(stats.receive_paused[0].get() >= 1, "{b:?}: pause counted");
            assert_eq!(stats.drops_for(IoDrop::BacklogFull), 2, "{b:?}");
            // No stall: as consumers catch up, the datagrams that waited are delivered.
            for (i, id) in ids.iter().enumerate().skip(1) {
                assert_eq!(recv_one(&e, *id).await.0, vec![i as u8], "{b:?}");
            }
            settle(&e).await;
            assert_eq!(e.free_buffers()[0], 8, "{b:?}: every buffer back");
            assert_eq!(stats.drops_for(IoDrop::KernelDropped), 0, "{b:?}");
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
            let s =
                crate::io::udp::open_egress(false, Some("127.0.0.1".parse().unwrap()), 0, false)
                    .unwrap();
            // A small receive buffer the flood below overflows while the pool is empty.
            socket2::SockRef::from(&s)
                .set_recv_buffer_size(4096)
                .unwrap();
            let local = s.local_addr().unwrap();
            let id = e.register(s, Role::Egress).unwrap();
            for i in 0..200u32 {
                peer.send_to(&i.to_be_bytes(), local).unwrap();
            }
            settle(&e).await;
            // Drain everything that survived; the next datagram carries the kernel's count.
            let mut got = 0u64;
            loop {
                let r = tokio::time::timeout(Duration::from_millis(200), recv_one(&e, id)).await;
                if r.is_err() {
                    break;
                }
                got += 1;
                if got == 1 {
                    // Once the backlog moves, one more datagram brings the report.
                    peer.send_to(b"last", local).unwrap();
                }
            }
            let lost =
                stats.drops_for(IoDrop::KernelDropped) + stats.drops_for(IoDrop::BacklogFull);
            assert!(
                stats.drops_for(IoDrop::KernelDropped) > 0,
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
                let (id, local) = egress(&e, false);
                peer.send_to(b"x", local).unwrap();
                if round % 2 == 0 {
                    recv_one(&e, id).await; // one datagram taken, maybe more waiting
                }
                e.close(id);
            }
            settle(&e).await;
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
            let (d, from) = recv_one(&e, id).await;
            assert_eq!(from, Some(client.local_addr().unwrap()), "{b:?}");
            assert_eq!(d, vec![1u8; 1200]);
            let mut buf = e.tx_buf();
            buf.extend_from_slice(&[2u8; 2400]);
            assert!(e.send_transmit(
                id,
                Transmit {
                    dest: client.local_addr().unwrap(),
                    buf,
                    segment_size: Some(1200),
                    ecn: 0,
                    src_ip: None,
                }
            ));
            pass(&e);
            let mut rbuf = [0u8; 4096];
            for _ in 0..2 {
                let (n, from) = recv_from(&client, &mut rbuf);
                assert_eq!((n, from), (1200, local), "{b:?}");
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
            let (id, local) = egress(&e, false);
            settle(&e).await;
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
                let got = loop {
                    e.wait().await;
                    e.complete();
                    if let Some(rx) = e.try_recv(id) {
                        assert_eq!(rx.data(), [i], "{b:?}");
                        break std::time::Instant::now();
                    }
                };
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

#[test]
fn send_buffers_beyond_the_kept_ones_go_back_to_the_allocator() {
    let mut bufs = TxBufs::default();
    // A burst: many transmits in flight at once, then all of them back.
    let out: Vec<Vec<u8>> = (0..10 * TxBufs::KEPT).map(|_| bufs.take()).collect();
    assert!(out.iter().all(|b| b.is_empty() && b.capacity() >= 65_536));
    for b in out {
        bufs.put(b);
    }
    assert_eq!(bufs.0.len(), TxBufs::KEPT);
    // A buffer that is not one of them (too small for a transmit) is not kept.
    let mut few = TxBufs::default();
    few.put(Vec::with_capacity(100));
    assert!(few.0.is_empty());
    // A reused buffer comes back empty.
    let mut b = bufs.take();
    b.extend_from_slice(b"old");
    bufs.put(b);
    assert!(bufs.take().is_empty());
}
