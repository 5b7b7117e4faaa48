//! The journal's record of a decision, as settlement, the hotline and a
//! restart read it. Card numbers are stored in the clear (the downstream
//! systems book by card) and shown masked: [`StoredCardNo`] formats so.

use serde::{Deserialize, Serialize, Serializer};

use crate::model::{EventKind, Reason, Scenario, StoredCardNo};
use crate::scenario::{medical::Split, Fare};

/// A decision as the journal keeps it: enough to answer an agent's question
/// about a transaction and to settle it later. Card numbers are stored (the
/// downstream systems book by card); they are masked wherever they are shown.
///
/// It is written through its [`RecordView`] (the one definition of the
/// stored form), read back as this.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DecisionRecord {
    /// When the gateway decided, in Unix milliseconds.
    pub at_ms: i64,
    pub terminal: String,
    pub event_id: String,
    pub auth_id: String,
    pub kind: crate::model::EventKind,
    /// Empty only for a reversal of an event the gateway never saw.
    #[serde(default, skip_serializing_if = "StoredCardNo::is_empty")]
    pub card_no: StoredCardNo,
    /// `None` only for a reversal of an event the gateway never saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<crate::model::Scenario>,
    /// What the terminal asked for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub amount_fen: Option<i64>,
    /// `approve`, `decline`, or `reverse` for a reversal (of `terminal`'s
    /// `event_id`; `auth_id` is then the reversal's own id); `credit` for
    /// a disbursement; `hold` and `void` for a medical hold and its
    /// release, which settlement does not take (a capture is an
    /// `approve`).
    pub decision: String,
    pub reason: crate::model::Reason,
    /// What was charged (0 for a decline); for a reversal, what it gave
    /// back (the original charge, or 0 when there was none).
    pub charged_fen: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub site: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub occurred_at: Option<String>,
    /// For a reversal: the auth_id of the approval it reverses (`None` when
    /// the event was never seen).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reverses: Option<String>,
    /// For a scan: the code it spent (never the card number).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scan: Option<ScanRef>,
    /// Decided by the terminal while offline, uploaded later.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub offline: bool,
    /// Transit and culture: how the charge was worked out (base,
    /// concession, transfer, cap).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fare: Option<crate::scenario::Fare>,
    /// A public payment's bill reference, settled with the charge.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bill_ref: Option<String>,
    /// For a credit (`decision: "credit"`, money paid to the card's
    /// account): the disbursement record that paid it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credit: Option<CreditRef>,
    /// Medical: the bill's split between insurance and self-pay (a
    /// capture's as booked; a hold's as it would have been), settled with
    /// the charge so the medical sink sees both parts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub split: Option<crate::scenario::medical::Split>,
    /// For a medical hold's capture or void: the terminal's event id of
    /// the hold it closes. A step at the counter, not a card presented:
    /// the rollout report counts the hold, not its steps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hold_event_id: Option<String>,
}

impl DecisionRecord {
    /// The record as the journal stores it (JSON).
    pub fn to_json(&self) -> Vec<u8> {
        self.view().to_json()
    }

    /// The record borrowed, field for field.
    pub fn view(&self) -> RecordView<'_> {
        RecordView {
            at_ms: self.at_ms,
            terminal: &self.terminal,
            event_id: &self.event_id,
            auth_id: &self.auth_id,
            kind: self.kind,
            card_no: self.card_no.as_str(),
            scenario: self.scenario,
            amount_fen: self.amount_fen,
            decision: &self.decision,
            reason: self.reason,
            charged_fen: self.charged_fen,
            site: self.site.as_deref(),
            occurred_at: self.occurred_at.as_deref(),
            reverses: self.reverses.as_deref(),
            scan: self.scan.as_ref(),
            offline: self.offline,
            fare: self.fare,
            bill_ref: self.bill_ref.as_deref(),
            credit: self.credit.as_ref(),
            split: self.split,
            hold_event_id: self.hold_event_id.as_deref(),
        }
    }
}

impl Serialize for DecisionRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.view().serialize(serializer)
    }
}

/// A [`DecisionRecord`] whose text fields are borrowed from where they
/// already are (the request, the terminal's name): a tap's record is
/// serialized without first copying six strings into a record of its own.
/// This is the stored form's one definition: the same fields, names and
/// omissions as the record reads back (a round-trip test holds them to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecordView<'a> {
    pub at_ms: i64,
    pub terminal: &'a str,
    pub event_id: &'a str,
    pub auth_id: &'a str,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub card_no: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<Scenario>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_fen: Option<i64>,
    pub decision: &'a str,
    pub reason: Reason,
    pub charged_fen: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverses: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan: Option<&'a ScanRef>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fare: Option<Fare>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bill_ref: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credit: Option<&'a CreditRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_event_id: Option<&'a str>,
}

impl RecordView<'_> {
    /// The record as the journal stores it (JSON), written into a buffer
    /// sized for a typical record, so that it does not grow on the way
    /// (serde_json's `to_vec` starts at 128 bytes and doubles).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RECORD_BYTES_TYPICAL);
        serde_json::to_writer(&mut v, self).expect("a decision record always serializes");
        v
    }
}

/// What a record's buffer starts with: a transit approval with its fare
/// is some 400 bytes.
const RECORD_BYTES_TYPICAL: usize = 512;

/// A blank record, for filling in with struct update syntax: every field a
/// decision does not set stays empty (`kind` tap, `reason` OK, `decision`
/// empty; a record is never written without its decision).
impl Default for DecisionRecord {
    fn default() -> Self {
        DecisionRecord {
            at_ms: 0,
            terminal: String::new(),
            event_id: String::new(),
            auth_id: String::new(),
            kind: crate::model::EventKind::Tap,
            card_no: StoredCardNo::default(),
            scenario: None,
            amount_fen: None,
            decision: String::new(),
            reason: crate::model::Reason::Ok,
            charged_fen: 0,
            site: None,
            occurred_at: None,
            reverses: None,
            scan: None,
            offline: false,
            fare: None,
            bill_ref: None,
            credit: None,
            split: None,
            hold_event_id: None,
        }
    }
}

/// What a credit pays: a disbursement batch's record and its programme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditRef {
    pub batch_id: String,
    pub record_id: String,
    pub programme: String,
    /// A wages programme's project and month (`YYYY-MM`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub month: Option<String>,
}

/// What a scan spent, kept in its journal record so that the replay cache
/// can be rebuilt after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRef {
    /// The credential id (`sub`), never the card number.
    pub sub: String,
    pub jti: String,
    /// Until when the code is remembered (its `exp` plus the skew).
    pub forget_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_field() -> DecisionRecord {
        DecisionRecord {
            at_ms: 1_764_316_000_000,
            terminal: "bus-0042".into(),
            event_id: "e-1".into(),
            auth_id: "0000000100000000002a".into(),
            kind: EventKind::Scan,
            card_no: "500118A12345678".into(),
            scenario: Some(Scenario::Medical),
            amount_fen: Some(1_000),
            decision: "approve".into(),
            reason: Reason::Ok,
            charged_fen: 900,
            site: Some("h-1".into()),
            occurred_at: Some("2026-11-28T07:45:12Z".into()),
            reverses: Some("00000001000000000001".into()),
            scan: Some(ScanRef {
                sub: "cred-1".into(),
                jti: "j-1".into(),
                forget_at: 5,
            }),
            offline: true,
            fare: Some(Fare {
                base_fen: 1_000,
                charged_fen: 900,
                transfer_off_fen: 100,
                ..Fare::default()
            }),
            bill_ref: Some("B-1".into()),
            credit: Some(CreditRef {
                batch_id: "b".into(),
                record_id: "r".into(),
                programme: "p".into(),
                project: None,
                month: Some("2026-11".into()),
            }),
            split: Some(Split {
                insurance_fen: 600,
                self_pay_fen: 300,
                deductible_fen: 100,
            }),
            hold_event_id: Some("h-e".into()),
        }
    }

    #[test]
    fn a_record_written_through_its_view_reads_back_the_same() {
        let full = every_field();
        let empty = DecisionRecord {
            decision: "reverse".into(),
            ..DecisionRecord::default()
        };
        for record in [full, empty] {
            let back: DecisionRecord = serde_json::from_slice(&record.to_json()).unwrap();
            assert_eq!(back, record);
            assert_eq!(serde_json::to_vec(&record).unwrap(), record.to_json());
        }
    }

    /// The stored form of a plain transit approval, byte for byte: records
    /// written before the view existed read alike, and a change to the
    /// view that would write them otherwise fails here.
    #[test]
    fn a_transit_approval_is_stored_as_before() {
        let record = DecisionRecord {
            at_ms: 1,
            terminal: "bus-0042".into(),
            event_id: "e-1".into(),
            auth_id: "a-1".into(),
            card_no: "500118A12345678".into(),
            scenario: Some(Scenario::Transit),
            amount_fen: Some(200),
            decision: "approve".into(),
            charged_fen: 200,
            site: Some("line-12".into()),
            fare: Some(Fare {
                base_fen: 200,
                charged_fen: 200,
                ..Fare::default()
            }),
            ..DecisionRecord::default()
        };
        assert_eq!(
            String::from_utf8(record.to_json()).unwrap(),
            r#"{"at_ms":1,"terminal":"bus-0042","event_id":"e-1","auth_id":"a-1","kind":"tap","card_no":"500118A12345678","scenario":"transit","amount_fen":200,"decision":"approve","reason":"OK","charged_fen":200,"site":"line-12","fare":{"base_fen":200,"charged_fen":200}}"#
        );
    }
}
