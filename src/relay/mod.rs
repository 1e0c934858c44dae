//! Per-core relay logic with no I/O: target policy, flow state, limits.

pub mod flow;
pub mod policy;
