//! `h3_relay.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "h3_relay.rs"]
mod on_mmsg;
