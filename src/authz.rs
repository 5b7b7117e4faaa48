//! The decision core: a pure function from an event, a card snapshot, the
//! deny list, the scenario rules and `now` to a decision and a state change.
//!
//! It does no I/O, reads no clock and takes no lock: everything it needs is
//! handed in, which is what makes it table-testable and lets the caller
//! serialize per card around it. A decline is a value ([`Decision::Decline`]),
//! never an error: there is no way for this function to fail.

use crate::model::{Card, CardNo, CardStatus, Function, Reason, Scenario};

/// What one scenario requires and allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioRule {
    /// The function the card must have loaded, if any.
    pub function: Option<Function>,
    /// Whether the scenario moves money: then the amount counts against the
    /// daily cap and must not exceed `amount_max_fen`.
    pub charges: bool,
    /// The largest single amount approved in this scenario.
    pub amount_max_fen: i64,
}

/// The scenario rules and card-wide limits, built once from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: [ScenarioRule; Scenario::ALL.len()],
    pub card_daily_spend_max_fen: i64,
    pub day_offset_minutes: i32,
}

impl Policy {
    pub fn with_defaults(card_daily_spend_max_fen: i64, day_offset_minutes: i32) -> Policy {
        let mut rules = [ScenarioRule {
            function: None,
            charges: false,
            amount_max_fen: 0,
        }; Scenario::ALL.len()];
        for s in Scenario::ALL {
            rules[*s as usize] = crate::config::scenario_default(*s);
        }
        Policy {
            rules,
            card_daily_spend_max_fen,
            day_offset_minutes,
        }
    }

    pub fn rule(&self, s: Scenario) -> ScenarioRule {
        self.rules[s as usize]
    }

    pub fn set_rule(&mut self, s: Scenario, rule: ScenarioRule) {
        self.rules[s as usize] = rule;
    }

    /// The local calendar day that `now_unix` falls in, as days since the epoch.
    pub fn local_day(&self, now_unix: i64) -> i32 {
        let local = now_unix + i64::from(self.day_offset_minutes) * 60;
        local.div_euclid(86_400) as i32
    }
}

/// The part of a request the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub card_no: &'a CardNo,
    pub scenario: Scenario,
    pub amount_fen: i64,
}

/// Membership in the deny list, as the decision needs it.
pub trait DenySet {
    fn contains(&self, card: &CardNo) -> bool;

    /// Who listed the card. By default every entry is an operator's.
    fn listing(&self, card: &CardNo) -> Listing {
        if self.contains(card) {
            Listing::Operator
        } else {
            Listing::No
        }
    }
}

/// Why a card is on the deny list, as far as the answer's reason goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    No,
    /// By an operator, for reasons of their own (fraud, say): the answer
    /// says `DENYLISTED` whatever the card's status.
    Operator,
    /// By a card-life change (loss, freeze, cancellation, replacement),
    /// so that offline validators stop the card too: the card's own
    /// status names the reason.
    CardLife,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve { amount_fen: i64 },
    Decline(Reason),
}

impl Decision {
    pub fn reason(self) -> Reason {
        match self {
            Decision::Approve { .. } => Reason::Ok,
            Decision::Decline(r) => r,
        }
    }
    pub fn is_approve(self) -> bool {
        matches!(self, Decision::Approve { .. })
    }
    /// The amount charged: zero for a decline.
    pub fn amount_fen(self) -> i64 {
        match self {
            Decision::Approve { amount_fen } => amount_fen,
            Decision::Decline(_) => 0,
        }
    }
}

/// A decision and the card state to store with it (`None`: unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub card_after: Option<Card>,
}

/// Decides one event. The checks run in a fixed order and the first that
/// fails names the reason: the deny list first where an operator listed the
/// card (their "stop everywhere" switch, which may list cards this gateway
/// holds no state for), then a stopped card's status (its card-life deny
/// entry says less), existence, the scenario's function, and the amount
/// limits.
pub fn decide(
    event: Event<'_>,
    card: Option<&Card>,
    deny: &impl DenySet,
    policy: &Policy,
    now_unix: i64,
) -> Outcome {
    let decline = |r| Outcome {
        decision: Decision::Decline(r),
        card_after: None,
    };
    let listing = deny.listing(event.card_no);
    if listing == Listing::Operator {
        return decline(Reason::Denylisted);
    }
    // A card stopped by a card-life change is also listed (for offline
    // validators); its own status says more: CARD_LOST tells the counter
    // what to do.
    let status = card.and_then(|c| match c.status {
        CardStatus::Active => None,
        CardStatus::Lost => Some(Reason::CardLost),
        CardStatus::Frozen => Some(Reason::CardFrozen),
        CardStatus::Cancelled => Some(Reason::CardCancelled),
    });
    if let Some(reason) = status {
        return decline(reason);
    }
    if listing == Listing::CardLife {
        return decline(Reason::Denylisted);
    }
    let Some(card) = card else {
        return decline(Reason::CardNotFound);
    };
    let rule = policy.rule(event.scenario);
    if let Some(f) = rule.function {
        if !card.has_function(f) {
            return decline(Reason::FunctionNotEnabled);
        }
    }
    if !rule.charges || event.amount_fen == 0 {
        return Outcome {
            decision: Decision::Approve { amount_fen: 0 },
            card_after: None,
        };
    }
    if event.amount_fen > rule.amount_max_fen {
        return decline(Reason::LimitExceeded);
    }
    let day = policy.local_day(now_unix);
    let spent = card.spent_on(day);
    match spent.checked_add(event.amount_fen) {
        Some(total) if total <= policy.card_daily_spend_max_fen => {
            let after = Card {
                spent_day: day,
                spent_fen: total,
                ..*card
            };
            Outcome {
                decision: Decision::Approve {
                    amount_fen: event.amount_fen,
                },
                card_after: Some(after),
            }
        }
        _ => decline(Reason::LimitExceeded),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::model::Concession;

    impl DenySet for HashSet<CardNo> {
        fn contains(&self, card: &CardNo) -> bool {
            HashSet::contains(self, card)
        }
    }

    const NOW: i64 = 1_795_851_912; // 2026-11-28T07:45:12Z
    const CARD: &str = "500118A12345678";
    const DENIED: &str = "500118D00000001";

    fn policy() -> Policy {
        Policy::with_defaults(1_000, 480)
    }

    fn active(functions: &[Function]) -> Card {
        Card::new(CardStatus::Active, functions, &[Concession::Elderly])
    }

    struct Case {
        name: &'static str,
        card_no: &'static str,
        card: Option<Card>,
        scenario: Scenario,
        amount_fen: i64,
        want: Decision,
    }

    fn check(case: &Case) {
        let deny: HashSet<CardNo> = [CardNo::parse(DENIED).unwrap()].into_iter().collect();
        let card_no = CardNo::parse(case.card_no).unwrap();
        let event = Event {
            card_no: &card_no,
            scenario: case.scenario,
            amount_fen: case.amount_fen,
        };
        let out = decide(event, case.card.as_ref(), &deny, &policy(), NOW);
        assert_eq!(out.decision, case.want, "case {}", case.name);
        if !out.decision.is_approve() {
            assert_eq!(
                out.card_after, None,
                "a decline changes nothing: {}",
                case.name
            );
        }
    }

    #[test]
    fn every_reason_code() {
        let day = policy().local_day(NOW);
        let spent = |fen| Card {
            spent_day: day,
            spent_fen: fen,
            ..active(&[Function::Transit, Function::Financial])
        };
        let spent_yesterday = Card {
            spent_day: day - 1,
            spent_fen: 1_000,
            ..active(&[Function::Transit])
        };
        let status = |s| Card {
            status: s,
            ..active(&[Function::Transit])
        };
        let cases = [
            Case {
                name: "approve",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "unknown card",
                card_no: CARD,
                card: None,
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardNotFound),
            },
            Case {
                name: "deny-listed wins over a good card",
                card_no: DENIED,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::Denylisted),
            },
            Case {
                name: "deny-listed without state",
                card_no: DENIED,
                card: None,
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::Denylisted),
            },
            Case {
                name: "an operator's deny entry wins over a lost status",
                card_no: DENIED,
                card: Some(status(CardStatus::Lost)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::Denylisted),
            },
            Case {
                name: "lost",
                card_no: CARD,
                card: Some(status(CardStatus::Lost)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardLost),
            },
            Case {
                name: "frozen",
                card_no: CARD,
                card: Some(status(CardStatus::Frozen)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardFrozen),
            },
            Case {
                name: "cancelled",
                card_no: CARD,
                card: Some(status(CardStatus::Cancelled)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardCancelled),
            },
            Case {
                name: "medical needs medical",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Medical,
                amount_fen: 200,
                want: Decision::Decline(Reason::FunctionNotEnabled),
            },
            Case {
                name: "payment needs financial",
                card_no: CARD,
                card: Some(active(&[Function::Medical])),
                scenario: Scenario::Payment,
                amount_fen: 200,
                want: Decision::Decline(Reason::FunctionNotEnabled),
            },
            Case {
                name: "transit needs transit",
                card_no: CARD,
                card: Some(active(&[Function::Financial])),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::FunctionNotEnabled),
            },
            Case {
                name: "access needs no function",
                card_no: CARD,
                card: Some(active(&[])),
                scenario: Scenario::Access,
                amount_fen: 0,
                want: Decision::Approve { amount_fen: 0 },
            },
            Case {
                name: "over the per-transaction maximum",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 2_001,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "at the per-transaction maximum, over the cap",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 2_000,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "exactly reaches the daily cap",
                card_no: CARD,
                card: Some(spent(800)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "one fen over the daily cap",
                card_no: CARD,
                card: Some(spent(801)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "the cap counts across scenarios",
                card_no: CARD,
                card: Some(spent(900)),
                scenario: Scenario::Payment,
                amount_fen: 200,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "yesterday's spending does not count",
                card_no: CARD,
                card: Some(spent_yesterday),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "zero fare at the cap",
                card_no: CARD,
                card: Some(spent(1_000)),
                scenario: Scenario::Transit,
                amount_fen: 0,
                want: Decision::Approve { amount_fen: 0 },
            },
            Case {
                name: "non-charging scenario at the cap",
                card_no: CARD,
                card: Some(spent(1_000)),
                scenario: Scenario::Identity,
                amount_fen: 0,
                want: Decision::Approve { amount_fen: 0 },
            },
        ];
        for case in &cases {
            check(case);
        }
        // Every reason the core can produce is covered by the table (QR
        // and credential reasons come from the credential step, `REVERSED`
        // from the idempotency step, not from here).
        let covered: HashSet<Reason> = cases.iter().map(|c| c.want.reason()).collect();
        for r in Reason::ALL {
            let elsewhere = matches!(
                r,
                Reason::QrInvalid
                    | Reason::QrExpired
                    | Reason::QrReplayed
                    | Reason::Reversed
                    | Reason::CredentialUnbound
            );
            assert!(elsewhere || covered.contains(r), "no case for {r:?}");
        }
    }

    #[test]
    fn a_card_life_entry_lets_the_status_speak() {
        struct Life;
        impl DenySet for Life {
            fn contains(&self, _: &CardNo) -> bool {
                true
            }
            fn listing(&self, _: &CardNo) -> Listing {
                Listing::CardLife
            }
        }
        let card_no = CardNo::parse(CARD).unwrap();
        let event = Event {
            card_no: &card_no,
            scenario: Scenario::Transit,
            amount_fen: 200,
        };
        let cases = [
            (Some(CardStatus::Lost), Reason::CardLost),
            (Some(CardStatus::Frozen), Reason::CardFrozen),
            (Some(CardStatus::Cancelled), Reason::CardCancelled),
            (Some(CardStatus::Active), Reason::Denylisted),
            (None, Reason::Denylisted),
        ];
        for (st, want) in cases {
            let card = st.map(|s| Card {
                status: s,
                ..active(&[Function::Transit])
            });
            let got = decide(event, card.as_ref(), &Life, &policy(), NOW).decision;
            assert_eq!(got, Decision::Decline(want), "{st:?}");
        }
    }

    #[test]
    fn approval_updates_the_daily_counter() {
        let card_no = CardNo::parse(CARD).unwrap();
        let p = policy();
        let deny = HashSet::new();
        let mut card = active(&[Function::Transit]);
        for expected in [200, 400, 600, 800, 1_000] {
            let out = decide(
                Event {
                    card_no: &card_no,
                    scenario: Scenario::Transit,
                    amount_fen: 200,
                },
                Some(&card),
                &deny,
                &p,
                NOW,
            );
            card = out.card_after.expect("approval changes the counter");
            assert_eq!(card.spent_fen, expected);
        }
        let out = decide(
            Event {
                card_no: &card_no,
                scenario: Scenario::Transit,
                amount_fen: 200,
            },
            Some(&card),
            &deny,
            &p,
            NOW,
        );
        assert_eq!(out.decision, Decision::Decline(Reason::LimitExceeded));
    }

    #[test]
    fn local_day_turns_at_local_midnight() {
        let p = policy();
        // 2026-11-28T15:59:59Z is 23:59:59 in +08:00; one second later is the next day.
        let before = 1_795_881_599;
        assert_eq!(p.local_day(before) + 1, p.local_day(before + 1));
    }
}
