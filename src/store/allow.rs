//! Allow-lists of controlled doors and gates: (site, card) → the entry's
//! time-of-day windows. In memory for the hot path (a lock-free map), in
//! `allow` for keeps; changed only through the admin API, one change at a
//! time, memory after the commit.

use serde::{Deserialize, Serialize};

use onecard_core::model::CardNo;
use onecard_core::scenario::access::Windows;

use crate::store::{Cf, Store, StoreError};

/// The stored form of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
    pub added_ms: i64,
}

/// The key of a card at a site: site 0x00 card_no (a site never holds
/// 0x00: validated as an event id).
pub fn key(site: &str, card: &CardNo) -> Vec<u8> {
    let mut k = Vec::with_capacity(site.len() + 1 + card.as_str().len());
    k.extend_from_slice(site.as_bytes());
    k.push(0);
    k.extend_from_slice(card.as_str().as_bytes());
    k
}

pub struct AllowList {
    map: papaya::HashMap<Vec<u8>, Windows, foldhash::fast::RandomState>,
}

impl AllowList {
    pub fn load(store: &Store) -> Result<AllowList, StoreError> {
        let list = AllowList {
            map: papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()),
        };
        let mut bad = false;
        {
            let map = list.map.pin();
            store.scan(
                Cf::Allow,
                &[],
                |k, v| match serde_json::from_slice::<Entry>(v)
                    .ok()
                    .and_then(|e| Windows::parse(&e.windows).ok())
                {
                    Some(w) => {
                        map.insert(k.to_vec(), w);
                        true
                    }
                    None => {
                        bad = true;
                        false
                    }
                },
            )?;
        }
        if bad {
            return Err(StoreError::Corrupt {
                cf: "allow",
                detail: "an allow-list entry does not decode".into(),
            });
        }
        Ok(list)
    }

    pub fn get(&self, site: &str, card: &CardNo) -> Option<Windows> {
        self.map.pin().get(&key(site, card)).copied()
    }

    /// Call only after the change's commit was accepted.
    pub fn set(&self, site: &str, card: &CardNo, windows: Option<Windows>) {
        let map = self.map.pin();
        match windows {
            Some(w) => {
                map.insert(key(site, card), w);
            }
            None => {
                map.remove(&key(site, card));
            }
        }
    }

    /// Sets or removes an entry from its stored form (cluster mode: a
    /// change another node wrote).
    pub fn set_stored(&self, key: &[u8], stored: Option<&[u8]>) -> Result<(), StoreError> {
        let map = self.map.pin();
        match stored {
            None => {
                map.remove(key);
            }
            Some(v) => {
                let w = serde_json::from_slice::<Entry>(v)
                    .ok()
                    .and_then(|e| Windows::parse(&e.windows).ok())
                    .ok_or(StoreError::Corrupt {
                        cf: "allow",
                        detail: "an allow-list entry does not decode".into(),
                    })?;
                map.insert(key.to_vec(), w);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
