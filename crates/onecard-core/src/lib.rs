//! The pure core of OneCard Gateway: what a card, a tap and a decision
//! are, and every rule that turns one into the other. Nothing here does
//! I/O: no file, socket, database or clock is reached from this crate's
//! rules (its `Cargo.toml` has no such dependency); the gateway reads the
//! world, hands the facts and the time in, and writes down what comes out.
//!
//! - [`model`]: card numbers (masked whenever shown), cards, scenarios,
//!   reasons; [`record`]: the journal's record of a decision;
//!   [`deny`]: the deny list's vocabulary; [`time`]: the clock as a value;
//! - [`wire`]: the terminal API's requests (strict decoding, messages that
//!   never echo a value), answers and error codes;
//! - [`authz`]: `decide` and its [`authz::Policy`]; [`scenario`]: each
//!   scenario's rules (fares, quotas, doors, identity, health, medical
//!   splits, partner regions);
//! - [`cardlife`]: card-life transitions; [`holds`]: capture and void of a
//!   medical hold; [`disburse`]: disbursement batches and their rules;
//!   [`qr`]: signed QR codes (verification and issuing);
//!   [`application`]: card applications' states and steps, a new card's
//!   concessions; [`catalogue`]: the unit that answers for each scenario
//!   and site; [`complaint`]: complaints' categories and how one closes;
//!   [`rollout`]: what the journal's records add to the rollout report,
//!   and its CSV;
//! - [`settle`]: settlement batches ([`settle::batch`]), backoff and the
//!   circuit breaker ([`settle::retry`]), batch signatures
//!   ([`settle::sign`]);
//! - [`privacy`]: personal ID numbers (checksum, keyed hash, masks);
//!   [`rng`]: a small seeded generator;
//! - [`window`]: the last minute's figures second by second (HdrHistograms
//!   in one-second slots), for the SRE's latency windows.
//!
//! The small functions on the decision's path are `#[inline]`: the gateway
//! calls them across the crate boundary, where (without LTO) only inline
//! and generic functions can be inlined, and `decide` runs per tap.
#![forbid(unsafe_code)]

/// A value that breaks a rule: a request's field or a config's key, named
/// with the rule in the message, never quoting the value (it may be a card
/// number). On the wire every one is `INVALID_REQUEST`; in a config, the
/// start is refused with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(message: impl Into<String>) -> Invalid {
        Invalid(message.into())
    }
}

impl From<String> for Invalid {
    fn from(message: String) -> Invalid {
        Invalid(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Invalid {
        Invalid(message.to_owned())
    }
}

pub mod application;
pub mod authz;
pub mod cardlife;
pub mod catalogue;
pub mod complaint;
pub mod deny;
pub mod disburse;
pub mod hex;
pub mod holds;
pub mod model;
pub mod privacy;
pub mod qr;
pub mod record;
pub mod rng;
pub mod rollout;
pub mod scenario;
pub mod settle;
pub mod time;
pub mod window;
pub mod wire;
