//! Complaints linked to transactions (投诉处理联动机制): what a resident
//! complains about, how a complaint is closed, and which closing fits the
//! transaction it is about. Pure and table-tested; the gateway keeps each
//! complaint with every step, and never deletes one.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::string_enum;

string_enum!(
    /// What the resident says went wrong.
    Category {
        WrongCharge = "wrong_charge",
        CardRefused = "card_refused",
        LostCard = "lost_card",
        Service = "service",
    }
);

string_enum!(
    /// How a complaint is closed: money given back through the reversal
    /// path, an explanation of why it was right, or a referral to the
    /// unit that can act.
    Outcome {
        Refund = "refund",
        Explanation = "explanation",
        Referral = "referral",
    }
);

string_enum!(
    ComplaintState {
        Open = "open",
        Closed = "closed",
    }
);

/// What a closing needs to know of the transaction complained about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charged {
    /// It was approved and charged this many fen.
    pub charged_fen: i64,
    /// A reversal of it is already in the journal.
    pub reversed: bool,
}

/// Whether `outcome` may close a complaint about `tx` (`None`: about no
/// transaction), or why not.
pub fn may_close(outcome: Outcome, tx: Option<Charged>) -> Result<(), &'static str> {
    match (outcome, tx) {
        (Outcome::Refund, None) => {
            Err("a refund gives back a transaction's charge; this complaint names no transaction")
        }
        (Outcome::Refund, Some(t)) if t.charged_fen <= 0 => {
            Err("the transaction charged nothing: there is nothing to refund")
        }
        (Outcome::Refund, Some(t)) if t.reversed => {
            Err("the transaction was reversed already: its charge was given back")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refund_needs_a_charge_not_yet_given_back() {
        let charged = |fen, reversed| {
            Some(Charged {
                charged_fen: fen,
                reversed,
            })
        };
        let table: &[(Outcome, Option<Charged>, bool)] = &[
            (Outcome::Refund, charged(200, false), true),
            (Outcome::Refund, charged(0, false), false),
            (Outcome::Refund, charged(200, true), false),
            (Outcome::Refund, None, false),
            (Outcome::Explanation, None, true),
            (Outcome::Explanation, charged(200, true), true),
            (Outcome::Referral, charged(0, false), true),
        ];
        for &(outcome, tx, ok) in table {
            assert_eq!(may_close(outcome, tx).is_ok(), ok, "{outcome} {tx:?}");
        }
    }
}
