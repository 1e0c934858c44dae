//! `metrics.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "metrics.rs"]
mod on_mmsg;
