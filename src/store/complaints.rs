//! Complaints as kept: one record per complaint, with the transaction it
//! is about and every step taken on it. Never deleted; read on the admin
//! path only.
//!
//! `complaints`: `c/<id>` → [`Complaint`] (JSON). The id is derived from
//! the agent's request id ([`complaint_id`]), so that a retried filing
//! finds the complaint it made.

use serde::{Deserialize, Serialize};

use onecard_core::complaint::{Category, ComplaintState, Outcome};
use onecard_core::model::{Scenario, StoredCardNo};

use crate::store::{Cf, Store, StoreError};

/// Steps kept per complaint at most (notes included).
pub const STEPS_MAX: usize = 64;
/// Complaints listed at most.
pub const LISTED_MAX: usize = 10_000;

/// The transaction a complaint is about, as the journal recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxRef {
    pub seq: u64,
    pub auth_id: String,
    pub terminal: String,
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<Scenario>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub decision: String,
    pub reason: String,
    pub charged_fen: i64,
    pub at_ms: i64,
}

/// One step: filed, a note, closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub by: String,
    pub role: String,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How it was closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    pub outcome: Outcome,
    pub note: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referred_to: Option<String>,
    /// A refund: the reversal's answer (status, reversal id, amount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reversal: Option<serde_json::Value>,
    pub by: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complaint {
    pub id: String,
    pub request_id: String,
    /// SHA-256 of what the filing asked: a retry must ask the same.
    pub request_fingerprint: String,
    pub card_no: StoredCardNo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<TxRef>,
    pub category: Category,
    /// What the resident says, as the agent wrote it down.
    pub says: String,
    /// The unit that answers for it (the transaction's scenario and site
    /// in `[catalogue]`, or the card's issuer).
    pub unit: String,
    pub state: ComplaintState,
    pub filed_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closing: Option<Closing>,
    pub steps: Vec<Step>,
}

impl Complaint {
    pub fn add_step(&mut self, step: Step) {
        if self.steps.len() < STEPS_MAX {
            self.steps.push(step);
        }
    }
}

/// The complaint id an agent's request id makes: `CP` and 20
/// hexadecimal digits ([`crate::store::derived_id`]).
pub fn complaint_id(request_id: &str) -> String {
    crate::store::derived_id("CP", "onecard-complaint", request_id)
}

pub fn key(id: &str) -> Vec<u8> {
    format!("c/{id}").into_bytes()
}

pub fn encode(c: &Complaint) -> Vec<u8> {
    serde_json::to_vec(c).expect("plain records always serialize")
}

pub async fn get(store: &Store, id: &str) -> Result<Option<Complaint>, StoreError> {
    store.read_json(Cf::Complaints, &key(id)).await
}

/// Every complaint for which `keep` holds, at most `max`.
pub fn all_where(
    store: &Store,
    max: usize,
    keep: impl FnMut(&Complaint) -> bool,
) -> Result<Vec<Complaint>, StoreError> {
    store.scan_json(Cf::Complaints, b"c/", max, keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_request_and_shaped() {
        let a = complaint_id("12345/2026-12-07/0042");
        assert_eq!(a, complaint_id("12345/2026-12-07/0042"));
        assert!(crate::store::is_derived_id("CP", &a), "{a}");
        assert!(!crate::store::is_derived_id("CP", "AP00000000000000000000"));
    }
}
