//! The gateway's vocabulary: card numbers, scenarios, card state, reasons.
//!
//! Everything here is plain data with validation at construction, so that the
//! rest of the code can take a `CardNo` or a `Scenario` and know it is well
//! formed. This module does no I/O. The one rule it enforces everywhere: a
//! card number is shown to humans only through [`CardNo::masked`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// Card numbers are at most this long (API.md).
pub const CARD_NO_LEN_MAX: usize = 32;
/// Card numbers are at least this long (API.md).
pub const CARD_NO_LEN_MIN: usize = 8;

/// A validated card number: 8 to 32 of `0-9A-Z`, the first six are digits
/// (the issuing region). Its `Debug` and `Display` are masked so that it can
/// never reach a log line in the clear by accident.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardNo(Box<str>);

/// Why a string is not a card number. The messages never contain the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CardNoError {
    #[error("must be 8 to 32 characters long")]
    Length,
    #[error("must contain only the characters 0-9 and A-Z")]
    Charset,
    #[error("must start with the six digits of the issuing region")]
    Region,
}

impl CardNo {
    pub fn parse(s: &str) -> Result<CardNo, CardNoError> {
        let b = s.as_bytes();
        if b.len() < CARD_NO_LEN_MIN || b.len() > CARD_NO_LEN_MAX {
            return Err(CardNoError::Length);
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        {
            return Err(CardNoError::Charset);
        }
        if !b[..6].iter().all(|c| c.is_ascii_digit()) {
            return Err(CardNoError::Region);
        }
        Ok(CardNo(s.into()))
    }

    /// The number in the clear: for storage keys and the admin API only.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The issuing region: the first six digits.
    #[inline]
    pub fn region(&self) -> &str {
        &self.0[..6]
    }

    /// First six and last four characters kept, the rest replaced by `*`.
    pub fn masked(&self) -> String {
        mask_card_no(&self.0)
    }
}

/// Masks any card-number-like string (first 6 and last 4 kept). Strings of
/// ten characters or fewer are masked whole except the first two, so that a
/// short, invalid number is not revealed either.
pub fn mask_card_no(s: &str) -> String {
    let n = s.chars().count();
    if n <= 10 {
        let keep: String = s.chars().take(2).collect();
        return format!("{keep}{}", "*".repeat(n.saturating_sub(2)));
    }
    let head: String = s.chars().take(6).collect();
    let tail: String = s.chars().skip(n - 4).collect();
    format!("{head}{}{tail}", "*".repeat(n - 10))
}

impl fmt::Debug for CardNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardNo({})", self.masked())
    }
}

impl fmt::Display for CardNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// A card number inside a record, as stored and sent downstream: in the
/// clear on disk and on the wire to the booking systems (they book by
/// card), masked by `Debug` and `Display`, so that a record formatted
/// with `{:?}` into a log line never carries it in the clear. Not
/// validated: empty where a record names no card.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoredCardNo(String);

impl StoredCardNo {
    pub fn new(s: impl Into<String>) -> StoredCardNo {
        StoredCardNo(s.into())
    }
    /// The number in the clear: for storage keys, settlement lines and
    /// the admin API only.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The number as a [`CardNo`], if it is a valid one.
    pub fn card_no(&self) -> Option<CardNo> {
        CardNo::parse(&self.0).ok()
    }
}

impl std::ops::Deref for StoredCardNo {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for StoredCardNo {
    fn from(s: &str) -> StoredCardNo {
        StoredCardNo(s.to_owned())
    }
}

impl From<String> for StoredCardNo {
    fn from(s: String) -> StoredCardNo {
        StoredCardNo(s)
    }
}

impl From<&CardNo> for StoredCardNo {
    fn from(c: &CardNo) -> StoredCardNo {
        StoredCardNo(c.as_str().to_owned())
    }
}

impl PartialEq<str> for StoredCardNo {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for StoredCardNo {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Debug for StoredCardNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoredCardNo({})", mask_card_no(&self.0))
    }
}

impl fmt::Display for StoredCardNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_card_no(&self.0))
    }
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            #[inline]
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }

            /// The accepted spellings, for error messages.
            pub fn expected() -> String {
                let all: &[&str] = &[$($text),+];
                all.join(", ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;

string_enum!(
    /// Where a card is used; each scenario has its own rules in the config.
    Scenario {
        Transit = "transit",
        Medical = "medical",
        Culture = "culture",
        Access = "access",
        Payment = "payment",
        Identity = "identity",
        Health = "health",
    }
);

string_enum!(
    /// A function loaded on a card: a scenario may require one.
    Function {
        Transit = "transit",
        Medical = "medical",
        Financial = "financial",
        Culture = "culture",
        Access = "access",
        Identity = "identity",
        Health = "health",
    }
);

string_enum!(
    /// A concession the card holder is entitled to (used by fare rules).
    Concession {
        Elderly = "elderly",
        Disabled = "disabled",
        Student = "student",
        Veteran = "veteran",
        LowIncome = "low_income",
    }
);

string_enum!(
    /// A card's life-cycle status.
    CardStatus {
        Active = "active",
        Lost = "lost",
        Frozen = "frozen",
        Cancelled = "cancelled",
    }
);

string_enum!(
    /// The event kind: a contactless tap or a QR scan.
    EventKind {
        Tap = "tap",
        Scan = "scan",
    }
);

/// A small set of enum values stored as bits, so that a card snapshot is
/// `Copy` and the hot path never allocates to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitSet(u16);

impl BitSet {
    pub fn contains(self, bit: usize) -> bool {
        self.0 & (1 << bit) != 0
    }
    pub fn insert(&mut self, bit: usize) {
        self.0 |= 1 << bit;
    }
}

macro_rules! bit_index {
    ($name:ident) => {
        impl $name {
            pub fn bit(self) -> usize {
                $name::ALL.iter().position(|v| *v == self).unwrap_or(0)
            }
        }
    };
}
bit_index!(Function);
bit_index!(Concession);

/// A card as the decision core sees it: status, functions, concessions and
/// the counters that limits are checked against. `Copy` on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Card {
    pub status: CardStatus,
    pub functions: BitSet,
    pub concessions: BitSet,
    /// The local calendar day (days since 1970-01-01 in the configured
    /// offset) that `spent_fen` counts for.
    pub spent_day: i32,
    /// Fen approved on `spent_day`, over all charging scenarios.
    pub spent_fen: i64,
    /// Transit: the last boarding, the journey it belongs to, fare caps.
    pub transit: TransitState,
    /// Culture and tourism: approved entries, ever.
    pub visits: u32,
    /// Health status as last reported for this card.
    pub health: Health,
    /// Medical: the local calendar year `deductible_used_fen` counts for,
    /// and what of the annual deductible the card has used in it.
    pub medical_year: i32,
    pub deductible_used_fen: i64,
}

/// What the transit rules remember of a card between taps (stored as it
/// is, in the card record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitState {
    /// Where the last approved boarding was (a hash of its site), and when
    /// (unix seconds): anti-passback.
    pub place: u64,
    pub tap_s: i64,
    /// When the journey the last boarding belongs to began, and how many
    /// boardings it has had: transfers.
    pub journey_s: i64,
    pub legs: u8,
    /// Transit fares of `day` and of `week` (days since the epoch, weeks
    /// starting on Monday): fare caps.
    pub day: i32,
    pub day_fen: i64,
    pub week: i32,
    pub week_fen: i64,
}

string_enum!(
    /// A health status colour as the health authority reports it; `unknown`
    /// when none has been reported for the card.
    HealthColour {
        Unknown = "unknown",
        Green = "green",
        Yellow = "yellow",
        Red = "red",
    }
);

/// The health status kept per card: a colour, a vaccination flag and when
/// they were last reported. Nothing else is kept or shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub colour: HealthColour,
    pub vaccinated: bool,
    /// Unix seconds of the last report; 0 when there was none.
    pub updated_s: i64,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            colour: HealthColour::Unknown,
            vaccinated: false,
            updated_s: 0,
        }
    }
}

impl Card {
    #[inline]
    pub fn new(status: CardStatus, functions: &[Function], concessions: &[Concession]) -> Card {
        let mut f = BitSet::default();
        for x in functions {
            f.insert(x.bit());
        }
        let mut c = BitSet::default();
        for x in concessions {
            c.insert(x.bit());
        }
        Card {
            status,
            functions: f,
            concessions: c,
            spent_day: 0,
            spent_fen: 0,
            transit: TransitState::default(),
            visits: 0,
            health: Health::default(),
            medical_year: 0,
            deductible_used_fen: 0,
        }
    }

    #[inline]
    pub fn has_function(&self, f: Function) -> bool {
        self.functions.contains(f.bit())
    }

    /// The card's functions, in their declared order.
    pub fn function_iter(&self) -> impl Iterator<Item = Function> + '_ {
        Function::ALL
            .iter()
            .copied()
            .filter(|f| self.has_function(*f))
    }

    /// The card's concessions, in their declared order.
    pub fn concession_iter(&self) -> impl Iterator<Item = Concession> + '_ {
        Concession::ALL
            .iter()
            .copied()
            .filter(|c| self.concessions.contains(c.bit()))
    }

    pub fn function_list(&self) -> Vec<Function> {
        self.function_iter().collect()
    }

    pub fn concession_list(&self) -> Vec<Concession> {
        self.concession_iter().collect()
    }

    /// The card with `fen` given back to the spend of `day`, if the counter
    /// still counts that day (an earlier day's spend no longer limits).
    #[inline]
    pub fn give_back(self, day: i32, fen: i64) -> Card {
        let mut c = self;
        if fen > 0 && c.spent_day == day {
            c.spent_fen = (c.spent_fen - fen).max(0);
        }
        c
    }

    /// What has been spent on `day`: counters of an earlier day count as zero.
    #[inline]
    pub fn spent_on(&self, day: i32) -> i64 {
        if self.spent_day == day {
            self.spent_fen
        } else {
            0
        }
    }
}

/// Why a decision came out as it did. `Ok` is the only approving reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    Ok,
    CardNotFound,
    Denylisted,
    CardLost,
    CardFrozen,
    CardCancelled,
    FunctionNotEnabled,
    QrInvalid,
    QrExpired,
    QrReplayed,
    LimitExceeded,
    /// The terminal reversed this event before the gateway saw it (its
    /// request was late): nothing is charged.
    Reversed,
    /// A scanned code is valid but names a credential bound to no card.
    CredentialUnbound,
    /// Transit anti-passback: the same card at the same site again within
    /// the configured seconds; the first tap was charged, this one is not.
    DuplicateTap,
    /// A venue's quota for the day is used up.
    QuotaExhausted,
    /// The card's issuing region has no agreement for this scenario.
    RegionNotAccepted,
    /// A controlled door or gate whose allow-list does not name the card.
    NotAllowed,
    /// On the allow-list, but outside its time-of-day windows.
    OutsideHours,
    /// A capture or void names a hold this terminal never made (or whose
    /// record is gone).
    HoldNotFound,
    /// The hold was past its expiry: its reservation is given back.
    HoldExpired,
    /// The hold was already captured or voided: never a second charge.
    HoldClosed,
}

impl Reason {
    pub const ALL: &'static [Reason] = &[
        Reason::Ok,
        Reason::CardNotFound,
        Reason::Denylisted,
        Reason::CardLost,
        Reason::CardFrozen,
        Reason::CardCancelled,
        Reason::FunctionNotEnabled,
        Reason::QrInvalid,
        Reason::QrExpired,
        Reason::QrReplayed,
        Reason::LimitExceeded,
        Reason::Reversed,
        Reason::CredentialUnbound,
        Reason::DuplicateTap,
        Reason::QuotaExhausted,
        Reason::RegionNotAccepted,
        Reason::NotAllowed,
        Reason::OutsideHours,
        Reason::HoldNotFound,
        Reason::HoldExpired,
        Reason::HoldClosed,
    ];

    /// The reason with this wire code.
    pub fn parse(code: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.code() == code)
    }

    /// The stable wire code (API.md).
    pub fn code(self) -> &'static str {
        match self {
            Reason::Ok => "OK",
            Reason::CardNotFound => "CARD_NOT_FOUND",
            Reason::Denylisted => "DENYLISTED",
            Reason::CardLost => "CARD_LOST",
            Reason::CardFrozen => "CARD_FROZEN",
            Reason::CardCancelled => "CARD_CANCELLED",
            Reason::FunctionNotEnabled => "FUNCTION_NOT_ENABLED",
            Reason::QrInvalid => "QR_INVALID",
            Reason::QrExpired => "QR_EXPIRED",
            Reason::QrReplayed => "QR_REPLAYED",
            Reason::LimitExceeded => "LIMIT_EXCEEDED",
            Reason::Reversed => "REVERSED",
            Reason::CredentialUnbound => "CREDENTIAL_UNBOUND",
            Reason::DuplicateTap => "DUPLICATE_TAP",
            Reason::QuotaExhausted => "QUOTA_EXHAUSTED",
            Reason::RegionNotAccepted => "REGION_NOT_ACCEPTED",
            Reason::NotAllowed => "NOT_ALLOWED",
            Reason::OutsideHours => "OUTSIDE_HOURS",
            Reason::HoldNotFound => "HOLD_NOT_FOUND",
            Reason::HoldExpired => "HOLD_EXPIRED",
            Reason::HoldClosed => "HOLD_CLOSED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_numbers_are_validated() {
        let cases: &[(&str, Result<(), CardNoError>)] = &[
            ("500118A12345678", Ok(())),
            ("50011812", Ok(())),
            ("5001181", Err(CardNoError::Length)),
            (&"5".repeat(33), Err(CardNoError::Length)),
            ("500118a12345678", Err(CardNoError::Charset)),
            ("500118-12345678", Err(CardNoError::Charset)),
            ("50011A812345678", Err(CardNoError::Region)),
        ];
        for (input, want) in cases {
            assert_eq!(CardNo::parse(input).map(|_| ()), *want, "input {input}");
        }
    }

    #[test]
    fn masking_keeps_first_six_and_last_four() {
        assert_eq!(mask_card_no("500118A12345678"), "500118*****5678");
        assert_eq!(
            CardNo::parse("500118A12345678").unwrap().to_string(),
            "500118*****5678"
        );
        assert_eq!(
            format!("{:?}", CardNo::parse("500118A12345678").unwrap()),
            "CardNo(500118*****5678)"
        );
        assert_eq!(mask_card_no("50011812"), "50******");
    }

    #[test]
    fn card_bits_round_trip() {
        let card = Card::new(
            CardStatus::Active,
            &[Function::Transit, Function::Financial],
            &[Concession::Student],
        );
        assert_eq!(
            card.function_list(),
            vec![Function::Transit, Function::Financial]
        );
        assert_eq!(card.concession_list(), vec![Concession::Student]);
        assert!(!card.has_function(Function::Medical));
    }
}
