//! The deny list: cards that must be declined everywhere, with a version
//! that every change bumps and a log of changes for offline validators.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

use onecard_core::authz::{DenySet, Listing};
pub use onecard_core::deny::{
    is_life_reason, DenyChange, DenyEntry, DenyOp, DENY_CANCELLED, DENY_FROZEN, DENY_LOST,
    DENY_REASON_LEN_MAX, DENY_REPLACED,
};
use onecard_core::model::CardNo;

use super::durable::{Commit, CommitError, Durable, Op};
use super::{meta, Cf, Store, StoreError};

/// Deny-list changes planned under [`DenyList::serial`]: the writes to
/// commit, then the in-memory effects to apply.
pub struct Planned {
    pub ops: Vec<Op>,
    version: u64,
    effects: Vec<(CardNo, Option<DenyEntry>)>,
    at_ms: i64,
}

pub struct DenyList {
    map: papaya::HashMap<CardNo, DenyEntry, foldhash::fast::RandomState>,
    version: AtomicU64,
    /// When the list last changed (wall clock, ms), 0 if never: SREs are
    /// paged when a city's list stops changing (its feed may be down).
    updated_at_ms: AtomicI64,
    /// Serializes changes so that versions are assigned in write order.
    change: tokio::sync::Mutex<()>,
}

impl DenySet for DenyList {
    fn contains(&self, card: &CardNo) -> bool {
        self.map.pin().contains_key(card)
    }

    fn listing(&self, card: &CardNo) -> Listing {
        match self.map.pin().get(card) {
            None => Listing::No,
            Some(e) if is_life_reason(&e.reason) => Listing::CardLife,
            Some(_) => Listing::Operator,
        }
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
            updated_at_ms: AtomicI64::new(0),
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
        let version = store
            .get_u64(Cf::Meta, meta::DENYLIST_VERSION)?
            .unwrap_or(0);
        list.version.store(version, Ordering::Release);
        if let Some(change) = store
            .get(Cf::DenylistLog, &version.to_be_bytes())?
            .and_then(|v| serde_json::from_slice::<DenyChange>(&v).ok())
        {
            list.updated_at_ms.store(change.at_ms, Ordering::Release);
        }
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

    /// When the list last changed (ms since the epoch), if it ever did.
    pub fn updated_at_ms(&self) -> Option<i64> {
        Some(self.updated_at_ms.load(Ordering::Acquire)).filter(|&t| t > 0)
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
        journal: &dyn Durable,
        card: &CardNo,
        reason: &str,
        now_ms: i64,
    ) -> Result<u64, CommitError> {
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
        journal: &dyn Durable,
        entries: &[(CardNo, String)],
        now_ms: i64,
    ) -> Result<u64, CommitError> {
        let _serial = self.serial().await;
        let changes: Vec<_> = entries
            .iter()
            .map(|(c, r)| (c.clone(), Some(r.clone())))
            .collect();
        let mut plan = self.plan(&changes, now_ms);
        if plan.ops.is_empty() {
            return Ok(self.version());
        }
        journal
            .commit(Commit::new(None, std::mem::take(&mut plan.ops)))
            .await?;
        Ok(self.follow(journal, plan))
    }

    /// Lifts a card. `Ok(None)` when it was not on the list (nothing changes).
    pub async fn remove(
        &self,
        journal: &dyn Durable,
        card: &CardNo,
        now_ms: i64,
    ) -> Result<Option<u64>, CommitError> {
        let _serial = self.serial().await;
        let mut plan = self.plan(&[(card.clone(), None)], now_ms);
        if plan.ops.is_empty() {
            return Ok(None);
        }
        journal
            .commit(Commit::new(None, std::mem::take(&mut plan.ops)))
            .await?;
        Ok(Some(self.follow(journal, plan)))
    }

    /// After a durable change: memory follows here on one node; in a
    /// cluster the applier has already set it (with the versions the
    /// stream's order gave), and this only reads the version.
    fn follow(&self, journal: &dyn Durable, plan: Planned) -> u64 {
        if journal.applies_memory() {
            self.version()
        } else {
            self.apply(plan)
        }
    }

    /// Cluster mode: renumbers the deny-list writes of one applied commit
    /// in stream order and applies them to memory. Each node planned its
    /// changes from the version it had seen; two nodes changing the list
    /// at once planned the same numbers. Applied in the stream's order,
    /// every change gets the next version after the one before it, on
    /// every node alike, so the log for offline validators has no gap and
    /// no number twice. Other ops pass through unchanged.
    pub fn renumber_and_apply(&self, ops: &mut [super::durable::Op]) -> Result<(), StoreError> {
        use super::durable::Op;
        let corrupt = |detail: &str| StoreError::Corrupt {
            cf: "denylist",
            detail: detail.into(),
        };
        if !ops
            .iter()
            .any(|op| matches!(op, Op::Put(Cf::DenylistLog, ..)))
        {
            return Ok(());
        }
        let mut version = self.version();
        let map = self.map.pin();
        for op in ops.iter_mut() {
            match op {
                Op::Put(Cf::DenylistLog, key, value) => {
                    version += 1;
                    *key = version.to_be_bytes().to_vec();
                    let change: DenyChange = serde_json::from_slice(value)
                        .map_err(|_| corrupt("a change does not decode"))?;
                    self.updated_at_ms.store(change.at_ms, Ordering::Release);
                }
                Op::Put(Cf::Denylist, key, value) => {
                    let mut entry: DenyEntry = serde_json::from_slice(value)
                        .map_err(|_| corrupt("an entry does not decode"))?;
                    entry.version = version;
                    *value = to_json(&entry);
                    let card = std::str::from_utf8(key)
                        .ok()
                        .and_then(|s| CardNo::parse(s).ok())
                        .ok_or_else(|| corrupt("an entry's card does not parse"))?;
                    map.insert(card, entry);
                }
                Op::Delete(Cf::Denylist, key) => {
                    if let Some(card) = std::str::from_utf8(key)
                        .ok()
                        .and_then(|s| CardNo::parse(s).ok())
                    {
                        map.remove(&card);
                    }
                }
                Op::Put(Cf::Meta, key, value) if key.as_slice() == meta::DENYLIST_VERSION => {
                    *value = version.to_be_bytes().to_vec();
                }
                _ => {}
            }
        }
        self.version.store(version, Ordering::Release);
        self.publish_gauges();
        Ok(())
    }

    /// Serializes changes: hold it from [`DenyList::plan`] until
    /// [`DenyList::apply`], so that versions are assigned in write order.
    pub async fn serial(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.change.lock().await
    }

    /// The writes for a list of changes (`Some(reason)`: add or re-reason,
    /// `None`: lift), each with its own version and log entry. Removing a
    /// card that is not listed changes nothing. Call under
    /// [`DenyList::serial`]; write `ops` durably, then [`DenyList::apply`].
    pub fn plan(&self, changes: &[(CardNo, Option<String>)], now_ms: i64) -> Planned {
        let mut version = self.version();
        let mut ops = Vec::with_capacity(2 * changes.len() + 1);
        let mut effects = Vec::with_capacity(changes.len());
        for (card, reason) in changes {
            let listed = self.contains(card)
                || effects
                    .iter()
                    .any(|(c, e): &(CardNo, Option<DenyEntry>)| c == card && e.is_some());
            if reason.is_none() && !listed {
                continue;
            }
            version += 1;
            let change = DenyChange {
                op: if reason.is_some() {
                    DenyOp::Add
                } else {
                    DenyOp::Remove
                },
                card_no: card.into(),
                reason: reason.clone(),
                at_ms: now_ms,
            };
            ops.push(Op::Put(
                Cf::DenylistLog,
                version.to_be_bytes().to_vec(),
                to_json(&change),
            ));
            let key = card.as_str().as_bytes().to_vec();
            match reason {
                Some(reason) => {
                    // A new reason for a listed card keeps the time it was
                    // first listed: offline risk counts taps from then.
                    let since = self.get(card).map_or(now_ms, |e| e.added_at_ms);
                    let entry = DenyEntry {
                        reason: reason.clone(),
                        version,
                        added_at_ms: since,
                    };
                    ops.push(Op::Put(Cf::Denylist, key, to_json(&entry)));
                    effects.push((card.clone(), Some(entry)));
                }
                None => {
                    ops.push(Op::Delete(Cf::Denylist, key));
                    effects.push((card.clone(), None));
                }
            }
        }
        if !ops.is_empty() {
            ops.push(Op::Put(
                Cf::Meta,
                meta::DENYLIST_VERSION.to_vec(),
                version.to_be_bytes().to_vec(),
            ));
        }
        Planned {
            ops,
            version,
            effects,
            at_ms: now_ms,
        }
    }

    /// Makes planned changes visible, once their writes are durable.
    /// Returns the new version.
    pub fn apply(&self, plan: Planned) -> u64 {
        if plan.effects.is_empty() {
            return self.version();
        }
        let map = self.map.pin();
        for (card, effect) in plan.effects {
            match effect {
                Some(entry) => {
                    map.insert(card, entry);
                }
                None => {
                    map.remove(&card);
                }
            }
        }
        self.version.store(plan.version, Ordering::Release);
        self.updated_at_ms.store(plan.at_ms, Ordering::Release);
        self.publish_gauges();
        plan.version
    }

    /// Every entry's card number, with the version they are consistent
    /// with. Call under [`DenyList::serial`] for a consistent snapshot.
    pub fn snapshot(&self) -> (u64, Vec<CardNo>) {
        let version = self.version();
        let cards = self.map.pin().keys().cloned().collect();
        (version, cards)
    }

    fn publish_gauges(&self) {
        metrics::gauge!("onecard_denylist_version").set(self.version() as f64);
        metrics::gauge!("onecard_denylist_entries").set(self.len() as f64);
        if let Some(t) = self.updated_at_ms() {
            metrics::gauge!("onecard_denylist_updated_timestamp_seconds").set(t as f64 / 1000.0);
        }
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
