//! The audit trail: who changed a card's life, and who looked a card up.
//!
//! Every card-life change (loss report, freeze, replacement...) and every
//! hotline look-up of a card's transactions leaves an entry naming the
//! admin token's holder and role. Entries are written in the same journal
//! commit as the change they describe, so a change is never durable
//! without its entry; a look-up's entry is durable before its answer.

use onecard_core::model::StoredCardNo;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::store::durable::Op;
use crate::store::{decode_u64, Cf, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// The admin token's name.
    pub who: String,
    pub role: String,
    /// `report_loss`, `lift_loss`, `freeze`, `unfreeze`, `replace`,
    /// `cancel`, `bind`, `unbind`, `holder`, `find`, `transactions`;
    /// `disburse` (a disbursement batch recorded) and `roster` (a
    /// project's workers replaced).
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_no: Option<StoredCardNo>,
    /// What else the action needs to be understood (never a personal ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

pub struct Audit {
    next: AtomicU64,
}

impl Audit {
    pub fn load(store: &Store) -> Result<Audit, StoreError> {
        let next = match store.last_key(Cf::Audit)? {
            Some(k) => {
                decode_u64(&k).ok_or(StoreError::Corrupt {
                    cf: "audit",
                    detail: "key is not a u64".into(),
                })? + 1
            }
            None => 1,
        };
        Ok(Audit {
            next: AtomicU64::new(next),
        })
    }

    /// The write that records `entry` under the next number.
    pub fn op(&self, entry: &AuditEntry) -> Op {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        Op::Put(
            Cf::Audit,
            seq.to_be_bytes().to_vec(),
            serde_json::to_vec(entry).expect("an audit entry serializes"),
        )
    }
}

/// Up to `limit` entries, newest first, from number `before` down
/// (exclusive; `None`: from the newest).
pub fn list(
    store: &Store,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
    let start = before.map_or(u64::MAX, |b| b.saturating_sub(1));
    let mut out = Vec::new();
    let mut bad = false;
    store.scan_back(Cf::Audit, &start.to_be_bytes(), |k, v| {
        match (decode_u64(k), serde_json::from_slice::<AuditEntry>(v)) {
            (Some(seq), Ok(e)) if before.is_none_or(|b| seq < b) => out.push((seq, e)),
            (Some(_), Ok(_)) => {}
            _ => bad = true,
        }
        !bad && out.len() < limit
    })?;
    if bad {
        return Err(StoreError::Corrupt {
            cf: "audit",
            detail: "an entry does not decode".into(),
        });
    }
    Ok(out)
}
