//! Card applications (申领): where one may be filed, the states it goes
//! through, which step is allowed from which state, and what a new card
//! is entitled to from its holder's age and disability. Pure and
//! table-tested; the gateway journals every change with who made it.
//!
//! An application runs `submitted → approved → produced →
//! ready_for_pickup → issued`, or ends `rejected` (by the issuer, before
//! production) or `withdrawn` (by the resident, before the card is
//! handed over). A counter that prints the card on the spot (即时制卡)
//! takes it from `submitted` straight to `issued` in one step. Repeating
//! the step that led to the current state changes nothing, so that a
//! retried request is harmless; anything else out of order is refused
//! with the reason.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{string_enum, Concession};

string_enum!(
    /// Where an application was filed: a government service hall, a
    /// partner bank's branch, the resident's own online channel, or a
    /// partner province's channel (跨省通办).
    Channel {
        ServiceHall = "service_hall",
        BankBranch = "bank_branch",
        Online = "online",
        PartnerProvince = "partner_province",
    }
);

string_enum!(
    /// Where an application stands.
    AppState {
        Submitted = "submitted",
        Approved = "approved",
        Produced = "produced",
        ReadyForPickup = "ready_for_pickup",
        Issued = "issued",
        Rejected = "rejected",
        Withdrawn = "withdrawn",
    }
);

string_enum!(
    /// A change to an application. `instant_issue` is the counter that
    /// prints the card while the resident waits.
    AppStep {
        Approve = "approve",
        Produce = "produce",
        ReadyForPickup = "ready_for_pickup",
        Issue = "issue",
        InstantIssue = "instant_issue",
        Reject = "reject",
        Withdraw = "withdraw",
    }
);

string_enum!(
    /// Who is served first (优先服务).
    Priority {
        Elderly = "elderly",
        Disabled = "disabled",
    }
);

string_enum!(
    /// A first card, or one that replaces a card (lost, damaged): the
    /// replaced card is cancelled and deny-listed when the new one is
    /// issued.
    AppKind {
        New = "new",
        Replacement = "replacement",
    }
);

string_enum!(
    /// How a proxy (代办) is related to the holder they apply for.
    ProxyRelation {
        Spouse = "spouse",
        Child = "child",
        Parent = "parent",
        Sibling = "sibling",
        Relative = "relative",
        Guardian = "guardian",
        Caregiver = "caregiver",
    }
);

impl AppState {
    /// No step leaves it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            AppState::Issued | AppState::Rejected | AppState::Withdrawn
        )
    }
}

/// The state after `step` from `state`, or why the step is refused. The
/// step that led to `state` is allowed again and leaves it as it is.
pub fn next(step: AppStep, state: AppState) -> Result<AppState, &'static str> {
    use AppState::*;
    use AppStep::*;
    let target = match step {
        Approve => Approved,
        Produce => Produced,
        AppStep::ReadyForPickup => AppState::ReadyForPickup,
        Issue | InstantIssue => Issued,
        Reject => Rejected,
        Withdraw => Withdrawn,
    };
    if state == target && !(step == InstantIssue && state == Issued) {
        return Ok(state);
    }
    match (step, state) {
        (_, Issued) => Err("the card was issued: the application is closed"),
        (_, Rejected) => Err("the application was rejected: file a new one"),
        (_, Withdrawn) => Err("the application was withdrawn: file a new one"),
        (Approve, Submitted)
        | (Produce, Approved)
        | (AppStep::ReadyForPickup, Produced)
        | (Issue, AppState::ReadyForPickup)
        | (InstantIssue, Submitted | Approved)
        | (Reject, Submitted | Approved)
        | (Withdraw, Submitted | Approved | Produced | AppState::ReadyForPickup) => Ok(target),
        (Approve, _) => Err("only a submitted application can be approved"),
        (Produce, _) => Err("only an approved application can go to production"),
        (AppStep::ReadyForPickup, _) => Err("only a produced card can be made ready for pickup"),
        (Issue, _) => Err("only a card ready for pickup can be issued"),
        (InstantIssue, _) => Err(
            "instant issuance is for an application not yet in production; this card is being produced",
        ),
        (Reject, _) => Err("an application in production can no longer be rejected"),
    }
}

/// The holder's birth date in an 18-character ID number (digits 7 to 14,
/// `YYYYMMDD`), if it is a real date.
pub fn birth_date(normalized_id: &str) -> Option<time::Date> {
    let d = normalized_id.get(6..14)?;
    if !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = d[..4].parse().ok()?;
    let month: u8 = d[4..6].parse().ok()?;
    let day: u8 = d[6..8].parse().ok()?;
    let month = time::Month::try_from(month).ok()?;
    time::Date::from_calendar_date(year, month, day).ok()
}

/// Whole years from `born` to `on`.
pub fn age_on(born: time::Date, on: time::Date) -> u32 {
    let mut years = on.year() - born.year();
    if (on.month() as u8, on.day()) < (born.month() as u8, born.day()) {
        years -= 1;
    }
    years.max(0) as u32
}

/// The concessions a new card gets: `elderly` from `elderly_age`, and
/// `disabled` for a holder whose disability certificate the counter
/// checked. Others (student, veteran, low income) need their own proof
/// and are given by an operator's card change, not here.
pub fn concessions_for(age: u32, elderly_age: u32, disabled: bool) -> Vec<Concession> {
    let mut out = Vec::new();
    if age >= elderly_age {
        out.push(Concession::Elderly);
    }
    if disabled {
        out.push(Concession::Disabled);
    }
    out
}

/// Whether an application has waited in `state` longer than the service
/// promise of its channel (`promise_days` for a state a resident waits in;
/// final states never do).
pub fn is_overdue(state: AppState, since_ms: i64, now_ms: i64, promise_days: u32) -> bool {
    !state.is_final() && now_ms - since_ms > i64::from(promise_days) * 86_400_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use AppState::*;

    #[test]
    fn each_step_from_each_state() {
        // (step, from, expected state or refused)
        let ok = |s| Some(s);
        let table: &[(AppStep, AppState, Option<AppState>)] = &[
            (AppStep::Approve, Submitted, ok(Approved)),
            (AppStep::Approve, Approved, ok(Approved)),
            (AppStep::Approve, Produced, None),
            (AppStep::Produce, Submitted, None),
            (AppStep::Produce, Approved, ok(Produced)),
            (AppStep::Produce, Produced, ok(Produced)),
            (AppStep::ReadyForPickup, Approved, None),
            (AppStep::ReadyForPickup, Produced, ok(ReadyForPickup)),
            (AppStep::ReadyForPickup, ReadyForPickup, ok(ReadyForPickup)),
            (AppStep::Issue, Produced, None),
            (AppStep::Issue, ReadyForPickup, ok(Issued)),
            (AppStep::Issue, Issued, ok(Issued)),
            (AppStep::InstantIssue, Submitted, ok(Issued)),
            (AppStep::InstantIssue, Approved, ok(Issued)),
            (AppStep::InstantIssue, Produced, None),
            // An issued card is not printed a second time.
            (AppStep::InstantIssue, Issued, None),
            (AppStep::Reject, Submitted, ok(Rejected)),
            (AppStep::Reject, Approved, ok(Rejected)),
            (AppStep::Reject, Produced, None),
            (AppStep::Reject, Rejected, ok(Rejected)),
            (AppStep::Withdraw, Submitted, ok(Withdrawn)),
            (AppStep::Withdraw, ReadyForPickup, ok(Withdrawn)),
            (AppStep::Withdraw, Withdrawn, ok(Withdrawn)),
            (AppStep::Withdraw, Issued, None),
            (AppStep::Approve, Rejected, None),
            (AppStep::Produce, Withdrawn, None),
        ];
        for &(step, from, want) in table {
            assert_eq!(next(step, from).ok(), want, "{step} from {from}");
        }
        for &s in AppState::ALL {
            if s.is_final() {
                for &step in AppStep::ALL {
                    let r = next(step, s);
                    assert!(r.is_err() || r == Ok(s), "{step} from {s} reopens it");
                }
            }
        }
    }

    #[test]
    fn birth_date_age_and_concessions() {
        let born = birth_date("11010519491231002X").unwrap();
        assert_eq!(
            born,
            time::Date::from_calendar_date(1949, time::Month::December, 31).unwrap()
        );
        assert_eq!(birth_date("110105194913310021"), None, "month 13");
        assert_eq!(birth_date("1101"), None);
        let on = |y, m, d| time::Date::from_calendar_date(y, m, d).unwrap();
        assert_eq!(age_on(born, on(2009, time::Month::December, 30)), 59);
        assert_eq!(age_on(born, on(2009, time::Month::December, 31)), 60);
        assert_eq!(age_on(born, on(1940, time::Month::January, 1)), 0);
        assert_eq!(concessions_for(60, 60, false), vec![Concession::Elderly]);
        assert_eq!(concessions_for(59, 60, false), Vec::<Concession>::new());
        assert_eq!(
            concessions_for(75, 60, true),
            vec![Concession::Elderly, Concession::Disabled]
        );
    }

    #[test]
    fn overdue_only_past_the_promise_and_never_when_closed() {
        let day = 86_400_000;
        assert!(!is_overdue(Submitted, 0, 3 * day, 3));
        assert!(is_overdue(Submitted, 0, 3 * day + 1, 3));
        assert!(!is_overdue(Issued, 0, 30 * day, 3));
        assert!(!is_overdue(Withdrawn, 0, 30 * day, 3));
    }
}
