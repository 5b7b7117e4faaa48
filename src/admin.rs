//! The admin listener: the card and deny-list API for operators (bearer
//! token), and `/metrics`, `/healthz`, `/readyz` for SRE (no token).
//!
//! Every change is durable before it is answered and takes effect for the
//! very next authorization: it goes through the journal writer and then into
//! the in-memory tables the hot path reads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::Value;

use crate::gateway::{journal_error, Gateway};
use crate::ingress::{error_response, json_response, read_json_body, status_label, Body};
use crate::model::{Card, CardNo, CardStatus, Concession, Function};
use crate::state::cards::CardRecord;
use crate::state::denylist::DENY_REASON_LEN_MAX;
use crate::wire::{self, ApiError, ErrorKind};

/// Admin bodies are small; this bounds them independently of terminals'.
pub const ADMIN_BODY_BYTES_MAX: usize = 16 * 1024;

pub struct Admin {
    pub gateway: Arc<Gateway>,
    pub token: Option<String>,
    pub prometheus: PrometheusHandle,
}

#[derive(Serialize)]
struct CardView<'a> {
    card_no: &'a str,
    #[serde(flatten)]
    record: CardRecord,
    denylisted: bool,
}

fn ok_json<T: Serialize>(v: &T) -> Response<Body> {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(v).expect("admin views always serialize"),
    )
}

/// Compares in time independent of where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let (route, response) = self.route(req, &path).await;
        metrics::counter!("onecard_http_requests_total", "listener" => "admin", "route" => route, "status" => status_label(response.status())).increment(1);
        response
    }

    async fn route(&self, req: Request<Incoming>, path: &str) -> (&'static str, Response<Body>) {
        let method = req.method().clone();
        match path {
            "/healthz" => ("/healthz", ok_json(&serde_json::json!({"status": "ok"}))),
            "/readyz" => (
                "/readyz",
                match self.gateway.not_ready() {
                    None => ok_json(&serde_json::json!({"status": "ready"})),
                    Some(why) => error_response(&ApiError::new(
                        ErrorKind::Unavailable,
                        format!("not ready: {why}"),
                    )),
                },
            ),
            "/metrics" => {
                let mut r = Response::new(Full::new(Bytes::from(self.prometheus.render())));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                ("/metrics", r)
            }
            p if p.starts_with("/admin/") => {
                let route = if p.starts_with("/admin/v1/cards/") {
                    "/admin/v1/cards/{card_no}"
                } else if p.starts_with("/admin/v1/denylist/") {
                    "/admin/v1/denylist/{card_no}"
                } else {
                    "/admin/other"
                };
                if let Err(e) = self.authenticate(&req) {
                    return (route, error_response(&e));
                }
                let r = match self.admin(method, req, p).await {
                    Ok(r) => r,
                    Err(e) => error_response(&e),
                };
                (route, r)
            }
            _ => (
                "other",
                error_response(&ApiError::new(
                    ErrorKind::NotFound,
                    "no such route on the admin listener",
                )),
            ),
        }
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Result<(), ApiError> {
        let Some(token) = self.token.as_deref().filter(|t| !t.is_empty()) else {
            return Err(ApiError::new(
                ErrorKind::Unauthenticated,
                "the admin API is disabled: no admin token is configured",
            ));
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::new(
                ErrorKind::Unauthenticated,
                "the bearer token is not valid",
            )),
            None => Err(ApiError::new(
                ErrorKind::Unauthenticated,
                "missing `Authorization: Bearer <token>` header",
            )),
        }
    }

    async fn admin(
        &self,
        method: Method,
        req: Request<Incoming>,
        path: &str,
    ) -> Result<Response<Body>, ApiError> {
        let not_found = || ApiError::new(ErrorKind::NotFound, "no such admin route");
        if let Some(card) = path.strip_prefix("/admin/v1/cards/") {
            let card_no = wire::card_no_field("card_no in the path", card)?;
            return match method {
                Method::PUT => self.put_card(&card_no, self.body(req).await?).await,
                Method::GET => self.get_card(&card_no),
                _ => Err(ApiError::new(ErrorKind::NotFound, "cards take GET and PUT")),
            };
        }
        if let Some(card) = path.strip_prefix("/admin/v1/denylist/") {
            let card_no = wire::card_no_field("card_no in the path", card)?;
            return match method {
                Method::PUT => self.deny(&card_no, self.body(req).await?).await,
                Method::DELETE => self.lift(&card_no).await,
                Method::GET => self.get_deny(&card_no),
                _ => Err(ApiError::new(
                    ErrorKind::NotFound,
                    "deny-list entries take GET, PUT and DELETE",
                )),
            };
        }
        if path == "/admin/v1/status" && method == Method::GET {
            let gw = &self.gateway;
            return Ok(ok_json(&serde_json::json!({
                "cards": gw.cards.len(),
                "denylist": {"entries": gw.deny.len(), "version": gw.deny.version()},
                "journal": {"last_seq": gw.journal.last_seq(), "healthy": gw.journal.is_healthy(), "durability": gw.config.journal.durability},
                "connections_open": gw.admission.connections_open(),
            })));
        }
        Err(not_found())
    }

    async fn body(
        &self,
        req: Request<Incoming>,
    ) -> Result<serde_json::Map<String, Value>, ApiError> {
        let timeout = Duration::from_millis(self.gateway.config.limits.header_read_timeout_ms);
        let bytes = read_json_body(req, ADMIN_BODY_BYTES_MAX, timeout).await?;
        wire::parse_object(&bytes)
    }

    async fn put_card(
        &self,
        card_no: &CardNo,
        m: serde_json::Map<String, Value>,
    ) -> Result<Response<Body>, ApiError> {
        wire::reject_unknown(&m, &["status", "functions", "concessions"])?;
        let status = wire::req_str(&m, "status")?;
        let status = CardStatus::parse(status).ok_or_else(|| {
            ApiError::invalid(format!(
                "`status` must be one of {}",
                CardStatus::expected()
            ))
        })?;
        let functions = enum_list(&m, "functions", Function::parse, Function::expected)?;
        let concessions = enum_list(&m, "concessions", Concession::parse, Concession::expected)?;
        let stored = self
            .gateway
            .put_card(card_no, Card::new(status, &functions, &concessions))
            .await?;
        Ok(ok_json(&CardView {
            card_no: card_no.as_str(),
            record: CardRecord::from(&stored),
            denylisted: self.denylisted(card_no),
        }))
    }

    fn denylisted(&self, card_no: &CardNo) -> bool {
        crate::authz::DenySet::contains(&self.gateway.deny, card_no)
    }

    fn get_card(&self, card_no: &CardNo) -> Result<Response<Body>, ApiError> {
        let card = self.gateway.cards.get(card_no).ok_or_else(|| {
            ApiError::new(ErrorKind::NotFound, format!("card {card_no} is not known"))
        })?;
        Ok(ok_json(&CardView {
            card_no: card_no.as_str(),
            record: CardRecord::from(&card),
            denylisted: self.denylisted(card_no),
        }))
    }

    async fn deny(
        &self,
        card_no: &CardNo,
        m: serde_json::Map<String, Value>,
    ) -> Result<Response<Body>, ApiError> {
        wire::reject_unknown(&m, &["reason"])?;
        let reason = wire::req_str(&m, "reason")?;
        let n = reason.chars().count();
        if n == 0 || n > DENY_REASON_LEN_MAX || reason.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "`reason` must be 1 to {DENY_REASON_LEN_MAX} characters without control characters"
            )));
        }
        let gw = &self.gateway;
        let version = gw
            .deny
            .add(&gw.journal, card_no, reason, gw.now_ms())
            .await
            .map_err(journal_error)?;
        tracing::info!(card = %card_no, denylist.version = version, "deny-listed");
        Ok(ok_json(
            &serde_json::json!({"card_no": card_no.as_str(), "reason": reason, "version": version}),
        ))
    }

    async fn lift(&self, card_no: &CardNo) -> Result<Response<Body>, ApiError> {
        let gw = &self.gateway;
        match gw
            .deny
            .remove(&gw.journal, card_no, gw.now_ms())
            .await
            .map_err(journal_error)?
        {
            Some(version) => {
                tracing::info!(card = %card_no, denylist.version = version, "lifted from the deny list");
                Ok(ok_json(
                    &serde_json::json!({"card_no": card_no.as_str(), "lifted": true, "version": version}),
                ))
            }
            None => Err(ApiError::new(
                ErrorKind::NotFound,
                format!("card {card_no} is not on the deny list"),
            )),
        }
    }

    fn get_deny(&self, card_no: &CardNo) -> Result<Response<Body>, ApiError> {
        let e = self.gateway.deny.get(card_no).ok_or_else(|| {
            ApiError::new(
                ErrorKind::NotFound,
                format!("card {card_no} is not on the deny list"),
            )
        })?;
        Ok(ok_json(
            &serde_json::json!({"card_no": card_no.as_str(), "reason": e.reason, "version": e.version}),
        ))
    }
}

/// An optional array of enum names; duplicates are folded.
fn enum_list<T: PartialEq + Copy>(
    m: &serde_json::Map<String, Value>,
    field: &str,
    parse: fn(&str) -> Option<T>,
    expected: fn() -> String,
) -> Result<Vec<T>, ApiError> {
    let Some(v) = m.get(field) else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = v else {
        return Err(ApiError::invalid(format!(
            "`{field}` must be an array of strings"
        )));
    };
    let mut out = Vec::new();
    for item in items {
        let t = item.as_str().and_then(parse).ok_or_else(|| {
            ApiError::invalid(format!("`{field}` entries must be among {}", expected()))
        })?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}
