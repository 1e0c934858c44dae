//! `vanishing.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "vanishing.rs"]
mod on_mmsg;
