//! The QR replay cache: which (credential, code id) pairs have been spent
//! and are still inside their window. Bounded, sharded, and refilled from
//! the journal at start (`credential::Scanner::refill`), so a restart does
//! not reopen a window for replays.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::Mutex;

/// Why [`ReplayCache::check_and_remember`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// This (sub, jti) was already used and is still remembered.
    Replayed,
    /// No room left even after dropping forgettable entries. Callers should fail closed
    /// (refuse the code) rather than accept something they cannot remember.
    Full,
}

struct Shard {
    cap: usize,
    /// Key → forget_at.
    map: HashMap<Arc<str>, i64>,
    /// Earliest forget_at first, so expiry pops only what is due. May hold stale entries for
    /// keys that were re-remembered with a later time; those are recognised by a mismatching
    /// forget_at and skipped.
    heap: BinaryHeap<Reverse<(i64, Arc<str>)>>,
}

impl Shard {
    /// Forget up to `budget` entries that are past their forget time.
    fn expire(&mut self, now: i64, mut budget: usize) {
        while budget > 0 {
            match self.heap.peek() {
                Some(Reverse((at, _))) if *at < now => {}
                _ => return,
            }
            let Some(Reverse((at, key))) = self.heap.pop() else {
                return;
            };
            if self.map.get(&key) == Some(&at) {
                self.map.remove(&key);
            }
            budget -= 1;
        }
    }
}

// Own cache line per shard so that tasks hitting neighbouring shards do not contend on one line.
#[repr(align(128))]
struct PaddedShard(Mutex<Shard>);

/// Bounded memory of used (sub, jti) pairs, each kept until its `forget_at` (normally
/// `exp + skew`, after which [`onecard_core::qr::verify`] refuses the token as expired anyway).
///
/// An entry is remembered while `now <= forget_at`: `verify` still accepts a token at
/// `now == exp + skew`, so forgetting it at that second would let it be replayed.
///
/// Sharded by a keyed hash so that concurrent tasks rarely share a lock and a client cannot aim
/// all its entries at one shard. Capacity is split across shards, so a shard may report `Full`
/// slightly before the cache as a whole reaches `capacity`. Entries are stored whole (not as
/// hashes) so that a collision can never refuse a fresh code.
pub struct ReplayCache {
    shards: Box<[PaddedShard]>,
    hasher: std::collections::hash_map::RandomState,
}

const MAX_SHARDS: usize = 64;
/// Expired entries dropped per call on the normal path: more than one so that expiry keeps up
/// with insertion, and bounded so that no single call pays for a backlog.
const EXPIRE_PER_CALL: usize = 4;

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        // Power of two no larger than the capacity, so every shard can hold at least one entry
        // and the per-shard capacities add up to exactly `capacity`.
        let n = if capacity == 0 {
            1
        } else {
            let p = 1usize << capacity.ilog2();
            p.min(MAX_SHARDS)
        };
        let shards = (0..n)
            .map(|i| {
                let cap = capacity / n + usize::from(i < capacity % n);
                PaddedShard(Mutex::new(Shard {
                    cap,
                    map: HashMap::new(),
                    heap: BinaryHeap::new(),
                }))
            })
            .collect();
        ReplayCache {
            shards,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// `Ok(())` and remembers the pair if unseen; `Err(Seen::Replayed)` if seen and not yet
    /// forgotten; `Err(Seen::Full)` if there is no room even after forgetting expired entries.
    pub fn check_and_remember(
        &self,
        sub: &str,
        jti: &str,
        forget_at: i64,
        now_unix: i64,
    ) -> Result<(), Seen> {
        // Length-prefixed so that distinct (sub, jti) pairs can never produce the same key,
        // whatever characters they contain.
        let key = format!("{}:{sub}{jti}", sub.len());
        let idx = (self.hasher.hash_one(&key) as usize) & (self.shards.len() - 1);
        let Some(shard) = self.shards.get(idx) else {
            return Err(Seen::Full);
        };
        let mut shard = shard.0.lock();
        shard.expire(now_unix, EXPIRE_PER_CALL);
        if let Some(at) = shard.map.get_mut(key.as_str()) {
            if *at >= now_unix {
                return Err(Seen::Replayed);
            }
            // Due for forgetting but not yet swept: treat as unseen and take the slot over.
            *at = forget_at;
            shard.heap.push(Reverse((forget_at, Arc::from(key))));
            return Ok(());
        }
        if shard.map.len() >= shard.cap {
            shard.expire(now_unix, usize::MAX);
            if shard.map.len() >= shard.cap {
                return Err(Seen::Full);
            }
        }
        let key: Arc<str> = Arc::from(key);
        shard.map.insert(Arc::clone(&key), forget_at);
        shard.heap.push(Reverse((forget_at, key)));
        Ok(())
    }

    /// Forgets a pair remembered by [`ReplayCache::check_and_remember`]: the
    /// scan that spent it was never recorded (the journal refused it), so a
    /// retry of that scan must not count as a replay.
    pub fn forget(&self, sub: &str, jti: &str) {
        let key = format!("{}:{sub}{jti}", sub.len());
        let idx = (self.hasher.hash_one(&key) as usize) & (self.shards.len() - 1);
        if let Some(shard) = self.shards.get(idx) {
            // Its heap entry stays and is skipped when due (no map entry).
            shard.0.lock().map.remove(key.as_str());
        }
    }

    /// Whether the pair is remembered and not yet due to be forgotten.
    pub fn contains(&self, sub: &str, jti: &str, now_unix: i64) -> bool {
        let key = format!("{}:{sub}{jti}", sub.len());
        let idx = (self.hasher.hash_one(&key) as usize) & (self.shards.len() - 1);
        self.shards.get(idx).is_some_and(|s| {
            s.0.lock()
                .map
                .get(key.as_str())
                .is_some_and(|at| *at >= now_unix)
        })
    }

    /// Entries currently held, including any past their forget time not yet swept.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCache")
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000;

    #[test]
    fn contains_sees_a_live_pair_only() {
        let c = ReplayCache::new(16);
        assert!(!c.contains("s", "j", 100));
        c.check_and_remember("s", "j", 200, 100).unwrap();
        assert!(c.contains("s", "j", 200));
        assert!(!c.contains("s", "j", 201));
        assert!(!c.contains("s", "k", 100));
    }

    #[test]
    fn a_forgotten_pair_can_be_used_again() {
        let c = ReplayCache::new(16);
        assert_eq!(c.check_and_remember("sub-1", "jti-00001", 200, 100), Ok(()));
        c.forget("sub-1", "jti-00001");
        assert_eq!(c.check_and_remember("sub-1", "jti-00001", 200, 100), Ok(()));
        assert_eq!(
            c.check_and_remember("sub-1", "jti-00001", 200, 100),
            Err(Seen::Replayed)
        );
    }

    #[test]
    fn replay_second_use_is_refused_until_forgotten() {
        let c = ReplayCache::new(1000);
        assert!(c.is_empty());
        assert_eq!(c.check_and_remember("s", "jti_0001", NOW + 10, NOW), Ok(()));
        assert_eq!(
            c.check_and_remember("s", "jti_0001", NOW + 10, NOW),
            Err(Seen::Replayed)
        );
        // Still remembered at forget_at itself: verify accepts up to exp + skew inclusive.
        assert_eq!(
            c.check_and_remember("s", "jti_0001", NOW + 10, NOW + 10),
            Err(Seen::Replayed)
        );
        assert_eq!(
            c.check_and_remember("s", "jti_0001", NOW + 40, NOW + 11),
            Ok(())
        );
        assert_eq!(
            c.check_and_remember("s", "jti_0001", NOW + 40, NOW + 12),
            Err(Seen::Replayed)
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn replay_key_is_the_pair() {
        let c = ReplayCache::new(1000);
        assert_eq!(c.check_and_remember("a", "jti_0001", NOW + 10, NOW), Ok(()));
        assert_eq!(c.check_and_remember("b", "jti_0001", NOW + 10, NOW), Ok(()));
        // Concatenation alone would make these two the same key.
        assert_eq!(
            c.check_and_remember("ab", "cdefghij", NOW + 10, NOW),
            Ok(())
        );
        assert_eq!(
            c.check_and_remember("abc", "defghij", NOW + 10, NOW),
            Ok(())
        );
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn replay_full_cache() {
        let c = ReplayCache::new(2);
        let mut admitted = 0;
        let mut full = 0;
        for i in 0..10 {
            match c.check_and_remember("s", &format!("jti_{i:04}"), NOW + 10, NOW) {
                Ok(()) => admitted += 1,
                Err(Seen::Full) => full += 1,
                Err(Seen::Replayed) => panic!("fresh jti reported as replayed"),
            }
        }
        assert!(
            (1..=2).contains(&admitted) && full >= 8,
            "{admitted} {full}"
        );
        assert!(c.len() <= 2);

        let c = ReplayCache::new(1);
        assert_eq!(c.check_and_remember("s", "jti_0001", NOW + 10, NOW), Ok(()));
        assert_eq!(
            c.check_and_remember("s", "jti_0002", NOW + 10, NOW),
            Err(Seen::Full)
        );
        // Still full at forget_at: nothing is forgettable yet.
        assert_eq!(
            c.check_and_remember("s", "jti_0002", NOW + 20, NOW + 10),
            Err(Seen::Full)
        );
        // Once the first entry is past its forget time it makes room.
        assert_eq!(
            c.check_and_remember("s", "jti_0002", NOW + 20, NOW + 11),
            Ok(())
        );
        assert_eq!(c.len(), 1);
        assert_eq!(
            c.check_and_remember("s", "jti_0002", NOW + 20, NOW + 12),
            Err(Seen::Replayed)
        );

        let none = ReplayCache::new(0);
        assert_eq!(
            none.check_and_remember("s", "jti_0001", NOW, NOW),
            Err(Seen::Full)
        );
    }

    #[test]
    fn replay_expiry_is_amortised() {
        let c = ReplayCache::new(10_000);
        for i in 0..1000 {
            assert_eq!(
                c.check_and_remember("s", &format!("j{i:07}"), NOW + 5, NOW),
                Ok(())
            );
        }
        // Later traffic drains expired entries a few at a time, without waiting to be full.
        for i in 0..2000 {
            assert_eq!(
                c.check_and_remember("t", &format!("j{i:07}"), NOW + 99, NOW + 50),
                Ok(())
            );
        }
        assert_eq!(c.len(), 2000);
    }

    #[test]
    fn replay_cache_is_single_use_under_concurrency() {
        let c = ReplayCache::new(100_000);
        let oks = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for i in 0..5000 {
                        let jti = format!("jti{i:05}");
                        if c.check_and_remember("card", &jti, NOW + 60, NOW).is_ok() {
                            oks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(oks.into_inner(), 5000);
        assert_eq!(c.len(), 5000);
    }
}
