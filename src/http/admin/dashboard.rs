//! The SRE's live page, `GET /dashboard`, and the feed it polls once a
//! second, `GET /dashboard/data`.
//!
//! The page is one self-contained HTML file (`dashboard.html`, compiled
//! in): no external script, font or request but its own feed, so it works
//! on an isolated operations LAN. Both routes are open on the admin
//! listener, like `/metrics`: they show figures, the names of sinks and
//! the ids of terminals whose certificate expires soon, never a card
//! number, a personal id or an event (docs/dashboard.md).

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::http::admission::Admission;
use crate::service::gateway::Gateway;
use crate::service::stats::WINDOW_MAX_S;

pub const PAGE: &str = include_str!("dashboard.html");

/// The page, never cached: a new gateway version brings its own.
pub fn page() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Nothing but its own feed: no script, style or image from elsewhere.
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    r
}

/// Everything the page shows, read now.
pub fn data(gw: &Gateway, admission: &Admission, server_cert: i64, client_ca: i64) -> Value {
    let now = gw.now_ms();
    let sinks: Vec<_> = gw.settlement.all().iter().map(|s| s.view(now)).collect();
    json!({
        "now_ms": now,
        "uptime_s": gw.stats.uptime().as_secs(),
        "node": gw.config.cluster.as_ref().map(|c| c.node.clone()),
        "ready": gw.not_ready().is_none(),
        "not_ready": gw.not_ready(),
        "warnings": gw.warnings(),
        "durability": gw.config.journal.durability,
        "resident_bytes": crate::service::metrics::resident_bytes(),
        "windows": {
            "10s": gw.stats.window(10),
            "60s": gw.stats.window(60),
        },
        "series": gw.stats.series(WINDOW_MAX_S),
        "journal": {
            "last_seq": gw.journal.last_seq(),
            "healthy": gw.journal.is_healthy(),
            "commits_10s": gw.journal.commit_figures(10),
            "cluster": gw.journal.cluster_view(),
        },
        "settlement": sinks,
        "denylist": {
            "version": gw.deny.version(),
            "entries": gw.deny.len(),
            "updated_at_ms": gw.deny.updated_at_ms(),
        },
        "cards": gw.cards.len(),
        "connections_open": admission.connections_open(),
        "terminals": gw.terminals.view(now),
        "tls": {"server_not_after_s": server_cert, "client_ca_not_after_s": client_ca},
    })
}
