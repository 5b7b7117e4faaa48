//! The rollout report (应用推广落实情况): how each responsible unit's
//! scenarios were used on one local day. What a journal record adds to
//! it ([`usage`]), a day's figures per unit and scenario ([`Tally`]), a
//! report's rows ([`rows`]) and its CSV ([`csv`]). Pure: the gateway
//! follows the journal, keeps the tallies and asks for the rows.
//!
//! What counts: a card presented at a terminal, that is a tap or scan
//! decided `approve` or `decline`, or a medical hold (`hold`, the card
//! accepted at the counter). Not counted: a hold's capture or void (a
//! step at the counter, not a card presented), reversals, credits,
//! expiries. A day is the local day the card was presented on: when the
//! gateway decided, or for a tap decided offline, when the validator did,
//! so an upload the next morning counts on the day of the taps.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::catalogue::Catalogue;
use crate::model::{EventKind, Reason, Scenario};
use crate::record::DecisionRecord;

/// What one journal record says about a scenario's use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage<'a> {
    /// The local day, as days since the epoch.
    pub day: i32,
    /// The responsible unit, from the catalogue as it is when counted.
    pub unit: &'a str,
    pub scenario: Scenario,
    pub terminal: &'a str,
    pub kind: EventKind,
    pub approved: bool,
    pub reason: Reason,
    pub offline: bool,
}

/// The use `r` records, if it records a card presented (see the module).
pub fn usage<'a>(
    r: &'a DecisionRecord,
    catalogue: &'a Catalogue,
    day_offset_minutes: i32,
) -> Option<Usage<'a>> {
    let approved = match r.decision.as_str() {
        "approve" | "hold" => true,
        "decline" => false,
        _ => return None,
    };
    if r.hold_event_id.is_some() {
        return None;
    }
    let scenario = r.scenario?;
    let at_ms = r
        .offline
        .then(|| {
            r.occurred_at
                .as_deref()
                .and_then(crate::time::parse_rfc3339_ms)
        })
        .flatten()
        .unwrap_or(r.at_ms);
    Some(Usage {
        day: crate::time::local_day(at_ms.div_euclid(1000), day_offset_minutes),
        unit: catalogue.unit_for(Some(scenario), r.site.as_deref()),
        scenario,
        terminal: &r.terminal,
        kind: r.kind,
        approved,
        reason: r.reason,
        offline: r.offline,
    })
}

/// A day's figures for one unit and scenario (or a unit's total).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub taps: u64,
    pub scans: u64,
    pub approvals: u64,
    pub declines: u64,
    /// By reason code.
    pub declines_by_reason: BTreeMap<String, u64>,
    /// Decided by a validator offline (uploaded later).
    pub offline: u64,
}

impl Tally {
    pub fn add(&mut self, u: &Usage<'_>) {
        match u.kind {
            EventKind::Tap => self.taps += 1,
            EventKind::Scan => self.scans += 1,
        }
        if u.approved {
            self.approvals += 1;
        } else {
            self.declines += 1;
            *self
                .declines_by_reason
                .entry(u.reason.code().to_owned())
                .or_default() += 1;
        }
        if u.offline {
            self.offline += 1;
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.taps += o.taps;
        self.scans += o.scans;
        self.approvals += o.approvals;
        self.declines += o.declines;
        for (reason, n) in &o.declines_by_reason {
            *self.declines_by_reason.entry(reason.clone()).or_default() += n;
        }
        self.offline += o.offline;
    }

    /// Cards presented: taps and scans.
    pub fn presented(&self) -> u64 {
        self.taps + self.scans
    }

    /// The share of cards presented that a validator decided offline, to
    /// four places; 0 on a day without any.
    pub fn offline_share(&self) -> f64 {
        match self.presented() {
            0 => 0.0,
            n => (self.offline as f64 / n as f64 * 10_000.0).round() / 10_000.0,
        }
    }
}

/// The first and last local day a unit's scenario was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub first_day: i32,
    pub last_day: i32,
}

impl Span {
    pub fn of(day: i32) -> Span {
        Span {
            first_day: day,
            last_day: day,
        }
    }

    pub fn widen(&mut self, o: Span) {
        self.first_day = self.first_day.min(o.first_day);
        self.last_day = self.last_day.max(o.last_day);
    }
}

/// A unit and scenario, as the report's rows are keyed.
pub type Pair = (String, Scenario);

/// One row of the report: a unit's scenario on the day.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub unit: String,
    pub scenario: Scenario,
    /// Terminals that presented at least one card that day.
    pub terminals: u64,
    pub tally: Tally,
    /// `None`: never used (a scenario the catalogue names, not yet rolled
    /// out).
    pub span: Option<Span>,
}

/// The day's rows: every unit and scenario used that day, ever used, or
/// named in the catalogue's scenarios (so a scenario not yet rolled out
/// shows as such), by unit, then scenario.
pub fn rows(
    catalogue: &Catalogue,
    tallies: &BTreeMap<Pair, Tally>,
    terminals: &BTreeMap<Pair, u64>,
    spans: &BTreeMap<Pair, Span>,
) -> Vec<Row> {
    let mut pairs: BTreeSet<Pair> = tallies.keys().chain(spans.keys()).cloned().collect();
    for (s, unit) in &catalogue.scenarios {
        if let Some(s) = Scenario::parse(s) {
            pairs.insert((unit.clone(), s));
        }
    }
    pairs
        .into_iter()
        .map(|pair| Row {
            terminals: terminals.get(&pair).copied().unwrap_or(0),
            tally: tallies.get(&pair).cloned().unwrap_or_default(),
            span: spans.get(&pair).copied(),
            unit: pair.0,
            scenario: pair.1,
        })
        .collect()
}

/// The CSV's columns.
pub const CSV_HEADER: &str = "day,unit,scenario,terminals,taps,scans,approvals,declines,offline,offline_share,first_day,last_day,declines_by_reason";

/// The report as CSV, the form a unit pastes into its own report: a
/// UTF-8 byte order mark (spreadsheets in a Chinese locale read UTF-8
/// without it as GBK), the header, one line per row (CRLF, RFC 4180);
/// declines by reason in one cell, `CODE=n` joined by `; `.
pub fn csv(day: &str, rows: &[Row]) -> String {
    let mut out = String::from("\u{feff}");
    out.push_str(CSV_HEADER);
    out.push_str("\r\n");
    for r in rows {
        let span = |f: fn(&Span) -> i32| {
            r.span
                .as_ref()
                .map(|s| crate::time::day_name(f(s)))
                .unwrap_or_default()
        };
        let reasons = r
            .tally
            .declines_by_reason
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join("; ");
        let t = &r.tally;
        let cells = [
            day.to_owned(),
            r.unit.clone(),
            r.scenario.as_str().to_owned(),
            r.terminals.to_string(),
            t.taps.to_string(),
            t.scans.to_string(),
            t.approvals.to_string(),
            t.declines.to_string(),
            t.offline.to_string(),
            format!("{:.4}", t.offline_share()),
            span(|s| s.first_day),
            span(|s| s.last_day),
            reasons,
        ];
        let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// A cell quoted when it holds a comma, quote or line break (quotes
/// doubled), and when it starts with what a spreadsheet would take for a
/// formula.
fn csv_cell(c: &str) -> String {
    let formula = c.starts_with(['=', '+', '-', '@']);
    if formula || c.contains([',', '"', '\r', '\n']) {
        let inner = c.replace('"', "\"\"");
        if formula {
            format!("\"'{inner}\"")
        } else {
            format!("\"{inner}\"")
        }
    } else {
        c.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::SiteUnit;

    // 2026-11-28T07:45:12Z: 15:45 in Beijing.
    const AT: i64 = 1_795_851_912_000;
    const DAY: i32 = 20_785;

    fn record(decision: &str) -> DecisionRecord {
        DecisionRecord {
            at_ms: AT,
            terminal: "bus-7".into(),
            event_id: "e1".into(),
            auth_id: "a1".into(),
            card_no: "500118A00000001".into(),
            scenario: Some(Scenario::Transit),
            decision: decision.into(),
            site: Some("line-12".into()),
            ..DecisionRecord::default()
        }
    }

    fn catalogue() -> Catalogue {
        let mut c = Catalogue::default();
        c.sites = vec![SiteUnit {
            prefix: "hosp-3-".into(),
            unit: "某医院".into(),
        }];
        c
    }

    #[test]
    fn what_a_record_counts_for() {
        assert_eq!(crate::time::day_name(DAY), "2026-11-28");
        let c = catalogue();
        let scan_decline = DecisionRecord {
            kind: EventKind::Scan,
            reason: Reason::Denylisted,
            ..record("decline")
        };
        let hold = DecisionRecord {
            scenario: Some(Scenario::Medical),
            site: Some("hosp-3-counter-2".into()),
            ..record("hold")
        };
        let capture = DecisionRecord {
            hold_event_id: Some("h1".into()),
            ..hold.clone()
        };
        // Taken offline at 23:50 Beijing on the 27th, uploaded the next day.
        let offline = DecisionRecord {
            offline: true,
            occurred_at: Some("2026-11-27T15:50:00Z".into()),
            ..record("approve")
        };
        let offline_no_time = DecisionRecord {
            offline: true,
            occurred_at: None,
            ..record("approve")
        };
        let no_scenario = DecisionRecord {
            scenario: None,
            ..record("decline")
        };
        // (day, unit, kind, approved, offline), or not counted.
        type Want = Option<(i32, &'static str, EventKind, bool, bool)>;
        let table: Vec<(&str, DecisionRecord, Want)> = vec![
            (
                "an approved tap",
                record("approve"),
                Some((DAY, "区交通局", EventKind::Tap, true, false)),
            ),
            (
                "a declined scan",
                scan_decline,
                Some((DAY, "区交通局", EventKind::Scan, false, false)),
            ),
            (
                "a hold, at the site's unit",
                hold,
                Some((DAY, "某医院", EventKind::Tap, true, false)),
            ),
            ("its capture", capture, None),
            (
                "an offline tap, on its own day",
                offline,
                Some((DAY - 1, "区交通局", EventKind::Tap, true, true)),
            ),
            (
                "an offline tap without a readable time, on the upload's",
                offline_no_time,
                Some((DAY, "区交通局", EventKind::Tap, true, true)),
            ),
            ("a reversal", record("reverse"), None),
            ("a credit", record("credit"), None),
            ("a void", record("void"), None),
            ("an expiry", record("expire"), None),
            ("a decline of no scenario", no_scenario, None),
        ];
        for (what, r, want) in table {
            let got = usage(&r, &c, 480).map(|u| (u.day, u.unit, u.kind, u.approved, u.offline));
            assert_eq!(got, want, "{what}");
        }
        // The day follows the offset: 07:45 UTC is the 27th eight hours west.
        assert_eq!(usage(&record("approve"), &c, -480).unwrap().day, DAY - 1);
    }

    #[test]
    fn tallies_add_and_merge() {
        let c = catalogue();
        let approve = record("approve");
        let decline = DecisionRecord {
            reason: Reason::Denylisted,
            kind: EventKind::Scan,
            ..record("decline")
        };
        let offline = DecisionRecord {
            offline: true,
            ..record("approve")
        };
        let mut t = Tally::default();
        for r in [&approve, &decline, &decline, &offline] {
            t.add(&usage(r, &c, 480).unwrap());
        }
        assert_eq!(
            (t.taps, t.scans, t.approvals, t.declines, t.offline),
            (2, 2, 2, 2, 1)
        );
        assert_eq!(t.declines_by_reason.get("DENYLISTED"), Some(&2));
        assert_eq!(t.offline_share(), 0.25);
        let mut both = t.clone();
        both.merge(&t);
        assert_eq!(both.presented(), 8);
        assert_eq!(both.declines_by_reason.get("DENYLISTED"), Some(&4));
        assert_eq!(both.offline_share(), 0.25);
        assert_eq!(Tally::default().offline_share(), 0.0);
        let third = Tally {
            taps: 3,
            offline: 1,
            ..Tally::default()
        };
        assert_eq!(third.offline_share(), 0.3333);
    }

    #[test]
    fn rows_name_every_scenario_of_the_catalogue_and_every_pair_used() {
        let c = catalogue();
        let mut tallies = BTreeMap::new();
        tallies.insert(
            ("某医院".to_owned(), Scenario::Medical),
            Tally {
                taps: 1,
                approvals: 1,
                ..Tally::default()
            },
        );
        let mut spans = BTreeMap::new();
        spans.insert(("某医院".to_owned(), Scenario::Medical), Span::of(DAY));
        spans.insert(
            ("区交通局".to_owned(), Scenario::Transit),
            Span::of(DAY - 3),
        );
        let mut terminals = BTreeMap::new();
        terminals.insert(("某医院".to_owned(), Scenario::Medical), 1);
        let rows = rows(&c, &tallies, &terminals, &spans);
        // The seven scenarios of the catalogue and the hospital's own.
        assert_eq!(rows.len(), 8);
        let hosp = rows.iter().find(|r| r.unit == "某医院").unwrap();
        assert_eq!((hosp.terminals, hosp.tally.approvals), (1, 1));
        let transit = rows
            .iter()
            .find(|r| r.scenario == Scenario::Transit)
            .unwrap();
        assert_eq!(transit.tally, Tally::default(), "used before, not today");
        assert_eq!(transit.span, Some(Span::of(DAY - 3)));
        let culture = rows
            .iter()
            .find(|r| r.scenario == Scenario::Culture)
            .unwrap();
        assert_eq!(culture.span, None, "never used");
        let mut sorted = rows.clone();
        sorted.sort_by(|a, b| (&a.unit, a.scenario).cmp(&(&b.unit, b.scenario)));
        assert_eq!(sorted, rows);
    }

    #[test]
    fn csv_quotes_what_needs_it_and_reads_back() {
        let mut declines = BTreeMap::new();
        declines.insert("DENYLISTED".to_owned(), 2);
        declines.insert("INSUFFICIENT_FUNDS".to_owned(), 1);
        let rows = vec![
            Row {
                unit: "区交通局".into(),
                scenario: Scenario::Transit,
                terminals: 2,
                tally: Tally {
                    taps: 9,
                    scans: 1,
                    approvals: 7,
                    declines: 3,
                    declines_by_reason: declines,
                    offline: 1,
                },
                span: Some(Span {
                    first_day: DAY - 1,
                    last_day: DAY,
                }),
            },
            Row {
                unit: "a \"quoted\", unit".into(),
                scenario: Scenario::Culture,
                terminals: 0,
                tally: Tally::default(),
                span: None,
            },
            Row {
                unit: "=cmd".into(),
                scenario: Scenario::Access,
                terminals: 0,
                tally: Tally::default(),
                span: None,
            },
        ];
        let text = csv("2026-11-28", &rows);
        let text = text.strip_prefix('\u{feff}').expect("a byte order mark");
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(
            lines[1],
            "2026-11-28,区交通局,transit,2,9,1,7,3,1,0.1000,2026-11-27,2026-11-28,DENYLISTED=2; INSUFFICIENT_FUNDS=1"
        );
        assert_eq!(
            lines[2],
            "2026-11-28,\"a \"\"quoted\"\", unit\",culture,0,0,0,0,0,0,0.0000,,,"
        );
        assert_eq!(
            lines[3],
            "2026-11-28,\"'=cmd\",access,0,0,0,0,0,0,0.0000,,,"
        );
        assert_eq!(lines[4], "");
        assert_eq!(lines.len(), 5);
    }
}
