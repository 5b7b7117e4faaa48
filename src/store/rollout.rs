//! The rollout report's tallies, kept as the journal is followed
//! (`service::rollout`). This node's own: written here directly, not
//! through the durability seam, because every node (and a restart) can
//! compute them again from the journal it holds.
//!
//! `rollout`:
//! - `c` → the next journal sequence to count (u64 BE);
//! - `d/<day>/<unit> 0x00 <scenario>` → the day's [`Tally`] (JSON);
//! - `t/<day>/<unit> 0x00 <scenario> 0x00 <terminal>` → empty: a terminal
//!   seen that day;
//! - `u/<unit> 0x00 <scenario>` → the [`Span`] of days it was used (JSON).
//!
//! Days are 4 bytes, offset so that they sort in day order. The tallies
//! and the cursor past the records they count are one write: after a
//! crash both are as they were, or both moved (RocksDB recovers a prefix
//! of its writes), so no record is counted twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use onecard_core::model::Scenario;
use onecard_core::rollout::{Pair, Span, Tally, Usage};

use crate::store::{decode_u64, Cf, Store, StoreError};

const CURSOR: &[u8] = b"c";

fn day_bytes(day: i32) -> [u8; 4] {
    ((day as u32) ^ 0x8000_0000).to_be_bytes()
}

fn day_prefix(tag: &[u8], day: i32) -> Vec<u8> {
    [tag, &day_bytes(day), b"/"].concat()
}

fn pair_bytes(unit: &str, scenario: Scenario) -> Vec<u8> {
    [unit.as_bytes(), b"\0", scenario.as_str().as_bytes()].concat()
}

/// `<unit> 0x00 <scenario>[ 0x00 ...]` back to its pair and the rest.
fn split_pair(b: &[u8]) -> Option<(Pair, &[u8])> {
    let mut parts = b.splitn(3, |&c| c == 0);
    let unit = std::str::from_utf8(parts.next()?).ok()?;
    let scenario = Scenario::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    Some(((unit.to_owned(), scenario), parts.next().unwrap_or(&[])))
}

fn corrupt(detail: &str) -> StoreError {
    StoreError::Corrupt {
        cf: "rollout",
        detail: detail.to_owned(),
    }
}

/// The next journal sequence to count (1 before anything was counted).
pub fn cursor(store: &Store) -> Result<u64, StoreError> {
    Ok(store.get_u64(Cf::Rollout, CURSOR)?.unwrap_or(1))
}

/// What a run of journal records adds, gathered before it is written.
#[derive(Debug, Default)]
pub struct Counted {
    tallies: HashMap<(i32, Pair), Tally>,
    terminals: BTreeSet<(i32, Pair, String)>,
    spans: HashMap<Pair, Span>,
}

impl Counted {
    pub fn add(&mut self, u: &Usage<'_>) {
        let pair = (u.unit.to_owned(), u.scenario);
        self.tallies
            .entry((u.day, pair.clone()))
            .or_default()
            .add(u);
        self.terminals
            .insert((u.day, pair.clone(), u.terminal.to_owned()));
        self.spans
            .entry(pair)
            .and_modify(|s| s.widen(Span::of(u.day)))
            .or_insert(Span::of(u.day));
    }
}

/// Adds `counted` to what is kept and moves the cursor to `next`, in one
/// write (not synced: see the module).
pub fn add(store: &Store, counted: Counted, next: u64) -> Result<(), StoreError> {
    let cf = store.cf(Cf::Rollout);
    let mut wb = rocksdb::WriteBatch::default();
    for ((day, (unit, scenario)), t) in counted.tallies {
        let key = [&day_prefix(b"d/", day)[..], &pair_bytes(&unit, scenario)].concat();
        let mut total: Tally = store.get_json(Cf::Rollout, &key)?.unwrap_or_default();
        total.merge(&t);
        wb.put_cf(
            cf,
            key,
            serde_json::to_vec(&total).expect("a tally serializes"),
        );
    }
    for (day, (unit, scenario), terminal) in counted.terminals {
        let key = [
            &day_prefix(b"t/", day)[..],
            &pair_bytes(&unit, scenario),
            b"\0",
            terminal.as_bytes(),
        ]
        .concat();
        wb.put_cf(cf, key, b"");
    }
    for ((unit, scenario), s) in counted.spans {
        let key = [b"u/", &pair_bytes(&unit, scenario)[..]].concat();
        let mut span: Span = store.get_json(Cf::Rollout, &key)?.unwrap_or(s);
        span.widen(s);
        wb.put_cf(
            cf,
            key,
            serde_json::to_vec(&span).expect("a span serializes"),
        );
    }
    wb.put_cf(cf, CURSOR, next.to_be_bytes());
    store.db().write(wb)?;
    Ok(())
}

/// What is kept of one day: tallies and terminals seen per unit and
/// scenario, terminals seen per unit (a terminal may serve more than one
/// scenario), and every pair's span of days.
#[derive(Debug, Default)]
pub struct Day {
    pub tallies: BTreeMap<Pair, Tally>,
    pub terminals: BTreeMap<Pair, u64>,
    pub unit_terminals: BTreeMap<String, u64>,
    pub spans: BTreeMap<Pair, Span>,
}

/// Terminals counted per day at most (a day's set is read whole): far
/// beyond a city's terminals.
pub const TERMINALS_READ_MAX: usize = 1_000_000;

/// What is kept of local day `day`.
pub fn day(store: &Store, day: i32) -> Result<Day, StoreError> {
    let mut out = Day::default();
    let mut bad = false;
    let prefix = day_prefix(b"d/", day);
    store.scan(Cf::Rollout, &prefix, |k, v| {
        if !k.starts_with(&prefix) {
            return false;
        }
        match (split_pair(&k[prefix.len()..]), serde_json::from_slice(v)) {
            (Some((pair, _)), Ok(t)) => {
                out.tallies.insert(pair, t);
            }
            _ => bad = true,
        }
        !bad
    })?;
    let prefix = day_prefix(b"t/", day);
    let mut unit_terminals: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut read = 0usize;
    store.scan(Cf::Rollout, &prefix, |k, _| {
        if !k.starts_with(&prefix) || read >= TERMINALS_READ_MAX {
            return false;
        }
        read += 1;
        match split_pair(&k[prefix.len()..]) {
            Some((pair, terminal)) => {
                unit_terminals
                    .entry(pair.0.clone())
                    .or_default()
                    .insert(terminal.to_vec());
                *out.terminals.entry(pair).or_default() += 1;
            }
            None => bad = true,
        }
        !bad
    })?;
    out.unit_terminals = unit_terminals
        .into_iter()
        .map(|(u, set)| (u, set.len() as u64))
        .collect();
    store.scan(Cf::Rollout, b"u/", |k, v| {
        if !k.starts_with(b"u/") {
            return false;
        }
        match (split_pair(&k[2..]), serde_json::from_slice(v)) {
            (Some((pair, _)), Ok(s)) => {
                out.spans.insert(pair, s);
            }
            _ => bad = true,
        }
        !bad
    })?;
    if bad {
        return Err(corrupt("a rollout record does not decode"));
    }
    Ok(out)
}

/// The cursor as stored, for the report: the last journal sequence
/// counted.
pub fn counted_through(store: &Store) -> Result<u64, StoreError> {
    Ok(cursor(store)?.saturating_sub(1))
}

/// The journal's last sequence on this node (0 when empty).
pub fn journal_last(store: &Store) -> Result<u64, StoreError> {
    Ok(store
        .last_key(Cf::Journal)?
        .and_then(|k| decode_u64(&k))
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_day_and_read_back() {
        for (a, b) in [(-1, 0), (0, 1), (20_785, 20_786), (i32::MIN, i32::MAX)] {
            assert!(day_bytes(a) < day_bytes(b), "{a} {b}");
        }
        let b = [&pair_bytes("区交通局", Scenario::Transit)[..], b"\0bus-7"].concat();
        let ((unit, s), rest) = split_pair(&b).unwrap();
        assert_eq!(
            (unit.as_str(), s, rest),
            ("区交通局", Scenario::Transit, &b"bus-7"[..])
        );
        let bare = pair_bytes("x", Scenario::Medical);
        assert!(split_pair(&bare).unwrap().1.is_empty());
        assert!(split_pair(b"x\0bus").is_none());
    }
}
