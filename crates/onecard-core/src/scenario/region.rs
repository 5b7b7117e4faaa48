//! Cross-province cards (Sichuan–Chongqing): which issuing regions' cards
//! are accepted, and for what.
//!
//! `regions.home` lists the region prefixes this gateway issues for (empty:
//! every region is home, the behaviour before partners existed). A card of
//! a partner region (`[[regions.partners]]`, e.g. prefix `51`) is accepted
//! for the scenarios the agreement covers, checked against that partner's
//! own deny list, and settled to the sinks that name the partner; any
//! other card is `REGION_NOT_ACCEPTED`. Pure.

use serde::Deserialize;

use crate::model::{CardNo, Scenario};

/// `[[regions.partners]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerToml {
    /// 1 to 32 of `a-z0-9_`: names its deny list in the admin API and in
    /// sink configs.
    pub name: String,
    /// Issuing-region prefixes (1 to 6 digits) of its cards.
    pub prefixes: Vec<String>,
    /// The scenarios the agreement covers.
    pub scenarios: Vec<String>,
    /// Entries in its deny list, at most.
    #[serde(default = "default_denylist_max")]
    pub denylist_max: usize,
}

pub const PARTNER_DENYLIST_MAX_DEFAULT: usize = 2_000_000;

fn default_denylist_max() -> usize {
    PARTNER_DENYLIST_MAX_DEFAULT
}

/// `[regions]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegionsConfig {
    pub home: Vec<String>,
    pub partners: Vec<PartnerToml>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partner {
    pub name: String,
    pub prefixes: Vec<String>,
    pub scenarios: Vec<Scenario>,
    pub denylist_max: usize,
}

/// Where a card comes from, as far as acceptance goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Home,
    /// Index into [`Rules::partners`].
    Partner(usize),
    Foreign,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    home: Vec<String>,
    pub partners: Vec<Partner>,
}

fn valid_prefix(p: &str) -> bool {
    (1..=6).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
}

pub fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Rules {
    pub fn from_config(c: &RegionsConfig) -> Result<Rules, crate::Invalid> {
        if let Some(p) = c.home.iter().find(|p| !valid_prefix(p)) {
            return Err(format!("regions.home: `{p}` is not a prefix of 1 to 6 digits").into());
        }
        let mut partners: Vec<Partner> = Vec::new();
        for p in &c.partners {
            if !valid_name(&p.name) {
                return Err("regions.partners: `name` must be 1 to 32 of a-z0-9_".into());
            }
            if partners.iter().any(|q| q.name == p.name) {
                return Err(format!("regions.partners `{}` is configured twice", p.name).into());
            }
            if p.prefixes.is_empty() {
                return Err(format!("regions.partners `{}`: no prefixes", p.name).into());
            }
            for pre in &p.prefixes {
                if !valid_prefix(pre) {
                    return Err(format!(
                        "regions.partners `{}`: `{pre}` is not a prefix of 1 to 6 digits",
                        p.name
                    )
                    .into());
                }
                let overlaps =
                    |q: &String| q.starts_with(pre.as_str()) || pre.starts_with(q.as_str());
                if c.home.iter().any(overlaps)
                    || partners.iter().flat_map(|q| &q.prefixes).any(overlaps)
                {
                    return Err(format!(
                        "regions.partners `{}`: prefix `{pre}` overlaps another region",
                        p.name
                    )
                    .into());
                }
            }
            let scenarios = p
                .scenarios
                .iter()
                .map(|s| {
                    Scenario::parse(s).ok_or_else(|| {
                        format!(
                            "regions.partners `{}`: unknown scenario `{s}`; expected {}",
                            p.name,
                            Scenario::expected()
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if p.denylist_max == 0 {
                return Err(format!(
                    "regions.partners `{}`: denylist_max must be positive",
                    p.name
                )
                .into());
            }
            partners.push(Partner {
                name: p.name.clone(),
                prefixes: p.prefixes.clone(),
                scenarios,
                denylist_max: p.denylist_max,
            });
        }
        Ok(Rules {
            home: c.home.clone(),
            partners,
        })
    }

    #[inline]
    pub fn origin(&self, card: &CardNo) -> Origin {
        let region = card.region();
        if let Some(i) = self.partners.iter().position(|p| {
            p.prefixes
                .iter()
                .any(|pre| region.starts_with(pre.as_str()))
        }) {
            return Origin::Partner(i);
        }
        if self.home.is_empty() || self.home.iter().any(|pre| region.starts_with(pre.as_str())) {
            Origin::Home
        } else {
            Origin::Foreign
        }
    }

    /// Whether a partner's cards are accepted for the scenario.
    #[inline]
    pub fn covers(&self, partner: usize, scenario: Scenario) -> bool {
        self.partners[partner].scenarios.contains(&scenario)
    }

    pub fn partner(&self, name: &str) -> Option<usize> {
        self.partners.iter().position(|p| p.name == name)
    }

    /// Whether the card number belongs to the partner's regions (for its
    /// deny-list import).
    pub fn is_partners(&self, partner: usize, card: &CardNo) -> bool {
        self.origin(card) == Origin::Partner(partner)
    }

    /// All partner prefixes: home sinks do not settle these cards.
    pub fn partner_prefixes(&self) -> Vec<String> {
        self.partners
            .iter()
            .flat_map(|p| p.prefixes.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        let c: RegionsConfig = toml::from_str(
            r#"
            home = ["50"]
            [[partners]]
            name = "sichuan"
            prefixes = ["51"]
            scenarios = ["transit", "culture"]
            "#,
        )
        .unwrap();
        Rules::from_config(&c).unwrap()
    }

    #[test]
    fn origins() {
        let r = rules();
        let card = |s: &str| CardNo::parse(s).unwrap();
        assert_eq!(r.origin(&card("500118A12345678")), Origin::Home);
        assert_eq!(r.origin(&card("510104A12345678")), Origin::Partner(0));
        assert_eq!(r.origin(&card("110101A12345678")), Origin::Foreign);
        assert!(r.covers(0, Scenario::Transit));
        assert!(r.covers(0, Scenario::Culture));
        assert!(!r.covers(0, Scenario::Medical));
        // Without config every region is home.
        let open = Rules::default();
        assert_eq!(open.origin(&card("110101A12345678")), Origin::Home);
    }

    #[test]
    fn bad_config_is_named() {
        let p = |extra: &str| format!("home = [\"50\"]\n[[partners]]\nname = \"sc\"\n{extra}");
        let cases = [
            ("home = [\"5x\"]".to_owned(), "not a prefix"),
            (p("prefixes = []\nscenarios = []"), "no prefixes"),
            (p("prefixes = [\"500\"]\nscenarios = []"), "overlaps"),
            (p("prefixes = [\"51\"]\nscenarios = [\"ferry\"]"), "ferry"),
            (
                "[[partners]]\nname = \"Sc\"\nprefixes = [\"51\"]\nscenarios = []".to_owned(),
                "name",
            ),
        ];
        for (text, want) in cases {
            let c: RegionsConfig = toml::from_str(&text).unwrap();
            let e = Rules::from_config(&c).unwrap_err();
            assert!(e.0.contains(want), "{text}: {e}");
        }
    }
}
