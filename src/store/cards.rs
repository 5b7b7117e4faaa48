//! Cards in memory: a lock-free map for reads, striped locks for writers.

use std::hash::BuildHasher;

use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use onecard_core::model::{Card, CardNo, CardStatus, Concession, Function, Health, TransitState};

use crate::store::{Cf, Store, StoreError};

/// Writers to one card take one of this many locks, chosen by hash. Enough
/// that two busy cards rarely share one; few enough to cost nothing.
pub const CARD_LOCK_STRIPES: usize = 4_096;

/// A card as stored in RocksDB and shown by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardRecord {
    pub status: CardStatus,
    /// Inline: there are 7 functions and 5 concessions, so encoding a
    /// card on every tap allocates no list.
    pub functions: SmallVec<[Function; 7]>,
    pub concessions: SmallVec<[Concession; 5]>,
    pub spent_day: i32,
    pub spent_fen: i64,
    /// Transit state (last boarding, journey, fare caps); absent until
    /// the card's first ride.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transit: Option<TransitState>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub visits: u32,
    /// Health status; absent until one is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Medical: the annual deductible used, and the local year it counts
    /// for; absent until the card's first medical capture that used some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medical: Option<MedicalRecord>,
}

/// The medical deductible state of a card as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MedicalRecord {
    pub year: i32,
    pub deductible_used_fen: i64,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl From<&Card> for CardRecord {
    fn from(c: &Card) -> CardRecord {
        CardRecord {
            status: c.status,
            functions: c.function_iter().collect(),
            concessions: c.concession_iter().collect(),
            spent_day: c.spent_day,
            spent_fen: c.spent_fen,
            transit: (c.transit != TransitState::default()).then_some(c.transit),
            visits: c.visits,
            health: (c.health != Health::default()).then_some(c.health),
            medical: (c.medical_year != 0 || c.deductible_used_fen != 0).then_some(MedicalRecord {
                year: c.medical_year,
                deductible_used_fen: c.deductible_used_fen,
            }),
        }
    }
}

impl From<&CardRecord> for Card {
    fn from(r: &CardRecord) -> Card {
        Card {
            spent_day: r.spent_day,
            spent_fen: r.spent_fen,
            transit: r.transit.unwrap_or_default(),
            visits: r.visits,
            health: r.health.unwrap_or_default(),
            medical_year: r.medical.map_or(0, |m| m.year),
            deductible_used_fen: r.medical.map_or(0, |m| m.deductible_used_fen),
            ..Card::new(r.status, &r.functions, &r.concessions)
        }
    }
}

/// A card as (re-)registered: the new status, functions and concessions,
/// with the counters and state of the card it replaces (spending, transit
/// fares and last boarding, visits, health status, the medical deductible
/// used), so that registering a card again can never reset a cap, lift
/// anti-passback or restart the year's deductible.
pub fn keep_counters(old: Option<Card>, new: Card) -> Card {
    match old {
        Some(old) => Card {
            spent_day: old.spent_day,
            spent_fen: old.spent_fen,
            transit: old.transit,
            visits: old.visits,
            health: old.health,
            medical_year: old.medical_year,
            deductible_used_fen: old.deductible_used_fen,
            ..new
        },
        None => new,
    }
}

/// A card record as stored, decoded; `None` if it does not decode.
pub fn decode(bytes: &[u8]) -> Option<Card> {
    serde_json::from_slice::<CardRecord>(bytes)
        .ok()
        .map(|r| Card::from(&r))
}

/// A card record as stored (JSON), written into a buffer sized for a card
/// that rides: `to_vec` would start at 128 bytes and grow on every tap.
pub fn encode(card: &Card) -> Vec<u8> {
    let mut v = Vec::with_capacity(CARD_RECORD_BYTES_TYPICAL);
    serde_json::to_writer(&mut v, &CardRecord::from(card))
        .expect("a card record always serializes");
    v
}

/// A transit card's record with its journey and caps is some 250 bytes.
const CARD_RECORD_BYTES_TYPICAL: usize = 384;

/// Cards decoded per batch handed to the inserting thread at start, and
/// batches in flight between the two (bounded: the reader waits).
const LOAD_BATCH: usize = 8_192;
const LOAD_BATCHES_QUEUED: usize = 8;

/// Reads and decodes every card record, in batches, until done or the
/// receiver is gone.
fn read_cards(
    store: &Store,
    tx: crossbeam_channel::Sender<Vec<(CardNo, Card)>>,
) -> Result<(), StoreError> {
    let mut batch = Vec::with_capacity(LOAD_BATCH);
    let mut bad = false;
    store.scan(Cf::Cards, &[], |k, v| {
        let card_no = std::str::from_utf8(k)
            .ok()
            .and_then(|s| CardNo::parse(s).ok());
        let record = serde_json::from_slice::<CardRecord>(v).ok();
        let (Some(n), Some(r)) = (card_no, record) else {
            bad = true;
            return false;
        };
        batch.push((n, Card::from(&r)));
        if batch.len() == LOAD_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH));
            return tx.send(full).is_ok();
        }
        true
    })?;
    if bad {
        return Err(StoreError::Corrupt {
            cf: "cards",
            detail: "a card record does not decode".into(),
        });
    }
    if !batch.is_empty() {
        let _ = tx.send(batch);
    }
    Ok(())
}

pub struct CardTable {
    map: papaya::HashMap<CardNo, Card, foldhash::fast::RandomState>,
    stripes: Box<[Mutex<()>]>,
    hasher: foldhash::fast::RandomState,
}

impl CardTable {
    pub fn new() -> CardTable {
        CardTable::with_capacity(0)
    }

    /// A table with room for `n` cards before it must grow.
    pub fn with_capacity(n: usize) -> CardTable {
        CardTable {
            map: papaya::HashMap::with_capacity_and_hasher(
                n,
                foldhash::fast::RandomState::default(),
            ),
            stripes: (0..CARD_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Rebuilds the table from the `cards` column family.
    pub fn load(store: &Store) -> Result<CardTable, StoreError> {
        // Sized up front: growing a map of ten million cards one doubling
        // at a time was 40 % of a 27 s start (perf).
        let expected = store.estimated_keys(Cf::Cards);
        let table = CardTable::with_capacity(expected + expected / 8);
        // Two stages on two threads: one reads RocksDB and decodes records,
        // the other inserts into the map (each about half of the work).
        let (tx, rx) = crossbeam_channel::bounded::<Vec<(CardNo, Card)>>(LOAD_BATCHES_QUEUED);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || read_cards(store, tx));
            let map = table.map.pin();
            for batch in rx {
                for (card_no, card) in batch {
                    map.insert(card_no, card);
                }
            }
            reader.join().expect("the card reader does not panic")
        })?;
        metrics::gauge!("onecard_cards").set(table.len() as f64);
        Ok(table)
    }

    pub fn get(&self, card: &CardNo) -> Option<Card> {
        self.map.pin().get(card).copied()
    }

    /// Sets a card in memory. Call only while holding [`CardTable::lock`]
    /// for it, after its write has been queued to the journal.
    pub fn set(&self, card_no: CardNo, card: Card) {
        self.map.pin().insert(card_no, card);
    }

    /// The lock that serializes every change to this card.
    pub fn lock(&self, card: &CardNo) -> MutexGuard<'_, ()> {
        self.stripes[self.stripe(card)].lock()
    }

    /// Which of the striped locks guards this card.
    pub fn stripe(&self, card: &CardNo) -> usize {
        (self.hasher.hash_one(card.as_str()) as usize) % self.stripes.len()
    }

    /// Takes the given stripes' locks, in ascending order. Only bulk writers
    /// (one at a time) take more than one lock; taking them in order keeps
    /// two such writers from deadlocking should there ever be two.
    pub fn lock_stripes(
        &self,
        stripes: &std::collections::BTreeSet<usize>,
    ) -> Vec<MutexGuard<'_, ()>> {
        stripes.iter().map(|&i| self.stripes[i].lock()).collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for CardTable {
    fn default() -> Self {
        CardTable::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use onecard_core::model::HealthColour;

    #[test]
    fn the_lists_are_written_as_before() {
        let card = Card::new(
            CardStatus::Active,
            &Function::ALL,
            &[Concession::Student, Concession::Elderly],
        );
        // Every function and two concessions, in their declared order, as
        // the `Vec`s before the lists were inline wrote them.
        assert_eq!(
            String::from_utf8(encode(&card)).unwrap(),
            r#"{"status":"active","functions":["transit","medical","financial","culture","access","identity","health"],"concessions":["elderly","student"],"spent_day":0,"spent_fen":0}"#
        );
    }

    #[test]
    fn a_record_keeps_transit_visits_and_health_and_old_records_decode() {
        let mut card = Card::new(
            CardStatus::Active,
            &[Function::Transit],
            &[Concession::Student],
        );
        card.transit.place = 42;
        card.transit.tap_s = 1_795_851_912;
        card.transit.week_fen = 700;
        card.visits = 3;
        card.health = Health {
            colour: HealthColour::Yellow,
            vaccinated: true,
            updated_s: 1_795_851_000,
        };
        let back: CardRecord = serde_json::from_slice(&encode(&card)).unwrap();
        assert_eq!(Card::from(&back), card);
        // A record written before these fields existed.
        let old = br#"{"status":"active","functions":["transit"],"concessions":[],"spent_day":1,"spent_fen":200}"#;
        let c = Card::from(&serde_json::from_slice::<CardRecord>(old).unwrap());
        assert_eq!(c.transit, TransitState::default());
        assert_eq!(c.health, Health::default());
        // A fresh card writes none of them.
        let fresh = String::from_utf8(encode(&Card::new(CardStatus::Active, &[], &[]))).unwrap();
        assert!(
            !fresh.contains("transit") && !fresh.contains("health"),
            "{fresh}"
        );
    }
}
