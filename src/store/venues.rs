//! Culture venues' daily entry counts, for their quotas: one counter per
//! venue with a quota (a fixed set, from the config), each behind its own
//! lock, stored in `venues` with the entry that changed it.
//!
//! Lock order: a card's lock, then its venue's. Nothing takes them the
//! other way round.

use std::collections::HashMap;

use parking_lot::{Mutex, MutexGuard};

use onecard_core::scenario::culture;

use crate::store::{Cf, Store, StoreError};

/// A venue's approved entries on a local day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Count {
    pub day: i32,
    pub entries: u32,
}

impl Count {
    /// Entries on `day`: a count of an earlier day is zero.
    pub fn on(&self, day: i32) -> u32 {
        if self.day == day {
            self.entries
        } else {
            0
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&self.day.to_be_bytes());
        v.extend_from_slice(&self.entries.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Count> {
        Some(Count {
            day: i32::from_be_bytes(v.get(0..4)?.try_into().ok()?),
            entries: u32::from_be_bytes(v.get(4..8)?.try_into().ok()?),
        })
    }
}

pub struct Venues {
    counts: HashMap<Box<str>, Mutex<Count>, foldhash::fast::RandomState>,
}

impl Venues {
    /// The venues with a quota, their counts read back from the store.
    pub fn load(store: &Store, rules: &culture::Rules) -> Result<Venues, StoreError> {
        let mut counts = HashMap::with_hasher(foldhash::fast::RandomState::default());
        for v in rules.quota_venues() {
            let count = match store.get(Cf::Venues, v.site.as_bytes())? {
                None => Count::default(),
                Some(b) => Count::decode(&b).ok_or(StoreError::Corrupt {
                    cf: "venues",
                    detail: "a count does not decode".into(),
                })?,
            };
            counts.insert(v.site.clone().into_boxed_str(), Mutex::new(count));
        }
        Ok(Venues { counts })
    }

    /// The venue's counter, locked, if it has a quota.
    pub fn lock(&self, site: &str) -> Option<MutexGuard<'_, Count>> {
        self.counts.get(site).map(|m| m.lock())
    }

    /// Sets a venue's count from its stored form (cluster mode: a count
    /// another node wrote). A venue without a quota here is ignored.
    pub fn set_stored(&self, site: &[u8], stored: &[u8]) -> Result<(), StoreError> {
        let count = Count::decode(stored).ok_or(StoreError::Corrupt {
            cf: "venues",
            detail: "a count does not decode".into(),
        })?;
        if let Some(mut c) = std::str::from_utf8(site).ok().and_then(|s| self.lock(s)) {
            *c = count;
        }
        Ok(())
    }

    /// Every venue with a quota and its count, for the admin view.
    pub fn all(&self) -> Vec<(String, Count)> {
        let mut v: Vec<_> = self
            .counts
            .iter()
            .map(|(k, m)| (k.to_string(), *m.lock()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_and_reset_by_day() {
        let c = Count {
            day: 20_785,
            entries: 7,
        };
        assert_eq!(Count::decode(&c.encode()), Some(c));
        assert_eq!(c.on(20_785), 7);
        assert_eq!(c.on(20_786), 0);
        assert_eq!(Count::decode(&[1, 2, 3]), None);
    }
}
