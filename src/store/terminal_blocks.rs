//! The security team's block list of terminal certificates: by serial
//! number or SHA-256 fingerprint, for a stolen or lost validator whose
//! certificate is still valid. In memory for the handshake (every new
//! terminal connection asks it), in `terminal_blocks` for keeps; changed
//! only through the admin API, memory after the commit (in a cluster, by
//! the applier on every node).
//!
//! A change is announced on a watch: each open terminal connection waits
//! on it and closes itself when its certificate becomes blocked.

use std::collections::HashMap;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::net::tls::{CertKeys, Refusals};
use crate::store::{Cf, Store, StoreError};

/// Blocked certificates at most: a city's stolen validators, not a CRL.
pub const ENTRIES_MAX: usize = 100_000;

/// The stored form of a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The terminal the certificate was issued to, as the security team
    /// wrote it (for people; the key is what is matched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<String>,
    pub reason: String,
    pub by: String,
    pub at_ms: i64,
}

/// A block list key from what a person typed: `serial:` then the serial in
/// hex (colons and case as certificate viewers print them; leading zero
/// bytes ignored), or `sha256:` then 64 hex digits.
pub fn parse_key(s: &str) -> Result<String, String> {
    let (kind, value) = s
        .split_once(':')
        .ok_or_else(|| "a block key is `serial:<hex>` or `sha256:<64 hex digits>`".to_owned())?;
    let digits: String = value.chars().filter(|c| *c != ':').collect();
    let bytes = onecard_core::hex::decode(&digits)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| format!("the {kind} of a block key must be hexadecimal digits"))?;
    match kind {
        "serial" if bytes.len() <= 20 => {
            Ok(format!("serial:{}", crate::net::tls::serial_hex(&bytes)))
        }
        "serial" => Err("a certificate serial has at most 20 bytes (40 hex digits)".into()),
        "sha256" if bytes.len() == 32 => {
            Ok(format!("sha256:{}", onecard_core::hex::encode(&bytes)))
        }
        "sha256" => Err("a SHA-256 fingerprint has 64 hex digits".into()),
        _ => Err(format!(
            "unknown block key kind `{kind}`: use `serial:` or `sha256:`"
        )),
    }
}

pub struct TerminalBlocks {
    map: RwLock<HashMap<String, Entry>>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for TerminalBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TerminalBlocks({} entries)", self.map.read().len())
    }
}

impl TerminalBlocks {
    pub fn load(store: &Store) -> Result<TerminalBlocks, StoreError> {
        let mut map = HashMap::new();
        let mut bad = false;
        store.scan(Cf::TerminalBlocks, &[], |k, v| {
            match (std::str::from_utf8(k), serde_json::from_slice::<Entry>(v)) {
                (Ok(k), Ok(e)) => {
                    map.insert(k.to_owned(), e);
                    true
                }
                _ => {
                    bad = true;
                    false
                }
            }
        })?;
        if bad {
            return Err(corrupt());
        }
        Ok(TerminalBlocks {
            map: RwLock::new(map),
            changed: watch::channel(0).0,
        })
    }

    pub fn get(&self, key: &str) -> Option<Entry> {
        self.map.read().get(key).cloned()
    }

    /// Every block, by key.
    pub fn list(&self) -> Vec<(String, Entry)> {
        let mut v: Vec<_> = self
            .map
            .read()
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Call only after the change's commit was accepted.
    pub fn set(&self, key: &str, entry: Option<Entry>) {
        {
            let mut map = self.map.write();
            match entry {
                Some(e) => map.insert(key.to_owned(), e),
                None => map.remove(key),
            };
        }
        self.changed.send_modify(|v| *v += 1);
        metrics::gauge!("onecard_tls_terminal_blocks").set(self.len() as f64);
    }

    /// Sets or removes a block from its stored form (cluster mode: a
    /// change another node wrote).
    pub fn set_stored(&self, key: &[u8], stored: Option<&[u8]>) -> Result<(), StoreError> {
        let key = std::str::from_utf8(key).map_err(|_| corrupt())?;
        let entry = match stored {
            Some(v) => Some(serde_json::from_slice::<Entry>(v).map_err(|_| corrupt())?),
            None => None,
        };
        self.set(key, entry);
        Ok(())
    }

    /// Changes to the list: an open connection waits on it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

fn corrupt() -> StoreError {
    StoreError::Corrupt {
        cf: "terminal_blocks",
        detail: "a terminal block does not decode".into(),
    }
}

impl Refusals for TerminalBlocks {
    fn any(&self) -> bool {
        !self.is_empty()
    }

    fn refuses(&self, cert: &CertKeys) -> bool {
        let map = self.map.read();
        !map.is_empty() && cert.keys().iter().any(|k| map.contains_key(k))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_key;

    #[test]
    fn keys_are_written_one_way_whatever_was_typed() {
        assert_eq!(parse_key("serial:00:1A:2b").unwrap(), "serial:1a2b");
        assert_eq!(parse_key("serial:001a2b").unwrap(), "serial:1a2b");
        let fp = "AB".repeat(32);
        assert_eq!(
            parse_key(&format!("sha256:{fp}")).unwrap(),
            format!("sha256:{}", "ab".repeat(32))
        );
        for bad in [
            "1a2b",
            "serial:",
            "serial:xyz",
            "serial:+1",
            "sha256:abcd",
            "md5:abcd",
            &format!("serial:{}", "11".repeat(21)),
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }
}
