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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use onecard_core::model::CARD_NO_LEN_MAX;
use onecard_core::record::DecisionRecord;
use onecard_core::window::{first_of, Ring};
use parking_lot::{Mutex, RwLock};
use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use super::durable::{Commit, CommitError, CommitFigures, Durable, Expired, Fault, Op, Pending};
use super::{decode_u64, idem, meta, Cf, Store, StoreError};
use crate::config::Durability;

/// The `card_tx` key of a card's record: card_no, 0x00, sequence. On the
/// stack for any valid card number (the writer makes one per record).
pub fn card_tx_key(card_no: &str, seq: u64) -> CardTxKey {
    let mut k = CardTxKey::new();
    k.extend_from_slice(card_no.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A `card_tx` key: inline up to the longest card number.
pub type CardTxKey = smallvec::SmallVec<[u8; CARD_NO_LEN_MAX + 9]>;

/// Reads up to `n` decision records from `from` on, with their sequence
/// numbers: what follows the journal (settlement, the rollout report)
/// reads it so. A record that does not decode is an error: what follows
/// the journal stops there rather than skip it.
pub fn read(store: &Store, from: u64, n: usize) -> Result<Vec<(u64, DecisionRecord)>, StoreError> {
    let mut out = Vec::new();
    let mut bad = None;
    store.scan(Cf::Journal, &from.to_be_bytes(), |k, v| {
        let Ok(seq) = <[u8; 8]>::try_from(k).map(u64::from_be_bytes) else {
            return true;
        };
        match serde_json::from_slice::<DecisionRecord>(v) {
            Ok(r) => out.push((seq, r)),
            Err(_) => {
                bad = Some(seq);
                return false;
            }
        }
        out.len() < n
    })?;
    match bad {
        Some(seq) => Err(StoreError::Corrupt {
            cf: "journal",
            detail: format!(
                "record {seq} does not decode; what follows the journal cannot pass it"
            ),
        }),
        None => Ok(out),
    }
}

/// Adds a commit to `batch`: its records numbered from `seq` (each indexed
/// under its card), then its ops. Returns the first record's number, if it
/// had records, and the next free number. The RocksDB journal and the
/// cluster's applier write commits the same way.
pub(super) fn add_to_batch<'a>(
    store: &Store,
    batch: &mut WriteBatch,
    mut seq: u64,
    records: impl Iterator<Item = (&'a [u8], Option<&'a str>)>,
    ops: &[Op],
) -> (Option<u64>, u64) {
    let mut first = None;
    for (record, card) in records {
        batch.put_cf(store.cf(Cf::Journal), seq.to_be_bytes(), record);
        if let Some(card) = card.filter(|c| !c.is_empty()) {
            batch.put_cf(store.cf(Cf::CardTx), card_tx_key(card, seq), b"");
        }
        first.get_or_insert(seq);
        seq += 1;
    }
    for op in ops {
        match op {
            Op::Put(cf, k, v) => batch.put_cf(store.cf(*cf), k, v),
            Op::Delete(cf, k) => batch.delete_cf(store.cf(*cf), k),
        }
    }
    (first, seq)
}

type Reply = oneshot::Sender<Result<Option<u64>, CommitError>>;

enum Item {
    /// A commit and when it was queued.
    Commit(Commit, Reply, Instant),
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
    failed: Arc<Failed>,
    /// The next sequence number the writer will assign.
    next_seq: Arc<AtomicU64>,
    thread: Mutex<Option<JoinHandle<()>>>,
    watch: Arc<WriterWatch>,
}

/// What the writer thread shows of its work: each group's write time and
/// size by second, and since when it has been writing the current group.
struct WriterWatch {
    started: Instant,
    /// Microseconds per group write.
    took: Ring,
    /// Commits per group.
    sizes: Ring,
    /// Microseconds since `started` at which the oldest commit of the
    /// item being written was queued, plus one; 0 while idle.
    oldest_since: AtomicU64,
}

impl WriterWatch {
    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
    fn busy_since(&self, queued: Instant) {
        let us = queued.saturating_duration_since(self.started).as_micros() as u64;
        self.oldest_since.store(us + 1, Ordering::Release);
    }
    fn idle(&self) {
        self.oldest_since.store(0, Ordering::Release);
    }
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
        let failed = Arc::new(Failed::default());
        let next_seq = Arc::new(AtomicU64::new(next));
        let watch = Arc::new(WriterWatch {
            started: Instant::now(),
            took: Ring::new(),
            sizes: Ring::new(),
            oldest_since: AtomicU64::new(0),
        });
        let writer = Writer {
            watch: watch.clone(),
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
            watch,
        })
    }

    fn send(&self, item: Item) -> Result<(), CommitError> {
        let _open = self.gate.read();
        self.check()?;
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(CommitError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(CommitError::Closed),
        }
    }

    fn check(&self) -> Result<(), CommitError> {
        if self.failed.get().is_some() {
            return Err(CommitError::Failed);
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(CommitError::Closed);
        }
        Ok(())
    }
}

impl Durable for Journal {
    /// The order of `submit` calls is the order on disk.
    fn submit(&self, commit: Commit) -> Result<Pending, CommitError> {
        let (reply, pending) = Pending::channel();
        self.send(Item::Commit(commit, reply, Instant::now()))?;
        Ok(pending)
    }

    /// Written in a batch of its own, because whether to delete depends
    /// on reading what earlier batches wrote.
    fn cleanup(&self, expired: Vec<Expired>, cursor: u64) -> Result<Pending, CommitError> {
        let (reply, pending) = Pending::channel();
        self.send(Item::Cleanup {
            expired,
            cursor,
            reply,
        })?;
        Ok(pending)
    }

    fn is_healthy(&self) -> bool {
        self.failed.get().is_none() && !self.closing.load(Ordering::Acquire)
    }

    fn fault(&self, stall: Duration) -> Option<Fault> {
        if let Some(fault) = self.failed.get() {
            return Some(fault);
        }
        let since = self.watch.oldest_since.load(Ordering::Acquire);
        if since == 0 {
            return None;
        }
        let waited_us = self.watch.now_us().saturating_sub(since - 1);
        (waited_us > stall.as_micros() as u64).then_some(Fault::Stalled)
    }

    fn last_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire) - 1
    }

    fn commit_figures(&self, window_s: u64) -> Option<CommitFigures> {
        let w = &self.watch;
        let now = w.now_us();
        let last = now / 1_000_000;
        let first = first_of(last, window_s);
        let took = w.took.summary(first, last);
        let sizes = w.sizes.summary(first, last);
        let since = w.oldest_since.load(Ordering::Acquire);
        Some(CommitFigures {
            window_s,
            groups: took.count,
            p50_ms: took.p50 as f64 / 1000.0,
            p99_ms: took.p99 as f64 / 1000.0,
            max_ms: took.max as f64 / 1000.0,
            batch_mean: sizes.mean,
            batch_max: sizes.max,
            pending: self.tx.len(),
            oldest_pending_ms: if since == 0 {
                0.0
            } else {
                now.saturating_sub(since - 1) as f64 / 1000.0
            },
        })
    }

    /// Writes everything already queued, syncs the WAL and stops the
    /// writer thread.
    fn close(&self) {
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

struct Writer {
    watch: Arc<WriterWatch>,
    store: Store,
    rx: Receiver<Item>,
    sync: bool,
    batch_events_max: usize,
    failed: Arc<Failed>,
    next_seq: Arc<AtomicU64>,
}

/// Why the journal refuses every write until a restart, once one failed
/// (memory may be ahead of the disk); none while it has not.
#[derive(Default)]
struct Failed(AtomicU8);

impl Failed {
    fn get(&self) -> Option<Fault> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => Fault::ALL.get(usize::from(n) - 1).copied(),
        }
    }

    fn set(&self, fault: Fault) {
        let n = Fault::ALL
            .iter()
            .position(|f| *f == fault)
            .expect("a fault")
            + 1;
        self.0.store(n as u8, Ordering::Release);
    }
}

/// Marks the journal failed if the writer thread ends by panicking, so that
/// submissions are refused and `/readyz` turns red instead of hanging.
struct PanicGuard(Arc<Failed>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.set(Fault::Failed);
            metrics::counter!("onecard_journal_failures_total").increment(1);
        }
    }
}

impl Writer {
    fn run(self) {
        let _guard = PanicGuard(self.failed.clone());
        let mut carry: Option<Item> = None;
        let mut stopping = false;
        // Reused from group to group: no allocation per commit. (Sized
        // for a usual group; a larger one grows them once.)
        let usual = self.batch_events_max.min(1024);
        let mut group = Vec::with_capacity(usual);
        let mut seqs = Vec::with_capacity(usual);
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
                    self.watch.busy_since(Instant::now());
                    let result = self.cleanup(expired, cursor);
                    self.watch.idle();
                    let _ = reply.send(result.map(|()| None));
                }
                Item::Commit(commit, reply, queued) => {
                    // The group's first commit is its oldest (the queue
                    // is in order): its wait is what the gauge shows.
                    self.watch.busy_since(queued);
                    group.push((commit, reply));
                    while group.len() < self.batch_events_max {
                        match self.rx.try_recv() {
                            Ok(Item::Commit(c, r, _)) => group.push((c, r)),
                            Ok(other) => {
                                carry = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.write_group(&mut group, &mut seqs);
                    self.watch.idle();
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

    /// Writes `group` as one batch and answers each commit, leaving
    /// `group` empty for the next one; `seqs` is scratch, cleared here.
    fn write_group(&self, group: &mut Vec<(Commit, Reply)>, seqs: &mut Vec<Option<u64>>) {
        seqs.clear();
        if self.failed.get().is_some() {
            for (_, reply) in group.drain(..) {
                let _ = reply.send(Err(CommitError::Failed));
            }
            return;
        }
        let first_seq = self.next_seq.load(Ordering::Acquire);
        let mut seq = first_seq;
        let mut batch = WriteBatch::default();
        let mut records = 0u64;
        for (commit, _) in group.iter() {
            let first = commit
                .record
                .as_deref()
                .map(|r| (r, commit.card.as_deref()));
            let also = commit.also.iter().map(|(r, c)| (&r[..], Some(&**c)));
            let (assigned, next) = add_to_batch(
                &self.store,
                &mut batch,
                seq,
                first.into_iter().chain(also),
                &commit.ops,
            );
            records += next - seq;
            seq = next;
            seqs.push(assigned);
        }
        super::crashpoint::hit("journal.before_write");
        let started = Instant::now();
        let w = &self.watch;
        let began_us = w.now_us();
        let result = self.store.db().write_opt(batch, &self.options());
        let took = started.elapsed();
        let second = began_us / 1_000_000;
        w.took.record(second, took.as_micros() as u64);
        w.sizes.record(second, group.len() as u64);
        metrics::histogram!("onecard_journal_commit_seconds").record(took.as_secs_f64());
        metrics::histogram!("onecard_journal_batch_events").record(group.len() as f64);
        match result {
            Ok(()) => {
                super::crashpoint::hit("journal.after_write");
                self.next_seq.store(seq, Ordering::Release);
                metrics::counter!("onecard_journal_records_total").increment(records);
                metrics::gauge!("onecard_journal_last_seq").set((seq - 1) as f64);
                for ((_, reply), s) in group.drain(..).zip(seqs.drain(..)) {
                    let _ = reply.send(Ok(s));
                }
            }
            Err(e) => {
                let fault = Fault::of_error(&e.to_string());
                tracing::error!(error = %e, first_seq, fault = fault.label(), "journal: write failed; refusing further writes until a restart");
                self.failed.set(fault);
                metrics::counter!("onecard_journal_failures_total").increment(1);
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(CommitError::Failed));
                }
            }
        }
    }

    fn cleanup(&self, expired: Vec<Expired>, cursor: u64) -> Result<(), CommitError> {
        if self.failed.get().is_some() {
            return Err(CommitError::Failed);
        }
        let mut batch = WriteBatch::default();
        let mut deleted = 0u64;
        for e in &expired {
            let current = self
                .store
                .get(Cf::Idem, &e.idem_key)
                .map_err(|_| CommitError::Failed)?;
            // A key reused after its retention has a new answer with a new
            // auth_id: that one stays.
            if current.is_some_and(|v| idem::stored_auth_id(&v) == Some(e.auth_id.as_str())) {
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
                let fault = Fault::of_error(&e.to_string());
                tracing::error!(error = %e, fault = fault.label(), "journal: idempotency clean-up write failed; refusing further writes until a restart");
                self.failed.set(fault);
                metrics::counter!("onecard_journal_failures_total").increment(1);
                CommitError::Failed
            })?;
        metrics::counter!("onecard_idempotency_expired_total").increment(deleted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_commit_with_several_records_numbers_and_indexes_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Default::default()).unwrap();
        let journal = Journal::start(store.clone(), Durability::Sync, 16, 16).unwrap();
        let journal: &dyn Durable = &journal;
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
