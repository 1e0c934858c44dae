//! The I/O edge: the only place that makes syscalls directly or holds `unsafe`.
//!
//! The rest of the relay sees sockets through the small types here: [`udp::FlowSocket`] (one
//! connected UDP socket per flow, with the options RFC 9298 asks for), [`quic_socket`] (the
//! worker's QUIC socket) and [`tcp::reuseport_listener`] (one SO_REUSEPORT listener per worker).
//! Every UDP socket of a worker is served by its [`dgram::Engine`]: io_uring with provided
//! buffers and batched submissions, or recvmmsg/sendmmsg + epoll where io_uring is unusable;
//! the choice is made at start by probing and is invisible to `relay/` and `proto/`.

pub mod alloc;
pub mod bpf;
pub mod dgram;
pub mod memory;
pub mod notify;
pub mod quic_socket;
pub mod resolve;
pub mod sandbox;
pub mod sockopt;
pub mod sysctl;
pub mod tcp;
pub mod udp;
