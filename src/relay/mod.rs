//! Per-core relay logic with no I/O: the flow table, the flow state machine, the one admission
//! pipeline of every protocol, the HTTP/3 session (over quinn-proto, sans-I/O), target policy,
//! authentication, limits.

pub mod admission;
pub(crate) mod arena;
pub mod auth;
pub mod flow;
pub mod flow_table;
pub mod h3;
pub mod limits;
pub mod policy;
pub mod slots;
