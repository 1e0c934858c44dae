//! `auth_limits.rs` again, with every relay on the recvmmsg/sendmmsg + epoll fallback backend.

#[path = "auth_limits.rs"]
mod on_mmsg;
