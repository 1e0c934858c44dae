//! The I/O edge: the only place that makes syscalls directly or holds `unsafe`.
//!
//! The rest of the relay sees sockets through the small types here: [`udp::FlowSocket`] (one
//! connected UDP socket per flow, with the options RFC 9298 asks for) and
//! [`tcp::reuseport_listener`] (one SO_REUSEPORT listener per worker). The datagram backend behind
//! `FlowSocket` is the tokio reactor (epoll) today; an io_uring backend replaces it behind the same
//! methods, without `relay/` or `proto/` noticing.

pub mod bpf;
pub mod memory;
pub mod notify;
pub mod quic_socket;
pub mod sockopt;
pub mod sysctl;
pub mod tcp;
pub mod udp;
