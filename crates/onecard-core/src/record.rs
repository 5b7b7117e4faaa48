//! The journal's record of a decision, as settlement, the hotline and a
//! restart read it. Card numbers are stored in the clear (the downstream
//! systems book by card) and shown masked: [`StoredCardNo`] formats so.

use serde::{Deserialize, Serialize};

use crate::model::StoredCardNo;

/// A decision as the journal keeps it: enough to answer an agent's question
/// about a transaction and to settle it later. Card numbers are stored (the
/// downstream systems book by card); they are masked wherever they are shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// When the gateway decided, in Unix milliseconds.
    pub at_ms: i64,
    pub terminal: String,
    pub event_id: String,
    pub auth_id: String,
    pub kind: crate::model::EventKind,
    /// Empty only for a reversal of an event the gateway never saw.
    #[serde(default, skip_serializing_if = "StoredCardNo::is_empty")]
    pub card_no: StoredCardNo,
    /// `None` only for a reversal of an event the gateway never saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<crate::model::Scenario>,
    /// What the terminal asked for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub amount_fen: Option<i64>,
    /// `approve`, `decline`, or `reverse` for a reversal (of `terminal`'s
    /// `event_id`; `auth_id` is then the reversal's own id); `credit` for
    /// a disbursement; `hold` and `void` for a medical hold and its
    /// release, which settlement does not take (a capture is an
    /// `approve`).
    pub decision: String,
    pub reason: crate::model::Reason,
    /// What was charged (0 for a decline); for a reversal, what it gave
    /// back (the original charge, or 0 when there was none).
    pub charged_fen: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub site: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub occurred_at: Option<String>,
    /// For a reversal: the auth_id of the approval it reverses (`None` when
    /// the event was never seen).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reverses: Option<String>,
    /// For a scan: the code it spent (never the card number).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scan: Option<ScanRef>,
    /// Decided by the terminal while offline, uploaded later.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub offline: bool,
    /// Transit and culture: how the charge was worked out (base,
    /// concession, transfer, cap).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fare: Option<crate::scenario::Fare>,
    /// A public payment's bill reference, settled with the charge.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bill_ref: Option<String>,
    /// For a credit (`decision: "credit"`, money paid to the card's
    /// account): the disbursement record that paid it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credit: Option<CreditRef>,
    /// Medical: the bill's split between insurance and self-pay (a
    /// capture's as booked; a hold's as it would have been), settled with
    /// the charge so the medical sink sees both parts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub split: Option<crate::scenario::medical::Split>,
    /// For a medical hold's capture or void: the terminal's event id of
    /// the hold it closes. A step at the counter, not a card presented:
    /// the rollout report counts the hold, not its steps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hold_event_id: Option<String>,
}

impl DecisionRecord {
    /// The record as the journal stores it (JSON), written into a buffer
    /// sized for a typical record, so that it does not grow on the way
    /// (serde_json's `to_vec` starts at 128 bytes and doubles).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RECORD_BYTES_TYPICAL);
        serde_json::to_writer(&mut v, self).expect("a decision record always serializes");
        v
    }
}

/// What a record's buffer starts with: a transit approval with its fare
/// is some 400 bytes.
const RECORD_BYTES_TYPICAL: usize = 512;

/// A blank record, for filling in with struct update syntax: every field a
/// decision does not set stays empty (`kind` tap, `reason` OK, `decision`
/// empty; a record is never written without its decision).
impl Default for DecisionRecord {
    fn default() -> Self {
        DecisionRecord {
            at_ms: 0,
            terminal: String::new(),
            event_id: String::new(),
            auth_id: String::new(),
            kind: crate::model::EventKind::Tap,
            card_no: StoredCardNo::default(),
            scenario: None,
            amount_fen: None,
            decision: String::new(),
            reason: crate::model::Reason::Ok,
            charged_fen: 0,
            site: None,
            occurred_at: None,
            reverses: None,
            scan: None,
            offline: false,
            fare: None,
            bill_ref: None,
            credit: None,
            split: None,
            hold_event_id: None,
        }
    }
}

/// What a credit pays: a disbursement batch's record and its programme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditRef {
    pub batch_id: String,
    pub record_id: String,
    pub programme: String,
    /// A wages programme's project and month (`YYYY-MM`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub month: Option<String>,
}

/// What a scan spent, kept in its journal record so that the replay cache
/// can be rebuilt after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRef {
    /// The credential id (`sub`), never the card number.
    pub sub: String,
    pub jti: String,
    /// Until when the code is remembered (its `exp` plus the skew).
    pub forget_at: i64,
}
