//! Identity, HR and social security: proof of who the resident is, with
//! minimal disclosure.
//!
//! A government service window or an HR and social security counter taps
//! or scans the card; the answer carries only what that counter's
//! configured purpose needs: always the `verified` flag, and of the masked
//! name, the issuing region, the concessions and the insurance enrolment
//! only those the purpose lists. Never the ID number, which the gateway
//! does not have. A counter's purpose comes from its terminal id
//! (`[[identity.counters]]`); a terminal no counter names gets the bare
//! `verified` flag. A purpose may also require functions (an HR counter
//! serving the insured), declined `FUNCTION_NOT_ENABLED`. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Card, CardNo, Concession, Function, Reason};

/// What a purpose may disclose besides `verified`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The holder's name, masked (first character kept).
    Name,
    /// The card's issuing region (six digits).
    Region,
    Concessions,
    /// Enrolled in medical insurance (the card's `medical` function).
    Insured,
}

/// `[identity.purposes.<name>]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurposeToml {
    pub disclose: Vec<Field>,
    pub require_functions: Vec<String>,
}

/// `[[identity.counters]]`: terminals whose id starts with the prefix
/// serve the purpose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterToml {
    pub terminal_prefix: String,
    pub purpose: String,
}

/// `[identity]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    pub purposes: BTreeMap<String, PurposeToml>,
    pub counters: Vec<CounterToml>,
}

/// The purpose of terminals no counter names: the `verified` flag only.
pub const VERIFY_ONLY: &str = "verify";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purpose {
    pub name: String,
    pub disclose: Vec<Field>,
    pub require: Vec<Function>,
}

impl Purpose {
    fn verify_only() -> Purpose {
        Purpose {
            name: VERIFY_ONLY.to_owned(),
            disclose: Vec::new(),
            require: Vec::new(),
        }
    }
    fn shows(&self, f: Field) -> bool {
        self.disclose.contains(&f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    purposes: Vec<Purpose>,
    /// (terminal prefix, index into `purposes`), longest prefix first.
    counters: Vec<(String, usize)>,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            purposes: vec![Purpose::verify_only()],
            counters: Vec::new(),
        }
    }
}

impl Rules {
    pub fn from_config(c: &IdentityConfig) -> Result<Rules, crate::Invalid> {
        let mut rules = Rules::default();
        for (name, p) in &c.purposes {
            if name == VERIFY_ONLY {
                return Err(format!(
                    "identity.purposes.{VERIFY_ONLY} is built in (the verified flag only)"
                )
                .into());
            }
            let require = p
                .require_functions
                .iter()
                .map(|f| {
                    Function::parse(f).ok_or_else(|| {
                        format!(
                            "identity.purposes.{name}.require_functions: unknown function `{f}`; expected {}",
                            Function::expected()
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.purposes.push(Purpose {
                name: name.clone(),
                disclose: p.disclose.clone(),
                require,
            });
        }
        for c in &c.counters {
            let i = rules
                .purposes
                .iter()
                .position(|p| p.name == c.purpose)
                .ok_or_else(|| {
                    format!(
                        "identity.counters `{}`: unknown purpose `{}`",
                        c.terminal_prefix, c.purpose
                    )
                })?;
            if c.terminal_prefix.is_empty() {
                return Err("identity.counters: terminal_prefix must not be empty".into());
            }
            rules.counters.push((c.terminal_prefix.clone(), i));
        }
        rules.counters.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        Ok(rules)
    }

    /// The purpose a terminal serves.
    pub fn purpose_of(&self, terminal: &str) -> &Purpose {
        let i = self
            .counters
            .iter()
            .find(|(p, _)| terminal.starts_with(p.as_str()))
            .map_or(0, |(_, i)| *i);
        &self.purposes[i]
    }
}

/// Whether the card serves the purpose.
#[inline]
pub fn check(purpose: &Purpose, card: &Card) -> Result<(), Reason> {
    if purpose.require.iter().all(|f| card.has_function(*f)) {
        Ok(())
    } else {
        Err(Reason::FunctionNotEnabled)
    }
}

/// What an approved identity check shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disclosure {
    pub purpose: String,
    pub verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concessions: Option<Vec<Concession>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insured: Option<bool>,
}

/// The disclosure of an approved check: only the purpose's fields.
/// `name_masked` is the profile's masked name, if one was registered.
pub fn disclose(
    purpose: &Purpose,
    card_no: &CardNo,
    card: &Card,
    name_masked: Option<&str>,
) -> Disclosure {
    Disclosure {
        purpose: purpose.name.clone(),
        verified: true,
        name: purpose
            .shows(Field::Name)
            .then(|| name_masked.unwrap_or("").to_owned()),
        region: purpose
            .shows(Field::Region)
            .then(|| card_no.region().to_owned()),
        concessions: purpose
            .shows(Field::Concessions)
            .then(|| card.concession_list()),
        insured: purpose
            .shows(Field::Insured)
            .then(|| card.has_function(Function::Medical)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CardStatus;

    fn rules() -> Rules {
        let c: IdentityConfig = toml::from_str(
            r#"
            [purposes.government]
            disclose = ["name"]
            [purposes.hr]
            disclose = ["name", "region", "insured"]
            require_functions = ["medical"]
            [purposes.concession_office]
            disclose = ["concessions"]
            [[counters]]
            terminal_prefix = "gov-"
            purpose = "government"
            [[counters]]
            terminal_prefix = "gov-hr-"
            purpose = "hr"
            "#,
        )
        .unwrap();
        Rules::from_config(&c).unwrap()
    }

    #[test]
    fn purposes_by_terminal_longest_prefix_first() {
        let r = rules();
        assert_eq!(r.purpose_of("gov-0001").name, "government");
        assert_eq!(r.purpose_of("gov-hr-0001").name, "hr");
        assert_eq!(r.purpose_of("bus-0001").name, VERIFY_ONLY);
    }

    #[test]
    fn only_what_the_purpose_needs() {
        let r = rules();
        let no = CardNo::parse("500118A12345678").unwrap();
        let insured = Card::new(
            CardStatus::Active,
            &[Function::Medical],
            &[Concession::Elderly],
        );
        let bare = Card::new(CardStatus::Active, &[], &[]);
        let show = |purpose: &str, card: &Card| {
            let p = r.purposes.iter().find(|p| p.name == purpose).unwrap();
            check(p, card)
                .map(|()| serde_json::to_value(disclose(p, &no, card, Some("张*"))).unwrap())
        };
        let cases = [
            (
                VERIFY_ONLY,
                &insured,
                Ok(serde_json::json!({"purpose": "verify", "verified": true})),
            ),
            (
                "government",
                &insured,
                Ok(serde_json::json!({"purpose": "government", "verified": true, "name": "张*"})),
            ),
            (
                "hr",
                &insured,
                Ok(
                    serde_json::json!({"purpose": "hr", "verified": true, "name": "张*", "region": "500118", "insured": true}),
                ),
            ),
            ("hr", &bare, Err(Reason::FunctionNotEnabled)),
            (
                "concession_office",
                &insured,
                Ok(
                    serde_json::json!({"purpose": "concession_office", "verified": true, "concessions": ["elderly"]}),
                ),
            ),
        ];
        for (purpose, card, want) in cases {
            assert_eq!(show(purpose, card), want, "{purpose}");
        }
    }

    #[test]
    fn bad_config_is_named() {
        let cases = [
            ("[purposes.verify]\n", "built in"),
            ("[purposes.a]\nrequire_functions = [\"flying\"]\n", "flying"),
            (
                "[[counters]]\nterminal_prefix = \"x\"\npurpose = \"nope\"\n",
                "nope",
            ),
            (
                "[purposes.a]\n[[counters]]\nterminal_prefix = \"\"\npurpose = \"a\"\n",
                "empty",
            ),
        ];
        for (text, want) in cases {
            let c: IdentityConfig = toml::from_str(text).unwrap();
            let e = Rules::from_config(&c).unwrap_err();
            assert!(e.0.contains(want), "{text}: {e}");
        }
    }
}
