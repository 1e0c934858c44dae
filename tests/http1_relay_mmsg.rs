//! `http1_relay.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "http1_relay.rs"]
mod on_mmsg;
