//! `lifecycle.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "lifecycle.rs"]
mod on_mmsg;
