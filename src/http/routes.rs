//! The route table: every (listener, method, path) the gateway serves.
//!
//! Both listeners dispatch through [`find`], so this table *is* the API
//! surface; `docs/openapi.json` documents it and `tests/openapi.rs` checks
//! the two list the same operations. Paths have at most one parameter,
//! written like `{card_no}`, which matches one non-empty path segment
//! anywhere in the path.

use http::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Terminal,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    Authorize,
    /// `GET /admin/v1/stats`: latency percentiles of the last seconds.
    Stats,
    Reverse,
    Hold,
    Capture,
    Void,
    Ping,
    Healthz,
    Readyz,
    Metrics,
    /// `GET /dashboard`: the SRE's live page; `GET /dashboard/data`: its feed.
    Dashboard,
    DashboardData,
    /// `GET`/`PUT /admin/v1/log`: the log level, changed without a restart.
    LogGet,
    LogPut,
    CardPut,
    CardGet,
    DenyPut,
    DenyDelete,
    DenyGet,
    Status,
    ImportCards,
    ImportDenylist,
    Settlement,
    SettlementParked,
    SettlementReplay,
    SettlementPause,
    SettlementResume,
    SettlementReport,
    DenylistSync,
    OfflineBatch,
    CardFind,
    CardHolder,
    CardCredentials,
    CredentialBind,
    CredentialUnbind,
    CardLoss,
    CardLossLift,
    CardFreeze,
    CardUnfreeze,
    CardReplace,
    CardCancel,
    CardTransactions,
    Audit,
    OfflineRisk,
    CardHealth,
    AccessAllowPost,
    AccessAllowGet,
    PartnerDenyPut,
    PartnerDenyGet,
    Venues,
    DisbursementPost,
    DisbursementGet,
    ProjectWorkers,
    ProjectUnpaid,
    /// Terminal trust (role `security`): the block list of terminal
    /// certificates, one terminal's certificate, the TLS files loaded and
    /// their reload.
    TerminalBlocks,
    TerminalBlockPut,
    TerminalBlockDelete,
    TerminalGet,
    TlsGet,
    TlsReload,
    /// Card applications: filed, looked at, moved a step, found by the
    /// holder's personal ID, listed when overdue; the resident's status.
    ApplicationPost,
    ApplicationGet,
    ApplicationStep,
    ApplicationFind,
    ApplicationsOverdue,
    ApplicationStatus,
    /// Complaints: filed, listed, looked at, noted, closed.
    ComplaintPost,
    Complaints,
    ComplaintGet,
    ComplaintNote,
    ComplaintClose,
    /// `GET /admin/v1/report/rollout`: a day's use per unit and scenario.
    RolloutReport,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token: terminals (their certificate is the credential), probes.
    Open,
    /// An `agent` (hotline) or `operator` token.
    Agent,
    /// An `operator` token only.
    Operator,
    /// A `security` or `operator` token: terminal trust.
    Security,
    /// A `counter` or `operator` token: card applications' steps.
    Counter,
    /// A `counter`, `agent` or `operator` token: finding applications.
    Desk,
    /// Any of those or a `channel` token (the resident's own channel):
    /// filing an application, its status by id and ID digits.
    Resident,
}

pub struct Route {
    pub listener: Listener,
    pub method: Method,
    /// The path template; also the `route` label in metrics.
    pub path: &'static str,
    pub id: RouteId,
    pub access: Access,
}

const fn route(
    listener: Listener,
    method: Method,
    path: &'static str,
    id: RouteId,
    access: Access,
) -> Route {
    Route {
        listener,
        method,
        path,
        id,
        access,
    }
}

pub const ROUTES: &[Route] = &[
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/authorize",
        RouteId::Authorize,
        Access::Open,
    ),
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/reverse",
        RouteId::Reverse,
        Access::Open,
    ),
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/hold",
        RouteId::Hold,
        Access::Open,
    ),
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/capture",
        RouteId::Capture,
        Access::Open,
    ),
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/void",
        RouteId::Void,
        Access::Open,
    ),
    route(
        Listener::Terminal,
        Method::GET,
        "/v1/ping",
        RouteId::Ping,
        Access::Open,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/healthz",
        RouteId::Healthz,
        Access::Open,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/readyz",
        RouteId::Readyz,
        Access::Open,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/metrics",
        RouteId::Metrics,
        Access::Open,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/dashboard",
        RouteId::Dashboard,
        Access::Open,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/dashboard/data",
        RouteId::DashboardData,
        Access::Open,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/cards/{card_no}",
        RouteId::CardPut,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/cards/{card_no}",
        RouteId::CardGet,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/denylist/{card_no}",
        RouteId::DenyPut,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::DELETE,
        "/admin/v1/denylist/{card_no}",
        RouteId::DenyDelete,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/denylist/{card_no}",
        RouteId::DenyGet,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/status",
        RouteId::Status,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/import/cards",
        RouteId::ImportCards,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/import/denylist",
        RouteId::ImportDenylist,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/settlement",
        RouteId::Settlement,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/stats",
        RouteId::Stats,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/log",
        RouteId::LogGet,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/log",
        RouteId::LogPut,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/settlement/parked/{sink}",
        RouteId::SettlementParked,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/settlement/replay/{sink}",
        RouteId::SettlementReplay,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/settlement/pause/{sink}",
        RouteId::SettlementPause,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/settlement/resume/{sink}",
        RouteId::SettlementResume,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/settlement/report/{day}",
        RouteId::SettlementReport,
        Access::Operator,
    ),
    route(
        Listener::Terminal,
        Method::GET,
        "/v1/denylist",
        RouteId::DenylistSync,
        Access::Open,
    ),
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/offline-batch",
        RouteId::OfflineBatch,
        Access::Open,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/applications",
        RouteId::ApplicationPost,
        Access::Resident,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/applications/find",
        RouteId::ApplicationFind,
        Access::Desk,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/applications/overdue",
        RouteId::ApplicationsOverdue,
        Access::Desk,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/applications/{id}",
        RouteId::ApplicationGet,
        Access::Desk,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/applications/{id}/steps",
        RouteId::ApplicationStep,
        Access::Counter,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/applications/{id}/status",
        RouteId::ApplicationStatus,
        Access::Resident,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/complaints",
        RouteId::ComplaintPost,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/complaints",
        RouteId::Complaints,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/complaints/{id}",
        RouteId::ComplaintGet,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/complaints/{id}/notes",
        RouteId::ComplaintNote,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/complaints/{id}/close",
        RouteId::ComplaintClose,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/report/rollout",
        RouteId::RolloutReport,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/cards/find",
        RouteId::CardFind,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/cards/{card_no}/holder",
        RouteId::CardHolder,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/cards/{card_no}/credentials",
        RouteId::CardCredentials,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/cards/{card_no}/credentials",
        RouteId::CredentialBind,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::DELETE,
        "/admin/v1/credentials/{credential_id}",
        RouteId::CredentialUnbind,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/cards/{card_no}/loss",
        RouteId::CardLoss,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::DELETE,
        "/admin/v1/cards/{card_no}/loss",
        RouteId::CardLossLift,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/cards/{card_no}/freeze",
        RouteId::CardFreeze,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::DELETE,
        "/admin/v1/cards/{card_no}/freeze",
        RouteId::CardUnfreeze,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/cards/{card_no}/replace",
        RouteId::CardReplace,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/cards/{card_no}/cancel",
        RouteId::CardCancel,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/cards/{card_no}/transactions",
        RouteId::CardTransactions,
        Access::Agent,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/audit",
        RouteId::Audit,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/offline-risk",
        RouteId::OfflineRisk,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/cards/{card_no}/health",
        RouteId::CardHealth,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/access/{site}/allow",
        RouteId::AccessAllowPost,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/access/{site}/allow",
        RouteId::AccessAllowGet,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/partners/{partner}/denylist",
        RouteId::PartnerDenyPut,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/partners/{partner}/denylist",
        RouteId::PartnerDenyGet,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/venues",
        RouteId::Venues,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/disbursements/{batch_id}",
        RouteId::DisbursementPost,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/disbursements/{batch_id}",
        RouteId::DisbursementGet,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/projects/{project}/workers",
        RouteId::ProjectWorkers,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/projects/{project}/unpaid",
        RouteId::ProjectUnpaid,
        Access::Operator,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/terminal-blocks",
        RouteId::TerminalBlocks,
        Access::Security,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/terminal-blocks/{key}",
        RouteId::TerminalBlockPut,
        Access::Security,
    ),
    route(
        Listener::Admin,
        Method::DELETE,
        "/admin/v1/terminal-blocks/{key}",
        RouteId::TerminalBlockDelete,
        Access::Security,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/terminals/{terminal_id}",
        RouteId::TerminalGet,
        Access::Security,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/tls",
        RouteId::TlsGet,
        Access::Security,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/tls/reload",
        RouteId::TlsReload,
        Access::Security,
    ),
];

/// What a request's method and path found.
#[derive(Debug, PartialEq, Eq)]
pub enum Match<'a> {
    Found {
        route: &'static Route,
        param: Option<&'a str>,
    },
    /// The path exists with other methods.
    WrongMethod {
        path: &'static str,
        allowed: Vec<&'static str>,
    },
    NotFound,
}

impl PartialEq for Route {
    fn eq(&self, other: &Route) -> bool {
        self.listener == other.listener && self.method == other.method && self.path == other.path
    }
}
impl Eq for Route {}
impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {} {}", self.listener, self.method, self.path)
    }
}

fn matches<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    if !template.contains('{') {
        return (template == path).then_some(None);
    }
    let mut param = None;
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(param),
            (Some(ts), Some(ps)) if ts.starts_with('{') && !ps.is_empty() => param = Some(ps),
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

pub fn find<'a>(listener: Listener, method: &Method, path: &'a str) -> Match<'a> {
    let mut allowed = Vec::new();
    let mut template = None;
    for r in ROUTES.iter().filter(|r| r.listener == listener) {
        if let Some(param) = matches(r.path, path) {
            if r.method == *method {
                return Match::Found { route: r, param };
            }
            allowed.push(r.method.as_str());
            template = Some(r.path);
        }
    }
    match template {
        Some(path) => Match::WrongMethod { path, allowed },
        None => Match::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_with_and_without_parameters() {
        let check = |l, m: Method, p, want: Option<(RouteId, Option<&str>)>| {
            let got = match find(l, &m, p) {
                Match::Found { route, param } => Some((route.id, param)),
                _ => None,
            };
            assert_eq!(got, want, "{m} {p}");
        };
        check(
            Listener::Terminal,
            Method::POST,
            "/v1/authorize",
            Some((RouteId::Authorize, None)),
        );
        check(Listener::Admin, Method::POST, "/v1/authorize", None);
        check(
            Listener::Admin,
            Method::GET,
            "/admin/v1/cards/500118A1",
            Some((RouteId::CardGet, Some("500118A1"))),
        );
        check(
            Listener::Admin,
            Method::DELETE,
            "/admin/v1/denylist/X",
            Some((RouteId::DenyDelete, Some("X"))),
        );
        check(
            Listener::Admin,
            Method::GET,
            "/admin/v1/cards/500118A1/transactions",
            Some((RouteId::CardTransactions, Some("500118A1"))),
        );
        check(
            Listener::Admin,
            Method::POST,
            "/admin/v1/cards/find",
            Some((RouteId::CardFind, None)),
        );
        check(
            Listener::Admin,
            Method::GET,
            "/admin/v1/cards//transactions",
            None,
        );
        check(Listener::Admin, Method::GET, "/admin/v1/cards/a/nope", None);
        check(Listener::Admin, Method::GET, "/admin/v1/cards/", None);
        check(Listener::Admin, Method::GET, "/admin/v1/cards/a/b", None);
        assert_eq!(
            find(Listener::Admin, &Method::POST, "/admin/v1/denylist/X"),
            Match::WrongMethod {
                path: "/admin/v1/denylist/{card_no}",
                allowed: vec!["PUT", "DELETE", "GET"]
            }
        );
        assert_eq!(
            find(Listener::Terminal, &Method::GET, "/nope"),
            Match::NotFound
        );
    }
}
