//! Validators that run offline: deny-list deltas to keep them current, and
//! the upload of taps they decided on their own.
//!
//! `GET /v1/denylist?since=V` answers the net changes since version `V`
//! (cards added and removed), or the whole list when that is shorter or
//! `V` is unknown here, with the new version and an ETag; a validator at
//! the current version gets `304`. Versions come from the deny list's log
//! (`denylist_log`), which every change writes in the same commit as the
//! entry itself.
//!
//! `POST /v1/offline-batch` takes up to `offline.batch_events_max` taps,
//! each with the validator's own decision and time. Each is idempotent by
//! (terminal, event_id) like an online request, journaled as offline, and
//! an approval is settled like an online one. Approvals of cards that were
//! deny-listed before the tap are *offline risk*: counted per card and
//! terminal (`offline_risk`, `GET /admin/v1/offline-risk`) and in
//! `onecard_offline_risk_taps_total`, never silently accepted as normal.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use std::collections::HashMap;

use onecard_core::model::{Card, CardNo, EventKind, Reason, StoredCardNo};
use onecard_core::record::DecisionRecord;
use onecard_core::wire::{self, Credential};

use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::pipeline::{Begun, Committed, Decided, Remember, Ticket};
use crate::store::denylist::{DenyChange, DenyOp};
use crate::store::durable::{CommitError, Op};
use crate::store::idem;
use crate::store::{Cf, StoreError};

/// The answer to a deny-list sync.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenySync {
    pub version: u64,
    /// `true`: `add` is the whole list; drop everything else.
    pub full: bool,
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

pub fn etag(version: u64) -> String {
    format!("\"dl-{version}\"")
}

/// What a deny-list sync answers.
pub enum Sync {
    NotModified(u64),
    /// A [`DenySync`], serialized.
    Changes {
        version: u64,
        body: bytes::Bytes,
    },
}

/// Parses `since=<version>` from a query string; absent: `None`.
pub fn since_param(query: Option<&str>) -> Result<Option<u64>, ServiceError> {
    let mut since = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = Some(v.parse::<u64>().map_err(|_| {
                    ServiceError::invalid(
                        "`since` must be a deny-list version (a whole number ≥ 0)",
                    )
                })?)
            }
            _ => {
                return Err(ServiceError::invalid(
                    "unknown query parameter; /v1/denylist takes only `since`",
                ))
            }
        }
    }
    Ok(since)
}

/// The conflict of an offline event whose id was used for another event.
const OFFLINE_REUSED: &str = "`event_id` was already used by this terminal with a different event";

impl Gateway {
    /// The deny-list changes a validator at version `since` needs.
    pub async fn denylist_sync(
        &self,
        since: Option<u64>,
        if_none_match: Option<&str>,
    ) -> Result<Sync, ServiceError> {
        let current = self.deny.version();
        if since == Some(current) || if_none_match == Some(etag(current).as_str()) {
            return Ok(Sync::NotModified(current));
        }
        let len = self.deny.len() as u64;
        let delta = match since {
            // Every change is in the log; a full list is sent when it is
            // shorter than the changes, or for a version this gateway never
            // had (a validator reset or moved between deployments).
            Some(v) if v < current && current - v <= len.max(1_000) => Some(v),
            _ => None,
        };
        let Some(from) = delta else {
            return self.denylist_full().await;
        };
        // Entries up to `current` are durable and applied: the log is
        // written before the version moves in memory.
        let mut last: std::collections::BTreeMap<String, DenyOp> = Default::default();
        let mut bad = false;
        self.store
            .scan(Cf::DenylistLog, &(from + 1).to_be_bytes(), |k, v| {
                let Some(version) = crate::store::decode_u64(k) else {
                    bad = true;
                    return false;
                };
                if version > current {
                    return false;
                }
                match serde_json::from_slice::<DenyChange>(v) {
                    Ok(c) => {
                        last.insert(c.card_no.as_str().to_owned(), c.op);
                    }
                    Err(_) => bad = true,
                }
                !bad
            })
            .map_err(ServiceError::from)?;
        if bad {
            return Err(ServiceError::from(StoreError::Corrupt {
                cf: "denylist_log",
                detail: "a change does not decode".into(),
            }));
        }
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for (card, op) in last {
            match op {
                DenyOp::Add => add.push(card),
                DenyOp::Remove => remove.push(card),
            }
        }
        let body = serde_json::to_vec(&DenySync {
            version: current,
            full: false,
            add,
            remove,
        })
        .expect("a deny-list sync serializes");
        Ok(Sync::Changes {
            version: current,
            body: body.into(),
        })
    }

    /// The whole list, built once per version and shared by every
    /// validator that asks for it.
    async fn denylist_full(&self) -> Result<Sync, ServiceError> {
        let _one = self.deny_full_build.lock().await;
        let cached = self.deny_full.lock().clone();
        if let Some((version, body)) = cached.filter(|(v, _)| *v == self.deny.version()) {
            return Ok(Sync::Changes { version, body });
        }
        // Copied under the change lock, so the cards match the version;
        // sorted and serialized off the runtime's threads.
        let (version, cards) = {
            let _serial = self.deny.serial().await;
            self.deny.snapshot()
        };
        let body = tokio::task::spawn_blocking(move || {
            let mut add: Vec<String> = cards.iter().map(|c| c.as_str().to_owned()).collect();
            add.sort_unstable();
            let doc = DenySync {
                version,
                full: true,
                add,
                remove: Vec::new(),
            };
            bytes::Bytes::from(serde_json::to_vec(&doc).expect("a deny-list sync serializes"))
        })
        .await
        .map_err(|_| ServiceError::unavailable("building the deny list failed; retry"))?;
        *self.deny_full.lock() = Some((version, body.clone()));
        Ok(Sync::Changes { version, body })
    }
}

/// One event's outcome in an offline upload.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OfflineOutcome {
    pub event_id: String,
    /// `accepted`, `duplicate` (already uploaded with the same content),
    /// `conflict` (the event id was used with other content) or
    /// `rejected` (see `error`).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_id: Option<String>,
    /// The card was deny-listed before the tap: counted as offline risk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub risk: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<wire::ErrorBody>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OfflineAnswer {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub risk: usize,
    pub events: Vec<OfflineOutcome>,
}

/// `offline_risk`: one card's risky taps at one terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskRecord {
    pub card_no: StoredCardNo,
    pub terminal: String,
    pub taps: u64,
    pub amount_fen: i64,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
    pub denylist_reason: String,
}

fn risk_key(card: &str, terminal: &str) -> Vec<u8> {
    let mut k = card.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(terminal.as_bytes());
    k
}

/// A validated offline event.
struct OfflineEvent {
    req: wire::AuthorizeRequest,
    card_no: CardNo,
    approved: bool,
    reason: Reason,
    occurred_ms: i64,
    fingerprint: [u8; 32],
}

fn parse_event(v: &Value, now_ms: i64, gw: &Gateway) -> Result<OfflineEvent, ServiceError> {
    let Value::Object(m) = v else {
        return Err(ServiceError::invalid("each event must be a JSON object"));
    };
    let mut inner: Map<String, Value> = m.clone();
    let decision = match inner.remove("decision") {
        Some(Value::String(d)) if d == "approve" || d == "decline" => d,
        Some(_) => {
            return Err(ServiceError::invalid(
                "`decision` must be approve or decline",
            ))
        }
        None => {
            return Err(ServiceError::invalid(
                "missing field `decision` (approve or decline)",
            ))
        }
    };
    let approved = decision == "approve";
    let reason = match inner.remove("reason") {
        None | Some(Value::Null) if approved => Reason::Ok,
        None | Some(Value::Null) => {
            return Err(ServiceError::invalid(
                "missing field `reason` (required for a decline)",
            ))
        }
        Some(Value::String(r)) => match Reason::parse(&r) {
            Some(Reason::Ok) if !approved => {
                return Err(ServiceError::invalid("a decline's `reason` cannot be OK"))
            }
            Some(r) if approved && r != Reason::Ok => {
                return Err(ServiceError::invalid(
                    "an approval's `reason` must be OK or absent",
                ))
            }
            Some(r) => r,
            None => return Err(ServiceError::invalid("`reason` is not a known reason code")),
        },
        Some(_) => return Err(ServiceError::invalid("`reason` must be a string")),
    };
    let body = serde_json::to_vec(&inner).expect("a JSON map serializes");
    let req = wire::parse_authorize(&body)?;
    let Credential::Tap(card_no) = &req.credential else {
        return Err(ServiceError::invalid(
            "offline events must be taps: a scanned code is checked online",
        ));
    };
    let Some(occurred) = req.occurred_at.as_deref() else {
        return Err(ServiceError::invalid(
            "missing field `occurred_at` (required offline: when the validator decided)",
        ));
    };
    let occurred_ms =
        time::OffsetDateTime::parse(occurred, &time::format_description::well_known::Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| ServiceError::invalid("`occurred_at` must be an RFC 3339 time"))?;
    let skew_ms = gw.config.offline.future_skew_s * 1000;
    if occurred_ms > now_ms + skew_ms {
        return Err(ServiceError::invalid(
            "`occurred_at` lies in the future by the gateway's clock; check the validator's clock",
        ));
    }
    let retention_ms = (gw.config.idempotency.retention_s as i64).saturating_mul(1000);
    if occurred_ms < now_ms - retention_ms {
        return Err(ServiceError::invalid(
            "`occurred_at` is older than the idempotency retention; such an event cannot be told from a duplicate and is not accepted",
        ));
    }
    // The scenario's own rules hold offline too: a validator may not
    // charge where the scenario is free, nor more than one event may.
    let amount =
        crate::service::authorize::amount_for(&gw.policy, req.scenario, req.amount_fen, approved)?;
    let most = gw.policy.rule(req.scenario).amount_max_fen;
    if amount > most {
        return Err(ServiceError::invalid(format!(
            "`amount_fen` is above the most one event of scenario {} may charge ({most} fen)",
            req.scenario
        )));
    }
    let mut h = Sha256::new();
    h.update(req.fingerprint());
    h.update(b"\x1foffline\x1f");
    h.update(decision.as_bytes());
    h.update(b"\x1f");
    h.update(reason.code().as_bytes());
    let card_no = card_no.clone();
    Ok(OfflineEvent {
        card_no,
        approved,
        reason,
        occurred_ms,
        fingerprint: h.finalize().into(),
        req,
    })
}

impl Gateway {
    /// Takes a validator's offline events. Per event: accepted, duplicate,
    /// conflict or rejected, never failing the whole upload for one bad
    /// event. Durable when this returns.
    pub async fn offline_batch(
        &self,
        terminal: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<OfflineAnswer, ServiceError> {
        let allowed = &self.config.offline.terminal_prefixes;
        if !allowed.iter().any(|p| terminal.starts_with(p.as_str())) {
            return Err(ServiceError::forbidden(
                "this terminal is not configured as an offline validator (offline.terminal_prefixes)",
            ));
        }
        let m = wire::parse_object(body)?;
        wire::reject_unknown(&m, &["events"])?;
        let Some(Value::Array(events)) = m.get("events") else {
            return Err(ServiceError::invalid(
                "missing field `events` (an array of offline taps)",
            ));
        };
        let max = self.config.offline.batch_events_max;
        if events.is_empty() || events.len() > max {
            return Err(ServiceError::invalid(format!(
                "`events` must hold 1 to {max} events; send more in further requests"
            )));
        }
        let _serial = self.offline.lock().await;
        let mut outcomes = Vec::with_capacity(events.len());
        let mut pending = Vec::new();
        // Risk records written by this upload and not yet on disk: the next
        // risky tap of the same card and terminal adds to these.
        let mut risks = HashMap::new();
        let cluster = self.config.cluster.is_some();
        for v in events {
            if cluster {
                outcomes.push(
                    self.offline_event_raced(terminal, v, &mut risks, now_ms)
                        .await?,
                );
                continue;
            }
            let (outcome, committed) = self.offline_event(terminal, v, &mut risks, now_ms).await?;
            outcomes.push(outcome);
            pending.extend(committed.map(|c| c.pending));
        }
        for p in pending {
            p.durable().await?;
        }
        Ok(offline_answer(outcomes))
    }

    /// Cluster mode: one event, durable before the next, recorded again
    /// if its card was written at another node at the same moment (the
    /// race wrote nothing; the next try reads the card as the winner left
    /// it). Awaited one by one so that a lost race is retried alone,
    /// before any later event of the upload is queued on its risk record.
    async fn offline_event_raced(
        &self,
        terminal: &str,
        v: &Value,
        risks: &mut HashMap<Vec<u8>, RiskRecord>,
        now_ms: i64,
    ) -> Result<OfflineOutcome, ServiceError> {
        let mut tries = 0;
        loop {
            let before = risks.clone();
            let (outcome, committed) = self.offline_event(terminal, v, risks, now_ms).await?;
            let Some(committed) = committed else {
                return Ok(outcome);
            };
            match committed.pending.durable().await {
                Ok(_) => return Ok(outcome),
                Err(CommitError::Raced { after }) if tries < self.race_retries_max() => {
                    // Its risk record was not written either.
                    *risks = before;
                    self.after_race(after, tries).await?;
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One event of an upload: rejected (malformed), a duplicate (the
    /// same event again), a conflict (its id used for another event), or
    /// recorded (queued, not yet awaited).
    async fn offline_event(
        &self,
        terminal: &str,
        v: &Value,
        risks: &mut HashMap<Vec<u8>, RiskRecord>,
        now_ms: i64,
    ) -> Result<(OfflineOutcome, Option<Committed>), ServiceError> {
        let event_id: String = v
            .get("event_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(64)
            .collect();
        let outcome = |status: &str, auth_id, error| OfflineOutcome {
            event_id: event_id.clone(),
            status: status.into(),
            auth_id,
            risk: false,
            error,
        };
        let e = match parse_event(v, now_ms, self) {
            Ok(e) => e,
            Err(err) => return Ok((outcome("rejected", None, Some(err.body())), None)),
        };
        let key = idem::key(terminal, &e.req.event_id);
        let ticket = match self.begin(key, e.fingerprint, now_ms, OFFLINE_REUSED).await {
            Ok(Begun::Decide(ticket)) => ticket,
            Ok(Begun::Replay(stored)) => {
                let auth_id = serde_json::from_slice::<Value>(&stored)
                    .ok()
                    .and_then(|v| v.get("auth_id").and_then(Value::as_str).map(str::to_owned));
                return Ok((outcome("duplicate", auth_id, None), None));
            }
            Err(conflict @ ServiceError::AlreadyUsed(_)) => {
                return Ok((outcome("conflict", None, Some(conflict.body())), None))
            }
            Err(other) => return Err(other),
        };
        let (recorded, committed) = self
            .record_offline(terminal, e, ticket, risks, now_ms)
            .await?;
        Ok((recorded, Some(committed)))
    }

    /// Records one offline event through the pipeline's commit phase
    /// (queued, not yet awaited). The validator has already let the
    /// resident through: nothing is decided again here, the tap is
    /// recorded as it was decided, and its fare counts toward the card's
    /// daily spend of the tap's day, under the card's lock like an online
    /// tap.
    async fn record_offline(
        &self,
        terminal: &str,
        e: OfflineEvent,
        ticket: Ticket,
        risks: &mut HashMap<Vec<u8>, RiskRecord>,
        now_ms: i64,
    ) -> Result<(OfflineOutcome, Committed), ServiceError> {
        // A reversal that came first: the tap is recorded, charged nothing.
        let reversed = ticket.reversed;
        let approved = e.approved && !reversed;
        let denied = self
            .deny
            .get(&e.card_no)
            .filter(|d| d.added_at_ms <= e.occurred_ms);
        let risk = approved && denied.is_some();
        let mut ops = Vec::new();
        if let Some(d) = denied.filter(|_| risk) {
            let charged = if approved {
                e.req.amount_fen.unwrap_or(0)
            } else {
                0
            };
            ops.push(
                self.offline_risk(terminal, &e, charged, &d.reason, risks)
                    .await?,
            );
        }
        let auth_id = String::from(self.auth_ids.next());
        // Dated by the tap, not the upload: a reversal gives the fare back
        // to the day it was counted in.
        let committed = self
            .decide_and_commit(ticket, Some(&e.card_no), e.occurred_ms, |snapshot| {
                Ok(self.offline_recorded(
                    terminal,
                    &e,
                    reversed,
                    auth_id.clone(),
                    ops,
                    snapshot,
                    now_ms,
                ))
            })
            .await?;
        let outcome = OfflineOutcome {
            event_id: e.req.event_id,
            status: "accepted".into(),
            auth_id: Some(auth_id),
            risk,
            error: None,
        };
        Ok((outcome, committed))
    }

    /// What an offline event writes: its answer, its record (marked
    /// offline) and the card's spend of the tap's day.
    #[allow(clippy::too_many_arguments)]
    fn offline_recorded(
        &self,
        terminal: &str,
        e: &OfflineEvent,
        reversed: bool,
        auth_id: String,
        ops: Vec<Op>,
        snapshot: Option<Card>,
        now_ms: i64,
    ) -> Decided<'static> {
        let approved = e.approved && !reversed;
        let reason = if reversed { Reason::Reversed } else { e.reason };
        let charged = if approved {
            e.req.amount_fen.unwrap_or(0)
        } else {
            0
        };
        let answer = serde_json::to_vec(&serde_json::json!({
            "event_id": e.req.event_id,
            "auth_id": auth_id,
            "decision": if approved { "approve" } else { "decline" },
            "reason": reason.code(),
            "amount_fen": charged,
            "offline": true,
        }))
        .expect("an answer serializes");
        let day = self.policy.local_day(e.occurred_ms.div_euclid(1000));
        let card_after = snapshot.and_then(|mut c| {
            (charged > 0 && day >= c.spent_day).then(|| {
                c.spent_fen = c.spent_on(day).saturating_add(charged);
                c.spent_day = day;
                (e.card_no.clone(), c)
            })
        });
        let record = DecisionRecord {
            at_ms: now_ms,
            terminal: terminal.to_owned(),
            event_id: e.req.event_id.clone(),
            auth_id,
            kind: EventKind::Tap,
            card_no: (&e.card_no).into(),
            scenario: Some(e.req.scenario),
            amount_fen: e.req.amount_fen,
            decision: if approved { "approve" } else { "decline" }.to_owned(),
            reason,
            charged_fen: charged,
            site: e.req.site.clone(),
            occurred_at: e.req.occurred_at.clone(),
            offline: true,
            ..DecisionRecord::default()
        };
        Decided {
            record: record.into(),
            answer,
            remember: Remember::Event { approved },
            ops,
            card_after,
            venue_after: None,
        }
    }

    /// The offline risk of an approval of a card listed before the tap:
    /// counted per card and terminal, adding to what this upload already
    /// counted (`risks`, not yet on disk) or to what is stored.
    async fn offline_risk(
        &self,
        terminal: &str,
        e: &OfflineEvent,
        charged: i64,
        listed_for: &str,
        risks: &mut HashMap<Vec<u8>, RiskRecord>,
    ) -> Result<Op, ServiceError> {
        let key = risk_key(e.card_no.as_str(), terminal);
        let stored = match risks.remove(&key) {
            Some(r) => Some(r),
            None => self
                .store
                .read(Cf::OfflineRisk, &key)
                .await?
                .and_then(|v| serde_json::from_slice(&v).ok()),
        };
        let mut r = stored.unwrap_or_else(|| RiskRecord {
            card_no: (&e.card_no).into(),
            terminal: terminal.to_owned(),
            first_at_ms: e.occurred_ms,
            ..RiskRecord::default()
        });
        r.taps += 1;
        r.amount_fen += charged;
        r.first_at_ms = r.first_at_ms.min(e.occurred_ms);
        r.last_at_ms = r.last_at_ms.max(e.occurred_ms);
        r.denylist_reason = listed_for.to_owned();
        let op = Op::Put(
            Cf::OfflineRisk,
            key.clone(),
            serde_json::to_vec(&r).expect("serializes"),
        );
        risks.insert(key, r);
        metrics::counter!("onecard_offline_risk_taps_total").increment(1);
        tracing::warn!(card = %e.card_no, terminal, "offline approval of a card deny-listed before the tap");
        Ok(op)
    }
}

/// The answer to an upload: each event's outcome and the counts, which
/// are also counted in `onecard_offline_events_total`.
fn offline_answer(outcomes: Vec<OfflineOutcome>) -> OfflineAnswer {
    let count = |s: &str| outcomes.iter().filter(|o| o.status == s).count();
    let answer = OfflineAnswer {
        accepted: count("accepted"),
        duplicates: count("duplicate"),
        rejected: count("rejected") + count("conflict"),
        risk: outcomes.iter().filter(|o| o.risk).count(),
        events: outcomes,
    };
    for (result, n) in [
        ("accepted", answer.accepted),
        ("duplicate", answer.duplicates),
        ("rejected", answer.rejected),
    ] {
        metrics::counter!("onecard_offline_events_total", "result" => result).increment(n as u64);
    }
    answer
}

/// Offline risk records, up to `limit`, in card order.
pub fn risk_list(gw: &Gateway, limit: usize) -> Result<Vec<RiskRecord>, ServiceError> {
    let mut out = Vec::new();
    gw.store
        .scan(Cf::OfflineRisk, &[], |_, v| {
            if let Ok(r) = serde_json::from_slice::<RiskRecord>(v) {
                out.push(r);
            }
            out.len() < limit
        })
        .map_err(ServiceError::from)?;
    Ok(out)
}
