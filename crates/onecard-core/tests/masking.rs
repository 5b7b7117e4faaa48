//! Every type of the core crate that carries a card number formats it
//! masked with `{:?}`: a record logged by mistake leaks nothing. (Here, not
//! beside `record`, because it names types of most modules: a unit test
//! there made `record` import `disburse` and `settle`, which import it.)

use onecard_core::deny::{DenyChange, DenyOp};
use onecard_core::disburse::{Credit, Found, Record, Target};
use onecard_core::holds::{CategoryRules, HoldRecord};
use onecard_core::model::StoredCardNo;
use onecard_core::model::{CardNo, EventKind, Reason, Scenario};
use onecard_core::record::DecisionRecord;
use onecard_core::scenario::medical::{HoldState, Split};
use onecard_core::settle::batch::Line;
use onecard_core::wire::{parse_authorize, parse_hold};

const CARD: &str = "500118A12345678";
/// What only the clear number shows: masking keeps the first six and
/// the last four characters.
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
    let card = CardNo::parse(CARD).unwrap();
    let record = DecisionRecord {
        card_no: CARD.into(),
        scenario: Some(Scenario::Transit),
        decision: "approve".into(),
        kind: EventKind::Tap,
        reason: Reason::Ok,
        ..DecisionRecord::default()
    };
    assert_masked("DecisionRecord", format!("{record:?}"));
    let hold = HoldRecord {
        auth_id: "h1".into(),
        card_no: CARD.into(),
        amount_fen: 1,
        category: "outpatient".into(),
        rules: CategoryRules {
            coverage_pct: 70,
            deductible: true,
            annual_deductible_fen: None,
        },
        split: Split::default(),
        created_ms: 0,
        expires_ms: 0,
        day: 0,
        state: HoldState::Open,
        captured_fen: 0,
        site: None,
    };
    assert_masked("HoldRecord", format!("{hold:?}"));
    let change = DenyChange {
        op: DenyOp::Add,
        card_no: CARD.into(),
        reason: Some("lost".into()),
        at_ms: 0,
    };
    assert_masked("DenyChange", format!("{change:?}"));
    let line = Line::of(1, &record);
    assert_masked("settlement Line", format!("{line:?}"));
    let r = Record {
        line: 1,
        record_id: "r1".into(),
        target: Target::Card(card.clone()),
        amount_fen: 1,
        programme: "grant".into(),
        project: None,
        month: None,
    };
    assert_masked("disbursement Record", format!("{r:?}"));
    let credit = Credit {
        record: r,
        card_no: card.clone(),
    };
    assert_masked("disbursement Credit", format!("{credit:?}"));
    let found = Found {
        card_no: Some(card),
        ..Found::nothing()
    };
    assert_masked("disbursement Found", format!("{found:?}"));
    let tap = format!(
        r#"{{"event_id":"e1","kind":"tap","card_no":"{CARD}","scenario":"transit","amount_fen":1}}"#
    );
    assert_masked(
        "AuthorizeRequest",
        format!("{:?}", parse_authorize(tap.as_bytes()).unwrap()),
    );
    let hold = format!(
        r#"{{"event_id":"e1","kind":"tap","card_no":"{CARD}","amount_fen":1,"category":"outpatient"}}"#
    );
    assert_masked(
        "HoldRequest",
        format!("{:?}", parse_hold(hold.as_bytes()).unwrap()),
    );
    let stored = StoredCardNo::from(CARD);
    assert_masked("StoredCardNo", format!("{stored:?} {stored}"));
    assert_eq!(stored.as_str(), CARD, "kept in the clear for storage");
    assert_eq!(
        serde_json::to_string(&stored).unwrap(),
        format!("\"{CARD}\"")
    );
}
