//! The load generator's logic, kept apart from its sockets so that it can
//! be tested: load profiles, the open-loop schedule with its
//! coordinated-omission arithmetic, the Zipf draw of cards, the request mix,
//! the step search for the knee, the summary and its plot.

pub mod mix;
pub mod plot;
pub mod profile;
pub mod report;
pub mod rng;
pub mod runner;
pub mod seed;
pub mod step;
pub mod zipf;
