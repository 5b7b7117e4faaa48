//! The load generator's logic, kept apart from its sockets so that it can
//! be tested: load profiles, the open-loop schedule with its
//! coordinated-omission arithmetic, the Zipf draw of cards, the request mix
//! and the summary.

pub mod mix;
pub mod profile;
pub mod report;
pub mod rng;
pub mod runner;
pub mod zipf;
