//! `GET /admin/v1/report/rollout?day=&format=` (role `agent` or
//! `operator`): the rollout report of one local day, per responsible unit
//! and scenario, as JSON (by unit, with the unit's totals) or CSV (one
//! line per unit and scenario, the form a unit pastes into its report).

use bytes::Bytes;
use http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use onecard_core::rollout::{self, Row, Tally};
use onecard_core::time::{day_name, parse_day};

use super::{ok_json, Admin};
use crate::http::error::ApiError;
use crate::http::ingress::Body;
use crate::service::rollout::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
}

/// `day=` (default: today, local) and `format=` (`json`, the default, or
/// `csv`).
fn query(q: Option<&str>, today: i32) -> Result<(i32, Format), ApiError> {
    let mut day = today;
    let mut format = Format::Json;
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("day", v)) => {
                day = parse_day(v)
                    .ok_or_else(|| ApiError::invalid("`day` must be a date such as 2026-12-07"))?
            }
            Some(("format", "json")) => format = Format::Json,
            Some(("format", "csv")) => format = Format::Csv,
            Some(("format", _)) => {
                return Err(ApiError::invalid("`format` must be one of json, csv"))
            }
            _ => {
                return Err(ApiError::invalid(
                    "unknown query parameter; this report takes day and format",
                ))
            }
        }
    }
    Ok((day, format))
}

fn figures(t: &Tally, terminals: u64) -> Value {
    json!({
        "terminals": terminals,
        "taps": t.taps,
        "scans": t.scans,
        "approvals": t.approvals,
        "declines": t.declines,
        "declines_by_reason": t.declines_by_reason,
        "offline": t.offline,
        "offline_share": t.offline_share(),
    })
}

fn row_json(r: &Row) -> Value {
    let mut v = figures(&r.tally, r.terminals);
    v["scenario"] = json!(r.scenario.as_str());
    v["first_day"] = json!(r.span.map(|s| day_name(s.first_day)));
    v["last_day"] = json!(r.span.map(|s| day_name(s.last_day)));
    v
}

/// By unit (the rows come sorted by unit), each with its scenarios and
/// totals.
fn report_json(r: &Report, day_offset_minutes: i32) -> Value {
    let mut units: Vec<Value> = Vec::new();
    for group in r.rows.chunk_by(|a, b| a.unit == b.unit) {
        let unit = &group[0].unit;
        let mut total = Tally::default();
        for row in group {
            total.merge(&row.tally);
        }
        let terminals = r.unit_terminals.get(unit).copied().unwrap_or(0);
        units.push(json!({
            "unit": unit,
            "total": figures(&total, terminals),
            "scenarios": group.iter().map(row_json).collect::<Vec<_>>(),
        }));
    }
    json!({
        "day": day_name(r.day),
        "day_offset_minutes": day_offset_minutes,
        "counted_through_seq": r.counted_through,
        "journal_last_seq": r.journal_last,
        "units": units,
    })
}

impl Admin {
    pub(super) async fn rollout_report(
        &self,
        q: Option<&str>,
        now_ms: i64,
    ) -> Result<Response<Body>, ApiError> {
        let gw = &self.gateway;
        let (day, format) = query(q, gw.policy.local_day(now_ms.div_euclid(1000)))?;
        let report = gw.rollout_report(day).await?;
        Ok(match format {
            Format::Json => ok_json(&report_json(&report, gw.policy.day_offset_minutes)),
            Format::Csv => {
                let name = day_name(day);
                let mut r =
                    Response::new(Full::new(Bytes::from(rollout::csv(&name, &report.rows))));
                *r.status_mut() = StatusCode::OK;
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/csv; charset=utf-8"),
                );
                let disposition = format!("attachment; filename=\"rollout-{name}.csv\"");
                if let Ok(v) = HeaderValue::from_str(&disposition) {
                    r.headers_mut().insert(CONTENT_DISPOSITION, v);
                }
                r
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_takes_a_day_and_a_format() {
        let today = 20_795;
        let table: &[(Option<&str>, Option<(i32, Format)>)] = &[
            (None, Some((today, Format::Json))),
            (Some(""), Some((today, Format::Json))),
            (Some("day=2026-11-28"), Some((20_785, Format::Json))),
            (
                Some("format=csv&day=2026-11-28"),
                Some((20_785, Format::Csv)),
            ),
            (Some("format=json"), Some((today, Format::Json))),
            (Some("format=xlsx"), None),
            (Some("day=28.11.2026"), None),
            (Some("day="), None),
            (Some("unit=x"), None),
        ];
        for &(q, want) in table {
            assert_eq!(query(q, today).ok(), want, "{q:?}");
        }
        assert!(query(Some("day=2026-02-30"), today)
            .unwrap_err()
            .to_string()
            .contains("2026-12-07"));
    }
}
