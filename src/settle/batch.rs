//! The batches a sink receives, from the journal's decision records: pure,
//! no I/O, so that the same records and times always give the same batches.
//!
//! - A sink takes the approved events of its scenarios that charged
//!   something, in journal order.
//! - A batch is sealed when it holds `events_max` events, when the next
//!   event would take it past `bytes_max`, or when its oldest event is
//!   `age_max_ms` old; an event larger than `bytes_max` goes alone.
//! - Its id is the sink and the journal range it covers, so that sending it
//!   again (after a timeout, a restart) carries the same idempotency key.

use serde::Serialize;

use crate::journal::DecisionRecord;
use crate::model::Scenario;

/// A sink's routing and batch limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub sink: String,
    pub scenarios: Vec<Scenario>,
    pub events_max: usize,
    pub bytes_max: usize,
    pub age_max_ms: i64,
}

impl Rules {
    /// Whether this sink settles a record: approved, charged, one of its
    /// scenarios.
    pub fn takes(&self, r: &DecisionRecord) -> bool {
        r.decision == "approve" && r.charged_fen > 0 && self.scenarios.contains(&r.scenario)
    }
}

/// One event as the downstream system books it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Line<'a> {
    pub seq: u64,
    pub auth_id: &'a str,
    pub terminal: &'a str,
    pub event_id: &'a str,
    pub card_no: &'a str,
    pub scenario: Scenario,
    pub amount_fen: i64,
    pub at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<&'a str>,
}

impl<'a> Line<'a> {
    pub fn of(seq: u64, r: &'a DecisionRecord) -> Line<'a> {
        Line {
            seq,
            auth_id: &r.auth_id,
            terminal: &r.terminal,
            event_id: &r.event_id,
            card_no: &r.card_no,
            scenario: r.scenario,
            amount_fen: r.charged_fen,
            at_ms: r.at_ms,
            site: r.site.as_deref(),
        }
    }
}

/// A sealed batch: what is sent, signed, and acknowledged by count and total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: String,
    pub sink: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    pub total_fen: i64,
    /// When the oldest event in it was approved (for delivery latency).
    pub oldest_at_ms: i64,
    /// The JSON document sent (and signed), events in journal order.
    pub body: Vec<u8>,
}

/// `<sink>-<first seq>-<last seq>`, the seqs as 16 hex digits so that ids
/// sort in journal order.
pub fn batch_id(sink: &str, first_seq: u64, last_seq: u64) -> String {
    format!("{sink}-{first_seq:016x}-{last_seq:016x}")
}

/// Bytes of a batch document besides its events (id, sink, counts).
const ENVELOPE_BYTES: usize = 256;

/// The open batch of one sink.
#[derive(Debug)]
pub struct Batcher {
    rules: Rules,
    /// Serialized events, with their seq, amount and time.
    open: Vec<(u64, i64, i64, Vec<u8>)>,
    bytes: usize,
}

impl Batcher {
    pub fn new(rules: Rules) -> Batcher {
        assert!(rules.events_max >= 1, "a batch holds at least one event");
        Batcher {
            rules,
            open: Vec::new(),
            bytes: ENVELOPE_BYTES,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Events waiting in the open batch.
    pub fn pending(&self) -> usize {
        self.open.len()
    }

    /// Offers the journal record `seq`. Returns the batches this seals (at
    /// most two: the open one if the record does not fit, and one holding
    /// the record if that fills it).
    pub fn offer(&mut self, seq: u64, r: &DecisionRecord) -> Vec<Batch> {
        let mut sealed = Vec::new();
        if !self.rules.takes(r) {
            return sealed;
        }
        let line = serde_json::to_vec(&Line::of(seq, r)).expect("a line always serializes");
        if !self.open.is_empty() && self.bytes + line.len() + 1 > self.rules.bytes_max {
            sealed.extend(self.seal());
        }
        self.bytes += line.len() + 1;
        self.open.push((seq, r.charged_fen, r.at_ms, line));
        if self.open.len() >= self.rules.events_max || self.bytes > self.rules.bytes_max {
            sealed.extend(self.seal());
        }
        sealed
    }

    /// Seals the open batch if its oldest event is `age_max_ms` old at `now_ms`.
    pub fn tick(&mut self, now_ms: i64) -> Option<Batch> {
        let oldest = self.open.first()?.2;
        (now_ms - oldest >= self.rules.age_max_ms)
            .then(|| self.seal())
            .flatten()
    }

    /// Seals whatever is open.
    pub fn seal(&mut self) -> Option<Batch> {
        let first = self.open.first()?.0;
        let oldest_at_ms = self.open.iter().map(|e| e.2).min().expect("not empty");
        let last = self.open.last().expect("not empty").0;
        let id = batch_id(&self.rules.sink, first, last);
        let count = self.open.len() as u64;
        let total_fen: i64 = self.open.iter().map(|e| e.1).sum();
        let mut body = Vec::with_capacity(self.bytes);
        body.extend_from_slice(
            format!(
                "{{\"batch_id\":\"{id}\",\"sink\":{},\"first_seq\":{first},\"last_seq\":{last},\"count\":{count},\"total_fen\":{total_fen},\"events\":[",
                serde_json::to_string(&self.rules.sink).expect("a string serializes")
            )
            .as_bytes(),
        );
        for (i, e) in self.open.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&e.3);
        }
        body.extend_from_slice(b"]}");
        self.open.clear();
        self.bytes = ENVELOPE_BYTES;
        Some(Batch {
            id,
            sink: self.rules.sink.clone(),
            first_seq: first,
            last_seq: last,
            count,
            total_fen,
            oldest_at_ms,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventKind, Reason};

    fn record(scenario: Scenario, approve: bool, fen: i64, at_ms: i64) -> DecisionRecord {
        DecisionRecord {
            at_ms,
            terminal: "term-00001".into(),
            event_id: format!("e-{at_ms}"),
            auth_id: format!("a-{at_ms}"),
            kind: EventKind::Tap,
            card_no: "500118A00000001".into(),
            scenario,
            amount_fen: Some(fen),
            decision: if approve { "approve" } else { "decline" }.into(),
            reason: if approve {
                Reason::Ok
            } else {
                Reason::Denylisted
            },
            charged_fen: if approve { fen } else { 0 },
            site: Some("line-12".into()),
            occurred_at: None,
        }
    }

    fn transport(events_max: usize, bytes_max: usize, age_max_ms: i64) -> Batcher {
        Batcher::new(Rules {
            sink: "transport".into(),
            scenarios: vec![Scenario::Transit],
            events_max,
            bytes_max,
            age_max_ms,
        })
    }

    #[test]
    fn a_sink_takes_approved_charged_events_of_its_scenarios_only() {
        let mut b = transport(100, 1 << 20, 60_000);
        assert!(b
            .offer(1, &record(Scenario::Transit, true, 200, 0))
            .is_empty());
        b.offer(2, &record(Scenario::Transit, false, 200, 1));
        b.offer(3, &record(Scenario::Medical, true, 5_000, 2));
        b.offer(4, &record(Scenario::Transit, true, 0, 3));
        b.offer(5, &record(Scenario::Transit, true, 150, 4));
        let batch = b.seal().unwrap();
        assert_eq!((batch.count, batch.total_fen), (2, 350));
        assert_eq!((batch.first_seq, batch.last_seq), (1, 5));
        assert_eq!(batch.id, "transport-0000000000000001-0000000000000005");
        assert!(b.seal().is_none());
    }

    #[test]
    fn batches_seal_by_count_bytes_and_age() {
        // By count.
        let mut b = transport(3, 1 << 20, 60_000);
        let sealed: Vec<Batch> = (1..=7)
            .flat_map(|s| b.offer(s, &record(Scenario::Transit, true, 200, s as i64)))
            .collect();
        assert_eq!(sealed.len(), 2);
        assert_eq!(sealed[0].id, batch_id("transport", 1, 3));
        assert_eq!(sealed[1].id, batch_id("transport", 4, 6));
        assert_eq!(b.pending(), 1);

        // By bytes: a line is about 200 bytes; 256 + 2 lines fit in 700.
        let mut b = transport(100, 700, 60_000);
        let sealed: Vec<Batch> = (1..=5)
            .flat_map(|s| b.offer(s, &record(Scenario::Transit, true, 200, s as i64)))
            .collect();
        assert_eq!(sealed.len(), 2, "{sealed:?}");
        assert!(sealed.iter().all(|x| x.count == 2 && x.body.len() <= 700));
        // An event bigger than the limit goes alone.
        let mut tiny = transport(100, 10, 60_000);
        let alone = tiny.offer(9, &record(Scenario::Transit, true, 200, 0));
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0].count, 1);

        // By age of the oldest event.
        let mut b = transport(100, 1 << 20, 1_000);
        b.offer(1, &record(Scenario::Transit, true, 200, 10_000));
        b.offer(2, &record(Scenario::Transit, true, 200, 10_600));
        assert!(b.tick(10_999).is_none());
        let batch = b.tick(11_000).unwrap();
        assert_eq!(batch.count, 2);
        assert!(b.tick(99_000).is_none(), "nothing open");
    }

    #[test]
    fn the_body_is_a_document_the_receiver_can_check() {
        let mut b = transport(100, 1 << 20, 60_000);
        b.offer(41, &record(Scenario::Transit, true, 200, 1));
        b.offer(42, &record(Scenario::Transit, true, 300, 2));
        let batch = b.seal().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        assert_eq!(v["batch_id"], batch.id);
        assert_eq!(v["sink"], "transport");
        assert_eq!(
            (v["count"].as_u64(), v["total_fen"].as_i64()),
            (Some(2), Some(500))
        );
        let events = v["events"].as_array().unwrap();
        let sum: i64 = events
            .iter()
            .map(|e| e["amount_fen"].as_i64().unwrap())
            .sum();
        assert_eq!(sum, 500);
        assert_eq!(events[1]["seq"], 42);
        assert_eq!(events[0]["scenario"], "transit");
        // The same records always give the same bytes (and so signature).
        let mut again = transport(100, 1 << 20, 60_000);
        again.offer(41, &record(Scenario::Transit, true, 200, 1));
        again.offer(42, &record(Scenario::Transit, true, 300, 2));
        assert_eq!(again.seal().unwrap(), batch);
    }
}
