//! Card applications: filed at a service hall, a bank branch, online or
//! through a partner province (跨省通办), possibly by a proxy (代办) and
//! with priority for the elderly and disabled; moved through production
//! and pickup to issuance, or printed on the spot (即时制卡); found again
//! by the hotline (by personal ID) and by the resident (by application id
//! and the last four digits of their ID).
//!
//! The rules of which step is allowed from which state, a holder's age and
//! the concessions it brings are pure ([`onecard_core::application`]).
//! Here every change is one durable commit: the application's record with
//! the change and who made it, its audit entry, and at issuance the card
//! itself (created active with its holder, or, for a replacement, through
//! the card-replacement path that cancels and deny-lists the old card in
//! the same commit). Personal IDs arrive in the clear only in the request
//! and are kept as keyed hashes and masks.

use std::collections::BTreeSet;

use serde::Serialize;
use sha2::Digest;

use onecard_core::application::{
    self, AppKind, AppState, AppStep, Channel, Priority, ProxyRelation,
};
use onecard_core::model::{Card, CardNo, CardStatus, Function, StoredCardNo};
use onecard_core::privacy;

use crate::config::Role;
use crate::service::cardlife::{Actor, Issue};
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::store::applications::{self as apps, Application, Change, Proxy, OVERDUE_LISTED_MAX};
use crate::store::durable::{Commit, Op};
use crate::store::{cards, profiles, Cf};

/// Wrong-digit counters kept at most (one per application asked about
/// within the hour).
const MISSES_TRACKED_MAX: usize = 100_000;

/// What the counter filed, its personal IDs still in the clear.
#[derive(Debug, Clone)]
pub struct Submission {
    pub request_id: String,
    pub kind: AppKind,
    pub personal_id: String,
    pub name_masked: Option<String>,
    /// A disability certificate was checked at the counter.
    pub disabled: bool,
    pub channel: Channel,
    pub place: String,
    pub with_business: Option<String>,
    pub priority: Option<Priority>,
    pub proxy: Option<ProxyInput>,
    pub replaces: Option<CardNo>,
    pub functions: Vec<Function>,
    /// Instant issuance: the card the counter printed.
    pub instant_card_no: Option<CardNo>,
}

#[derive(Debug, Clone)]
pub struct ProxyInput {
    pub personal_id: String,
    pub name_masked: Option<String>,
    pub relation: ProxyRelation,
}

/// What a step needs besides itself.
#[derive(Debug, Clone, Default)]
pub struct StepInput {
    /// `produce` and `instant_issue`: the card made.
    pub card_no: Option<CardNo>,
    /// `ready_for_pickup`: where.
    pub branch: Option<String>,
    /// `reject` (required), `withdraw`: why.
    pub note: Option<String>,
}

/// An application as the admin API shows it: no hashes of personal IDs.
#[derive(Debug, Serialize)]
pub struct View {
    #[serde(flatten)]
    pub application: serde_json::Value,
    /// `false`: the request changed nothing (a retry, or the step already
    /// taken).
    pub changed: bool,
}

/// What the resident's own channel may see.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub id: String,
    pub state: AppState,
    pub since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pickup_branch: Option<String>,
}

/// One application past its channel's service promise.
#[derive(Debug, Serialize)]
pub struct Overdue {
    pub id: String,
    pub state: AppState,
    pub channel: Channel,
    pub place: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    pub since: String,
    pub days_waiting: i64,
    pub promise_days: u32,
}

/// `a` without what must not leave the gateway (the keyed hashes).
pub fn shown(a: &Application) -> serde_json::Value {
    let mut v = serde_json::to_value(a).expect("plain records serialize");
    if let Some(m) = v.as_object_mut() {
        m.remove("applicant");
        m.remove("request_fingerprint");
        if let Some(p) = m.get_mut("proxy").and_then(|p| p.as_object_mut()) {
            p.remove("id_hash");
        }
    }
    v
}

fn unknown(id: &str) -> ServiceError {
    ServiceError::not_found(format!("no application {id}"))
}

impl Gateway {
    fn applicant_hash(
        &self,
        personal_id: &str,
        field: &str,
    ) -> Result<(String, String), ServiceError> {
        let key = self.id_key.as_deref().ok_or_else(|| {
            ServiceError::invalid(
                "personal IDs are not enabled on this gateway: set privacy.id_hash_key (or id_hash_key_env)",
            )
        })?;
        let normalized = privacy::normalize(personal_id)
            .map_err(|e| ServiceError::invalid(format!("`{field}` {e}")))?;
        Ok((
            privacy::id_hash(key, &normalized),
            privacy::mask_id(&normalized),
        ))
    }

    /// The holder's age today (local day), from the birth date in the ID.
    fn age_today(&self, personal_id: &str, now_ms: i64) -> Result<u32, ServiceError> {
        let normalized = privacy::normalize(personal_id)
            .map_err(|e| ServiceError::invalid(format!("`personal_id` {e}")))?;
        let born = application::birth_date(&normalized).ok_or_else(|| {
            ServiceError::invalid("`personal_id` does not hold a valid birth date")
        })?;
        let day = self.policy.local_day(now_ms.div_euclid(1000));
        let today = onecard_core::time::date_of_day(day)
            .ok_or_else(|| ServiceError::invalid("the gateway's clock is out of range"))?;
        if born > today {
            return Err(ServiceError::invalid(
                "`personal_id` holds a birth date in the future",
            ));
        }
        Ok(application::age_on(born, today))
    }

    /// Files an application (and, with `instant_card_no`, issues its card
    /// at once). The same `request_id` again answers the application it
    /// made, unchanged; with another body it is refused.
    pub async fn submit_application(
        &self,
        actor: &Actor,
        s: Submission,
        now_ms: i64,
    ) -> Result<View, ServiceError> {
        let (applicant, id_masked) = self.applicant_hash(&s.personal_id, "personal_id")?;
        let age = self.age_today(&s.personal_id, now_ms)?;
        let proxy = match &s.proxy {
            None => None,
            Some(p) => {
                let (id_hash, id_masked) =
                    self.applicant_hash(&p.personal_id, "proxy.personal_id")?;
                if id_hash == applicant {
                    return Err(ServiceError::invalid(
                        "`proxy` is the applicant themself; leave it out",
                    ));
                }
                Some(Proxy {
                    id_hash,
                    id_masked,
                    name_masked: p.name_masked.clone(),
                    relation: p.relation,
                })
            }
        };
        match (s.kind, &s.replaces) {
            (AppKind::Replacement, None) => {
                return Err(ServiceError::invalid(
                    "a replacement needs `replaces`: the card it replaces",
                ))
            }
            (AppKind::New, Some(_)) => {
                return Err(ServiceError::invalid(
                    "`replaces` is for a replacement; this application is for a new card",
                ))
            }
            _ => {}
        }
        if s.instant_card_no.is_some() && !matches!(actor.role, Role::Counter | Role::Operator) {
            return Err(ServiceError::forbidden(
                "instant issuance is for a counter that prints the card: a counter or operator token",
            ));
        }
        if actor.role == Role::Channel
            && !matches!(s.channel, Channel::Online | Channel::PartnerProvince)
        {
            return Err(ServiceError::forbidden(
                "a channel token files `online` or `partner_province` applications only",
            ));
        }
        let elderly_age = self.config.applications.elderly_age;
        let concessions = application::concessions_for(age, elderly_age, s.disabled);
        let priority = s.priority.or(if age >= elderly_age {
            Some(Priority::Elderly)
        } else if s.disabled {
            Some(Priority::Disabled)
        } else {
            None
        });
        let fingerprint = {
            // Of what the request asked, its personal IDs as their hashes
            // (a hash of a clear ID could be reversed by trying them all).
            let canon = serde_json::json!({
                "kind": s.kind, "applicant": applicant, "disabled": s.disabled,
                "channel": s.channel, "place": s.place, "with_business": s.with_business,
                "priority": s.priority, "proxy": proxy.as_ref().map(|p| (&p.id_hash, p.relation)),
                "replaces": s.replaces.as_ref().map(CardNo::as_str),
                "functions": s.functions, "instant": s.instant_card_no.as_ref().map(CardNo::as_str),
            });
            onecard_core::hex::encode(&sha2::Sha256::digest(canon.to_string().as_bytes()))
        };
        let id = apps::application_id(&s.request_id);
        let _one = self.applications_lock.lock().await;
        if let Some(existing) = apps::get(&self.store, &id).await? {
            if existing.request_fingerprint != fingerprint {
                return Err(ServiceError::already_used(
                    "`request_id` was used for another application; a new application needs a new request id",
                ));
            }
            return Ok(View {
                application: shown(&existing),
                changed: false,
            });
        }
        if let Some(old) = &s.replaces {
            let profile = profiles::profile_async(&self.store, old).await?;
            if profile.holder.as_deref() != Some(applicant.as_str()) {
                return Err(ServiceError::conflict(format!(
                    "card {old} is not registered to the applicant; only its holder (or their proxy) may replace it"
                )));
            }
        }
        let mut a = Application {
            id: id.clone(),
            request_id: s.request_id.clone(),
            request_fingerprint: fingerprint,
            kind: s.kind,
            applicant: applicant.clone(),
            id_masked,
            name_masked: s.name_masked.clone(),
            channel: s.channel,
            place: s.place.clone(),
            with_business: s.with_business.clone(),
            priority,
            proxy,
            replaces: s.replaces.as_ref().map(StoredCardNo::from),
            functions: s.functions.clone(),
            concessions,
            card_no: None,
            pickup_branch: None,
            state: AppState::Submitted,
            since_ms: now_ms,
            submitted_ms: now_ms,
            history: Vec::new(),
        };
        a.record(actor.change("submit", AppState::Submitted, None, now_ms));
        match &s.instant_card_no {
            None => {
                let ops = vec![
                    Op::Put(Cf::Applications, apps::record_key(&id), apps::encode(&a)),
                    Op::Put(Cf::Applications, apps::person_key(&applicant, &id), Vec::new()),
                    self.audit.op(&actor.entry(
                        "application",
                        None,
                        Some(serde_json::json!({"id": id, "step": "submit", "channel": a.channel, "kind": a.kind})),
                        now_ms,
                    )),
                ];
                self.journal
                    .commit(Commit::new(None, ops))
                    .await
                    .map_err(ServiceError::from)?;
            }
            Some(card_no) => {
                let index = Op::Put(
                    Cf::Applications,
                    apps::person_key(&applicant, &id),
                    Vec::new(),
                );
                self.issue(
                    actor,
                    &mut a,
                    AppStep::InstantIssue,
                    card_no,
                    vec![index],
                    now_ms,
                )
                .await?;
            }
        }
        metrics::counter!("onecard_applications_total", "channel" => a.channel.as_str(), "step" => "submit").increment(1);
        tracing::info!(application = %id, channel = %a.channel, kind = %a.kind, state = %a.state, who = %actor.name, "card application filed");
        Ok(View {
            application: shown(&a),
            changed: true,
        })
    }

    /// Takes one step of an application.
    pub async fn application_step(
        &self,
        actor: &Actor,
        id: &str,
        step: AppStep,
        input: StepInput,
        now_ms: i64,
    ) -> Result<View, ServiceError> {
        let _one = self.applications_lock.lock().await;
        let mut a = apps::get(&self.store, id)
            .await?
            .ok_or_else(|| unknown(id))?;
        let to = application::next(step, a.state).map_err(|why| {
            ServiceError::conflict(format!("application {id} is {}: {why}", a.state))
        })?;
        if to == a.state {
            return Ok(View {
                application: shown(&a),
                changed: false,
            });
        }
        match step {
            AppStep::Produce => {
                let card_no = input.card_no.ok_or_else(|| {
                    ServiceError::invalid("`produce` needs `card_no`: the card made")
                })?;
                if self.cards.get(&card_no).is_some() {
                    return Err(ServiceError::conflict(format!(
                        "card {card_no} exists already; a produced card must be new"
                    )));
                }
                a.card_no = Some((&card_no).into());
            }
            AppStep::ReadyForPickup => {
                let branch = input.branch.ok_or_else(|| {
                    ServiceError::invalid(
                        "`ready_for_pickup` needs `branch`: where the resident collects it",
                    )
                })?;
                a.pickup_branch = Some(branch);
            }
            AppStep::Reject if input.note.is_none() => {
                return Err(ServiceError::invalid(
                    "`reject` needs `note`: why, as the resident will be told",
                ))
            }
            AppStep::Issue | AppStep::InstantIssue => {
                let card_no = match (step, &a.card_no, input.card_no) {
                    (AppStep::InstantIssue, _, Some(c)) => c,
                    (AppStep::InstantIssue, _, None) => {
                        return Err(ServiceError::invalid(
                            "`instant_issue` needs `card_no`: the card printed",
                        ))
                    }
                    (_, Some(c), _) => CardNo::parse(c.as_str()).map_err(|_| {
                        ServiceError::invalid("the application's card number is not valid")
                    })?,
                    (_, None, _) => {
                        return Err(ServiceError::conflict(format!(
                            "application {id} has no card produced"
                        )))
                    }
                };
                self.issue(actor, &mut a, step, &card_no, Vec::new(), now_ms)
                    .await?;
                metrics::counter!("onecard_applications_total", "channel" => a.channel.as_str(), "step" => step.as_str()).increment(1);
                return Ok(View {
                    application: shown(&a),
                    changed: true,
                });
            }
            _ => {}
        }
        a.record(actor.change(step.as_str(), to, input.note.clone(), now_ms));
        let ops = vec![
            Op::Put(Cf::Applications, apps::record_key(id), apps::encode(&a)),
            self.audit.op(&actor.entry(
                "application",
                None,
                Some(serde_json::json!({"id": id, "step": step, "state": to})),
                now_ms,
            )),
        ];
        self.journal
            .commit(Commit::new(None, ops))
            .await
            .map_err(ServiceError::from)?;
        metrics::counter!("onecard_applications_total", "channel" => a.channel.as_str(), "step" => step.as_str()).increment(1);
        tracing::info!(application = %id, step = %step, state = %to, who = %actor.name, "card application changed");
        Ok(View {
            application: shown(&a),
            changed: true,
        })
    }

    /// Issues `a`'s card `card_no` (a new card, or a replacement through
    /// the replacement path), writing the application's record, with
    /// `extra` ops, in the same commit.
    async fn issue(
        &self,
        actor: &Actor,
        a: &mut Application,
        step: AppStep,
        card_no: &CardNo,
        extra: Vec<Op>,
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        a.card_no = Some(card_no.into());
        a.record(actor.change(step.as_str(), AppState::Issued, None, now_ms));
        let mut ops = extra;
        ops.push(Op::Put(
            Cf::Applications,
            apps::record_key(&a.id),
            apps::encode(a),
        ));
        ops.push(self.audit.op(&actor.entry(
            "application",
            Some(card_no),
            Some(serde_json::json!({"id": a.id, "step": step, "state": AppState::Issued})),
            now_ms,
        )));
        let issue = Issue {
            holder: a.applicant.clone(),
            functions: a.functions.clone(),
            concessions: a.concessions.clone(),
            ops,
        };
        match &a.replaces {
            Some(old) => {
                let old = CardNo::parse(old.as_str()).map_err(|_| {
                    ServiceError::invalid("the replaced card's number is not valid")
                })?;
                self.replace_card_issuing(actor, &old, card_no, &issue, now_ms)
                    .await?;
            }
            None => {
                self.retrying(|| self.issue_new_card_once(card_no, a.name_masked.clone(), &issue))
                    .await?;
            }
        }
        tracing::info!(application = %a.id, card = %card_no, who = %actor.name, "card issued");
        Ok(())
    }

    /// Creates the applicant's first card, active, with its holder.
    async fn issue_new_card_once(
        &self,
        card_no: &CardNo,
        name_masked: Option<String>,
        issue: &Issue,
    ) -> Result<(), ServiceError> {
        let _life = self.life.lock().await;
        if let Some(current) = profiles::person_async(&self.store, &issue.holder).await? {
            if self
                .cards
                .get(&current)
                .is_some_and(|c| c.status != CardStatus::Cancelled)
            {
                return Err(ServiceError::conflict(format!(
                    "the applicant holds card {current} already; apply for a replacement of it"
                )));
            }
        }
        let pending = {
            let stripes: BTreeSet<usize> = [self.cards.stripe(card_no)].into();
            let _locks = self.cards.lock_stripes(&stripes);
            if self.cards.get(card_no).is_some() {
                return Err(ServiceError::conflict(format!(
                    "card {card_no} exists already; issue a new card number"
                )));
            }
            if self.deny.get(card_no).is_some() {
                return Err(ServiceError::conflict(format!(
                    "card {card_no} is on the deny list"
                )));
            }
            let card = Card::new(CardStatus::Active, &issue.functions, &issue.concessions);
            let profile = profiles::Profile {
                holder: Some(issue.holder.clone()),
                name_masked,
                ..profiles::Profile::default()
            };
            let mut ops = vec![
                Op::Put(
                    Cf::Cards,
                    card_no.as_str().as_bytes().to_vec(),
                    cards::encode(&card),
                ),
                Op::Put(
                    Cf::Profiles,
                    card_no.as_str().as_bytes().to_vec(),
                    profiles::to_json(&profile),
                ),
                Op::Put(
                    Cf::Persons,
                    issue.holder.as_bytes().to_vec(),
                    card_no.as_str().as_bytes().to_vec(),
                ),
            ];
            ops.extend(issue.ops.iter().cloned());
            let pending = self
                .journal
                .submit(Commit::new(None, ops))
                .map_err(ServiceError::from)?;
            self.card_follows(card_no.clone(), card);
            pending
        };
        pending.durable().await.map_err(ServiceError::from)?;
        metrics::gauge!("onecard_cards").set(self.cards.len() as f64);
        Ok(())
    }

    /// A resident's applications, newest first, for the hotline. Audited.
    pub async fn applications_of(
        &self,
        actor: &Actor,
        personal_id: &str,
        now_ms: i64,
    ) -> Result<Vec<serde_json::Value>, ServiceError> {
        let (hash, _) = self.applicant_hash(personal_id, "personal_id")?;
        let store = self.store.clone();
        let found =
            tokio::task::spawn_blocking(move || -> Result<Vec<Application>, ServiceError> {
                let mut out = Vec::new();
                for id in apps::ids_of(&store, &hash)? {
                    out.extend(
                        store.get_json::<Application>(Cf::Applications, &apps::record_key(&id))?,
                    );
                }
                Ok(out)
            })
            .await
            .map_err(|_| ServiceError::unavailable("the look-up was interrupted; retry"))??;
        let detail = serde_json::json!({"found": found.len()});
        self.journal
            .commit(Commit::new(
                None,
                vec![self
                    .audit
                    .op(&actor.entry("find_applications", None, Some(detail), now_ms))],
            ))
            .await
            .map_err(ServiceError::from)?;
        let mut found = found;
        found.sort_by_key(|a| std::cmp::Reverse(a.submitted_ms));
        Ok(found.iter().map(shown).collect())
    }

    /// The resident's own query: the application `id` if `last4` are the
    /// last four characters of the holder's ID. A wrong answer looks like
    /// an unknown id; past `applications.status_misses_per_hour` wrong
    /// answers, the application answers no query for the rest of the hour.
    pub async fn application_status(
        &self,
        id: &str,
        last4: &str,
        now_ms: i64,
    ) -> Result<StatusView, ServiceError> {
        let hour = now_ms.div_euclid(3_600_000);
        let limit = self.config.applications.status_misses_per_hour;
        let misses = &self.application_misses;
        if misses.get(id).is_some_and(|m| m.0 == hour && m.1 >= limit) {
            return Err(ServiceError::RateLimited(format!(
                "too many wrong answers for application {id} this hour; ask at a counter or the hotline"
            )));
        }
        let found = apps::get(&self.store, id).await?;
        let matches = found.as_ref().is_some_and(|a| {
            let tail: String = a.id_masked.chars().skip(14).collect();
            tail.eq_ignore_ascii_case(last4)
        });
        let Some(a) = found.filter(|_| matches) else {
            if misses.len() >= MISSES_TRACKED_MAX {
                misses.retain(|_, m| m.0 == hour);
            }
            let mut m = misses.entry(id.to_owned()).or_insert((hour, 0));
            if m.0 != hour {
                *m = (hour, 0);
            }
            m.1 += 1;
            metrics::counter!("onecard_application_status_misses_total").increment(1);
            return Err(ServiceError::not_found(
                "no application matches that id and those four digits",
            ));
        };
        Ok(StatusView {
            id: a.id.clone(),
            state: a.state,
            since: onecard_core::time::rfc3339_ms(a.since_ms),
            pickup_branch: a.pickup_branch.clone(),
        })
    }

    /// Applications waiting in one state longer than their channel's
    /// service promise: the elderly and disabled first, then the longest
    /// waiting.
    pub async fn overdue_applications(&self, now_ms: i64) -> Result<Vec<Overdue>, ServiceError> {
        let store = self.store.clone();
        let promise = self.config.applications.promise_days.clone();
        let mut out = tokio::task::spawn_blocking(move || {
            apps::all_where(&store, OVERDUE_LISTED_MAX, |a| {
                application::is_overdue(a.state, a.since_ms, now_ms, promise.of(a.channel))
            })
            .map(|found| {
                found
                    .into_iter()
                    .map(|a| Overdue {
                        days_waiting: (now_ms - a.since_ms).div_euclid(86_400_000),
                        promise_days: promise.of(a.channel),
                        since: onecard_core::time::rfc3339_ms(a.since_ms),
                        id: a.id,
                        state: a.state,
                        channel: a.channel,
                        place: a.place,
                        priority: a.priority,
                    })
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|_| ServiceError::unavailable("the list was interrupted; retry"))??;
        out.sort_by_key(|o| (o.priority.is_none(), std::cmp::Reverse(o.days_waiting)));
        metrics::gauge!("onecard_applications_overdue").set(out.len() as f64);
        Ok(out)
    }
}

impl Actor {
    pub(crate) fn change(
        &self,
        step: &str,
        state: AppState,
        note: Option<String>,
        at_ms: i64,
    ) -> Change {
        Change {
            step: step.to_owned(),
            state,
            by: self.name.clone(),
            role: self.role.as_str().to_owned(),
            at_ms,
            note,
        }
    }
}
