//! The phases every terminal request runs, each a function with one job.
//!
//! 1. [`Gateway::begin`]: idempotency. A retry gets the first answer again
//!    byte for byte, another body under the same event id is refused, and a
//!    new event gets the [`Ticket`] to decide under: its idempotency slot,
//!    held until the decision is durable, so a concurrent copy waits.
//! 2. [`Gateway::resolve`]: the credential. A tap names its card; a scan's
//!    code is verified, its binding looked up and its `jti` spent; a code
//!    that fails is a decline with a reason, not an error.
//! 3. *gather*: what the rules need besides the card (a door's allow-list
//!    entry, a partner's deny list, a counter's purpose). Each path has its
//!    own (`authorize::gather`), read before the card's lock.
//! 4. [`Gateway::decide_and_commit`]: under the card's lock (in a cluster,
//!    also its gate on this node until the commit is applied), the card's
//!    snapshot goes to the path's decision step (pure rules from the core
//!    crate, plus building the record and the answer), and everything the
//!    decision writes goes to the durability seam as one commit; memory
//!    follows once the commit is queued, still under the lock, so the next
//!    decision of the card sees this one and the journal gets them in order.
//! 5. [`Gateway::answered`]: waits until the commit is durable, then
//!    counts it. Only then does the answer go out.
//!
//! Authorize, scan, hold, capture, void, reverse and an offline upload's
//! events are these phases in order with their own decision step, so each
//! reads as a list of steps. No phase waits for the disk on an async worker:
//! store reads go through `Store::read` (memory first, the blocking pool
//! when a file must be read).

use std::time::Instant;

use onecard_core::model::{Card, CardNo, Reason, Scenario};
use onecard_core::record::{DecisionRecord, RecordView};
use onecard_core::wire::Credential;

use crate::service::credential::{self, Resolved};
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::idempotency::{InFlight, Lookup};
use crate::service::timing::{self, Phase};
use crate::store::durable::{Commit, CommitError, Fence, Op, Pending};
use crate::store::idem::{self, Origin, Tail};
use crate::store::venues::Count;
use crate::store::{cards, profiles, Cf, StoreError};

/// An event being decided: the key its answer is remembered under, the
/// request's fingerprint, and the idempotency slot(s) it holds. The slots
/// travel inside the commit and are released by the durability seam once
/// the commit is durable, even if the client has hung up by then: a retry
/// can never be decided while the first decision is still queued.
pub(crate) struct Ticket {
    key: Vec<u8>,
    fingerprint: [u8; 32],
    slot: InFlight,
    /// More slots (a hold step's, a reversal's): a tap holds one, and its
    /// ticket allocates nothing for them.
    more_slots: Vec<InFlight>,
    /// A reversal of this event arrived first: it is declined `REVERSED`.
    pub reversed: bool,
}

impl Ticket {
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Holds one more slot until the commit is durable (a hold step holds
    /// its hold's slot, a reversal its event's).
    pub fn also_holding(mut self, slot: InFlight) -> Ticket {
        self.more_slots.push(slot);
        self
    }
}

/// What the idempotency phase found.
pub(crate) enum Begun {
    /// Seen with the same body: this answer again.
    Replay(Vec<u8>),
    Decide(Ticket),
}

/// How a decision's answer is remembered under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remember {
    /// With what a later reversal needs to know of the event (approved,
    /// charged, scenario, card, site).
    Event { approved: bool },
    /// The answer alone (a reversal's own answer).
    Answer,
}

/// A decision's journal record, as its path has it.
pub(crate) enum Record<'a> {
    /// Built whole by the path (a reversal, a hold's step, an offline
    /// event).
    Owned(DecisionRecord),
    /// A tap's or a scan's: borrowed from the request, the terminal's name
    /// and its inline id, so the record costs no heap allocation of its
    /// own.
    Borrowed(RecordView<'a>),
}

impl Record<'_> {
    pub fn view(&self) -> RecordView<'_> {
        match self {
            Record::Owned(record) => record.view(),
            Record::Borrowed(view) => *view,
        }
    }
}

impl From<DecisionRecord> for Record<'_> {
    fn from(record: DecisionRecord) -> Self {
        Record::Owned(record)
    }
}

/// Everything one decision writes, built by a path's decision step under
/// the card's lock; [`Gateway::decide_and_commit`] commits it whole.
pub(crate) struct Decided<'g> {
    pub record: Record<'g>,
    /// The answer's bytes: sent, and replayed to a retry.
    pub answer: Vec<u8>,
    pub remember: Remember,
    /// The decision's other writes (a hold, a tombstone).
    pub ops: Vec<Op>,
    /// The card's new state: written with the decision, and set in memory
    /// once the commit is queued.
    pub card_after: Option<(CardNo, Card)>,
    /// A venue's new count, under the venue's lock (taken after the
    /// card's): written with the decision, set in memory likewise.
    pub venue_after: Option<(parking_lot::MutexGuard<'g, Count>, String, Count)>,
}

/// A decision whose commit is queued: wait for it with
/// [`Gateway::answered`].
pub(crate) struct Committed {
    pub pending: Pending,
    pub reason: Reason,
    pub answer: Vec<u8>,
    /// A scan's spent code: given back if the commit fails after all.
    pub scan: Option<onecard_core::record::ScanRef>,
    /// Cluster mode: the card's gate on this node, held until the commit
    /// is durable and applied. Without it every request for a busy card
    /// at this node would decide on the same snapshot and all but one
    /// would lose the race at the stream; with it only requests at
    /// different nodes race.
    _gate: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Gateway {
    /// Phase 1, idempotency: the first answer again, `409` with `reused`
    /// for another body, or the ticket to decide under.
    pub(crate) async fn begin(
        &self,
        key: Vec<u8>,
        fingerprint: [u8; 32],
        now_ms: i64,
        reused: &'static str,
    ) -> Result<Begun, ServiceError> {
        let lookup = self.idem.begin(&key, &fingerprint, now_ms).await?;
        timing::mark(Phase::Idempotency);
        let (slot, reversed) = match lookup {
            Lookup::Replay(body) => {
                self.metrics.replays.increment(1);
                self.stats.record(
                    crate::service::stats::Kind::Replay,
                    "replay",
                    std::time::Duration::ZERO,
                );
                return Ok(Begun::Replay(body));
            }
            Lookup::Conflict => return Err(ServiceError::already_used(reused)),
            Lookup::Fresh(slot) => (slot, false),
            Lookup::Reversed(slot) => (slot, true),
        };
        // A full, failing or stalled disk: nothing new is decided (an
        // answer given before is still replayed above: a read).
        if let Some(f) = self.journal_fault() {
            return Err(ServiceError::Unavailable(f.message().into()));
        }
        Ok(Begun::Decide(Ticket {
            key,
            fingerprint,
            slot,
            more_slots: Vec::new(),
            reversed,
        }))
    }

    /// Phase 2, the credential: the card it names, or why the event is
    /// declined before the rules.
    pub(crate) async fn resolve<'a>(
        &self,
        credential: &'a Credential,
        now_ms: i64,
    ) -> Result<Resolved<'a>, ServiceError> {
        let resolved =
            credential::resolve(self.scanner.as_deref(), &self.store, credential, now_ms).await;
        timing::mark(Phase::Credential);
        resolved
    }

    /// Phase 4, decide and commit: under the lock of `card` (if the event
    /// names one), `step` decides on the card's snapshot and builds what the
    /// decision writes; it is committed as one, remembered under the
    /// ticket's key (dated `remembered_ms`), and memory follows.
    pub(crate) async fn decide_and_commit<'g>(
        &'g self,
        ticket: Ticket,
        card: Option<&CardNo>,
        remembered_ms: i64,
        step: impl FnOnce(Option<Card>) -> Result<Decided<'g>, ServiceError>,
    ) -> Result<Committed, ServiceError> {
        let gate = match (card, &self.card_gates) {
            (Some(c), Some(gates)) => Some(gates[self.cards.stripe(c)].clone().lock_owned().await),
            _ => None,
        };
        let _card_lock = card.map(|c| self.cards.lock(c));
        let snapshot = card.and_then(|c| self.cards.get(c));
        let Decided {
            record,
            answer,
            remember,
            mut ops,
            card_after,
            venue_after,
        } = step(snapshot)?;
        let record = record.view();
        // Cluster mode: another node's scan of this code was applied since
        // this one resolved it. Deciding again finds it spent.
        if let (Some(s), Some(spent), Some(applied)) =
            (&self.scanner, record.scan, self.journal.applied_watch())
        {
            if s.is_recorded(spent, remembered_ms) {
                let after = *applied.borrow();
                return Err(CommitError::Raced { after }.into());
            }
        }
        if let Some((card_no, after)) = &card_after {
            ops.push(Op::Put(
                Cf::Cards,
                card_no.as_str().as_bytes().to_vec(),
                cards::encode(after),
            ));
        }
        if let Some((_, site, count)) = &venue_after {
            ops.push(Op::Put(
                Cf::Venues,
                site.as_bytes().to_vec(),
                count.encode(),
            ));
        }
        let fences = venue_after
            .as_ref()
            .map(|(_, site, _)| Fence::Venue(site.as_str().into()))
            .into_iter()
            .collect();
        let pending = self.commit(
            ticket,
            remembered_ms,
            &record,
            &answer,
            remember,
            ops,
            fences,
        )?;
        // In a cluster memory follows the replicated journal instead, on
        // every node alike, once the stream has the commit.
        if !self.journal.applies_memory() {
            if let Some((card_no, after)) = card_after {
                self.cards.set(card_no, after);
            }
            if let Some((mut guard, _, count)) = venue_after {
                *guard = count;
            }
        }
        timing::mark(Phase::Decide);
        Ok(Committed {
            pending,
            reason: record.reason,
            answer,
            scan: record.scan.cloned(),
            _gate: gate,
        })
    }

    /// Queues a decision's one commit: its record, its answer remembered
    /// under the ticket's key, and its other writes. A scan's spent code is
    /// given back if the commit is refused, so the terminal's retry is a new
    /// attempt, not a replay.
    fn commit(
        &self,
        ticket: Ticket,
        remembered_ms: i64,
        record: &RecordView<'_>,
        answer: &[u8],
        remember: Remember,
        mut ops: Vec<Op>,
        fences: Vec<Fence>,
    ) -> Result<Pending, ServiceError> {
        let tail = match remember {
            Remember::Event { approved } => Tail::Origin(Origin {
                approved,
                charged_fen: record.charged_fen,
                scenario: record
                    .scenario
                    .expect("the record of a terminal's event names its scenario"),
                card_no: record.card_no,
                site: record.site,
            }),
            Remember::Answer => Tail::Plain,
        };
        let remembered = idem::encode(
            &ticket.fingerprint,
            remembered_ms,
            record.auth_id,
            tail,
            answer,
        );
        ops.push(Op::Put(Cf::Idem, ticket.key, remembered));
        let commit = Commit {
            record: Some(record.to_json()),
            ops,
            hold_until_written: Some(Box::new((ticket.slot, ticket.more_slots))),
            card: (!record.card_no.is_empty()).then(|| record.card_no.into()),
            also: Vec::new(),
            fences,
        };
        self.journal.submit(commit).map_err(|e| {
            if let (Some(s), Some(spent)) = (&self.scanner, record.scan) {
                s.unspend(spent);
            }
            ServiceError::from(e)
        })
    }

    /// Phase 5: waits until a decision's commit is durable, then counts it
    /// under its scenario and reason, with the time since `started`.
    pub(crate) async fn answered(
        &self,
        committed: Committed,
        scenario: Scenario,
        started: Instant,
    ) -> Result<Vec<u8>, ServiceError> {
        let stall = std::time::Duration::from_millis(self.config.journal.stall_ms);
        let durable = match tokio::time::timeout(stall, committed.pending.durable()).await {
            Ok(d) => d,
            // The disk is stalled. The commit stays queued and may still
            // be recorded; the idempotency slot it holds makes a retry
            // wait for it, then answer it. Until then this is no answer.
            Err(_) => {
                timing::mark(Phase::Commit);
                return Err(ServiceError::Unavailable(
                    "the journal's disk is stalled: this decision is not recorded yet; retry with the same event id".into(),
                ));
            }
        };
        timing::mark(Phase::Commit);
        if let Err(e) = durable {
            // Not recorded (a cluster's race lost, or no quorum): the
            // code may be scanned again.
            if let (Some(s), Some(spent)) = (&self.scanner, &committed.scan) {
                s.unspend(spent);
            }
            return Err(e.into());
        }
        self.metrics
            .decision(scenario, committed.reason)
            .increment(1);
        let took = started.elapsed();
        self.metrics.latency(scenario).record(took.as_secs_f64());
        self.stats.record(
            crate::service::stats::Kind::Scenario,
            scenario.as_str(),
            took,
        );
        let outcome = match committed.reason {
            Reason::Ok => "approve",
            r => r.code(),
        };
        // Counted only: the page shows outcomes' rates, not their latency.
        self.stats.record(
            crate::service::stats::Kind::Outcome,
            outcome,
            std::time::Duration::ZERO,
        );
        Ok(committed.answer)
    }

    /// Runs a request again when it lost a race for its card (or its
    /// event) to another node of the cluster, once this node has applied
    /// the winner: the next run sees the card as the winner left it, or
    /// replays the event's first answer. At most
    /// `cluster.conflict_retries_max` times; then `503`.
    pub(crate) async fn retrying<T, F, Fut>(&self, mut once: F) -> Result<T, ServiceError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ServiceError>>,
    {
        let max = self.race_retries_max();
        let mut tries = 0;
        loop {
            match once().await {
                Err(ServiceError::Commit(CommitError::Raced { after })) if tries < max => {
                    self.after_race(after, tries).await?;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// How many times [`Gateway::retrying`] runs a request again, at most.
    pub(crate) fn race_retries_max(&self) -> u32 {
        self.config
            .cluster
            .as_ref()
            .map_or(0, |c| c.conflict_retries_max)
    }

    /// Before try `tries + 1` of a request that lost a race: waits until
    /// the winner (`after`) is applied here, or backs off.
    pub(crate) async fn after_race(&self, after: u64, tries: u32) -> Result<(), ServiceError> {
        self.metrics.cluster_retries.increment(1);
        let behind = self
            .journal
            .applied_watch()
            .is_some_and(|w| *w.borrow() < after);
        if behind {
            // The winner is known: decide again as soon as it is applied
            // here.
            self.wait_applied(after).await
        } else {
            // A copy of the event still being stored for another node:
            // back off 1, 2, 4 ... ms for it.
            tokio::time::sleep(std::time::Duration::from_millis(1 << tries.min(7))).await;
            Ok(())
        }
    }

    /// Waits until this node has applied the cluster's journal up to
    /// `seq` (at once on a single node).
    async fn wait_applied(&self, seq: u64) -> Result<(), ServiceError> {
        let Some(mut rx) = self.journal.applied_watch() else {
            return Ok(());
        };
        let timeout = std::time::Duration::from_millis(
            self.config
                .cluster
                .as_ref()
                .map_or(crate::config::CLUSTER_PUBLISH_TIMEOUT_MS_DEFAULT, |c| {
                    c.publish_timeout_ms
                }),
        );
        let reached = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(CommitError::Unreachable.into())
        }
    }

    /// The card that carries `card`'s counters now: the card that replaced
    /// it, through any number of replacements, or `card` itself. A
    /// replacement takes over the old card's daily spend, deductible and
    /// holds' reservations, so what a step or a reversal gives back or
    /// books goes there.
    pub(crate) async fn current_card(&self, card: CardNo) -> Result<CardNo, ServiceError> {
        let corrupt = |detail: &str| {
            ServiceError::from(StoreError::Corrupt {
                cf: "profiles",
                detail: detail.into(),
            })
        };
        let mut card = card;
        // A card is replaced a few times in its holder's life; the bound
        // only stops a corrupt loop.
        for _ in 0..16 {
            match profiles::profile_async(&self.store, &card)
                .await?
                .replaced_by
            {
                Some(next) => {
                    card = CardNo::parse(&next)
                        .map_err(|_| corrupt("a replacement card number is not valid"))?
                }
                None => return Ok(card),
            }
        }
        Err(corrupt("card replacements form a loop"))
    }
}
