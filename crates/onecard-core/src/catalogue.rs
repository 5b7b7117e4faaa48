//! The scenario catalogue (目录清单): which unit answers for each scenario,
//! and for sites (a hospital's counters, a park's gates) that another unit
//! runs: the lead units (牵头单位) of the one card's implementation plan.
//! A complaint about a transaction goes to its unit; the rollout report is
//! given per unit. Pure: the config is the catalogue.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::Scenario;
use crate::Invalid;

/// A unit's name: 1 to 64 characters, none of them control characters
/// (metric labels take it).
pub const UNIT_CHARS_MAX: usize = 64;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SiteUnit {
    /// Sites whose id starts with this.
    pub prefix: String,
    pub unit: String,
}

/// `[catalogue]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Catalogue {
    /// Answers for what no scenario or site names: the card itself (a
    /// lost card, the service at a counter). The card's issuer.
    pub default_unit: String,
    /// By scenario name (`transit`, `medical`, ...).
    pub scenarios: BTreeMap<String, String>,
    /// By site prefix; the longest matching prefix wins over the scenario.
    pub sites: Vec<SiteUnit>,
}

impl Default for Catalogue {
    /// The district plan's lead units.
    fn default() -> Self {
        let scenarios = [
            ("transit", "区交通局"),
            ("medical", "区医保局"),
            ("health", "区卫生健康委"),
            ("culture", "区文化旅游委"),
            ("payment", "区财政局"),
            ("access", "区住房城乡建委"),
            ("identity", "区行政服务中心"),
        ]
        .into_iter()
        .map(|(s, u)| (s.to_owned(), u.to_owned()))
        .collect();
        Catalogue {
            default_unit: "区人力社保局".to_owned(),
            scenarios,
            sites: Vec::new(),
        }
    }
}

fn valid_unit(u: &str) -> bool {
    let n = u.chars().count();
    (1..=UNIT_CHARS_MAX).contains(&n) && !u.chars().any(char::is_control)
}

impl Catalogue {
    /// Checks names and keys: every unit a valid name, every scenario key
    /// a scenario, no prefix empty or given twice.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !valid_unit(&self.default_unit) {
            return Err(Invalid::new(
                "catalogue.default_unit must be 1 to 64 characters without control characters",
            ));
        }
        for (s, u) in &self.scenarios {
            if Scenario::parse(s).is_none() {
                return Err(Invalid::new(format!(
                    "catalogue.scenarios: `{s}` is not a scenario; one of {}",
                    Scenario::expected()
                )));
            }
            if !valid_unit(u) {
                return Err(Invalid::new(format!(
                    "catalogue.scenarios.{s} must be 1 to 64 characters without control characters"
                )));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for site in &self.sites {
            if site.prefix.is_empty() || site.prefix.len() > 64 || !seen.insert(&site.prefix) {
                return Err(Invalid::new(
                    "catalogue.sites: each prefix must be 1 to 64 bytes and given once",
                ));
            }
            if !valid_unit(&site.unit) {
                return Err(Invalid::new(
                    "catalogue.sites: each unit must be 1 to 64 characters without control characters",
                ));
            }
        }
        Ok(())
    }

    /// The unit that answers for a transaction of `scenario` at `site`.
    pub fn unit_for(&self, scenario: Option<Scenario>, site: Option<&str>) -> &str {
        if let Some(site) = site {
            if let Some(s) = self
                .sites
                .iter()
                .filter(|s| site.starts_with(&s.prefix))
                .max_by_key(|s| s.prefix.len())
            {
                return &s.unit;
            }
        }
        scenario
            .and_then(|s| self.scenarios.get(s.as_str()))
            .unwrap_or(&self.default_unit)
    }

    /// Every unit named, once, in order.
    pub fn units(&self) -> Vec<&str> {
        let mut all: Vec<&str> = std::iter::once(self.default_unit.as_str())
            .chain(self.scenarios.values().map(String::as_str))
            .chain(self.sites.iter().map(|s| s.unit.as_str()))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_wins_over_its_scenario_and_the_default_answers_the_rest() {
        let mut c = Catalogue::default();
        c.sites = vec![
            SiteUnit {
                prefix: "hosp-".into(),
                unit: "区卫生健康委".into(),
            },
            SiteUnit {
                prefix: "hosp-3-".into(),
                unit: "某医院".into(),
            },
        ];
        c.validate().unwrap();
        let table: &[(Option<Scenario>, Option<&str>, &str)] = &[
            (Some(Scenario::Transit), Some("line-12"), "区交通局"),
            (Some(Scenario::Medical), Some("pharmacy-1"), "区医保局"),
            (
                Some(Scenario::Medical),
                Some("hosp-1-counter"),
                "区卫生健康委",
            ),
            (Some(Scenario::Medical), Some("hosp-3-counter"), "某医院"),
            (None, None, "区人力社保局"),
            (Some(Scenario::Transit), None, "区交通局"),
        ];
        for &(scenario, site, want) in table {
            assert_eq!(c.unit_for(scenario, site), want, "{scenario:?} {site:?}");
        }
        assert!(c.units().contains(&"某医院"));
        assert_eq!(c.units().len(), 9);
    }

    #[test]
    fn bad_catalogues_are_refused_with_the_key() {
        let mut c = Catalogue::default();
        c.scenarios.insert("bus".into(), "x".into());
        assert!(c.validate().unwrap_err().0.contains("`bus`"));
        let mut c = Catalogue::default();
        c.sites = vec![
            SiteUnit {
                prefix: "a".into(),
                unit: "x".into(),
            },
            SiteUnit {
                prefix: "a".into(),
                unit: "y".into(),
            },
        ];
        assert!(c.validate().is_err());
        let c = Catalogue {
            default_unit: String::new(),
            ..Catalogue::default()
        };
        assert!(c.validate().is_err());
    }
}
