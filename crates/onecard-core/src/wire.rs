//! The wire contract (API.md): request decoding and validation, answers, and
//! the error body every non-200 answer carries.
//!
//! Decoding is strict and hand-validated on purpose: serde's own messages
//! quote the offending value, and a quoted card number in an error body would
//! leak it. Every message here names the field and the rule, never the value.

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::deny::DENY_REASON_LEN_MAX;
use crate::model::{Card, CardNo, CardStatus, Concession, EventKind, Function, Scenario};

/// `event_id`: at most this many characters (API.md).
pub const EVENT_ID_LEN_MAX: usize = 64;
/// `site`: at most this many characters (API.md).
pub const SITE_LEN_MAX: usize = 64;
/// `qr`: at most this many bytes; a dynamic code is far shorter.
pub const QR_LEN_MAX: usize = 2_048;
/// `occurred_at`: at most this many bytes.
pub const TIME_LEN_MAX: usize = 40;
/// The largest amount the wire accepts: ten million yuan.
pub const AMOUNT_FEN_MAX: i64 = 1_000_000_000;

pub use crate::Invalid;

/// The stable error codes of the wire contract (API.md), as a client reads
/// them in `{"error": {"code": …}}`. What HTTP status each goes with is the
/// HTTP layer's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    IdempotencyConflict,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::IdempotencyConflict,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }
}

/// An error's code and message, as it appears inside other answers (an
/// offline upload's per-event outcome) and, wrapped in `{"error": …}`, as
/// the body of every non-200 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.as_str().to_owned(),
            message: message.into(),
        }
    }

    /// `{"error": {"code": "...", "message": "..."}}`
    pub fn to_vec(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Outer<'a> {
            error: &'a ErrorBody,
        }
        serde_json::to_vec(&Outer { error: self })
            .expect("serializing a struct of strings cannot fail")
    }
}

/// The credential an event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Tap(CardNo),
    Scan(String),
}

/// A validated `POST /v1/authorize` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    pub event_id: String,
    pub credential: Credential,
    pub scenario: Scenario,
    pub amount_fen: Option<i64>,
    pub site: Option<String>,
    /// As sent, validated as RFC 3339.
    pub occurred_at: Option<String>,
    /// Transit, on a route that charges by stops or zones travelled.
    pub stops: Option<u32>,
    pub zones: Option<u32>,
    /// A public payment's bill reference.
    pub bill_ref: Option<String>,
}

impl AuthorizeRequest {
    pub fn kind(&self) -> EventKind {
        match self.credential {
            Credential::Tap(_) => EventKind::Tap,
            Credential::Scan(_) => EventKind::Scan,
        }
    }

    /// A digest of the request's meaning, not of its bytes: a retry that a
    /// terminal re-serializes with other spacing or key order is still the
    /// same request. Fields are joined with a separator that validation
    /// keeps out of every field.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |s: &str| {
            h.update(s.as_bytes());
            h.update([0x1f]);
        };
        field(&self.event_id);
        match &self.credential {
            Credential::Tap(c) => {
                field("tap");
                field(c.as_str());
            }
            Credential::Scan(q) => {
                field("scan");
                field(q);
            }
        }
        field(self.scenario.as_str());
        // Numbers in decimal, as `Display` writes them, on the stack: no
        // allocation on the hot path.
        let mut digits = itoa::Buffer::new();
        field(self.amount_fen.map_or("", |a| digits.format(a)));
        field(self.site.as_deref().unwrap_or("\u{0}"));
        field(self.occurred_at.as_deref().unwrap_or("\u{0}"));
        // Later fields only when present: the fingerprint of a request
        // without them is what it was before they existed, so a retry
        // across an upgrade still replays.
        for (name, v) in [("stops", self.stops), ("zones", self.zones)] {
            if let Some(v) = v {
                field(name);
                field(digits.format(v));
            }
        }
        if let Some(b) = &self.bill_ref {
            field("bill_ref");
            field(b);
        }
        h.finalize().into()
    }
}

const AUTHORIZE_FIELDS: &[&str] = &[
    "event_id",
    "kind",
    "card_no",
    "qr",
    "scenario",
    "amount_fen",
    "site",
    "occurred_at",
    "stops",
    "zones",
    "bill_ref",
];

/// Names an unknown field only when it looks like a field name, so that a
/// body keyed by a card number does not have it echoed back.
pub fn describe_unknown_field(name: &str) -> String {
    let plain = name.len() <= 32 && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if plain {
        format!("unknown field `{name}`")
    } else {
        "unknown field (name not shown)".to_owned()
    }
}

/// Parses a JSON object body; the error names only syntax, never content.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Invalid> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Invalid::new(format!(
            "body is not valid JSON ({} at line {} column {})",
            json_error_class(&e),
            e.line(),
            e.column()
        ))
    })?;
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(Invalid::new("body must be a JSON object")),
    }
}

fn json_error_class(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Eof => "unexpected end of input",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Data => "invalid data",
    }
}

pub fn reject_unknown(m: &Map<String, Value>, allowed: &[&str]) -> Result<(), Invalid> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Invalid::new(format!(
            "{}; allowed fields: {}",
            describe_unknown_field(k),
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

pub fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, Invalid> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Invalid::new(format!("`{field}` must be a string"))),
    }
}

pub fn req_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<&'a str, Invalid> {
    opt_str(m, field)?.ok_or_else(|| Invalid::new(format!("missing field `{field}`")))
}

pub fn card_no_field(field: &str, s: &str) -> Result<CardNo, Invalid> {
    CardNo::parse(s).map_err(|e| Invalid::new(format!("`{field}` {e}")))
}

/// A card's `status`, `functions` and `concessions`, as the admin API and
/// the bulk import take them (other fields are the caller's to check).
pub fn card_fields(m: &Map<String, Value>) -> Result<Card, Invalid> {
    let status = req_str(m, "status")?;
    let status = CardStatus::parse(status).ok_or_else(|| {
        Invalid::new(format!(
            "`status` must be one of {}",
            CardStatus::expected()
        ))
    })?;
    let functions = enum_list(m, "functions", Function::parse, Function::expected)?;
    let concessions = enum_list(m, "concessions", Concession::parse, Concession::expected)?;
    Ok(Card::new(status, &functions, &concessions))
}

/// An optional array of enum names; duplicates are folded.
pub fn enum_list<T: PartialEq + Copy>(
    m: &Map<String, Value>,
    field: &str,
    parse: fn(&str) -> Option<T>,
    expected: fn() -> String,
) -> Result<Vec<T>, Invalid> {
    let Some(v) = m.get(field) else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = v else {
        return Err(Invalid::new(format!(
            "`{field}` must be an array of strings"
        )));
    };
    let mut out = Vec::new();
    for item in items {
        let t = item.as_str().and_then(parse).ok_or_else(|| {
            Invalid::new(format!("`{field}` entries must be among {}", expected()))
        })?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// A deny-list reason: 1 to `DENY_REASON_LEN_MAX` characters, no control
/// characters (it is shown on operators' screens and in logs).
pub fn deny_reason(reason: &str) -> Result<(), Invalid> {
    let n = reason.chars().count();
    if n == 0 || n > DENY_REASON_LEN_MAX || reason.chars().any(char::is_control) {
        return Err(Invalid::new(format!(
            "`reason` must be 1 to {DENY_REASON_LEN_MAX} characters without control characters"
        )));
    }
    Ok(())
}

fn valid_event_id(s: &str) -> bool {
    (1..=EVENT_ID_LEN_MAX).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The fields of an authorize body, typed but not yet validated.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorize<'a> {
    #[serde(borrow, default)]
    event_id: Option<&'a str>,
    #[serde(borrow, default)]
    kind: Option<&'a str>,
    #[serde(borrow, default)]
    card_no: Option<&'a str>,
    #[serde(borrow, default)]
    qr: Option<&'a str>,
    #[serde(borrow, default)]
    scenario: Option<&'a str>,
    #[serde(default)]
    amount_fen: Option<i64>,
    #[serde(borrow, default)]
    site: Option<&'a str>,
    #[serde(borrow, default)]
    occurred_at: Option<&'a str>,
    #[serde(default)]
    stops: Option<i64>,
    #[serde(default)]
    zones: Option<i64>,
    #[serde(borrow, default)]
    bill_ref: Option<&'a str>,
}

/// Decodes and validates an authorize body.
///
/// Two paths, one set of rules: a well-formed body (the common case) is
/// read straight into borrowed fields without building a JSON tree; any
/// body that path rejects (a wrong type, an unknown field, a string with
/// escapes) is read again as a tree, field by field, to say precisely what
/// is wrong. Both end in [`validate_authorize`]. `null` counts as absent in
/// both.
pub fn parse_authorize(body: &[u8]) -> Result<AuthorizeRequest, Invalid> {
    if let Ok(raw) = serde_json::from_slice::<RawAuthorize<'_>>(body) {
        return validate_authorize(raw);
    }
    let m = parse_object(body)?;
    reject_unknown(&m, AUTHORIZE_FIELDS)?;
    let amount_fen = amount_field(&m)?;
    let raw = RawAuthorize {
        event_id: opt_str(&m, "event_id")?,
        kind: opt_str(&m, "kind")?,
        card_no: opt_str(&m, "card_no")?,
        qr: opt_str(&m, "qr")?,
        scenario: opt_str(&m, "scenario")?,
        amount_fen,
        site: opt_str(&m, "site")?,
        occurred_at: opt_str(&m, "occurred_at")?,
        stops: opt_count(&m, "stops")?,
        zones: opt_count(&m, "zones")?,
        bill_ref: opt_str(&m, "bill_ref")?,
    };
    validate_authorize(raw)
}

/// `amount_fen` of the slow path: an integer number of fen, named
/// precisely when it is not.
fn amount_field(m: &Map<String, Value>) -> Result<Option<i64>, Invalid> {
    match m.get("amount_fen") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(a) => Ok(Some(a)),
            None if n.as_f64().is_some_and(|f| f > AMOUNT_FEN_MAX as f64) => Err(Invalid::new(
                format!("`amount_fen` must be at most {AMOUNT_FEN_MAX}"),
            )),
            None => Err(Invalid::new("`amount_fen` must be a whole number of fen")),
        },
        Some(_) => Err(Invalid::new("`amount_fen` must be an integer (fen)")),
    }
}

fn validate_authorize(raw: RawAuthorize<'_>) -> Result<AuthorizeRequest, Invalid> {
    let missing = |f: &str| Invalid::new(format!("missing field `{f}`"));
    let event_id = event_id_field(raw.event_id)?;
    let kind = EventKind::parse(raw.kind.ok_or_else(|| missing("kind"))?)
        .ok_or_else(|| Invalid::new(format!("`kind` must be one of {}", EventKind::expected())))?;
    let scenario =
        Scenario::parse(raw.scenario.ok_or_else(|| missing("scenario"))?).ok_or_else(|| {
            Invalid::new(format!(
                "`scenario` must be one of {}",
                Scenario::expected()
            ))
        })?;

    let credential = match kind {
        EventKind::Tap => {
            if raw.qr.is_some() {
                return Err(Invalid::new(
                    "`qr` is only allowed with kind scan; a tap carries `card_no`",
                ));
            }
            let card = raw
                .card_no
                .ok_or_else(|| Invalid::new("missing field `card_no` (required with kind tap)"))?;
            Credential::Tap(card_no_field("card_no", card)?)
        }
        EventKind::Scan => {
            if raw.card_no.is_some() {
                return Err(Invalid::new(
                    "`card_no` is not allowed with kind scan; a scan carries `qr`",
                ));
            }
            let qr = raw
                .qr
                .ok_or_else(|| Invalid::new("missing field `qr` (required with kind scan)"))?;
            if qr.is_empty() || qr.len() > QR_LEN_MAX {
                return Err(Invalid::new(format!(
                    "`qr` must be 1 to {QR_LEN_MAX} bytes"
                )));
            }
            Credential::Scan(qr.to_owned())
        }
    };

    match raw.amount_fen {
        Some(a) if a < 0 => return Err(Invalid::new("`amount_fen` must not be negative")),
        Some(a) if a > AMOUNT_FEN_MAX => {
            return Err(Invalid::new(format!(
                "`amount_fen` must be at most {AMOUNT_FEN_MAX}"
            )))
        }
        _ => {}
    }

    let site = match raw.site {
        None => None,
        Some(s) => {
            let n = s.chars().count();
            if n == 0 || n > SITE_LEN_MAX || s.chars().any(char::is_control) {
                return Err(Invalid::new(format!(
                    "`site` must be 1 to {SITE_LEN_MAX} characters without control characters"
                )));
            }
            Some(s.to_owned())
        }
    };

    let occurred_at = occurred_at_field(raw.occurred_at)?;
    let count = |name: &str, v: Option<i64>| match v {
        None => Ok(None),
        Some(n) if (1..=i64::from(UNITS_MAX)).contains(&n) => Ok(Some(n as u32)),
        Some(_) => Err(Invalid::new(format!(
            "`{name}` must be a whole number from 1 to {UNITS_MAX}"
        ))),
    };
    let stops = count("stops", raw.stops)?;
    let zones = count("zones", raw.zones)?;
    if (stops.is_some() || zones.is_some()) && scenario != Scenario::Transit {
        return Err(Invalid::new(
            "`stops` and `zones` are only allowed with scenario transit",
        ));
    }
    let bill_ref =
        match raw.bill_ref {
            None => None,
            Some(_) if scenario != Scenario::Payment => {
                return Err(Invalid::new(
                    "`bill_ref` is only allowed with scenario payment",
                ))
            }
            Some(b) if crate::scenario::payment::valid_bill_ref(b) => Some(b.to_owned()),
            Some(_) => return Err(Invalid::new(
                "`bill_ref` must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '/', '-'",
            )),
        };

    Ok(AuthorizeRequest {
        event_id: event_id.to_owned(),
        credential,
        scenario,
        amount_fen: raw.amount_fen,
        site,
        occurred_at,
        stops,
        zones,
        bill_ref,
    })
}

/// Stops or zones in one ride, at most.
pub const UNITS_MAX: u32 = 1_000;

/// An optional integer field of the slow path.
fn opt_count(m: &Map<String, Value>, field: &str) -> Result<Option<i64>, Invalid> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            Invalid::new(format!(
                "`{field}` must be a whole number from 1 to {UNITS_MAX}"
            ))
        }),
    }
}

fn event_id_field(v: Option<&str>) -> Result<&str, Invalid> {
    let event_id = v.ok_or_else(|| Invalid::new("missing field `event_id`"))?;
    if !valid_event_id(event_id) {
        return Err(Invalid::new(format!(
            "`event_id` must be 1 to {EVENT_ID_LEN_MAX} characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"
        )));
    }
    Ok(event_id)
}

fn occurred_at_field(v: Option<&str>) -> Result<Option<String>, Invalid> {
    let Some(s) = v else { return Ok(None) };
    let ok = s.len() <= TIME_LEN_MAX
        && time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok();
    if !ok {
        return Err(Invalid::new(
            "`occurred_at` must be an RFC 3339 time such as 2026-11-28T07:45:12Z",
        ));
    }
    Ok(Some(s.to_owned()))
}

/// A validated `POST /v1/hold` body: an authorization of scenario
/// `medical` (same fields and rules, the scenario implied) with the bill's
/// category. The amount is required and at least one fen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub auth: AuthorizeRequest,
    pub category: String,
}

const HOLD_FIELDS: &[&str] = &[
    "event_id",
    "kind",
    "card_no",
    "qr",
    "amount_fen",
    "category",
    "site",
    "occurred_at",
];

impl HoldRequest {
    /// Distinct from any authorization's fingerprint (hold and authorize
    /// share the key space of (terminal, event_id)): the same fields sent
    /// to the other route are another request, `409`.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"hold\x1f");
        h.update(self.auth.fingerprint());
        h.update([0x1f]);
        h.update(self.category.as_bytes());
        h.finalize().into()
    }
}

pub fn parse_hold(body: &[u8]) -> Result<HoldRequest, Invalid> {
    let m = parse_object(body)?;
    reject_unknown(&m, HOLD_FIELDS)?;
    let raw = RawAuthorize {
        event_id: opt_str(&m, "event_id")?,
        kind: opt_str(&m, "kind")?,
        card_no: opt_str(&m, "card_no")?,
        qr: opt_str(&m, "qr")?,
        scenario: Some(Scenario::Medical.as_str()),
        amount_fen: amount_field(&m)?,
        site: opt_str(&m, "site")?,
        occurred_at: opt_str(&m, "occurred_at")?,
        ..RawAuthorize::default()
    };
    let auth = validate_authorize(raw)?;
    match auth.amount_fen {
        None => return Err(Invalid::new("missing field `amount_fen`")),
        Some(0) => return Err(Invalid::new("`amount_fen` of a hold must be at least 1")),
        _ => {}
    }
    let category = req_str(&m, "category")?;
    if !crate::scenario::medical::valid_category_name(category) {
        return Err(Invalid::new(
            "`category` must be 1 to 32 characters of a-z, 0-9, '_'",
        ));
    }
    Ok(HoldRequest {
        auth,
        category: category.to_owned(),
    })
}

/// What a counter does with one of its holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOp {
    Capture,
    Void,
}

/// A validated `POST /v1/capture` or `POST /v1/void` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldStepRequest {
    pub op: HoldOp,
    pub event_id: String,
    /// The terminal's own event id of the hold.
    pub hold_event_id: String,
    /// A capture's amount (at most what was held); `None` for a void.
    pub amount_fen: Option<i64>,
    pub occurred_at: Option<String>,
}

impl HoldStepRequest {
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(match self.op {
            HoldOp::Capture => b"capture\x1f".as_slice(),
            HoldOp::Void => b"void\x1f".as_slice(),
        });
        for f in [
            self.event_id.as_str(),
            self.hold_event_id.as_str(),
            &self.amount_fen.map_or(String::new(), |a| a.to_string()),
            self.occurred_at.as_deref().unwrap_or("\u{0}"),
        ] {
            h.update(f.as_bytes());
            h.update([0x1f]);
        }
        h.finalize().into()
    }
}

pub fn parse_hold_step(op: HoldOp, body: &[u8]) -> Result<HoldStepRequest, Invalid> {
    let m = parse_object(body)?;
    let fields: &[&str] = match op {
        HoldOp::Capture => &["event_id", "hold_event_id", "amount_fen", "occurred_at"],
        HoldOp::Void => &["event_id", "hold_event_id", "occurred_at"],
    };
    reject_unknown(&m, fields)?;
    let event_id = event_id_field(opt_str(&m, "event_id")?)?.to_owned();
    let hold_event_id = match opt_str(&m, "hold_event_id")? {
        Some(h) if valid_event_id(h) => h.to_owned(),
        Some(_) => {
            return Err(Invalid::new(format!(
                "`hold_event_id` must be 1 to {EVENT_ID_LEN_MAX} characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"
            )))
        }
        None => return Err(Invalid::new("missing field `hold_event_id`")),
    };
    // One event id is one request: a step under its hold's own id would
    // wait for itself (it holds the id's slot while it reads the hold).
    if hold_event_id == event_id {
        return Err(Invalid::new(
            "`event_id` must differ from `hold_event_id` (each step has its own event id)",
        ));
    }
    let amount_fen = match (op, amount_field(&m)?) {
        (HoldOp::Void, _) => None,
        (HoldOp::Capture, None) => return Err(Invalid::new("missing field `amount_fen`")),
        (HoldOp::Capture, Some(a)) if !(1..=AMOUNT_FEN_MAX).contains(&a) => {
            return Err(Invalid::new(format!(
                "`amount_fen` of a capture must be 1 to {AMOUNT_FEN_MAX} (a void releases a hold)"
            )))
        }
        (HoldOp::Capture, a) => a,
    };
    Ok(HoldStepRequest {
        op,
        event_id,
        hold_event_id,
        amount_fen,
        occurred_at: occurred_at_field(opt_str(&m, "occurred_at")?)?,
    })
}

/// The `200` answer to a hold, a capture or a void: like an
/// authorization's, with the hold's id and expiry and the bill's split
/// (a hold's: as it would be if captured whole now; a capture's: as
/// booked).
#[derive(Debug, Serialize)]
pub struct MedicalAnswer<'a> {
    pub event_id: &'a str,
    pub auth_id: &'a str,
    pub decision: &'static str,
    pub reason: &'static str,
    /// Held, captured, or released (a void).
    pub amount_fen: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<crate::scenario::medical::Split>,
}

impl MedicalAnswer<'_> {
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing a struct of strings and integers cannot fail")
    }
}

/// A validated `POST /v1/reverse` body: the terminal's own `event_id` to
/// reverse, and when the terminal gave up on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseRequest {
    pub event_id: String,
    pub occurred_at: Option<String>,
}

impl ReverseRequest {
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"reverse\x1f");
        h.update(self.event_id.as_bytes());
        h.update([0x1f]);
        h.update(self.occurred_at.as_deref().unwrap_or("\u{0}").as_bytes());
        h.finalize().into()
    }
}

pub fn parse_reverse(body: &[u8]) -> Result<ReverseRequest, Invalid> {
    let m = parse_object(body)?;
    reject_unknown(&m, &["event_id", "occurred_at"])?;
    Ok(ReverseRequest {
        event_id: event_id_field(opt_str(&m, "event_id")?)?.to_owned(),
        occurred_at: occurred_at_field(opt_str(&m, "occurred_at")?)?,
    })
}

/// What a reversal came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverseStatus {
    /// The approval is cancelled and its charge given back (taken out of
    /// its settlement batch, or settled as a reversal record).
    Reversed,
    /// The event was declined or charged nothing: nothing to give back.
    NotCharged,
    /// The gateway has no such event from this terminal (yet): the
    /// reversal is recorded, and if the event arrives later it is
    /// declined `REVERSED`.
    UnknownEvent,
}

impl ReverseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReverseStatus::Reversed => "reversed",
            ReverseStatus::NotCharged => "not_charged",
            ReverseStatus::UnknownEvent => "unknown_event",
        }
    }
}

/// The `200` answer to a reversal.
#[derive(Debug, Serialize)]
pub struct ReverseAnswer<'a> {
    pub event_id: &'a str,
    pub reversal_id: &'a str,
    pub status: ReverseStatus,
    /// The reversed event's auth_id, when the gateway saw it.
    pub auth_id: Option<&'a str>,
    /// What was given back.
    pub amount_fen: i64,
}

impl ReverseAnswer<'_> {
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing a struct of strings and integers cannot fail")
    }
}

/// The `200` answer to an authorization (API.md), plus `message` for
/// declines: a short sentence a counter clerk can read out.
#[derive(Debug, Serialize)]
pub struct AuthorizeAnswer<'a> {
    pub event_id: &'a str,
    pub auth_id: &'a str,
    pub decision: &'static str,
    pub reason: &'static str,
    pub amount_fen: i64,
    /// Transit and culture: how the charge was worked out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fare: Option<&'a crate::scenario::Fare>,
    /// Culture: the card's approved entries, this one included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visits: Option<u32>,
    /// Identity: what the counter's purpose may see.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a crate::scenario::identity::Disclosure>,
    /// Health: the status colour and vaccination flag, nothing more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<&'a crate::scenario::health::Attestation>,
}

impl AuthorizeAnswer<'_> {
    pub fn to_vec(&self) -> Vec<u8> {
        // An approval with its fare is some 200 bytes: sized so that it is
        // written without growing (serde_json's `to_vec` starts at 128).
        let mut v = Vec::with_capacity(ANSWER_BYTES_TYPICAL);
        serde_json::to_writer(&mut v, self)
            .expect("serializing a struct of strings and integers cannot fail");
        v
    }
}

/// What an answer's buffer starts with.
const ANSWER_BYTES_TYPICAL: usize = 320;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"event_id":"bus-0042-000000123","kind":"tap","card_no":"500118A12345678","scenario":"transit","amount_fen":200,"site":"line-12","occurred_at":"2026-11-28T07:45:12Z"}"#;

    fn with(field: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(GOOD).unwrap();
        if value == "<remove>" {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = serde_json::from_str(value).unwrap();
        }
        v.to_string()
    }

    #[test]
    fn good_body_decodes() {
        let r = parse_authorize(GOOD.as_bytes()).unwrap();
        assert_eq!(r.event_id, "bus-0042-000000123");
        assert_eq!(r.scenario, Scenario::Transit);
        assert_eq!(r.amount_fen, Some(200));
        assert_eq!(r.kind(), EventKind::Tap);
    }

    #[test]
    fn bad_bodies_are_named_without_echoing_values() {
        let cases: &[(String, &str)] = &[
            ("{".into(), "not valid JSON"),
            ("[1]".into(), "JSON object"),
            (with("colour", "\"red\""), "unknown field `colour`"),
            (
                with("500118A12345678", "1"),
                "unknown field (name not shown)",
            ),
            (with("event_id", "<remove>"), "missing field `event_id`"),
            (with("event_id", "\"\""), "`event_id` must be 1 to 64"),
            (
                with("event_id", &format!("\"{}\"", "e".repeat(65))),
                "`event_id` must be 1 to 64",
            ),
            (
                with("event_id", "\"has space\""),
                "`event_id` must be 1 to 64",
            ),
            (with("kind", "\"wave\""), "`kind` must be one of tap, scan"),
            (
                with("card_no", "500118123456789"),
                "`card_no` must be a string",
            ),
            (
                with("card_no", "\"500118a1234\""),
                "`card_no` must contain only",
            ),
            (with("card_no", "\"5001\""), "`card_no` must be 8 to 32"),
            (with("card_no", "<remove>"), "missing field `card_no`"),
            (
                with("qr", "\"OC1.x\""),
                "`qr` is only allowed with kind scan",
            ),
            (with("scenario", "\"ferry\""), "`scenario` must be one of"),
            (
                with("amount_fen", "-1"),
                "`amount_fen` must not be negative",
            ),
            (with("amount_fen", "1.5"), "whole number"),
            (
                with("amount_fen", "\"200\""),
                "`amount_fen` must be an integer",
            ),
            (with("amount_fen", "99999999999999999999"), "at most"),
            (with("amount_fen", "18446744073709551615"), "at most"),
            (with("site", "\"\""), "`site` must be 1 to 64"),
            (with("site", "\"a\\nb\""), "`site` must be 1 to 64"),
            (
                with("occurred_at", "\"yesterday\""),
                "`occurred_at` must be an RFC 3339",
            ),
        ];
        for (body, want) in cases {
            let err = parse_authorize(body.as_bytes()).unwrap_err();
            assert!(
                err.0.contains(want),
                "body {body}: message {:?} lacks {want:?}",
                err.0
            );
            assert!(
                !err.0.contains("12345678"),
                "message echoes a card number: {}",
                err.0
            );
        }
    }

    /// The fingerprint is stored with every remembered answer: a change to
    /// how it is computed would turn every retry across an upgrade into a
    /// `409`. This is its definition, written out the slow way.
    #[test]
    fn fingerprint_is_the_fields_joined_and_hashed() {
        let r = parse_authorize(with("stops", "7").as_bytes()).unwrap();
        let joined = format!(
            "{}\x1ftap\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1fstops\x1f{}\x1f",
            "bus-0042-000000123",
            "500118A12345678",
            "transit",
            200,
            "line-12",
            "2026-11-28T07:45:12Z",
            7
        );
        let want: [u8; 32] = Sha256::digest(joined.as_bytes()).into();
        assert_eq!(r.fingerprint(), want);
        let no_amount = parse_authorize(with("amount_fen", "<remove>").as_bytes()).unwrap();
        let joined = "bus-0042-000000123\x1ftap\x1f500118A12345678\x1ftransit\x1f\x1fline-12\x1f2026-11-28T07:45:12Z\x1f";
        let want: [u8; 32] = Sha256::digest(joined.as_bytes()).into();
        assert_eq!(no_amount.fingerprint(), want);
    }

    #[test]
    fn fingerprint_ignores_spacing_and_order_but_not_content() {
        let a = parse_authorize(GOOD.as_bytes()).unwrap();
        let v: Value = serde_json::from_str(GOOD).unwrap();
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let b = parse_authorize(pretty.as_bytes()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = parse_authorize(with("amount_fen", "201").as_bytes()).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
        let d = parse_authorize(with("site", "<remove>").as_bytes()).unwrap();
        assert_ne!(a.fingerprint(), d.fingerprint());
    }

    #[test]
    fn both_decoding_paths_agree() {
        // Escapes force the tree path; the result is the same request.
        let escaped = GOOD.replace("line-12", "line\\u002d12");
        assert!(
            serde_json::from_str::<RawAuthorize<'_>>(&escaped).is_err(),
            "escapes cannot be borrowed"
        );
        assert_eq!(
            parse_authorize(escaped.as_bytes()).unwrap(),
            parse_authorize(GOOD.as_bytes()).unwrap()
        );
        // null is absent on both paths.
        let null_site = with("site", "null");
        assert_eq!(parse_authorize(null_site.as_bytes()).unwrap().site, None);
        let null_site_escaped = null_site
            .replace("line-12", "line\\u002d12")
            .replace("bus-0042", "bus\\u002d0042");
        assert_eq!(
            parse_authorize(null_site_escaped.as_bytes()).unwrap().site,
            None
        );
        let e = parse_authorize(with("event_id", "null").as_bytes()).unwrap_err();
        assert!(e.0.contains("missing field `event_id`"), "{}", e.0);
    }

    #[test]
    fn hold_capture_void_bodies() {
        let hold = r#"{"event_id":"h-1","kind":"tap","card_no":"500118A12345678","amount_fen":10000,"category":"outpatient","site":"counter-3"}"#;
        let h = parse_hold(hold.as_bytes()).unwrap();
        assert_eq!(h.auth.scenario, Scenario::Medical);
        assert_eq!(h.category, "outpatient");
        // Not the fingerprint of the same fields as an authorization.
        assert_ne!(h.fingerprint(), h.auth.fingerprint());
        let edit = |f: &str, v: &str| {
            let mut m: Value = serde_json::from_str(hold).unwrap();
            if v == "<remove>" {
                m.as_object_mut().unwrap().remove(f);
            } else {
                m[f] = serde_json::from_str(v).unwrap();
            }
            m.to_string()
        };
        let bad: &[(String, &str)] = &[
            (edit("scenario", "\"medical\""), "unknown field `scenario`"),
            (edit("category", "<remove>"), "missing field `category`"),
            (edit("category", "\"Out Patient\""), "`category` must be"),
            (edit("amount_fen", "<remove>"), "missing field `amount_fen`"),
            (edit("amount_fen", "0"), "at least 1"),
            (edit("amount_fen", "-1"), "must not be negative"),
            (edit("card_no", "\"5001\""), "`card_no` must be 8 to 32"),
        ];
        for (body, want) in bad {
            let e = parse_hold(body.as_bytes()).unwrap_err();
            assert!(e.0.contains(want), "{body}: {}", e.0);
        }
        let cap = parse_hold_step(
            HoldOp::Capture,
            br#"{"event_id":"c-1","hold_event_id":"h-1","amount_fen":600}"#,
        )
        .unwrap();
        assert_eq!(cap.amount_fen, Some(600));
        let void =
            parse_hold_step(HoldOp::Void, br#"{"event_id":"c-1","hold_event_id":"h-1"}"#).unwrap();
        assert_ne!(cap.fingerprint(), void.fingerprint());
        let bad_steps: &[(HoldOp, &str, &str)] = &[
            (
                HoldOp::Capture,
                r#"{"event_id":"c","hold_event_id":"h"}"#,
                "missing field `amount_fen`",
            ),
            (
                HoldOp::Capture,
                r#"{"event_id":"c","hold_event_id":"h","amount_fen":0}"#,
                "1 to",
            ),
            (
                HoldOp::Capture,
                r#"{"event_id":"c","amount_fen":1}"#,
                "missing field `hold_event_id`",
            ),
            (
                HoldOp::Capture,
                r#"{"event_id":"h","hold_event_id":"h","amount_fen":1}"#,
                "must differ",
            ),
            (
                HoldOp::Void,
                r#"{"event_id":"c","hold_event_id":"h","amount_fen":1}"#,
                "unknown field `amount_fen`",
            ),
            (
                HoldOp::Void,
                r#"{"event_id":"c","hold_event_id":"a b"}"#,
                "`hold_event_id` must be",
            ),
        ];
        for (op, body, want) in bad_steps {
            let e = parse_hold_step(*op, body.as_bytes()).unwrap_err();
            assert!(e.0.contains(want), "{body}: {}", e.0);
        }
    }

    #[test]
    fn error_body_shape() {
        let e = ErrorBody::new(ErrorCode::RateLimited, "slow down");
        assert_eq!(
            e.to_vec(),
            br#"{"error":{"code":"RATE_LIMITED","message":"slow down"}}"#
        );
    }
}
