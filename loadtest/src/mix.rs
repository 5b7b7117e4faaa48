//! The request mix: scenarios (transit-heavy), cards drawn Zipf-distributed
//! from a population (a few hot cards), shares of deny-listed, lost and
//! unknown cards, and a share of retries that repeat an event id.

use crate::rng::Rng;
use crate::zipf::Zipf;

/// How many deny-listed and lost cards the run sets up (drawn uniformly).
pub const SPECIAL_CARDS: usize = 100;

pub fn active_card(i: usize) -> String {
    format!("500118B{i:08}")
}
pub fn denied_card(i: usize) -> String {
    format!("500118D{i:08}")
}
pub fn lost_card(i: usize) -> String {
    format!("500118L{i:08}")
}
pub fn unknown_card(i: usize) -> String {
    format!("500118U{i:08}")
}

/// (scenario, share in percent, amount in fen; `None` for scenarios that do not charge).
pub const SCENARIOS: &[(&str, u32, Option<i64>)] = &[
    ("transit", 70, Some(200)),
    ("medical", 10, Some(5_000)),
    ("access", 10, None),
    ("culture", 5, Some(1_000)),
    ("payment", 5, Some(3_000)),
];

pub struct Mix {
    zipf: Zipf,
    pub deny_share: f64,
    pub lost_share: f64,
    pub unknown_share: f64,
    pub retry_share: f64,
}

impl Mix {
    pub fn new(
        population: usize,
        zipf_s: f64,
        deny_share: f64,
        lost_share: f64,
        unknown_share: f64,
        retry_share: f64,
    ) -> Mix {
        let shares = deny_share + lost_share + unknown_share;
        assert!(
            (0.0..=1.0).contains(&shares),
            "card shares must add up to at most 1"
        );
        assert!(
            (0.0..1.0).contains(&retry_share),
            "the retry share must be below 1"
        );
        Mix {
            zipf: Zipf::new(population, zipf_s),
            deny_share,
            lost_share,
            unknown_share,
            retry_share,
        }
    }

    pub fn card(&self, rng: &mut Rng) -> String {
        let u = rng.unit();
        let special = (rng.next_u64() % SPECIAL_CARDS as u64) as usize;
        if u < self.deny_share {
            denied_card(special)
        } else if u < self.deny_share + self.lost_share {
            lost_card(special)
        } else if u < self.deny_share + self.lost_share + self.unknown_share {
            unknown_card((rng.next_u64() % 100_000_000) as usize)
        } else {
            active_card(self.zipf.sample(rng))
        }
    }

    pub fn scenario(rng: &mut Rng) -> (&'static str, Option<i64>) {
        let mut pick = (rng.next_u64() % 100) as u32;
        for (name, share, amount) in SCENARIOS {
            if pick < *share {
                return (name, *amount);
            }
            pick -= share;
        }
        unreachable!("the shares add up to 100")
    }

    /// A new request body for `terminal`'s `seq`-th event.
    pub fn body(&self, rng: &mut Rng, run: &str, terminal: u32, seq: u64) -> Vec<u8> {
        let card = self.card(rng);
        let (scenario, amount) = Mix::scenario(rng);
        let amount = amount
            .map(|a| format!(",\"amount_fen\":{a}"))
            .unwrap_or_default();
        format!(
            "{{\"event_id\":\"{run}-{terminal}-{seq}\",\"kind\":\"tap\",\"card_no\":\"{card}\",\"scenario\":\"{scenario}\"{amount},\"site\":\"load-{}\"}}",
            terminal % 64
        )
        .into_bytes()
    }

    /// Whether the next request repeats the previous one (a terminal that
    /// timed out and retries).
    pub fn retry(&self, rng: &mut Rng) -> bool {
        rng.unit() < self.retry_share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_cards_and_scenarios() {
        let mix = Mix::new(1_000, 1.0, 0.02, 0.01, 0.03, 0.05);
        let mut rng = Rng::new(9);
        let n = 100_000;
        let (mut d, mut l, mut u, mut transit) = (0, 0, 0, 0);
        for _ in 0..n {
            let c = mix.card(&mut rng);
            match &c[6..7] {
                "D" => d += 1,
                "L" => l += 1,
                "U" => u += 1,
                _ => assert_eq!(&c[6..7], "B"),
            }
            if Mix::scenario(&mut rng).0 == "transit" {
                transit += 1;
            }
        }
        let share = |k: i32| f64::from(k) / f64::from(n);
        assert!(
            (share(d) - 0.02).abs() < 0.003
                && (share(l) - 0.01).abs() < 0.003
                && (share(u) - 0.03).abs() < 0.003
        );
        assert!((share(transit) - 0.70).abs() < 0.01);
    }

    #[test]
    fn bodies_are_valid_requests() {
        let mix = Mix::new(10, 1.0, 0.1, 0.1, 0.1, 0.0);
        let mut rng = Rng::new(3);
        for seq in 0..200 {
            let body = mix.body(&mut rng, "r1", 7, seq);
            let req = onecard_core::wire::parse_authorize(&body)
                .expect("the generator sends valid requests");
            assert_eq!(req.event_id, format!("r1-7-{seq}"));
        }
    }
}
