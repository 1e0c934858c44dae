//! `alloc.rs` again, with the relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "alloc.rs"]
mod on_mmsg;
