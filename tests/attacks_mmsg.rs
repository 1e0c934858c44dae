//! `attacks.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "attacks.rs"]
mod on_mmsg;
