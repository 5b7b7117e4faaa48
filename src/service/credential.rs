//! The credential step: from what the terminal read to the card it names.
//!
//! A tap carries the card number itself. A scan carries a signed dynamic QR
//! token (`OC1.<kid>.<payload>.<sig>`, see [`onecard_core::qr`]): its signature,
//! lifetime and time window are checked (pure, no I/O), the credential id
//! it names is looked up in `creds`, and its `jti` is spent in the replay
//! cache. A scan that fails any of these is a decline with a reason
//! (`QR_INVALID`, `QR_EXPIRED`, `QR_REPLAYED`, `CREDENTIAL_UNBOUND`), not
//! an error: the terminal asked a well-formed question.
//!
//! The replay cache lives in memory; at start it is refilled from the
//! journal's recent scans, so a restart does not reopen a window for
//! replaying codes that are still within their lifetime.

use std::borrow::Cow;

use serde::Deserialize;

use crate::config::QrConfig;
use crate::service::error::ServiceError;
use crate::service::replay::ReplayCache;
use crate::service::replay::Seen;
use crate::service::sigbatch::SigBatch;
use crate::store::profiles;
use crate::store::Cf;
use crate::store::Store;
use crate::store::StoreError;
use onecard_core::model::CardNo;
use onecard_core::model::Reason;
use onecard_core::qr;
use onecard_core::qr::Keyring;
use onecard_core::qr::Rules;
use onecard_core::record::ScanRef;
use onecard_core::wire::Credential;

/// Issuer keys, the rules and the replay cache.
pub struct Scanner {
    keys: Keyring,
    rules: Rules,
    replay: ReplayCache,
    /// Ed25519 signatures of scans that arrive together, checked together
    /// (`qr.batch_ed25519`; `None`: each strictly on its own).
    sigs: Option<SigBatch>,
    /// Cluster mode: the codes whose scans this node has applied from the
    /// cluster's journal (any node's). A code in here is spent for good:
    /// it is never given back, and a decision about to record it again is
    /// refused (see `Gateway::decide_and_commit`).
    recorded: ReplayCache,
}

/// What the credential phase found.
pub struct Resolved<'a> {
    /// The card the credential names, if any is known.
    pub card: Option<Cow<'a, CardNo>>,
    /// A scan's spent code, recorded with the decision (and given back if
    /// the decision cannot be recorded).
    pub scan: Option<ScanRef>,
    /// Declined before the rules: a bad, expired or replayed code, a code
    /// bound to no card.
    pub early: Option<Reason>,
}

impl<'a> Resolved<'a> {
    fn card(card: Cow<'a, CardNo>, scan: Option<ScanRef>) -> Resolved<'a> {
        Resolved {
            card: Some(card),
            scan,
            early: None,
        }
    }
    fn decline(reason: Reason, card: Option<CardNo>) -> Resolved<'a> {
        Resolved {
            card: card.map(Cow::Owned),
            scan: None,
            early: Some(reason),
        }
    }
}

impl Scanner {
    /// `None` when no issuer key is configured: scanning is then refused.
    pub fn from_config(c: &QrConfig) -> Option<Scanner> {
        let keys = c.keyring().expect("config was validated");
        (!keys.is_empty()).then(|| Scanner {
            keys,
            rules: c.rules(),
            replay: ReplayCache::new(c.replay_cache_max),
            sigs: c.batch_ed25519.then(SigBatch::new),
            recorded: ReplayCache::new(c.replay_cache_max),
        })
    }

    /// Gives a spent code back: its scan was not recorded (unless another
    /// node's scan of it was, meanwhile).
    pub fn unspend(&self, spent: &ScanRef) {
        // Recorded at all, however old: it stays spent.
        if !self.recorded.contains(&spent.sub, &spent.jti, i64::MIN) {
            self.replay.forget(&spent.sub, &spent.jti);
        }
    }

    /// Cluster mode: a scan recorded in the cluster's journal, applied
    /// here (called by the applier before the card's subject moves on).
    pub fn recorded_elsewhere(&self, spent: &ScanRef, now_ms: i64) {
        let now = now_ms.div_euclid(1000);
        let _ = self
            .recorded
            .check_and_remember(&spent.sub, &spent.jti, spent.forget_at, now);
        let _ = self
            .replay
            .check_and_remember(&spent.sub, &spent.jti, spent.forget_at, now);
    }

    /// Cluster mode: whether a scan of this code is already recorded.
    pub fn is_recorded(&self, spent: &ScanRef, now_ms: i64) -> bool {
        self.recorded
            .contains(&spent.sub, &spent.jti, now_ms.div_euclid(1000))
    }

    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// Spends the codes recorded in the journal whose window is still
    /// open: scans from the last `lifetime + 2 × skew` seconds.
    pub fn refill(&self, store: &Store, now_ms: i64) -> Result<usize, StoreError> {
        let horizon_ms = now_ms - (self.rules.lifetime_max_s + 2 * self.rules.skew_s) * 1000;
        let mut n = 0;
        let mut full = false;
        store.scan_back(Cf::Journal, &u64::MAX.to_be_bytes(), |_, v| {
            #[derive(Deserialize)]
            struct Head {
                at_ms: i64,
                #[serde(default)]
                scan: Option<ScanRef>,
            }
            let Ok(h) = serde_json::from_slice::<Head>(v) else {
                return true;
            };
            if h.at_ms < horizon_ms {
                return false;
            }
            if let Some(s) = h.scan {
                match self
                    .replay
                    .check_and_remember(&s.sub, &s.jti, s.forget_at, now_ms / 1000)
                {
                    Ok(()) => n += 1,
                    Err(Seen::Replayed) => {}
                    Err(Seen::Full) => {
                        full = true;
                        return false;
                    }
                }
            }
            true
        })?;
        if full {
            tracing::warn!(
                refilled = n,
                "QR replay cache filled up while refilling from the journal: older codes may be replayable until they expire; raise qr.replay_cache_max"
            );
        }
        Ok(n)
    }
}

/// The card a credential names, or why the event is declined before the
/// rules. A bad, expired or replayed code is a decline with its reason;
/// only a store that cannot be read, or a replay cache full of live codes,
/// is an error.
pub async fn resolve<'a>(
    scanner: Option<&Scanner>,
    store: &Store,
    credential: &'a Credential,
    now_ms: i64,
) -> Result<Resolved<'a>, ServiceError> {
    let token = match credential {
        Credential::Tap(card) => return Ok(Resolved::card(Cow::Borrowed(card), None)),
        Credential::Scan(token) => token,
    };
    let scanner = scanner.ok_or_else(not_configured)?;
    let now = now_ms.div_euclid(1000);
    let claims = match verify(scanner, token, now).await {
        Ok(c) => c,
        Err(reject) => {
            metrics::counter!("onecard_qr_rejects_total", "why" => label_of(reject)).increment(1);
            return Ok(Resolved::decline(reason_of(reject), None));
        }
    };
    let Some(binding) = profiles::binding_async(store, &claims.sub).await? else {
        return Ok(Resolved::decline(Reason::CredentialUnbound, None));
    };
    let card = binding.card_no.card_no();
    if binding.typ != claims.typ {
        metrics::counter!("onecard_qr_rejects_total", "why" => "type_mismatch").increment(1);
        return Ok(Resolved::decline(Reason::QrInvalid, card));
    }
    let spent = ScanRef {
        sub: claims.sub,
        jti: claims.jti,
        forget_at: claims.exp + scanner.rules.skew_s,
    };
    match scanner
        .replay
        .check_and_remember(&spent.sub, &spent.jti, spent.forget_at, now)
    {
        Ok(()) => {}
        Err(Seen::Replayed) => return Ok(Resolved::decline(Reason::QrReplayed, card)),
        // Every remembered code is still live: accepting one more could
        // admit a replay, so the scan is refused as a failure (retry, or
        // tap the card) and SRE is told by the metric and the log.
        Err(Seen::Full) => {
            metrics::counter!("onecard_qr_replay_cache_full_total").increment(1);
            tracing::warn!("QR replay cache is full of live codes; raise qr.replay_cache_max");
            return Err(ServiceError::unavailable(
                "too many codes in flight to check this one for replay; retry shortly or tap the card",
            ));
        }
    }
    match card {
        Some(card) => Ok(Resolved::card(Cow::Owned(card), Some(spent))),
        None => Err(ServiceError::unavailable(
            "a credential binding is corrupt; tap the card",
        )),
    }
}

/// [`qr::verify`], with an Ed25519 signature checked in a batch with the
/// scans that arrived alongside (SM2 on its own, where it stands).
async fn verify(scanner: &Scanner, token: &str, now: i64) -> Result<qr::Claims, qr::Reject> {
    let opened = qr::open(token, &scanner.keys, now)?;
    let batched = scanner
        .sigs
        .as_ref()
        .and_then(|sigs| Some((sigs, opened.ed25519_check()?)));
    let signature_ok = match batched {
        Some((sigs, check)) => sigs.verify(check).await,
        None => opened.verify_signature(),
    };
    opened.accept(signature_ok, scanner.rules, now)
}

/// `400` for a scan where no issuer key is configured: a configuration
/// matter, refused before anything is recorded.
pub(crate) fn not_configured() -> ServiceError {
    ServiceError::invalid(
        "scanning is not configured on this gateway: no QR issuer keys are set up, so `kind: scan` cannot be verified; tap the card instead",
    )
}

fn reason_of(r: qr::Reject) -> Reason {
    match r {
        qr::Reject::Expired => Reason::QrExpired,
        qr::Reject::Replayed => Reason::QrReplayed,
        _ => Reason::QrInvalid,
    }
}

/// A metric label per rejection: a few fixed values, never token content.
fn label_of(r: qr::Reject) -> &'static str {
    match r {
        qr::Reject::Malformed => "malformed",
        qr::Reject::UnknownKid => "unknown_kid",
        qr::Reject::KeyNotValid => "key_not_valid",
        qr::Reject::BadSignature => "bad_signature",
        qr::Reject::LifetimeTooLong => "lifetime_too_long",
        qr::Reject::NotYetValid => "not_yet_valid",
        qr::Reject::Expired => "expired",
        qr::Reject::Replayed => "replayed",
    }
}
