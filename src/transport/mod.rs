//! Adapters between the client protocols and the worker's pass: QUIC (a quinn-proto endpoint
//! the pass drives; the HTTP/3 session over it is in `relay::h3`), TLS, the HTTP/2 and
//! HTTP/1.1 connection tasks and what they tell the pass (`link`), the write-stall guard, and target name resolution and choice.

pub(crate) mod coalesce;
pub mod h2;
pub mod http1;
pub(crate) mod link;
pub mod quic;
pub mod stall;
pub mod target;
pub mod tls;
