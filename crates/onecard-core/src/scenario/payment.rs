//! Public payments: water, power and gas bills, traffic fines, taxes,
//! housing provident fund. They debit the card's financial account
//! (function `financial`, the scenario's default) and carry the bill's
//! reference (`bill_ref`), which is recorded and settled to the payment
//! sink with the charge, so the biller can match it. A counter that pays
//! a bill twice under two event ids pays twice: the bill reference is the
//! biller's to reconcile, the event id is the gateway's idempotency key.

use serde::Deserialize;

/// `[payment]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentConfig {
    /// Whether a payment must carry `bill_ref` (off by default, so that
    /// terminals written before it existed keep working).
    pub bill_ref_required: bool,
}

/// A bill reference: 1 to 64 of `A-Za-z0-9._:/-`.
pub fn valid_bill_ref(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bill_refs() {
        for good in [
            "WATER-2026-11-000123",
            "fine:渝A".get(..5).unwrap(),
            "tax/2026/Q4",
        ] {
            assert!(valid_bill_ref(good), "{good}");
        }
        for bad in ["", "a b", "fine:渝A12345", &"x".repeat(65)] {
            assert!(!valid_bill_ref(bad), "{bad}");
        }
    }
}
