//! The hotline's look-up (12345, 12333): a card's recent decisions and
//! where each stands in settlement, for an agent on the phone with the
//! card holder.
//!
//! Records come from the journal through the `card_tx` index (card,
//! sequence), newest first, following the replacement chain so that a
//! resident with a new card still sees what the lost one did. Card numbers
//! other than the one asked for (a predecessor's) are masked. Every
//! look-up is audited, durably, before it is answered.

use serde::Serialize;

use onecard_core::model::{CardNo, StoredCardNo};
use onecard_core::record::DecisionRecord;

use crate::service::cardlife::Actor;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::settle;
use crate::store::durable::Commit;
use crate::store::journal::card_tx_key;
use crate::store::{profiles, Cf, Store, StoreError};

/// Records per look-up at most, and by default.
pub const LOOKUP_LIMIT_MAX: usize = 500;
pub const LOOKUP_LIMIT_DEFAULT: usize = 50;
/// Predecessor cards followed at most.
const CHAIN_MAX: usize = 8;

#[derive(Debug, Serialize)]
pub struct Transaction {
    pub seq: u64,
    pub at_ms: i64,
    /// Masked unless it is the card asked for.
    pub card_no: StoredCardNo,
    #[serde(flatten)]
    pub record: RecordView,
    /// `none` (a decline or nothing charged), `unsettled` (no sink takes
    /// the scenario), `pending` (not yet in a batch), `sent` (in a batch
    /// awaiting acknowledgement), `parked`, or `acknowledged`.
    pub settlement: &'static str,
}

#[derive(Debug, Serialize)]
pub struct RecordView {
    pub terminal: String,
    pub event_id: String,
    pub auth_id: String,
    pub kind: onecard_core::model::EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<onecard_core::model::Scenario>,
    pub decision: String,
    pub reason: &'static str,
    pub charged_fen: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverses: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
    /// A medical capture's (or its reversal's) split between insurance
    /// and self-pay: what the resident asks the hotline about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<onecard_core::scenario::medical::Split>,
}

#[derive(Debug, Serialize)]
pub struct Lookup {
    pub card_no: StoredCardNo,
    pub transactions: Vec<Transaction>,
    /// More records match than `limit`.
    pub more: bool,
}

/// The look-up's filter: `[from_ms, to_ms)` and how many.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: usize,
}

/// Parses `from`, `to` (RFC 3339) and `limit` from a query string.
pub fn window(query: Option<&str>) -> Result<Window, ServiceError> {
    let mut w = Window {
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        limit: LOOKUP_LIMIT_DEFAULT,
    };
    let time = |v: &str, name: &str| {
        let v = v
            .replace("%3A", ":")
            .replace("%3a", ":")
            .replace("%2B", "+")
            .replace("%2b", "+");
        time::OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| {
                ServiceError::invalid(format!(
                    "`{name}` must be an RFC 3339 time such as 2026-11-28T07:45:12Z"
                ))
            })
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("from", v)) => w.from_ms = time(v, "from")?,
            Some(("to", v)) => w.to_ms = time(v, "to")?,
            Some(("limit", v)) => {
                w.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=LOOKUP_LIMIT_MAX).contains(n))
                    .ok_or_else(|| {
                        ServiceError::invalid(format!("`limit` must be 1 to {LOOKUP_LIMIT_MAX}"))
                    })?
            }
            _ => {
                return Err(ServiceError::invalid(
                    "unknown query parameter; this look-up takes from, to and limit",
                ))
            }
        }
    }
    if w.from_ms >= w.to_ms {
        return Err(ServiceError::invalid("`from` must be before `to`"));
    }
    Ok(w)
}

impl Gateway {
    /// A card's decisions in the window, newest first. Audited.
    pub async fn card_transactions(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        w: Window,
        now_ms: i64,
    ) -> Result<Lookup, ServiceError> {
        if self.cards.get(card_no).is_none() {
            // Audited too: probing for card numbers leaves a trace.
            let detail = serde_json::json!({"known": false});
            self.audit_lookup(actor, card_no, detail, now_ms).await?;
            return Err(ServiceError::not_found(format!(
                "card {card_no} is not known"
            )));
        }
        let chain = self.card_chain(card_no).await?;
        let mut found: Vec<(u64, CardNo, DecisionRecord)> = Vec::new();
        let mut more = false;
        for card in &chain {
            // A scan of the card's index and a read per record, on the
            // blocking pool (a terminal's request is not left waiting
            // behind it).
            let (records, card_more) = self.card_records(card, w).await?;
            more |= card_more;
            found.extend(records.into_iter().map(|(seq, r)| (seq, card.clone(), r)));
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        if found.len() > w.limit {
            found.truncate(w.limit);
            more = true;
        }
        let asked: Vec<(u64, &DecisionRecord)> =
            found.iter().map(|(seq, _, r)| (*seq, r)).collect();
        let settlements = self.settlement_of(&asked).await?;
        let mut transactions = Vec::with_capacity(found.len());
        for ((seq, card, r), (settlement, _)) in found.into_iter().zip(settlements) {
            transactions.push(Transaction {
                seq,
                at_ms: r.at_ms,
                card_no: if &card == card_no {
                    card.as_str().into()
                } else {
                    card.masked().into()
                },
                settlement,
                record: RecordView {
                    terminal: r.terminal,
                    event_id: r.event_id,
                    auth_id: r.auth_id,
                    kind: r.kind,
                    scenario: r.scenario,
                    decision: r.decision,
                    reason: r.reason.code(),
                    charged_fen: r.charged_fen,
                    site: r.site,
                    occurred_at: r.occurred_at,
                    reverses: r.reverses,
                    offline: r.offline,
                    split: r.split,
                },
            });
        }
        let detail = serde_json::json!({
            "from_ms": (w.from_ms != i64::MIN).then_some(w.from_ms),
            "to_ms": (w.to_ms != i64::MAX).then_some(w.to_ms),
            "returned": transactions.len(),
        });
        self.audit_lookup(actor, card_no, detail, now_ms).await?;
        tracing::info!(card = %card_no, who = %actor.name, "transactions looked up");
        Ok(Lookup {
            card_no: card_no.into(),
            transactions,
            more,
        })
    }

    /// The card and the cards it replaced, newest first (at most
    /// [`CHAIN_MAX`]): a resident with a new card still sees what the
    /// lost one did.
    pub(crate) async fn card_chain(&self, card_no: &CardNo) -> Result<Vec<CardNo>, StoreError> {
        let mut chain = vec![card_no.clone()];
        while chain.len() < CHAIN_MAX {
            let last = chain.last().expect("never empty");
            let p = profiles::profile_async(&self.store, last).await?;
            match p.replaces.and_then(|c| CardNo::parse(&c).ok()) {
                Some(prev) if !chain.contains(&prev) => chain.push(prev),
                _ => break,
            }
        }
        Ok(chain)
    }

    async fn audit_lookup(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        detail: serde_json::Value,
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        let entry = crate::store::audit::AuditEntry {
            at_ms: now_ms,
            who: actor.name.clone(),
            role: actor.role.as_str().to_owned(),
            action: "transactions".into(),
            card_no: Some(card_no.into()),
            detail: Some(detail),
        };
        self.journal
            .commit(Commit::new(None, vec![self.audit.op(&entry)]))
            .await
            .map_err(ServiceError::from)
            .map(|_| ())
    }

    /// One card's records in the window, newest first, at most
    /// `w.limit`, and whether there are more: [`card_records`] on the
    /// blocking pool (a scan of the card's index and a read per record
    /// may wait for the disk; a worker is not held by it, nor handed over
    /// to it as `block_in_place` would, starting a new worker thread).
    #[allow(clippy::type_complexity)]
    pub(crate) async fn card_records(
        &self,
        card: &CardNo,
        w: Window,
    ) -> Result<(Vec<(u64, DecisionRecord)>, bool), StoreError> {
        let store = self.store.clone();
        let card = card.clone();
        crate::store::blocking(move || card_records(&store, &card, w)).await
    }

    /// Where each journal record (`seq`, record) stands in settlement,
    /// with the id of the stored batch that holds it (sent or parked). The
    /// sinks' cursors and batches are read on the blocking pool: they may
    /// wait for the disk, and an async worker is not held by it (nor handed
    /// over, as `block_in_place` would, starting a new worker thread).
    pub(crate) async fn settlement_of(
        &self,
        records: &[(u64, &DecisionRecord)],
    ) -> Result<Vec<(&'static str, Option<String>)>, StoreError> {
        let asked: Vec<(u64, Result<String, &'static str>)> = records
            .iter()
            .map(|(seq, r)| (*seq, self.settling_sink(r).map(str::to_owned)))
            .collect();
        let store = self.store.clone();
        crate::store::blocking(move || {
            asked
                .into_iter()
                .map(|(seq, sink)| match sink {
                    Ok(sink) => settled_by(&store, &sink, seq),
                    Err(state) => Ok((state, None)),
                })
                .collect()
        })
        .await
    }

    /// The sink that settles `r`: its scenario's, and of those the one
    /// whose cards it is (a partner region's card goes to the partner's
    /// sink, not the first that names the scenario). Or, where no sink
    /// takes it, its state: `none` (nothing to settle) or `unsettled` (no
    /// sink configured for it).
    fn settling_sink(&self, r: &DecisionRecord) -> Result<&str, &'static str> {
        let settles =
            matches!(r.decision.as_str(), "approve" | "reverse" | "credit") && r.charged_fen > 0;
        let scenario = r.scenario.filter(|_| settles).ok_or("none")?;
        self.config
            .settlement
            .sinks
            .iter()
            .find(|s| {
                s.scenario_list().is_ok_and(|l| l.contains(&scenario))
                    && onecard_core::settle::batch::Cards::of(&self.policy.regions, &s.partners)
                        .takes(&r.card_no)
            })
            .map(|s| s.name.as_str())
            .ok_or("unsettled")
    }
}

/// Where journal record `seq` stands at `sink`, and the stored batch that
/// holds it. Blocks on the store.
fn settled_by(
    store: &Store,
    sink: &str,
    seq: u64,
) -> Result<(&'static str, Option<String>), StoreError> {
    // The durable cursor: it moves in the same write that stores a sealed
    // batch, so a record before it is in a stored batch (sent or parked)
    // or acknowledged, or was a charge withdrawn with its reversal before
    // its batch sealed (then the receiver saw neither, and this says
    // "acknowledged" of a net of nothing); one after it is still waiting
    // (maybe in the open batch, read ahead of the durable cursor).
    let cursor = store
        .get_u64(Cf::Settle, &settle::cursor_key(sink))?
        .unwrap_or(0);
    if seq >= cursor {
        return Ok(("pending", None));
    }
    if let Some(b) = settle::holding(store, &settle::batch_prefix(sink), seq)? {
        return Ok(("sent", Some(b.id)));
    }
    if let Some(b) = settle::holding(store, &settle::parked_prefix(sink), seq)? {
        return Ok(("parked", Some(b.id)));
    }
    Ok(("acknowledged", None))
}

/// One card's records in the window, newest first, at most `w.limit`, and
/// whether there are more. Reads the index backwards and stops as soon as
/// it can: a busy card's old history is not read. Blocks on the store.
#[allow(clippy::type_complexity)]
fn card_records(
    store: &Store,
    card: &CardNo,
    w: Window,
) -> Result<(Vec<(u64, DecisionRecord)>, bool), StoreError> {
    let start = card_tx_key(card.as_str(), u64::MAX);
    let prefix = &start[..start.len() - 8];
    let mut out = Vec::new();
    let mut more = false;
    let mut failed = None;
    store.scan_back(Cf::CardTx, &start, |k, _| {
        if !k.starts_with(prefix) || k.len() != prefix.len() + 8 {
            return false;
        }
        let seq = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
        let record = match store.get(Cf::Journal, &seq.to_be_bytes()) {
            Ok(Some(v)) => {
                serde_json::from_slice::<DecisionRecord>(&v).map_err(|_| StoreError::Corrupt {
                    cf: "journal",
                    detail: format!("record {seq} does not decode"),
                })
            }
            Ok(None) => return true,
            Err(e) => Err(e),
        };
        let r = match record {
            Ok(r) => r,
            Err(e) => {
                failed = Some(e);
                return false;
            }
        };
        if r.at_ms >= w.to_ms {
            return true;
        }
        if r.at_ms < w.from_ms {
            return false;
        }
        if out.len() == w.limit {
            more = true;
            return false;
        }
        out.push((seq, r));
        true
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok((out, more)),
    }
}
