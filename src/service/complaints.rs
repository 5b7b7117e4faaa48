//! Complaints linked to transactions (投诉处理联动机制): an agent files one
//! on a card, optionally on one of its transactions (by `auth_id`); the
//! complaint goes to the unit that answers for that transaction's scenario
//! and site (`[catalogue]`), or to the card's issuer; it shows the
//! transaction, where it stands in settlement and its reversal if any;
//! notes are added; it is closed with an outcome: a refund through the
//! reversal path (its line reaches the sink like any reversal), an
//! explanation or a referral. Every step is durable, audited, and kept:
//! complaints are never deleted.

use serde::Serialize;
use sha2::Digest;

use onecard_core::complaint::{self, Category, Charged, ComplaintState, Outcome};
use onecard_core::model::CardNo;
use onecard_core::record::DecisionRecord;
use onecard_core::wire::ReverseRequest;

use crate::config::Role;
use crate::service::cardlife::Actor;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::hotline::Window;
use crate::store::complaints::{self as kept, Closing, Complaint, Step, TxRef, LISTED_MAX};
use crate::store::durable::{Commit, Op};
use crate::store::{Cf, Store};

/// What a resident says, as written down: 1 to 500 characters.
pub const SAYS_CHARS_MAX: usize = 500;
/// A card's records searched for the transaction complained about, newest
/// first, at most (its replaced cards' too).
pub const SEARCHED_MAX: usize = 1_000;

#[derive(Debug, Clone)]
pub struct Filing {
    pub request_id: String,
    pub card_no: CardNo,
    pub auth_id: Option<String>,
    pub category: Category,
    pub says: String,
}

#[derive(Debug, Clone)]
pub struct CloseInput {
    pub outcome: Outcome,
    pub note: String,
    pub referred_to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct View {
    #[serde(flatten)]
    pub complaint: Complaint,
    /// The transaction as it stands now: settlement and reversal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_now: Option<TxNow>,
    pub changed: bool,
}

#[derive(Debug, Serialize)]
pub struct TxNow {
    /// As the hotline shows it: `none`, `unsettled`, `pending`, `sent`,
    /// `parked`, `acknowledged`.
    pub settlement: &'static str,
    /// The stored batch holding it (sent or parked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Its reversal, if the journal has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reversal: Option<serde_json::Value>,
}

/// One unit's open complaints.
#[derive(Debug, Serialize)]
pub struct UnitOpen {
    pub unit: String,
    pub open: u64,
    /// The oldest open one's age, in hours.
    pub oldest_hours: i64,
}

#[derive(Debug, Serialize)]
pub struct Listed {
    pub by_unit: Vec<UnitOpen>,
    pub complaints: Vec<ListedOne>,
}

#[derive(Debug, Serialize)]
pub struct ListedOne {
    pub id: String,
    pub unit: String,
    pub category: Category,
    pub state: ComplaintState,
    pub card_no: onecard_core::model::StoredCardNo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_id: Option<String>,
    pub filed: String,
    pub age_hours: i64,
}

fn unknown(id: &str) -> ServiceError {
    ServiceError::not_found(format!("no complaint {id}"))
}

impl Gateway {
    /// The card's records, its predecessors' too, newest first, at most
    /// [`SEARCHED_MAX`].
    async fn records_of(&self, card: &CardNo) -> Result<Vec<(u64, DecisionRecord)>, ServiceError> {
        let chain = self.card_chain(card).await?;
        let w = Window {
            from_ms: i64::MIN,
            to_ms: i64::MAX,
            limit: SEARCHED_MAX,
        };
        let mut out = Vec::new();
        for c in &chain {
            let (records, _) = self.card_records(c, w).await?;
            out.extend(records);
        }
        out.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        out.truncate(SEARCHED_MAX);
        Ok(out)
    }

    /// Files a complaint. The same `request_id` again answers the complaint
    /// it made; with another body it is refused.
    pub async fn file_complaint(
        &self,
        actor: &Actor,
        f: Filing,
        now_ms: i64,
    ) -> Result<View, ServiceError> {
        let fingerprint = {
            let canon = serde_json::json!({
                "card_no": f.card_no.as_str(), "auth_id": f.auth_id, "category": f.category, "says": f.says,
            });
            onecard_core::hex::encode(&sha2::Sha256::digest(canon.to_string().as_bytes()))
        };
        let id = kept::complaint_id(&f.request_id);
        let _one = self.complaints_lock.lock().await;
        if let Some(existing) = kept::get(&self.store, &id).await? {
            if existing.request_fingerprint != fingerprint {
                return Err(ServiceError::already_used(
                    "`request_id` was used for another complaint; a new complaint needs a new request id",
                ));
            }
            return self.viewed(existing, false).await;
        }
        let known = self.cards.get(&f.card_no).is_some();
        if !known {
            return Err(ServiceError::not_found(format!(
                "card {} is not known",
                f.card_no
            )));
        }
        let transaction = match &f.auth_id {
            None => None,
            Some(auth_id) => {
                let records = self.records_of(&f.card_no).await?;
                let (seq, r) = records
                    .into_iter()
                    .find(|(_, r)| &r.auth_id == auth_id && r.decision != "reverse")
                    .ok_or_else(|| {
                        ServiceError::not_found(format!(
                            "card {} has no transaction {auth_id} among its last {SEARCHED_MAX}",
                            f.card_no
                        ))
                    })?;
                Some(TxRef {
                    seq,
                    auth_id: r.auth_id,
                    terminal: r.terminal,
                    event_id: r.event_id,
                    scenario: r.scenario,
                    site: r.site,
                    decision: r.decision,
                    reason: r.reason.code().to_owned(),
                    charged_fen: r.charged_fen,
                    at_ms: r.at_ms,
                })
            }
        };
        let unit = self
            .config
            .catalogue
            .unit_for(
                transaction.as_ref().and_then(|t| t.scenario),
                transaction.as_ref().and_then(|t| t.site.as_deref()),
            )
            .to_owned();
        let mut c = Complaint {
            id: id.clone(),
            request_id: f.request_id.clone(),
            request_fingerprint: fingerprint,
            card_no: (&f.card_no).into(),
            transaction,
            category: f.category,
            says: f.says.clone(),
            unit: unit.clone(),
            state: ComplaintState::Open,
            filed_ms: now_ms,
            closing: None,
            steps: Vec::new(),
        };
        c.add_step(actor.step("file", None, now_ms));
        self.keep_complaint(actor, &c, "file", now_ms).await?;
        metrics::counter!("onecard_complaints_total", "category" => f.category.as_str())
            .increment(1);
        tracing::info!(complaint = %id, card = %f.card_no, unit = %unit, who = %actor.name, "complaint filed");
        self.count_open_complaints().await?;
        self.viewed(c, true).await
    }

    /// Adds a note (what the unit found, what the resident was told).
    pub async fn complaint_note(
        &self,
        actor: &Actor,
        id: &str,
        note: String,
        now_ms: i64,
    ) -> Result<View, ServiceError> {
        let _one = self.complaints_lock.lock().await;
        let mut c = kept::get(&self.store, id)
            .await?
            .ok_or_else(|| unknown(id))?;
        if c.steps.len() >= kept::STEPS_MAX {
            return Err(ServiceError::too_large(format!(
                "complaint {id} has {} steps, its limit",
                kept::STEPS_MAX
            )));
        }
        c.add_step(actor.step("note", Some(note), now_ms));
        self.keep_complaint(actor, &c, "note", now_ms).await?;
        self.viewed(c, true).await
    }

    /// Closes a complaint with its outcome; a refund reverses the
    /// transaction through the reversal path first (an operator's, since
    /// it moves money). Closing again with the same outcome changes
    /// nothing; with another it is refused.
    pub async fn close_complaint(
        &self,
        actor: &Actor,
        id: &str,
        input: CloseInput,
        now_ms: i64,
    ) -> Result<View, ServiceError> {
        let _one = self.complaints_lock.lock().await;
        let mut c = kept::get(&self.store, id)
            .await?
            .ok_or_else(|| unknown(id))?;
        if let Some((outcome, same)) = c.closing.as_ref().map(|cl| {
            (
                cl.outcome,
                cl.outcome == input.outcome && cl.note == input.note,
            )
        }) {
            if same {
                return self.viewed(c, false).await;
            }
            return Err(ServiceError::conflict(format!(
                "complaint {id} was closed already ({outcome})"
            )));
        }
        if input.outcome == Outcome::Refund && actor.role != Role::Operator {
            return Err(ServiceError::forbidden(
                "a refund moves money: an operator closes a complaint with one",
            ));
        }
        let charged = match &c.transaction {
            None => None,
            Some(t) => {
                let card = CardNo::parse(c.card_no.as_str()).map_err(|_| {
                    ServiceError::invalid("the complaint's card number is not valid")
                })?;
                let reversed = self
                    .records_of(&card)
                    .await?
                    .iter()
                    .any(|(_, r)| r.reverses.as_deref() == Some(t.auth_id.as_str()));
                let approved_charge = if t.decision == "approve" {
                    t.charged_fen
                } else {
                    0
                };
                Some(Charged {
                    charged_fen: approved_charge,
                    reversed,
                })
            }
        };
        complaint::may_close(input.outcome, charged)
            .map_err(|why| ServiceError::conflict(format!("complaint {id}: {why}")))?;
        let reversal = match (input.outcome, &c.transaction) {
            (Outcome::Refund, Some(t)) => {
                let req = ReverseRequest {
                    event_id: t.event_id.clone(),
                    occurred_at: None,
                };
                let answer = self.reverse(&t.terminal, &req, now_ms).await?;
                let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
                if v["status"] != "reversed" {
                    return Err(ServiceError::conflict(format!(
                        "complaint {id}: the reversal answered {}, not reversed",
                        v["status"]
                    )));
                }
                Some(v)
            }
            _ => None,
        };
        c.state = ComplaintState::Closed;
        c.closing = Some(Closing {
            outcome: input.outcome,
            note: input.note.clone(),
            referred_to: input.referred_to.clone(),
            reversal,
            by: actor.name.clone(),
            at_ms: now_ms,
        });
        c.add_step(actor.step("close", Some(input.note), now_ms));
        self.keep_complaint(actor, &c, "close", now_ms).await?;
        metrics::counter!("onecard_complaints_closed_total", "outcome" => input.outcome.as_str())
            .increment(1);
        tracing::info!(complaint = %id, outcome = %input.outcome, who = %actor.name, "complaint closed");
        self.count_open_complaints().await?;
        self.viewed(c, true).await
    }

    /// Writes the complaint and its audit entry in one commit.
    async fn keep_complaint(
        &self,
        actor: &Actor,
        c: &Complaint,
        step: &str,
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        let card = CardNo::parse(c.card_no.as_str()).ok();
        let ops = vec![
            Op::Put(Cf::Complaints, kept::key(&c.id), kept::encode(c)),
            self.audit.op(&actor.entry(
                "complaint",
                card.as_ref(),
                Some(serde_json::json!({"id": c.id, "step": step, "unit": c.unit})),
                now_ms,
            )),
        ];
        self.journal
            .commit(Commit::new(None, ops))
            .await
            .map_err(ServiceError::from)?;
        Ok(())
    }

    /// The complaint with its transaction as it stands now.
    pub async fn complaint(&self, id: &str) -> Result<View, ServiceError> {
        let c = kept::get(&self.store, id)
            .await?
            .ok_or_else(|| unknown(id))?;
        self.viewed(c, false).await
    }

    async fn viewed(&self, c: Complaint, changed: bool) -> Result<View, ServiceError> {
        let transaction_now = match &c.transaction {
            None => None,
            Some(t) => {
                let record = self.store.read(Cf::Journal, &t.seq.to_be_bytes()).await?;
                let record = record
                    .and_then(|v| serde_json::from_slice::<DecisionRecord>(&v).ok())
                    .ok_or_else(|| {
                        ServiceError::Store(crate::store::StoreError::Corrupt {
                            cf: "journal",
                            detail: format!("record {} of a complaint is missing", t.seq),
                        })
                    })?;
                let (settlement, batch) = self
                    .settlement_of(&[(t.seq, &record)])
                    .await?
                    .pop()
                    .expect("one state per record");
                let card = CardNo::parse(c.card_no.as_str()).map_err(|_| {
                    ServiceError::invalid("the complaint's card number is not valid")
                })?;
                let reversal = self
                    .records_of(&card)
                    .await?
                    .into_iter()
                    .find(|(_, r)| r.reverses.as_deref() == Some(t.auth_id.as_str()))
                    .map(|(seq, r)| {
                        serde_json::json!({
                            "seq": seq, "auth_id": r.auth_id, "terminal": r.terminal,
                            "event_id": r.event_id, "charged_fen": r.charged_fen, "at_ms": r.at_ms,
                        })
                    });
                Some(TxNow {
                    settlement,
                    batch,
                    reversal,
                })
            }
        };
        Ok(View {
            complaint: c,
            transaction_now,
            changed,
        })
    }

    /// Complaints (of `unit`, in `state`), oldest first, and the open ones'
    /// count and oldest age per unit.
    pub async fn complaints(
        &self,
        unit: Option<String>,
        state: Option<ComplaintState>,
        now_ms: i64,
    ) -> Result<Listed, ServiceError> {
        let store = self.store.clone();
        let all = tokio::task::spawn_blocking(move || {
            kept::all_where(&store, LISTED_MAX, |c| {
                unit.as_deref().is_none_or(|u| c.unit == u) && state.is_none_or(|s| c.state == s)
            })
        })
        .await
        .map_err(|_| ServiceError::unavailable("the list was interrupted; retry"))??;
        let hours = |ms: i64| (now_ms - ms).max(0) / 3_600_000;
        let mut complaints: Vec<ListedOne> = all
            .into_iter()
            .map(|c| ListedOne {
                age_hours: hours(c.filed_ms),
                filed: onecard_core::time::rfc3339_ms(c.filed_ms),
                auth_id: c.transaction.map(|t| t.auth_id),
                id: c.id,
                unit: c.unit,
                category: c.category,
                state: c.state,
                card_no: c.card_no,
            })
            .collect();
        complaints.sort_by_key(|c| std::cmp::Reverse(c.age_hours));
        self.count_open_complaints().await?;
        let mut by_unit: Vec<UnitOpen> = self
            .complaints_open
            .iter()
            .map(|e| UnitOpen {
                unit: e.key().clone(),
                open: e.value().0,
                oldest_hours: if e.value().0 == 0 {
                    0
                } else {
                    hours(e.value().1)
                },
            })
            .collect();
        by_unit.sort_by(|a, b| a.unit.cmp(&b.unit));
        Ok(Listed {
            by_unit,
            complaints,
        })
    }

    /// [`Gateway::count_open_complaints_blocking`] from async code: the
    /// open complaints read on the blocking pool.
    async fn count_open_complaints(&self) -> Result<(), ServiceError> {
        let store = self.store.clone();
        let open = crate::store::blocking(move || open_complaints(&store)).await?;
        self.set_open_counts(&open);
        Ok(())
    }

    /// Counts the open complaints per unit into the gauges
    /// `onecard_complaints_open{unit}` and
    /// `onecard_complaints_oldest_open_time_seconds{unit}`. At start and
    /// after every filing and closing: complaints are few. Reads the disk.
    pub fn count_open_complaints_blocking(&self) -> Result<(), crate::store::StoreError> {
        self.set_open_counts(&open_complaints(&self.store)?);
        Ok(())
    }

    fn set_open_counts(&self, open: &[Complaint]) {
        let mut counts: std::collections::BTreeMap<String, (u64, i64)> = self
            .config
            .catalogue
            .units()
            .into_iter()
            .map(|u| (u.to_owned(), (0, i64::MAX)))
            .collect();
        for c in open {
            let e = counts.entry(c.unit.clone()).or_insert((0, i64::MAX));
            e.0 += 1;
            e.1 = e.1.min(c.filed_ms);
        }
        for (unit, (n, oldest)) in counts {
            metrics::gauge!("onecard_complaints_open", "unit" => unit.clone()).set(n as f64);
            let at = if n == 0 { 0.0 } else { oldest as f64 / 1000.0 };
            metrics::gauge!("onecard_complaints_oldest_open_time_seconds", "unit" => unit.clone())
                .set(at);
            self.complaints_open.insert(unit, (n, oldest));
        }
    }
}

/// The open complaints (at most [`LISTED_MAX`]). Blocks on the store.
fn open_complaints(store: &Store) -> Result<Vec<Complaint>, crate::store::StoreError> {
    kept::all_where(store, LISTED_MAX, |c| c.state == ComplaintState::Open)
}

impl Actor {
    pub(crate) fn step(&self, step: &str, note: Option<String>, at_ms: i64) -> Step {
        Step {
            step: step.to_owned(),
            by: self.name.clone(),
            role: self.role.as_str().to_owned(),
            at_ms,
            note,
        }
    }
}
