//! The batches a sink receives, from the journal's decision records: pure,
//! no I/O, so that the same records and times always give the same batches.
//!
//! - A sink takes the approved events of its scenarios that charged
//!   something, in journal order, and the reversals of such events.
//! - A reversal whose event is still in the open batch takes it out (the
//!   receiver never sees either); one whose event is already sealed goes
//!   in as a reversal line with the negative amount, so a batch's total is
//!   what the receiver books net.
//! - A batch is sealed when it holds `events_max` events, when the next
//!   event would take it past `bytes_max`, or when its oldest event is
//!   `age_max_ms` old; an event larger than `bytes_max` goes alone.
//! - Its id is the sink and the journal range it covers, so that sending it
//!   again (after a timeout, a restart) carries the same idempotency key.
//! - After a restart the open batch is rebuilt by offering the journal
//!   again from [`Batcher::resume_seq`]: the first record of the open
//!   batch's *epoch* (since it was last empty), not the record after the
//!   last sealed event. A reversal that took its charge out of the open
//!   batch may come after the last event of the batch that then seals;
//!   resuming after that event would offer the reversal without its
//!   charge, and book a refund of a charge the receiver never got.
//! - A credit (a disbursement: money paid *to* the card holder's account)
//!   goes in as a credit line with the negative amount, like a reversal
//!   gives money back, so the total stays the net the receiver books; its
//!   programme, project and month ride along.

use serde::{Deserialize, Serialize};

use crate::model::{Scenario, StoredCardNo};
use crate::record::DecisionRecord;

/// A sink's routing and batch limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub sink: String,
    pub scenarios: Vec<Scenario>,
    /// Whose cards: a partner region's sink settles only its cards, a
    /// home sink none of them.
    pub cards: Cards,
    pub events_max: usize,
    pub bytes_max: usize,
    pub age_max_ms: i64,
    /// The local day's offset from UTC, for the daily report.
    pub day_offset_minutes: i32,
}

impl Rules {
    /// Whether this sink settles a record: approved (or the reversal of an
    /// approval, or a credit), charged, one of its scenarios.
    pub fn takes(&self, r: &DecisionRecord) -> bool {
        (r.decision == "approve" || r.decision == "reverse" || r.decision == "credit")
            && r.charged_fen > 0
            && r.scenario.is_some_and(|s| self.scenarios.contains(&s))
            && self.cards.takes(&r.card_no)
    }

    /// The local calendar day of a time, as days since 1970-01-01.
    pub fn day(&self, at_ms: i64) -> i32 {
        (at_ms.div_euclid(1000) + i64::from(self.day_offset_minutes) * 60).div_euclid(86_400) as i32
    }
}

/// Which cards' events a sink settles, by issuing-region prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cards {
    /// Every card but those of these (partner) prefixes.
    #[default]
    Home,
    HomeExcept(Vec<String>),
    /// Only cards of these (partner) prefixes.
    Only(Vec<String>),
}

impl Cards {
    /// For a sink naming `partners` (empty: a home sink).
    pub fn of(regions: &crate::scenario::region::Rules, partners: &[String]) -> Cards {
        if partners.is_empty() {
            let all = regions.partner_prefixes();
            if all.is_empty() {
                Cards::Home
            } else {
                Cards::HomeExcept(all)
            }
        } else {
            Cards::Only(
                regions
                    .partners
                    .iter()
                    .filter(|p| partners.contains(&p.name))
                    .flat_map(|p| p.prefixes.clone())
                    .collect(),
            )
        }
    }

    pub fn takes(&self, card_no: &str) -> bool {
        let any = |ps: &[String]| ps.iter().any(|p| card_no.starts_with(p.as_str()));
        match self {
            Cards::Home => true,
            Cards::HomeExcept(ps) => !any(ps),
            Cards::Only(ps) => any(ps),
        }
    }
}

/// Whether a line books a charge or gives one back.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LineType {
    Charge,
    Reversal,
    /// Money paid to the card holder (a subsidy, wages).
    Credit,
}

/// One event as the downstream system books it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Line<'a> {
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: LineType,
    pub auth_id: &'a str,
    /// For a reversal: the auth_id of the charge it gives back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverses: Option<&'a str>,
    pub terminal: &'a str,
    pub event_id: &'a str,
    pub card_no: &'a StoredCardNo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<Scenario>,
    /// Negative for a reversal and a credit.
    pub amount_fen: i64,
    pub at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<&'a str>,
    /// A public payment's bill reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bill_ref: Option<&'a str>,
    /// A credit's programme, and a wages programme's project and month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programme: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub month: Option<&'a str>,
    /// A medical capture's split between insurance and self-pay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<crate::scenario::medical::Split>,
}

impl<'a> Line<'a> {
    pub fn of(seq: u64, r: &'a DecisionRecord) -> Line<'a> {
        let kind = match r.decision.as_str() {
            "reverse" => LineType::Reversal,
            "credit" => LineType::Credit,
            _ => LineType::Charge,
        };
        let credit = r.credit.as_ref();
        Line {
            seq,
            kind,
            auth_id: &r.auth_id,
            reverses: r.reverses.as_deref(),
            terminal: &r.terminal,
            event_id: &r.event_id,
            card_no: &r.card_no,
            scenario: r.scenario,
            amount_fen: if kind == LineType::Charge {
                r.charged_fen
            } else {
                -r.charged_fen
            },
            at_ms: r.at_ms,
            site: r.site.as_deref(),
            bill_ref: r.bill_ref.as_deref(),
            programme: credit.map(|c| c.programme.as_str()),
            project: credit.and_then(|c| c.project.as_deref()),
            month: credit.and_then(|c| c.month.as_deref()),
            split: r.split,
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
    /// Its lines summed by local day and site, for the daily report.
    pub summary: Vec<DaySite>,
}

/// Lines of one local day and site: charges, reversals and credits,
/// counted and summed (reversals and credits as positive amounts paid
/// out).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaySite {
    pub day: i32,
    /// Empty when the events named no site.
    pub site: String,
    pub charges: u64,
    pub charged_fen: i64,
    pub reversals: u64,
    pub reversed_fen: i64,
    /// Absent in reports stored before credits existed.
    #[serde(default)]
    pub credits: u64,
    #[serde(default)]
    pub credited_fen: i64,
}

impl DaySite {
    pub fn add(&mut self, o: &DaySite) {
        self.charges += o.charges;
        self.charged_fen += o.charged_fen;
        self.reversals += o.reversals;
        self.reversed_fen += o.reversed_fen;
        self.credits += o.credits;
        self.credited_fen += o.credited_fen;
    }

    /// What the receiver books net: charges less what went back out.
    pub fn net_fen(&self) -> i64 {
        self.charged_fen - self.reversed_fen - self.credited_fen
    }
}

/// One event in the open batch.
#[derive(Debug)]
struct Open {
    seq: u64,
    /// Signed: negative for a reversal or credit line.
    fen: i64,
    kind: LineType,
    at_ms: i64,
    auth_id: String,
    site: Option<String>,
    line: Vec<u8>,
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
    open: Vec<Open>,
    bytes: usize,
    /// The first record this batcher took since it was last empty: every
    /// record from here on has shaped the open batch (an event in it, a
    /// reversal that took one out), every record before is in a sealed
    /// batch or cancelled out. `None` while nothing is open.
    epoch: Option<u64>,
}

impl Batcher {
    pub fn new(rules: Rules) -> Batcher {
        assert!(rules.events_max >= 1, "a batch holds at least one event");
        Batcher {
            rules,
            open: Vec::new(),
            bytes: ENVELOPE_BYTES,
            epoch: None,
        }
    }

    /// Where to resume following the journal after a restart so that the
    /// open batch comes back exactly as it is now, given that every record
    /// before `next_seq` has been offered: the open batch's epoch, or
    /// `next_seq` when nothing is open. Stored with each sealed batch (and
    /// on its own when nothing is open), it is the sink's cursor.
    pub fn resume_seq(&self, next_seq: u64) -> u64 {
        match self.epoch {
            Some(first) => {
                debug_assert!(first < next_seq, "the epoch starts at an offered record");
                first
            }
            None => next_seq,
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
        if r.decision == "reverse" {
            // Its charge not sent yet: take it out, and that is all.
            let waiting = self.open.iter().position(|e| {
                e.kind == LineType::Charge && Some(e.auth_id.as_str()) == r.reverses.as_deref()
            });
            if let Some(i) = waiting {
                let gone = self.open.remove(i);
                self.bytes -= gone.line.len() + 1;
                if self.open.is_empty() {
                    // The charge and its reversal cancel out: a restart
                    // need not see either again.
                    self.epoch = None;
                }
                return sealed;
            }
        }
        let line = Line::of(seq, r);
        let (fen, kind) = (line.amount_fen, line.kind);
        let line = serde_json::to_vec(&line).expect("a line always serializes");
        if !self.open.is_empty() && self.bytes + line.len() + 1 > self.rules.bytes_max {
            sealed.extend(self.seal());
        }
        self.bytes += line.len() + 1;
        if self.open.is_empty() {
            self.epoch = Some(seq);
        }
        self.open.push(Open {
            seq,
            fen,
            kind,
            at_ms: r.at_ms,
            auth_id: r.auth_id.clone(),
            site: r.site.clone(),
            line,
        });
        if self.open.len() >= self.rules.events_max || self.bytes > self.rules.bytes_max {
            sealed.extend(self.seal());
        }
        sealed
    }

    /// Seals the open batch if its oldest event is `age_max_ms` old at `now_ms`.
    pub fn tick(&mut self, now_ms: i64) -> Option<Batch> {
        let oldest = self.open.iter().map(|e| e.at_ms).min()?;
        (now_ms - oldest >= self.rules.age_max_ms)
            .then(|| self.seal())
            .flatten()
    }

    /// Seals whatever is open.
    pub fn seal(&mut self) -> Option<Batch> {
        let first = self.open.first()?.seq;
        let oldest_at_ms = self.open.iter().map(|e| e.at_ms).min().expect("not empty");
        let last = self.open.last().expect("not empty").seq;
        let id = batch_id(&self.rules.sink, first, last);
        let count = self.open.len() as u64;
        let total_fen: i64 = self.open.iter().map(|e| e.fen).sum();
        let mut summary: Vec<DaySite> = Vec::new();
        for e in &self.open {
            let (day, site) = (self.rules.day(e.at_ms), e.site.as_deref().unwrap_or(""));
            let i = match summary.iter().position(|d| d.day == day && d.site == site) {
                Some(i) => i,
                None => {
                    summary.push(DaySite {
                        day,
                        site: site.to_owned(),
                        ..DaySite::default()
                    });
                    summary.len() - 1
                }
            };
            let d = &mut summary[i];
            match e.kind {
                LineType::Charge => {
                    d.charges += 1;
                    d.charged_fen += e.fen;
                }
                LineType::Reversal => {
                    d.reversals += 1;
                    d.reversed_fen -= e.fen;
                }
                LineType::Credit => {
                    d.credits += 1;
                    d.credited_fen -= e.fen;
                }
            }
        }
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
            body.extend_from_slice(&e.line);
        }
        body.extend_from_slice(b"]}");
        self.open.clear();
        self.bytes = ENVELOPE_BYTES;
        self.epoch = None;
        Some(Batch {
            id,
            sink: self.rules.sink.clone(),
            first_seq: first,
            last_seq: last,
            count,
            total_fen,
            oldest_at_ms,
            body,
            summary,
        })
    }
}

/// A receiver's acknowledgement of a batch: the sender forgets the batch
/// only when all three match what it sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub batch_id: String,
    pub count: u64,
    pub total_fen: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventKind, Reason, StoredCardNo};

    fn record(scenario: Scenario, approve: bool, fen: i64, at_ms: i64) -> DecisionRecord {
        DecisionRecord {
            at_ms,
            terminal: "term-00001".into(),
            event_id: format!("e-{at_ms}"),
            auth_id: format!("a-{at_ms}"),
            kind: EventKind::Tap,
            card_no: "500118A00000001".into(),
            scenario: Some(scenario),
            amount_fen: Some(fen),
            decision: if approve { "approve" } else { "decline" }.into(),
            reason: if approve {
                Reason::Ok
            } else {
                Reason::Denylisted
            },
            charged_fen: if approve { fen } else { 0 },
            site: Some("line-12".into()),
            ..DecisionRecord::default()
        }
    }

    /// The reversal of `of`, journaled at `at_ms`.
    fn reversal(of: &DecisionRecord, at_ms: i64) -> DecisionRecord {
        DecisionRecord {
            at_ms,
            auth_id: format!("r-{at_ms}"),
            amount_fen: None,
            decision: "reverse".into(),
            reason: Reason::Ok,
            reverses: Some(of.auth_id.clone()),
            ..of.clone()
        }
    }

    fn transport(events_max: usize, bytes_max: usize, age_max_ms: i64) -> Batcher {
        Batcher::new(Rules {
            sink: "transport".into(),
            scenarios: vec![Scenario::Transit],
            cards: Cards::Home,
            events_max,
            bytes_max,
            age_max_ms,
            day_offset_minutes: 480,
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
    fn partner_cards_go_to_their_own_sink_only() {
        let regions = crate::scenario::region::Rules::from_config(
            &toml::from_str(
                "home = [\"50\"]\n[[partners]]\nname = \"sichuan\"\nprefixes = [\"51\"]\nscenarios = [\"transit\"]",
            )
            .unwrap(),
        )
        .unwrap();
        let home = Cards::of(&regions, &[]);
        let partner = Cards::of(&regions, &["sichuan".to_owned()]);
        assert!(home.takes("500118A12345678"));
        assert!(!home.takes("510104A12345678"));
        assert!(partner.takes("510104A12345678"));
        assert!(!partner.takes("500118A12345678"));
        let no_partners = Cards::of(&crate::scenario::region::Rules::default(), &[]);
        assert_eq!(no_partners, Cards::Home);
        let mut rules = transport(10, 1 << 20, 1_000).rules().clone();
        rules.cards = partner;
        let r = record(Scenario::Transit, true, 200, 0);
        assert!(!rules.takes(&r), "a home card is not the partner's");
        let partner_record = DecisionRecord {
            card_no: "510104A12345678".into(),
            ..r
        };
        assert!(rules.takes(&partner_record));
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

    #[test]
    fn a_reversal_takes_an_unsealed_event_out_and_follows_a_sealed_one() {
        let mut b = transport(3, 1 << 20, 60_000);
        let a = record(Scenario::Transit, true, 200, 1);
        let c = record(Scenario::Transit, true, 300, 2);
        b.offer(1, &a);
        b.offer(2, &c);
        // Not sealed yet: the charge goes, and no line is added.
        assert!(b.offer(3, &reversal(&a, 3)).is_empty());
        assert_eq!(b.pending(), 1);
        let d = record(Scenario::Transit, true, 400, 4);
        b.offer(4, &d);
        let sealed = b.offer(5, &record(Scenario::Transit, true, 500, 5));
        assert_eq!(sealed.len(), 1);
        let first = &sealed[0];
        assert_eq!((first.count, first.total_fen), (3, 1_200));
        assert_eq!(first.id, batch_id("transport", 2, 5));
        assert!(!String::from_utf8_lossy(&first.body).contains("\"a-1\""));

        // Sealed already: a reversal line with the amount given back.
        b.offer(6, &reversal(&d, 6));
        let later = b.seal().unwrap();
        assert_eq!((later.count, later.total_fen), (1, -400));
        let v: serde_json::Value = serde_json::from_slice(&later.body).unwrap();
        let line = &v["events"][0];
        assert_eq!(line["type"], "reversal");
        assert_eq!(line["reverses"], "a-4");
        assert_eq!(line["amount_fen"], -400);
        assert_eq!(v["total_fen"], -400);
        assert_eq!(later.summary[0].reversals, 1);
        assert_eq!(later.summary[0].reversed_fen, 400);

        // Reversals of declines, of other sinks' events and of events never
        // seen (no scenario) are not this sink's business.
        let declined = record(Scenario::Transit, false, 200, 7);
        let medical = record(Scenario::Medical, true, 900, 8);
        let mut unseen = reversal(&a, 9);
        unseen.scenario = None;
        unseen.card_no = StoredCardNo::default();
        unseen.reverses = None;
        let mut nothing = reversal(&declined, 10);
        nothing.charged_fen = 0;
        for (seq, r) in [(7, &nothing), (8, &reversal(&medical, 8)), (9, &unseen)] {
            assert!(b.offer(seq, r).is_empty());
        }
        assert_eq!(b.pending(), 0);
    }

    /// A disbursement's credit of `fen` to the card, journaled at `at_ms`.
    fn credit(fen: i64, at_ms: i64) -> DecisionRecord {
        DecisionRecord {
            terminal: "@disburse".into(),
            event_id: format!("B1:r{at_ms}"),
            auth_id: format!("c-{at_ms}"),
            decision: "credit".into(),
            site: None,
            credit: Some(crate::record::CreditRef {
                batch_id: "B1".into(),
                record_id: format!("r{at_ms}"),
                programme: "project_wages".into(),
                project: Some("bridge-7".into()),
                month: Some("2026-11".into()),
            }),
            ..record(Scenario::Payment, true, fen, at_ms)
        }
    }

    #[test]
    fn credits_go_out_as_negative_lines_with_their_programme() {
        let mut b = Batcher::new(Rules {
            sink: "payment".into(),
            scenarios: vec![Scenario::Payment],
            cards: Cards::Home,
            events_max: 100,
            bytes_max: 1 << 20,
            age_max_ms: 60_000,
            day_offset_minutes: 480,
        });
        let charge = record(Scenario::Payment, true, 1_000, 1);
        b.offer(1, &charge);
        b.offer(2, &credit(800_000, 2));
        let mut subsidy = credit(5_000, 3);
        subsidy.credit = Some(crate::record::CreditRef {
            programme: "student_grant".into(),
            project: None,
            month: None,
            ..subsidy.credit.clone().unwrap()
        });
        b.offer(3, &subsidy);
        // A reversal never takes a credit out of the open batch.
        let mut odd = reversal(&charge, 4);
        odd.reverses = Some("c-2".into());
        b.offer(4, &odd);
        let batch = b.seal().unwrap();
        assert_eq!(batch.count, 4);
        assert_eq!(batch.total_fen, 1_000 - 800_000 - 5_000 - 1_000);
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        let line = &v["events"][1];
        assert_eq!(line["type"], "credit");
        assert_eq!(line["amount_fen"], -800_000);
        assert_eq!(line["terminal"], "@disburse");
        assert_eq!(
            (&line["programme"], &line["project"], &line["month"]),
            (
                &serde_json::json!("project_wages"),
                &serde_json::json!("bridge-7"),
                &serde_json::json!("2026-11")
            )
        );
        assert_eq!(v["events"][2]["programme"], "student_grant");
        assert!(v["events"][2].get("project").is_none());
        assert!(v["events"][0].get("programme").is_none());
        let s = &batch.summary;
        let credits: (u64, i64) = (
            s.iter().map(|d| d.credits).sum(),
            s.iter().map(|d| d.credited_fen).sum(),
        );
        assert_eq!(credits, (2, 805_000));
        let mut total = DaySite::default();
        for d in s {
            total.add(d);
        }
        assert_eq!(total.net_fen(), batch.total_fen);
        // A report stored before credits existed still decodes.
        let old: DaySite = serde_json::from_str(
            r#"{"day":1,"site":"","charges":1,"charged_fen":5,"reversals":0,"reversed_fen":0}"#,
        )
        .unwrap();
        assert_eq!((old.credits, old.net_fen()), (0, 5));
    }

    /// A reversal that took its charge out of the open batch, followed by
    /// an event that seals the rest by size: the batch ends before the
    /// reversal, and a restart must not offer the reversal again (issue 15,
    /// as found: a refund booked of a charge the receiver never got).
    #[test]
    fn a_restart_resumes_before_a_reversal_that_emptied_a_charge_out() {
        let mut b = transport(100, 1_024, 60_000);
        let charges: Vec<DecisionRecord> = (1..=3)
            .map(|i| record(Scenario::Transit, true, 1_000, i))
            .collect();
        for (i, c) in charges.iter().enumerate() {
            assert!(b.offer(i as u64 + 1, c).is_empty());
        }
        assert!(b.offer(4, &reversal(&charges[0], 4)).is_empty());
        assert_eq!(b.pending(), 2);
        // A larger event that does not fit beside the two left.
        let mut big = record(Scenario::Transit, true, 700, 5);
        big.event_id = "e".repeat(400);
        let sealed = b.offer(5, &big);
        assert_eq!(sealed.len(), 1);
        assert_eq!((sealed[0].first_seq, sealed[0].last_seq), (2, 3));
        // Resuming at 4 (after the batch's last event) would offer the
        // reversal alone; the open batch began at 5.
        assert_eq!(b.resume_seq(6), 5);
        let mut again = transport(100, 1_024, 60_000);
        assert!(again.offer(5, &big).is_empty());
        assert_eq!(again.seal(), b.seal());
        assert_eq!(b.resume_seq(6), 6, "nothing open");
    }

    /// One step of the property below.
    #[derive(Debug, Clone)]
    enum Step {
        /// An approved charge, its event id this long (line sizes vary).
        Charge { fen: i64, id_len: usize },
        /// The reversal of the n-th charge so far (modulo), if not yet reversed.
        Reverse(usize),
        /// A decline: journaled, not settled.
        Decline,
        /// Time passes; the follower reads what is new and ticks.
        Follow { ms: i64 },
        /// The process dies and starts again on its durable state; with
        /// `power`, writes not synced are lost too.
        Crash { power: bool },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1i64..20, 1usize..120).prop_map(|(f, id_len)| Step::Charge { fen: f * 100, id_len }),
            2 => (0usize..64).prop_map(Step::Reverse),
            1 => Just(Step::Decline),
            3 => (0i64..400).prop_map(|ms| Step::Follow { ms }),
            1 => any::<bool>().prop_map(|power| Step::Crash { power }),
        ]
    }

    /// What a sink's follower keeps durable: the batches stored so far
    /// and its cursor (synced with each batch, or written unsynced when
    /// nothing is open), as `deliver::fill` keeps them.
    struct Follower {
        batcher: Batcher,
        next_seq: u64,
        synced_cursor: u64,
        cursor: u64,
    }

    impl Follower {
        fn follow(&mut self, journal: &[DecisionRecord], now_ms: i64, stored: &mut Vec<Batch>) {
            let mut sealed = Vec::new();
            while (self.next_seq as usize) <= journal.len() {
                let seq = self.next_seq;
                sealed.extend(self.batcher.offer(seq, &journal[seq as usize - 1]));
                self.next_seq += 1;
            }
            sealed.extend(self.batcher.tick(now_ms));
            let resume = self.batcher.resume_seq(self.next_seq);
            if !sealed.is_empty() {
                stored.extend(sealed);
                self.synced_cursor = resume;
                self.cursor = resume;
            } else if resume > self.cursor {
                self.cursor = resume;
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Whatever the records, the sizes, the times and the crashes (a
        /// process kill keeps unsynced writes, a power cut loses them), the
        /// receiver gets each charge at most once, a reversal line only
        /// after the charge it gives back, and in all exactly the charges
        /// not reversed, net.
        #[test]
        fn crashes_anywhere_book_each_charge_once_and_no_unmatched_reversal(
            steps in proptest::collection::vec(step(), 1..80),
            events_max in 2usize..8,
            bytes_max in 600usize..2_000,
            age_max_ms in 50i64..1_000,
        ) {
            let rules = || transport(events_max, bytes_max, age_max_ms);
            let mut journal: Vec<DecisionRecord> = Vec::new();
            let mut charges: Vec<(String, i64, bool)> = Vec::new();
            let mut stored: Vec<Batch> = Vec::new();
            let mut now = 1_000_000i64;
            let mut f = Follower { batcher: rules(), next_seq: 1, synced_cursor: 1, cursor: 1 };
            for s in &steps {
                now += 1;
                match s {
                    Step::Charge { fen, id_len } => {
                        let mut r = record(Scenario::Transit, true, *fen, now);
                        r.event_id = format!("{}{}", "e".repeat(*id_len), now);
                        charges.push((r.auth_id.clone(), *fen, false));
                        journal.push(r);
                    }
                    Step::Reverse(n) if !charges.is_empty() => {
                        let i = n % charges.len();
                        if !charges[i].2 {
                            charges[i].2 = true;
                            let of = journal.iter().find(|r| r.auth_id == charges[i].0).unwrap().clone();
                            journal.push(reversal(&of, now));
                        }
                    }
                    Step::Reverse(_) => {}
                    Step::Decline => journal.push(record(Scenario::Transit, false, 300, now)),
                    Step::Follow { ms } => {
                        now += ms;
                        f.follow(&journal, now, &mut stored);
                    }
                    Step::Crash { power } => {
                        let from = if *power { f.synced_cursor } else { f.cursor };
                        f = Follower { batcher: rules(), next_seq: from, synced_cursor: from, cursor: from };
                    }
                }
            }
            f.follow(&journal, now, &mut stored);
            stored.extend(f.batcher.seal());

            // The receiver books each batch id once, in the order stored.
            let mut ids = std::collections::HashSet::new();
            let mut booked: std::collections::BTreeMap<String, i64> = Default::default();
            let mut net = 0i64;
            for b in &stored {
                proptest::prop_assert!(ids.insert(b.id.clone()), "batch {} stored twice", b.id);
                let doc: serde_json::Value = serde_json::from_slice(&b.body).unwrap();
                for line in doc["events"].as_array().unwrap() {
                    let fen = line["amount_fen"].as_i64().unwrap();
                    net += fen;
                    match line["type"].as_str().unwrap() {
                        "charge" => {
                            let auth = line["auth_id"].as_str().unwrap().to_owned();
                            proptest::prop_assert!(booked.insert(auth.clone(), fen).is_none(), "{} charged twice", auth);
                        }
                        _ => {
                            let of = line["reverses"].as_str().unwrap();
                            proptest::prop_assert_eq!(booked.remove(of), Some(-fen), "a reversal of {} booked before (or without) its charge", of);
                        }
                    }
                }
            }
            let want: std::collections::BTreeMap<String, i64> = charges
                .iter()
                .filter(|c| !c.2)
                .map(|c| (c.0.clone(), c.1))
                .collect();
            proptest::prop_assert_eq!(net, want.values().sum::<i64>());
            proptest::prop_assert_eq!(booked, want);
        }
    }

    #[test]
    fn the_summary_adds_up_by_local_day_and_site() {
        let mut b = transport(100, 1 << 20, 60_000);
        // 2026-11-28T15:59:59Z and 16:00:00Z: the local (UTC+8) day turns.
        let late = 1_795_881_599_000;
        let mut r1 = record(Scenario::Transit, true, 200, late);
        let mut r2 = record(Scenario::Transit, true, 300, late + 1_000);
        let mut r3 = record(Scenario::Transit, true, 100, late + 2_000);
        r1.auth_id = "x1".into();
        r2.auth_id = "x2".into();
        r3.auth_id = "x3".into();
        r3.site = None;
        for (seq, r) in [(1, &r1), (2, &r2), (3, &r3)] {
            b.offer(seq, r);
        }
        let batch = b.seal().unwrap();
        let day = b.rules().day(late);
        let sum = |d: i32, site: &str| {
            batch
                .summary
                .iter()
                .find(|x| x.day == d && x.site == site)
                .map(|x| (x.charges, x.charged_fen))
        };
        assert_eq!(sum(day, "line-12"), Some((1, 200)));
        assert_eq!(sum(day + 1, "line-12"), Some((1, 300)));
        assert_eq!(sum(day + 1, ""), Some((1, 100)));
        assert_eq!(batch.summary.len(), 3);
    }
}
