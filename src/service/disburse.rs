//! Disbursements: subsidies and wages paid into card accounts.
//!
//! An operator uploads a batch (`POST /admin/v1/disbursements/{batch_id}`,
//! NDJSON or CSV): one record per line naming a card (or the holder's
//! hashed personal ID), an amount and a programme (a student grant, a farm
//! subsidy, a construction project's wages for a month). Each record is
//! checked; the accepted ones become journal records with `decision:
//! "credit"` in the payment scenario, which the payment sink settles as
//! credit lines; the operator gets a report with one outcome per record.
//!
//! - **Pure core** ([`parse`], [`check`], [`assess`]): parsing and the
//!   rules, table-tested, no I/O; card and holder look-ups are handed in.
//!   A record is accepted only if a configured settlement sink takes its
//!   credit (asked with the sink's own `takes`), so nothing is journaled
//!   that no one would pay: a partner region's card needs a payment sink
//!   naming the partner, a card of no agreement is refused.
//! - **Once per card**: within a batch, a second record paying the same
//!   card for the same programme (wages: the same project and month) is
//!   refused `DUPLICATE_CARD`; a wage whose project and month already
//!   paid the worker's card chain in an earlier batch `ALREADY_PAID` (the
//!   batch slot serializes uploads, so the wage index read is current).
//! - **One batch, one journal commit**: every credit, the wage index
//!   entries, the stored report with the body's fingerprint and the audit
//!   entry are written in one synced batch. A crash mid-batch leaves
//!   nothing, so uploading the batch again after it pays each record once;
//!   once stored, the same batch id with the same body answers the stored
//!   report byte for byte (and writes nothing), with another body `409`.
//!   A store that cannot be read aborts the upload (`503`) and stores
//!   nothing; a body without one well-formed record is refused (`400`).
//!   A credit's event id is `<batch_id>:<record_id>`, unambiguous (a batch
//!   id has no `:`) and within the 64 characters of an event id.
//!   One batch is processed at a time, so two uploads of one id cannot both
//!   find it new. A commit of `records_max` credits (a few MB) holds the
//!   journal writer for a few milliseconds: taps wait that long, once.
//! - **Wages**: a wages programme's credits are indexed by project, month
//!   and card (`w/…` in the `disburse` column family, in the same commit),
//!   so `GET /admin/v1/projects/{project}/unpaid?month=` lists the workers
//!   of a project's roster who were credited nothing that month (on any
//!   card of their replacement chain): withheld or diverted wages show up.
//!
//! Card status is read from memory without the card's lock: a card
//! reported lost in the same millisecond may still be credited, which pays
//! the holder's account, not whoever holds the card.
//!
//! Never: echo a card number or a personal-ID hash in a message (report
//! cards are masked), parse on the workers that serve terminals (it runs
//! on the blocking pool), or take a body or batch without a bound.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;

use onecard_core::authz::DenySet;
use onecard_core::disburse::{
    assess, check_batch_id, check_project, credit_event_id, credit_record, fingerprint, parse,
    wage_of, Format, Found, Programmes, Record, Rules, Target,
};
use onecard_core::model::{CardNo, CardStatus, StoredCardNo};
use onecard_core::scenario::region::Origin;
use onecard_core::settle::batch::Cards;
use onecard_core::settle::batch::Rules as SinkRules;

use crate::service::cardlife::Actor;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::store::audit::AuditEntry;
use crate::store::durable::{Commit, Op};
use crate::store::{profiles, Cf, Store, StoreError};

/// Replacements followed each way along a card's chain, at most: a card
/// is replaced a few times in its holder's life; the bound only stops a
/// corrupt loop.
const REPLACEMENTS_FOLLOWED_MAX: usize = 8;

/// The routing of every configured sink, as its delivery task builds it
/// (`service::settle`): the batch limits play no part in what it takes.
pub fn sink_rules(
    config: &crate::config::Config,
    policy: &onecard_core::authz::Policy,
) -> Vec<SinkRules> {
    config
        .settlement
        .sinks
        .iter()
        .map(|s| SinkRules {
            sink: s.name.clone(),
            scenarios: s.scenario_list().unwrap_or_default(),
            cards: Cards::of(&policy.regions, &s.partners),
            events_max: s.events_max,
            bytes_max: s.bytes_max,
            age_max_ms: s.age_max_ms,
            day_offset_minutes: policy.day_offset_minutes,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Keys of the `disburse` column family
// ---------------------------------------------------------------------------

pub fn batch_key(batch_id: &str) -> Vec<u8> {
    [b"b/", batch_id.as_bytes()].concat()
}

pub fn roster_key(project: &str) -> Vec<u8> {
    [b"p/", project.as_bytes()].concat()
}

/// `w/<project> 0x00 <month> 0x00`: the wages of a project's month.
pub fn wages_prefix(project: &str, month: &str) -> Vec<u8> {
    [b"w/", project.as_bytes(), b"\0", month.as_bytes(), b"\0"].concat()
}

/// `w/<project> 0x00 <month> 0x00 <card_no> 0x00`: one card's wages of a
/// project's month.
fn wage_card_prefix(project: &str, month: &str, card_no: &str) -> Vec<u8> {
    [&wages_prefix(project, month)[..], card_no.as_bytes(), b"\0"].concat()
}

/// A credited wage: the month's prefix, the card, and the credit's event id.
pub fn wage_key(project: &str, month: &str, card_no: &str, event_id: &str) -> Vec<u8> {
    [
        &wage_card_prefix(project, month, card_no)[..],
        event_id.as_bytes(),
    ]
    .concat()
}

// ---------------------------------------------------------------------------
// Upload (I/O)
// ---------------------------------------------------------------------------

/// A stored batch: the fingerprint (32 bytes), then the report's bytes.
fn stored(store: &crate::store::Store, batch_id: &str) -> Result<Option<Vec<u8>>, ServiceError> {
    store
        .get(Cf::Disburse, &batch_key(batch_id))
        .map_err(ServiceError::from)
}

/// The stored report of a batch.
pub fn report(gw: &Gateway, batch_id: &str) -> Result<Vec<u8>, ServiceError> {
    check_batch_id(batch_id)?;
    match stored(&gw.store, batch_id)? {
        Some(v) if v.len() >= 32 => Ok(v[32..].to_vec()),
        Some(_) => Err(ServiceError::from(StoreError::Corrupt {
            cf: "disburse",
            detail: "a stored batch is too short".into(),
        })),
        None => Err(ServiceError::not_found("no disbursement batch has that id")),
    }
}

/// Processes an upload (see the module documentation) and answers its
/// report's bytes. Runs on its own task to its end, whatever the client
/// does; `slot` (one batch at a time) travels with it.
pub async fn upload(
    gw: Arc<Gateway>,
    actor: Actor,
    batch_id: String,
    format: Format,
    body: Bytes,
    slot: OwnedSemaphorePermit,
) -> Result<Vec<u8>, ServiceError> {
    check_batch_id(&batch_id)?;
    let work = async move {
        let _slot = slot;
        let gw2 = gw.clone();
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&gw2, &actor, &batch_id, format, &body))
                .await
                .map_err(|_| ServiceError::unavailable("the batch failed; retry"))??;
        let (report_bytes, commit, accepted, rejected) = match prepared {
            Prepared::Replay(bytes) => return Ok(bytes),
            Prepared::New {
                report,
                commit,
                accepted,
                rejected,
            } => (report, commit, accepted, rejected),
        };
        gw.journal
            .commit(commit)
            .await
            .map_err(ServiceError::from)?;
        metrics::counter!("onecard_disbursement_records_total", "outcome" => "accepted")
            .increment(accepted);
        metrics::counter!("onecard_disbursement_records_total", "outcome" => "rejected")
            .increment(rejected);
        tracing::info!(accepted, rejected, "disbursement batch recorded");
        Ok(report_bytes)
    };
    tokio::spawn(work).await.map_err(|_| {
        ServiceError::unavailable(
            "the batch was interrupted; send it again (a batch is recorded whole or not at all)",
        )
    })?
}

enum Prepared {
    /// Stored before with the same body: its report again.
    Replay(Vec<u8>),
    New {
        report: Vec<u8>,
        commit: Commit,
        accepted: u64,
        rejected: u64,
    },
}

/// The blocking part of an upload: the stored batch, or parsing, checking
/// and the commit that records it.
fn prepare(
    gw: &Gateway,
    actor: &Actor,
    batch_id: &str,
    format: Format,
    body: &[u8],
) -> Result<Prepared, ServiceError> {
    let fp = fingerprint(format, body);
    if let Some(v) = stored(&gw.store, batch_id)? {
        if v.len() >= 32 && v[..32] == fp {
            return Ok(Prepared::Replay(v[32..].to_vec()));
        }
        return Err(ServiceError::conflict(
            "a batch with this id was already recorded with another body, and its accepted \
             records are paid; nothing of this upload was recorded. To pay records that \
             batch rejected, correct them and send only those under a new batch id \
             (GET /admin/v1/disbursements/{batch_id} shows its report)",
        ));
    }
    let config = &gw.config.disbursement;
    let parsed = parse(format, body, config.records_max)?;
    let sinks = sink_rules(&gw.config, &gw.policy);
    let rules = Rules {
        programmes: &config.programmes,
        regions: &gw.policy.regions,
        sinks: &sinks,
    };
    let (report, credits) = assess(batch_id, parsed, &rules, |r| {
        find(gw, r, &config.programmes).map_err(ServiceError::from)
    })?;
    let report_bytes = serde_json::to_vec(&report).expect("a report serializes");
    let now = gw.now_ms();
    let mut ops = Vec::new();
    let mut also = Vec::with_capacity(credits.len());
    for c in &credits {
        let r = &c.record;
        let event_id = credit_event_id(batch_id, &r.record_id);
        if let Some((project, month)) = wage_of(r, &config.programmes) {
            ops.push(Op::Put(
                Cf::Disburse,
                wage_key(project, month, c.card_no.as_str(), &event_id),
                r.amount_fen.to_string().into_bytes(),
            ));
        }
        let record = credit_record(
            event_id,
            batch_id,
            r,
            &c.card_no,
            String::from(gw.auth_ids.next()),
            now,
        );
        also.push((record.to_json(), c.card_no.as_str().into()));
    }
    let mut value = fp.to_vec();
    value.extend_from_slice(&report_bytes);
    ops.push(Op::Put(Cf::Disburse, batch_key(batch_id), value));
    let detail = serde_json::json!({
        "batch_id": batch_id, "records": report.records, "accepted": report.accepted,
        "rejected": report.rejected, "accepted_fen": report.accepted_fen,
    });
    ops.push(
        gw.audit
            .op(&audit_entry(actor, "disburse", Some(detail), now)),
    );
    let mut commit = Commit::new(None, ops);
    commit.also = also;
    Ok(Prepared::New {
        report: report_bytes,
        commit,
        accepted: report.accepted,
        rejected: report.rejected,
    })
}

/// What the gateway knows of a record's target. A read that fails is an
/// error (the upload answers `503` and records nothing), never a
/// "not found" that the stored report would keep for good.
fn find(gw: &Gateway, r: &Record, programmes: &Programmes) -> Result<Found, StoreError> {
    let card_no = match &r.target {
        Target::Card(c) => c.clone(),
        Target::Holder(h) => match profiles::person(&gw.store, h)? {
            Some(c) => c,
            None => return Ok(Found::nothing()),
        },
    };
    let partner_listed = match gw.policy.regions.origin(&card_no) {
        Origin::Partner(p) => gw.partners.contains(p, &card_no),
        Origin::Home | Origin::Foreign => false,
    };
    let paid_before = match wage_of(r, programmes) {
        Some((project, month)) => wage_paid(&gw.store, project, month, &card_no)?,
        None => None,
    };
    Ok(Found {
        card: gw.cards.get(&card_no),
        listing: gw.deny.listing(&card_no),
        card_no: Some(card_no),
        partner_listed,
        paid_before,
    })
}

/// The cards of one holder's replacement chain through `card_no`: the
/// card, the cards it replaced (`replaces`, backwards) and those that
/// replaced it (`replaced_by`, forwards), at most
/// [`REPLACEMENTS_FOLLOWED_MAX`] each way; a loop (only corrupt data makes
/// one) ends the walk.
fn chain(store: &Store, card_no: &CardNo) -> Result<Vec<CardNo>, StoreError> {
    let mut out = vec![card_no.clone()];
    let start = profiles::profile(store, card_no)?;
    for (forwards, first) in [(true, start.replaced_by), (false, start.replaces)] {
        let mut next = first;
        for _ in 0..REPLACEMENTS_FOLLOWED_MAX {
            let Some(c) = next.take().and_then(|n| CardNo::parse(&n).ok()) else {
                break;
            };
            if out.contains(&c) {
                break;
            }
            let p = profiles::profile(store, &c)?;
            next = if forwards { p.replaced_by } else { p.replaces };
            out.push(c);
        }
    }
    Ok(out)
}

/// The event id of a wage of the project's month credited to the card or
/// a card of its replacement chain, if any.
fn wage_paid(
    store: &Store,
    project: &str,
    month: &str,
    card_no: &CardNo,
) -> Result<Option<String>, StoreError> {
    for c in chain(store, card_no)? {
        let prefix = wage_card_prefix(project, month, c.as_str());
        let mut event_id = None;
        store.scan(Cf::Disburse, &prefix, |k, _| {
            if let Some(rest) = k.strip_prefix(&prefix[..]) {
                event_id = Some(String::from_utf8_lossy(rest).into_owned());
            }
            false
        })?;
        if event_id.is_some() {
            return Ok(event_id);
        }
    }
    Ok(None)
}

fn audit_entry(actor: &Actor, action: &str, detail: Option<Value>, at_ms: i64) -> AuditEntry {
    AuditEntry {
        at_ms,
        who: actor.name.clone(),
        role: actor.role.as_str().to_owned(),
        action: action.to_owned(),
        card_no: None,
        detail,
    }
}

// ---------------------------------------------------------------------------
// Wages: rosters and the unpaid view
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    pub workers: Vec<StoredCardNo>,
    pub at_ms: i64,
}

/// Replaces a project's roster; audited. Returns how many workers it holds.
pub async fn put_roster(
    gw: &Gateway,
    actor: &Actor,
    project: &str,
    workers: Vec<CardNo>,
) -> Result<usize, ServiceError> {
    check_project(project)?;
    let now = gw.now_ms();
    let roster = Roster {
        workers: workers.iter().map(StoredCardNo::from).collect(),
        at_ms: now,
    };
    let detail = serde_json::json!({"project": project, "workers": workers.len()});
    let ops = vec![
        Op::Put(
            Cf::Disburse,
            roster_key(project),
            serde_json::to_vec(&roster).expect("a roster serializes"),
        ),
        gw.audit
            .op(&audit_entry(actor, "roster", Some(detail), now)),
    ];
    gw.journal
        .commit(Commit::new(None, ops))
        .await
        .map_err(ServiceError::from)?;
    Ok(workers.len())
}

/// One rostered worker credited no wage for the month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unpaid {
    /// In the clear: an operator-only answer, as the card GET is.
    pub card_no: StoredCardNo,
    /// The card's status, `null` when the card is not known.
    pub status: Option<CardStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnpaidView {
    pub project: String,
    pub month: String,
    pub workers: u64,
    pub paid: u64,
    /// Fen credited as the project's wages for the month, to anyone.
    pub credited_fen: i64,
    pub unpaid: Vec<Unpaid>,
}

/// The rostered workers of a project credited no wage in `month`. A
/// worker whose card was replaced counts as paid when any card of the
/// chain was credited, before or after the replacement (a roster may name
/// the old card or the new one). The RocksDB reads (a scan and a few
/// profile reads per worker) run on the blocking pool, not on the workers
/// that serve requests.
pub async fn unpaid(
    gw: Arc<Gateway>,
    project: String,
    month: String,
) -> Result<UnpaidView, ServiceError> {
    check_project(&project)?;
    tokio::task::spawn_blocking(move || unpaid_blocking(&gw, &project, &month))
        .await
        .map_err(|_| ServiceError::unavailable("the unpaid view failed; retry"))?
}

fn unpaid_blocking(gw: &Gateway, project: &str, month: &str) -> Result<UnpaidView, ServiceError> {
    let roster = match gw
        .store
        .get(Cf::Disburse, &roster_key(project))
        .map_err(ServiceError::from)?
    {
        Some(v) => serde_json::from_slice::<Roster>(&v).map_err(|_| {
            ServiceError::from(StoreError::Corrupt {
                cf: "disburse",
                detail: "a roster does not decode".into(),
            })
        })?,
        None => {
            return Err(ServiceError::not_found(
                "the project has no roster; PUT /admin/v1/projects/{project}/workers first",
            ))
        }
    };
    let prefix = wages_prefix(project, month);
    let mut paid_cards: HashSet<Vec<u8>> = HashSet::new();
    let mut credited_fen = 0i64;
    gw.store
        .scan(Cf::Disburse, &prefix, |k, v| {
            let Some(rest) = k.strip_prefix(&prefix[..]) else {
                return false;
            };
            if let Some(card) = rest.split(|&b| b == 0).next() {
                paid_cards.insert(card.to_vec());
            }
            credited_fen += std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(0);
            true
        })
        .map_err(ServiceError::from)?;
    let mut view = UnpaidView {
        project: project.to_owned(),
        month: month.to_owned(),
        workers: roster.workers.len() as u64,
        paid: 0,
        credited_fen,
        unpaid: Vec::new(),
    };
    for w in &roster.workers {
        let Ok(card_no) = CardNo::parse(w) else {
            continue;
        };
        let chain = chain(&gw.store, &card_no).map_err(ServiceError::from)?;
        if chain
            .iter()
            .any(|c| paid_cards.contains(c.as_str().as_bytes()))
        {
            view.paid += 1;
        } else {
            view.unpaid.push(Unpaid {
                card_no: w.clone(),
                status: gw.cards.get(&card_no).map(|c| c.status),
            });
        }
    }
    Ok(view)
}
