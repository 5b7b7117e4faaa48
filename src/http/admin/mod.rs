//! The admin listener: the card and deny-list API for operators (bearer
//! token), and `/metrics`, `/healthz`, `/readyz` for SRE (no token).
//!
//! Every change is durable before it is answered and takes effect for the
//! very next authorization: it goes through the journal writer and then into
//! the in-memory tables the hot path reads.

mod applications;
mod complaints;
mod dashboard;
mod rollout;
mod scenes;
mod trust;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::Value;

use onecard_core::cardlife::LifeOp;
use onecard_core::disburse;
use onecard_core::model::CardNo;
use onecard_core::qr::CredType;
use onecard_core::settle::batch::DaySite;
use onecard_core::wire::{self, ErrorCode};

use crate::config::{Principal, Role};
use crate::http::admission::Admission;
use crate::http::error::ApiError;
use crate::http::ingress::{
    error_response, json_response, read_body, read_json_body, status_label, wrong_method, Body, Req,
};
use crate::http::routes::{self, Access, Listener, Match, RouteId};
use crate::net::tls::TerminalTls;
use crate::service::cardlife::Actor;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::settle;
use crate::service::{hotline, import, offline};
use crate::store::cards::CardRecord;
use crate::store::durable::CommitError;
use crate::store::{audit, profiles};

/// Admin bodies are small; this bounds them independently of terminals'.
pub const ADMIN_BODY_BYTES_MAX: usize = 16 * 1024;
/// An import body (up to 32 MiB) may take this long to arrive: long enough
/// for a slow link, bounded so that a stalled upload frees its slot.
pub const IMPORT_BODY_TIMEOUT: Duration = Duration::from_secs(120);
/// Parked batches listed (and counted in the status) at most.
pub const SETTLE_PARKED_SHOWN: usize = 1_000;

pub struct Admin {
    pub gateway: Arc<Gateway>,
    /// The terminal listener's limits, for the status view.
    admission: Arc<Admission>,
    /// The accepted tokens and whose they are.
    principals: Vec<Principal>,
    pub prometheus: PrometheusHandle,
    /// One bulk import at a time: each holds up to 32 MiB of body and a
    /// parsed copy, and two would only compete for the journal.
    imports: Arc<tokio::sync::Semaphore>,
    /// One disbursement batch at a time: a batch id is looked up, then
    /// recorded, and two uploads of one id must not both find it new.
    disbursements: Arc<tokio::sync::Semaphore>,
    /// The terminal listener's certificates and CRLs (reloadable).
    tls: Arc<TerminalTls>,
}

#[derive(Serialize)]
struct CardView<'a> {
    card_no: &'a str,
    #[serde(flatten)]
    record: CardRecord,
    denylisted: bool,
}

impl Admin {
    pub fn new(
        gateway: Arc<Gateway>,
        admission: Arc<Admission>,
        principals: Vec<Principal>,
        prometheus: PrometheusHandle,
        tls: Arc<TerminalTls>,
    ) -> Admin {
        Admin {
            admission,
            principals,
            prometheus,
            imports: Arc::new(tokio::sync::Semaphore::new(1)),
            disbursements: Arc::new(tokio::sync::Semaphore::new(1)),
            tls,
            gateway,
        }
    }
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
    pub async fn handle(self: Arc<Self>, req: Req) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let (route, response) = self.route(req, &path).await;
        metrics::counter!("onecard_http_requests_total", "listener" => "admin", "route" => route, "status" => status_label(response.status())).increment(1);
        response
    }

    async fn route(&self, req: Req, path: &str) -> (&'static str, Response<Body>) {
        let (route, param) = match routes::find(Listener::Admin, req.method(), path) {
            Match::Found { route, param } => (route, param),
            Match::WrongMethod { path, allowed } => return (path, wrong_method(path, &allowed)),
            Match::NotFound => {
                let e = ApiError::new(
                    ErrorCode::NotFound,
                    "no such route on the admin listener; see docs/openapi.json",
                );
                return ("other", error_response(&e));
            }
        };
        let actor = match route.access {
            Access::Open => None,
            needed => match self.authenticate(&req, needed) {
                Ok(actor) => Some(actor),
                Err(e) => return (route.path, error_response(&e)),
            },
        };
        let response = match self
            .dispatch(route.id, param.unwrap_or(""), req, actor)
            .await
        {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        (route.path, response)
    }

    /// Who holds the bearer token, if it is one of ours and its role may
    /// call a route that needs `needed`.
    fn authenticate(&self, req: &Req, needed: Access) -> Result<Actor, ApiError> {
        if self.principals.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "the admin API is disabled: no admin token is configured",
            ));
        }
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(given) = given else {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "missing `Authorization: Bearer <token>` header",
            ));
        };
        // Every token is compared, in constant time each, so the time
        // taken does not tell which one came close.
        let mut found = None;
        for p in &self.principals {
            if constant_time_eq(given.as_bytes(), p.token.as_bytes()) {
                found = Some(p);
            }
        }
        let Some(p) = found else {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "the bearer token is not valid",
            ));
        };
        let (allowed, wanted) = match needed {
            Access::Open => (true, ""),
            Access::Agent => (
                matches!(p.role, Role::Agent | Role::Operator),
                "an agent or operator token",
            ),
            Access::Operator => (p.role == Role::Operator, "an operator token"),
            Access::Security => (
                matches!(p.role, Role::Security | Role::Operator),
                "a security or operator token",
            ),
            Access::Counter => (
                matches!(p.role, Role::Counter | Role::Operator),
                "a counter or operator token",
            ),
            Access::Desk => (
                matches!(p.role, Role::Counter | Role::Agent | Role::Operator),
                "a counter, agent or operator token",
            ),
            Access::Resident => (
                matches!(
                    p.role,
                    Role::Channel | Role::Counter | Role::Agent | Role::Operator
                ),
                "a channel, counter, agent or operator token",
            ),
        };
        if !allowed {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "the token of {} has the role {}; this needs {wanted}",
                    p.name,
                    p.role.as_str()
                ),
            ));
        }
        Ok(Actor {
            name: p.name.clone(),
            role: p.role,
        })
    }

    async fn dispatch(
        &self,
        id: RouteId,
        param: &str,
        req: Req,
        actor: Option<Actor>,
    ) -> Result<Response<Body>, ApiError> {
        let card = || wire::card_no_field("card_no in the path", param);
        let actor = || actor.clone().expect("token routes have an actor");
        let now = self.gateway.now_ms();
        match id {
            RouteId::Healthz => Ok(ok_json(&serde_json::json!({"status": "ok"}))),
            RouteId::Readyz => match self.gateway.not_ready() {
                None => Ok(ok_json(
                    &serde_json::json!({"status": "ready", "warnings": self.gateway.warnings()}),
                )),
                Some(why) => Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("not ready: {why}"),
                )),
            },
            RouteId::Metrics => {
                self.gateway.publish_gauges();
                let mut r = Response::new(Full::new(Bytes::from(self.prometheus.render())));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Ok(r)
            }
            RouteId::Dashboard => Ok(dashboard::page()),
            RouteId::LogGet => Ok(ok_json(&serde_json::json!({
                "level": crate::service::logs::level(),
                "format": self.gateway.config.log.format,
                "slow_request_ms": self.gateway.config.log.slow_request_ms,
            }))),
            RouteId::LogPut => {
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["level"])?;
                let level = wire::req_str(&m, "level")?;
                if level.len() > 512 {
                    return Err(ApiError::invalid("`level` must be at most 512 characters"));
                }
                use crate::service::logs::{set_level, LevelError};
                let before = set_level(level).map_err(|e| match e {
                    LevelError::Invalid(_) => ApiError::invalid(e.to_string()),
                    LevelError::NotOurs => ApiError::new(ErrorCode::Unavailable, e.to_string()),
                })?;
                Ok(ok_json(
                    &serde_json::json!({"level": level, "before": before}),
                ))
            }
            RouteId::DashboardData => {
                let tls = self.tls.info();
                Ok(ok_json(&dashboard::data(
                    &self.gateway,
                    &self.admission,
                    tls.server_cert_not_after_s.unwrap_or(0),
                    tls.client_ca_not_after_s.unwrap_or(0),
                )))
            }
            RouteId::CardPut => {
                let card_no = card()?;
                self.put_card(&card_no, self.body(req).await?).await
            }
            RouteId::CardGet => self.get_card(&card()?),
            RouteId::DenyPut => {
                let card_no = card()?;
                self.deny(&card_no, self.body(req).await?).await
            }
            RouteId::DenyDelete => self.lift(&card()?).await,
            RouteId::DenyGet => self.get_deny(&card()?),
            RouteId::Status => {
                let gw = &self.gateway;
                Ok(ok_json(&serde_json::json!({
                    "cards": gw.cards.len(),
                    "denylist": {"entries": gw.deny.len(), "version": gw.deny.version()},
                    "journal": {"last_seq": gw.journal.last_seq(), "healthy": gw.journal.is_healthy(), "durability": gw.config.journal.durability},
                    "cluster": gw.journal.cluster_view(),
                    "connections_open": self.admission.connections_open(),
                    "process": {
                        "resident_bytes": crate::service::metrics::resident_bytes(),
                        "startup_seconds": crate::service::metrics::startup_seconds(),
                    },
                })))
            }
            RouteId::ImportCards | RouteId::ImportDenylist => self.import(id, req).await,
            RouteId::CardHealth
            | RouteId::AccessAllowPost
            | RouteId::AccessAllowGet
            | RouteId::PartnerDenyPut
            | RouteId::PartnerDenyGet
            | RouteId::Venues => self.scenes(id, param, req, actor(), now).await,
            RouteId::Settlement => self.settlement_status(),
            RouteId::TerminalBlocks
            | RouteId::TerminalBlockPut
            | RouteId::TerminalBlockDelete
            | RouteId::TerminalGet
            | RouteId::TlsGet
            | RouteId::TlsReload => self.trust(id, param, req, actor(), now).await,
            RouteId::ApplicationPost
            | RouteId::ApplicationGet
            | RouteId::ApplicationStep
            | RouteId::ApplicationFind
            | RouteId::ApplicationsOverdue
            | RouteId::ApplicationStatus => self.applications(id, param, req, actor(), now).await,
            RouteId::ComplaintPost
            | RouteId::Complaints
            | RouteId::ComplaintGet
            | RouteId::ComplaintNote
            | RouteId::ComplaintClose => self.complaints(id, param, req, actor(), now).await,
            RouteId::RolloutReport => self.rollout_report(req.uri().query(), now).await,
            RouteId::Stats => {
                let window = stats_window(req.uri().query())?;
                Ok(ok_json(&self.gateway.stats.window(window)))
            }
            RouteId::SettlementParked
            | RouteId::SettlementReplay
            | RouteId::SettlementPause
            | RouteId::SettlementResume => self.settlement_sink(id, param),
            RouteId::SettlementReport => self.settlement_report(param),
            RouteId::CardLoss
            | RouteId::CardLossLift
            | RouteId::CardFreeze
            | RouteId::CardUnfreeze
            | RouteId::CardCancel => {
                let card_no = card()?;
                let op = match id {
                    RouteId::CardLoss => LifeOp::ReportLoss,
                    RouteId::CardLossLift => LifeOp::LiftLoss,
                    RouteId::CardFreeze => LifeOp::Freeze,
                    RouteId::CardUnfreeze => LifeOp::Unfreeze,
                    _ => LifeOp::Cancel,
                };
                let m = self.optional_body(req).await?;
                wire::reject_unknown(&m, &["note"])?;
                let note = wire::opt_str(&m, "note")?.map(str::to_owned);
                if note.as_ref().is_some_and(|n| n.chars().count() > 200) {
                    return Err(ApiError::invalid("`note` must be at most 200 characters"));
                }
                let (gw, actor) = (self.gateway.clone(), actor());
                let answer =
                    completed(async move { gw.card_life(&actor, &card_no, op, note, now).await })
                        .await?;
                Ok(ok_json(&answer))
            }
            RouteId::CardReplace => {
                let card_no = card()?;
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["new_card_no"])?;
                let new = wire::card_no_field("new_card_no", wire::req_str(&m, "new_card_no")?)?;
                let (gw, actor) = (self.gateway.clone(), actor());
                let answer =
                    completed(async move { gw.replace_card(&actor, &card_no, &new, now).await })
                        .await?;
                Ok(ok_json(&answer))
            }
            RouteId::CardCredentials => {
                let card_no = card()?;
                if self.gateway.cards.get(&card_no).is_none() {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("card {card_no} is not known"),
                    ));
                }
                let p = profiles::profile(&self.gateway.store, &card_no).map_err(unreadable)?;
                Ok(ok_json(&serde_json::json!({
                    "card_no": card_no.as_str(),
                    "credentials": p.credentials,
                    "holder_recorded": p.holder.is_some(),
                    "replaces": p.replaces,
                    "replaced_by": p.replaced_by,
                })))
            }
            RouteId::CredentialBind => {
                let card_no = card()?;
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["credential_id", "typ"])?;
                let cred = wire::req_str(&m, "credential_id")?.to_owned();
                if !profiles::valid_credential_id(&cred) {
                    return Err(ApiError::invalid(
                        "`credential_id` must be 1 to 64 of A-Za-z0-9_-",
                    ));
                }
                let typ = CredType::parse(wire::req_str(&m, "typ")?)
                    .ok_or_else(|| ApiError::invalid("`typ` must be essc or ykm"))?;
                let (gw, actor, c) = (self.gateway.clone(), actor(), cred.clone());
                let bound =
                    completed(
                        async move { gw.bind_credential(&actor, &card_no, &c, typ, now).await },
                    )
                    .await?;
                Ok(ok_json(&serde_json::json!({
                    "credential_id": cred, "typ": typ, "card_no": param, "changed": bound,
                })))
            }
            RouteId::CredentialUnbind => {
                if !profiles::valid_credential_id(param) {
                    return Err(ApiError::invalid(
                        "the credential id in the path must be 1 to 64 of A-Za-z0-9_-",
                    ));
                }
                let (gw, actor, c) = (self.gateway.clone(), actor(), param.to_owned());
                let card_no =
                    completed(async move { gw.unbind_credential(&actor, &c, now).await }).await?;
                Ok(ok_json(&serde_json::json!({
                    "credential_id": param, "card_no": card_no.as_str(), "unbound": true,
                })))
            }
            RouteId::CardHolder => {
                let card_no = card()?;
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["personal_id", "name"])?;
                let id = wire::req_str(&m, "personal_id")?.to_owned();
                let name = match wire::opt_str(&m, "name")? {
                    None => None,
                    Some(n) => Some(onecard_core::privacy::mask_name(n).ok_or_else(|| {
                        ApiError::invalid(
                            "`name` must be 1 to 64 characters without control characters",
                        )
                    })?),
                };
                let (gw, actor, c) = (self.gateway.clone(), actor(), card_no.clone());
                let masked = name.clone();
                completed(async move { gw.set_holder(&actor, &c, &id, masked, now).await }).await?;
                Ok(ok_json(&serde_json::json!({
                    "card_no": card_no.as_str(), "holder_recorded": true, "name": name,
                })))
            }
            RouteId::CardFind => {
                let m = self.body(req).await?;
                wire::reject_unknown(&m, &["personal_id"])?;
                let id = wire::req_str(&m, "personal_id")?.to_owned();
                let (gw, actor) = (self.gateway.clone(), actor());
                let card_no =
                    completed(async move { gw.find_card(&actor, &id, now).await }).await?;
                self.get_card(&card_no)
            }
            RouteId::CardTransactions => {
                let card_no = card()?;
                let w = hotline::window(req.uri().query())?;
                let (gw, actor) = (self.gateway.clone(), actor());
                let lookup =
                    completed(async move { gw.card_transactions(&actor, &card_no, w, now).await })
                        .await?;
                Ok(ok_json(&lookup))
            }
            RouteId::Audit => {
                let (limit, before) = audit_query(req.uri().query())?;
                let entries =
                    audit::list(&self.gateway.store, before, limit).map_err(unreadable)?;
                let next = entries.last().map(|(seq, _)| *seq);
                let entries: Vec<Value> = entries
                    .into_iter()
                    .map(|(seq, e)| {
                        let mut v = serde_json::to_value(e).expect("serializes");
                        v["seq"] = Value::from(seq);
                        v
                    })
                    .collect();
                Ok(ok_json(
                    &serde_json::json!({"entries": entries, "before": next}),
                ))
            }
            RouteId::OfflineRisk => {
                let risks = offline::risk_list(&self.gateway, 1_000)?;
                Ok(ok_json(&serde_json::json!({"risks": risks})))
            }
            RouteId::DisbursementPost => self.disburse(param, req, actor()).await,
            RouteId::DisbursementGet => Ok(json_response(
                StatusCode::OK,
                crate::service::disburse::report(&self.gateway, param)?,
            )),
            RouteId::ProjectWorkers => {
                disburse::check_project(param)?;
                let timeout =
                    Duration::from_millis(self.gateway.config.limits.header_read_timeout_ms);
                let body = read_json_body(req, disburse::ROSTER_BODY_BYTES_MAX, timeout).await?;
                let workers = disburse::parse_roster(&body)?;
                let (gw, actor, project) = (self.gateway.clone(), actor(), param.to_owned());
                let n = completed(async move {
                    crate::service::disburse::put_roster(&gw, &actor, &project, workers).await
                })
                .await?;
                Ok(ok_json(
                    &serde_json::json!({"project": param, "workers": n}),
                ))
            }
            RouteId::ProjectUnpaid => {
                let month = disburse::month_query(req.uri().query())?;
                let (gw, project) = (self.gateway.clone(), param.to_owned());
                Ok(ok_json(
                    &crate::service::disburse::unpaid(gw, project, month).await?,
                ))
            }
            RouteId::Authorize
            | RouteId::Reverse
            | RouteId::Hold
            | RouteId::Capture
            | RouteId::Void
            | RouteId::Ping
            | RouteId::DenylistSync
            | RouteId::OfflineBatch => Err(ApiError::new(
                ErrorCode::NotFound,
                "authorizations go to the terminal listener",
            )),
        }
    }

    async fn import(&self, id: RouteId, req: Req) -> Result<Response<Body>, ApiError> {
        // Owned: the slot goes with the import's own task, which runs to
        // its end even if this handler is dropped (the client hung up).
        let Ok(slot) = self.imports.clone().try_acquire_owned() else {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "another import is running; send this one when it has finished",
            ));
        };
        let body = read_body(
            req,
            "application/x-ndjson",
            import::IMPORT_BODY_BYTES_MAX,
            IMPORT_BODY_TIMEOUT,
        )
        .await?;
        let gw = self.gateway.clone();
        let report = match id {
            RouteId::ImportCards => import::cards(gw, body, slot).await?,
            _ => import::denylist(gw, body, slot).await?,
        };
        Ok(ok_json(&report))
    }

    /// `POST /admin/v1/disbursements/{batch_id}`: NDJSON or CSV, one batch
    /// at a time (a second is refused at once, not queued).
    async fn disburse(
        &self,
        batch_id: &str,
        req: Req,
        actor: Actor,
    ) -> Result<Response<Body>, ApiError> {
        disburse::check_batch_id(batch_id)?;
        let ct = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some((format, media)) = disburse::Format::from_content_type(ct) else {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "Content-Type must be application/x-ndjson, application/json (JSON lines) or text/csv",
            ));
        };
        let Ok(slot) = self.disbursements.clone().try_acquire_owned() else {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "another disbursement batch is being recorded; send this one when it has finished",
            ));
        };
        let body = read_body(req, media, disburse::BODY_BYTES_MAX, IMPORT_BODY_TIMEOUT).await?;
        let report = crate::service::disburse::upload(
            self.gateway.clone(),
            actor,
            batch_id.to_owned(),
            format,
            body,
            slot,
        )
        .await?;
        Ok(json_response(StatusCode::OK, report))
    }

    fn parked(&self, sink: &str, n: usize) -> Result<Vec<settle::Stored>, ApiError> {
        settle::list_heads(&self.gateway.store, &settle::parked_prefix(sink), n)
            .map_err(|_| ApiError::new(ErrorCode::Unavailable, "the store cannot be read; retry"))
    }

    /// `GET /admin/v1/settlement`: every sink's cursor, backlog, circuit,
    /// pause and parked batches.
    fn settlement_status(&self) -> Result<Response<Body>, ApiError> {
        let gw = &self.gateway;
        let mut sinks = Vec::new();
        for s in gw.settlement.all() {
            sinks.push(s.view(gw.now_ms()));
        }
        Ok(ok_json(&serde_json::json!({"sinks": sinks})))
    }

    /// `GET /admin/v1/settlement/report/{day}`: for reconciliation, each
    /// sink's acknowledged charges and reversals of a local day, in total
    /// and by site, and what of that day still awaits acknowledgement
    /// (stored or parked batches; events not yet sealed are not counted).
    fn settlement_report(&self, day: &str) -> Result<Response<Body>, ApiError> {
        let n = onecard_core::time::parse_day(day).ok_or_else(|| {
            ApiError::invalid("the day in the path must be a date such as 2026-11-28")
        })?;
        let gw = &self.gateway;
        let unreadable =
            |_| ApiError::new(ErrorCode::Unavailable, "the store cannot be read; retry");
        let mut sinks = Vec::new();
        for s in gw.settlement.all() {
            let mut sites = settle::report(&gw.store, &s.name, n).map_err(unreadable)?;
            sites.sort_by(|a, b| a.site.cmp(&b.site));
            let mut total = DaySite::default();
            for site in &sites {
                total.add(site);
            }
            let pending = settle::pending(&gw.store, &s.name, n).map_err(unreadable)?;
            sinks.push(serde_json::json!({
                "sink": s.name,
                "acknowledged": report_figures(&total),
                "sites": sites.iter().map(|x| {
                    let mut v = report_figures(x);
                    v["site"] = if x.site.is_empty() { Value::Null } else { Value::from(x.site.as_str()) };
                    v
                }).collect::<Vec<_>>(),
                "pending": report_figures(&pending),
            }));
        }
        Ok(ok_json(&serde_json::json!({
            "day": day,
            "day_offset_minutes": gw.policy.day_offset_minutes,
            "sinks": sinks,
        })))
    }

    /// Parked batches of a sink, replay, pause and resume.
    fn settlement_sink(&self, id: RouteId, sink: &str) -> Result<Response<Body>, ApiError> {
        let status = self.gateway.settlement.get(sink).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                "no such settlement sink; GET /admin/v1/settlement lists them",
            )
        })?;
        match id {
            RouteId::SettlementParked => {
                let parked: Vec<serde_json::Value> = self
                    .parked(sink, SETTLE_PARKED_SHOWN)?
                    .into_iter()
                    .map(|b| {
                        serde_json::json!({"batch_id": b.id, "first_seq": b.first_seq, "last_seq": b.last_seq,
                                           "count": b.count, "total_fen": b.total_fen, "why": b.parked})
                    })
                    .collect();
                Ok(ok_json(
                    &serde_json::json!({"sink": sink, "parked": parked}),
                ))
            }
            RouteId::SettlementReplay => {
                let n = self.parked(sink, usize::MAX)?.len();
                status.request_replay();
                tracing::info!(sink, batches = n, "replay of parked batches requested");
                Ok(ok_json(&serde_json::json!({"sink": sink, "replaying": n})))
            }
            RouteId::SettlementPause | RouteId::SettlementResume => {
                let paused = id == RouteId::SettlementPause;
                status.pause(paused);
                tracing::info!(
                    sink,
                    paused,
                    "settlement delivery paused or resumed by an operator"
                );
                Ok(ok_json(
                    &serde_json::json!({"sink": sink, "paused": paused}),
                ))
            }
            _ => unreachable!("only settlement sink routes come here"),
        }
    }

    /// A JSON body that may be absent (an empty map then).
    async fn optional_body(&self, req: Req) -> Result<serde_json::Map<String, Value>, ApiError> {
        let timeout = Duration::from_millis(self.gateway.config.limits.header_read_timeout_ms);
        // No body at all (`curl -X POST` without data sends neither a
        // length nor a type): nothing to read and no type to require.
        let empty = {
            use hyper::body::Body as _;
            req.body().is_end_stream() || req.body().size_hint().exact() == Some(0)
        };
        if empty {
            return Ok(serde_json::Map::new());
        }
        let bytes = read_body(req, "application/json", ADMIN_BODY_BYTES_MAX, timeout).await?;
        if bytes.is_empty() {
            return Ok(serde_json::Map::new());
        }
        Ok(wire::parse_object(&bytes)?)
    }

    async fn body(&self, req: Req) -> Result<serde_json::Map<String, Value>, ApiError> {
        let timeout = Duration::from_millis(self.gateway.config.limits.header_read_timeout_ms);
        let bytes = read_json_body(req, ADMIN_BODY_BYTES_MAX, timeout).await?;
        Ok(wire::parse_object(&bytes)?)
    }

    async fn put_card(
        &self,
        card_no: &CardNo,
        m: serde_json::Map<String, Value>,
    ) -> Result<Response<Body>, ApiError> {
        wire::reject_unknown(&m, &["status", "functions", "concessions"])?;
        let card = wire::card_fields(&m)?;
        let stored = self.gateway.put_card(card_no, card).await?;
        Ok(ok_json(&CardView {
            card_no: card_no.as_str(),
            record: CardRecord::from(&stored),
            denylisted: self.denylisted(card_no),
        }))
    }

    fn denylisted(&self, card_no: &CardNo) -> bool {
        onecard_core::authz::DenySet::contains(&*self.gateway.deny, card_no)
    }

    fn get_card(&self, card_no: &CardNo) -> Result<Response<Body>, ApiError> {
        let card = self.gateway.cards.get(card_no).ok_or_else(|| {
            ApiError::new(ErrorCode::NotFound, format!("card {card_no} is not known"))
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
        wire::deny_reason(reason)?;
        let (gw, card, why) = (self.gateway.clone(), card_no.clone(), reason.to_owned());
        let version =
            to_completion(async move { gw.deny.add(&*gw.journal, &card, &why, gw.now_ms()).await })
                .await?;
        tracing::info!(card = %card_no, denylist.version = version, "deny-listed");
        Ok(ok_json(
            &serde_json::json!({"card_no": card_no.as_str(), "reason": reason, "version": version}),
        ))
    }

    async fn lift(&self, card_no: &CardNo) -> Result<Response<Body>, ApiError> {
        let (gw, card) = (self.gateway.clone(), card_no.clone());
        match to_completion(async move { gw.deny.remove(&*gw.journal, &card, gw.now_ms()).await })
            .await?
        {
            Some(version) => {
                tracing::info!(card = %card_no, denylist.version = version, "lifted from the deny list");
                Ok(ok_json(
                    &serde_json::json!({"card_no": card_no.as_str(), "lifted": true, "version": version}),
                ))
            }
            None => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("card {card_no} is not on the deny list"),
            )),
        }
    }

    fn get_deny(&self, card_no: &CardNo) -> Result<Response<Body>, ApiError> {
        let e = self.gateway.deny.get(card_no).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("card {card_no} is not on the deny list"),
            )
        })?;
        Ok(ok_json(
            &serde_json::json!({"card_no": card_no.as_str(), "reason": e.reason, "version": e.version}),
        ))
    }
}

/// Runs a deny-list change to its end even if the admin client hangs up
/// half-way: a change that reached disk must reach memory (and take its
/// version) too, or the next change would reuse the version number.
async fn to_completion<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, CommitError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(change)
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::Unavailable,
                "the change was interrupted; read the entry back and retry",
            )
        })?
        .map_err(|e| ServiceError::from(e).into())
}

/// Runs an admin change to its end even if the client hangs up: a loss
/// report that reached the journal must also reach memory.
async fn completed<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    change: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(change).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ApiError::new(
            ErrorCode::Unavailable,
            "the change was interrupted; read the card back and retry",
        )),
    }
}

/// An optional text field on one line: 1 to `max` characters once
/// trimmed, no control characters.
fn one_line(
    m: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, ApiError> {
    match wire::opt_str(m, field)? {
        None => Ok(None),
        Some(s) => {
            let s = s.trim();
            let n = s.chars().count();
            if (1..=max).contains(&n) && !s.chars().any(char::is_control) {
                Ok(Some(s.to_owned()))
            } else {
                Err(ApiError::invalid(format!(
                    "`{field}` must be 1 to {max} characters on one line"
                )))
            }
        }
    }
}

/// A caller's own id of its request: 1 to 64 of `A-Za-z0-9._:/-`.
fn valid_request_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

/// `request_id`, which the record a filing makes takes its id from, so
/// that a retry finds it.
fn request_id(m: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    let id = wire::req_str(m, "request_id")?;
    if !valid_request_id(id) {
        return Err(ApiError::invalid(
            "`request_id` must be 1 to 64 of A-Za-z0-9._:/- (the caller's own id of this request)",
        ));
    }
    Ok(id.to_owned())
}

/// A record's id in the path: `tag` and 20 upper-case hexadecimal digits
/// ([`crate::store::derived_id`]).
fn derived_id_param(param: &str, tag: &str, what: &str) -> Result<String, ApiError> {
    if crate::store::is_derived_id(tag, param) {
        Ok(param.to_owned())
    } else {
        Err(ApiError::invalid(format!(
            "the {what} id in the path must be {tag} and 20 hexadecimal digits (upper case)"
        )))
    }
}

fn unreadable(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "storage read failed");
    ApiError::new(ErrorCode::Unavailable, "the store cannot be read; retry")
}

/// `limit` (1 to 1000, default 100) and `before` (an entry number).
fn audit_query(query: Option<&str>) -> Result<(usize, Option<u64>), ApiError> {
    let (mut limit, mut before) = (100, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::invalid("`limit` must be 1 to 1000"))?
            }
            Some(("before", v)) => {
                before = Some(
                    v.parse()
                        .map_err(|_| ApiError::invalid("`before` must be an entry number"))?,
                )
            }
            _ => {
                return Err(ApiError::invalid(
                    "unknown query parameter; the audit takes limit and before",
                ))
            }
        }
    }
    Ok((limit, before))
}

/// One line of the daily report: charges, reversals, credits (money paid
/// to card holders), and the net amount the receiver should have booked.
fn report_figures(d: &DaySite) -> Value {
    serde_json::json!({
        "charges": d.charges,
        "charged_fen": d.charged_fen,
        "reversals": d.reversals,
        "reversed_fen": d.reversed_fen,
        "credits": d.credits,
        "credited_fen": d.credited_fen,
        "net_fen": d.net_fen(),
    })
}

/// `window=10s` or `window=60s` (10 s when absent).
fn stats_window(query: Option<&str>) -> Result<u64, ApiError> {
    let mut window = 10;
    for (k, v) in query
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
    {
        match (k, v) {
            ("window", "10s") => window = 10,
            ("window", "60s") => window = 60,
            ("window", _) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "`window` must be 10s or 60s",
                ))
            }
            _ => {}
        }
    }
    Ok(window)
}
