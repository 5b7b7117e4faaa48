//! Batch signatures: an HMAC over the exact body bytes with a per-sink key,
//! HMAC-SHA256 or HMAC-SM3 (GB/T 32905, for receivers that must use the
//! national algorithms). The receiver recomputes it to know the batch was
//! not altered on the way; the key never travels.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use sm3::Sm3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    HmacSha256,
    HmacSm3,
}

impl Algorithm {
    /// The name in the signature header: `<name>=<hex>`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::HmacSha256 => "hmac-sha256",
            Algorithm::HmacSm3 => "hmac-sm3",
        }
    }
}

/// A sink's signing key. `Debug` does not show it.
#[derive(Clone)]
pub struct Signer {
    algorithm: Algorithm,
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({}, key not shown)", self.algorithm.name())
    }
}

impl Signer {
    pub fn new(algorithm: Algorithm, key: Vec<u8>) -> Signer {
        assert!(!key.is_empty(), "a signing key is not empty");
        Signer { algorithm, key }
    }

    fn mac(&self, body: &[u8]) -> Vec<u8> {
        match self.algorithm {
            Algorithm::HmacSha256 => {
                let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
                m.update(body);
                m.finalize().into_bytes().to_vec()
            }
            Algorithm::HmacSm3 => {
                let mut m = Hmac::<Sm3>::new_from_slice(&self.key).expect("any key length");
                m.update(body);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    /// Checks a MAC in constant time (the `hmac` crate's own comparison).
    fn check(&self, body: &[u8], given: &[u8]) -> bool {
        match self.algorithm {
            Algorithm::HmacSha256 => {
                let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
                m.update(body);
                m.verify_slice(given).is_ok()
            }
            Algorithm::HmacSm3 => {
                let mut m = Hmac::<Sm3>::new_from_slice(&self.key).expect("any key length");
                m.update(body);
                m.verify_slice(given).is_ok()
            }
        }
    }

    /// The signature header value for `body`: `hmac-sha256=<64 hex>`.
    pub fn sign(&self, body: &[u8]) -> String {
        format!(
            "{}={}",
            self.algorithm.name(),
            crate::hex::encode(&self.mac(body))
        )
    }

    /// Whether `header` is this key's signature of `body` (compared in
    /// constant time; a header for another algorithm is simply wrong).
    pub fn verify(&self, body: &[u8], header: &str) -> bool {
        let Some((name, value)) = header.split_once('=') else {
            return false;
        };
        let Some(given) = crate::hex::decode(value) else {
            return false;
        };
        if name != self.algorithm.name() {
            return false;
        }
        self.check(body, &given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let s = Signer::new(Algorithm::HmacSha256, b"Jefe".to_vec());
        assert_eq!(
            s.sign(b"what do ya want for nothing?"),
            "hmac-sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signatures_verify_and_catch_any_change() {
        for algorithm in [Algorithm::HmacSha256, Algorithm::HmacSm3] {
            let s = Signer::new(algorithm, b"sink key".to_vec());
            let body = br#"{"batch_id":"transport-1-9","total_fen":1800}"#;
            let sig = s.sign(body);
            assert!(sig.starts_with(algorithm.name()));
            assert!(s.verify(body, &sig));
            assert!(!s.verify(br#"{"batch_id":"transport-1-9","total_fen":1900}"#, &sig));
            assert!(!Signer::new(algorithm, b"other key".to_vec()).verify(body, &sig));
            assert!(!s.verify(body, "nonsense"));
            assert!(!s.verify(body, &format!("{}=zz", algorithm.name())));
        }
        let a = Signer::new(Algorithm::HmacSha256, b"k".to_vec());
        let b = Signer::new(Algorithm::HmacSm3, b"k".to_vec());
        assert_ne!(a.sign(b"x"), b.sign(b"x"));
        assert!(
            !b.verify(b"x", &a.sign(b"x")),
            "the algorithm is part of the signature"
        );
        assert_eq!(format!("{a:?}"), "Signer(hmac-sha256, key not shown)");
    }
}
