//! Property tests of the hand-written parsers: random bytes and mutated
//! good inputs thrown at the terminal API's decoders, the QR token and
//! the disbursement bodies (NDJSON and CSV). Each must never panic, must
//! answer the same input the same way every time (a stable error), and
//! must never quote a card number back in a message.

use onecard_core::disburse::{self, Format};
use onecard_core::qr::{self, Alg, CredType, IssuerKey, Keyring, Rules, SigningKey};
use onecard_core::wire::{self, HoldOp};
use proptest::prelude::*;

const CARD: &str = "500118A12345678";
/// What only the clear number shows (masking keeps six and four).
const HIDDEN: &str = "A1234";

const AUTHORIZE: &str = r#"{"event_id":"bus-0042-000000123","kind":"tap","card_no":"500118A12345678","scenario":"transit","amount_fen":200,"site":"line-12","occurred_at":"2026-11-28T07:45:12Z"}"#;
const HOLD: &str = r#"{"event_id":"h-1","kind":"tap","card_no":"500118A12345678","amount_fen":5000,"category":"outpatient","site":"counter-3"}"#;
const CAPTURE: &str = r#"{"event_id":"c-1","hold_event_id":"h-1","amount_fen":4000,"occurred_at":"2026-11-28T07:45:12Z"}"#;
const REVERSE: &str = r#"{"event_id":"bus-0042-000000123","occurred_at":"2026-11-28T07:45:12Z"}"#;
const NDJSON: &str = "{\"record_id\":\"r1\",\"card_no\":\"500118A12345678\",\"amount_fen\":50000,\"programme\":\"student_grant\"}\n{\"record_id\":\"r2\",\"card_no\":\"500118A12345679\",\"amount_fen\":70000,\"programme\":\"project_wages\",\"project\":\"bridge-7\",\"month\":\"2026-11\"}\n";
const CSV: &str = "record_id,card_no,amount_fen,programme,project,month\nr1,500118A12345678,50000,student_grant,,\nr2,500118A12345679,70000,project_wages,bridge-7,2026-11\n";

/// A good input changed in a few places: bytes flipped, cut out, put in,
/// or the whole cut short. Most results are malformed; some are still
/// good.
fn mutated(good: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((0usize..4, any::<prop::sample::Index>(), any::<u8>()), 1..6);
    edits.prop_map(move |edits| {
        let mut b = good.as_bytes().to_vec();
        for (kind, at, byte) in edits {
            if b.is_empty() {
                break;
            }
            let i = at.index(b.len());
            match kind {
                0 => b[i] = byte,
                1 => {
                    b.remove(i);
                }
                2 => b.insert(i, byte),
                _ => b.truncate(i),
            }
        }
        b
    })
}

/// Random bytes, biased towards the characters JSON and CSV are made of.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]\":,\n\r \\0123456789-.eEnulltrufsAZaz".to_vec()),
    ];
    prop::collection::vec(byte, 0..300)
}

fn no_card_in(message: &str) {
    assert!(
        !message.contains(HIDDEN),
        "a message quotes a card number: {message}"
    );
}

/// Decodes `body` with every terminal decoder, twice: the same answer each
/// time, and no card number in an error.
fn check_decoders(body: &[u8]) {
    let a1 = wire::parse_authorize(body);
    assert_eq!(a1, wire::parse_authorize(body));
    let h1 = wire::parse_hold(body);
    assert_eq!(h1, wire::parse_hold(body));
    let s1 = wire::parse_hold_step(HoldOp::Capture, body);
    assert_eq!(s1, wire::parse_hold_step(HoldOp::Capture, body));
    let v1 = wire::parse_hold_step(HoldOp::Void, body);
    let r1 = wire::parse_reverse(body);
    assert_eq!(r1, wire::parse_reverse(body));
    for e in [a1.err(), h1.err(), s1.err(), v1.err(), r1.err()]
        .into_iter()
        .flatten()
    {
        assert!(!e.0.is_empty());
        no_card_in(&e.0);
    }
}

fn check_disbursement(format: Format, body: &[u8]) {
    let first = disburse::parse(format, body, 100);
    assert_eq!(first, disburse::parse(format, body, 100));
    match first {
        Err(e) => no_card_in(&e.to_string()),
        Ok(lines) => {
            for bad in lines.into_iter().filter_map(Result::err) {
                no_card_in(&bad.message);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn terminal_decoders_take_any_bytes(body in noise()) {
        check_decoders(&body);
    }

    #[test]
    fn terminal_decoders_take_mutated_requests(
        authorize in mutated(AUTHORIZE),
        hold in mutated(HOLD),
        capture in mutated(CAPTURE),
        reverse in mutated(REVERSE),
    ) {
        for body in [authorize, hold, capture, reverse] {
            check_decoders(&body);
        }
    }

    #[test]
    fn disbursement_bodies_take_any_bytes(body in noise()) {
        check_disbursement(Format::Ndjson, &body);
        check_disbursement(Format::Csv, &body);
    }

    #[test]
    fn disbursement_bodies_take_mutated_batches(ndjson in mutated(NDJSON), csv in mutated(CSV)) {
        check_disbursement(Format::Ndjson, &ndjson);
        check_disbursement(Format::Csv, &csv);
        check_disbursement(Format::Csv, &ndjson);
    }

    #[test]
    fn qr_tokens_take_any_text(token in "\\PC{0,200}", dotted in "OC1\\.[A-Za-z0-9_.-]{0,160}") {
        let (keys, _) = keyring();
        for t in [token, dotted] {
            let first = qr::verify(&t, &keys, Rules::default(), NOW);
            prop_assert_eq!(&first, &qr::verify(&t, &keys, Rules::default(), NOW));
            prop_assert!(first.is_err(), "a random token verified: {t}");
        }
    }

    #[test]
    fn qr_tokens_take_mutated_codes(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let (keys, good) = keyring();
        let mut b = good.clone().into_bytes();
        for (at, byte) in edits {
            let i = at.index(b.len());
            b[i] = byte;
        }
        let token = String::from_utf8_lossy(&b).into_owned();
        let first = qr::verify(&token, &keys, Rules::default(), NOW);
        prop_assert_eq!(&first, &qr::verify(&token, &keys, Rules::default(), NOW));
        // A changed code never verifies as another: either refused, or (a
        // change that decodes to the same bytes) the very same claims.
        if let Ok(c) = first {
            let original = qr::verify(&good, &keys, Rules::default(), NOW).unwrap();
            prop_assert_eq!(c, original);
        }
    }
}

const NOW: i64 = 1_795_851_912;

/// One Ed25519 issuer key (from a fixed seed) and a good code it signed.
fn keyring() -> (Keyring, String) {
    use std::sync::OnceLock;
    static KEYS: OnceLock<(SigningKey, Keyring)> = OnceLock::new();
    let (key, ring) = KEYS.get_or_init(|| {
        let mut rng = FixedRng(7);
        let key = SigningKey::generate(Alg::Ed25519, &mut rng);
        let issuer =
            IssuerKey::from_public_pem("k1", Alg::Ed25519, &key.public_pem(), 0, None).unwrap();
        (key, Keyring::new(vec![issuer]).unwrap())
    });
    let token = qr::issue(
        key,
        "k1",
        "cred-0001",
        CredType::Essc,
        NOW - 5,
        60,
        "jti-00000001",
    )
    .unwrap();
    (ring.clone(), token)
}

/// A deterministic generator for the test key: the tests must not depend
/// on the operating system's entropy to be repeatable.
struct FixedRng(u64);

impl rand_core::RngCore for FixedRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for FixedRng {}

#[test]
fn the_good_inputs_are_good() {
    // The mutations start from inputs that parse: otherwise the tests
    // above would only ever see refusals.
    assert!(wire::parse_authorize(AUTHORIZE.as_bytes()).is_ok());
    assert!(wire::parse_hold(HOLD.as_bytes()).is_ok());
    assert!(wire::parse_hold_step(HoldOp::Capture, CAPTURE.as_bytes()).is_ok());
    assert!(wire::parse_reverse(REVERSE.as_bytes()).is_ok());
    for (f, body) in [(Format::Ndjson, NDJSON), (Format::Csv, CSV)] {
        let lines = disburse::parse(f, body.as_bytes(), 100).unwrap();
        assert!(lines.iter().all(Result::is_ok), "{lines:?}");
    }
    let (keys, token) = keyring();
    assert!(qr::verify(&token, &keys, Rules::default(), NOW).is_ok());
    assert!(CARD.contains(HIDDEN));
}
