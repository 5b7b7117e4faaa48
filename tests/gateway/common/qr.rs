//! QR codes made the way an issuer would, straight with the crypto crates
//! (not through the gateway's `qr::issue`), so that a test of the gateway's
//! verification does not share code with what it verifies.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePublicKey;
use ed25519_dalek::Signer as _;
use serde_json::{json, Value};

pub enum TestKey {
    Ed25519(ed25519_dalek::SigningKey),
    Sm2(sm2::dsa::SigningKey),
}

impl TestKey {
    /// A fixed key per seed, so failures reproduce.
    pub fn ed25519(seed: u8) -> TestKey {
        TestKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    }

    pub fn sm2(seed: u8) -> TestKey {
        let mut bytes = [seed; 32];
        bytes[0] = 1; // below the curve order
        let sk = sm2::SecretKey::from_slice(&bytes).unwrap();
        TestKey::Sm2(sm2::dsa::SigningKey::new("1234567812345678", &sk).unwrap())
    }

    pub fn alg(&self) -> &'static str {
        match self {
            TestKey::Ed25519(_) => "ed25519",
            TestKey::Sm2(_) => "sm2",
        }
    }

    /// Writes the public key as an SPKI PEM file and returns its path.
    pub fn write_public(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let pem = match self {
            TestKey::Ed25519(k) => k
                .verifying_key()
                .to_public_key_pem(Default::default())
                .unwrap(),
            TestKey::Sm2(k) => sm2::PublicKey::from(k.verifying_key())
                .to_public_key_pem(Default::default())
                .unwrap(),
        };
        let path = dir.join(format!("{name}.pub.pem"));
        std::fs::write(&path, pem).unwrap();
        path
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            TestKey::Ed25519(k) => k.sign(msg).to_bytes().to_vec(),
            TestKey::Sm2(k) => {
                let s: sm2::dsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
        }
    }

    /// A signed token with these claims.
    pub fn token(&self, kid: &str, claims: &Value) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
        let signed = format!("OC1.{kid}.{payload}");
        let sig = URL_SAFE_NO_PAD.encode(self.sign(signed.as_bytes()));
        format!("{signed}.{sig}")
    }

    /// A token for `sub` issued at `iat`, living `ttl` seconds.
    pub fn code(&self, kid: &str, sub: &str, typ: &str, iat: i64, ttl: i64, jti: &str) -> String {
        self.token(
            kid,
            &json!({"sub": sub, "typ": typ, "iat": iat, "exp": iat + ttl, "jti": jti}),
        )
    }
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn scan(event_id: &str, qr: &str, scenario: &str, amount: i64) -> Value {
    json!({
        "event_id": event_id,
        "kind": "scan",
        "qr": qr,
        "scenario": scenario,
        "amount_fen": amount,
        "site": "counter-3",
    })
}
