//! Per-core relay logic with no I/O: target policy, flow state, limits.

pub mod auth;
pub mod flow;
pub mod limits;
pub mod policy;
