//! `h2_relay.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "h2_relay.rs"]
mod on_mmsg;
