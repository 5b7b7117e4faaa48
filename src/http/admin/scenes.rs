//! Admin routes of the scenarios: allow-lists of controlled doors, partner
//! regions' deny lists, a card's health status, culture venues' counts.
//!
//! Each change is one journal commit with its audit entry, made under
//! `Gateway::lists` (or the card's lock), and reaches memory only after
//! the commit was accepted: a door never opens on an entry that could be
//! lost.

use std::collections::HashSet;

use http::Response;
use serde_json::Value;
use sha2::{Digest, Sha256};

use onecard_core::model::{CardNo, Health, HealthColour};
use onecard_core::scenario::access::Windows;
use onecard_core::wire::{self, ErrorCode};

use super::{completed, ok_json, unreadable, Admin, Body};
use crate::http::error::ApiError;
use crate::http::ingress::{read_body, Req};
use crate::http::routes::RouteId;
use crate::service::cardlife::Actor;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::import;
use crate::store::durable::{Commit, Op};
use crate::store::{allow, partners, Cf};

/// Allow-list changes per request, and its body, at most.
pub const ALLOW_CHANGES_MAX: usize = 10_000;
pub const ALLOW_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Entries one allow-list listing returns, at most.
pub const ALLOW_LIST_MAX: usize = 10_000;
/// Errors an import's answer names, at most (the first ones).
const ERRORS_SHOWN: usize = 20;

/// A site in a path: 1 to 64 of `A-Za-z0-9._:-` (as an event id), so that
/// it never holds the key separator.
fn site_field(s: &str) -> Result<&str, ApiError> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(s)
    } else {
        Err(ApiError::invalid(
            "the site in the path must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'",
        ))
    }
}

impl Admin {
    pub(super) async fn scenes(
        &self,
        id: RouteId,
        param: &str,
        req: Req,
        actor: Actor,
        now_ms: i64,
    ) -> Result<Response<Body>, ApiError> {
        match id {
            RouteId::CardHealth => {
                let card_no = wire::card_no_field("card_no in the path", param)?;
                let m = self.body(req).await?;
                let health = health_fields(&m, now_ms)?;
                let gw = self.gateway.clone();
                let c = card_no.clone();
                let h = completed(async move { gw.set_health(&actor, &c, health, now_ms).await })
                    .await?;
                Ok(ok_json(&serde_json::json!({
                    "card_no": card_no.as_str(),
                    "health": onecard_core::scenario::health::attest(&onecard_core::model::Card {
                        health: h,
                        ..onecard_core::model::Card::new(onecard_core::model::CardStatus::Active, &[], &[])
                    }),
                })))
            }
            RouteId::AccessAllowPost => {
                let site = site_field(param)?.to_owned();
                if !self.gateway.config.access.controls(&site) {
                    return Err(ApiError::invalid(
                        "this site is not controlled (access.controlled_site_prefixes): its doors open for any active card, so an allow-list would have no effect",
                    ));
                }
                let timeout = std::time::Duration::from_millis(
                    self.gateway.config.limits.header_read_timeout_ms,
                );
                let bytes =
                    read_body(req, "application/json", ALLOW_BODY_BYTES_MAX, timeout).await?;
                let m = wire::parse_object(&bytes)?;
                let changes = allow_changes(&m)?;
                let gw = self.gateway.clone();
                let answer =
                    completed(
                        async move { change_allow(&gw, &actor, &site, changes, now_ms).await },
                    )
                    .await?;
                Ok(ok_json(&answer))
            }
            RouteId::AccessAllowGet => {
                let site = site_field(param)?;
                let prefix = allow::key(site, &CardNo::parse("00000000").expect("valid"));
                let prefix = &prefix[..site.len() + 1];
                let mut entries = Vec::new();
                let mut truncated = false;
                self.gateway
                    .store
                    .scan(Cf::Allow, prefix, |k, v| {
                        let Some(card) = k.strip_prefix(prefix) else {
                            return false;
                        };
                        if entries.len() == ALLOW_LIST_MAX {
                            truncated = true;
                            return false;
                        }
                        let e: Option<allow::Entry> = serde_json::from_slice(v).ok();
                        entries.push(serde_json::json!({
                            "card_no": String::from_utf8_lossy(card),
                            "windows": e.map(|e| e.windows).unwrap_or_default(),
                        }));
                        true
                    })
                    .map_err(unreadable)?;
                Ok(ok_json(&serde_json::json!({
                    "site": site,
                    "controlled": self.gateway.config.access.controls(site),
                    "entries": entries,
                    "truncated": truncated,
                })))
            }
            RouteId::PartnerDenyPut => {
                let p = self.partner(param)?;
                let version = version_query(req.uri().query())?;
                let body = read_body(
                    req,
                    "application/x-ndjson",
                    import::IMPORT_BODY_BYTES_MAX,
                    super::IMPORT_BODY_TIMEOUT,
                )
                .await?;
                let gw = self.gateway.clone();
                let answer = completed(async move {
                    import_partner(&gw, &actor, p, version, body, now_ms).await
                })
                .await?;
                Ok(ok_json(&answer))
            }
            RouteId::PartnerDenyGet => {
                let p = self.partner(param)?;
                let list = self.gateway.partners.current(p);
                Ok(ok_json(&serde_json::json!({
                    "partner": param,
                    "version": list.version,
                    "entries": list.cards.len(),
                })))
            }
            RouteId::Venues => {
                let gw = &self.gateway;
                let today = gw.policy.local_day(now_ms.div_euclid(1000));
                let venues: Vec<Value> = gw
                    .venues
                    .all()
                    .into_iter()
                    .map(|(site, count)| {
                        let quota = gw.policy.culture.venue(&site).map_or(0, |v| v.quota_daily);
                        let entries = count.on(today);
                        serde_json::json!({
                            "site": site,
                            "quota_daily": quota,
                            "entries_today": entries,
                            "left_today": quota.saturating_sub(entries),
                        })
                    })
                    .collect();
                Ok(ok_json(&serde_json::json!({ "venues": venues })))
            }
            _ => unreachable!("only scenario routes come here"),
        }
    }

    fn partner(&self, name: &str) -> Result<usize, ApiError> {
        self.gateway.policy.regions.partner(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                "no partner region of that name is configured ([[regions.partners]])",
            )
        })
    }
}

fn health_fields(m: &serde_json::Map<String, Value>, now_ms: i64) -> Result<Health, ApiError> {
    wire::reject_unknown(m, &["colour", "vaccinated"])?;
    let colour = HealthColour::parse(wire::req_str(m, "colour")?).ok_or_else(|| {
        ApiError::invalid(format!(
            "`colour` must be one of {}",
            HealthColour::expected()
        ))
    })?;
    let vaccinated = match m.get("vaccinated") {
        Some(Value::Bool(b)) => *b,
        None => return Err(ApiError::invalid("missing field `vaccinated`")),
        Some(_) => return Err(ApiError::invalid("`vaccinated` must be true or false")),
    };
    Ok(Health {
        colour,
        vaccinated,
        updated_s: now_ms.div_euclid(1000),
    })
}

/// One allow-list change: a card added (or its windows replaced), or
/// removed.
struct AllowChange {
    card_no: CardNo,
    windows: Option<(Windows, Vec<String>)>,
}

fn allow_changes(m: &serde_json::Map<String, Value>) -> Result<Vec<AllowChange>, ApiError> {
    wire::reject_unknown(m, &["add", "remove"])?;
    let list = |name: &str| match m.get(name) {
        None | Some(Value::Null) => Ok(&[][..]),
        Some(Value::Array(a)) => Ok(a.as_slice()),
        Some(_) => Err(ApiError::invalid(format!("`{name}` must be an array"))),
    };
    let (add, remove) = (list("add")?, list("remove")?);
    if add.len() + remove.len() > ALLOW_CHANGES_MAX {
        return Err(ApiError::invalid(format!(
            "at most {ALLOW_CHANGES_MAX} changes per request; send the rest in another"
        )));
    }
    let mut changes = Vec::with_capacity(add.len() + remove.len());
    let mut seen = HashSet::new();
    for (i, v) in add.iter().enumerate() {
        let Value::Object(e) = v else {
            return Err(ApiError::invalid(format!("add[{i}] must be an object")));
        };
        wire::reject_unknown(e, &["card_no", "windows"])?;
        let card_no =
            wire::card_no_field(&format!("add[{i}].card_no"), wire::req_str(e, "card_no")?)?;
        let windows: Vec<String> = match e.get("windows") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|w| w.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| ApiError::invalid(format!("add[{i}].windows must be strings")))?,
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "add[{i}].windows must be an array"
                )))
            }
        };
        let parsed = Windows::parse(&windows)
            .map_err(|e| ApiError::invalid(format!("add[{i}].windows: {e}")))?;
        if !seen.insert(card_no.clone()) {
            return Err(ApiError::invalid(format!(
                "add[{i}]: the card is named twice"
            )));
        }
        changes.push(AllowChange {
            card_no,
            windows: Some((parsed, windows)),
        });
    }
    for (i, v) in remove.iter().enumerate() {
        let s = v
            .as_str()
            .ok_or_else(|| ApiError::invalid(format!("remove[{i}] must be a card number")))?;
        let card_no = wire::card_no_field(&format!("remove[{i}]"), s)?;
        if !seen.insert(card_no.clone()) {
            return Err(ApiError::invalid(format!(
                "remove[{i}]: the card is named twice"
            )));
        }
        changes.push(AllowChange {
            card_no,
            windows: None,
        });
    }
    Ok(changes)
}

async fn change_allow(
    gw: &Gateway,
    actor: &Actor,
    site: &str,
    changes: Vec<AllowChange>,
    now_ms: i64,
) -> Result<Value, ApiError> {
    let _one = gw.lists.lock().await;
    let added = changes
        .iter()
        .filter(|c| c.windows.is_some() && gw.allow.get(site, &c.card_no).is_none())
        .count();
    let max = gw.config.access.allow_entries_max;
    if gw.allow.len() + added > max {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "the allow-lists would hold more than access.allow_entries_max ({max}) entries"
            ),
        ));
    }
    let mut ops = Vec::with_capacity(changes.len() + 1);
    for c in &changes {
        let key = allow::key(site, &c.card_no);
        ops.push(match &c.windows {
            Some((_, text)) => Op::Put(
                Cf::Allow,
                key,
                serde_json::to_vec(&allow::Entry {
                    windows: text.clone(),
                    added_ms: now_ms,
                })
                .expect("plain records serialize"),
            ),
            None => Op::Delete(Cf::Allow, key),
        });
    }
    let removed = changes.len() - changes.iter().filter(|c| c.windows.is_some()).count();
    let detail =
        serde_json::json!({"site": site, "set": changes.len() - removed, "removed": removed});
    ops.push(
        gw.audit
            .op(&actor.entry("allow", None, Some(detail), now_ms)),
    );
    let pending = gw
        .journal
        .submit(Commit::new(None, ops))
        .map_err(ServiceError::from)?;
    // In a cluster the applier sets them from the stream's writes.
    if !gw.journal.applies_memory() {
        for c in &changes {
            gw.allow
                .set(site, &c.card_no, c.windows.as_ref().map(|(w, _)| *w));
        }
    }
    pending.durable().await.map_err(ServiceError::from)?;
    Ok(serde_json::json!({
        "site": site,
        "set": changes.len() - removed,
        "removed": removed,
        "entries_total": gw.allow.len(),
    }))
}

fn version_query(q: Option<&str>) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid("the query must be `version=N`, the partner's list version (1 or more)")
    };
    let v = q.and_then(|q| q.strip_prefix("version=")).ok_or_else(bad)?;
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad()),
    }
}

/// Replaces a partner's deny list with an import's, whole.
async fn import_partner(
    gw: &std::sync::Arc<Gateway>,
    actor: &Actor,
    p: usize,
    version: u64,
    body: bytes::Bytes,
    now_ms: i64,
) -> Result<Value, ApiError> {
    let _one = gw.lists.lock().await;
    let fingerprint: [u8; 32] = Sha256::digest(&body).into();
    let current = gw.partners.current(p);
    let name = gw.policy.regions.partners[p].name.clone();
    let answer = |entries: usize, unchanged: bool| serde_json::json!({"partner": name, "version": version, "entries": entries, "unchanged": unchanged});
    if version == current.version && fingerprint == current.fingerprint {
        return Ok(answer(current.cards.len(), true));
    }
    if version <= current.version {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "version {version} is not newer than the partner's current version {}",
                current.version
            ),
        ));
    }
    // Parsing a large list is CPU work: off the runtime's threads.
    let gw2 = gw.clone();
    let parsed = tokio::task::spawn_blocking(move || parse_partner_list(&gw2, p, &body))
        .await
        .map_err(|_| {
            ApiError::new(ErrorCode::Unavailable, "the import was interrupted; retry")
        })??;
    let max = gw.policy.regions.partners[p].denylist_max;
    if parsed.len() > max {
        return Err(ApiError::invalid(format!(
            "the list has {} cards; this partner's denylist_max is {max}",
            parsed.len()
        )));
    }
    let mut ops = Vec::new();
    for old in current.cards.iter().filter(|c| !parsed.contains(*c)) {
        ops.push(Op::Delete(
            Cf::PartnerDeny,
            partners::key(&name, old.as_str()),
        ));
    }
    let (mut added, removed) = (0usize, ops.len());
    for new in parsed.iter().filter(|c| !current.cards.contains(*c)) {
        ops.push(Op::Put(
            Cf::PartnerDeny,
            partners::key(&name, new.as_str()),
            Vec::new(),
        ));
        added += 1;
    }
    ops.push(Op::Put(
        Cf::Meta,
        partners::version_key(&name),
        partners::encode_version(version, &fingerprint),
    ));
    let detail = serde_json::json!({"partner": name, "version": version, "added": added, "removed": removed});
    ops.push(
        gw.audit
            .op(&actor.entry("partner_denylist", None, Some(detail), now_ms)),
    );
    gw.journal
        .commit(Commit::new(None, ops))
        .await
        .map_err(ServiceError::from)?;
    let entries = parsed.len();
    // In a cluster the applier reloads the list from the stream's writes.
    if !gw.journal.applies_memory() {
        gw.partners.replace(
            p,
            partners::List {
                version,
                fingerprint,
                cards: parsed,
            },
        );
    }
    tracing::info!(partner = %name, version, entries, added, removed, "partner deny list imported");
    let mut a = answer(entries, false);
    a["added"] = added.into();
    a["removed"] = removed.into();
    Ok(a)
}

/// The cards of an import body, one `{"card_no": "..."}` per line (blank
/// lines skipped); every card must be of the partner's regions. The
/// first errors are named by line, never by card number.
fn parse_partner_list(
    gw: &Gateway,
    p: usize,
    body: &[u8],
) -> Result<HashSet<CardNo, foldhash::fast::RandomState>, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line<'a> {
        #[serde(borrow)]
        card_no: &'a str,
        #[serde(default, borrow)]
        #[allow(dead_code)]
        reason: Option<&'a str>,
    }
    let mut cards = HashSet::with_hasher(foldhash::fast::RandomState::default());
    let mut errors = Vec::new();
    let mut n_errors = 0usize;
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let why = match serde_json::from_slice::<Line<'_>>(line) {
            Err(_) => Some("not an object with `card_no` (and optionally `reason`)".to_owned()),
            Ok(l) => match CardNo::parse(l.card_no) {
                Err(e) => Some(format!("card_no {e}")),
                Ok(c) if !gw.policy.regions.is_partners(p, &c) => {
                    Some("the card is not of this partner's regions".to_owned())
                }
                Ok(c) => {
                    cards.insert(c);
                    None
                }
            },
        };
        if let Some(why) = why {
            n_errors += 1;
            if errors.len() < ERRORS_SHOWN {
                errors.push(format!("line {}: {why}", i + 1));
            }
        }
    }
    if n_errors > 0 {
        return Err(ApiError::invalid(format!(
            "{n_errors} bad lines; nothing was imported. {}",
            errors.join("; ")
        )));
    }
    Ok(cards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_sites() {
        assert_eq!(version_query(Some("version=42")).unwrap(), 42);
        for bad in [None, Some("version=0"), Some("v=1"), Some("version=x")] {
            assert!(version_query(bad).is_err(), "{bad:?}");
        }
        assert!(site_field("community-12-east").is_ok());
        for bad in ["", "a b", "a\u{0}b", &"x".repeat(65)] {
            assert!(site_field(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn allow_changes_are_validated_whole() {
        let parse = |v: Value| allow_changes(v.as_object().unwrap()).map(|c| c.len());
        let ok = serde_json::json!({"add": [{"card_no": "500118A12345678", "windows": ["07:00-22:00"]}], "remove": ["500118A00000002"]});
        assert_eq!(parse(ok).unwrap(), 2);
        let cases = [
            (
                serde_json::json!({"add": [{"card_no": "500118A12345678", "windows": ["7-22"]}]}),
                "add[0].windows: window 1",
            ),
            (
                serde_json::json!({"add": [{"card_no": "bad"}]}),
                "add[0].card_no",
            ),
            (
                serde_json::json!({"remove": ["500118A12345678", "500118A12345678"]}),
                "named twice",
            ),
            (serde_json::json!({"add": {}}), "must be an array"),
            (serde_json::json!({"colour": 1}), "unknown field"),
        ];
        for (body, want) in cases {
            let e = parse(body).unwrap_err();
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
    }
}
