//! What each sink's delivery task is doing, for operators: shared between
//! the task (which writes) and the admin API (which reads, and pauses or
//! resumes). Atomics only: reading it never slows delivery.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use serde::Serialize;

#[derive(Debug, Default)]
pub struct SinkStatus {
    pub name: String,
    cursor: AtomicU64,
    unread: AtomicU64,
    backlog_batches: AtomicU64,
    backlog_events: AtomicU64,
    /// Approval time of the oldest event awaiting acknowledgement; 0: none.
    oldest_at_ms: AtomicI64,
    last_ack_ms: AtomicI64,
    circuit: AtomicU8,
    paused: AtomicBool,
    replay: AtomicBool,
    parked: AtomicU64,
    /// From the sink's config: the backlog bound and the age that warns.
    batches_max: u64,
    warn_age_ms: i64,
    /// Cluster mode: the node delivering the sink for the cluster (as
    /// far as this node knows), and whether it is this one.
    /// `None` on a single node; in a cluster (the holder, if any, and
    /// whether it is this node).
    deliverer: parking_lot::Mutex<Option<(Option<String>, bool)>>,
}

/// A sink's status as the admin API shows it.
#[derive(Debug, Serialize, PartialEq)]
pub struct View {
    pub sink: String,
    /// The next journal sequence number this sink will read.
    pub cursor: u64,
    /// Journal records after the cursor: events that wait in the journal
    /// (on disk) to be sealed, a few batches ahead of the sends.
    pub unread_records: u64,
    pub backlog_batches: u64,
    pub backlog_events: u64,
    /// Seconds since the oldest event awaiting acknowledgement was approved.
    pub oldest_age_s: f64,
    /// When the receiver last acknowledged a batch (Unix ms); null: not yet.
    pub last_ack_ms: Option<i64>,
    pub circuit: &'static str,
    pub paused: bool,
    pub parked: u64,
    /// Cluster mode: the node delivering this sink for the whole cluster
    /// (null while none holds its lease); absent on a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_by: Option<Option<String>>,
    /// Cluster mode: whether this node delivers it. The other figures
    /// are this node's last view when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivering_here: Option<bool>,
    /// What an SRE should look at; empty when all is well. Authorization
    /// does not depend on any of it, so `/readyz` stays green and lists
    /// them.
    pub warnings: Vec<String>,
}

impl SinkStatus {
    pub fn new(name: &str, batches_max: u64, warn_age_ms: i64) -> SinkStatus {
        SinkStatus {
            name: name.to_owned(),
            batches_max,
            warn_age_ms,
            ..SinkStatus::default()
        }
    }

    pub fn set_cursor(&self, seq: u64, journal_last_seq: u64) {
        self.cursor.store(seq, Ordering::Relaxed);
        self.unread.store(
            (journal_last_seq + 1).saturating_sub(seq),
            Ordering::Relaxed,
        );
    }
    pub fn set_backlog(&self, batches: u64, events: u64, oldest_at_ms: Option<i64>) {
        self.backlog_batches.store(batches, Ordering::Relaxed);
        self.backlog_events.store(events, Ordering::Relaxed);
        self.oldest_at_ms
            .store(oldest_at_ms.unwrap_or(0), Ordering::Relaxed);
    }
    pub fn acked(&self, now_ms: i64) {
        self.last_ack_ms.store(now_ms, Ordering::Relaxed);
    }
    /// 0 closed, 1 half open, 2 open (`CircuitState::level`).
    pub fn set_circuit(&self, level: u8) {
        self.circuit.store(level, Ordering::Relaxed);
    }
    pub fn set_parked(&self, n: u64) {
        self.parked.store(n, Ordering::Relaxed);
        self.publish_parked(n);
    }
    pub fn parked_add(&self, n: u64) {
        let now = self.parked.fetch_add(n, Ordering::Relaxed) + n;
        self.publish_parked(now);
    }
    /// `onecard_settle_parked_batches`: what an operator must look at.
    fn publish_parked(&self, n: u64) {
        metrics::gauge!("onecard_settle_parked_batches", "sink" => self.name.clone()).set(n as f64);
    }
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
    /// Asks the delivery task to put the parked batches back in line.
    pub fn request_replay(&self) {
        self.replay.store(true, Ordering::Release);
    }
    pub fn take_replay(&self) -> bool {
        self.replay.swap(false, Ordering::AcqRel)
    }
    /// Cluster mode: who delivers the sink, and whether this node does.
    pub fn set_deliverer(&self, node: Option<String>, here: bool) {
        *self.deliverer.lock() = Some((node, here));
    }

    pub fn view(&self, now_ms: i64) -> View {
        let parked = self.parked.load(Ordering::Relaxed);
        let oldest = self.oldest_at_ms.load(Ordering::Relaxed);
        let last = self.last_ack_ms.load(Ordering::Relaxed);
        // Read once: a second lock in the same expression would wait for
        // the first for ever.
        let deliverer = self.deliverer.lock().clone();
        let mut v = View {
            sink: self.name.clone(),
            cursor: self.cursor.load(Ordering::Relaxed),
            unread_records: self.unread.load(Ordering::Relaxed),
            backlog_batches: self.backlog_batches.load(Ordering::Relaxed),
            backlog_events: self.backlog_events.load(Ordering::Relaxed),
            oldest_age_s: if oldest == 0 {
                0.0
            } else {
                (now_ms - oldest).max(0) as f64 / 1000.0
            },
            last_ack_ms: (last != 0).then_some(last),
            circuit: match self.circuit.load(Ordering::Relaxed) {
                0 => "closed",
                1 => "half_open",
                _ => "open",
            },
            paused: self.is_paused(),
            parked,
            delivering_here: deliverer.as_ref().map(|(_, here)| *here),
            delivered_by: deliverer.map(|(node, _)| node),
            warnings: Vec::new(),
        };
        v.warnings = self.warnings(&v);
        v
    }

    fn warnings(&self, v: &View) -> Vec<String> {
        let mut w = Vec::new();
        if v.backlog_batches * 2 >= self.batches_max {
            w.push(format!(
                "backlog at {} of {} batches; at the bound new events wait in the journal",
                v.backlog_batches, self.batches_max
            ));
        }
        if v.oldest_age_s * 1000.0 >= self.warn_age_ms as f64 {
            w.push(format!(
                "the oldest unacknowledged event is {:.0} s old (warning from {} s)",
                v.oldest_age_s,
                self.warn_age_ms / 1000
            ));
        }
        if v.circuit == "open" {
            w.push("circuit open: the receiver keeps failing; probing after a pause".into());
        }
        if v.parked > 0 {
            w.push(format!(
                "{} batches parked; see /admin/v1/settlement/parked/{}",
                v.parked, v.sink
            ));
        }
        if v.paused {
            w.push("paused by an operator".into());
        }
        w
    }
}

/// Every configured sink's status, in config order.
#[derive(Debug, Default)]
pub struct Settlement {
    sinks: Vec<Arc<SinkStatus>>,
}

impl Settlement {
    pub fn new(sinks: &[crate::config::SinkConfig]) -> Settlement {
        Settlement {
            sinks: sinks
                .iter()
                .map(|s| {
                    Arc::new(SinkStatus::new(
                        &s.name,
                        s.backlog_batches_max as u64,
                        s.backlog_warn_age_ms,
                    ))
                })
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<SinkStatus>> {
        self.sinks.iter().find(|s| s.name == name)
    }

    pub fn all(&self) -> &[Arc<SinkStatus>] {
        &self.sinks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_says_what_delivery_is_doing() {
        let s = SinkStatus::new("transport", 4, 3_000);
        let v = s.view(5_000);
        assert_eq!(
            (v.circuit, v.last_ack_ms, v.oldest_age_s),
            ("closed", None, 0.0)
        );
        assert!(v.warnings.is_empty());
        s.set_backlog(2, 9, Some(1_000));
        s.set_circuit(2);
        s.acked(4_000);
        s.pause(true);
        s.set_cursor(77, 80);
        s.set_parked(2);
        s.parked_add(1);
        let v = s.view(5_000);
        assert_eq!(
            v,
            View {
                sink: "transport".into(),
                cursor: 77,
                unread_records: 4,
                backlog_batches: 2,
                backlog_events: 9,
                oldest_age_s: 4.0,
                last_ack_ms: Some(4_000),
                circuit: "open",
                paused: true,
                parked: 3,
                delivered_by: None,
                delivering_here: None,
                warnings: vec![
                    "backlog at 2 of 4 batches; at the bound new events wait in the journal".into(),
                    "the oldest unacknowledged event is 4 s old (warning from 3 s)".into(),
                    "circuit open: the receiver keeps failing; probing after a pause".into(),
                    "3 batches parked; see /admin/v1/settlement/parked/transport".into(),
                    "paused by an operator".into(),
                ],
            }
        );
        s.set_backlog(1, 1, Some(4_000));
        s.set_circuit(0);
        s.pause(false);
        s.set_parked(0);
        assert!(s.view(5_000).warnings.is_empty());
    }
}
