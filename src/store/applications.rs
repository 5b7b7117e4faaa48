//! Card applications as kept: one record per application, with every
//! change it went through, and an index by the applicant's hashed
//! personal ID for the hotline's "where is my card?".
//!
//! `applications`: `a/<id>` → [`Application`] (JSON); `p/<applicant
//! hash>/<id>` → empty. An application's id is derived from the counter's
//! request id ([`application_id`]), so that a retried submission finds the
//! record it made. Read on the admin path only, never kept in memory.

use serde::{Deserialize, Serialize};

use onecard_core::application::{AppKind, AppState, Channel, Priority, ProxyRelation};
use onecard_core::model::{Concession, Function, StoredCardNo};

use crate::store::{Cf, Store, StoreError};

/// Changes kept per application at most (a handful in its life; this only
/// bounds a record that something keeps retrying against).
pub const HISTORY_MAX: usize = 32;
/// Applications listed per person, and by the overdue list, at most.
pub const PER_PERSON_MAX: usize = 100;
pub const OVERDUE_LISTED_MAX: usize = 10_000;

/// Someone applying on the holder's behalf (代办): their ID checked at the
/// counter and kept as a keyed hash, like the holder's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proxy {
    pub id_hash: String,
    pub id_masked: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_masked: Option<String>,
    pub relation: ProxyRelation,
}

/// One change of an application: what, who, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `submit`, or the step taken.
    pub step: String,
    pub state: AppState,
    pub by: String,
    pub role: String,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Application {
    pub id: String,
    pub request_id: String,
    /// SHA-256 of what the request asked (its personal IDs as their
    /// hashes): a retry with the same request id must ask the same.
    pub request_fingerprint: String,
    pub kind: AppKind,
    /// The keyed hash of the holder's personal ID; never shown.
    pub applicant: String,
    /// `110105********123X`: what may be shown of the holder's ID.
    pub id_masked: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_masked: Option<String>,
    pub channel: Channel,
    /// The hall, branch or partner channel it was filed at.
    pub place: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_business: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Proxy>,
    /// The card it replaces (kind `replacement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<StoredCardNo>,
    pub functions: Vec<Function>,
    /// From the holder's age on the day of application, and a disability
    /// certificate the counter checked.
    pub concessions: Vec<Concession>,
    /// The card made for it, once produced (or printed at the counter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_no: Option<StoredCardNo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_branch: Option<String>,
    pub state: AppState,
    /// When it entered `state`.
    pub since_ms: i64,
    pub submitted_ms: i64,
    pub history: Vec<Change>,
}

impl Application {
    /// Records a change: the state it led to, who made it and when.
    pub fn record(&mut self, change: Change) {
        if self.state != change.state {
            self.since_ms = change.at_ms;
        }
        self.state = change.state;
        if self.history.len() < HISTORY_MAX {
            self.history.push(change);
        }
    }
}

/// The application id a counter's request id makes: `AP` and 20
/// hexadecimal digits ([`crate::store::derived_id`]).
pub fn application_id(request_id: &str) -> String {
    crate::store::derived_id("AP", "onecard-application", request_id)
}

pub fn record_key(id: &str) -> Vec<u8> {
    format!("a/{id}").into_bytes()
}

pub fn person_key(applicant: &str, id: &str) -> Vec<u8> {
    format!("p/{applicant}/{id}").into_bytes()
}

pub fn encode(a: &Application) -> Vec<u8> {
    serde_json::to_vec(a).expect("plain records always serialize")
}

/// The application `id`, if there is one.
pub async fn get(store: &Store, id: &str) -> Result<Option<Application>, StoreError> {
    store.read_json(Cf::Applications, &record_key(id)).await
}

/// The ids of the applications of one applicant (hashed ID), at most
/// [`PER_PERSON_MAX`].
pub fn ids_of(store: &Store, applicant: &str) -> Result<Vec<String>, StoreError> {
    let prefix = format!("p/{applicant}/");
    let mut out = Vec::new();
    store.scan(Cf::Applications, prefix.as_bytes(), |k, _| {
        let Some(id) = k.strip_prefix(prefix.as_bytes()) else {
            return false;
        };
        out.push(String::from_utf8_lossy(id).into_owned());
        out.len() < PER_PERSON_MAX
    })?;
    Ok(out)
}

/// Every application for which `keep` holds, in id order, at most `max`.
pub fn all_where(
    store: &Store,
    max: usize,
    keep: impl FnMut(&Application) -> bool,
) -> Result<Vec<Application>, StoreError> {
    store.scan_json(Cf::Applications, b"a/", max, keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_request_and_shaped() {
        let a = application_id("counter-7/2026-12-07/0001");
        assert_eq!(a, application_id("counter-7/2026-12-07/0001"));
        assert_ne!(a, application_id("counter-7/2026-12-07/0002"));
        assert!(crate::store::is_derived_id("AP", &a), "{a}");
        assert!(!crate::store::is_derived_id("AP", "AP12"));
        assert!(!crate::store::is_derived_id("AP", &a.to_ascii_lowercase()));
    }
}
