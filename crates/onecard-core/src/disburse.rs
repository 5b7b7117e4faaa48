//! Disbursements, the pure part: a batch's body (NDJSON or CSV) parsed
//! into records, the rules a record must pass to be credited, and the
//! assessment of a whole batch into a report and its credits. The gateway
//! looks cards up and journals the credits (`service::disburse`).
//!
//! A record is accepted only if a configured settlement sink takes its
//! credit (asked with the sink's own `takes`), so nothing is journaled
//! that no one would pay. Within a batch, a second record paying the same
//! card for the same programme (wages: the same project and month) is
//! refused `DUPLICATE_CARD`; a wage whose project and month already paid
//! the worker's card chain in an earlier batch `ALREADY_PAID`.
//!
//! Never: echo a card number or a personal-ID hash in a message (report
//! cards are masked), or take a body or batch without a bound.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::authz::Listing;
use crate::model::{Card, CardNo, CardStatus, EventKind, Function, Reason, Scenario};
use crate::record::{CreditRef, DecisionRecord};
use crate::scenario::region::{self, Origin};
use crate::settle::batch::Rules as SinkRules;
use crate::wire::{self, Invalid};

/// One upload's body at most: 10,000 records of about 150 bytes fit many
/// times over.
pub const BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// One line at most.
pub const LINE_BYTES_MAX: usize = 1024;
/// `batch_id`: 1 to this many of `A-Za-z0-9._-`. No `:`: a credit's event
/// id is `<batch_id>:<record_id>`, and only a batch id without one makes
/// its first `:` the boundary (`a:b` + `c` and `a` + `b:c` would meet).
pub const BATCH_ID_LEN_MAX: usize = 24;
/// `record_id`: 1 to this many of `A-Za-z0-9._:-`. With the batch id and
/// the `:` between them a credit's event id keeps within an event id's 64
/// characters (`wire::EVENT_ID_LEN_MAX`, API.md); record ids get the larger
/// share because they come from payroll exports (a UUID is 36), batch ids
/// are the operator's own choice.
pub const RECORD_ID_LEN_MAX: usize = 39;
const _: () = assert!(BATCH_ID_LEN_MAX + 1 + RECORD_ID_LEN_MAX <= wire::EVENT_ID_LEN_MAX);
/// `project`: 1 to this many of `A-Za-z0-9._:-`.
pub const PROJECT_LEN_MAX: usize = 64;
/// The terminal of every credit's journal record. `@` is outside the
/// terminal-id alphabet, so no certificate can name it: a credit's
/// (terminal, event_id) never meets a terminal's.
pub const TERMINAL: &str = "@disburse";
/// Workers on one project's roster at most.
pub const ROSTER_WORKERS_MAX: usize = 10_000;
/// A roster body at most (10,000 card numbers of up to 32 characters).
pub const ROSTER_BODY_BYTES_MAX: usize = 512 * 1024;

/// The columns of a CSV batch (and fields of an NDJSON line).
pub const COLUMNS: &[&str] = &[
    "record_id",
    "card_no",
    "id_hash",
    "amount_fen",
    "programme",
    "project",
    "month",
];

// ---------------------------------------------------------------------------
// Programmes (the config's `[disbursement.programmes.<name>]`)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgrammeKind {
    /// A grant or subsidy: per card, no project.
    Subsidy,
    /// Wages: each record names its project and month, and is indexed for
    /// the unpaid-workers view.
    Wages,
}

/// One programme's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Programme {
    pub kind: ProgrammeKind,
    /// The largest single credit (`LIMIT_EXCEEDED` above it).
    pub amount_max_fen: i64,
}

pub type Programmes = BTreeMap<String, Programme>;

/// A programme name: 1 to 32 of `a-z0-9_`.
pub fn valid_programme_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// 1 to `max` of `A-Za-z0-9._:-` (the event-id alphabet).
pub fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A batch id: 1 to [`BATCH_ID_LEN_MAX`] of `A-Za-z0-9._-`.
pub fn valid_batch_id(s: &str) -> bool {
    valid_id(s, BATCH_ID_LEN_MAX) && !s.contains(':')
}

/// A credit's event id: unambiguous because a batch id has no `:`.
pub fn credit_event_id(batch_id: &str, record_id: &str) -> String {
    assert!(valid_batch_id(batch_id) && valid_id(record_id, RECORD_ID_LEN_MAX));
    format!("{batch_id}:{record_id}")
}

/// `YYYY-MM`, month 01 to 12.
pub fn valid_month(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && matches!(s[5..].parse::<u8>(), Ok(1..=12))
        && b[5..].iter().all(u8::is_ascii_digit)
}

/// A personal-ID hash as `privacy::id_hash` writes it: 64 lower-case hex.
pub fn valid_id_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// The body's format, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Csv,
}

impl Format {
    /// `application/x-ndjson` or `application/json` (JSON lines), or
    /// `text/csv`; parameters (`; charset=utf-8`) are ignored.
    pub fn from_content_type(ct: &str) -> Option<(Format, &'static str)> {
        let essence = ct.split(';').next().unwrap_or("").trim();
        [
            ("application/x-ndjson", Format::Ndjson),
            ("application/json", Format::Ndjson),
            ("text/csv", Format::Csv),
        ]
        .into_iter()
        .find(|(m, _)| essence.eq_ignore_ascii_case(m))
        .map(|(m, f)| (f, m))
    }

    fn tag(self) -> u8 {
        match self {
            Format::Ndjson => b'j',
            Format::Csv => b'c',
        }
    }
}

/// Whom a record pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Card(CardNo),
    /// The holder's keyed personal-ID hash: paid to their current card.
    Holder(String),
}

/// A well-formed record (not yet checked against cards and programmes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line in the body.
    pub line: u64,
    pub record_id: String,
    pub target: Target,
    pub amount_fen: i64,
    pub programme: String,
    pub project: Option<String>,
    pub month: Option<String>,
}

/// A line that is not a record: where, which record if that much was
/// readable, and why (never quoting a card number or ID hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: u64,
    pub record_id: Option<String>,
    pub message: String,
}

pub type Parsed = Result<Record, BadLine>;

/// The non-blank lines of a body with their 1-based numbers (a trailing
/// `\r` dropped, and a UTF-8 byte-order mark at the start, as spreadsheet
/// programs write CSV).
fn lines(body: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
}

/// Why a whole body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Malformed as a whole: the message says where and why.
    #[error("{0}")]
    Invalid(String),
    /// More than a bound allows.
    #[error("{0}")]
    TooLarge(String),
}

impl BodyError {
    fn invalid(message: impl Into<String>) -> BodyError {
        BodyError::Invalid(message.into())
    }
}

impl From<Invalid> for BodyError {
    fn from(e: Invalid) -> BodyError {
        BodyError::Invalid(e.0)
    }
}

fn too_many(records_max: usize) -> BodyError {
    BodyError::TooLarge(format!(
        "the batch has more than {records_max} records; split it into several batches"
    ))
}

/// Parses a whole body into records and bad lines, in body order. Errors of
/// the whole body (no CSV header, an unknown or repeated column, more than
/// `records_max` records, not one well-formed record) refuse the batch.
pub fn parse(format: Format, body: &[u8], records_max: usize) -> Result<Vec<Parsed>, BodyError> {
    let mut out = Vec::new();
    let mut lines = lines(body).peekable();
    // A JSON array (pretty-printed, its last element alone on a line)
    // could pass for a line or two of records: refused whole.
    let array = lines
        .peek()
        .is_some_and(|(_, l)| l.trim_ascii_start().starts_with(b"["));
    if format == Format::Ndjson && array {
        return Err(BodyError::invalid(
            "an NDJSON batch is one JSON object per line, and this body is a JSON array; \
             send its elements one per line",
        ));
    }
    let header = match format {
        Format::Ndjson => None,
        Format::Csv => {
            let (n, h) = lines.next().ok_or_else(|| {
                BodyError::invalid(format!(
                    "a CSV batch starts with a header line naming its columns: {}",
                    COLUMNS.join(",")
                ))
            })?;
            Some(csv_header(n, h)?)
        }
    };
    for (n, line) in lines {
        if out.len() == records_max {
            return Err(too_many(records_max));
        }
        let fields = match &header {
            None => ndjson_fields(line),
            Some(columns) => csv_fields(columns, line),
        };
        out.push(
            fields
                .and_then(|f| record(n, f))
                .map_err(|(id, message)| BadLine {
                    line: n,
                    record_id: id,
                    message,
                }),
        );
    }
    // A body without one well-formed record (empty, a JSON array, the
    // wrong file) is refused whole: a stored report of nothing but bad
    // lines would only use up the batch id.
    if !out.iter().any(Result::is_ok) {
        return Err(match out.iter().find_map(|p| p.as_ref().err()) {
            None => BodyError::invalid("the batch holds no records; nothing was recorded"),
            Some(bad) => BodyError::invalid(format!(
                "no line of the batch is a well-formed record, so nothing was recorded \
                 (line {}: {})",
                bad.line, bad.message
            )),
        });
    }
    Ok(out)
}

/// A line's fields by name; absent or empty ones left out.
type Fields = BTreeMap<&'static str, FieldValue>;

#[derive(Debug)]
enum FieldValue {
    Text(String),
    /// A JSON number (NDJSON only; CSV amounts are text).
    Number(serde_json::Number),
}

type LineError = (Option<String>, String);

fn csv_header(n: u64, line: &[u8]) -> Result<Vec<&'static str>, BodyError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| BodyError::invalid(format!("line {n}: the CSV header is not UTF-8")))?;
    let mut columns: Vec<&'static str> = Vec::new();
    for (i, name) in text.split(',').enumerate() {
        let name = unquote(name.trim()).unwrap_or("");
        let Some(c) = COLUMNS.iter().copied().find(|c| *c == name) else {
            return Err(BodyError::invalid(format!(
                "line {n}: column {} of the CSV header is {}; the columns are {}",
                i + 1,
                if name.is_empty() {
                    "empty".to_owned()
                } else {
                    wire::describe_unknown_field(name).replace("field", "column")
                },
                COLUMNS.join(",")
            )));
        };
        if columns.contains(&c) {
            return Err(BodyError::invalid(format!(
                "line {n}: the CSV header names `{c}` twice"
            )));
        }
        columns.push(c);
    }
    for needed in ["record_id", "amount_fen", "programme"] {
        if !columns.contains(&needed) {
            return Err(BodyError::invalid(format!(
                "line {n}: the CSV header has no `{needed}` column"
            )));
        }
    }
    if !columns.contains(&"card_no") && !columns.contains(&"id_hash") {
        return Err(BodyError::invalid(format!(
            "line {n}: the CSV header needs a `card_no` or an `id_hash` column"
        )));
    }
    Ok(columns)
}

/// A field as written, or inside one pair of double quotes (as spreadsheet
/// programs quote); `None` for a quote anywhere else: no field of a record
/// needs one.
fn unquote(s: &str) -> Option<&str> {
    let inner = match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => inner,
        None => s,
    };
    (!inner.contains('"')).then_some(inner)
}

fn csv_fields(columns: &[&'static str], line: &[u8]) -> Result<Fields, LineError> {
    if line.len() > LINE_BYTES_MAX {
        return Err((
            None,
            format!("the line is longer than {LINE_BYTES_MAX} bytes"),
        ));
    }
    let text = std::str::from_utf8(line).map_err(|_| (None, "the line is not UTF-8".to_owned()))?;
    let values: Vec<&str> = text.split(',').collect();
    // The record id, if it can be read, names the line in the report.
    let id = columns
        .iter()
        .position(|c| *c == "record_id")
        .and_then(|i| values.get(i))
        .and_then(|v| unquote(v.trim()))
        .filter(|v| valid_id(v, RECORD_ID_LEN_MAX))
        .map(str::to_owned);
    if values.len() != columns.len() {
        return Err((
            id,
            format!(
                "the line has {} fields; the header names {}",
                values.len(),
                columns.len()
            ),
        ));
    }
    let mut fields = Fields::new();
    for (c, v) in columns.iter().zip(values) {
        let v = unquote(v.trim())
            .ok_or_else(|| (id.clone(), format!("`{c}` has a stray double quote")))?;
        if !v.is_empty() {
            fields.insert(c, FieldValue::Text(v.to_owned()));
        }
    }
    Ok(fields)
}

fn ndjson_fields(line: &[u8]) -> Result<Fields, LineError> {
    if line.len() > LINE_BYTES_MAX {
        return Err((
            None,
            format!("the line is longer than {LINE_BYTES_MAX} bytes"),
        ));
    }
    let m: Map<String, Value> = wire::parse_object(line).map_err(|e| (None, e.0))?;
    let id = m
        .get("record_id")
        .and_then(Value::as_str)
        .filter(|v| valid_id(v, RECORD_ID_LEN_MAX))
        .map(str::to_owned);
    if let Some(c) = repeated_column(line) {
        // With `record_id` itself repeated, which one names the line is
        // anyone's guess: none does.
        let id = if c == "record_id" { None } else { id };
        return Err((id, format!("`{c}` is given twice in the line")));
    }
    wire::reject_unknown(&m, COLUMNS).map_err(|e| (id.clone(), e.0))?;
    let mut fields = Fields::new();
    for (k, v) in m {
        let c = COLUMNS
            .iter()
            .copied()
            .find(|c| *c == k)
            .expect("unknown fields were refused above");
        let v = match v {
            Value::Null => continue,
            Value::String(s) if s.is_empty() => continue,
            Value::String(s) => FieldValue::Text(s),
            Value::Number(n) if c == "amount_fen" => FieldValue::Number(n),
            _ if c == "amount_fen" => {
                return Err((id, "`amount_fen` must be an integer number of fen".into()))
            }
            _ => return Err((id, format!("`{c}` must be a string"))),
        };
        fields.insert(c, v);
    }
    Ok(fields)
}

/// The first field of [`COLUMNS`] a JSON line names twice. `serde_json`
/// keeps the last of repeated keys without a word, so a line such as
/// `{"amount_fen": 100, …, "amount_fen": 900000}` would pay what a reader
/// of its start does not see. A second pass over the line (at most
/// [`LINE_BYTES_MAX`] bytes), keys only; unknown names are left to
/// `reject_unknown`.
fn repeated_column(line: &[u8]) -> Option<&'static str> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Repeated(Option<&'static str>);
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Repeated;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Repeated, A::Error> {
            let mut seen = [false; COLUMNS.len()];
            let mut first = None;
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<IgnoredAny>()?;
                if let Some(i) = COLUMNS.iter().position(|c| *c == k) {
                    if std::mem::replace(&mut seen[i], true) {
                        first = first.or(Some(COLUMNS[i]));
                    }
                }
            }
            Ok(Repeated(first))
        }
    }
    impl<'de> Deserialize<'de> for Repeated {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Keys)
        }
    }
    serde_json::from_slice::<Repeated>(line)
        .ok()
        .and_then(|r| r.0)
}

/// Builds a record from its fields: every rule of form, none of the card's
/// or programme's. Messages name the field and the rule, never the value.
fn record(line: u64, mut f: Fields) -> Result<Record, LineError> {
    let mut text = |name: &str| match f.remove(name) {
        None => Ok(None),
        Some(FieldValue::Text(s)) => Ok(Some(s)),
        Some(FieldValue::Number(_)) => Err(format!("`{name}` must be a string")),
    };
    let record_id = text("record_id").map_err(|m| (None, m))?;
    let record_id = match record_id {
        None => return Err((None, "missing field `record_id`".into())),
        Some(r) if !valid_id(&r, RECORD_ID_LEN_MAX) => {
            return Err((
                None,
                format!("`record_id` must be 1 to {RECORD_ID_LEN_MAX} of A-Za-z0-9._:-"),
            ))
        }
        Some(r) => r,
    };
    let id = Some(record_id.clone());
    let bad = |m: String| (id.clone(), m);
    let card_no = text("card_no").map_err(bad)?;
    let id_hash = text("id_hash").map_err(bad)?;
    let programme = text("programme").map_err(bad)?;
    let project = text("project").map_err(bad)?;
    let month = text("month").map_err(bad)?;
    let target =
        match (card_no, id_hash) {
            (Some(c), None) => {
                Target::Card(CardNo::parse(&c).map_err(|e| bad(format!("`card_no` {e}")))?)
            }
            (None, Some(h)) if valid_id_hash(&h) => Target::Holder(h),
            (None, Some(_)) => return Err(bad(
                "`id_hash` must be 64 lower-case hex digits (the keyed hash of the personal ID)"
                    .into(),
            )),
            (None, None) => return Err(bad("one of `card_no` and `id_hash` is required".into())),
            (Some(_), Some(_)) => {
                return Err(bad("give one of `card_no` and `id_hash`, not both".into()))
            }
        };
    let amount_fen = match f.remove("amount_fen") {
        None => return Err(bad("missing field `amount_fen`".into())),
        Some(FieldValue::Number(n)) => n.as_i64(),
        Some(FieldValue::Text(s)) => s.parse::<i64>().ok().filter(|_| {
            // Plain digits only: no sign, no decimal point, no exponent.
            s.bytes().all(|b| b.is_ascii_digit())
        }),
    };
    let amount_fen = amount_fen
        .filter(|a| (1..=wire::AMOUNT_FEN_MAX).contains(a))
        .ok_or_else(|| {
            bad(format!(
                "`amount_fen` must be an integer number of fen from 1 to {}",
                wire::AMOUNT_FEN_MAX
            ))
        })?;
    let programme = programme.ok_or_else(|| bad("missing field `programme`".into()))?;
    if !valid_programme_name(&programme) {
        return Err(bad("`programme` must be 1 to 32 of a-z, 0-9 and _".into()));
    }
    if project
        .as_deref()
        .is_some_and(|p| !valid_id(p, PROJECT_LEN_MAX))
    {
        return Err(bad(format!(
            "`project` must be 1 to {PROJECT_LEN_MAX} of A-Za-z0-9._:-"
        )));
    }
    if month.as_deref().is_some_and(|m| !valid_month(m)) {
        return Err(bad("`month` must be a month such as 2026-11".into()));
    }
    Ok(Record {
        line,
        record_id,
        target,
        amount_fen,
        programme,
        project,
        month,
    })
}

// ---------------------------------------------------------------------------
// The rules
// ---------------------------------------------------------------------------

/// Why a card's issuing region refuses a credit (`REGION_NOT_ACCEPTED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionRefusal {
    /// Neither home nor a partner: no agreement covers the card.
    NoAgreement,
    /// A partner whose agreement does not cover payments.
    NotCovered,
    /// No configured settlement sink would take the credit, so it would
    /// sit in the journal unpaid (a partner's card without a payment sink
    /// naming the partner).
    NoSink,
}

/// Why a record is refused. Each has a stable code (all in [`CODES`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    BadLine(String),
    DuplicateRecord,
    /// An earlier accepted record of this batch (its `record_id`) pays the
    /// same card for the same thing (see [`Payee`]).
    DuplicateCard {
        earlier: String,
        wages: bool,
    },
    /// A wage of the record's project and month was credited to the
    /// worker's card, or to a card of its replacement chain, by an
    /// earlier batch: that credit's event id.
    AlreadyPaid {
        event_id: String,
    },
    UnknownProgramme,
    ProjectRequired,
    MonthRequired,
    LimitExceeded {
        amount_max_fen: i64,
    },
    CardNotFound,
    /// No card is registered to the ID hash.
    HolderNotFound,
    Region(RegionRefusal),
    /// On the deny list of the card's (partner) issuing region.
    PartnerDenylisted,
    Card(Reason),
}

/// Every code a record's outcome may carry (documented in
/// `docs/openapi.json` as `DisbursementCode`).
pub const CODES: &[&str] = &[
    "BAD_LINE",
    "DUPLICATE_RECORD",
    "DUPLICATE_CARD",
    "ALREADY_PAID",
    "UNKNOWN_PROGRAMME",
    "PROJECT_REQUIRED",
    "MONTH_REQUIRED",
    "LIMIT_EXCEEDED",
    "CARD_NOT_FOUND",
    "CARD_LOST",
    "CARD_FROZEN",
    "CARD_CANCELLED",
    "DENYLISTED",
    "FUNCTION_NOT_ENABLED",
    "REGION_NOT_ACCEPTED",
];

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadLine(_) => "BAD_LINE",
            Refusal::DuplicateRecord => "DUPLICATE_RECORD",
            Refusal::DuplicateCard { .. } => "DUPLICATE_CARD",
            Refusal::AlreadyPaid { .. } => "ALREADY_PAID",
            Refusal::UnknownProgramme => "UNKNOWN_PROGRAMME",
            Refusal::ProjectRequired => "PROJECT_REQUIRED",
            Refusal::MonthRequired => "MONTH_REQUIRED",
            Refusal::LimitExceeded { .. } => Reason::LimitExceeded.code(),
            Refusal::CardNotFound | Refusal::HolderNotFound => Reason::CardNotFound.code(),
            Refusal::Region(_) => Reason::RegionNotAccepted.code(),
            Refusal::PartnerDenylisted => Reason::Denylisted.code(),
            Refusal::Card(r) => r.code(),
        }
    }

    /// Names rules and the batch's own ids, never a card number or hash.
    pub fn message(&self) -> String {
        match self {
            Refusal::BadLine(m) => m.clone(),
            Refusal::DuplicateRecord => {
                "the record_id was used by an earlier line of this batch".into()
            }
            Refusal::DuplicateCard {
                earlier,
                wages: true,
            } => format!(
                "record `{earlier}` of this batch already pays this card a wage of the same \
                 project and month"
            ),
            Refusal::DuplicateCard {
                earlier,
                wages: false,
            } => format!(
                "record `{earlier}` of this batch already pays this card under the same \
                 programme (and month, if named)"
            ),
            Refusal::AlreadyPaid { event_id } => format!(
                "a wage of this project and month was already credited to this worker's card \
                 (or a card it replaced or was replaced by), as credit `{event_id}`"
            ),
            Refusal::UnknownProgramme => "no such programme is configured".into(),
            Refusal::ProjectRequired => "a wages programme's record names its `project`".into(),
            Refusal::MonthRequired => "a wages programme's record names its `month`".into(),
            Refusal::LimitExceeded { amount_max_fen } => {
                format!("the amount is above the programme's maximum of {amount_max_fen} fen")
            }
            Refusal::CardNotFound => "the card is not known".into(),
            Refusal::HolderNotFound => "no card is registered to that personal-ID hash".into(),
            Refusal::Region(RegionRefusal::NoAgreement) => {
                "the card's issuing region has no agreement with this gateway".into()
            }
            Refusal::Region(RegionRefusal::NotCovered) => {
                "the agreement with the card's issuing region does not cover payments".into()
            }
            Refusal::Region(RegionRefusal::NoSink) => {
                "no settlement sink pays credits to cards of this issuing region".into()
            }
            Refusal::PartnerDenylisted => "the card is on its issuing region's deny list".into(),
            Refusal::Card(Reason::CardLost) => "the card is reported lost".into(),
            Refusal::Card(Reason::CardFrozen) => "the card is frozen".into(),
            Refusal::Card(Reason::CardCancelled) => "the card is cancelled".into(),
            Refusal::Card(Reason::Denylisted) => "the card is on the deny list".into(),
            Refusal::Card(Reason::FunctionNotEnabled) => {
                "the card's financial account (function `financial`) is not enabled".into()
            }
            Refusal::Card(r) => format!("refused: {}", r.code()),
        }
    }
}

/// What the checks need besides a record and what was found of its card:
/// the programmes, the regions as `authz` sees them, and each settlement
/// sink's routing (the rules its delivery task settles by).
pub struct Rules<'a> {
    pub programmes: &'a Programmes,
    pub regions: &'a region::Rules,
    pub sinks: &'a [SinkRules],
}

/// The wages programme's project and month of a record (`None` for a
/// subsidy, and for a wages record lacking them, which `check` refuses).
pub fn wage_of<'r>(r: &'r Record, programmes: &Programmes) -> Option<(&'r str, &'r str)> {
    let wages = programmes
        .get(&r.programme)
        .is_some_and(|p| p.kind == ProgrammeKind::Wages);
    match (wages, &r.project, &r.month) {
        (true, Some(project), Some(month)) => Some((project, month)),
        _ => None,
    }
}

/// Checks one well-formed record. The programme's rules come first (they
/// are the uploader's to fix whatever the card), then the card as a tap
/// of the payment scenario sees it (`authz::decide`'s order): an
/// operator's deny entry, a stopped card's status, a card-life deny
/// entry, the issuing region (a partner's: the agreement covering
/// payments, the partner's deny list), existence, the `financial` function
/// (a home card's; a partner's functions are the partner's, and the
/// agreement stands for them). Then what a tap does not need: a sink that
/// settles the credit, and no wage of the same project and month paid
/// before. Unlike a tap, a partner's card must be known here: money paid
/// to a mistyped number is not taken back.
pub fn check(r: &Record, found: &Found, rules: &Rules<'_>) -> Result<(), Refusal> {
    let p = rules
        .programmes
        .get(&r.programme)
        .ok_or(Refusal::UnknownProgramme)?;
    if p.kind == ProgrammeKind::Wages {
        if r.project.is_none() {
            return Err(Refusal::ProjectRequired);
        }
        if r.month.is_none() {
            return Err(Refusal::MonthRequired);
        }
    }
    if r.amount_fen > p.amount_max_fen {
        return Err(Refusal::LimitExceeded {
            amount_max_fen: p.amount_max_fen,
        });
    }
    if found.listing == Listing::Operator {
        return Err(Refusal::Card(Reason::Denylisted));
    }
    match found.card.map(|c| c.status) {
        Some(CardStatus::Lost) => return Err(Refusal::Card(Reason::CardLost)),
        Some(CardStatus::Frozen) => return Err(Refusal::Card(Reason::CardFrozen)),
        Some(CardStatus::Cancelled) => return Err(Refusal::Card(Reason::CardCancelled)),
        Some(CardStatus::Active) | None => {}
    }
    if found.listing == Listing::CardLife {
        return Err(Refusal::Card(Reason::Denylisted));
    }
    let not_found = match r.target {
        Target::Card(_) => Refusal::CardNotFound,
        Target::Holder(_) => Refusal::HolderNotFound,
    };
    let Some(card_no) = &found.card_no else {
        return Err(not_found);
    };
    let origin = rules.regions.origin(card_no);
    match origin {
        Origin::Foreign => return Err(Refusal::Region(RegionRefusal::NoAgreement)),
        Origin::Partner(p) if !rules.regions.covers(p, Scenario::Payment) => {
            return Err(Refusal::Region(RegionRefusal::NotCovered))
        }
        Origin::Partner(_) if found.partner_listed => return Err(Refusal::PartnerDenylisted),
        Origin::Partner(_) | Origin::Home => {}
    }
    let card = found.card.as_ref().ok_or(not_found)?;
    if origin == Origin::Home && !card.has_function(Function::Financial) {
        return Err(Refusal::Card(Reason::FunctionNotEnabled));
    }
    // The record settlement will read, asked of each sink's own rule.
    let probe = credit_record(String::new(), "", r, card_no, String::new(), 0);
    if !rules.sinks.iter().any(|s| s.takes(&probe)) {
        return Err(Refusal::Region(RegionRefusal::NoSink));
    }
    if let Some(event_id) = &found.paid_before {
        return Err(Refusal::AlreadyPaid {
            event_id: event_id.clone(),
        });
    }
    Ok(())
}

/// What a look-up found for a record: the card it pays (for a holder,
/// their current card; `None` when unknown), its state, its deny-list
/// standing, and for a wages record an earlier wage of the same project
/// and month on its replacement chain.
#[derive(Debug, Clone)]
pub struct Found {
    pub card_no: Option<CardNo>,
    pub card: Option<Card>,
    pub listing: Listing,
    /// Whether the card's partner region lists it on its own deny list.
    pub partner_listed: bool,
    /// The event id of a wage already credited for the record's project
    /// and month to the card or a card of its replacement chain.
    pub paid_before: Option<String>,
}

impl Found {
    /// Nothing known: no card, no listing.
    pub fn nothing() -> Found {
        Found {
            card_no: None,
            card: None,
            listing: Listing::No,
            partner_listed: false,
            paid_before: None,
        }
    }
}

/// What a record pays, to find a second record of a batch paying the
/// same: the card and, for a subsidy, the programme and the month if one
/// is named (a grant's arrears for two months may share a batch); for
/// wages the project and month, whichever wages programme (the wage index
/// and the unpaid view count by project and month too).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Payee {
    Grant {
        card: CardNo,
        programme: String,
        month: Option<String>,
    },
    Wage {
        card: CardNo,
        project: String,
        month: String,
    },
}

impl Payee {
    fn of(r: &Record, card: &CardNo, programmes: &Programmes) -> Payee {
        match wage_of(r, programmes) {
            Some((project, month)) => Payee::Wage {
                card: card.clone(),
                project: project.to_owned(),
                month: month.to_owned(),
            },
            None => Payee::Grant {
                card: card.clone(),
                programme: r.programme.clone(),
                month: r.month.clone(),
            },
        }
    }
}

/// One record's line in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub record_id: Option<String>,
    pub line: u64,
    /// `accepted` or `rejected`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Masked (first six and last four characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_fen: Option<i64>,
}

/// An accepted record and the card it pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    pub record: Record,
    pub card_no: CardNo,
}

/// The report of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub batch_id: String,
    pub records: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub accepted_fen: i64,
    pub outcomes: Vec<Outcome>,
}

/// Checks every parsed record in order: a record id seen on an earlier line
/// is refused `DUPLICATE_RECORD` (the first stands, whatever its outcome),
/// the others go through [`check`] with what `find` says of them, and one
/// that passes is refused `DUPLICATE_CARD` when an earlier accepted record
/// pays its [`Payee`]. An error of `find` (the store cannot be read)
/// aborts the whole batch: it is an operating failure, not a record's
/// outcome, and must not be stored as one.
pub fn assess<E>(
    batch_id: &str,
    parsed: Vec<Parsed>,
    rules: &Rules<'_>,
    mut find: impl FnMut(&Record) -> Result<Found, E>,
) -> Result<(Report, Vec<Credit>), E> {
    let mut report = Report {
        batch_id: batch_id.to_owned(),
        records: parsed.len() as u64,
        accepted: 0,
        rejected: 0,
        accepted_fen: 0,
        outcomes: Vec::with_capacity(parsed.len()),
    };
    let mut credits = Vec::new();
    let mut seen: HashSet<String> = HashSet::with_capacity(parsed.len());
    // Each accepted record's payee and record id: bounded by the batch.
    let mut paid: HashMap<Payee, String> = HashMap::with_capacity(parsed.len());
    for p in parsed {
        let (record, refusal, card_no) = match p {
            Err(bad) => {
                // A bad line's record id, if readable, still takes its
                // place: a later line reusing it is a duplicate.
                if let Some(id) = &bad.record_id {
                    seen.insert(id.clone());
                }
                report.rejected += 1;
                report.outcomes.push(Outcome {
                    record_id: bad.record_id,
                    line: bad.line,
                    outcome: "rejected",
                    code: Some(Refusal::BadLine(String::new()).code()),
                    message: Some(format!("line {}: {}", bad.line, bad.message)),
                    card: None,
                    amount_fen: None,
                });
                continue;
            }
            Ok(r) if !seen.insert(r.record_id.clone()) => {
                let card = match &r.target {
                    Target::Card(c) => Some(c.clone()),
                    Target::Holder(_) => None,
                };
                (r, Some(Refusal::DuplicateRecord), card)
            }
            Ok(r) => {
                let found = find(&r)?;
                let mut verdict = check(&r, &found, rules);
                if let (Ok(()), Some(card_no)) = (&verdict, &found.card_no) {
                    let payee = Payee::of(&r, card_no, rules.programmes);
                    let wages = matches!(payee, Payee::Wage { .. });
                    match paid.entry(payee) {
                        Entry::Occupied(e) => {
                            verdict = Err(Refusal::DuplicateCard {
                                earlier: e.get().clone(),
                                wages,
                            })
                        }
                        Entry::Vacant(e) => {
                            e.insert(r.record_id.clone());
                        }
                    }
                }
                (r, verdict.err(), found.card_no)
            }
        };
        let outcome = Outcome {
            record_id: Some(record.record_id.clone()),
            line: record.line,
            outcome: if refusal.is_none() {
                "accepted"
            } else {
                "rejected"
            },
            code: refusal.as_ref().map(Refusal::code),
            message: refusal.as_ref().map(Refusal::message),
            card: card_no.as_ref().map(CardNo::masked),
            amount_fen: Some(record.amount_fen),
        };
        report.outcomes.push(outcome);
        match (refusal, card_no) {
            (None, Some(card_no)) => {
                report.accepted += 1;
                report.accepted_fen += record.amount_fen;
                credits.push(Credit { record, card_no });
            }
            _ => report.rejected += 1,
        }
    }
    Ok((report, credits))
}

/// A credit's journal record: what settlement reads (and what [`check`]
/// asks each sink's rule about before accepting the record).
pub fn credit_record(
    event_id: String,
    batch_id: &str,
    r: &Record,
    card_no: &CardNo,
    auth_id: String,
    at_ms: i64,
) -> DecisionRecord {
    DecisionRecord {
        at_ms,
        terminal: TERMINAL.to_owned(),
        event_id,
        auth_id,
        // A credit presents no card; `tap` (a card number given as such)
        // is the nearest kind, and `decision` tells them apart.
        kind: EventKind::Tap,
        card_no: card_no.into(),
        scenario: Some(Scenario::Payment),
        amount_fen: Some(r.amount_fen),
        decision: "credit".to_owned(),
        reason: Reason::Ok,
        charged_fen: r.amount_fen,
        credit: Some(CreditRef {
            batch_id: batch_id.to_owned(),
            record_id: r.record_id.clone(),
            programme: r.programme.clone(),
            project: r.project.clone(),
            month: r.month.clone(),
        }),
        ..DecisionRecord::default()
    }
}

/// The fingerprint of an upload: its format and body.
pub fn fingerprint(format: Format, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([format.tag()]);
    h.update(body);
    h.finalize().into()
}

pub fn check_batch_id(batch_id: &str) -> Result<(), Invalid> {
    if valid_batch_id(batch_id) {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "the batch id in the path must be 1 to {BATCH_ID_LEN_MAX} of A-Za-z0-9._- \
             (no `:`: it separates the batch id from the record id in each credit's event id)"
        )))
    }
}

pub fn check_project(project: &str) -> Result<(), Invalid> {
    if valid_id(project, PROJECT_LEN_MAX) {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "the project in the path must be 1 to {PROJECT_LEN_MAX} of A-Za-z0-9._:-"
        )))
    }
}

/// Parses a roster body `{"workers": ["<card_no>", …]}`: valid card
/// numbers, at most [`ROSTER_WORKERS_MAX`], duplicates kept once, sorted.
pub fn parse_roster(body: &[u8]) -> Result<Vec<CardNo>, BodyError> {
    let m = wire::parse_object(body)?;
    wire::reject_unknown(&m, &["workers"])?;
    let list = match m.get("workers") {
        Some(Value::Array(a)) => a,
        None => return Err(BodyError::invalid("missing field `workers`")),
        Some(_) => {
            return Err(BodyError::invalid(
                "`workers` must be an array of card numbers",
            ))
        }
    };
    if list.len() > ROSTER_WORKERS_MAX {
        return Err(BodyError::TooLarge(format!(
            "a roster holds at most {ROSTER_WORKERS_MAX} workers"
        )));
    }
    let mut out = BTreeSet::new();
    for (i, v) in list.iter().enumerate() {
        let s = v.as_str().ok_or_else(|| {
            BodyError::invalid(format!("`workers[{i}]` must be a card number string"))
        })?;
        out.insert(wire::card_no_field(&format!("workers[{i}]"), s)?);
    }
    Ok(out.into_iter().collect())
}

/// `month=YYYY-MM`, the only query parameter of the unpaid view.
pub fn month_query(query: Option<&str>) -> Result<String, Invalid> {
    let mut month = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("month", v)) if valid_month(v) => month = Some(v.to_owned()),
            Some(("month", _)) => {
                return Err(Invalid::new("`month` must be a month such as 2026-11"))
            }
            _ => {
                return Err(Invalid::new(
                    "unknown query parameter; the unpaid view takes month",
                ))
            }
        }
    }
    month.ok_or_else(|| Invalid::new("the query parameter `month` (YYYY-MM) is required"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Concession;
    use crate::settle::batch::Cards;

    const CARD: &str = "500118D00000001";
    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn programmes() -> Programmes {
        let mut p = Programmes::new();
        p.insert(
            "student_grant".into(),
            Programme {
                kind: ProgrammeKind::Subsidy,
                amount_max_fen: 100_000,
            },
        );
        p.insert(
            "project_wages".into(),
            Programme {
                kind: ProgrammeKind::Wages,
                amount_max_fen: 1_000_000,
            },
        );
        p
    }

    fn rec(programme: &str, fen: i64, project: Option<&str>, month: Option<&str>) -> Record {
        Record {
            line: 1,
            record_id: "r1".into(),
            target: Target::Card(CardNo::parse(CARD).unwrap()),
            amount_fen: fen,
            programme: programme.into(),
            project: project.map(Into::into),
            month: month.map(Into::into),
        }
    }

    fn card(status: CardStatus, financial: bool) -> Card {
        let f: &[Function] = if financial {
            &[Function::Financial, Function::Transit]
        } else {
            &[Function::Transit]
        };
        Card::new(status, f, &[Concession::Student])
    }

    const PARTNER: &str = "510104D00000001";
    const FOREIGN: &str = "110101D00000001";

    /// Home `50`; partners: `sichuan` (`51`, covers payment, has a payment
    /// sink), `guizhou` (`52`, covers payment, no sink), `yunnan` (`53`,
    /// transit only).
    fn regions() -> region::Rules {
        let c: region::RegionsConfig = toml::from_str(
            r#"
            home = ["50"]
            [[partners]]
            name = "sichuan"
            prefixes = ["51"]
            scenarios = ["transit", "payment"]
            [[partners]]
            name = "guizhou"
            prefixes = ["52"]
            scenarios = ["payment"]
            [[partners]]
            name = "yunnan"
            prefixes = ["53"]
            scenarios = ["transit"]
            "#,
        )
        .unwrap();
        region::Rules::from_config(&c).unwrap()
    }

    fn sink(name: &str, scenarios: &[Scenario], cards: Cards) -> SinkRules {
        SinkRules {
            sink: name.into(),
            scenarios: scenarios.to_vec(),
            cards,
            events_max: 10,
            bytes_max: 10_000,
            age_max_ms: 1_000,
            day_offset_minutes: 0,
        }
    }

    /// A home payment sink, Sichuan's payment sink, Guizhou's transit sink.
    fn sinks(regions: &region::Rules) -> Vec<SinkRules> {
        vec![
            sink("payment", &[Scenario::Payment], Cards::of(regions, &[])),
            sink(
                "sichuan",
                &[Scenario::Payment, Scenario::Transit],
                Cards::of(regions, &["sichuan".to_owned()]),
            ),
            sink(
                "guizhou",
                &[Scenario::Transit],
                Cards::of(regions, &["guizhou".to_owned()]),
            ),
        ]
    }

    fn found(card_no: &str, card: Option<Card>, listing: Listing) -> Found {
        Found {
            card_no: Some(CardNo::parse(card_no).unwrap()),
            card,
            listing,
            partner_listed: false,
            paid_before: None,
        }
    }

    fn to(r: &Record, card_no: &str) -> Record {
        Record {
            target: Target::Card(CardNo::parse(card_no).unwrap()),
            ..r.clone()
        }
    }

    #[test]
    fn every_rule_has_its_refusal() {
        use CardStatus::*;
        let ok = card(Active, true);
        let grant = rec("student_grant", 50_000, None, None);
        let wage = rec("project_wages", 800_000, Some("bridge-7"), Some("2026-11"));
        let mut holder = grant.clone();
        holder.target = Target::Holder(HASH.into());
        let home = |c: Option<Card>, l: Listing| found(CARD, c, l);
        let partner = |c: Option<Card>| found(PARTNER, c, Listing::No);
        let mut listed = partner(Some(ok));
        listed.partner_listed = true;
        let mut paid = home(Some(ok), Listing::No);
        paid.paid_before = Some("W-10:w1".into());
        type Case<'a> = (&'a str, Record, Found, Result<(), &'a str>);
        let cases: Vec<Case> = vec![
            (
                "a grant",
                grant.clone(),
                home(Some(ok), Listing::No),
                Ok(()),
            ),
            ("wages", wage.clone(), home(Some(ok), Listing::No), Ok(())),
            (
                "by holder",
                holder.clone(),
                home(Some(ok), Listing::No),
                Ok(()),
            ),
            (
                "at the maximum",
                rec("student_grant", 100_000, None, None),
                home(Some(ok), Listing::No),
                Ok(()),
            ),
            (
                "a subsidy may name a month",
                rec("student_grant", 1, None, Some("2026-09")),
                home(Some(ok), Listing::No),
                Ok(()),
            ),
            (
                "unknown programme",
                rec("moon_grant", 1, None, None),
                home(Some(ok), Listing::No),
                Err("UNKNOWN_PROGRAMME"),
            ),
            (
                "wages without project",
                rec("project_wages", 1, None, Some("2026-11")),
                home(Some(ok), Listing::No),
                Err("PROJECT_REQUIRED"),
            ),
            (
                "wages without month",
                rec("project_wages", 1, Some("bridge-7"), None),
                home(Some(ok), Listing::No),
                Err("MONTH_REQUIRED"),
            ),
            (
                "above the maximum",
                rec("student_grant", 100_001, None, None),
                home(Some(ok), Listing::No),
                Err("LIMIT_EXCEEDED"),
            ),
            (
                "unknown card",
                grant.clone(),
                home(None, Listing::No),
                Err("CARD_NOT_FOUND"),
            ),
            (
                "unknown holder",
                holder.clone(),
                Found::nothing(),
                Err("CARD_NOT_FOUND"),
            ),
            (
                "lost",
                grant.clone(),
                home(Some(card(Lost, true)), Listing::CardLife),
                Err("CARD_LOST"),
            ),
            (
                "frozen",
                grant.clone(),
                home(Some(card(Frozen, true)), Listing::CardLife),
                Err("CARD_FROZEN"),
            ),
            (
                "cancelled",
                grant.clone(),
                home(Some(card(Cancelled, true)), Listing::No),
                Err("CARD_CANCELLED"),
            ),
            (
                "an operator's entry says more than the status",
                grant.clone(),
                home(Some(card(Lost, true)), Listing::Operator),
                Err("DENYLISTED"),
            ),
            (
                "deny-listed active card",
                grant.clone(),
                home(Some(ok), Listing::Operator),
                Err("DENYLISTED"),
            ),
            (
                "card-life entry on an active card",
                grant.clone(),
                home(Some(ok), Listing::CardLife),
                Err("DENYLISTED"),
            ),
            (
                "no financial account",
                grant.clone(),
                home(Some(card(Active, false)), Listing::No),
                Err("FUNCTION_NOT_ENABLED"),
            ),
            (
                "the programme's rules come before the card",
                rec("student_grant", 100_001, None, None),
                home(None, Listing::Operator),
                Err("LIMIT_EXCEEDED"),
            ),
            (
                "a region of no agreement, even known here",
                to(&grant, FOREIGN),
                found(FOREIGN, Some(ok), Listing::No),
                Err("REGION_NOT_ACCEPTED"),
            ),
            (
                "a partner's card with a payment sink of its own",
                to(&grant, PARTNER),
                partner(Some(ok)),
                Ok(()),
            ),
            (
                "a partner's functions are the partner's",
                to(&grant, PARTNER),
                partner(Some(card(Active, false))),
                Ok(()),
            ),
            (
                "a partner's card never seen here",
                to(&grant, PARTNER),
                partner(None),
                Err("CARD_NOT_FOUND"),
            ),
            (
                "on the partner's deny list",
                to(&grant, PARTNER),
                listed,
                Err("DENYLISTED"),
            ),
            (
                "a partner covering payments without a payment sink",
                to(&grant, "520102D00000001"),
                found("520102D00000001", Some(ok), Listing::No),
                Err("REGION_NOT_ACCEPTED"),
            ),
            (
                "a partner not covering payments",
                to(&grant, "530102D00000001"),
                found("530102D00000001", Some(ok), Listing::No),
                Err("REGION_NOT_ACCEPTED"),
            ),
            (
                "a wage of the month paid before",
                wage.clone(),
                paid,
                Err("ALREADY_PAID"),
            ),
        ];
        let regions = regions();
        let sinks = sinks(&regions);
        let programmes = programmes();
        let rules = Rules {
            programmes: &programmes,
            regions: &regions,
            sinks: &sinks,
        };
        for (name, r, f, want) in cases {
            let got = check(&r, &f, &rules);
            assert_eq!(
                got.as_ref().map_err(Refusal::code),
                want.as_ref().map_err(|e| *e),
                "{name}"
            );
            if let Err(e) = got {
                assert!(CODES.contains(&e.code()), "{name}");
                assert!(!e.message().is_empty(), "{name}");
            }
        }
        assert_eq!(
            check(&holder, &Found::nothing(), &rules),
            Err(Refusal::HolderNotFound)
        );
        let why = |r: &Record, f: &Found| check(r, f, &rules).unwrap_err();
        assert_eq!(
            why(
                &to(&grant, "530102D00000001"),
                &found("530102D00000001", Some(ok), Listing::No)
            ),
            Refusal::Region(RegionRefusal::NotCovered)
        );
        assert_eq!(
            why(
                &to(&grant, "520102D00000001"),
                &found("520102D00000001", Some(ok), Listing::No)
            ),
            Refusal::Region(RegionRefusal::NoSink)
        );
        // Without a home payment sink (the config refuses that), a home
        // card's credit would go nowhere: refused, not journaled.
        let partner_only = &sinks[1..];
        let no_home = Rules {
            sinks: partner_only,
            ..rules
        };
        assert_eq!(
            check(&grant, &home(Some(ok), Listing::No), &no_home),
            Err(Refusal::Region(RegionRefusal::NoSink))
        );
        // Without `[regions]` every card is home, and the home sink takes
        // all of them.
        let open = region::Rules::default();
        let open_sinks = vec![sink("payment", &[Scenario::Payment], Cards::of(&open, &[]))];
        let open_rules = Rules {
            programmes: &programmes,
            regions: &open,
            sinks: &open_sinks,
        };
        assert_eq!(
            check(
                &to(&grant, FOREIGN),
                &found(FOREIGN, Some(ok), Listing::No),
                &open_rules
            ),
            Ok(())
        );
    }

    fn parse_ok(format: Format, body: &str) -> Vec<Parsed> {
        parse(format, body.as_bytes(), 100).unwrap()
    }

    #[test]
    fn ndjson_and_csv_give_the_same_records() {
        let nd = format!(
            "{{\"record_id\":\"r1\",\"card_no\":\"{CARD}\",\"amount_fen\":5000,\"programme\":\"student_grant\"}}\n\
             \n\
             {{\"record_id\":\"r2\",\"id_hash\":\"{HASH}\",\"amount_fen\":\"800000\",\"programme\":\"project_wages\",\"project\":\"bridge-7\",\"month\":\"2026-11\"}}\r\n"
        );
        let csv = format!(
            "\u{feff}record_id,card_no,id_hash,amount_fen,programme,project,month\r\n\
             r1,{CARD},,5000,student_grant,,\n\
             \n\
             \"r2\",,{HASH},800000,\"project_wages\",bridge-7,2026-11\n"
        );
        let a = parse_ok(Format::Ndjson, &nd);
        let mut b = parse_ok(Format::Csv, &csv);
        // Lines differ (the header, the blank line); the records do not.
        assert_eq!(
            (a[0].as_ref().unwrap().line, a[1].as_ref().unwrap().line),
            (1, 3)
        );
        assert_eq!(
            (b[0].as_ref().unwrap().line, b[1].as_ref().unwrap().line),
            (2, 4)
        );
        for r in b.iter_mut() {
            r.as_mut().unwrap().line -= 1;
        }
        assert_eq!(a, b);
        let r2 = a[1].as_ref().unwrap();
        assert_eq!(r2.target, Target::Holder(HASH.into()));
        assert_eq!(
            (r2.amount_fen, r2.project.as_deref(), r2.month.as_deref()),
            (800_000, Some("bridge-7"), Some("2026-11"))
        );
        // Columns in any order.
        let reordered =
            format!("programme,amount_fen,card_no,record_id\nstudent_grant,5000,{CARD},r1\n");
        assert_eq!(
            parse_ok(Format::Csv, &reordered)[0]
                .as_ref()
                .unwrap()
                .card_no_str(),
            Some(CARD)
        );
    }

    impl Record {
        fn card_no_str(&self) -> Option<&str> {
            match &self.target {
                Target::Card(c) => Some(c.as_str()),
                Target::Holder(_) => None,
            }
        }
    }

    #[test]
    fn bad_lines_say_where_and_why_without_echoing_the_card() {
        let line = |fields: &str| format!("{{\"record_id\":\"r9\",{fields}}}");
        let g = "\"programme\":\"student_grant\"";
        let c = format!("\"card_no\":\"{CARD}\"");
        let cases: Vec<(String, Option<&str>, &str)> = vec![
            ("{".into(), None, "not valid JSON"),
            ("\"[1]\"".into(), None, "must be a JSON object"),
            (
                format!("{{{c},\"amount_fen\":1,{g}}}"),
                None,
                "missing field `record_id`",
            ),
            (
                format!("{{\"record_id\":\"r 1\",{c},\"amount_fen\":1,{g}}}"),
                None,
                "`record_id` must be 1 to 39",
            ),
            (
                format!(
                    "{{\"record_id\":\"{}\",{c},\"amount_fen\":1,{g}}}",
                    "r".repeat(RECORD_ID_LEN_MAX + 1)
                ),
                None,
                "`record_id` must be",
            ),
            (
                line(&format!("{c},\"amount_fen\":1,{g},\"amount_fen\":900000")),
                Some("r9"),
                "`amount_fen` is given twice",
            ),
            (
                line(&format!(
                    "{c},\"card_no\":\"500118D00000002\",\"amount_fen\":1,{g}"
                )),
                Some("r9"),
                "`card_no` is given twice",
            ),
            (
                format!("{{\"record_id\":\"r1\",\"record_id\":\"r2\",{c},\"amount_fen\":1,{g}}}"),
                None,
                "`record_id` is given twice",
            ),
            (
                line(&format!("{c},\"amount_fen\":1,{g},\"colour\":\"red\"")),
                Some("r9"),
                "unknown field `colour`",
            ),
            (
                line(&format!("\"amount_fen\":1,{g}")),
                Some("r9"),
                "one of `card_no` and `id_hash` is required",
            ),
            (
                line(&format!("{c},\"id_hash\":\"{HASH}\",\"amount_fen\":1,{g}")),
                Some("r9"),
                "not both",
            ),
            (
                line(&format!(
                    "\"card_no\":\"500118d00000001\",\"amount_fen\":1,{g}"
                )),
                Some("r9"),
                "`card_no` must contain only",
            ),
            (
                line(&format!(
                    "\"id_hash\":\"{}\",\"amount_fen\":1,{g}",
                    HASH.to_uppercase()
                )),
                Some("r9"),
                "`id_hash` must be 64 lower-case hex",
            ),
            (
                line(&format!("\"id_hash\":\"abc\",\"amount_fen\":1,{g}")),
                Some("r9"),
                "`id_hash` must be 64",
            ),
            (
                line(&format!("{c},{g}")),
                Some("r9"),
                "missing field `amount_fen`",
            ),
            (
                line(&format!("{c},\"amount_fen\":0,{g}")),
                Some("r9"),
                "`amount_fen` must be an integer number of fen from 1",
            ),
            (
                line(&format!("{c},\"amount_fen\":-5,{g}")),
                Some("r9"),
                "`amount_fen` must be an integer",
            ),
            (
                line(&format!("{c},\"amount_fen\":1.5,{g}")),
                Some("r9"),
                "`amount_fen` must be an integer",
            ),
            (
                line(&format!("{c},\"amount_fen\":\"1e3\",{g}")),
                Some("r9"),
                "`amount_fen` must be an integer",
            ),
            (
                line(&format!("{c},\"amount_fen\":true,{g}")),
                Some("r9"),
                "`amount_fen` must be an integer",
            ),
            (
                line(&format!("{c},\"amount_fen\":1000000001,{g}")),
                Some("r9"),
                "`amount_fen` must be an integer",
            ),
            (
                line(&format!("{c},\"amount_fen\":1")),
                Some("r9"),
                "missing field `programme`",
            ),
            (
                line(&format!(
                    "{c},\"amount_fen\":1,\"programme\":\"Student Grant\""
                )),
                Some("r9"),
                "`programme` must be 1 to 32",
            ),
            (
                line(&format!("{c},\"amount_fen\":1,{g},\"project\":\"a b\"")),
                Some("r9"),
                "`project` must be 1 to 64",
            ),
            (
                line(&format!("{c},\"amount_fen\":1,{g},\"month\":\"2026-13\"")),
                Some("r9"),
                "`month` must be a month",
            ),
            (
                line(&format!("{c},\"amount_fen\":1,{g},\"month\":\"2026-1\"")),
                Some("r9"),
                "`month` must be a month",
            ),
            (
                line(&format!("{c},\"amount_fen\":1,\"programme\":7")),
                Some("r9"),
                "`programme` must be a string",
            ),
            (
                line(&format!(
                    "{c},\"amount_fen\":1,{g},\"x\":\"{}\"",
                    "a".repeat(LINE_BYTES_MAX)
                )),
                None,
                "longer than 1024 bytes",
            ),
        ];
        // Each bad line is followed by a good one: a body of bad lines
        // only is refused whole.
        let good = line(&format!("{c},\"amount_fen\":1,{g}"));
        for (body, id, want) in cases {
            let got = parse_ok(Format::Ndjson, &format!("{body}\n{good}"));
            assert!(got[1].is_ok(), "{body}");
            let bad = got[0].as_ref().unwrap_err();
            assert_eq!(bad.line, 1, "{body}");
            assert_eq!(bad.record_id.as_deref(), id, "{body}");
            assert!(bad.message.contains(want), "{body}: {}", bad.message);
            assert!(!bad.message.contains("00000001"), "{}", bad.message);
            assert!(!bad.message.contains("0123456789abcdef"), "{}", bad.message);
        }

        let header = "record_id,card_no,amount_fen,programme\n";
        let csv_cases: Vec<(String, Option<&str>, &str)> = vec![
            (
                format!("r1,{CARD},1\n"),
                Some("r1"),
                "the line has 3 fields; the header names 4",
            ),
            (
                format!("r1,{CARD},1,student_grant,x\n"),
                Some("r1"),
                "has 5 fields",
            ),
            (
                format!("r1,\"{CARD},1,student_grant\n"),
                Some("r1"),
                "`card_no` has a stray double quote",
            ),
            (
                format!("r1,{CARD},12.50,student_grant\n"),
                Some("r1"),
                "`amount_fen` must be an integer",
            ),
            (
                format!("r1,{CARD},+5,student_grant\n"),
                Some("r1"),
                "`amount_fen` must be an integer",
            ),
            (
                format!("r1,,5,student_grant\n"),
                Some("r1"),
                "one of `card_no` and `id_hash` is required",
            ),
            (
                format!(",{CARD},5,student_grant\n"),
                None,
                "missing field `record_id`",
            ),
            ("r1,\u{ff}\n".to_owned(), None, "the line is not UTF-8"),
        ];
        for (line, id, want) in csv_cases {
            let mut body = header.as_bytes().to_vec();
            if line.contains('\u{ff}') {
                body.extend_from_slice(b"r1,\xff,1,x\n");
            } else {
                body.extend_from_slice(line.as_bytes());
            }
            body.extend_from_slice(format!("r2,{CARD},1,student_grant\n").as_bytes());
            let got = parse(Format::Csv, &body, 10).unwrap();
            assert!(got[1].is_ok(), "{line}");
            let bad = got[0].as_ref().unwrap_err();
            assert_eq!(bad.line, 2, "{line}");
            assert_eq!(bad.record_id.as_deref(), id, "{line}");
            assert!(bad.message.contains(want), "{line}: {}", bad.message);
            assert!(!bad.message.contains("00000001"), "{}", bad.message);
        }
    }

    #[test]
    fn whole_body_errors_refuse_the_batch() {
        let cases: &[(&str, &str)] = &[
            ("", "starts with a header line"),
            ("\n\n", "starts with a header line"),
            (
                "record_id,card_no,amount_fen,programme,colour\n",
                "column 5 of the CSV header is unknown column `colour`",
            ),
            (
                "record_id,card_no,amount_fen,programme,\n",
                "column 5 of the CSV header is empty",
            ),
            (
                "record_id,card_no,card_no,amount_fen,programme\n",
                "names `card_no` twice",
            ),
            (
                "record_id,card_no,amount_fen\n",
                "has no `programme` column",
            ),
            (
                "card_no,amount_fen,programme\n",
                "has no `record_id` column",
            ),
            (
                "record_id,amount_fen,programme\n",
                "needs a `card_no` or an `id_hash` column",
            ),
            (
                "record_id,card_no,amount_fen,programme,500118D00000001\n",
                "name not shown",
            ),
        ];
        for (body, want) in cases {
            let e = parse(Format::Csv, body.as_bytes(), 10).unwrap_err();
            assert!(matches!(e, BodyError::Invalid(_)), "{body}");
            assert!(e.to_string().contains(want), "{body}: {}", e);
            assert!(!e.to_string().contains("00000001"), "{}", e);
        }
        // A body without one well-formed record is refused whole rather
        // than stored as a report of nothing: empty, a header alone, a JSON
        // array, lines that are all bad (the first one's reason is given,
        // without the card it named).
        let good = format!(
            "{{\"record_id\":\"r1\",\"card_no\":\"{CARD}\",\"amount_fen\":1,\"programme\":\"g\"}}"
        );
        let cases: Vec<(Format, String, &str)> = vec![
            (Format::Ndjson, String::new(), "holds no records"),
            (Format::Ndjson, "\n \r\n".into(), "holds no records"),
            (
                Format::Csv,
                "record_id,card_no,amount_fen,programme\n".into(),
                "holds no records",
            ),
            (
                Format::Ndjson,
                format!("[{good},{good}]\n"),
                "this body is a JSON array",
            ),
            (
                Format::Ndjson,
                format!("\n  [\n{good},\n{good}\n]\n"),
                "this body is a JSON array",
            ),
            (
                Format::Ndjson,
                format!("{{}}\n[{good}]\n"),
                "(line 1: missing field `record_id`)",
            ),
            (
                Format::Ndjson,
                format!(
                    "\n{}\n",
                    good.replace("\"amount_fen\":1", "\"amount_fen\":1.5")
                ),
                "(line 2: `amount_fen` must be an integer",
            ),
            (
                Format::Csv,
                format!("record_id,card_no,amount_fen,programme\nr1,{CARD},12.50,g\n"),
                "(line 2: `amount_fen` must be an integer",
            ),
        ];
        for (format, body, want) in cases {
            let e = parse(format, body.as_bytes(), 10).unwrap_err();
            assert!(matches!(e, BodyError::Invalid(_)), "{body}");
            assert!(e.to_string().contains(want), "{body}: {}", e);
            assert!(!e.to_string().contains("00000001"), "{}", e);
        }
        // One well-formed record is enough: the rest are reported.
        let mixed = format!("{good}\n[1]\n");
        assert_eq!(
            parse(Format::Ndjson, mixed.as_bytes(), 10).unwrap().len(),
            2
        );
        // records_max counts records, bad ones included.
        let three = format!("{good}\n{{}}\n{{}}\n");
        assert_eq!(parse(Format::Ndjson, three.as_bytes(), 3).unwrap().len(), 3);
        let e = parse(Format::Ndjson, three.as_bytes(), 2).unwrap_err();
        assert!(matches!(e, BodyError::TooLarge(_)));
        assert!(e.to_string().contains("more than 2 records"), "{}", e);
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type("text/csv; charset=utf-8"),
            Some((Format::Csv, "text/csv"))
        );
        assert_eq!(
            Format::from_content_type("application/x-ndjson"),
            Some((Format::Ndjson, "application/x-ndjson"))
        );
        assert_eq!(
            Format::from_content_type("Application/JSON"),
            Some((Format::Ndjson, "application/json"))
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
        assert_ne!(
            fingerprint(Format::Csv, b"x"),
            fingerprint(Format::Ndjson, b"x")
        );
    }

    #[test]
    fn assess_reports_every_record_and_refuses_duplicates() {
        let lost = CardNo::parse("500118D00000002").unwrap();
        const CARD2: &str = "500118D00000004";
        let g = "\"programme\":\"student_grant\"";
        let w = "\"programme\":\"project_wages\",\"project\":\"bridge-7\"";
        let body = format!(
            "{{\"record_id\":\"a\",\"card_no\":\"{CARD}\",\"amount_fen\":100,{g}}}\n\
             {{\"record_id\":\"b\",\"card_no\":\"{}\",\"amount_fen\":200,{g}}}\n\
             not json\n\
             {{\"record_id\":\"a\",\"card_no\":\"{CARD}\",\"amount_fen\":300,{g}}}\n\
             {{\"record_id\":\"c\",\"id_hash\":\"{HASH}\",\"amount_fen\":400,{g}}}\n\
             {{\"record_id\":\"d\",\"card_no\":\"{CARD}\",\"amount_fen\":0,{g}}}\n\
             {{\"record_id\":\"d\",\"card_no\":\"{CARD}\",\"amount_fen\":500,{g}}}\n\
             {{\"record_id\":\"e\",\"card_no\":\"{CARD}\",\"amount_fen\":300,{g},\"month\":\"2026-09\"}}\n\
             {{\"record_id\":\"f\",\"card_no\":\"{CARD}\",\"amount_fen\":800,{w},\"month\":\"2026-11\"}}\n\
             {{\"record_id\":\"g\",\"card_no\":\"{CARD}\",\"amount_fen\":900,{w},\"month\":\"2026-11\"}}\n\
             {{\"record_id\":\"h\",\"card_no\":\"{CARD}\",\"amount_fen\":700,{w},\"month\":\"2026-10\"}}\n\
             {{\"record_id\":\"i\",\"card_no\":\"{CARD2}\",\"amount_fen\":100001,{g}}}\n\
             {{\"record_id\":\"j\",\"card_no\":\"{CARD2}\",\"amount_fen\":600,{g}}}\n",
            lost.as_str()
        );
        let parsed = parse(Format::Ndjson, body.as_bytes(), 100).unwrap();
        let open = region::Rules::default();
        let sinks = vec![sink("payment", &[Scenario::Payment], Cards::of(&open, &[]))];
        let programmes = programmes();
        let rules = Rules {
            programmes: &programmes,
            regions: &open,
            sinks: &sinks,
        };
        // The holder's hash leads to CARD: record c pays the card a paid.
        let (report, credits) = assess("B1", parsed, &rules, |r| {
            Ok::<_, std::convert::Infallible>(match &r.target {
                Target::Card(c) if c == &lost => found(
                    c.as_str(),
                    Some(card(CardStatus::Lost, true)),
                    Listing::CardLife,
                ),
                Target::Card(c) => found(
                    c.as_str(),
                    Some(card(CardStatus::Active, true)),
                    Listing::No,
                ),
                Target::Holder(_) => found(CARD, Some(card(CardStatus::Active, true)), Listing::No),
            })
        })
        .unwrap();
        let got: Vec<(Option<&str>, u64, &str, Option<&str>)> = report
            .outcomes
            .iter()
            .map(|o| (o.record_id.as_deref(), o.line, o.outcome, o.code))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("a"), 1, "accepted", None),
                (Some("b"), 2, "rejected", Some("CARD_LOST")),
                (None, 3, "rejected", Some("BAD_LINE")),
                (Some("a"), 4, "rejected", Some("DUPLICATE_RECORD")),
                (Some("c"), 5, "rejected", Some("DUPLICATE_CARD")),
                (Some("d"), 6, "rejected", Some("BAD_LINE")),
                (Some("d"), 7, "rejected", Some("DUPLICATE_RECORD")),
                // Another month of the same grant is another payment.
                (Some("e"), 8, "accepted", None),
                (Some("f"), 9, "accepted", None),
                (Some("g"), 10, "rejected", Some("DUPLICATE_CARD")),
                (Some("h"), 11, "accepted", None),
                (Some("i"), 12, "rejected", Some("LIMIT_EXCEEDED")),
                // A rejected record paid nothing: the card is still free.
                (Some("j"), 13, "accepted", None),
            ]
        );
        assert_eq!(
            (
                report.records,
                report.accepted,
                report.rejected,
                report.accepted_fen
            ),
            (13, 5, 8, 2_500)
        );
        let ids: Vec<&str> = credits
            .iter()
            .map(|c| c.record.record_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "e", "f", "h", "j"]);
        assert_eq!(report.outcomes[0].card.as_deref(), Some("500118*****0001"));
        // The duplicate found through the holder names the card (masked)
        // and the record that paid it.
        let c = &report.outcomes[4];
        assert_eq!(c.card.as_deref(), Some("500118*****0001"));
        let m = c.message.as_deref().unwrap();
        assert!(
            m.contains("record `a`") && m.contains("same programme"),
            "{m}"
        );
        let m = report.outcomes[9].message.as_deref().unwrap();
        assert!(
            m.contains("record `f`") && m.contains("project and month"),
            "{m}"
        );
        assert_eq!(
            report.outcomes[2]
                .message
                .as_deref()
                .map(|m| m.starts_with("line 3: ")),
            Some(true)
        );
        let text = serde_json::to_string(&report).unwrap();
        assert!(!text.contains(CARD) && !text.contains(lost.as_str()) && !text.contains(HASH));
    }

    #[test]
    fn a_failed_look_up_aborts_the_batch() {
        let body = format!(
            "{{\"record_id\":\"a\",\"card_no\":\"{CARD}\",\"amount_fen\":1,\"programme\":\"student_grant\"}}\n\
             {{\"record_id\":\"b\",\"id_hash\":\"{HASH}\",\"amount_fen\":1,\"programme\":\"student_grant\"}}\n"
        );
        let parsed = parse(Format::Ndjson, body.as_bytes(), 100).unwrap();
        let open = region::Rules::default();
        let sinks = vec![sink("payment", &[Scenario::Payment], Cards::of(&open, &[]))];
        let programmes = programmes();
        let rules = Rules {
            programmes: &programmes,
            regions: &open,
            sinks: &sinks,
        };
        // The holder's look-up fails: no report (nothing to store), the
        // error itself, however far the batch had got.
        let got = assess("B1", parsed, &rules, |r| match r.target {
            Target::Card(_) => Ok(found(
                CARD,
                Some(card(CardStatus::Active, true)),
                Listing::No,
            )),
            Target::Holder(_) => Err("the store cannot be read"),
        });
        assert_eq!(got.unwrap_err(), "the store cannot be read");
    }

    #[test]
    fn every_code_is_documented() {
        let spec: Value = serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
        let documented: BTreeSet<&str> = spec["components"]["schemas"]["DisbursementCode"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(documented, CODES.iter().copied().collect());
        let refusals = [
            Refusal::BadLine(String::new()),
            Refusal::DuplicateRecord,
            Refusal::DuplicateCard {
                earlier: "a".into(),
                wages: false,
            },
            Refusal::AlreadyPaid {
                event_id: "B:a".into(),
            },
            Refusal::UnknownProgramme,
            Refusal::ProjectRequired,
            Refusal::MonthRequired,
            Refusal::LimitExceeded { amount_max_fen: 1 },
            Refusal::CardNotFound,
            Refusal::HolderNotFound,
            Refusal::Region(RegionRefusal::NoAgreement),
            Refusal::PartnerDenylisted,
            Refusal::Card(Reason::CardLost),
            Refusal::Card(Reason::CardFrozen),
            Refusal::Card(Reason::CardCancelled),
            Refusal::Card(Reason::Denylisted),
            Refusal::Card(Reason::FunctionNotEnabled),
        ];
        let codes: BTreeSet<&str> = refusals.iter().map(Refusal::code).collect();
        assert_eq!(codes, CODES.iter().copied().collect());
    }

    #[test]
    fn ids_and_months() {
        assert!(valid_month("2026-01") && valid_month("2026-12"));
        for bad in [
            "2026-00",
            "2026-13",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-+1",
            "２０２６-11",
        ] {
            assert!(!valid_month(bad), "{bad}");
        }
        assert!(valid_id("bridge-7:phase.2_b", 64));
        // A batch id has no `:`, so a credit's event id splits one way
        // only: `a:b` + `c` and `a` + `b:c` cannot both be batches.
        assert!(valid_batch_id("W-bridge-7-2026-11") && valid_batch_id(&"B".repeat(24)));
        assert!(!valid_batch_id("a:b") && !valid_batch_id(&"B".repeat(25)));
        assert!(!valid_batch_id("") && !valid_batch_id("a/b"));
        assert_eq!(credit_event_id("a", "b:c"), "a:b:c");
        let longest = credit_event_id(
            &"B".repeat(BATCH_ID_LEN_MAX),
            &"r".repeat(RECORD_ID_LEN_MAX),
        );
        assert!(
            valid_id(&longest, wire::EVENT_ID_LEN_MAX),
            "{}",
            longest.len()
        );
        assert!(check_batch_id("a:b").unwrap_err().0.contains("no `:`"));
        assert!(!valid_id("", 64) && !valid_id("a/b", 64) && !valid_id(&"a".repeat(65), 64));
        assert!(valid_programme_name("farm_subsidy") && !valid_programme_name("Farm"));
        assert!(valid_id_hash(HASH) && !valid_id_hash(&HASH[1..]));
    }

    #[test]
    fn rosters_are_bounded_and_checked() {
        let ok = parse_roster(
            format!("{{\"workers\":[\"{CARD}\",\"{CARD}\",\"500118D00000000\"]}}").as_bytes(),
        )
        .unwrap();
        assert_eq!(ok.len(), 2, "duplicates kept once");
        assert_eq!(ok[0].as_str(), "500118D00000000", "sorted");
        for (body, want) in [
            ("{}", "missing field `workers`"),
            ("{\"workers\":\"x\"}", "must be an array"),
            ("{\"workers\":[1]}", "`workers[0]` must be a card number"),
            (
                "{\"workers\":[\"500118d1\"]}",
                "`workers[0]` must contain only",
            ),
            ("{\"workers\":[],\"who\":1}", "unknown field `who`"),
        ] {
            let e = parse_roster(body.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(want), "{body}: {}", e);
        }
        let many: Vec<String> = (0..=ROSTER_WORKERS_MAX)
            .map(|i| format!("\"500118{i:09}\""))
            .collect();
        let e =
            parse_roster(format!("{{\"workers\":[{}]}}", many.join(",")).as_bytes()).unwrap_err();
        assert!(matches!(e, BodyError::TooLarge(_)));
        assert_eq!(month_query(Some("month=2026-11")).unwrap(), "2026-11");
        assert!(month_query(None).is_err());
        assert!(month_query(Some("month=2026-13")).is_err());
        assert!(month_query(Some("month=2026-11&x=1")).is_err());
    }
}
