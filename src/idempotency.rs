//! Idempotency: (terminal id, event_id) → the first answer, byte for byte.
//!
//! The record is written by the journal writer in the same batch as the
//! decision it answers, so an answer that reached a terminal is always
//! replayable after a crash. Two copies of one request that arrive together
//! are serialized by an in-flight table: the second waits for the first to
//! finish and then reads what it stored. Records are kept for
//! `idempotency.retention_s` and then removed by [`run_cleanup`], which walks
//! the journal in sequence order behind a durable cursor.

use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

use crate::journal::{DecisionRecord, Expired, Journal};
use crate::model::Scenario;
use crate::state::store::{decode_u64, meta};
use crate::state::{Cf, Store, StoreError};

/// An answer to a request that carries no event to reverse (a reversal's own answer).
const FORMAT_PLAIN: u8 = 1;
/// An authorization's answer, with what a later reversal needs to know.
const FORMAT_ORIGIN: u8 = 2;
/// A reversal arrived for an event this terminal never sent (or that is
/// still on its way): when the event arrives it is declined `REVERSED`.
const FORMAT_TOMBSTONE: u8 = 3;
/// How many journal records one clean-up step examines.
pub const CLEANUP_STEP_RECORDS_MAX: usize = 4_096;

/// The key of an idempotency record. A terminal id never contains a NUL
/// byte (it comes from a certificate name or a validated header), so the
/// pair is unambiguous.
pub fn key(terminal: &str, event_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(terminal.len() + 3 + event_id.len());
    k.extend_from_slice(terminal.as_bytes());
    k.push(0);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// The key of the answer to a reversal of (terminal, event_id): the
/// event's key and `NUL r`, which no event key has (event ids hold no NUL).
pub fn reversal_key(terminal: &str, event_id: &str) -> Vec<u8> {
    let mut k = key(terminal, event_id);
    k.extend_from_slice(b"\0r");
    k
}

/// What a reversal needs to know of the event an answer was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub approved: bool,
    pub charged_fen: i64,
    pub scenario: Scenario,
    pub card_no: &'a str,
    pub site: Option<&'a str>,
}

/// What kind of record is stored besides the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail<'a> {
    Plain,
    Origin(Origin<'a>),
    Tombstone,
}

fn short(s: &str) -> u8 {
    u8::try_from(s.len()).expect("auth ids and card numbers (validated) are at most 255 bytes")
}

/// Encodes a stored answer: format, fingerprint, creation time, auth_id,
/// the tail (for `Origin`: flags, charged fen, scenario, card, site), body.
pub fn encode(
    fingerprint: &[u8; 32],
    created_ms: i64,
    auth_id: &str,
    tail: Tail<'_>,
    body: &[u8],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 32 + 8 + 1 + auth_id.len() + 48 + body.len());
    v.push(match tail {
        Tail::Plain => FORMAT_PLAIN,
        Tail::Origin(_) => FORMAT_ORIGIN,
        Tail::Tombstone => FORMAT_TOMBSTONE,
    });
    v.extend_from_slice(fingerprint);
    v.extend_from_slice(&created_ms.to_be_bytes());
    v.push(short(auth_id));
    v.extend_from_slice(auth_id.as_bytes());
    if let Tail::Origin(o) = tail {
        v.push(u8::from(o.approved));
        v.extend_from_slice(&o.charged_fen.to_be_bytes());
        v.push(o.scenario as u8);
        v.push(short(o.card_no));
        v.extend_from_slice(o.card_no.as_bytes());
        // A site is up to 64 characters: up to 256 bytes of UTF-8.
        let site = o.site.unwrap_or("");
        let n = u16::try_from(site.len()).expect("a site is at most 64 characters");
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(site.as_bytes());
    }
    v.extend_from_slice(body);
    v
}

/// A decoded stored answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Stored<'a> {
    pub fingerprint: &'a [u8],
    pub created_ms: i64,
    pub auth_id: &'a str,
    pub tail: Tail<'a>,
    pub body: &'a [u8],
}

/// Reads a length-prefixed string at `*at`, moving past it.
fn take_str<'a>(v: &'a [u8], at: &mut usize) -> Option<&'a str> {
    let n = usize::from(*v.get(*at)?);
    let s = std::str::from_utf8(v.get(*at + 1..*at + 1 + n)?).ok()?;
    *at += 1 + n;
    Some(s)
}

pub fn decode(v: &[u8]) -> Option<Stored<'_>> {
    if v.len() < 42 || !(FORMAT_PLAIN..=FORMAT_TOMBSTONE).contains(&v[0]) {
        return None;
    }
    let created_ms = i64::from_be_bytes(v[33..41].try_into().ok()?);
    let mut at = 41;
    let auth_id = take_str(v, &mut at)?;
    let tail = match v[0] {
        FORMAT_PLAIN => Tail::Plain,
        FORMAT_TOMBSTONE => Tail::Tombstone,
        _ => {
            let approved = *v.get(at)? == 1;
            let charged_fen = i64::from_be_bytes(v.get(at + 1..at + 9)?.try_into().ok()?);
            let scenario = *Scenario::ALL.get(usize::from(*v.get(at + 9)?))?;
            at += 10;
            let card_no = take_str(v, &mut at)?;
            let n = usize::from(u16::from_be_bytes(v.get(at..at + 2)?.try_into().ok()?));
            let site = std::str::from_utf8(v.get(at + 2..at + 2 + n)?).ok()?;
            at += 2 + n;
            Tail::Origin(Origin {
                approved,
                charged_fen,
                scenario,
                card_no,
                site: (!site.is_empty()).then_some(site),
            })
        }
    };
    Some(Stored {
        fingerprint: &v[1..33],
        created_ms,
        auth_id,
        tail,
        body: &v[at..],
    })
}

pub fn stored_auth_id(v: &[u8]) -> Option<&str> {
    decode(v).map(|s| s.auth_id)
}

/// What the idempotency check found.
pub enum Lookup {
    /// Never seen (or expired): decide it. Hold the guard until the answer
    /// is durable, so a concurrent copy waits for it.
    Fresh(InFlight),
    /// Seen with the same content: send this body again.
    Replay(Vec<u8>),
    /// Seen with other content.
    Conflict,
    /// Never seen, but reversed by its terminal already: decline it
    /// `REVERSED`, holding the guard as for `Fresh`.
    Reversed(InFlight),
}

pub struct Idempotency {
    store: Store,
    inflight: Arc<DashMap<Vec<u8>, watch::Receiver<()>>>,
    retention_ms: i64,
}

/// Marks a key as being decided; dropping it lets waiting copies proceed.
pub struct InFlight {
    inflight: Arc<DashMap<Vec<u8>, watch::Receiver<()>>>,
    key: Vec<u8>,
    _done: watch::Sender<()>,
}

impl InFlight {
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Removed before the sender drops, so a woken waiter finds the slot free.
        self.inflight.remove(&self.key);
    }
}

impl Idempotency {
    pub fn new(store: Store, retention_s: u64) -> Idempotency {
        Idempotency {
            store,
            inflight: Arc::new(DashMap::new()),
            retention_ms: (retention_s as i64).saturating_mul(1000),
        }
    }

    /// Waits until no other request holds `key`, then holds it and returns
    /// what is stored under it (`None`: nothing, or expired).
    pub async fn hold(
        &self,
        key: Vec<u8>,
        now_ms: i64,
    ) -> Result<(InFlight, Option<Vec<u8>>), StoreError> {
        loop {
            let (done, waiter) = watch::channel(());
            let busy = match self.inflight.entry(key.clone()) {
                Entry::Occupied(e) => Some(e.get().clone()),
                Entry::Vacant(e) => {
                    e.insert(waiter);
                    None
                }
            };
            if let Some(mut other) = busy {
                // The first copy ends by dropping its sender; either way, look again.
                let _ = other.changed().await;
                continue;
            }
            let guard = InFlight {
                inflight: self.inflight.clone(),
                key,
                _done: done,
            };
            let Some(value) = self.store.get(Cf::Idem, guard.key())? else {
                return Ok((guard, None));
            };
            let stored = decode(&value).ok_or(StoreError::Corrupt {
                cf: "idem",
                detail: "bad record".into(),
            })?;
            if stored.created_ms.saturating_add(self.retention_ms) < now_ms {
                return Ok((guard, None));
            }
            return Ok((guard, Some(value)));
        }
    }

    pub async fn begin(
        &self,
        key: Vec<u8>,
        fingerprint: &[u8; 32],
        now_ms: i64,
    ) -> Result<Lookup, StoreError> {
        let (guard, value) = self.hold(key, now_ms).await?;
        let Some(value) = value else {
            return Ok(Lookup::Fresh(guard));
        };
        let stored = decode(&value).expect("checked by hold");
        if stored.tail == Tail::Tombstone {
            return Ok(Lookup::Reversed(guard));
        }
        if stored.fingerprint == fingerprint {
            return Ok(Lookup::Replay(stored.body.to_vec()));
        }
        Ok(Lookup::Conflict)
    }
}

/// One clean-up step: examines up to [`CLEANUP_STEP_RECORDS_MAX`] journal
/// records after the cursor and removes the idempotency records of those
/// older than the retention. Returns how many journal records it passed.
pub async fn cleanup_step(
    store: &Store,
    journal: &Journal,
    retention_s: u64,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let cutoff_ms = now_ms - (retention_s as i64).saturating_mul(1000);
    let cursor = store
        .get_u64(Cf::Meta, meta::IDEM_CLEANUP_SEQ)?
        .unwrap_or(0);
    let mut expired = Vec::new();
    // Journal records passed (a reversal adds two keys to `expired`).
    let mut passed = 0usize;
    let mut last = cursor;
    let mut corrupt = None;
    store.scan(Cf::Journal, &(cursor + 1).to_be_bytes(), |k, v| {
        let Some(seq) = decode_u64(k) else {
            corrupt = Some("journal key is not a u64");
            return false;
        };
        let Ok(record) = serde_json::from_slice::<DecisionRecord>(v) else {
            corrupt = Some("journal record does not decode");
            return false;
        };
        if record.at_ms >= cutoff_ms {
            return false;
        }
        if record.decision == "reverse" {
            // A reversal's answer has its own key; the event's key holds
            // the reversal's id only when it is a tombstone.
            expired.push(Expired {
                idem_key: reversal_key(&record.terminal, &record.event_id),
                auth_id: record.auth_id.clone(),
            });
        }
        expired.push(Expired {
            idem_key: key(&record.terminal, &record.event_id),
            auth_id: record.auth_id,
        });
        last = seq;
        passed += 1;
        passed < CLEANUP_STEP_RECORDS_MAX
    })?;
    if let Some(detail) = corrupt {
        return Err(StoreError::Corrupt {
            cf: "journal",
            detail: detail.into(),
        });
    }
    if passed > 0 {
        journal
            .cleanup(expired, last)
            .await
            .map_err(|e| StoreError::Corrupt {
                cf: "idem",
                detail: e.to_string(),
            })?;
    }
    Ok(passed)
}

/// Runs clean-up steps every `interval` until `stop` fires.
pub async fn run_cleanup(
    store: Store,
    journal: Arc<Journal>,
    retention_s: u64,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        loop {
            match cleanup_step(&store, &journal, retention_s, crate::clock::now_ms()).await {
                Ok(n) if n == CLEANUP_STEP_RECORDS_MAX => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency clean-up step failed; will retry");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_answers_round_trip() {
        let fp = [7u8; 32];
        let origin = Origin {
            approved: true,
            charged_fen: 200,
            scenario: Scenario::Medical,
            card_no: "500118A12345678",
            site: Some("counter-3"),
        };
        let tails = [
            Tail::Plain,
            Tail::Tombstone,
            Tail::Origin(origin),
            Tail::Origin(Origin {
                site: None,
                approved: false,
                charged_fen: 0,
                ..origin
            }),
        ];
        for tail in tails {
            let v = encode(
                &fp,
                1_795_851_912_000,
                "0000000100000000002a",
                tail,
                br#"{"ok":1}"#,
            );
            let s = decode(&v).unwrap();
            assert_eq!(s.fingerprint, &fp);
            assert_eq!(s.created_ms, 1_795_851_912_000);
            assert_eq!(s.auth_id, "0000000100000000002a");
            assert_eq!(s.tail, tail);
            assert_eq!(s.body, br#"{"ok":1}"#);
            assert_eq!(decode(&v[..20]), None);
        }
        assert_eq!(decode(&[9; 60]), None, "an unknown format");
        // 64 characters of four bytes each: 256 bytes.
        let site = "\u{20000}".repeat(64);
        let long = Tail::Origin(Origin {
            site: Some(&site),
            ..origin
        });
        let v = encode(&fp, 1, "a", long, b"{}");
        assert_eq!(decode(&v).unwrap().tail, long);
    }

    #[test]
    fn keys_separate_terminal_and_event() {
        assert_ne!(key("ab", "c"), key("a", "bc"));
        assert!(reversal_key("t", "e").starts_with(&key("t", "e")));
        assert_ne!(reversal_key("t", "e"), key("t", "e"));
    }
}
