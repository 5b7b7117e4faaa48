//! Signed dynamic QR tokens: `OC1.<kid>.<payload>.<sig>`.
//!
//! A cardholder's phone shows a short-lived code; the gateway must decide offline, in well under
//! a millisecond, whether that code was minted by one of our issuers for a real credential and is
//! still fresh. Everything needed for that decision is inside the token, so verification is a
//! pure function of (token, keyring, rules, now). The clock is an argument rather than read here
//! so that the host owns time (one reading per request, testable skew handling).
//!
//! Two signature schemes are accepted because issuers differ: Ed25519, and
//! SM2 (GB/T 32918, SM3, default signer id `1234567812345678`) for issuers who must use the
//! Chinese national algorithms. No cryptography is implemented here; both come from the
//! RustCrypto and dalek crates, and this module only frames the bytes they sign.
//!
//! Checks run cheapest-first and in a fixed order (shape, key lookup, key window, signature,
//! claims) so that unauthenticated input reaches the expensive signature check only when it is
//! well-formed, and so that every reject reason is deterministic for the same input. Claims are
//! only trusted after the signature verifies; before that the payload is parsed merely to reject
//! junk early, and its size is capped so that parsing cost is bounded.
//!
//! Single use is enforced separately by [`ReplayCache`], because the host decides when a code
//! counts as spent (e.g. only after the transaction is accepted).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::pkcs8::DecodePublicKey as _;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::pkcs8::EncodePublicKey as _;
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sm2::dsa::signature::Signer as _;
use sm2::dsa::signature::Verifier as _;

/// Token format tag; bump it rather than reinterpret old tokens if the format ever changes.
const PREFIX: &str = "OC1";
/// A QR code of this size is already dense; anything longer is not ours and is refused before
/// any decoding work.
const MAX_TOKEN_LEN: usize = 1024;
const MAX_PAYLOAD_LEN: usize = 512;
/// Longest unpadded base64 text that can decode to `MAX_PAYLOAD_LEN` bytes.
const MAX_PAYLOAD_B64_LEN: usize = (MAX_PAYLOAD_LEN * 4).div_ceil(3);
const SIG_LEN: usize = 64;
/// Unpadded base64 length of a 64-byte signature.
const SIG_B64_LEN: usize = 86;
/// GB/T 32918 / GM/T 0009 default signer id. Issuers are told to use it; a signature made under
/// any other id fails verification, which is the intended outcome. Note that OpenSSL 3.0's
/// `pkeyutl` signs with an empty id unless given `-pkeyopt distid:1234567812345678`.
const SM2_DEFAULT_ID: &str = "1234567812345678";

const KID_MAX: usize = 32;
const SUB_MAX: usize = 64;
const JTI_MIN: usize = 8;
const JTI_MAX: usize = 32;

/// Signature algorithm of an issuer key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Alg {
    Ed25519,
    Sm2,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Ed25519 => "ed25519",
            Alg::Sm2 => "sm2",
        }
    }

    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "ed25519" => Some(Alg::Ed25519),
            "sm2" => Some(Alg::Sm2),
            _ => None,
        }
    }
}

/// Kind of credential the code stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredType {
    Essc,
    Ykm,
}

impl CredType {
    pub fn as_str(self) -> &'static str {
        match self {
            CredType::Essc => "essc",
            CredType::Ykm => "ykm",
        }
    }

    pub fn parse(s: &str) -> Option<CredType> {
        match s {
            "essc" => Some(CredType::Essc),
            "ykm" => Some(CredType::Ykm),
            _ => None,
        }
    }
}

fn is_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn is_id(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(is_id_char)
}

fn valid_kid(kid: &str) -> bool {
    is_id(kid, 1, KID_MAX)
}

fn valid_sub(sub: &str) -> bool {
    is_id(sub, 1, SUB_MAX)
}

fn valid_jti(jti: &str) -> bool {
    is_id(jti, JTI_MIN, JTI_MAX)
}

#[derive(Clone)]
enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    Sm2(sm2::dsa::VerifyingKey),
}

/// A public key allowed to sign tokens, with the window in which it may be used.
#[derive(Clone)]
pub struct IssuerKey {
    pub kid: String,
    /// Unix seconds from which tokens under this key are accepted.
    pub valid_from: i64,
    /// Unix seconds from which this key is retired; `None` for no planned retirement.
    pub valid_until: Option<i64>,
    key: PublicKey,
}

impl fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .field("valid_from", &self.valid_from)
            .field("valid_until", &self.valid_until)
            .finish()
    }
}

fn check_window(valid_from: i64, valid_until: Option<i64>) -> Result<(), crate::Invalid> {
    match valid_until {
        Some(until) if until <= valid_from => Err("valid_until must be later than valid_from"
            .to_string()
            .into()),
        _ => Ok(()),
    }
}

impl IssuerKey {
    /// From an SPKI PEM public key ("-----BEGIN PUBLIC KEY-----"), as written by
    /// [`SigningKey::public_pem`] and by `openssl pkey -pubout`.
    pub fn from_public_pem(
        kid: &str,
        alg: Alg,
        pem: &str,
        valid_from: i64,
        valid_until: Option<i64>,
    ) -> Result<IssuerKey, crate::Invalid> {
        if !valid_kid(kid) {
            return Err("kid must be 1-32 characters of A-Za-z0-9_-"
                .to_string()
                .into());
        }
        check_window(valid_from, valid_until)?;
        let key = match alg {
            Alg::Ed25519 => {
                let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
                    .map_err(|e| format!("not an Ed25519 SPKI public key PEM: {e}"))?;
                // A key with a small-order component is no key a signer makes; refusing it is
                // what lets a batch of signatures be checked together (`verify_ed25519_batch`).
                if vk.is_weak() || !vk.to_edwards().is_torsion_free() {
                    return Err("unusable Ed25519 public key: it is not of prime order"
                        .to_string()
                        .into());
                }
                PublicKey::Ed25519(vk)
            }
            Alg::Sm2 => {
                let pk = sm2::PublicKey::from_public_key_pem(pem)
                    .map_err(|e| format!("not an SM2 SPKI public key PEM: {e}"))?;
                let vk = sm2::dsa::VerifyingKey::new(SM2_DEFAULT_ID, pk)
                    .map_err(|_| "unusable SM2 public key".to_string())?;
                PublicKey::Sm2(vk)
            }
        };
        Ok(IssuerKey {
            kid: kid.to_string(),
            valid_from,
            valid_until,
            key,
        })
    }

    pub fn alg(&self) -> Alg {
        match self.key {
            PublicKey::Ed25519(_) => Alg::Ed25519,
            PublicKey::Sm2(_) => Alg::Sm2,
        }
    }

    fn usable_at(&self, now: i64) -> bool {
        self.valid_from <= now && self.valid_until.is_none_or(|until| now < until)
    }

    fn verify_sig(&self, msg: &[u8], sig: &[u8; SIG_LEN]) -> bool {
        match &self.key {
            // Strict verification also refuses small-order keys and non-canonical encodings, so
            // one token has exactly one valid signature under one key.
            PublicKey::Ed25519(vk) => {
                let sig = ed25519_dalek::Signature::from_bytes(sig);
                vk.verify_strict(msg, &sig).is_ok()
            }
            PublicKey::Sm2(vk) => match sm2::dsa::Signature::from_bytes(sig) {
                Ok(sig) => vk.verify(msg, &sig).is_ok(),
                // r or s out of range: cannot be a signature from anyone.
                Err(_) => false,
            },
        }
    }
}

/// The set of issuer keys currently configured. Rotation is done by building a new keyring
/// that holds both the old and new key with overlapping windows.
#[derive(Debug, Clone)]
pub struct Keyring {
    // Sorted by kid: a handful of keys, so binary search beats hashing and iteration order is
    // stable for logs and admin output.
    keys: Vec<IssuerKey>,
}

impl Keyring {
    pub fn new(mut keys: Vec<IssuerKey>) -> Result<Keyring, crate::Invalid> {
        for k in &keys {
            // The fields are public, so a key may have been edited after construction.
            if !valid_kid(&k.kid) {
                return Err("kid must be 1-32 characters of A-Za-z0-9_-"
                    .to_string()
                    .into());
            }
            check_window(k.valid_from, k.valid_until).map_err(|e| format!("key {}: {e}", k.kid))?;
        }
        keys.sort_by(|a, b| a.kid.cmp(&b.kid));
        if let Some(w) = keys.windows(2).find(|w| w[0].kid == w[1].kid) {
            return Err(format!("duplicate kid {}", w[0].kid).into());
        }
        Ok(Keyring { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    fn get(&self, kid: &str) -> Option<&IssuerKey> {
        self.keys
            .binary_search_by(|k| k.kid.as_str().cmp(kid))
            .ok()
            .and_then(|i| self.keys.get(i))
    }
}

/// Freshness policy.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Longest `exp - iat` accepted. Bounds how long a screenshot of a code stays useful.
    pub lifetime_max_s: i64,
    /// Tolerated clock difference between phone and gateway, applied to both ends.
    pub skew_s: i64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            lifetime_max_s: 120,
            skew_s: 30,
        }
    }
}

/// What a verified token asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kid: String,
    pub sub: String,
    pub typ: CredType,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Malformed,
    UnknownKid,
    /// The key is outside its validity window at `now`: not yet valid, or retired.
    KeyNotValid,
    BadSignature,
    LifetimeTooLong,
    NotYetValid,
    Expired,
    Replayed,
}

impl Reject {
    /// Wire code. Only the distinctions a terminal can act on are exposed (ask for a fresh code,
    /// or refuse a reused one); the rest collapse into one code so probing learns little.
    pub fn code(self) -> &'static str {
        match self {
            Reject::Expired => "QR_EXPIRED",
            Reject::Replayed => "QR_REPLAYED",
            _ => "QR_INVALID",
        }
    }

    /// Short text for logs and operators. Fixed strings only: token content is attacker-chosen
    /// and must not reach logs or responses.
    pub fn detail(self) -> &'static str {
        match self {
            Reject::Malformed => "the code is not a well-formed OneCard QR token",
            Reject::UnknownKid => "the code is not signed by a known issuer key",
            Reject::KeyNotValid => "the issuer key is not valid at this time",
            Reject::BadSignature => "the code's signature does not verify",
            Reject::LifetimeTooLong => "the code's validity period is longer than allowed",
            Reject::NotYetValid => "the code is not valid yet; check the device clock",
            Reject::Expired => "the code has expired; refresh it",
            Reject::Replayed => "the code has already been used",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.detail())
    }
}

impl std::error::Error for Reject {}

/// Payload as signed. Unknown fields are refused so that an issuer cannot add semantics (say a
/// scope) that this verifier would silently ignore; serde also refuses duplicate fields.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload<'a> {
    #[serde(borrow)]
    sub: std::borrow::Cow<'a, str>,
    typ: CredType,
    iat: i64,
    exp: i64,
    #[serde(borrow)]
    jti: std::borrow::Cow<'a, str>,
}

/// Verify a token. Pure: no clock, no I/O.
///
/// Order: shape/decoding → kid known → key valid at `now` → signature → claims
/// (lifetime, then not-yet-valid, then expired).
pub fn verify(token: &str, keys: &Keyring, rules: Rules, now_unix: i64) -> Result<Claims, Reject> {
    let opened = open(token, keys, now_unix)?;
    let signature_ok = opened.verify_signature();
    opened.accept(signature_ok, rules, now_unix)
}

/// A token that passed every check before its signature: the key that must have signed it, the
/// signed text, the signature, and the claims, to be trusted only once the signature verifies.
///
/// [`verify`] is `open`, [`Opened::verify_signature`] and [`Opened::accept`] in a row; a host
/// that verifies several Ed25519 signatures at once (see [`verify_ed25519_batch`]) calls the
/// three itself, with the same outcome for every token an honest issuer signed.
pub struct Opened<'t, 'k> {
    key: &'k IssuerKey,
    signed: &'t [u8],
    sig: [u8; SIG_LEN],
    kid: &'t str,
    sub: String,
    typ: CredType,
    iat: i64,
    exp: i64,
    jti: String,
}

/// Shape, decoding, kid and the key's window at `now`: everything [`verify`] checks before the
/// signature, in the same order and with the same rejections.
pub fn open<'t, 'k>(
    token: &'t str,
    keys: &'k Keyring,
    now_unix: i64,
) -> Result<Opened<'t, 'k>, Reject> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Reject::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(prefix), Some(kid), Some(payload_b64), Some(sig_b64), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(Reject::Malformed);
    };
    if prefix != PREFIX || !valid_kid(kid) {
        return Err(Reject::Malformed);
    }
    // Length checks first so the decoders below never see more than they need to.
    if payload_b64.is_empty()
        || payload_b64.len() > MAX_PAYLOAD_B64_LEN
        || sig_b64.len() != SIG_B64_LEN
    {
        return Err(Reject::Malformed);
    }
    // Slack over MAX_PAYLOAD_LEN: the decoder wants room for its rounded-up length estimate.
    let mut payload_buf = [0u8; MAX_PAYLOAD_LEN + 4];
    let payload_len = URL_SAFE_NO_PAD
        .decode_slice(payload_b64, &mut payload_buf)
        .map_err(|_| Reject::Malformed)?;
    let payload_bytes = payload_buf.get(..payload_len).ok_or(Reject::Malformed)?;
    let mut sig_buf = [0u8; SIG_LEN + 4];
    let sig_len = URL_SAFE_NO_PAD
        .decode_slice(sig_b64, &mut sig_buf)
        .map_err(|_| Reject::Malformed)?;
    let sig: [u8; SIG_LEN] = sig_buf
        .get(..sig_len)
        .and_then(|s| s.try_into().ok())
        .ok_or(Reject::Malformed)?;

    let payload: Payload<'_> =
        serde_json::from_slice(payload_bytes).map_err(|_| Reject::Malformed)?;
    if !valid_sub(&payload.sub) || !valid_jti(&payload.jti) {
        return Err(Reject::Malformed);
    }

    let key = keys.get(kid).ok_or(Reject::UnknownKid)?;
    if !key.usable_at(now_unix) {
        return Err(Reject::KeyNotValid);
    }
    // The signed text is everything before the last dot, exactly as transmitted.
    let signed_len = token.len() - sig_b64.len() - 1;
    let signed = token
        .as_bytes()
        .get(..signed_len)
        .ok_or(Reject::Malformed)?;
    Ok(Opened {
        key,
        signed,
        sig,
        kid,
        sub: payload.sub.into_owned(),
        typ: payload.typ,
        iat: payload.iat,
        exp: payload.exp,
        jti: payload.jti.into_owned(),
    })
}

impl Opened<'_, '_> {
    /// The token's signature checked on its own: strict Ed25519, or SM2.
    pub fn verify_signature(&self) -> bool {
        self.key.verify_sig(self.signed, &self.sig)
    }

    /// The signature check as a value that can wait in a batch, when the key is Ed25519 (SM2 has
    /// no batch form: it is checked on its own). The signed text is copied: a batch outlives the
    /// request that holds the token.
    pub fn ed25519_check(&self) -> Option<Ed25519Check> {
        match &self.key.key {
            PublicKey::Ed25519(vk) => Some(Ed25519Check {
                key: *vk,
                sig: ed25519_dalek::Signature::from_bytes(&self.sig),
                msg: self.signed.to_vec(),
            }),
            PublicKey::Sm2(_) => None,
        }
    }

    /// The claims, given the signature's verdict: `BadSignature` if it did not verify, else the
    /// lifetime, not-yet-valid and expiry checks in that order.
    pub fn accept(self, signature_ok: bool, rules: Rules, now_unix: i64) -> Result<Claims, Reject> {
        if !signature_ok {
            return Err(Reject::BadSignature);
        }
        let (iat, exp) = (self.iat, self.exp);
        // i128 so that hostile extremes cannot overflow into an acceptance.
        let lifetime = i128::from(exp) - i128::from(iat);
        if lifetime < 0 || lifetime > i128::from(rules.lifetime_max_s) {
            return Err(Reject::LifetimeTooLong);
        }
        let skew = i128::from(rules.skew_s.max(0));
        let now = i128::from(now_unix);
        if now < i128::from(iat) - skew {
            return Err(Reject::NotYetValid);
        }
        if now > i128::from(exp) + skew {
            return Err(Reject::Expired);
        }
        Ok(Claims {
            kid: self.kid.to_string(),
            sub: self.sub,
            typ: self.typ,
            iat,
            exp,
            jti: self.jti,
        })
    }
}

/// One Ed25519 signature to check: the issuer's key, the signature and the signed text.
#[derive(Clone)]
pub struct Ed25519Check {
    key: ed25519_dalek::VerifyingKey,
    sig: ed25519_dalek::Signature,
    msg: Vec<u8>,
}

impl fmt::Debug for Ed25519Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signed text is a cardholder's token: its length only.
        f.debug_struct("Ed25519Check")
            .field("msg_len", &self.msg.len())
            .finish_non_exhaustive()
    }
}

impl Ed25519Check {
    /// Strict verification of this one signature, as [`verify`] does.
    pub fn verify_alone(&self) -> bool {
        self.key.verify_strict(&self.msg, &self.sig).is_ok()
    }
}

/// Verdicts for several Ed25519 signatures, in order, checked as one batch when there are two
/// or more (per signature about 0.8 of the work of one alone for two, 0.56 for four, under half
/// from eight on: `cargo bench --bench hot_path -- qr/ed25519_signatures`), and one by one,
/// strictly, when the batch does not verify (to say which).
///
/// A batch (ed25519-dalek's `verify_batch`) checks one equation for all of them,
/// Σ zᵢ([sᵢ]B − Rᵢ − [kᵢ]Aᵢ) = 0, with 128-bit zᵢ drawn from a transcript of every
/// signature and hash in the batch, where [`verify`] checks [s]B = R + [k]A for each, strictly.
/// The two can differ only on a signature whose error term [s]B − R − [k]A is a nonzero point
/// of small order: strict verification refuses it, a batch accepts it when the zᵢ happen to
/// cancel it (about one chance in its order, and depending on which other scans share the
/// batch). Issuer keys are refused unless they are of prime order
/// ([`IssuerKey::from_public_pem`]), and then such a signature can only be made with the
/// issuer's private key: anyone else would have to solve the discrete logarithm of A, whether to
/// make one or to turn a valid signature into another (adding a small-order point to R changes
/// the hash k). A non-canonical s is refused by both, as long as ed25519-dalek's
/// `legacy_compatibility` feature stays off in the whole build (the s + ℓ test below would
/// catch it). So batching admits no code an issuer did not sign; what it may accept that strict
/// verification refuses is a signature the issuer deliberately made odd, and the replay cache
/// keys on `(sub, jti)`, not on the signature, so even that cannot be spent twice.
pub fn verify_ed25519_batch(checks: &[&Ed25519Check]) -> Vec<bool> {
    if let [one] = checks {
        return vec![one.verify_alone()];
    }
    let msgs: Vec<&[u8]> = checks.iter().map(|c| c.msg.as_slice()).collect();
    let sigs: Vec<ed25519_dalek::Signature> = checks.iter().map(|c| c.sig).collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = checks.iter().map(|c| c.key).collect();
    if ed25519_dalek::verify_batch(&msgs, &sigs, &keys).is_ok() {
        return vec![true; checks.len()];
    }
    checks.iter().map(|c| c.verify_alone()).collect()
}

// ---------------------------------------------------------------------------------------------
// Issuing. Used by the `onecard qr` CLI for key generation and test codes; the gateway itself
// only verifies.

enum SecretKey {
    Ed25519(ed25519_dalek::SigningKey),
    Sm2(sm2::dsa::SigningKey),
}

/// A private issuer key.
pub struct SigningKey {
    key: SecretKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("SigningKey")
            .field("alg", &self.alg())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key from OS randomness.
    /// A new key from `rng` (the caller's: the operating system's for a
    /// real key; this crate reads no entropy of its own).
    pub fn generate(alg: Alg, rng: &mut impl CryptoRngCore) -> SigningKey {
        let key = match alg {
            Alg::Ed25519 => SecretKey::Ed25519(ed25519_dalek::SigningKey::generate(rng)),
            Alg::Sm2 => SecretKey::Sm2(sm2_signing_key(&sm2::SecretKey::random(rng))),
        };
        SigningKey { key }
    }

    /// From a PKCS#8 PEM private key ("-----BEGIN PRIVATE KEY-----"); the algorithm is taken
    /// from the key's own OID so a key cannot be loaded as the wrong kind.
    pub fn from_pkcs8_pem(pem: &str) -> Result<SigningKey, crate::Invalid> {
        use sm2::pkcs8::{der::SecretDocument, ObjectIdentifier, PrivateKeyInfo};
        const SM2_CURVE_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");

        let (label, doc) =
            SecretDocument::from_pem(pem).map_err(|e| format!("not a PEM private key: {e}"))?;
        if label != "PRIVATE KEY" {
            return Err("expected an unencrypted PKCS#8 \"PRIVATE KEY\" PEM"
                .to_string()
                .into());
        }
        let info = PrivateKeyInfo::try_from(doc.as_bytes())
            .map_err(|e| format!("not a PKCS#8 private key: {e}"))?;
        let oid = info.algorithm.oid;
        let key = if oid == ed25519_dalek::pkcs8::ALGORITHM_OID {
            let k = ed25519_dalek::SigningKey::from_pkcs8_der(doc.as_bytes())
                .map_err(|e| format!("bad Ed25519 private key: {e}"))?;
            SecretKey::Ed25519(k)
        } else if oid == sm2::elliptic_curve::ALGORITHM_OID
            && info.algorithm.parameters_oid().ok() == Some(SM2_CURVE_OID)
        {
            let sk = sm2::SecretKey::from_pkcs8_der(doc.as_bytes())
                .map_err(|e| format!("bad SM2 private key: {e}"))?;
            SecretKey::Sm2(sm2_signing_key(&sk))
        } else {
            return Err("unsupported key algorithm: expected Ed25519 or SM2"
                .to_string()
                .into());
        };
        Ok(SigningKey { key })
    }

    pub fn to_pkcs8_pem(&self) -> String {
        // Encoding a key we hold can fail only on allocation failure.
        let pem = match &self.key {
            SecretKey::Ed25519(k) => k.to_pkcs8_pem(LineEnding::LF),
            SecretKey::Sm2(k) => {
                sm2::SecretKey::from(k.as_nonzero_scalar()).to_pkcs8_pem(LineEnding::LF)
            }
        };
        pem.map(|p| p.as_str().to_string())
            .expect("encoding an in-memory private key cannot fail")
    }

    /// SPKI PEM of the public half, for the verifier's key configuration.
    pub fn public_pem(&self) -> String {
        let pem = match &self.key {
            SecretKey::Ed25519(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
            SecretKey::Sm2(k) => {
                sm2::PublicKey::from(k.verifying_key()).to_public_key_pem(LineEnding::LF)
            }
        };
        pem.expect("encoding an in-memory public key cannot fail")
    }

    pub fn alg(&self) -> Alg {
        match self.key {
            SecretKey::Ed25519(_) => Alg::Ed25519,
            SecretKey::Sm2(_) => Alg::Sm2,
        }
    }

    fn sign(&self, msg: &[u8]) -> [u8; SIG_LEN] {
        match &self.key {
            SecretKey::Ed25519(k) => k.sign(msg).to_bytes(),
            SecretKey::Sm2(k) => {
                let sig: sm2::dsa::Signature = k.sign(msg);
                sig.to_bytes()
            }
        }
    }
}

fn sm2_signing_key(sk: &sm2::SecretKey) -> sm2::dsa::SigningKey {
    // The id is a fixed 16-byte string, which the crate accepts for any valid key.
    sm2::dsa::SigningKey::new(SM2_DEFAULT_ID, sk).expect("the SM2 default id is always accepted")
}

/// Mint a token. Validates the shapes `verify` will insist on, so the CLI cannot produce codes
/// the gateway would refuse as malformed.
pub fn issue(
    key: &SigningKey,
    kid: &str,
    sub: &str,
    typ: CredType,
    iat: i64,
    ttl_s: i64,
    jti: &str,
) -> Result<String, crate::Invalid> {
    if !valid_kid(kid) {
        return Err("kid must be 1-32 characters of A-Za-z0-9_-"
            .to_string()
            .into());
    }
    if !valid_sub(sub) {
        return Err("sub must be 1-64 characters of A-Za-z0-9_-"
            .to_string()
            .into());
    }
    if !valid_jti(jti) {
        return Err("jti must be 8-32 characters of A-Za-z0-9_-"
            .to_string()
            .into());
    }
    if ttl_s < 0 {
        return Err("ttl must not be negative".to_string().into());
    }
    let exp = iat
        .checked_add(ttl_s)
        .ok_or_else(|| "iat + ttl overflows".to_string())?;
    let payload = Payload {
        sub: sub.into(),
        typ,
        iat,
        exp,
        jti: jti.into(),
    };
    let json = serde_json::to_vec(&payload).map_err(|e| format!("payload encoding: {e}"))?;
    if json.len() > MAX_PAYLOAD_LEN {
        return Err("payload too large".to_string().into());
    }
    let mut token = format!("{PREFIX}.{kid}.{}", URL_SAFE_NO_PAD.encode(&json));
    let sig = key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig));
    if token.len() > MAX_TOKEN_LEN {
        return Err("token too long".to_string().into());
    }
    Ok(token)
}

/// 16 characters of A-Za-z0-9_- (96 bits) from OS randomness.
pub fn random_jti(rng: &mut impl CryptoRngCore) -> String {
    // 12 bytes is exactly 16 base64 characters, so no bias and no padding.
    let mut bytes = [0u8; 12];
    rng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    //! Tokens here are built straight from ed25519_dalek / sm2 and hand-written JSON, never via
    //! `issue`, so that a bug shared by `issue` and `verify` cannot hide itself.

    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_750_000_000;
    const ALGS: [Alg; 2] = [Alg::Ed25519, Alg::Sm2];

    enum TestSigner {
        Ed(ed25519_dalek::SigningKey),
        Sm2(sm2::dsa::SigningKey),
    }

    impl TestSigner {
        fn new(alg: Alg, seed: u8) -> TestSigner {
            Self::with_id(alg, seed, SM2_DEFAULT_ID)
        }

        fn with_id(alg: Alg, seed: u8, sm2_id: &str) -> TestSigner {
            let mut secret = [seed; 32];
            // Keep the scalar well below the SM2 group order whatever the seed.
            secret[0] = 0x11;
            match alg {
                Alg::Ed25519 => TestSigner::Ed(ed25519_dalek::SigningKey::from_bytes(&secret)),
                Alg::Sm2 => TestSigner::Sm2(
                    sm2::dsa::SigningKey::from_slice(sm2_id, &secret).expect("test key"),
                ),
            }
        }

        fn sign(&self, msg: &[u8]) -> Vec<u8> {
            match self {
                TestSigner::Ed(k) => k.sign(msg).to_bytes().to_vec(),
                TestSigner::Sm2(k) => {
                    let sig: sm2::dsa::Signature = k.sign(msg);
                    sig.to_bytes().to_vec()
                }
            }
        }

        fn public_pem(&self) -> String {
            match self {
                TestSigner::Ed(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
                TestSigner::Sm2(k) => {
                    sm2::PublicKey::from(k.verifying_key()).to_public_key_pem(LineEnding::LF)
                }
            }
            .expect("pem")
        }

        fn alg(&self) -> Alg {
            match self {
                TestSigner::Ed(_) => Alg::Ed25519,
                TestSigner::Sm2(_) => Alg::Sm2,
            }
        }

        fn issuer(&self, kid: &str, from: i64, until: Option<i64>) -> IssuerKey {
            IssuerKey::from_public_pem(kid, self.alg(), &self.public_pem(), from, until)
                .expect("issuer key")
        }
    }

    fn b64(b: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    fn claims_json(iat: i64, exp: i64) -> serde_json::Value {
        json!({"sub": "card-0042", "typ": "essc", "iat": iat, "exp": exp, "jti": "jti_abcdefgh"})
    }

    fn signed_raw(s: &TestSigner, kid: &str, payload: &[u8]) -> String {
        let signed = format!("OC1.{kid}.{}", b64(payload));
        let sig = b64(s.sign(signed.as_bytes()));
        format!("{signed}.{sig}")
    }

    fn signed(s: &TestSigner, kid: &str, v: &serde_json::Value) -> String {
        signed_raw(s, kid, &serde_json::to_vec(v).expect("json"))
    }

    fn ring(keys: Vec<IssuerKey>) -> Keyring {
        Keyring::new(keys).expect("keyring")
    }

    /// One signer under kid "k1", valid since long ago, and a fresh valid token.
    fn setup(alg: Alg) -> (TestSigner, Keyring, String) {
        let s = TestSigner::new(alg, 1);
        let keys = ring(vec![s.issuer("k1", 0, None)]);
        let tok = signed(&s, "k1", &claims_json(NOW - 10, NOW + 80));
        (s, keys, tok)
    }

    fn v(tok: &str, keys: &Keyring, now: i64) -> Result<Claims, Reject> {
        verify(tok, keys, Rules::default(), now)
    }

    #[test]
    fn valid_token_verifies_with_claims() {
        for alg in ALGS {
            let (_, keys, tok) = setup(alg);
            let c = v(&tok, &keys, NOW).unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
            assert_eq!(
                c,
                Claims {
                    kid: "k1".into(),
                    sub: "card-0042".into(),
                    typ: CredType::Essc,
                    iat: NOW - 10,
                    exp: NOW + 80,
                    jti: "jti_abcdefgh".into(),
                },
                "{alg:?}"
            );
        }
    }

    #[test]
    fn ykm_type_and_field_order_do_not_matter() {
        for alg in ALGS {
            let s = TestSigner::new(alg, 1);
            let keys = ring(vec![s.issuer("k1", 0, None)]);
            let raw = format!(
                r#"{{"jti":"ABCDEFGH12345678","exp":{},"iat":{},"typ":"ykm","sub":"x"}}"#,
                NOW + 60,
                NOW
            );
            let c = v(&signed_raw(&s, "k1", raw.as_bytes()), &keys, NOW).expect("valid");
            assert_eq!(c.typ, CredType::Ykm, "{alg:?}");
            assert_eq!(c.sub, "x");
        }
    }

    #[test]
    fn other_key_under_same_kid_is_bad_signature() {
        for alg in ALGS {
            let (_, keys, _) = setup(alg);
            let other = TestSigner::new(alg, 2);
            let tok = signed(&other, "k1", &claims_json(NOW, NOW + 60));
            assert_eq!(v(&tok, &keys, NOW), Err(Reject::BadSignature), "{alg:?}");
        }
    }

    #[test]
    fn altered_payload_is_bad_signature() {
        for alg in ALGS {
            let (_, keys, tok) = setup(alg);
            let sig = tok.rsplit('.').next().expect("sig part");
            let mut c = claims_json(NOW - 10, NOW + 80);
            c["sub"] = json!("card-0043");
            let forged = format!(
                "OC1.k1.{}.{sig}",
                b64(serde_json::to_vec(&c).expect("json"))
            );
            assert_eq!(v(&forged, &keys, NOW), Err(Reject::BadSignature), "{alg:?}");
            // The kid is signed too: the same signature under another key name fails.
            let s2 = TestSigner::new(alg, 1);
            let keys2 = ring(vec![s2.issuer("k1", 0, None), s2.issuer("k2", 0, None)]);
            let moved = tok.replacen("OC1.k1.", "OC1.k2.", 1);
            assert_eq!(v(&moved, &keys2, NOW), Err(Reject::BadSignature), "{alg:?}");
        }
    }

    #[test]
    fn flipped_signature_bit_is_bad_signature() {
        for alg in ALGS {
            let s = TestSigner::new(alg, 1);
            let keys = ring(vec![s.issuer("k1", 0, None)]);
            let signed_part = format!("OC1.k1.{}", b64(claims_json(NOW, NOW + 60).to_string()));
            let mut sig = s.sign(signed_part.as_bytes());
            sig[40] ^= 1;
            let tok = format!("{signed_part}.{}", b64(&sig));
            assert_eq!(v(&tok, &keys, NOW), Err(Reject::BadSignature), "{alg:?}");
        }
    }

    #[test]
    fn expiry_honours_skew() {
        for alg in ALGS {
            let (_, keys, tok) = setup(alg);
            let exp = NOW + 80;
            assert!(v(&tok, &keys, exp).is_ok(), "{alg:?}");
            assert!(v(&tok, &keys, exp + 30).is_ok(), "{alg:?} within skew");
            assert_eq!(v(&tok, &keys, exp + 31), Err(Reject::Expired), "{alg:?}");
        }
    }

    #[test]
    fn not_yet_valid_honours_skew() {
        for alg in ALGS {
            let (_, keys, tok) = setup(alg);
            let iat = NOW - 10;
            assert!(v(&tok, &keys, iat - 30).is_ok(), "{alg:?} within skew");
            assert_eq!(
                v(&tok, &keys, iat - 31),
                Err(Reject::NotYetValid),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn lifetime_is_bounded() {
        for alg in ALGS {
            let s = TestSigner::new(alg, 1);
            let keys = ring(vec![s.issuer("k1", 0, None)]);
            let ok = signed(&s, "k1", &claims_json(NOW, NOW + 120));
            assert!(v(&ok, &keys, NOW).is_ok(), "{alg:?}");
            let long = signed(&s, "k1", &claims_json(NOW, NOW + 121));
            assert_eq!(
                v(&long, &keys, NOW),
                Err(Reject::LifetimeTooLong),
                "{alg:?}"
            );
            let backwards = signed(&s, "k1", &claims_json(NOW, NOW - 1));
            assert_eq!(
                v(&backwards, &keys, NOW),
                Err(Reject::LifetimeTooLong),
                "{alg:?}"
            );
            let extreme = signed(&s, "k1", &claims_json(i64::MIN, i64::MAX));
            assert_eq!(
                v(&extreme, &keys, NOW),
                Err(Reject::LifetimeTooLong),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn unknown_kid() {
        for alg in ALGS {
            let (s, keys, _) = setup(alg);
            let tok = signed(&s, "k9", &claims_json(NOW, NOW + 60));
            assert_eq!(v(&tok, &keys, NOW), Err(Reject::UnknownKid), "{alg:?}");
            let empty = ring(vec![]);
            assert_eq!(v(&tok, &empty, NOW), Err(Reject::UnknownKid), "{alg:?}");
        }
    }

    #[test]
    fn key_outside_its_window_is_not_valid() {
        for alg in ALGS {
            let s = TestSigner::new(alg, 1);
            let tok = signed(&s, "k1", &claims_json(NOW, NOW + 60));
            let retired = ring(vec![s.issuer("k1", 0, Some(NOW))]);
            assert_eq!(v(&tok, &retired, NOW), Err(Reject::KeyNotValid), "{alg:?}");
            let last_second = ring(vec![s.issuer("k1", 0, Some(NOW + 1))]);
            assert!(v(&tok, &last_second, NOW).is_ok(), "{alg:?}");
            let future = ring(vec![s.issuer("k1", NOW + 1, None)]);
            assert_eq!(v(&tok, &future, NOW), Err(Reject::KeyNotValid), "{alg:?}");
            let starting = ring(vec![s.issuer("k1", NOW, None)]);
            assert!(v(&tok, &starting, NOW).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn window_check_precedes_signature_check() {
        for alg in ALGS {
            let s = TestSigner::new(alg, 1);
            let other = TestSigner::new(alg, 2);
            let tok = signed(&other, "k1", &claims_json(NOW, NOW + 60));
            let retired = ring(vec![s.issuer("k1", 0, Some(NOW))]);
            assert_eq!(v(&tok, &retired, NOW), Err(Reject::KeyNotValid), "{alg:?}");
        }
    }

    #[test]
    fn malformed_tokens() {
        for alg in ALGS {
            let (s, keys, good) = setup(alg);
            assert!(v(&good, &keys, NOW).is_ok());
            let (head, sig) = good.rsplit_once('.').expect("dot");
            let payload_b64 = head.rsplit('.').next().expect("payload");
            let with = |f: &dyn Fn(&mut serde_json::Value)| {
                let mut c = claims_json(NOW, NOW + 60);
                f(&mut c);
                signed(&s, "k1", &c)
            };
            let cases: Vec<(&str, String)> = vec![
                ("empty", String::new()),
                ("wrong prefix", good.replacen("OC1.", "OC2.", 1)),
                ("lowercase prefix", good.replacen("OC1.", "oc1.", 1)),
                ("three parts", format!("OC1.k1.{payload_b64}")),
                ("five parts", format!("{good}.AAAA")),
                ("empty kid", good.replacen("OC1.k1.", "OC1..", 1)),
                ("bad base64 payload", format!("OC1.k1.{payload_b64}*.{sig}")),
                ("padded payload", format!("OC1.k1.{payload_b64}=.{sig}")),
                ("bad base64 sig", format!("{head}.{}", sig.replacen(|_| true, "+", 1))),
                ("std alphabet sig", format!("{head}.{}", "/".repeat(86))),
                ("padded sig", format!("{head}.{sig}==")),
                ("sig 63 bytes", format!("{head}.{}", b64([7u8; 63]))),
                ("sig 65 bytes", format!("{head}.{}", b64([7u8; 65]))),
                ("empty payload", format!("OC1.k1..{sig}")),
                ("payload not json", signed_raw(&s, "k1", b"sub=card")),
                ("payload json array", signed_raw(&s, "k1", b"[1,2]")),
                ("trailing junk", signed_raw(&s, "k1", format!("{} x", padded_payload(100)).as_bytes())),
                ("missing field", with(&|c| _ = c.as_object_mut().map(|o| o.remove("jti")))),
                ("unknown field", with(&|c| c["scope"] = json!("all"))),
                ("bad typ", with(&|c| c["typ"] = json!("ESSC"))),
                ("typ not string", with(&|c| c["typ"] = json!(1))),
                ("iat as string", with(&|c| c["iat"] = json!(NOW.to_string()))),
                ("iat as float", with(&|c| c["iat"] = json!(1.5))),
                ("jti too short", with(&|c| c["jti"] = json!("abcdefg"))),
                ("jti too long", with(&|c| c["jti"] = json!("a".repeat(33)))),
                ("jti charset", with(&|c| c["jti"] = json!("abcd+efgh"))),
                ("jti non-ascii", with(&|c| c["jti"] = json!("abcdefgé"))),
                ("sub empty", with(&|c| c["sub"] = json!(""))),
                ("sub too long", with(&|c| c["sub"] = json!("s".repeat(65)))),
                ("sub charset", with(&|c| c["sub"] = json!("card 42"))),
                ("kid charset", signed(&s, "k!1", &claims_json(NOW, NOW + 60))),
                ("kid too long", signed(&s, &"k".repeat(33), &claims_json(NOW, NOW + 60))),
                (
                    "payload over 512 bytes",
                    with(&|c| c["sub"] = json!("s".repeat(600))),
                ),
                (
                    "whitespace-padded payload over 512 bytes",
                    signed_raw(&s, "k1", padded_payload(513).as_bytes()),
                ),
                ("token over 1024 bytes", format!("{good}{}", "A".repeat(1025 - good.len()))),
                (
                    "duplicate field",
                    signed_raw(
                        &s,
                        "k1",
                        format!(
                            r#"{{"sub":"a","sub":"b","typ":"essc","iat":{NOW},"exp":{},"jti":"abcdefgh"}}"#,
                            NOW + 1
                        )
                        .as_bytes(),
                    ),
                ),
            ];
            for (name, tok) in cases {
                assert_eq!(
                    v(&tok, &keys, NOW),
                    Err(Reject::Malformed),
                    "{alg:?}: {name}"
                );
            }
        }
    }

    /// Valid claims JSON padded with whitespace to exactly `len` bytes.
    fn padded_payload(len: usize) -> String {
        let body = format!(
            r#""sub":"card","typ":"essc","iat":{NOW},"exp":{},"jti":"abcdefgh"}}"#,
            NOW + 60
        );
        format!("{{{}{body}", " ".repeat(len - body.len() - 1))
    }

    #[test]
    fn limits_at_the_edge_are_accepted() {
        for alg in ALGS {
            let s = TestSigner::new(alg, 1);
            let kid = "K".repeat(32);
            let keys = ring(vec![s.issuer(&kid, 0, None)]);
            let mut c = claims_json(NOW, NOW + 60);
            c["sub"] = json!("S-_9".repeat(16));
            c["jti"] = json!("J".repeat(32));
            assert!(v(&signed(&s, &kid, &c), &keys, NOW).is_ok(), "{alg:?}");
            c["jti"] = json!("J".repeat(8));
            assert!(v(&signed(&s, &kid, &c), &keys, NOW).is_ok(), "{alg:?}");
            let biggest = padded_payload(MAX_PAYLOAD_LEN);
            assert!(
                v(&signed_raw(&s, &kid, biggest.as_bytes()), &keys, NOW).is_ok(),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn sm2_signature_under_another_signer_id_does_not_verify() {
        let s = TestSigner::new(Alg::Sm2, 1);
        let keys = ring(vec![s.issuer("k1", 0, None)]);
        let other_id = TestSigner::with_id(Alg::Sm2, 1, "ALICE123@YAHOO.COM");
        // Same key pair, only the signer id differs.
        assert_eq!(other_id.public_pem(), s.public_pem());
        let tok = signed(&other_id, "k1", &claims_json(NOW, NOW + 60));
        assert_eq!(v(&tok, &keys, NOW), Err(Reject::BadSignature));
        let tok = signed(&s, "k1", &claims_json(NOW, NOW + 60));
        assert!(v(&tok, &keys, NOW).is_ok());
    }

    // Tokens signed by OpenSSL 3.0 (`openssl pkeyutl -sign -rawin`, SM2 with `-digest sm3
    // -pkeyopt distid:1234567812345678`, DER signature re-encoded as r||s): proves the framing
    // and the SM2 signer id interoperate with an independent implementation.
    const OSSL_ED_PUB: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAEx7Ve0jTWV1paEsHIOYUwGfeUqNabzi+S9Oqgg+3PoI=
-----END PUBLIC KEY-----
";
    const OSSL_ED_PRIV: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIP7CS3j3/jbVeVcr7hpd3LfqJoEoD3j+U9vLa99jujqO
-----END PRIVATE KEY-----
";
    const OSSL_ED_TOKEN: &str =
        "OC1.ossl-ed.eyJzdWIiOiJjYXJkLTAwNDIiLCJ0eXAiOiJlc3NjIiwiaWF0IjoxNz\
        AwMDAwMDAwLCJleHAiOjE3MDAwMDAwOTAsImp0aSI6Im9zc2xLQVRfMDAwMiJ9.t3CI7veMAksO-XDXpoMH_W1AJ04q\
        slH-_xPqEXvmlugAvfiY8z8Cz3ypoTaxRsJ-fa9pSfcun-n1bKMLDeQxBQ";
    const OSSL_SM2_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEJxuFdo33M3YcuIF5zKfTHkUMAv87
Oshb4aqKerNb319bseUSn8STwZV7IFwi2imQ5KlY5XfGMnfgALal1fFcMQ==
-----END PUBLIC KEY-----
";
    const OSSL_SM2_PRIV: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqBHM9VAYItBG0wawIBAQQggudld+JguqGdzBTd
gTRBr4dLfLBJ1sOc306esXbv5VqhRANCAAQnG4V2jfczdhy4gXnMp9MeRQwC/zs6
yFvhqop6s1vfX1ux5RKfxJPBlXsgXCLaKZDkqVjld8Yyd+AAtqXV8Vwx
-----END PRIVATE KEY-----
";
    const OSSL_SM2_TOKEN: &str = "OC1.ossl-sm2.eyJzdWIiOiJjYXJkLTAwNDIiLCJ0eXAiOiJ5a20iLCJpYXQiOjE\
        3MDAwMDAwMDAsImV4cCI6MTcwMDAwMDA5MCwianRpIjoib3NzbEtBVF8wMDAxIn0.drHxeHMCVAdBQExyMzF2e4s1oP\
        aS6GHjc2NarU7xjm2HOgi7vSZNENW0fyefVQbcQQsdpelLrdYHmtJPbYuCvQ";
    const P256_PRIV: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgasLnBoNM/nGdh2pO
R4swh7rlEsb2+7CbajeGXo9w6YShRANCAASaYZFIpvrauSD/RTsUyVIwjHj7d9zk
FsA4dPBZ09S3VNjREKF/z/vi+BozO+h9dYqNKc66Hz+7oL/ZDVU3aD2z
-----END PRIVATE KEY-----
";

    #[test]
    fn openssl_signed_tokens_verify() {
        let keys = ring(vec![
            IssuerKey::from_public_pem("ossl-ed", Alg::Ed25519, OSSL_ED_PUB, 0, None).expect("ed"),
            IssuerKey::from_public_pem("ossl-sm2", Alg::Sm2, OSSL_SM2_PUB, 0, None).expect("sm2"),
        ]);
        let now = 1_700_000_030;
        let ed = v(OSSL_ED_TOKEN, &keys, now).expect("openssl ed25519 token");
        assert_eq!(
            (ed.sub.as_str(), ed.typ, ed.jti.as_str()),
            ("card-0042", CredType::Essc, "osslKAT_0002")
        );
        let sm = v(OSSL_SM2_TOKEN, &keys, now).expect("openssl sm2 token");
        assert_eq!(
            (sm.kid.as_str(), sm.typ, sm.exp),
            ("ossl-sm2", CredType::Ykm, 1_700_000_090)
        );
    }

    #[test]
    fn openssl_private_keys_load_and_match_their_public_keys() {
        for (pem, pubpem, alg) in [
            (OSSL_ED_PRIV, OSSL_ED_PUB, Alg::Ed25519),
            (OSSL_SM2_PRIV, OSSL_SM2_PUB, Alg::Sm2),
        ] {
            let k = SigningKey::from_pkcs8_pem(pem).expect("openssl key loads");
            assert_eq!(k.alg(), alg);
            assert_eq!(k.public_pem(), pubpem, "{alg:?}");
        }
    }

    #[test]
    fn unsupported_or_bad_private_keys_are_refused() {
        assert!(SigningKey::from_pkcs8_pem(P256_PRIV).is_err());
        assert!(SigningKey::from_pkcs8_pem(OSSL_ED_PUB).is_err());
        assert!(SigningKey::from_pkcs8_pem("not a pem").is_err());
        assert!(IssuerKey::from_public_pem("k", Alg::Sm2, OSSL_ED_PUB, 0, None).is_err());
        assert!(IssuerKey::from_public_pem("k", Alg::Ed25519, OSSL_SM2_PUB, 0, None).is_err());
        assert!(IssuerKey::from_public_pem("k", Alg::Ed25519, OSSL_ED_PRIV, 0, None).is_err());
        assert!(IssuerKey::from_public_pem("k.1", Alg::Ed25519, OSSL_ED_PUB, 0, None).is_err());
        assert!(IssuerKey::from_public_pem("k", Alg::Ed25519, OSSL_ED_PUB, 5, Some(5)).is_err());
    }

    #[test]
    fn issue_roundtrip_through_pem() {
        for alg in ALGS {
            let k = SigningKey::generate(alg, &mut rand_core::OsRng);
            assert_eq!(k.alg(), alg);
            let k2 = SigningKey::from_pkcs8_pem(&k.to_pkcs8_pem()).expect("pkcs8 roundtrip");
            assert_eq!(k2.alg(), alg);
            assert_eq!(k2.public_pem(), k.public_pem());
            let ik = IssuerKey::from_public_pem("rot-1", alg, &k.public_pem(), 0, None)
                .expect("public pem");
            assert_eq!(ik.alg(), alg);
            let keys = ring(vec![ik]);
            let jti = random_jti(&mut rand_core::OsRng);
            let tok = issue(&k2, "rot-1", "card_7", CredType::Ykm, NOW, 90, &jti).expect("issue");
            assert!(tok.len() <= MAX_TOKEN_LEN);
            let c = v(&tok, &keys, NOW).expect("issued token verifies");
            assert_eq!(
                c,
                Claims {
                    kid: "rot-1".into(),
                    sub: "card_7".into(),
                    typ: CredType::Ykm,
                    iat: NOW,
                    exp: NOW + 90,
                    jti,
                }
            );
        }
    }

    #[test]
    fn issue_validates_shapes() {
        let k = SigningKey::generate(Alg::Ed25519, &mut rand_core::OsRng);
        let ok = |kid: &str, sub: &str, ttl: i64, jti: &str| {
            issue(&k, kid, sub, CredType::Essc, NOW, ttl, jti).is_ok()
        };
        assert!(ok("k", "s", 60, "abcdefgh"));
        assert!(!ok("k.1", "s", 60, "abcdefgh"));
        assert!(!ok("k", "", 60, "abcdefgh"));
        assert!(!ok("k", "s s", 60, "abcdefgh"));
        assert!(!ok("k", "s", 60, "abc"));
        assert!(!ok("k", "s", -1, "abcdefgh"));
        assert!(issue(&k, "k", "s", CredType::Essc, i64::MAX, 1, "abcdefgh").is_err());
    }

    #[test]
    fn random_jti_shape() {
        let a = random_jti(&mut rand_core::OsRng);
        let b = random_jti(&mut rand_core::OsRng);
        assert_eq!(a.len(), 16);
        assert!(valid_jti(&a) && valid_jti(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn keyring_rules() {
        let s = TestSigner::new(Alg::Ed25519, 1);
        let t = TestSigner::new(Alg::Sm2, 1);
        let keys = ring(vec![t.issuer("zz", 0, None), s.issuer("aa", 0, None)]);
        assert_eq!(keys.len(), 2);
        assert!(!keys.is_empty());
        assert_eq!(keys.kids().collect::<Vec<_>>(), ["aa", "zz"]);
        let dup = Keyring::new(vec![s.issuer("aa", 0, None), t.issuer("aa", 0, None)]);
        assert!(dup.is_err());
        let mut bad = s.issuer("aa", 0, None);
        bad.kid = "a a".into();
        assert!(Keyring::new(vec![bad]).is_err());
        assert!(ring(vec![]).is_empty());
    }

    #[test]
    fn reject_codes_and_details() {
        use Reject::*;
        for r in [
            Malformed,
            UnknownKid,
            KeyNotValid,
            BadSignature,
            LifetimeTooLong,
            NotYetValid,
            Expired,
            Replayed,
        ] {
            let want = match r {
                Expired => "QR_EXPIRED",
                Replayed => "QR_REPLAYED",
                _ => "QR_INVALID",
            };
            assert_eq!(r.code(), want);
            assert!(!r.detail().is_empty());
            assert_eq!(r.to_string(), r.detail());
        }
    }

    #[test]
    fn enum_names() {
        for a in ALGS {
            assert_eq!(Alg::parse(a.as_str()), Some(a));
        }
        assert_eq!(Alg::parse("SM2"), None);
        for t in [CredType::Essc, CredType::Ykm] {
            assert_eq!(CredType::parse(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_string(&t).expect("ser"),
                format!("\"{}\"", t.as_str())
            );
        }
        assert_eq!(CredType::parse("Essc"), None);
        let t: CredType = serde_json::from_str("\"ykm\"").expect("de");
        assert_eq!(t, CredType::Ykm);
    }

    /// Ed25519 tokens from two signers (kids "k1" and "k2"), each a fresh code, and their checks.
    fn ed_batch(n: usize) -> (Keyring, Vec<String>) {
        let (a, b) = (
            TestSigner::new(Alg::Ed25519, 1),
            TestSigner::new(Alg::Ed25519, 2),
        );
        let keys = ring(vec![a.issuer("k1", 0, None), b.issuer("k2", 0, None)]);
        let toks = (0..n)
            .map(|i| {
                let claims = json!({"sub": format!("card-{i}"), "typ": "essc", "iat": NOW,
                                    "exp": NOW + 60, "jti": format!("jti_{i:08}")});
                if i % 2 == 0 {
                    signed(&a, "k1", &claims)
                } else {
                    signed(&b, "k2", &claims)
                }
            })
            .collect();
        (keys, toks)
    }

    fn batch_verdicts(keys: &Keyring, toks: &[String]) -> Vec<bool> {
        let checks: Vec<Ed25519Check> = toks
            .iter()
            .map(|t| {
                open(t, keys, NOW)
                    .expect("opens")
                    .ed25519_check()
                    .expect("ed25519")
            })
            .collect();
        verify_ed25519_batch(&checks.iter().collect::<Vec<_>>())
    }

    /// The signature of `tok` with `f` applied to its 64 bytes.
    fn with_sig(tok: &str, f: impl FnOnce(&mut [u8; 64])) -> String {
        let (signed, sig_b64) = tok.rsplit_once('.').expect("dots");
        let mut sig: [u8; 64] = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .expect("b64")
            .try_into()
            .expect("64");
        f(&mut sig);
        format!("{signed}.{}", b64(sig))
    }

    #[test]
    fn a_batch_says_which_signatures_verify() {
        for n in [1, 2, 3, 8, 17] {
            let (keys, mut toks) = ed_batch(n);
            assert_eq!(batch_verdicts(&keys, &toks), vec![true; n], "{n} valid");
            // One bad signature: the batch fails and each is then checked alone.
            let bad = n / 2;
            toks[bad] = with_sig(&toks[bad], |s| s[40] ^= 1);
            let mut want = vec![true; n];
            want[bad] = false;
            assert_eq!(batch_verdicts(&keys, &toks), want, "{n} with one bad");
            // The verdicts agree with verifying each token on its own.
            for (t, w) in toks.iter().zip(&want) {
                assert_eq!(v(t, &keys, NOW).is_ok(), *w);
            }
        }
    }

    #[test]
    fn open_then_accept_is_verify() {
        let (s, keys, tok) = setup(Alg::Ed25519);
        let cases = [
            tok.clone(),
            with_sig(&tok, |s| s[0] ^= 1),
            signed(&s, "k1", &claims_json(NOW - 500, NOW - 440)),
            signed(&s, "k1", &claims_json(NOW, NOW + 500)),
            signed(&s, "k1", &claims_json(NOW + 100, NOW + 160)),
            "OC1.k1.e30.x".to_string(),
        ];
        for t in &cases {
            let via_parts = open(t, &keys, NOW).and_then(|o| {
                let ok = o.verify_signature();
                o.accept(ok, Rules::default(), NOW)
            });
            assert_eq!(via_parts, v(t, &keys, NOW));
        }
        // SM2 has no batch form.
        let (_, keys, tok) = setup(Alg::Sm2);
        assert!(open(&tok, &keys, NOW)
            .expect("opens")
            .ed25519_check()
            .is_none());
    }

    /// A small-order point added to R: strictly refused, and refused in a batch too, since it
    /// changes the hash the signature was made over (the argument in `verify_ed25519_batch`).
    #[test]
    fn a_signature_with_a_small_order_component_is_refused_alone_and_in_a_batch() {
        use curve25519_dalek::constants::EIGHT_TORSION;
        use curve25519_dalek::edwards::CompressedEdwardsY;
        let (keys, mut toks) = ed_batch(4);
        toks[1] = with_sig(&toks[1], |s| {
            let r = CompressedEdwardsY(s[..32].try_into().expect("32"))
                .decompress()
                .expect("R");
            s[..32].copy_from_slice((r + EIGHT_TORSION[1]).compress().as_bytes());
        });
        assert_eq!(v(&toks[1], &keys, NOW), Err(Reject::BadSignature));
        assert_eq!(batch_verdicts(&keys, &toks), vec![true, false, true, true]);
        // s + l (the group order): the same point, a second encoding; refused by both.
        let (keys, mut toks) = ed_batch(2);
        toks[0] = with_sig(&toks[0], |s| {
            let l = curve25519_dalek::Scalar::ZERO - curve25519_dalek::Scalar::ONE;
            let mut carry = 1u16; // l = (l - 1) + 1, added to s byte by byte
            let lm1 = l.to_bytes();
            for i in 0..32 {
                let sum = u16::from(s[32 + i]) + u16::from(lm1[i]) + carry;
                s[32 + i] = sum as u8;
                carry = sum >> 8;
            }
        });
        assert_eq!(v(&toks[0], &keys, NOW), Err(Reject::BadSignature));
        assert_eq!(batch_verdicts(&keys, &toks), vec![false, true]);
    }

    #[test]
    fn ed25519_keys_not_of_prime_order_are_refused() {
        use curve25519_dalek::constants::EIGHT_TORSION;
        let good = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let mixed = ed25519_dalek::VerifyingKey::from_bytes(
            (good.to_edwards() + EIGHT_TORSION[3]).compress().as_bytes(),
        )
        .expect("a point");
        let small = ed25519_dalek::VerifyingKey::from_bytes(EIGHT_TORSION[2].compress().as_bytes())
            .expect("a point");
        for vk in [mixed, small] {
            let pem = vk.to_public_key_pem(LineEnding::LF).expect("pem");
            let err =
                IssuerKey::from_public_pem("k1", Alg::Ed25519, &pem, 0, None).expect_err("refused");
            assert!(err.to_string().contains("prime order"), "{err}");
        }
        let pem = good.to_public_key_pem(LineEnding::LF).expect("pem");
        assert!(IssuerKey::from_public_pem("k1", Alg::Ed25519, &pem, 0, None).is_ok());
    }
}
