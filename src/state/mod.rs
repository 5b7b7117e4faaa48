//! Card state and the deny list: in memory for the hot path, in RocksDB for
//! keeps.
//!
//! Memory is a cache of disk. It is rebuilt from RocksDB at start, and every
//! change reaches both, disk through the journal writer's batch and memory
//! once that batch is accepted for writing. Reads on the hot path are
//! lock-free ([`papaya`] maps); writers to one card are serialized by a
//! striped lock ([`cards::CardTable::lock`]) so that counters never lose an
//! update.

pub mod allow;
pub mod cards;
pub mod denylist;
pub mod partners;
pub mod profiles;
pub mod store;
pub mod venues;

pub use cards::CardTable;
pub use denylist::DenyList;
pub use store::{Cf, Store, StoreError};
