//! The route table: every (listener, method, path) the gateway serves.
//!
//! Both listeners dispatch through [`find`], so this table *is* the API
//! surface; `docs/openapi.json` documents it and `tests/openapi.rs` checks
//! the two list the same operations. Paths have at most one parameter,
//! written `{card_no}`, which matches one non-empty path segment.

use http::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Terminal,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    Authorize,
    Reverse,
    Ping,
    Healthz,
    Readyz,
    Metrics,
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
}

pub struct Route {
    pub listener: Listener,
    pub method: Method,
    /// The path template; also the `route` label in metrics.
    pub path: &'static str,
    pub id: RouteId,
    /// Whether the admin bearer token is required.
    pub token: bool,
}

const fn route(
    listener: Listener,
    method: Method,
    path: &'static str,
    id: RouteId,
    token: bool,
) -> Route {
    Route {
        listener,
        method,
        path,
        id,
        token,
    }
}

pub const ROUTES: &[Route] = &[
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/authorize",
        RouteId::Authorize,
        false,
    ),
    route(
        Listener::Terminal,
        Method::POST,
        "/v1/reverse",
        RouteId::Reverse,
        false,
    ),
    route(
        Listener::Terminal,
        Method::GET,
        "/v1/ping",
        RouteId::Ping,
        false,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/healthz",
        RouteId::Healthz,
        false,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/readyz",
        RouteId::Readyz,
        false,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/metrics",
        RouteId::Metrics,
        false,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/cards/{card_no}",
        RouteId::CardPut,
        true,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/cards/{card_no}",
        RouteId::CardGet,
        true,
    ),
    route(
        Listener::Admin,
        Method::PUT,
        "/admin/v1/denylist/{card_no}",
        RouteId::DenyPut,
        true,
    ),
    route(
        Listener::Admin,
        Method::DELETE,
        "/admin/v1/denylist/{card_no}",
        RouteId::DenyDelete,
        true,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/denylist/{card_no}",
        RouteId::DenyGet,
        true,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/status",
        RouteId::Status,
        true,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/import/cards",
        RouteId::ImportCards,
        true,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/import/denylist",
        RouteId::ImportDenylist,
        true,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/settlement",
        RouteId::Settlement,
        true,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/settlement/parked/{sink}",
        RouteId::SettlementParked,
        true,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/settlement/replay/{sink}",
        RouteId::SettlementReplay,
        true,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/settlement/pause/{sink}",
        RouteId::SettlementPause,
        true,
    ),
    route(
        Listener::Admin,
        Method::POST,
        "/admin/v1/settlement/resume/{sink}",
        RouteId::SettlementResume,
        true,
    ),
    route(
        Listener::Admin,
        Method::GET,
        "/admin/v1/settlement/report/{day}",
        RouteId::SettlementReport,
        true,
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
    match template.split_once('{') {
        None => (template == path).then_some(None),
        Some((prefix, _)) => {
            let param = path.strip_prefix(prefix)?;
            (!param.is_empty() && !param.contains('/')).then_some(Some(param))
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
