//! The deny list: cards that must be declined everywhere, with a version
//! that every change bumps and a log of changes for offline validators.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::authz::DenySet;
use crate::journal::{Commit, Journal, JournalError, Op};
use crate::model::CardNo;
use crate::state::store::meta;
use crate::state::{Cf, Store, StoreError};

/// A deny-list reason: 1 to this many characters.
pub const DENY_REASON_LEN_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyEntry {
    pub reason: String,
    /// The deny-list version that added (or last changed) this entry.
    pub version: u64,
    pub added_at_ms: i64,
}

/// One change, as kept in `denylist_log` under its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyChange {
    pub op: DenyOp,
    pub card_no: String,
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

pub struct DenyList {
    map: papaya::HashMap<CardNo, DenyEntry, foldhash::fast::RandomState>,
    version: AtomicU64,
    /// Serializes changes so that versions are assigned in write order.
    change: tokio::sync::Mutex<()>,
}

impl DenySet for DenyList {
    fn contains(&self, card: &CardNo) -> bool {
        self.map.pin().contains_key(card)
    }
}

impl DenyList {
    pub fn new() -> DenyList {
        DenyList::with_capacity(0)
    }

    fn with_capacity(n: usize) -> DenyList {
        DenyList {
            map: papaya::HashMap::with_capacity_and_hasher(
                n,
                foldhash::fast::RandomState::default(),
            ),
            version: AtomicU64::new(0),
            change: tokio::sync::Mutex::new(()),
        }
    }

    pub fn load(store: &Store) -> Result<DenyList, StoreError> {
        let expected = store.estimated_keys(Cf::Denylist);
        let list = DenyList::with_capacity(expected + expected / 8);
        let mut bad = false;
        {
            let map = list.map.pin();
            store.scan(Cf::Denylist, &[], |k, v| {
                let card_no = std::str::from_utf8(k)
                    .ok()
                    .and_then(|s| CardNo::parse(s).ok());
                match (card_no, serde_json::from_slice::<DenyEntry>(v)) {
                    (Some(n), Ok(e)) => {
                        map.insert(n, e);
                        true
                    }
                    _ => {
                        bad = true;
                        false
                    }
                }
            })?;
        }
        if bad {
            return Err(StoreError::Corrupt {
                cf: "denylist",
                detail: "an entry does not decode".into(),
            });
        }
        list.version.store(
            store
                .get_u64(Cf::Meta, meta::DENYLIST_VERSION)?
                .unwrap_or(0),
            Ordering::Release,
        );
        list.publish_gauges();
        Ok(list)
    }

    /// Inserts an entry into memory only, without a version change: for
    /// benchmarks and for building lists in bulk before serving.
    pub fn insert_unversioned(&self, card: CardNo, entry: DenyEntry) {
        self.map.pin().insert(card, entry);
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn get(&self, card: &CardNo) -> Option<DenyEntry> {
        self.map.pin().get(card).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds (or re-reasons) a card; durable before it takes effect in memory.
    /// Returns the new version.
    pub async fn add(
        &self,
        journal: &Journal,
        card: &CardNo,
        reason: &str,
        now_ms: i64,
    ) -> Result<u64, JournalError> {
        self.add_many(journal, &[(card.clone(), reason.to_owned())], now_ms)
            .await
    }

    /// Adds (or re-reasons) many cards in one durable write, each change
    /// with its own version and log entry (so that a validator syncing from
    /// the log sees every one), all taking effect in memory after the write.
    /// Returns the version after the last; the current one if `entries` is
    /// empty.
    pub async fn add_many(
        &self,
        journal: &Journal,
        entries: &[(CardNo, String)],
        now_ms: i64,
    ) -> Result<u64, JournalError> {
        let _serial = self.change.lock().await;
        let mut version = self.version();
        if entries.is_empty() {
            return Ok(version);
        }
        let mut ops = Vec::with_capacity(2 * entries.len() + 1);
        let mut added = Vec::with_capacity(entries.len());
        for (card, reason) in entries {
            version += 1;
            let entry = DenyEntry {
                reason: reason.clone(),
                version,
                added_at_ms: now_ms,
            };
            let change = DenyChange {
                op: DenyOp::Add,
                card_no: card.as_str().to_owned(),
                reason: Some(reason.clone()),
                at_ms: now_ms,
            };
            ops.push(Op::Put(
                Cf::Denylist,
                card.as_str().as_bytes().to_vec(),
                to_json(&entry),
            ));
            ops.push(Op::Put(
                Cf::DenylistLog,
                version.to_be_bytes().to_vec(),
                to_json(&change),
            ));
            added.push((card.clone(), entry));
        }
        ops.push(Op::Put(
            Cf::Meta,
            meta::DENYLIST_VERSION.to_vec(),
            version.to_be_bytes().to_vec(),
        ));
        journal.commit(Commit::new(None, ops)).await?;
        let map = self.map.pin();
        for (card, entry) in added {
            map.insert(card, entry);
        }
        self.version.store(version, Ordering::Release);
        self.publish_gauges();
        Ok(version)
    }

    /// Lifts a card. `Ok(None)` when it was not on the list (nothing changes).
    pub async fn remove(
        &self,
        journal: &Journal,
        card: &CardNo,
        now_ms: i64,
    ) -> Result<Option<u64>, JournalError> {
        let _serial = self.change.lock().await;
        if !self.contains(card) {
            return Ok(None);
        }
        let version = self.version() + 1;
        let change = DenyChange {
            op: DenyOp::Remove,
            card_no: card.as_str().to_owned(),
            reason: None,
            at_ms: now_ms,
        };
        let commit = Commit::new(
            None,
            vec![
                Op::Delete(Cf::Denylist, card.as_str().as_bytes().to_vec()),
                Op::Put(
                    Cf::DenylistLog,
                    version.to_be_bytes().to_vec(),
                    to_json(&change),
                ),
                Op::Put(
                    Cf::Meta,
                    meta::DENYLIST_VERSION.to_vec(),
                    version.to_be_bytes().to_vec(),
                ),
            ],
        );
        journal.commit(commit).await?;
        self.map.pin().remove(card);
        self.version.store(version, Ordering::Release);
        self.publish_gauges();
        Ok(Some(version))
    }

    fn publish_gauges(&self) {
        metrics::gauge!("onecard_denylist_version").set(self.version() as f64);
        metrics::gauge!("onecard_denylist_entries").set(self.len() as f64);
    }
}

impl Default for DenyList {
    fn default() -> Self {
        DenyList::new()
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain records always serialize")
}
