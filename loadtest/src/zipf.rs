//! Zipf-distributed ranks: a few hot cards, a long tail. Drawn by inverting
//! a precomputed CDF (binary search), exact for any exponent.

use crate::rng::Rng;

/// The largest population the table is built for (80 MB of CDF).
pub const POPULATION_MAX: usize = 10_000_000;

pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// Ranks 0..n, rank k drawn with weight 1 / (k + 1)^s.
    pub fn new(n: usize, s: f64) -> Zipf {
        assert!(
            (1..=POPULATION_MAX).contains(&n),
            "population must be 1..={POPULATION_MAX}"
        );
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 0..n {
            total += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf
            .partition_point(|c| *c <= u)
            .min(self.cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_follow_the_weights() {
        let z = Zipf::new(100, 1.0);
        let mut rng = Rng::new(42);
        let mut counts = [0u32; 100];
        let n = 200_000;
        for _ in 0..n {
            counts[z.sample(&mut rng)] += 1;
        }
        // H(100) ≈ 5.187: rank 0 has 1/5.187 ≈ 19.3 %, rank 1 half of it.
        let p0 = f64::from(counts[0]) / f64::from(n);
        assert!((p0 - 0.1928).abs() < 0.01, "p0 {p0}");
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((ratio - 2.0).abs() < 0.15, "ratio {ratio}");
        assert!(counts[99] > 0);
    }

    #[test]
    fn exponent_zero_is_uniform_and_one_card_always_wins() {
        let z = Zipf::new(4, 0.0);
        let mut rng = Rng::new(1);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        assert!(
            counts.iter().all(|c| (9_000..11_000).contains(c)),
            "{counts:?}"
        );
        assert_eq!(Zipf::new(1, 1.2).sample(&mut rng), 0);
    }
}
