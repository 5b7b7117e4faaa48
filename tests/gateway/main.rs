//! Black-box tests of the gateway: each starts a real gateway (or the
//! real binary) on loopback and speaks to it over real sockets, with real
//! certificates, as terminals, operators and downstream receivers do.
//!
//! One test harness, one module per area, so the tests link once (each
//! test binary links the gateway and RocksDB).

mod common;

mod applications;
mod authorize;
mod cardlife;
mod cli;
mod cluster;
mod complaints;
mod credentials;
mod dashboard;
mod disburse;
mod disk;
mod durability;
mod import;
mod limits;
mod masking;
mod medical;
mod observe;
mod offline;
mod openapi;
mod ops;
mod reverse;
mod revocation;
mod rollout;
mod scenarios;
mod settle_receiver;
mod settlement;
mod simulation;
mod stats;
mod strict_receiver;
