//! OneCard Gateway: authorizes taps and scans of the resident-services card
//! in microseconds and records every decision durably.
//!
//! The rules live in the pure core crate ([`onecard_core`]); this crate
//! does the I/O around them, in layers that only look down (ARCHITECTURE.md
//! lists them; a test holds the code to it):
//!
//! 1. [`config`]: the one typed config, read from TOML and validated;
//! 2. [`net`]: TLS material, development certificates, the outbound
//!    HTTPS client;
//! 3. [`store`]: RocksDB, the durability seam and its group commit, the
//!    tables kept in memory and on disk;
//! 4. [`service`]: the pipeline of named phases that every terminal
//!    request runs (authorize, scan, hold, capture, void, reverse), card
//!    life, disbursements, imports, offline validators, the hotline,
//!    settlement's delivery;
//! 5. [`http`]: the listeners (TLS, HTTP/1.1 and HTTP/2, admission,
//!    bounded bodies), the route table, the terminal and admin routes, and
//!    the one mapping of errors to statuses;
//! 6. [`app`]: starting and stopping it all, telemetry, the demo, the
//!    settlement receiver `onecard sink-sim`; the binary (`main.rs`) is
//!    a thin command line over it.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod http;
pub mod net;
pub mod service;
pub mod store;

#[cfg(test)]
mod layering;
