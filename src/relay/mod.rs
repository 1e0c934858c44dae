//! Per-core relay logic with no I/O: target policy, flow state, limits.

pub mod admission;
pub(crate) mod arena;
pub mod auth;
pub mod flow;
pub mod flow_table;
pub mod h3;
pub mod limits;
pub mod policy;
