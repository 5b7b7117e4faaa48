//! Personal ID numbers (身份证号): checked, then kept only as a keyed hash.
//!
//! An operator may give a resident's ID number to find their card. The
//! clear number lives only in that request: it is validated here, hashed
//! with HMAC-SHA256 under a key from the config, and only the hash is
//! stored (`persons`, `profiles`) or compared. A keyed hash rather than a
//! plain one because ID numbers are few enough (region, birth date,
//! sequence) to be guessed by brute force from an unkeyed hash.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a string is not a personal ID number. Never contains the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be 18 characters: 17 digits and a check character (0-9 or X)")]
    Shape,
    #[error("the check character does not match (mistyped digit?)")]
    Checksum,
}

/// Validates an 18-character resident ID number (GB 11643-1999): 17
/// digits and the ISO 7064 MOD 11-2 check character. A lower-case `x` is
/// taken as `X`. Returns the normalized number.
pub fn normalize(id: &str) -> Result<String, IdError> {
    let b = id.trim().as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return Err(IdError::Shape);
    }
    let check = b[17].to_ascii_uppercase();
    if !(check.is_ascii_digit() || check == b'X') {
        return Err(IdError::Shape);
    }
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = b[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    let expected = b"10X98765432"[(sum % 11) as usize];
    if check != expected {
        return Err(IdError::Checksum);
    }
    let mut out = String::from_utf8_lossy(&b[..17]).into_owned();
    out.push(char::from(check));
    Ok(out)
}

/// The keyed hash of a normalized ID number, as 64 hex digits.
pub fn id_hash(key: &[u8], normalized: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(b"onecard-personal-id\0");
    mac.update(normalized.as_bytes());
    let digest = mac.finalize().into_bytes();
    crate::hex::encode(&digest)
}

/// `110105********123X`: region kept, birth date and most of the rest hidden.
pub fn mask_id(normalized: &str) -> String {
    let n = normalized.chars().count();
    normalized
        .chars()
        .enumerate()
        .map(|(i, c)| if i < 6 || i + 4 >= n { c } else { '*' })
        .collect()
}

/// A holder's name as it may be kept and shown: the first character and
/// one `*` per other character ("张三丰" → "张**"); `None` for a name that
/// is empty, longer than 64 characters or holds control characters. The
/// name in the clear is never stored.
pub fn mask_name(name: &str) -> Option<String> {
    let name = name.trim();
    let n = name.chars().count();
    if n == 0 || n > 64 || name.chars().any(char::is_control) {
        return None;
    }
    let mut out = String::with_capacity(name.len());
    out.extend(name.chars().take(1));
    out.extend(std::iter::repeat_n('*', n - 1));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_masked() {
        let cases = [
            ("张三丰", Some("张**")),
            ("李四", Some("李*")),
            ("王", Some("王")),
            (" Wang Fang ", Some("W********")),
            ("", None),
            ("a\nb", None),
        ];
        for (name, want) in cases {
            assert_eq!(mask_name(name).as_deref(), want, "{name:?}");
        }
    }

    #[test]
    fn id_numbers_are_checked() {
        // A made-up number with a correct check character.
        assert_eq!(
            normalize("11010519491231002X"),
            Ok("11010519491231002X".into())
        );
        assert_eq!(
            normalize("11010519491231002x"),
            Ok("11010519491231002X".into())
        );
        assert_eq!(normalize("110105194912310021"), Err(IdError::Checksum));
        assert_eq!(normalize("1101051949123100"), Err(IdError::Shape));
        assert_eq!(normalize("1101051949123100AX"), Err(IdError::Shape));
        assert_eq!(normalize("11010519491231002Y"), Err(IdError::Shape));
    }

    #[test]
    fn hashes_are_keyed_and_never_the_number() {
        let a = id_hash(b"key-one-0123456789", "11010519491231002X");
        let b = id_hash(b"key-two-0123456789", "11010519491231002X");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(!a.contains("19491231"));
        assert_eq!(mask_id("11010519491231002X"), "110105********002X");
    }
}
