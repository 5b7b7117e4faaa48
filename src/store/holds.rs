//! Medical holds as stored: the `holds` column family (key: the hold
//! event's idempotency key; value: the [`HoldRecord`] as JSON) and its due
//! index, which the sweep reads in time order.

use onecard_core::holds::HoldRecord;
use onecard_core::scenario::medical::HoldState;

use super::durable::Op;
use super::{idem, Cf, Store, StoreError};

/// The key of a hold: the hold event's idempotency key.
pub fn hold_key(terminal: &str, hold_event_id: &str) -> Vec<u8> {
    idem::key(terminal, hold_event_id)
}

pub fn read_hold(store: &Store, key: &[u8]) -> Result<Option<HoldRecord>, StoreError> {
    decode(store.get(Cf::Holds, key)?)
}

/// [`read_hold`] for async code: never waits for the disk on an async
/// worker ([`Store::read`]).
pub async fn read_hold_async(store: &Store, key: &[u8]) -> Result<Option<HoldRecord>, StoreError> {
    decode(store.read(Cf::Holds, key).await?)
}

fn decode(v: Option<Vec<u8>>) -> Result<Option<HoldRecord>, StoreError> {
    match v {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                cf: "holds",
                detail: e.to_string(),
            }),
    }
}

/// The first byte of the keys of the `holds` cf's due index: 0xFF, when
/// due (ms, big-endian), the hold's key. A hold's key starts with its
/// terminal id (printable ASCII), so the index sorts after every hold, by
/// time. An open hold is due at its expiry (the sweep expires it); a closed
/// one when its record may go (the sweep deletes it).
pub const DUE: u8 = 0xff;

pub fn due_key(due_ms: i64, hold_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + hold_key.len());
    k.push(DUE);
    k.extend_from_slice(&due_ms.max(0).to_be_bytes());
    k.extend_from_slice(hold_key);
    k
}

pub fn parse_due(k: &[u8]) -> Option<(i64, &[u8])> {
    let (&first, rest) = k.split_first()?;
    if first != DUE || rest.len() < 8 {
        return None;
    }
    let (at, key) = rest.split_at(8);
    Some((i64::from_be_bytes(at.try_into().ok()?), key))
}

/// The writes of a hold's new state, with its due index: a new open hold
/// is due at its expiry; a hold that closes now stops being due then and
/// is due for deletion after `keep_ms`.
pub fn hold_ops(
    ops: &mut Vec<Op>,
    key: &[u8],
    before: Option<&HoldRecord>,
    after: &HoldRecord,
    now_ms: i64,
    keep_ms: i64,
) {
    ops.push(Op::Put(
        Cf::Holds,
        key.to_vec(),
        serde_json::to_vec(after).expect("a hold record serializes"),
    ));
    let was_open = before.is_some_and(|b| b.state == HoldState::Open);
    match (before, after.state == HoldState::Open) {
        (None, true) => ops.push(Op::Put(
            Cf::Holds,
            due_key(after.expires_ms, key),
            Vec::new(),
        )),
        (Some(b), false) if was_open => {
            ops.push(Op::Delete(Cf::Holds, due_key(b.expires_ms, key)));
            ops.push(Op::Put(
                Cf::Holds,
                due_key(now_ms.saturating_add(keep_ms), key),
                Vec::new(),
            ));
        }
        _ => {}
    }
}

/// The (terminal, event id) of a hold's key.
pub fn split_key(key: &[u8]) -> (String, String) {
    let at = key.iter().position(|&b| b == 0).unwrap_or(key.len());
    let event = key.get(at + 1..).unwrap_or_default();
    (
        String::from_utf8_lossy(&key[..at]).into_owned(),
        String::from_utf8_lossy(event).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use onecard_core::holds::CategoryRules;
    use onecard_core::scenario::medical::Split;

    const NOW_MS: i64 = 1_795_851_912_000; // 2026-11-28T07:45:12Z

    fn hold(state: HoldState) -> HoldRecord {
        HoldRecord {
            auth_id: "h1".into(),
            card_no: "500118A12345678".into(),
            amount_fen: 10_000,
            category: "outpatient".into(),
            rules: CategoryRules {
                coverage_pct: 70,
                deductible: true,
                annual_deductible_fen: None,
            },
            split: Split::default(),
            created_ms: NOW_MS - 1_000,
            expires_ms: NOW_MS + 1_000,
            day: 20_785,
            state,
            captured_fen: 0,
            site: None,
        }
    }

    #[test]
    fn the_due_index_follows_a_hold() {
        let key = hold_key("term-0001", "h-1");
        let k = due_key(NOW_MS, &key);
        assert_eq!(parse_due(&k), Some((NOW_MS, key.as_slice())));
        // After every hold's own key, ordered by time.
        assert!(k > key && due_key(NOW_MS + 1, b"a") > k);
        assert_eq!(parse_due(&key), None);
        assert_eq!(split_key(&key), ("term-0001".into(), "h-1".into()));

        let due_ops = |ops: &[Op]| -> Vec<(bool, Option<i64>)> {
            ops.iter()
                .filter_map(|op| match op {
                    Op::Put(Cf::Holds, k, _) => Some((true, parse_due(k).map(|d| d.0))),
                    Op::Delete(Cf::Holds, k) => Some((false, parse_due(k).map(|d| d.0))),
                    _ => None,
                })
                .collect()
        };
        let open = hold(HoldState::Open);
        let captured = hold(HoldState::Captured);
        let (keep, now) = (5_000, NOW_MS + 100);
        let mut ops = Vec::new();
        hold_ops(&mut ops, &key, None, &open, now, keep);
        // The hold, and its expiry.
        assert_eq!(due_ops(&ops), [(true, None), (true, Some(open.expires_ms))]);
        let mut ops = Vec::new();
        hold_ops(&mut ops, &key, Some(&open), &captured, now, keep);
        // Closed: no longer due at its expiry, due for deletion later.
        assert_eq!(
            due_ops(&ops),
            [
                (true, None),
                (false, Some(open.expires_ms)),
                (true, Some(now + keep))
            ]
        );
        let mut ops = Vec::new();
        hold_ops(&mut ops, &key, Some(&captured), &captured, now, keep);
        assert_eq!(due_ops(&ops), [(true, None)]);
    }
}
