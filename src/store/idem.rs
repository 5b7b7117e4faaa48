//! The idempotency record as stored in the `idem` column family: the key
//! of a (terminal, event_id) and of its reversal, and the value: format,
//! request fingerprint, time, auth_id, what a reversal needs of the event
//! (or a tombstone), and the answer's bytes, replayed to a retry.

use onecard_core::model::{mask_card_no, Scenario};

/// An answer to a request that carries no event to reverse (a reversal's own answer).
const FORMAT_PLAIN: u8 = 1;
/// An authorization's answer, with what a later reversal needs to know.
const FORMAT_ORIGIN: u8 = 2;
/// A reversal arrived for an event this terminal never sent (or that is
/// still on its way): when the event arrives it is declined `REVERSED`.
const FORMAT_TOMBSTONE: u8 = 3;

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
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub approved: bool,
    pub charged_fen: i64,
    pub scenario: Scenario,
    pub card_no: &'a str,
    pub site: Option<&'a str>,
}

/// Masked, like every type that carries a card number.
impl std::fmt::Debug for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("approved", &self.approved)
            .field("charged_fen", &self.charged_fen)
            .field("scenario", &self.scenario)
            .field("card_no", &mask_card_no(self.card_no))
            .field("site", &self.site)
            .finish()
    }
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
