//! Card applications on the admin API: a counter (role `counter`) or the
//! resident's own channel (role `channel`) files one; a counter takes it
//! through production and pickup to issuance, or prints the card at once;
//! the hotline (role `agent`) and counters find a resident's applications
//! by personal ID and list the overdue ones; the resident's channel asks
//! where one stands by its id and the last four ID digits. Bodies are
//! decoded strictly here; the rules are the service's.

use http::Response;
use serde_json::{Map, Value};

use onecard_core::application::{AppKind, AppStep, Channel, Priority, ProxyRelation};
use onecard_core::model::Function;
use onecard_core::privacy;
use onecard_core::wire;

use super::{completed, derived_id_param, ok_json, one_line, request_id, Admin};
use crate::http::error::ApiError;
use crate::http::ingress::{Body, Req};
use crate::http::routes::RouteId;
use crate::service::applications::{ProxyInput, StepInput, Submission};
use crate::service::cardlife::Actor;
use crate::service::error::ServiceError;

fn text(m: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    one_line(m, field, 64)
}

fn one_of<T>(
    m: &Map<String, Value>,
    field: &str,
    parse: fn(&str) -> Option<T>,
    expected: fn() -> String,
) -> Result<Option<T>, ApiError> {
    match wire::opt_str(m, field)? {
        None => Ok(None),
        Some(s) => parse(s)
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("`{field}` must be one of {}", expected()))),
    }
}

fn name(m: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match wire::opt_str(m, "name")? {
        None => Ok(None),
        Some(n) => privacy::mask_name(n).map(Some).ok_or_else(|| {
            ApiError::invalid("`name` must be 1 to 64 characters without control characters")
        }),
    }
}

fn card(
    m: &Map<String, Value>,
    field: &str,
) -> Result<Option<onecard_core::model::CardNo>, ApiError> {
    wire::opt_str(m, field)?
        .map(|s| wire::card_no_field(field, s))
        .transpose()
        .map_err(Into::into)
}

/// `POST /admin/v1/applications`'s body.
fn submission(m: &Map<String, Value>) -> Result<Submission, ApiError> {
    wire::reject_unknown(
        m,
        &[
            "request_id",
            "kind",
            "personal_id",
            "name",
            "disabled",
            "channel",
            "place",
            "with_business",
            "priority",
            "proxy",
            "replaces",
            "functions",
            "instant_card_no",
        ],
    )?;
    let request_id = request_id(m)?;
    let kind = one_of(m, "kind", AppKind::parse, AppKind::expected)?.unwrap_or(AppKind::New);
    let channel = one_of(m, "channel", Channel::parse, Channel::expected)?
        .ok_or_else(|| ApiError::invalid("missing field `channel`"))?;
    let place = text(m, "place")?.ok_or_else(|| {
        ApiError::invalid("missing field `place`: the hall, branch or channel it is filed at")
    })?;
    let disabled = match m.get("disabled") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("`disabled` must be true or false")),
    };
    let functions = wire::enum_list(m, "functions", Function::parse, Function::expected)?;
    if functions.is_empty() {
        return Err(ApiError::invalid(format!(
            "`functions` must name at least one of {}",
            Function::expected()
        )));
    }
    let proxy = match m.get("proxy") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => {
            wire::reject_unknown(p, &["personal_id", "name", "relation"])
                .map_err(|e| ApiError::invalid(format!("`proxy`: {}", e.0)))?;
            let relation = one_of(p, "relation", ProxyRelation::parse, ProxyRelation::expected)?
                .ok_or_else(|| ApiError::invalid("`proxy` needs `relation`"))?;
            Some(ProxyInput {
                personal_id: wire::req_str(p, "personal_id")
                    .map_err(|_| {
                        ApiError::invalid("`proxy` needs `personal_id`, checked at the counter")
                    })?
                    .to_owned(),
                name_masked: name(p)?,
                relation,
            })
        }
        Some(_) => return Err(ApiError::invalid("`proxy` must be an object")),
    };
    Ok(Submission {
        request_id,
        kind,
        personal_id: wire::req_str(m, "personal_id")?.to_owned(),
        name_masked: name(m)?,
        disabled,
        channel,
        place,
        with_business: text(m, "with_business")?,
        priority: one_of(m, "priority", Priority::parse, Priority::expected)?,
        proxy,
        replaces: card(m, "replaces")?,
        functions,
        instant_card_no: card(m, "instant_card_no")?,
    })
}

/// `last4=` from a query string.
fn last4(query: Option<&str>) -> Result<String, ApiError> {
    let v = query
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("last4="))
        .ok_or_else(|| {
            ApiError::invalid("missing `last4`: the last four characters of the holder's ID")
        })?;
    let ok = v.len() == 4
        && v[..3].bytes().all(|b| b.is_ascii_digit())
        && (v.as_bytes()[3].is_ascii_digit() || v.as_bytes()[3].eq_ignore_ascii_case(&b'x'));
    if !ok {
        return Err(ApiError::invalid(
            "`last4` must be the last four characters of the holder's ID: three digits and a digit or X",
        ));
    }
    Ok(v.to_owned())
}

impl Admin {
    pub(super) async fn applications(
        &self,
        route: RouteId,
        param: &str,
        req: Req,
        actor: Actor,
        now_ms: i64,
    ) -> Result<Response<Body>, ApiError> {
        let gw = self.gateway.clone();
        let id = || derived_id_param(param, "AP", "application");
        match route {
            RouteId::ApplicationPost => {
                let s = submission(&self.body(req).await?)?;
                let view = completed(async move { gw.submit_application(&actor, s, now_ms).await })
                    .await?;
                Ok(ok_json(&view))
            }
            RouteId::ApplicationStep => {
                let id = id()?;
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["step", "card_no", "branch", "note"])?;
                let step = one_of(&m, "step", AppStep::parse, AppStep::expected)?
                    .ok_or_else(|| ApiError::invalid("missing field `step`"))?;
                let input = StepInput {
                    card_no: card(&m, "card_no")?,
                    branch: text(&m, "branch")?,
                    note: one_line(&m, "note", 200)?,
                };
                let view = completed(async move {
                    gw.application_step(&actor, &id, step, input, now_ms).await
                })
                .await?;
                Ok(ok_json(&view))
            }
            RouteId::ApplicationGet => {
                let id = id()?;
                let a = crate::store::applications::get(&gw.store, &id)
                    .await
                    .map_err(super::unreadable)?
                    .ok_or_else(|| {
                        ApiError::new(
                            onecard_core::wire::ErrorCode::NotFound,
                            format!("no application {id}"),
                        )
                    })?;
                Ok(ok_json(&crate::service::applications::shown(&a)))
            }
            RouteId::ApplicationFind => {
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["personal_id"])?;
                let pid = wire::req_str(&m, "personal_id")?.to_owned();
                let found =
                    completed(async move { gw.applications_of(&actor, &pid, now_ms).await })
                        .await?;
                Ok(ok_json(&serde_json::json!({"applications": found})))
            }
            RouteId::ApplicationsOverdue => {
                let list = gw.overdue_applications(now_ms).await?;
                Ok(ok_json(&serde_json::json!({
                    "count": list.len(),
                    "applications": list,
                })))
            }
            RouteId::ApplicationStatus => {
                let id = id()?;
                let digits = last4(req.uri().query())?;
                match gw.application_status(&id, &digits, now_ms).await {
                    Ok(v) => Ok(ok_json(&v)),
                    // Locked until the hour ends: say when that is.
                    Err(e @ ServiceError::RateLimited(_)) => {
                        let left_ms = 3_600_000 - now_ms.rem_euclid(3_600_000);
                        Err(ApiError::from(e).retry_after(left_ms.div_euclid(1000) as u32 + 1))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            _ => unreachable!("only application routes are sent here"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_and_last_four_digits() {
        use super::super::valid_request_id;
        assert!(valid_request_id("hall-7/2026-12-07/0001"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(65)));
        assert_eq!(last4(Some("last4=123X")).unwrap(), "123X");
        assert_eq!(last4(Some("a=1&last4=0021")).unwrap(), "0021");
        assert!(last4(Some("last4=12")).is_err());
        assert!(last4(Some("last4=12X4")).is_err());
        assert!(last4(None).is_err());
    }

    #[test]
    fn a_submission_is_decoded_strictly() {
        let body = |v: Value| v.as_object().unwrap().clone();
        let ok = body(serde_json::json!({
            "request_id": "hall-1/1", "personal_id": "11010519491231002X",
            "channel": "service_hall", "place": "Yuzhong hall", "functions": ["transit"],
            "proxy": {"personal_id": "110105198001010011", "relation": "child", "name": "张小明"},
        }));
        let s = submission(&ok).unwrap();
        assert_eq!(s.kind, AppKind::New);
        assert_eq!(
            s.proxy.as_ref().unwrap().name_masked.as_deref(),
            Some("张**")
        );
        for (field, bad) in [
            ("channel", serde_json::json!("fax")),
            ("functions", serde_json::json!([])),
            ("disabled", serde_json::json!("yes")),
            ("proxy", serde_json::json!({"personal_id": "x"})),
            ("place", serde_json::json!("")),
            ("colour", serde_json::json!("red")),
        ] {
            let mut m = ok.clone();
            m.insert(field.to_owned(), bad);
            let e = submission(&m).unwrap_err();
            assert!(
                e.message.contains(field) || field == "colour" && e.message.contains("colour"),
                "{field}: {}",
                e.message
            );
        }
    }
}
