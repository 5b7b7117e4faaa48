//! The services: what the gateway does with a request, between the HTTP
//! layer above and the store below. Every terminal request (authorize,
//! scan, hold, capture, void, reverse) runs the same named phases of
//! [`pipeline`]; the rules themselves are the core crate's.

pub mod applications;
pub mod authorize;
pub mod cardlife;
pub mod complaints;
pub mod credential;
pub mod disburse;
pub mod error;
pub mod gateway;
pub mod holds;
pub mod hotline;
pub mod idempotency;
pub mod import;
pub mod logs;
pub mod metrics;
pub mod offline;
pub mod pipeline;
pub mod replay;
pub mod reverse;
pub mod rollout;
pub mod settle;
pub mod sigbatch;
pub mod sinks;
pub mod stats;
pub mod terminals;
pub mod timing;
pub mod trust;
