//! The store layer: what the gateway keeps, on disk and in memory.
//!
//! - this file: the RocksDB database, its column families, point reads
//!   (one that never waits for the disk, [`Store::get_cached`], for the
//!   async workers) and scans;
//! - [`durable`]: the durability seam every durable write goes through,
//!   [`journal`], its RocksDB group commit, and [`replicated`], cluster
//!   mode's journal on NATS JetStream; [`crashpoint`]: named
//!   places in the write paths where the simulation may kill the process;
//! - the tables, each in memory for the hot path (lock-free reads, a lock
//!   per writer) and in its column family: [`cards`], [`denylist`],
//!   [`venues`], [`allow`], [`partners`], [`profiles`]; and the records
//!   kept only on disk: [`idem`] (stored answers), [`holds`], [`audit`],
//!   [`applications`], [`complaints`].
//!
//! Memory is a cache of disk: rebuilt from RocksDB at start; every change
//! reaches disk through a [`durable::Commit`] and memory once that commit
//! is queued (under the card's lock) or durable (the deny list). Only this
//! layer touches RocksDB handles. It knows nothing of HTTP or of the
//! services above it.

pub mod allow;
pub mod applications;
pub mod audit;
pub mod cards;
pub mod complaints;
pub mod crashpoint;
pub mod denylist;
pub mod durable;
pub mod holds;
pub mod idem;
pub mod journal;
pub mod partners;
pub mod profiles;
pub mod replicated;
pub mod rollout;
pub mod terminal_blocks;
pub mod venues;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, Direction,
    Env, IteratorMode, MemtableFactory, Options, SliceTransform, DB,
};

use crate::config::StoreConfig;

/// The column families (DESIGN.md, "Storage").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    /// card_no → card record (JSON).
    Cards,
    /// card_no → deny entry (JSON).
    Denylist,
    /// version (u64 BE) → deny-list change (JSON), for deltas to validators.
    DenylistLog,
    /// sequence (u64 BE) → decision record (JSON).
    Journal,
    /// terminal 0x00 event_id → stored answer.
    Idem,
    /// named counters and cursors.
    Meta,
    /// settlement: per-sink cursor, sealed batches awaiting acknowledgement,
    /// parked batches.
    Settle,
    /// credential id → binding (JSON): which card a scanned code names.
    Creds,
    /// card_no → profile (JSON): the holder's hashed personal ID, bound
    /// credentials, and the cards it replaced or was replaced by.
    Profiles,
    /// keyed hash of a personal ID → card_no (the holder's current card).
    Persons,
    /// sequence (u64 BE) → audit entry (JSON): card life changes and
    /// look-ups, with who did them.
    Audit,
    /// card_no 0x00 sequence (u64 BE) → empty: a card's journal records,
    /// for the hotline's look-up.
    CardTx,
    /// card_no 0x00 terminal → offline risk (JSON): offline taps of cards
    /// that were deny-listed at the time.
    OfflineRisk,
    /// site → the local day and its approved entries (u32 BE each): a
    /// culture venue's daily quota.
    Venues,
    /// site 0x00 card_no → allow-list entry (JSON: time-of-day windows):
    /// who opens a controlled door.
    Allow,
    /// partner 0x00 card_no → empty: a partner region's deny list (its
    /// version in `meta`, `partner_version/<partner>`).
    PartnerDeny,
    /// disbursements: `b/<batch_id>` → the body's fingerprint and the
    /// report; `w/<project> 0x00 <month> 0x00 <card_no> 0x00 <event_id>` →
    /// a credited wage; `p/<project>` → the project's roster of workers.
    Disburse,
    /// terminal 0x00 hold event_id → medical hold (JSON: card, amount,
    /// category, split, times, state, captured amount).
    Holds,
    /// `serial:<hex>` or `sha256:<hex>` → a blocked terminal certificate
    /// (JSON: terminal, reason, who, when).
    TerminalBlocks,
    /// card applications: `a/<id>` → the application and its changes
    /// (JSON); `p/<applicant hash>/<id>` → empty, by applicant.
    Applications,
    /// complaints: `c/<id>` → the complaint, its transaction and every
    /// step (JSON). Never deleted.
    Complaints,
    /// the rollout report's tallies, this node's own count of its journal:
    /// `c` → the next sequence to count; `d/<day>/<unit> 0x00 <scenario>`
    /// → the day's tally (JSON); `t/<day>/<unit> 0x00 <scenario> 0x00
    /// <terminal>` → empty; `u/<unit> 0x00 <scenario>` → first and last
    /// day of use (JSON).
    Rollout,
}

impl Cf {
    pub const ALL: [Cf; 22] = [
        Cf::Cards,
        Cf::Denylist,
        Cf::DenylistLog,
        Cf::Journal,
        Cf::Idem,
        Cf::Meta,
        Cf::Settle,
        Cf::Creds,
        Cf::Profiles,
        Cf::Persons,
        Cf::Audit,
        Cf::CardTx,
        Cf::OfflineRisk,
        Cf::Venues,
        Cf::Allow,
        Cf::PartnerDeny,
        Cf::Disburse,
        Cf::Holds,
        Cf::TerminalBlocks,
        Cf::Applications,
        Cf::Complaints,
        Cf::Rollout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Cards => "cards",
            Cf::Denylist => "denylist",
            Cf::DenylistLog => "denylist_log",
            Cf::Journal => "journal",
            Cf::Idem => "idem",
            Cf::Meta => "meta",
            Cf::Settle => "settle",
            Cf::Creds => "creds",
            Cf::Profiles => "profiles",
            Cf::Persons => "persons",
            Cf::Audit => "audit",
            Cf::CardTx => "card_tx",
            Cf::OfflineRisk => "offline_risk",
            Cf::Venues => "venues",
            Cf::Allow => "allow",
            Cf::PartnerDeny => "partner_deny",
            Cf::Disburse => "disburse",
            Cf::Holds => "holds",
            Cf::TerminalBlocks => "terminal_blocks",
            Cf::Applications => "applications",
            Cf::Complaints => "complaints",
            Cf::Rollout => "rollout",
        }
    }
}

/// Keys in [`Cf::Meta`].
pub mod meta {
    pub const DENYLIST_VERSION: &[u8] = b"denylist_version";
    pub const BOOT: &[u8] = b"boot";
    pub const IDEM_CLEANUP_SEQ: &[u8] = b"idem_cleanup_seq";
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
    #[error("the store is shutting down")]
    Closed,
}

/// Runs store work `f` on the runtime's blocking pool and gives its result
/// back: a panic in it is raised again here, and a runtime shutting down
/// is [`StoreError::Closed`]. The blocking pool, not `block_in_place`:
/// that hands the calling worker's place to another thread at every call,
/// and a background task stepping through a backlog with it grew the
/// process to 273 threads (issue 19's soak).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            // Cancelled: the runtime is shutting down.
            Err(_) => Err(StoreError::Closed),
        },
    }
}

/// The open database, shared by the journal writer and readers.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    cache: rocksdb::Cache,
}

/// What RocksDB holds in memory, for `/metrics`: a soak tells a leak from
/// a cache filling up by these.
#[derive(Debug, Clone, Copy)]
pub struct StoreMemory {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
}

impl Store {
    pub fn open(dir: &Path, limits: &StoreConfig) -> Result<Store, StoreError> {
        let mb = 1024 * 1024;
        let cache = rocksdb::Cache::new_lru_cache(limits.block_cache_mb * mb);
        let mut opts = Options::default();
        opts.set_max_open_files(i32::try_from(limits.open_files_max).unwrap_or(i32::MAX));
        opts.set_db_write_buffer_size(limits.memtables_mb * mb);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        // Compactions run at the lowest CPU priority: they rewrite what
        // is already durable, so they can wait for a CPU the terminals'
        // requests do not need. At normal priority a compaction's burst
        // took CPU from the request workers on a 2-CPU gateway and the
        // runtime's lag shed requests at half the knee: the soak's first
        // 8 minutes refused 2,759 requests (p99 21-166 ms a minute), and
        // none (p99 9-87 ms) with compactions lowered. Flushes keep
        // normal priority: a memtable not
        // flushed in time stops writes. Level 0 files pile up only while
        // the CPUs stay saturated; RocksDB slows writes at 20 of them.
        let mut env = Env::new()?;
        env.lower_thread_pool_cpu_priority();
        opts.set_env(&env);
        // The hash memtable of `idem` cannot take concurrent inserts; every
        // write comes from the journal writer thread anyway.
        opts.set_allow_concurrent_memtable_write(false);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::Lz4);
            if matches!(cf, Cf::Idem | Cf::Cards) {
                // Point reads and writes only, never iterated: a hash
                // memtable (the whole key is the "prefix") makes both O(1),
                // where the default skip list spent a fifth of the gateway's
                // CPU searching (perf, 64 terminals closed-loop), and a
                // memtable bloom filter answers the usual miss (a new event
                // id) without a search at all.
                o.set_prefix_extractor(SliceTransform::create_noop());
                o.set_memtable_factory(MemtableFactory::HashSkipList {
                    bucket_count: 1 << 20,
                    height: 4,
                    branching_factor: 4,
                });
                o.set_memtable_prefix_bloom_ratio(0.05);
            }
            // Every table's index and filter live in the one cache, not
            // beside it for as long as the file is open: memory stays
            // within `block_cache_mb` however large the journal grows.
            // Level 0's are pinned: every lookup of a new key reads them.
            // Both are partitioned into 4 KiB pieces under a small pinned
            // top level: whole, a 50 MB table's index and filter are half
            // a megabyte each, and the cache is 64 shards of 4 MB (half of
            // each for index and filter blocks), so a shard that drew a
            // few of them evicted them again and again. In an hour's soak
            // (issue 19), after 30 minutes nearly every new event id's
            // lookup read and decompressed a whole index block on the
            // blocking pool, which grew from 12 to 68 threads, and glibc's
            // freed-but-kept memory by 265 MB an hour.
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_cache_index_and_filter_blocks(true);
            table.set_cache_index_and_filter_blocks_with_high_priority(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
            table.set_partition_filters(true);
            table.set_metadata_block_size(4096);
            table.set_pin_top_level_index_and_filter(true);
            if matches!(cf, Cf::Idem | Cf::Cards | Cf::Denylist | Cf::Creds) {
                // Point lookups, mostly of keys that are absent (new event
                // ids): a bloom filter answers those without a disk read.
                table.set_bloom_filter(10.0, false);
            }
            o.set_block_based_table_factory(&table);
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Store {
            db: Arc::new(db),
            cache,
        })
    }

    /// RocksDB's memory by kind (approximate, as RocksDB counts it).
    pub fn memory(&self) -> Option<StoreMemory> {
        let m = rocksdb::perf::get_memory_usage_stats(Some(&[&self.db]), None).ok()?;
        Some(StoreMemory {
            memtables: m.mem_table_total,
            table_readers: m.mem_table_readers_total,
            block_cache: self.cache.get_usage() as u64,
        })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every column family is created at open")
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// A point read that never waits for the disk: answered from the
    /// memtable or the block cache (the bloom filters are in memory, so the
    /// usual miss of a new key is answered too), or `Ok(None)` when it would
    /// have to read a file. Async code calls [`Store::read`], which then
    /// reads on the blocking pool.
    pub fn get_cached(&self, cf: Cf, key: &[u8]) -> Result<Option<Option<Vec<u8>>>, StoreError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_read_tier(rocksdb::ReadTier::BlockCache);
        match self.db.get_cf_opt(self.cf(cf), key, &ro) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A point read for async code: from memory when it can be, otherwise
    /// on the blocking pool, so that an async worker (serving terminals)
    /// never waits for the disk.
    pub async fn read(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.get_cached(cf, key)? {
            return Ok(v);
        }
        // Rare when the cache holds the tables' indexes and filters (a
        // filter's false positive, a key on disk): many of them per
        // second mean it does not.
        metrics::counter!("onecard_store_disk_reads_total", "cf" => cf.name()).increment(1);
        let (store, key) = (self.clone(), key.to_vec());
        blocking(move || store.get(cf, &key)).await
    }

    pub fn get_u64(&self, cf: Cf, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.get(cf, key)? {
            None => Ok(None),
            Some(v) => decode_u64(&v).map(Some).ok_or(StoreError::Corrupt {
                cf: cf.name(),
                detail: "not a u64".into(),
            }),
        }
    }

    /// Calls `f` for each record of `cf` from `start` on, in key order, until
    /// it returns `false`.
    pub fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.iterate(cf, start, Direction::Forward, f)
    }

    /// Calls `f` for each record of `cf` at or before `start`, in reverse
    /// key order, until it returns `false`.
    pub fn scan_back(
        &self,
        cf: Cf,
        start: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.iterate(cf, start, Direction::Reverse, f)
    }

    fn iterate(
        &self,
        cf: Cf,
        start: &[u8],
        direction: Direction,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        // In key order over every key, whatever the column family's
        // prefix extractor (the hash memtables of `idem` and `cards`).
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_total_order_seek(true);
        for item in self
            .db
            .iterator_cf_opt(self.cf(cf), ro, IteratorMode::From(start, direction))
        {
            let (k, v) = item?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// RocksDB's estimate of the keys in `cf` (exact enough to size a map).
    pub fn estimated_keys(&self, cf: Cf) -> usize {
        self.db
            .property_int_value_cf(self.cf(cf), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0) as usize
    }

    /// The last key of `cf`, if any.
    pub fn last_key(&self, cf: Cf) -> Result<Option<Box<[u8]>>, StoreError> {
        match self.db.iterator_cf(self.cf(cf), IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => Ok(Some(item?.0)),
        }
    }
}

/// An id derived from a client's request id, so that a retried request
/// finds the record it made: `tag` and 20 upper-case hexadecimal digits of
/// the SHA-256 of `domain`, a NUL and the request id.
pub fn derived_id(tag: &str, domain: &str, request_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{domain}\0{request_id}").as_bytes());
    let mut id = String::from(tag);
    id.push_str(&onecard_core::hex::encode(&digest[..10]).to_ascii_uppercase());
    id
}

/// Whether `s` has the shape of a [`derived_id`] with `tag`.
pub fn is_derived_id(tag: &str, s: &str) -> bool {
    s.len() == tag.len() + 20
        && s.starts_with(tag)
        && s[tag.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl Store {
    /// The JSON record at `key` of `cf`, if any; one that does not decode
    /// is an error.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        cf: Cf,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.get(cf, key)?.map(|v| decode_json(cf, &v)).transpose()
    }

    /// [`Store::get_json`] for async code ([`Store::read`]).
    pub async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        cf: Cf,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.read(cf, key)
            .await?
            .map(|v| decode_json(cf, &v))
            .transpose()
    }

    /// The JSON records under `prefix` of `cf` for which `keep` holds, in
    /// key order, at most `max`; a record that does not decode is an error.
    pub fn scan_json<T: serde::de::DeserializeOwned>(
        &self,
        cf: Cf,
        prefix: &[u8],
        max: usize,
        mut keep: impl FnMut(&T) -> bool,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.scan(cf, prefix, |k, v| {
            if !k.starts_with(prefix) {
                return false;
            }
            match decode_json::<T>(cf, v) {
                Ok(t) if keep(&t) => out.push(t),
                Ok(_) => {}
                Err(e) => bad = Some(e),
            }
            bad.is_none() && out.len() < max
        })?;
        match bad {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(cf: Cf, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|_| StoreError::Corrupt {
        cf: cf.name(),
        detail: "a record does not decode".into(),
    })
}

pub fn decode_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}
