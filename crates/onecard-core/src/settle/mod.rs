//! Settlement's pure parts: the batches a sink receives from journal
//! records ([`batch`]), backoff with jitter and the circuit breaker
//! ([`retry`]), and the batch signatures a receiver checks ([`sign`]).

pub mod batch;
pub mod retry;
pub mod sign;
