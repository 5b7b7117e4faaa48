//! Health status: a tap or scan shows the status colour and the
//! vaccination flag kept for the card, with when they were reported, and
//! nothing else: no test results, no dates of illness, no name. A card
//! with no report shows `unknown`. Pure.

use serde::Serialize;

use crate::model::{Card, HealthColour};

/// What a health check shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attestation {
    pub colour: HealthColour,
    pub vaccinated: bool,
    /// RFC 3339 UTC of the last report; absent when there was none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

pub fn attest(card: &Card) -> Attestation {
    let h = card.health;
    Attestation {
        colour: h.colour,
        vaccinated: h.vaccinated,
        updated_at: (h.updated_s > 0).then(|| crate::time::rfc3339_ms(h.updated_s * 1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CardStatus, Health};

    #[test]
    fn only_colour_flag_and_time() {
        let mut card = Card::new(CardStatus::Active, &[], &[]);
        assert_eq!(
            serde_json::to_value(attest(&card)).unwrap(),
            serde_json::json!({"colour": "unknown", "vaccinated": false})
        );
        card.health = Health {
            colour: HealthColour::Green,
            vaccinated: true,
            updated_s: 1_795_851_912,
        };
        assert_eq!(
            serde_json::to_value(attest(&card)).unwrap(),
            serde_json::json!({"colour": "green", "vaccinated": true, "updated_at": "2026-11-28T07:45:12Z"})
        );
    }
}
