//! Partner regions' deny lists (Sichuan–Chongqing): one per partner, each
//! replaced whole by a bulk import with the partner's own version. In
//! memory a set per partner behind a read-mostly lock (swapped whole on
//! import), in `partner_deny` for keeps, the version (and the import's
//! fingerprint, so that a retried import is recognized) in `meta`.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::RwLock;

use onecard_core::model::CardNo;

use crate::store::{Cf, Store, StoreError};

/// The `meta` key of a partner's version and import fingerprint.
pub fn version_key(partner: &str) -> Vec<u8> {
    let mut k = VERSION_KEY_PREFIX.to_vec();
    k.extend_from_slice(partner.as_bytes());
    k
}

pub const VERSION_KEY_PREFIX: &[u8] = b"partner_version/";

/// The `partner_deny` key of a card: partner 0x00 card_no.
pub fn key(partner: &str, card: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(partner.len() + 1 + card.len());
    k.extend_from_slice(partner.as_bytes());
    k.push(0);
    k.extend_from_slice(card.as_bytes());
    k
}

/// One partner's list as imported.
#[derive(Debug, Default)]
pub struct List {
    pub version: u64,
    /// SHA-256 of the import body that made this version.
    pub fingerprint: [u8; 32],
    pub cards: HashSet<CardNo, foldhash::fast::RandomState>,
}

pub struct PartnerLists {
    /// By partner index (`regions.partners` order).
    lists: Vec<RwLock<Arc<List>>>,
    names: Vec<String>,
}

impl PartnerLists {
    pub fn load(store: &Store, names: &[String]) -> Result<PartnerLists, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            cf: "partner_deny",
            detail: detail.into(),
        };
        let mut lists = Vec::with_capacity(names.len());
        for name in names {
            let mut list = List::default();
            if let Some(v) = store.get(Cf::Meta, &version_key(name))? {
                if v.len() != 40 {
                    return Err(corrupt("a partner version does not decode"));
                }
                list.version = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
                list.fingerprint.copy_from_slice(&v[8..]);
            }
            let prefix = key(name, "");
            let mut bad = false;
            store.scan(Cf::PartnerDeny, &prefix, |k, _| {
                let Some(card) = k.strip_prefix(prefix.as_slice()) else {
                    return false;
                };
                match std::str::from_utf8(card)
                    .ok()
                    .and_then(|s| CardNo::parse(s).ok())
                {
                    Some(c) => {
                        list.cards.insert(c);
                        true
                    }
                    None => {
                        bad = true;
                        false
                    }
                }
            })?;
            if bad {
                return Err(corrupt("a partner deny entry does not decode"));
            }
            lists.push(RwLock::new(Arc::new(list)));
        }
        Ok(PartnerLists {
            lists,
            names: names.to_vec(),
        })
    }

    pub fn contains(&self, partner: usize, card: &CardNo) -> bool {
        self.lists
            .get(partner)
            .is_some_and(|l| l.read().cards.contains(card))
    }

    pub fn current(&self, partner: usize) -> Arc<List> {
        self.lists[partner].read().clone()
    }

    /// Reads the lists again from the store (cluster mode: after applying
    /// an import another node wrote).
    pub fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let fresh = PartnerLists::load(store, &self.names)?;
        for (mine, new) in self.lists.iter().zip(fresh.lists) {
            *mine.write() = new.into_inner();
        }
        Ok(())
    }

    /// Call only after the import's commit was accepted.
    pub fn replace(&self, partner: usize, list: List) {
        *self.lists[partner].write() = Arc::new(list);
    }
}

/// The `meta` value of a version: version (u64 BE) and fingerprint.
pub fn encode_version(version: u64, fingerprint: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(fingerprint);
    v
}
