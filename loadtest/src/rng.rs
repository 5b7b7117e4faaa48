//! The gateway's small seeded generator (SplitMix64), shared: runs are
//! reproducible by seed.

pub use onecard_core::rng::Rng;
