//! Card life: which change (loss report, lift, freeze, unfreeze,
//! cancellation) is allowed from which status, and what it does to the
//! deny list. Pure and table-tested; the gateway makes each change durable.
//!
//! Stopping a card also deny-lists it, so that validators running offline
//! stop it as soon as they sync. Those entries carry the reasons of
//! [`crate::deny`]; lifting a loss or a freeze removes only an entry with
//! one of them, never one an operator added for reasons of their own
//! (fraud, say).

use crate::deny::{is_life_reason, DENY_CANCELLED, DENY_FROZEN, DENY_LOST};
use crate::model::CardStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifeOp {
    ReportLoss,
    LiftLoss,
    Freeze,
    Unfreeze,
    Cancel,
}

impl LifeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            LifeOp::ReportLoss => "report_loss",
            LifeOp::LiftLoss => "lift_loss",
            LifeOp::Freeze => "freeze",
            LifeOp::Unfreeze => "unfreeze",
            LifeOp::Cancel => "cancel",
        }
    }
}

/// What a change does to the deny list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyEffect {
    Keep,
    Add(&'static str),
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub status: CardStatus,
    pub deny: DenyEffect,
}

/// The status after `op` and what happens to the deny list, given the
/// card's status and its deny-list entry's reason (if listed); or why the
/// change is refused. Repeating a change that is already in effect is
/// allowed and changes nothing, so that a retried request is harmless.
pub fn transition(
    op: LifeOp,
    status: CardStatus,
    listed: Option<&str>,
) -> Result<Transition, &'static str> {
    use CardStatus::*;
    // Stopping: list the card unless an operator's own entry already does.
    let stop = |status, reason| Transition {
        status,
        deny: match listed {
            Some(r) if !is_life_reason(r) || r == reason => DenyEffect::Keep,
            _ => DenyEffect::Add(reason),
        },
    };
    // Resuming: remove only an entry a card-life change put there.
    let resume = Transition {
        status: Active,
        deny: match listed {
            Some(r) if is_life_reason(r) => DenyEffect::Remove,
            _ => DenyEffect::Keep,
        },
    };
    match (op, status) {
        (_, Cancelled) if op != LifeOp::Cancel => {
            Err("the card is cancelled; issue or use its replacement")
        }
        (LifeOp::ReportLoss, Active | Frozen | Lost) => Ok(stop(Lost, DENY_LOST)),
        (LifeOp::LiftLoss, Lost) => Ok(resume),
        // A card made active by other means (a card PUT or an import) that
        // is still listed for its loss: lifting clears the entry.
        (LifeOp::LiftLoss, Active) if listed == Some(DENY_LOST) => Ok(resume),
        (LifeOp::LiftLoss, _) => Err("the card is not reported lost"),
        (LifeOp::Freeze, Active | Frozen) => Ok(stop(Frozen, DENY_FROZEN)),
        (LifeOp::Freeze, Lost) => Err("the card is reported lost; freezing adds nothing"),
        (LifeOp::Unfreeze, Frozen) => Ok(resume),
        (LifeOp::Unfreeze, Active) => Ok(Transition {
            status: Active,
            deny: match listed {
                Some(DENY_FROZEN) => DenyEffect::Remove,
                _ => DenyEffect::Keep,
            },
        }),
        (LifeOp::Unfreeze, Lost) => Err("the card is reported lost: lift the loss report instead"),
        (LifeOp::Cancel, _) => Ok(stop(Cancelled, DENY_CANCELLED)),
        (_, Cancelled) => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CardStatus::*;
    use LifeOp::*;

    #[test]
    fn transitions() {
        let ok = |status, deny| Ok(Transition { status, deny });
        type Case<'a> = (
            LifeOp,
            CardStatus,
            Option<&'a str>,
            Result<Transition, &'a str>,
        );
        let cases: &[Case] = &[
            (
                ReportLoss,
                Active,
                None,
                ok(Lost, DenyEffect::Add(DENY_LOST)),
            ),
            (
                ReportLoss,
                Frozen,
                Some(DENY_FROZEN),
                ok(Lost, DenyEffect::Add(DENY_LOST)),
            ),
            (
                ReportLoss,
                Lost,
                Some(DENY_LOST),
                ok(Lost, DenyEffect::Keep),
            ),
            // An operator's own entry stays as it is.
            (
                ReportLoss,
                Active,
                Some("fraud"),
                ok(Lost, DenyEffect::Keep),
            ),
            (
                ReportLoss,
                Cancelled,
                None,
                Err("the card is cancelled; issue or use its replacement"),
            ),
            (
                LiftLoss,
                Lost,
                Some(DENY_LOST),
                ok(Active, DenyEffect::Remove),
            ),
            (LiftLoss, Lost, Some("fraud"), ok(Active, DenyEffect::Keep)),
            (LiftLoss, Active, None, Err("the card is not reported lost")),
            (
                LiftLoss,
                Active,
                Some(DENY_LOST),
                ok(Active, DenyEffect::Remove),
            ),
            (
                LiftLoss,
                Active,
                Some("fraud"),
                Err("the card is not reported lost"),
            ),
            (
                Unfreeze,
                Active,
                Some(DENY_FROZEN),
                ok(Active, DenyEffect::Remove),
            ),
            (
                Freeze,
                Active,
                None,
                ok(Frozen, DenyEffect::Add(DENY_FROZEN)),
            ),
            (
                Freeze,
                Frozen,
                Some(DENY_FROZEN),
                ok(Frozen, DenyEffect::Keep),
            ),
            (
                Freeze,
                Lost,
                Some(DENY_LOST),
                Err("the card is reported lost; freezing adds nothing"),
            ),
            (
                Unfreeze,
                Frozen,
                Some(DENY_FROZEN),
                ok(Active, DenyEffect::Remove),
            ),
            (Unfreeze, Active, None, ok(Active, DenyEffect::Keep)),
            (
                Unfreeze,
                Lost,
                Some(DENY_LOST),
                Err("the card is reported lost: lift the loss report instead"),
            ),
            (
                Cancel,
                Lost,
                Some(DENY_LOST),
                ok(Cancelled, DenyEffect::Add(DENY_CANCELLED)),
            ),
            (
                Cancel,
                Active,
                Some("fraud"),
                ok(Cancelled, DenyEffect::Keep),
            ),
            (
                Cancel,
                Cancelled,
                Some(DENY_CANCELLED),
                ok(Cancelled, DenyEffect::Keep),
            ),
            (
                Freeze,
                Cancelled,
                None,
                Err("the card is cancelled; issue or use its replacement"),
            ),
        ];
        for (op, status, listed, want) in cases {
            assert_eq!(
                transition(*op, *status, *listed),
                *want,
                "{op:?} {status:?} {listed:?}"
            );
        }
    }
}
