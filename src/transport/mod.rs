//! Adapters between the client protocols and the relay: QUIC (quinn-proto driven by the worker)
//! and HTTP/3, TLS, HTTP/2, HTTP/1.1, the shared flow loop, and opening target sockets. These do
//! I/O through tokio and `crate::io`.

pub mod h2;
pub mod http1;
pub mod quic;
pub mod stall;
pub mod target;
pub mod tls;
