//! The deny list's vocabulary: an entry, a change as validators receive
//! it, and the reasons card-life changes list a card with.

use serde::{Deserialize, Serialize};

use crate::model::StoredCardNo;

/// The reasons card-life changes (loss, freeze, cancellation, replacement)
/// list a card with, as opposed to an operator's own reasons.
pub const DENY_LOST: &str = "card reported lost";
pub const DENY_FROZEN: &str = "card frozen";
pub const DENY_CANCELLED: &str = "card cancelled";
pub const DENY_REPLACED: &str = "card replaced";

/// Whether a deny-list entry was put there by a card-life change.
pub fn is_life_reason(reason: &str) -> bool {
    [DENY_LOST, DENY_FROZEN, DENY_CANCELLED, DENY_REPLACED].contains(&reason)
}

/// A deny-list reason: 1 to this many characters.
pub const DENY_REASON_LEN_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyEntry {
    pub reason: String,
    /// The deny-list version that added (or last changed) this entry.
    pub version: u64,
    /// When the card was first listed (kept when the reason changes).
    pub added_at_ms: i64,
}

/// One change, as kept in `denylist_log` under its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyChange {
    pub op: DenyOp,
    pub card_no: StoredCardNo,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyOp {
    Add,
    Remove,
}
