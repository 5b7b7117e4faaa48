//! Every type of the gateway crate that carries a card number formats it
//! masked with `{:?}` (the core crate's record types have their own test):
//! a value logged by mistake leaks no card number.

use onecard::service::cardlife::LifeAnswer;
use onecard::service::disburse::{Roster, Unpaid};
use onecard::service::hotline::{Lookup, RecordView, Transaction};
use onecard::service::offline::RiskRecord;
use onecard::store::audit::AuditEntry;
use onecard::store::idem::Origin;
use onecard::store::profiles::{Binding, Profile};
use onecard_core::model::{CardStatus, EventKind, Scenario, StoredCardNo};
use onecard_core::qr::CredType;

const CARD: &str = "500118A12345678";
/// What only the clear number shows: masking keeps the first six and the
/// last four characters.
const HIDDEN: &str = "A1234";

fn assert_masked(what: &str, debug: String) {
    assert!(
        !debug.contains(HIDDEN),
        "{what} shows a card number: {debug}"
    );
    assert!(
        debug.contains("500118"),
        "{what} shows no masked card: {debug}"
    );
}

#[test]
fn every_record_type_formats_its_card_number_masked() {
    let card = || StoredCardNo::from(CARD);
    let binding = Binding {
        card_no: card(),
        typ: CredType::Essc,
        bound_at_ms: 0,
    };
    assert_masked("Binding", format!("{binding:?}"));
    let profile = Profile {
        replaces: Some(card()),
        replaced_by: Some(card()),
        ..Profile::default()
    };
    assert_masked("Profile", format!("{profile:?}"));
    let audit = AuditEntry {
        at_ms: 0,
        who: "ops".into(),
        role: "operator".into(),
        action: "freeze".into(),
        card_no: Some(card()),
        detail: None,
    };
    assert_masked("AuditEntry", format!("{audit:?}"));
    let risk = RiskRecord {
        card_no: card(),
        ..RiskRecord::default()
    };
    assert_masked("RiskRecord", format!("{risk:?}"));
    let roster = Roster {
        workers: vec![card()],
        at_ms: 0,
    };
    assert_masked("Roster", format!("{roster:?}"));
    let unpaid = Unpaid {
        card_no: card(),
        status: Some(CardStatus::Active),
    };
    assert_masked("Unpaid", format!("{unpaid:?}"));
    let origin = Origin {
        approved: true,
        charged_fen: 200,
        scenario: Scenario::Transit,
        card_no: CARD,
        site: None,
    };
    assert_masked("idempotency Origin", format!("{origin:?}"));
    let life = LifeAnswer {
        card_no: card(),
        status: CardStatus::Lost,
        changed: true,
        denylisted: true,
        denylist_version: 1,
        replaced_by: Some(card()),
    };
    assert_masked("LifeAnswer", format!("{life:?}"));
    let lookup = Lookup {
        card_no: card(),
        transactions: vec![Transaction {
            seq: 1,
            at_ms: 0,
            card_no: card(),
            record: RecordView {
                terminal: "t".into(),
                event_id: "e".into(),
                auth_id: "a".into(),
                kind: EventKind::Tap,
                scenario: None,
                decision: "approve".into(),
                reason: "OK",
                charged_fen: 0,
                site: None,
                occurred_at: None,
                reverses: None,
                offline: false,
                split: None,
            },
            settlement: "none",
        }],
        more: false,
    };
    assert_masked("hotline Lookup", format!("{lookup:?}"));
}
