//! The rollout report (目录清单, 应用推广落实情况): a follower counts this
//! node's journal into per-day tallies per responsible unit and scenario
//! (`store::rollout`; what counts: `onecard_core::rollout`), and a
//! report request reads one day of them.
//!
//! Why a follower and not a scan per request: a city's day is millions of
//! records, and a unit asks for its day at any time; the tallies answer
//! in a few reads whatever the day's size. A request first counts what
//! the follower has not yet (at most [`ON_REQUEST_MAX`] records), so the
//! report matches the journal as of the request; if more is waiting it
//! says how much.
//!
//! Runs on its own task; the hot path never waits on it. Each step reads
//! at most [`READ_BATCH`] records on the runtime's blocking pool
//! ([`crate::store::blocking`]); with `block_in_place` instead, a follower
//! stepping through a backlog grew the process to 273 threads in a soak,
//! each with its own allocator heaps (resident memory rose by 900 MB in
//! twelve minutes; issue 19).

use std::sync::Arc;
use std::time::Duration;

use onecard_core::rollout::{self as rules, Row};
use tokio::sync::watch;

use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::store::rollout::{self, Counted};
use crate::store::{journal, StoreError};

/// Journal records counted per step.
const READ_BATCH: usize = 10_000;
/// What a report request counts itself at most before it answers.
pub const ON_REQUEST_MAX: usize = 200_000;
/// How often the follower looks at the journal again.
const EVERY: Duration = Duration::from_secs(2);

/// One day's report, as counted.
#[derive(Debug)]
pub struct Report {
    /// Local day, days since the epoch.
    pub day: i32,
    pub rows: Vec<Row>,
    /// Terminals seen per unit that day (a terminal serving two scenarios
    /// counts once).
    pub unit_terminals: std::collections::BTreeMap<String, u64>,
    /// The last journal sequence counted.
    pub counted_through: u64,
    /// The journal's last sequence when the report was read: records
    /// after `counted_through` are not in it yet.
    pub journal_last: u64,
}

impl Gateway {
    /// Counts up to `max` journal records past the rollout's cursor.
    /// Returns how many it read (fewer than `max`: the journal's end).
    pub async fn count_rollout(self: &Arc<Self>, max: usize) -> Result<usize, StoreError> {
        let _one = self.rollout_lock.lock().await;
        let mut total = 0;
        while total < max {
            let gw = self.clone();
            let batch = READ_BATCH.min(max - total);
            let n = crate::store::blocking(move || gw.count_step(batch)).await?;
            total += n;
            if n == 0 {
                break;
            }
        }
        Ok(total)
    }

    fn count_step(&self, n: usize) -> Result<usize, StoreError> {
        let from = rollout::cursor(&self.store)?;
        let records = journal::read(&self.store, from, n)?;
        let Some(&(last, _)) = records.last() else {
            return Ok(0);
        };
        let mut counted = Counted::default();
        let offset = self.policy.day_offset_minutes;
        for (_, r) in &records {
            if let Some(u) = rules::usage(r, &self.config.catalogue, offset) {
                counted.add(&u);
            }
        }
        rollout::add(&self.store, counted, last + 1)?;
        Ok(records.len())
    }

    /// The report of local day `day`, after counting what the follower
    /// has not yet (up to [`ON_REQUEST_MAX`] records).
    pub async fn rollout_report(self: &Arc<Self>, day: i32) -> Result<Report, ServiceError> {
        self.count_rollout(ON_REQUEST_MAX).await?;
        let store = self.store.clone();
        let kept = crate::store::blocking(move || rollout::day(&store, day)).await?;
        Ok(Report {
            day,
            rows: rules::rows(
                &self.config.catalogue,
                &kept.tallies,
                &kept.terminals,
                &kept.spans,
            ),
            unit_terminals: kept.unit_terminals,
            counted_through: rollout::counted_through(&self.store)?,
            journal_last: rollout::journal_last(&self.store)?,
        })
    }
}

/// Counts the journal into the rollout report every [`EVERY`] until `stop`
/// fires. A failure (a record that does not decode, a write refused) is
/// logged once and tried again; the report says how far it counted.
pub async fn run(gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        // One step per turn of the lock: a report request waits for a
        // step at most, not for a backlog.
        match gw.count_rollout(READ_BATCH).await {
            Ok(n) if n == READ_BATCH => {
                failing = false;
                tokio::task::yield_now().await;
                continue;
            }
            Ok(_) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "the rollout report cannot count the journal; will retry");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}
