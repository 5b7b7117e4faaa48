//! Card life: loss reports, freezes, replacement and cancellation, the
//! holder's hashed personal ID, and the credentials bound to a card.
//!
//! The rules of which change is allowed from which status are a pure
//! function ([`transition`]), table-tested. The operations around it make
//! each change durable in one journal commit (card, deny-list entries and
//! their log, profiles, and the audit entry naming who did it) and take
//! effect on the next authorization on any terminal: the card's new status
//! is set in memory under the card's lock, as a tap reads it.
//!
//! Stopping a card (loss, freeze, cancellation, replacement) also
//! deny-lists it, so that validators running offline stop it as soon as
//! they sync. Those entries carry the reasons below; lifting a loss or a
//! freeze removes only an entry with one of them, never one an operator
//! added for reasons of their own (fraud, say).

use std::collections::BTreeSet;

use serde::Serialize;

use onecard_core::cardlife::{transition, DenyEffect, LifeOp};
use onecard_core::model::{Card, CardNo, CardStatus, StoredCardNo};
use onecard_core::privacy;
use onecard_core::qr::CredType;

use crate::config::Role;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::store::audit::AuditEntry;
pub use crate::store::denylist::{
    is_life_reason, DENY_CANCELLED, DENY_FROZEN, DENY_LOST, DENY_REPLACED,
};
use crate::store::durable::{Commit, Op, Pending};
use crate::store::profiles::{self, Binding, BoundCredential, Profile, CREDENTIALS_PER_CARD_MAX};
use crate::store::{cards, Cf, StoreError};

/// Who asks: an admin token's name and role.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

impl Actor {
    pub(crate) fn entry(
        &self,
        action: &str,
        card: Option<&CardNo>,
        detail: Option<serde_json::Value>,
        at_ms: i64,
    ) -> AuditEntry {
        AuditEntry {
            at_ms,
            who: self.name.clone(),
            role: self.role.as_str().to_owned(),
            action: action.to_owned(),
            card_no: card.map(StoredCardNo::from),
            detail,
        }
    }
}

/// A card application's issuance riding on a card change: the holder it
/// is for, what the new card carries, and the application's writes.
#[derive(Debug, Clone)]
pub(crate) struct Issue {
    /// The applicant's keyed ID hash.
    pub holder: String,
    pub functions: Vec<onecard_core::model::Function>,
    pub concessions: Vec<onecard_core::model::Concession>,
    pub ops: Vec<Op>,
}

/// The answer to a card-life change.
#[derive(Debug, Serialize)]
pub struct LifeAnswer {
    pub card_no: StoredCardNo,
    pub status: CardStatus,
    /// `false`: the change was already in effect.
    pub changed: bool,
    pub denylisted: bool,
    pub denylist_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<StoredCardNo>,
}

fn not_found(card: &CardNo) -> ServiceError {
    ServiceError::not_found(format!("card {card} is not known"))
}

fn conflict(card: &CardNo, why: &str) -> ServiceError {
    ServiceError::conflict(format!("card {card}: {why}"))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    profiles::to_json(v)
}

fn deny_change(card: &CardNo, effect: DenyEffect) -> Option<(CardNo, Option<String>)> {
    match effect {
        DenyEffect::Keep => None,
        DenyEffect::Add(r) => Some((card.clone(), Some(r.to_owned()))),
        DenyEffect::Remove => Some((card.clone(), None)),
    }
}

async fn written(pending: Pending) -> Result<(), ServiceError> {
    pending
        .durable()
        .await
        .map(|_| ())
        .map_err(ServiceError::from)
}

impl Gateway {
    /// Creates or replaces a card's status, functions and concessions. Its
    /// spending counters are kept, so that re-registering a card cannot
    /// reset a daily cap. Durable when this returns.
    pub async fn put_card(&self, card_no: &CardNo, new: Card) -> Result<Card, ServiceError> {
        self.retrying(|| self.put_card_once(card_no, new)).await
    }

    async fn put_card_once(&self, card_no: &CardNo, new: Card) -> Result<Card, ServiceError> {
        let (pending, stored) = {
            let _card_lock = self.cards.lock(card_no);
            let stored = cards::keep_counters(self.cards.get(card_no), new);
            let op = Op::Put(
                Cf::Cards,
                card_no.as_str().as_bytes().to_vec(),
                cards::encode(&stored),
            );
            let pending = self
                .journal
                .submit(Commit::new(None, vec![op]))
                .map_err(ServiceError::from)?;
            self.card_follows(card_no.clone(), stored);
            (pending, stored)
        };
        pending.durable().await.map_err(ServiceError::from)?;
        metrics::gauge!("onecard_cards").set(self.cards.len() as f64);
        tracing::info!(card = %card_no, status = %stored.status, "card stored");
        Ok(stored)
    }

    /// Records a card's health status (colour and vaccination flag, with
    /// the time of the report), audited. Nothing else about the card
    /// changes. Durable when this returns.
    pub async fn set_health(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        health: onecard_core::model::Health,
        now_ms: i64,
    ) -> Result<onecard_core::model::Health, ServiceError> {
        self.retrying(|| self.set_health_once(actor, card_no, health, now_ms))
            .await
    }

    async fn set_health_once(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        health: onecard_core::model::Health,
        now_ms: i64,
    ) -> Result<onecard_core::model::Health, ServiceError> {
        let pending = {
            let _card_lock = self.cards.lock(card_no);
            let card = self.cards.get(card_no).ok_or_else(|| {
                ServiceError::not_found(format!("card {card_no} is not registered"))
            })?;
            let after = Card { health, ..card };
            let detail =
                serde_json::json!({"colour": health.colour, "vaccinated": health.vaccinated});
            let ops = vec![
                Op::Put(
                    Cf::Cards,
                    card_no.as_str().as_bytes().to_vec(),
                    cards::encode(&after),
                ),
                self.audit
                    .op(&actor.entry("health", Some(card_no), Some(detail), now_ms)),
            ];
            let pending = self
                .journal
                .submit(Commit::new(None, ops))
                .map_err(ServiceError::from)?;
            self.card_follows(card_no.clone(), after);
            pending
        };
        pending.durable().await.map_err(ServiceError::from)?;
        Ok(health)
    }

    /// Reports a loss, lifts it, freezes, unfreezes or cancels a card.
    pub async fn card_life(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        op: LifeOp,
        note: Option<String>,
        now_ms: i64,
    ) -> Result<LifeAnswer, ServiceError> {
        // In a cluster a change that lost its card to another node (a tap
        // decided there at the same moment) wrote nothing: it is made
        // again on the card as the winner left it.
        self.retrying(|| self.card_life_once(actor, card_no, op, note.clone(), now_ms))
            .await
    }

    async fn card_life_once(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        op: LifeOp,
        note: Option<String>,
        now_ms: i64,
    ) -> Result<LifeAnswer, ServiceError> {
        let _life = self.life.lock().await;
        let _serial = self.deny.serial().await;
        let (pending, plan, changed, status) = {
            let _card = self.cards.lock(card_no);
            let card = self.cards.get(card_no).ok_or_else(|| not_found(card_no))?;
            let listed = self.deny.get(card_no).map(|e| e.reason);
            let t = transition(op, card.status, listed.as_deref())
                .map_err(|why| conflict(card_no, why))?;
            let changes: Vec<_> = deny_change(card_no, t.deny).into_iter().collect();
            let mut plan = self.deny.plan(&changes, now_ms);
            let mut ops = std::mem::take(&mut plan.ops);
            let changed = t.status != card.status || !changes.is_empty();
            let after = Card {
                status: t.status,
                ..card
            };
            if t.status != card.status {
                ops.push(Op::Put(
                    Cf::Cards,
                    card_no.as_str().as_bytes().to_vec(),
                    cards::encode(&after),
                ));
            }
            let detail = serde_json::json!({
                "from": card.status, "to": t.status, "changed": changed, "note": note,
            });
            ops.push(
                self.audit
                    .op(&actor.entry(op.as_str(), Some(card_no), Some(detail), now_ms)),
            );
            let pending = self
                .journal
                .submit(Commit::new(None, ops))
                .map_err(ServiceError::from)?;
            self.card_follows(card_no.clone(), after);
            (pending, plan, changed, t.status)
        };
        written(pending).await?;
        let version = self.deny_follows(plan);
        tracing::info!(card = %card_no, op = op.as_str(), who = %actor.name, status = %status, changed, "card life");
        metrics::counter!("onecard_card_life_total", "op" => op.as_str()).increment(1);
        Ok(LifeAnswer {
            card_no: card_no.into(),
            status,
            changed,
            denylisted: self.deny.get(card_no).is_some(),
            denylist_version: version,
            replaced_by: None,
        })
    }

    /// Replaces `old` by the new card `new`: the new card takes over the
    /// status (active), functions, concessions and spending counters, the
    /// holder and the credentials; the old one is cancelled and deny-listed.
    pub async fn replace_card(
        &self,
        actor: &Actor,
        old: &CardNo,
        new: &CardNo,
        now_ms: i64,
    ) -> Result<LifeAnswer, ServiceError> {
        self.retrying(|| self.replace_card_once(actor, old, new, None, now_ms))
            .await
    }

    /// [`Gateway::replace_card`] for a card application's issuance: the
    /// new card gets the application's functions and concessions (besides
    /// the old card's own), the old card must be the applicant's, and the
    /// application's record is written in the same commit.
    pub(crate) async fn replace_card_issuing(
        &self,
        actor: &Actor,
        old: &CardNo,
        new: &CardNo,
        issue: &Issue,
        now_ms: i64,
    ) -> Result<LifeAnswer, ServiceError> {
        self.retrying(|| self.replace_card_once(actor, old, new, Some(issue), now_ms))
            .await
    }

    async fn replace_card_once(
        &self,
        actor: &Actor,
        old: &CardNo,
        new: &CardNo,
        issue: Option<&Issue>,
        now_ms: i64,
    ) -> Result<LifeAnswer, ServiceError> {
        if old == new {
            return Err(ServiceError::invalid(
                "`new_card_no` must differ from the card replaced",
            ));
        }
        let _life = self.life.lock().await;
        let _serial = self.deny.serial().await;
        let old_profile = profiles::profile_async(&self.store, old).await?;
        if let Some(issue) = issue {
            if old_profile.holder.as_deref() != Some(issue.holder.as_str()) {
                return Err(conflict(
                    old,
                    "the card is not registered to the applicant; only its holder may replace it",
                ));
            }
        }
        // The holder's current card, read before the cards' locks (no
        // await under them); card-life changes, the only writers of it,
        // are serialized by `life`.
        let holders_card = match &old_profile.holder {
            Some(h) => profiles::person_async(&self.store, h).await?,
            None => None,
        };
        let (pending, plan) = {
            let stripes: BTreeSet<usize> = [self.cards.stripe(old), self.cards.stripe(new)].into();
            let _locks = self.cards.lock_stripes(&stripes);
            let card = self.cards.get(old).ok_or_else(|| not_found(old))?;
            if card.status == CardStatus::Cancelled {
                return Err(conflict(old, "the card is cancelled (already replaced?)"));
            }
            if self.cards.get(new).is_some() {
                return Err(conflict(
                    new,
                    "a replacement must be a new card; this one exists",
                ));
            }
            if self.deny.get(new).is_some() {
                return Err(conflict(new, "the replacement card is on the deny list"));
            }
            let listed = self.deny.get(old).map(|e| e.reason);
            let deny = match listed.as_deref() {
                Some(r) if !is_life_reason(r) => DenyEffect::Keep,
                _ => DenyEffect::Add(DENY_REPLACED),
            };
            let changes: Vec<_> = deny_change(old, deny).into_iter().collect();
            let mut plan = self.deny.plan(&changes, now_ms);
            let mut ops = std::mem::take(&mut plan.ops);
            let new_card = match issue {
                None => Card {
                    status: CardStatus::Active,
                    ..card
                },
                Some(issue) => {
                    // The old card's own concessions, and the application's.
                    let mut concessions = card.concession_list();
                    for c in &issue.concessions {
                        if !concessions.contains(c) {
                            concessions.push(*c);
                        }
                    }
                    let fresh = Card::new(CardStatus::Active, &issue.functions, &concessions);
                    Card {
                        status: CardStatus::Active,
                        functions: fresh.functions,
                        concessions: fresh.concessions,
                        ..card
                    }
                }
            };
            let old_card = Card {
                status: CardStatus::Cancelled,
                ..card
            };
            ops.push(Op::Put(
                Cf::Cards,
                new.as_str().as_bytes().to_vec(),
                cards::encode(&new_card),
            ));
            ops.push(Op::Put(
                Cf::Cards,
                old.as_str().as_bytes().to_vec(),
                cards::encode(&old_card),
            ));
            for c in &old_profile.credentials {
                let b = Binding {
                    card_no: new.into(),
                    typ: c.typ,
                    bound_at_ms: now_ms,
                };
                ops.push(Op::Put(
                    Cf::Creds,
                    c.credential_id.as_bytes().to_vec(),
                    json(&b),
                ));
            }
            let new_profile = Profile {
                holder: old_profile.holder.clone(),
                name_masked: old_profile.name_masked.clone(),
                credentials: old_profile.credentials.clone(),
                replaces: Some(old.into()),
                replaced_by: None,
            };
            let old_after = Profile {
                credentials: Vec::new(),
                replaced_by: Some(new.into()),
                ..old_profile.clone()
            };
            ops.push(Op::Put(
                Cf::Profiles,
                new.as_str().as_bytes().to_vec(),
                json(&new_profile),
            ));
            ops.push(Op::Put(
                Cf::Profiles,
                old.as_str().as_bytes().to_vec(),
                json(&old_after),
            ));
            if let Some(h) = &old_profile.holder {
                // Only if the person's current card is this one: an older
                // card of theirs must not take over the look-up.
                if holders_card.as_ref() == Some(old) {
                    ops.push(Op::Put(
                        Cf::Persons,
                        h.as_bytes().to_vec(),
                        new.as_str().as_bytes().to_vec(),
                    ));
                }
            }
            let detail = serde_json::json!({
                "new_card_no": new.as_str(),
                "credentials": old_profile.credentials.len(),
            });
            ops.push(
                self.audit
                    .op(&actor.entry("replace", Some(old), Some(detail), now_ms)),
            );
            if let Some(issue) = issue {
                ops.extend(issue.ops.iter().cloned());
            }
            let pending = self
                .journal
                .submit(Commit::new(None, ops))
                .map_err(ServiceError::from)?;
            self.card_follows(old.clone(), old_card);
            self.card_follows(new.clone(), new_card);
            (pending, plan)
        };
        written(pending).await?;
        let version = self.deny_follows(plan);
        metrics::gauge!("onecard_cards").set(self.cards.len() as f64);
        metrics::counter!("onecard_card_life_total", "op" => "replace").increment(1);
        tracing::info!(card = %old, new = %new, who = %actor.name, "card replaced");
        Ok(LifeAnswer {
            card_no: old.into(),
            status: CardStatus::Cancelled,
            changed: true,
            denylisted: self.deny.get(old).is_some(),
            denylist_version: version,
            replaced_by: Some(new.into()),
        })
    }

    /// Binds a credential id to a card. Binding it again to the same card
    /// and type changes nothing; to another card is refused until unbound.
    pub async fn bind_credential(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        credential_id: &str,
        typ: CredType,
        now_ms: i64,
    ) -> Result<bool, ServiceError> {
        let _life = self.life.lock().await;
        let card = self.cards.get(card_no).ok_or_else(|| not_found(card_no))?;
        if card.status == CardStatus::Cancelled {
            return Err(conflict(card_no, "the card is cancelled"));
        }
        if let Some(b) = profiles::binding_async(&self.store, credential_id).await? {
            if b.card_no == card_no.as_str() && b.typ == typ {
                return Ok(false);
            }
            return Err(ServiceError::conflict(
                "the credential is bound to another card or type; unbind it first",
            ));
        }
        let mut profile = profiles::profile_async(&self.store, card_no).await?;
        if profile.credentials.len() >= CREDENTIALS_PER_CARD_MAX {
            return Err(conflict(
                card_no,
                "the card has the most credentials allowed (8); unbind one first",
            ));
        }
        profile.credentials.push(BoundCredential {
            credential_id: credential_id.to_owned(),
            typ,
        });
        let binding = Binding {
            card_no: card_no.into(),
            typ,
            bound_at_ms: now_ms,
        };
        let detail = serde_json::json!({"credential_id": credential_id, "typ": typ});
        let ops = vec![
            Op::Put(Cf::Creds, credential_id.as_bytes().to_vec(), json(&binding)),
            Op::Put(
                Cf::Profiles,
                card_no.as_str().as_bytes().to_vec(),
                json(&profile),
            ),
            self.audit
                .op(&actor.entry("bind", Some(card_no), Some(detail), now_ms)),
        ];
        self.journal
            .commit(Commit::new(None, ops))
            .await
            .map_err(ServiceError::from)?;
        Ok(true)
    }

    /// Unbinds a credential id; returns the card it led to.
    pub async fn unbind_credential(
        &self,
        actor: &Actor,
        credential_id: &str,
        now_ms: i64,
    ) -> Result<CardNo, ServiceError> {
        let _life = self.life.lock().await;
        let b = profiles::binding_async(&self.store, credential_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("the credential is not bound"))?;
        let card_no = CardNo::parse(&b.card_no).map_err(|_| {
            ServiceError::from(StoreError::Corrupt {
                cf: "creds",
                detail: "a binding names an invalid card".into(),
            })
        })?;
        let mut profile = profiles::profile_async(&self.store, &card_no).await?;
        profile
            .credentials
            .retain(|c| c.credential_id != credential_id);
        let detail = serde_json::json!({"credential_id": credential_id});
        let ops = vec![
            Op::Delete(Cf::Creds, credential_id.as_bytes().to_vec()),
            Op::Put(
                Cf::Profiles,
                card_no.as_str().as_bytes().to_vec(),
                json(&profile),
            ),
            self.audit
                .op(&actor.entry("unbind", Some(&card_no), Some(detail), now_ms)),
        ];
        self.journal
            .commit(Commit::new(None, ops))
            .await
            .map_err(ServiceError::from)?;
        Ok(card_no)
    }

    fn id_hash(&self, personal_id: &str) -> Result<String, ServiceError> {
        let key = self.id_key.as_deref().ok_or_else(|| {
            ServiceError::invalid(
                "personal IDs are not enabled on this gateway: set privacy.id_hash_key (or id_hash_key_env)",
            )
        })?;
        let normalized = privacy::normalize(personal_id)
            .map_err(|e| ServiceError::invalid(format!("`personal_id` {e}")))?;
        Ok(privacy::id_hash(key, &normalized))
    }

    /// Records the card holder's personal ID, as a keyed hash only.
    pub async fn set_holder(
        &self,
        actor: &Actor,
        card_no: &CardNo,
        personal_id: &str,
        name_masked: Option<String>,
        now_ms: i64,
    ) -> Result<(), ServiceError> {
        let hash = self.id_hash(personal_id)?;
        let _life = self.life.lock().await;
        self.cards.get(card_no).ok_or_else(|| not_found(card_no))?;
        let mut profile = profiles::profile_async(&self.store, card_no).await?;
        let mut ops = Vec::new();
        if let Some(old) = profile.holder.as_deref().filter(|h| *h != hash) {
            if profiles::person_async(&self.store, old)
                .await
                .map_err(ServiceError::from)?
                .as_ref()
                == Some(card_no)
            {
                ops.push(Op::Delete(Cf::Persons, old.as_bytes().to_vec()));
            }
        }
        profile.holder = Some(hash.clone());
        if name_masked.is_some() {
            profile.name_masked = name_masked;
        }
        ops.push(Op::Put(
            Cf::Profiles,
            card_no.as_str().as_bytes().to_vec(),
            json(&profile),
        ));
        ops.push(Op::Put(
            Cf::Persons,
            hash.into_bytes(),
            card_no.as_str().as_bytes().to_vec(),
        ));
        ops.push(
            self.audit
                .op(&actor.entry("holder", Some(card_no), None, now_ms)),
        );
        self.journal
            .commit(Commit::new(None, ops))
            .await
            .map_err(ServiceError::from)?;
        Ok(())
    }

    /// Finds the holder's current card by personal ID. Audited.
    pub async fn find_card(
        &self,
        actor: &Actor,
        personal_id: &str,
        now_ms: i64,
    ) -> Result<CardNo, ServiceError> {
        let hash = self.id_hash(personal_id)?;
        let found = profiles::person_async(&self.store, &hash)
            .await
            .map_err(ServiceError::from)?;
        let detail = serde_json::json!({"found": found.is_some()});
        let entry = actor.entry("find", found.as_ref(), Some(detail), now_ms);
        self.journal
            .commit(Commit::new(None, vec![self.audit.op(&entry)]))
            .await
            .map_err(ServiceError::from)?;
        found.ok_or_else(|| ServiceError::not_found("no card is registered to that personal ID"))
    }
}
