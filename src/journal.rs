//! The journal writer: one thread, group commit, one synced RocksDB batch per
//! group.
//!
//! Every durable write of the gateway comes through here: decision records
//! (which get the next sequence number), their idempotency records, card
//! counter updates and admin changes. Callers hand over a [`Commit`] through
//! a bounded channel and wait; the writer packs whatever has arrived (up to
//! `batch_events_max`) into one `WriteBatch`, writes it with the WAL synced
//! (`durability = "sync"`) and only then wakes the waiters. With `fdatasync`
//! at ~4 ms, throughput comes from the size of the group, never from
//! skipping the sync.
//!
//! Architecture invariant: the order in which commits enter the channel is
//! the order in which they reach disk. The authorization path relies on it:
//! it submits while holding a card's lock, so two taps of one card are
//! journaled in the order they were decided.
//!
//! If a write fails the journal turns *failed*: memory may then be ahead of
//! disk, so every later submission is refused (`503`) and `/readyz` goes red
//! until a restart rebuilds memory from disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use crate::config::Durability;
use crate::state::store::{decode_u64, meta};
use crate::state::{Cf, Store, StoreError};

/// One write operation inside a commit.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
}

/// What one caller wants written atomically. `record`, when present, is a
/// decision record: the writer gives it the next sequence number (and the
/// records of `also` the ones after it); the reply carries the first.
#[derive(Default)]
pub struct Commit {
    pub record: Option<Vec<u8>>,
    pub ops: Vec<Op>,
    /// Dropped by the writer only after the batch is on disk (or has
    /// failed), whatever happens to the caller. The authorization path puts
    /// its idempotency guard here: a client that hangs up mid-request must
    /// not let a retry be decided while the first decision is still queued.
    pub hold_until_written: Option<Box<dyn Send>>,
    /// The card the record is about: the writer indexes the record's
    /// sequence number under it (`card_tx`), for the hotline's look-up.
    pub card: Option<Box<str>>,
    /// Further decision records, each with its card, numbered after
    /// `record` in this order and written in the same batch: a
    /// disbursement batch is all its credits or none of them, whatever
    /// crash comes between.
    pub also: Vec<(Vec<u8>, Box<str>)>,
}

impl Commit {
    pub fn new(record: Option<Vec<u8>>, ops: Vec<Op>) -> Commit {
        Commit {
            record,
            ops,
            hold_until_written: None,
            card: None,
            also: Vec::new(),
        }
    }
}

/// The `card_tx` key of a card's record: card_no, 0x00, sequence.
pub fn card_tx_key(card_no: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(card_no.len() + 9);
    k.extend_from_slice(card_no.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("the journal queue is full")]
    Busy,
    #[error("the journal is shut down")]
    Closed,
    #[error("the journal failed to write and refuses further writes until restart")]
    Failed,
}

type Reply = oneshot::Sender<Result<Option<u64>, JournalError>>;

/// An idempotency record to delete if it still belongs to `auth_id`.
pub struct Expired {
    pub idem_key: Vec<u8>,
    pub auth_id: String,
}

enum Item {
    Commit(Commit, Reply),
    /// Idempotency clean-up: written in a batch of its own, because whether
    /// to delete depends on reading what earlier batches wrote.
    Cleanup {
        expired: Vec<Expired>,
        cursor: u64,
        reply: Reply,
    },
    Stop,
}

pub struct Journal {
    tx: Sender<Item>,
    /// Submissions check `closing` and send under the read side; `close`
    /// sets it under the write side, so nothing is queued behind `Stop`.
    gate: RwLock<()>,
    closing: AtomicBool,
    failed: Arc<AtomicBool>,
    /// The next sequence number the writer will assign.
    next_seq: Arc<AtomicU64>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Journal {
    /// Starts the writer thread; sequence numbers continue after the last
    /// record on disk.
    pub fn start(
        store: Store,
        durability: Durability,
        batch_events_max: usize,
        queue_events_max: usize,
    ) -> Result<Journal, StoreError> {
        let next = match store.last_key(Cf::Journal)? {
            None => 1,
            Some(k) => {
                decode_u64(&k).ok_or(StoreError::Corrupt {
                    cf: "journal",
                    detail: "key is not a u64".into(),
                })? + 1
            }
        };
        let (tx, rx) = crossbeam_channel::bounded(queue_events_max);
        let failed = Arc::new(AtomicBool::new(false));
        let next_seq = Arc::new(AtomicU64::new(next));
        let writer = Writer {
            store,
            rx,
            sync: durability == Durability::Sync,
            batch_events_max,
            failed: failed.clone(),
            next_seq: next_seq.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .expect("spawning the journal writer thread");
        Ok(Journal {
            tx,
            gate: RwLock::new(()),
            closing: AtomicBool::new(false),
            failed,
            next_seq,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a commit without waiting. The order of `submit` calls is the
    /// order on disk. A full queue answers at once.
    pub fn submit(
        &self,
        commit: Commit,
    ) -> Result<oneshot::Receiver<Result<Option<u64>, JournalError>>, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(Item::Commit(commit, reply))?;
        Ok(rx)
    }

    fn send(&self, item: Item) -> Result<(), JournalError> {
        let _open = self.gate.read();
        self.check()?;
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(JournalError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(JournalError::Closed),
        }
    }

    /// Submits and waits until the commit is on disk; returns the sequence
    /// number given to its record, if it had one.
    pub async fn commit(&self, commit: Commit) -> Result<Option<u64>, JournalError> {
        let rx = self.submit(commit)?;
        wait(rx).await
    }

    /// Deletes expired idempotency records and moves the clean-up cursor.
    pub async fn cleanup(&self, expired: Vec<Expired>, cursor: u64) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(Item::Cleanup {
            expired,
            cursor,
            reply,
        })?;
        wait(rx).await.map(|_| ())
    }

    fn check(&self) -> Result<(), JournalError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(JournalError::Failed);
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        Ok(())
    }

    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire) && !self.closing.load(Ordering::Acquire)
    }

    /// The last sequence number handed out (0 when the journal is empty).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire) - 1
    }

    /// Refuses new commits, writes everything already queued, syncs the WAL
    /// and stops the writer thread. Safe to call more than once.
    pub fn close(&self) {
        {
            let _shut = self.gate.write();
            self.closing.store(true, Ordering::Release);
        }
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            // A blocking send: the writer is draining, so there is room soon.
            let _ = self.tx.send(Item::Stop);
            let _ = thread.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

async fn wait(
    rx: oneshot::Receiver<Result<Option<u64>, JournalError>>,
) -> Result<Option<u64>, JournalError> {
    rx.await.unwrap_or(Err(JournalError::Closed))
}

struct Writer {
    store: Store,
    rx: Receiver<Item>,
    sync: bool,
    batch_events_max: usize,
    failed: Arc<AtomicBool>,
    next_seq: Arc<AtomicU64>,
}

/// Marks the journal failed if the writer thread ends by panicking, so that
/// submissions are refused and `/readyz` turns red instead of hanging.
struct PanicGuard(Arc<AtomicBool>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

impl Writer {
    fn run(self) {
        let _guard = PanicGuard(self.failed.clone());
        let mut carry: Option<Item> = None;
        let mut stopping = false;
        loop {
            let item = match carry.take() {
                Some(item) => item,
                None if stopping => match self.rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => break,
                },
                None => match self.rx.recv() {
                    Ok(item) => item,
                    Err(_) => break,
                },
            };
            match item {
                Item::Stop => stopping = true,
                Item::Cleanup {
                    expired,
                    cursor,
                    reply,
                } => {
                    let result = self.cleanup(expired, cursor);
                    let _ = reply.send(result.map(|()| None));
                }
                Item::Commit(commit, reply) => {
                    let mut group = vec![(commit, reply)];
                    while group.len() < self.batch_events_max {
                        match self.rx.try_recv() {
                            Ok(Item::Commit(c, r)) => group.push((c, r)),
                            Ok(other) => {
                                carry = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.write_group(group);
                }
            }
        }
        if let Err(e) = self.store.db().flush_wal(true) {
            tracing::error!(error = %e, "journal: syncing the WAL at shutdown failed");
        }
    }

    fn options(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        wo
    }

    fn write_group(&self, group: Vec<(Commit, Reply)>) {
        if self.failed.load(Ordering::Acquire) {
            for (_, reply) in group {
                let _ = reply.send(Err(JournalError::Failed));
            }
            return;
        }
        let first_seq = self.next_seq.load(Ordering::Acquire);
        let mut seq = first_seq;
        let mut batch = WriteBatch::default();
        let mut seqs = Vec::with_capacity(group.len());
        let mut records = 0u64;
        for (commit, _) in &group {
            let mut assigned = None;
            let first = commit.record.as_ref().map(|r| (r, commit.card.as_deref()));
            let also = commit.also.iter().map(|(r, c)| (r, Some(&**c)));
            for (record, card) in first.into_iter().chain(also) {
                batch.put_cf(self.store.cf(Cf::Journal), seq.to_be_bytes(), record);
                if let Some(card) = card.filter(|c| !c.is_empty()) {
                    batch.put_cf(self.store.cf(Cf::CardTx), card_tx_key(card, seq), b"");
                }
                assigned.get_or_insert(seq);
                records += 1;
                seq += 1;
            }
            seqs.push(assigned);
            for op in &commit.ops {
                match op {
                    Op::Put(cf, k, v) => batch.put_cf(self.store.cf(*cf), k, v),
                    Op::Delete(cf, k) => batch.delete_cf(self.store.cf(*cf), k),
                }
            }
        }
        crate::crashpoint::hit("journal.before_write");
        let started = Instant::now();
        let result = self.store.db().write_opt(batch, &self.options());
        metrics::histogram!("onecard_journal_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("onecard_journal_batch_events").record(group.len() as f64);
        match result {
            Ok(()) => {
                crate::crashpoint::hit("journal.after_write");
                self.next_seq.store(seq, Ordering::Release);
                metrics::counter!("onecard_journal_records_total").increment(records);
                metrics::gauge!("onecard_journal_last_seq").set((seq - 1) as f64);
                for ((_, reply), s) in group.into_iter().zip(seqs) {
                    let _ = reply.send(Ok(s));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, first_seq, "journal: write failed; refusing further writes");
                self.failed.store(true, Ordering::Release);
                metrics::counter!("onecard_journal_failures_total").increment(1);
                for (_, reply) in group {
                    let _ = reply.send(Err(JournalError::Failed));
                }
            }
        }
    }

    fn cleanup(&self, expired: Vec<Expired>, cursor: u64) -> Result<(), JournalError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(JournalError::Failed);
        }
        let mut batch = WriteBatch::default();
        let mut deleted = 0u64;
        for e in &expired {
            let current = self
                .store
                .get(Cf::Idem, &e.idem_key)
                .map_err(|_| JournalError::Failed)?;
            // A key reused after its retention has a new answer with a new
            // auth_id: that one stays.
            if current
                .is_some_and(|v| crate::idempotency::stored_auth_id(&v) == Some(e.auth_id.as_str()))
            {
                batch.delete_cf(self.store.cf(Cf::Idem), &e.idem_key);
                deleted += 1;
            }
        }
        batch.put_cf(
            self.store.cf(Cf::Meta),
            meta::IDEM_CLEANUP_SEQ,
            cursor.to_be_bytes(),
        );
        self.store
            .db()
            .write_opt(batch, &self.options())
            .map_err(|e| {
                tracing::error!(error = %e, "journal: idempotency clean-up write failed");
                self.failed.store(true, Ordering::Release);
                JournalError::Failed
            })?;
        metrics::counter!("onecard_idempotency_expired_total").increment(deleted);
        Ok(())
    }
}

/// A decision as the journal keeps it: enough to answer an agent's question
/// about a transaction and to settle it later. Card numbers are stored (the
/// downstream systems book by card); they are masked wherever they are shown.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecisionRecord {
    /// When the gateway decided, in Unix milliseconds.
    pub at_ms: i64,
    pub terminal: String,
    pub event_id: String,
    pub auth_id: String,
    pub kind: crate::model::EventKind,
    /// Empty only for a reversal of an event the gateway never saw.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub card_no: String,
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
    pub scan: Option<crate::credential::ScanRef>,
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
}

/// What a credit pays: a disbursement batch's record and its programme.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_with_several_records_numbers_and_indexes_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let journal = Journal::start(store.clone(), Durability::Sync, 16, 16).unwrap();
        let one = journal
            .commit(Commit::new(Some(b"r1".to_vec()), Vec::new()))
            .await
            .unwrap();
        assert_eq!(one, Some(1));
        let mut batch = Commit::new(None, vec![Op::Put(Cf::Meta, b"k".to_vec(), b"v".to_vec())]);
        batch.also = vec![
            (b"c1".to_vec(), "500118D00000001".into()),
            (b"c2".to_vec(), "500118D00000002".into()),
            (b"c3".to_vec(), "500118D00000001".into()),
        ];
        // The reply names the first of the commit's records.
        assert_eq!(journal.commit(batch).await.unwrap(), Some(2));
        assert_eq!(journal.last_seq(), 4);
        for (seq, want) in [(2u64, &b"c1"[..]), (3, b"c2"), (4, b"c3")] {
            assert_eq!(
                store
                    .get(Cf::Journal, &seq.to_be_bytes())
                    .unwrap()
                    .as_deref(),
                Some(want)
            );
        }
        for (card, seq) in [
            ("500118D00000001", 2),
            ("500118D00000002", 3),
            ("500118D00000001", 4),
        ] {
            assert!(store
                .get(Cf::CardTx, &card_tx_key(card, seq))
                .unwrap()
                .is_some());
        }
        assert!(store
            .get(Cf::CardTx, &card_tx_key("500118D00000002", 2))
            .unwrap()
            .is_none());
        assert_eq!(
            store.get(Cf::Meta, b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        // Without records the reply names none.
        let none = journal.commit(Commit::new(None, Vec::new())).await.unwrap();
        assert_eq!(none, None);
        journal.close();
    }
}
