//! Who holds a card and which credentials lead to it.
//!
//! A resident may tap the social security card or show the electronic
//! social security card code (`essc`) or the city's service code (`ykm`);
//! each code names an opaque credential id, bound here to a card. The
//! profile keeps, per card, the holder's hashed personal ID, the bound
//! credentials and the replacement chain. These are read on the admin path
//! and once per scan (a point read of `creds`), never kept in memory.

use serde::{Deserialize, Serialize};

use onecard_core::model::{CardNo, StoredCardNo};
use onecard_core::qr::CredType;

use crate::store::{Cf, Store, StoreError};

/// Credentials bound to one card at most: a resident has a handful.
pub const CREDENTIALS_PER_CARD_MAX: usize = 8;

/// A credential id: 1 to 64 of `A-Za-z0-9_-`, as in a code's `sub`.
pub fn valid_credential_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `creds`: what a credential id leads to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub card_no: StoredCardNo,
    pub typ: CredType,
    pub bound_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundCredential {
    pub credential_id: String,
    pub typ: CredType,
}

/// `profiles`: one card's holder and credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The keyed hash of the holder's personal ID number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The holder's name, masked before it was stored (first character
    /// kept): all an identity check may show of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_masked: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<BoundCredential>,
    /// The card this one replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<StoredCardNo>,
    /// The card that replaced this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<StoredCardNo>,
}

fn corrupt(cf: &'static str) -> StoreError {
    StoreError::Corrupt {
        cf,
        detail: "a record does not decode".into(),
    }
}

pub fn profile(store: &Store, card: &CardNo) -> Result<Profile, StoreError> {
    decode_profile(store.get(Cf::Profiles, card.as_str().as_bytes())?)
}

pub fn binding(store: &Store, credential_id: &str) -> Result<Option<Binding>, StoreError> {
    decode_binding(store.get(Cf::Creds, credential_id.as_bytes())?)
}

/// [`profile`] for async code: never waits for the disk on an async
/// worker ([`Store::read`]).
pub async fn profile_async(store: &Store, card: &CardNo) -> Result<Profile, StoreError> {
    decode_profile(store.read(Cf::Profiles, card.as_str().as_bytes()).await?)
}

/// [`binding`] for async code.
pub async fn binding_async(
    store: &Store,
    credential_id: &str,
) -> Result<Option<Binding>, StoreError> {
    decode_binding(store.read(Cf::Creds, credential_id.as_bytes()).await?)
}

fn decode_profile(v: Option<Vec<u8>>) -> Result<Profile, StoreError> {
    match v {
        None => Ok(Profile::default()),
        Some(v) => serde_json::from_slice(&v).map_err(|_| corrupt("profiles")),
    }
}

fn decode_binding(v: Option<Vec<u8>>) -> Result<Option<Binding>, StoreError> {
    match v {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|_| corrupt("creds")),
    }
}

/// The card a hashed personal ID leads to.
pub fn person(store: &Store, id_hash: &str) -> Result<Option<CardNo>, StoreError> {
    decode_person(store.get(Cf::Persons, id_hash.as_bytes())?)
}

/// [`person`] for async code.
pub async fn person_async(store: &Store, id_hash: &str) -> Result<Option<CardNo>, StoreError> {
    decode_person(store.read(Cf::Persons, id_hash.as_bytes()).await?)
}

fn decode_person(v: Option<Vec<u8>>) -> Result<Option<CardNo>, StoreError> {
    match v {
        None => Ok(None),
        Some(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|s| CardNo::parse(s).ok())
            .map(Some)
            .ok_or_else(|| corrupt("persons")),
    }
}

pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain records always serialize")
}
