//! The durability seam: every write the gateway must not lose goes in as
//! one [`Commit`] and comes out durable, or not at all.
//!
//! The pipeline hands a decision's writes (its record, its idempotency
//! record, the card's new counters, a hold, a venue's count) to a
//! [`Durable`] and answers only once [`Pending::durable`] says so. Today's
//! implementation is RocksDB's group commit ([`super::journal::Journal`]:
//! one writer thread, one synced `WriteBatch` per group); a replicated one
//! (a publish acknowledged by a quorum) fits behind the same trait without
//! touching the phases.
//!
//! The contract every implementation keeps:
//! - **Order**: commits become durable in the order they were submitted.
//!   The pipeline submits under the card's lock, so two decisions of one
//!   card are recorded in the order they were made.
//! - **All or nothing**: a commit's record(s) and ops are written together.
//! - **Numbering**: each record gets the next journal sequence number (a
//!   commit's `also` records the ones after it); [`Pending::durable`]
//!   returns the first.
//! - **Guards travel**: `hold_until_written` is dropped only once the
//!   commit is durable (or has failed), whatever happens to the caller.
//! - **Fail closed**: after a failed write, every later submission is
//!   refused ([`CommitError::Failed`]) until a restart.

use onecard_core::model::CARD_NO_LEN_MAX;
use smallvec::SmallVec;
use tokio::sync::oneshot;

use super::Cf;

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
    pub card: Option<CommitCard>,
    /// Further decision records, each with its card, numbered after
    /// `record` in this order and written in the same batch: a
    /// disbursement batch is all its credits or none of them, whatever
    /// crash comes between.
    pub also: Vec<(Vec<u8>, Box<str>)>,
    /// Cluster mode: more things this commit was decided on besides its
    /// card, each of which must not have changed at another node since
    /// (a venue's count). One node's journal orders everything already
    /// and ignores them.
    pub fences: Vec<Fence>,
}

/// A commit's card number, inline up to the longest valid one (longer
/// spills to the heap): every tap's commit names its card, and copying it
/// into a box of its own was an allocation per decision.
#[derive(Clone, PartialEq, Eq)]
pub struct CommitCard(SmallVec<[u8; CARD_NO_LEN_MAX]>);

impl From<&str> for CommitCard {
    fn from(card: &str) -> CommitCard {
        CommitCard(SmallVec::from_slice(card.as_bytes()))
    }
}

impl std::ops::Deref for CommitCard {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("made from a str")
    }
}

/// Something besides the card a decision read, which another node could
/// change at the same time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// A culture venue's daily count (its quota).
    Venue(Box<str>),
    /// A settlement sink's delivery state (its sealed batches, cursor and
    /// report): written by the one node delivering the sink, and by a
    /// node that took over only once it has read all its predecessor wrote.
    Sink(Box<str>),
}

impl Commit {
    pub fn new(record: Option<Vec<u8>>, ops: Vec<Op>) -> Commit {
        Commit {
            record,
            ops,
            hold_until_written: None,
            card: None,
            also: Vec::new(),
            fences: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("the journal queue is full")]
    Busy,
    #[error("the journal is shut down")]
    Closed,
    #[error("the journal failed to write and refuses further writes until restart")]
    Failed,
    /// Cluster mode: the journal stream's quorum did not acknowledge in
    /// time (this node is cut off, or the quorum is lost).
    #[error("the cluster's journal did not acknowledge in time")]
    Unreachable,
    /// Cluster mode: another node wrote about the same card (or decided
    /// the same event) first, at stream sequence `after`. Nothing was
    /// written: wait until `after` is applied here, then decide again.
    #[error("another node decided about this card first")]
    Raced { after: u64 },
    /// Cluster mode: a commit that fences more subjects than one atomic
    /// batch may carry (a caller's bug: imports split their batches).
    #[error("a commit writes more cards than one replicated write may fence")]
    TooLarge,
}

/// Why a single node's journal cannot record decisions now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// A write failed: the disk is full (ENOSPC).
    Full,
    /// A write failed: the disk returned an I/O error (EIO).
    Io,
    /// A write failed for another reason (the writer thread died).
    Failed,
    /// The oldest commit has waited longer than `journal.stall_ms`: the
    /// disk is stalled or very slow. Ends by itself when it writes again.
    Stalled,
}

impl Fault {
    pub const ALL: [Fault; 4] = [Fault::Full, Fault::Io, Fault::Failed, Fault::Stalled];

    pub fn label(self) -> &'static str {
        match self {
            Fault::Full => "full",
            Fault::Io => "io",
            Fault::Failed => "failed",
            Fault::Stalled => "stalled",
        }
    }

    /// What `/readyz` and a refused terminal are told.
    pub fn message(self) -> &'static str {
        match self {
            Fault::Full => "the journal's disk is full (no space left): no decision can be recorded; the gateway exits for its supervisor to restart it once the disk has room again",
            Fault::Io => "the journal's disk returned an I/O error: no decision can be recorded; the gateway exits for its supervisor to restart it once the disk writes again",
            Fault::Failed => "the journal cannot write: no decision can be recorded until the gateway restarts",
            Fault::Stalled => "the journal's disk is stalled (a commit has waited longer than journal.stall_ms): no new decision is taken until it writes again",
        }
    }

    /// Whether the journal refuses every commit until a restart (memory
    /// may be ahead of what reached the disk), rather than recovering by
    /// itself.
    pub fn needs_restart(self) -> bool {
        !matches!(self, Fault::Stalled)
    }

    /// A failed write's fault, from RocksDB's error text.
    pub fn of_error(text: &str) -> Fault {
        if text.contains("No space left") || text.contains("ENOSPC") {
            Fault::Full
        } else if text.contains("Input/output error") || text.contains("EIO") {
            Fault::Io
        } else {
            Fault::Failed
        }
    }
}

/// A queued commit: its result comes when it is durable.
#[must_use = "a commit is not durable until `durable()` says so"]
pub struct Pending(oneshot::Receiver<Result<Option<u64>, CommitError>>);

impl Pending {
    /// A pending commit and the sender its writer answers through.
    pub fn channel() -> (oneshot::Sender<Result<Option<u64>, CommitError>>, Pending) {
        let (tx, rx) = oneshot::channel();
        (tx, Pending(rx))
    }

    /// Waits until the commit is durable; the sequence number of its
    /// first record, if it had one.
    pub async fn durable(self) -> Result<Option<u64>, CommitError> {
        self.0.await.unwrap_or(Err(CommitError::Closed))
    }

    /// [`Pending::durable`] for a thread outside the async runtime (a
    /// benchmark, a blocking task).
    pub fn durable_blocking(self) -> Result<Option<u64>, CommitError> {
        self.0.blocking_recv().unwrap_or(Err(CommitError::Closed))
    }
}

/// An idempotency record to delete if it still belongs to `auth_id`.
pub struct Expired {
    pub idem_key: Vec<u8>,
    pub auth_id: String,
}

/// The journal's group commits over a window, for the SRE's page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CommitFigures {
    pub window_s: u64,
    /// Group commits (one write, one sync each).
    pub groups: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Commits per group.
    pub batch_mean: f64,
    pub batch_max: u64,
    /// Commits waiting for the writer now.
    pub pending: usize,
    /// How long the oldest commit not yet durable has waited (queued and
    /// being written; 0 when the writer is idle): a stalled disk makes it
    /// grow.
    pub oldest_pending_ms: f64,
}

/// Where durable writes go. See the module's contract.
pub trait Durable: Send + Sync {
    /// Queues a commit without waiting; a full queue answers at once
    /// ([`CommitError::Busy`]).
    fn submit(&self, commit: Commit) -> Result<Pending, CommitError>;

    /// Deletes the idempotency records of `expired` that still hold the
    /// answer they name, and moves the clean-up cursor to `cursor`, in
    /// order with the commits around it.
    fn cleanup(&self, expired: Vec<Expired>, cursor: u64) -> Result<Pending, CommitError>;

    /// The last journal sequence number handed out (0 when empty).
    fn last_seq(&self) -> u64;

    /// Whether commits are accepted (not failed, not closing).
    fn is_healthy(&self) -> bool;

    /// Refuses new commits, makes everything already queued durable, and
    /// stops. Safe to call more than once.
    fn close(&self);

    /// Whether this implementation sets the in-memory tables itself once a
    /// commit is durable (cluster mode: memory follows the replicated
    /// journal, every node alike). When false, the pipeline sets memory as
    /// soon as a commit is queued, under the card's lock.
    fn applies_memory(&self) -> bool {
        false
    }

    /// How far this node has applied a replicated journal (cluster mode):
    /// a request that lost a race ([`CommitError::Raced`]) waits on it.
    fn applied_watch(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The commits of the last `window_s` seconds as the SRE's page shows
    /// them (time per group commit, commits per group) and what waits now.
    /// `None` where the implementation keeps no such figures (cluster
    /// mode: `onecard_cluster_publish_seconds` has them).
    fn commit_figures(&self, window_s: u64) -> Option<CommitFigures> {
        let _ = window_s;
        None
    }

    /// Why this journal cannot record decisions now, if it cannot: a
    /// failed write, or a commit waiting longer than `stall`. `None` where
    /// the implementation says so otherwise (cluster mode: `is_healthy`).
    fn fault(&self, stall: std::time::Duration) -> Option<Fault> {
        let _ = stall;
        None
    }

    /// What an SRE should see of a replicated journal on the status page
    /// (cluster mode): this node, the stream's servers and how far behind
    /// this node is. `None` on a single node.
    fn cluster_view(&self) -> Option<serde_json::Value> {
        None
    }
}

impl dyn Durable + '_ {
    /// Submits and waits until durable.
    pub async fn commit(&self, commit: Commit) -> Result<Option<u64>, CommitError> {
        self.submit(commit)?.durable().await
    }
}
