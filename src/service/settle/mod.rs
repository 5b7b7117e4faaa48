//! Settlement's delivery: one task per configured sink follows the journal
//! from a durable cursor, seals batches (the core crate's
//! `settle::batch`), stores each before sending it, sends it over HTTPS
//! and forgets it on a matching acknowledgement ([`deliver`]); each sink's
//! status is shared with the operators' API and `/readyz` ([`status`]).

pub mod deliver;
pub mod status;
