//! Complaints on the admin API (role `agent` or `operator`): filed on a
//! card and optionally one of its transactions, listed per unit with
//! their age, looked at with the transaction as it stands now, noted, and
//! closed with an outcome (a refund only with an operator's token).

use http::Response;
use serde_json::{Map, Value};

use onecard_core::complaint::{Category, ComplaintState, Outcome};
use onecard_core::wire;

use super::{completed, derived_id_param, ok_json, one_line, request_id, Admin};
use crate::http::error::ApiError;
use crate::http::ingress::{Body, Req};
use crate::http::routes::RouteId;
use crate::service::cardlife::Actor;
use crate::service::complaints::{CloseInput, Filing, SAYS_CHARS_MAX};

fn filing(m: &Map<String, Value>) -> Result<Filing, ApiError> {
    wire::reject_unknown(m, &["request_id", "card_no", "auth_id", "category", "says"])?;
    let category = wire::req_str(m, "category")?;
    let category = Category::parse(category).ok_or_else(|| {
        ApiError::invalid(format!(
            "`category` must be one of {}",
            Category::expected()
        ))
    })?;
    let auth_id = wire::opt_str(m, "auth_id")?;
    if auth_id.is_some_and(|a| {
        a.is_empty()
            || a.len() > 80
            || !a
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    }) {
        return Err(ApiError::invalid(
            "`auth_id` must be an authorization id as the answer carried it",
        ));
    }
    Ok(Filing {
        request_id: request_id(m)?,
        card_no: wire::card_no_field("card_no", wire::req_str(m, "card_no")?)?,
        auth_id: auth_id.map(str::to_owned),
        category,
        says: one_line(m, "says", SAYS_CHARS_MAX)?
            .ok_or_else(|| ApiError::invalid("missing field `says`: what the resident says"))?,
    })
}

/// `unit=` and `state=` of the list, percent-decoded (units are Chinese).
fn list_query(query: Option<&str>) -> Result<(Option<String>, Option<ComplaintState>), ApiError> {
    let mut unit = None;
    let mut state = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("unit", v)) => {
                let bytes = percent_decode(v).ok_or_else(|| {
                    ApiError::invalid("`unit` is not valid percent-encoded UTF-8")
                })?;
                unit = Some(bytes);
            }
            Some(("state", v)) => {
                state = Some(ComplaintState::parse(v).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "`state` must be one of {}",
                        ComplaintState::expected()
                    ))
                })?)
            }
            _ => {
                return Err(ApiError::invalid(
                    "unknown query parameter; this list takes unit and state",
                ))
            }
        }
    }
    Ok((unit, state))
}

fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

impl Admin {
    pub(super) async fn complaints(
        &self,
        route: RouteId,
        param: &str,
        req: Req,
        actor: Actor,
        now_ms: i64,
    ) -> Result<Response<Body>, ApiError> {
        let gw = self.gateway.clone();
        let id = || derived_id_param(param, "CP", "complaint");
        match route {
            RouteId::ComplaintPost => {
                let f = filing(&self.body(req).await?)?;
                let v =
                    completed(async move { gw.file_complaint(&actor, f, now_ms).await }).await?;
                Ok(ok_json(&v))
            }
            RouteId::Complaints => {
                let (unit, state) = list_query(req.uri().query())?;
                Ok(ok_json(&gw.complaints(unit, state, now_ms).await?))
            }
            RouteId::ComplaintGet => Ok(ok_json(&gw.complaint(&id()?).await?)),
            RouteId::ComplaintNote => {
                let id = id()?;
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["note"])?;
                let note = one_line(&m, "note", SAYS_CHARS_MAX)?
                    .ok_or_else(|| ApiError::invalid("missing field `note`"))?;
                let v =
                    completed(async move { gw.complaint_note(&actor, &id, note, now_ms).await })
                        .await?;
                Ok(ok_json(&v))
            }
            RouteId::ComplaintClose => {
                let id = id()?;
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["outcome", "note", "referred_to"])?;
                let outcome = Outcome::parse(wire::req_str(&m, "outcome")?).ok_or_else(|| {
                    ApiError::invalid(format!("`outcome` must be one of {}", Outcome::expected()))
                })?;
                let input = CloseInput {
                    outcome,
                    note: one_line(&m, "note", SAYS_CHARS_MAX)?.ok_or_else(|| {
                        ApiError::invalid("missing field `note`: what the resident is told")
                    })?,
                    referred_to: one_line(&m, "referred_to", 64)?,
                };
                if outcome == Outcome::Referral && input.referred_to.is_none() {
                    return Err(ApiError::invalid(
                        "a referral needs `referred_to`: the unit that takes it over",
                    ));
                }
                let v =
                    completed(async move { gw.close_complaint(&actor, &id, input, now_ms).await })
                        .await?;
                Ok(ok_json(&v))
            }
            _ => unreachable!("only complaint routes are sent here"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_filings_are_decoded_strictly() {
        let (unit, state) =
            list_query(Some("unit=%E5%8C%BA%E4%BA%A4%E9%80%9A%E5%B1%80&state=open")).unwrap();
        assert_eq!(unit.as_deref(), Some("区交通局"));
        assert_eq!(state, Some(ComplaintState::Open));
        assert!(list_query(Some("colour=red")).is_err());
        assert!(list_query(Some("state=pending")).is_err());
        assert!(list_query(Some("unit=%E5%8C")).is_err());
        let m = |v: Value| v.as_object().unwrap().clone();
        let f = filing(&m(serde_json::json!({
            "request_id": "12345/1", "card_no": "500118A12345678",
            "category": "wrong_charge", "says": "charged twice on line 12",
        })))
        .unwrap();
        assert_eq!(f.category, Category::WrongCharge);
        assert!(filing(&m(serde_json::json!({
            "request_id": "12345/1", "card_no": "500118A12345678",
            "category": "wrong_charge", "says": "",
        })))
        .is_err());
        assert!(filing(&m(serde_json::json!({
            "request_id": "12345/1", "card_no": "500118A12345678",
            "category": "rude_driver", "says": "x",
        })))
        .is_err());
    }
}
