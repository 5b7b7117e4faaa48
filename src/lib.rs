//! OneCard Gateway: authorizes taps and scans of the resident-services card
//! in microseconds and records every decision durably.
//!
//! How the modules fit (the life of one tap, DESIGN.md):
//!
//! - [`ingress`] accepts mTLS connections (HTTP/1.1 or HTTP/2), takes the
//!   terminal id from the client certificate, applies [`admission`] limits
//!   and reads a bounded body;
//! - [`gateway`] runs the phases: [`wire`] decodes and validates,
//!   [`idempotency`] replays a repeated (terminal, event_id), [`credential`]
//!   resolves the card, [`authz`] decides (pure, no I/O), and [`journal`]
//!   group-commits the record durably before the answer goes out;
//! - [`state`] holds cards and the deny list in memory (lock-free reads) and
//!   in RocksDB; [`admin`] changes them (one at a time, or in bulk through
//!   [`import`]) and serves `/metrics`, `/healthz`, `/readyz`; [`routes`]
//!   is the table of everything both listeners serve; [`disburse`] takes
//!   batches of subsidies and wages and journals them as credits;
//! - [`settle`] (being built, not wired in yet) turns approved events into
//!   signed batches for the downstream systems;
//! - [`server`] starts and stops it all; [`config`] is the one typed config;
//!   [`certs`], [`client`] and [`demo`] serve development, tests and the
//!   load generator.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod audit;
pub mod authz;
pub mod cardlife;
pub mod certs;
pub mod client;
pub mod clock;
pub mod config;
pub mod crashpoint;
pub mod credential;
pub mod demo;
pub mod disburse;
pub mod gateway;
pub mod holds;
pub mod hotline;
pub mod idempotency;
pub mod import;
pub mod ingress;
pub mod journal;
pub mod model;
pub mod offline;
pub mod privacy;
pub mod qr;
pub mod rng;
pub mod routes;
pub mod scenario;
pub mod server;
pub mod settle;
pub mod state;
pub mod telemetry;
pub mod wire;
