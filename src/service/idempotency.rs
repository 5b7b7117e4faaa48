//! Idempotency: (terminal id, event_id) → the first answer, byte for byte.
//!
//! The record is written by the journal writer in the same batch as the
//! decision it answers, so an answer that reached a terminal is always
//! replayable after a crash. Two copies of one request that arrive together
//! are serialized by an in-flight table: the second waits for the first to
//! finish and then reads what it stored. Records are kept for
//! `idempotency.retention_s` and then removed by [`run_cleanup`], which walks
//! the journal in sequence order behind a durable cursor.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{watch, Notify};

use onecard_core::record::DecisionRecord;
use onecard_core::time::Clock;

use crate::store::durable::{Durable, Expired};
use crate::store::idem::{decode, key, reversal_key, Tail};
use crate::store::{decode_u64, meta, Cf, Store, StoreError};

/// How many journal records one clean-up step examines.
pub const CLEANUP_STEP_RECORDS_MAX: usize = 4_096;

/// What the idempotency check found.
pub enum Lookup {
    /// Never seen (or expired): decide it. Hold the guard until the answer
    /// is durable, so a concurrent copy waits for it.
    Fresh(InFlight),
    /// Seen with the same content: send this body again.
    Replay(Vec<u8>),
    /// Seen with other content.
    Conflict,
    /// Never seen, but reversed by its terminal already: decline it
    /// `REVERSED`, holding the guard as for `Fresh`.
    Reversed(InFlight),
}

/// Keys being decided, by a keyed hash of the key: a request holds its
/// key's hash, and a copy finds it held and waits on the hash's stripe.
/// Nothing is allocated per request. Two keys that share a hash are
/// treated as one: the second waits for the first to finish, as a copy
/// would. The hash is SipHash with a key drawn at each start, so a
/// terminal cannot aim for a collision, and a given pair collides with
/// odds of 2^-64. (A request that holds two keys, a reversal or a hold
/// step, would wait for itself on such a pair until its client gave up.)
struct Table {
    held: DashMap<u64, ()>,
    /// Woken when a hash of their stripe is let go; a waiter looks again.
    stripes: Box<[Notify]>,
    hasher: RandomState,
}

/// Stripes of waiters: a release wakes the copies waiting on its stripe
/// (rarely more than the one), and each looks again.
const STRIPES: usize = 64;

impl Table {
    fn stripe(&self, hash: u64) -> &Notify {
        &self.stripes[(hash % STRIPES as u64) as usize]
    }
}

pub struct Idempotency {
    store: Store,
    inflight: Arc<Table>,
    retention_ms: i64,
}

/// Marks a key as being decided; dropping it lets waiting copies proceed.
pub struct InFlight {
    inflight: Arc<Table>,
    hash: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Released before the wake-up, so a woken copy finds it free.
        self.inflight.held.remove(&self.hash);
        self.inflight.stripe(self.hash).notify_waiters();
    }
}

impl Idempotency {
    pub fn new(store: Store, retention_s: u64) -> Idempotency {
        Idempotency {
            store,
            inflight: Arc::new(Table {
                held: DashMap::new(),
                stripes: (0..STRIPES).map(|_| Notify::new()).collect(),
                hasher: RandomState::new(),
            }),
            retention_ms: (retention_s as i64).saturating_mul(1000),
        }
    }

    /// Waits until no other request holds `key`, then holds it and returns
    /// what is stored under it (`None`: nothing, or expired).
    pub async fn hold(
        &self,
        key: &[u8],
        now_ms: i64,
    ) -> Result<(InFlight, Option<Vec<u8>>), StoreError> {
        let table = &self.inflight;
        let hash = table.hasher.hash_one(key);
        loop {
            // Registered before the look, so a release between the look
            // and the wait still wakes this copy (tokio's `notified`
            // counts from its creation, polled or not).
            let released = table.stripe(hash).notified();
            if table.held.insert(hash, ()).is_none() {
                break;
            }
            released.await;
        }
        let guard = InFlight {
            inflight: table.clone(),
            hash,
        };
        let Some(value) = self.store.read(Cf::Idem, key).await? else {
            return Ok((guard, None));
        };
        let stored = decode(&value).ok_or(StoreError::Corrupt {
            cf: "idem",
            detail: "bad record".into(),
        })?;
        if stored.created_ms.saturating_add(self.retention_ms) < now_ms {
            return Ok((guard, None));
        }
        Ok((guard, Some(value)))
    }

    pub async fn begin(
        &self,
        key: &[u8],
        fingerprint: &[u8; 32],
        now_ms: i64,
    ) -> Result<Lookup, StoreError> {
        let (guard, value) = self.hold(key, now_ms).await?;
        let Some(value) = value else {
            return Ok(Lookup::Fresh(guard));
        };
        let stored = decode(&value).expect("checked by hold");
        if stored.tail == Tail::Tombstone {
            return Ok(Lookup::Reversed(guard));
        }
        if stored.fingerprint == fingerprint {
            return Ok(Lookup::Replay(stored.body.to_vec()));
        }
        Ok(Lookup::Conflict)
    }
}

/// One clean-up step: examines up to [`CLEANUP_STEP_RECORDS_MAX`] journal
/// records after the cursor and removes the idempotency records of those
/// older than the retention. Returns how many journal records it passed.
pub async fn cleanup_step(
    store: &Store,
    journal: &dyn Durable,
    retention_s: u64,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let cutoff_ms = now_ms - (retention_s as i64).saturating_mul(1000);
    let cursor = store
        .get_u64(Cf::Meta, meta::IDEM_CLEANUP_SEQ)?
        .unwrap_or(0);
    // Up to CLEANUP_STEP_RECORDS_MAX records read on the blocking pool: a
    // backlog of expired records is a loop of these steps.
    let reader = store.clone();
    let (expired, passed, last, corrupt) =
        crate::store::blocking(move || expired_after(&reader, cursor, cutoff_ms)).await?;
    if let Some(detail) = corrupt {
        return Err(StoreError::Corrupt {
            cf: "journal",
            detail: detail.into(),
        });
    }
    if passed > 0 {
        journal
            .cleanup(expired, last)
            .map_err(|e| StoreError::Corrupt {
                cf: "idem",
                detail: e.to_string(),
            })?
            .durable()
            .await
            .map_err(|e| StoreError::Corrupt {
                cf: "idem",
                detail: e.to_string(),
            })?;
    }
    Ok(passed)
}

/// What one clean-up step found: the expired keys, how many journal
/// records were passed, the last one's sequence, and why the scan stopped
/// on a corrupt record, if it did.
type Expiry = (Vec<Expired>, usize, u64, Option<&'static str>);

/// The idempotency keys of up to [`CLEANUP_STEP_RECORDS_MAX`] journal
/// records after `cursor` older than `cutoff_ms`. Blocking: called on the
/// blocking pool.
fn expired_after(store: &Store, cursor: u64, cutoff_ms: i64) -> Result<Expiry, StoreError> {
    let mut expired = Vec::new();
    // Journal records passed (a reversal adds two keys to `expired`).
    let mut passed = 0usize;
    let mut last = cursor;
    let mut corrupt = None;
    store.scan(Cf::Journal, &(cursor + 1).to_be_bytes(), |k, v| {
        let Some(seq) = decode_u64(k) else {
            corrupt = Some("journal key is not a u64");
            return false;
        };
        let Ok(record) = serde_json::from_slice::<DecisionRecord>(v) else {
            corrupt = Some("journal record does not decode");
            return false;
        };
        if record.at_ms >= cutoff_ms {
            return false;
        }
        if record.decision == "reverse" {
            // A reversal's answer has its own key; the event's key holds
            // the reversal's id only when it is a tombstone.
            expired.push(Expired {
                idem_key: reversal_key(&record.terminal, &record.event_id),
                auth_id: record.auth_id.clone(),
            });
        }
        expired.push(Expired {
            idem_key: key(&record.terminal, &record.event_id),
            auth_id: record.auth_id,
        });
        last = seq;
        passed += 1;
        passed < CLEANUP_STEP_RECORDS_MAX
    })?;
    Ok((expired, passed, last, corrupt))
}

/// Runs clean-up steps every `interval` until `stop` fires.
pub async fn run_cleanup(
    store: Store,
    journal: Arc<dyn Durable>,
    clock: Arc<dyn Clock>,
    retention_s: u64,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        loop {
            match cleanup_step(&store, &*journal, retention_s, clock.now_ms()).await {
                Ok(n) if n == CLEANUP_STEP_RECORDS_MAX => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency clean-up step failed; will retry");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    fn idempotency() -> (Idempotency, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Default::default()).unwrap();
        (Idempotency::new(store, 60), dir)
    }

    #[tokio::test]
    async fn a_copy_waits_until_the_first_lets_go_and_other_keys_do_not() {
        let (idem, _dir) = idempotency();
        let (first, stored) = idem.hold(b"t\x1fe-1", 0).await.unwrap();
        assert!(stored.is_none());
        // Another key is held at once, the same key is not.
        let (_other, _) = idem.hold(b"t\x1fe-2", 0).await.unwrap();
        let copy = idem.hold(b"t\x1fe-1", 0);
        tokio::pin!(copy);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..3 {
            assert!(copy.as_mut().poll(&mut cx).is_pending());
            tokio::task::yield_now().await;
        }
        drop(first);
        let (again, _) = copy.await.unwrap();
        drop(again);
        // Let go on drop: held again at once.
        let _ = idem.hold(b"t\x1fe-1", 0).await.unwrap();
    }
}
