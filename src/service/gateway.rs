//! The gateway's state: the config and the policy built from it, the store
//! and the durability seam, the tables in memory, the clock, and the
//! services' own state (idempotency slots, the QR scanner, settlement's
//! status). Opened once at start, rebuilding memory from disk; the
//! services are `impl Gateway` blocks in their own modules. Nothing here
//! knows about HTTP or TLS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use onecard_core::authz::Policy;
use onecard_core::model::{Card, CardNo};
use onecard_core::time::Clock;
use smallvec::SmallVec;

use crate::config::Config;
use crate::service::credential;
use crate::service::idempotency::Idempotency;
use crate::service::metrics::HotMetrics;
use crate::store::allow::AllowList;
use crate::store::cards::CardTable;
use crate::store::denylist::DenyList;
use crate::store::durable::{Durable, Fault};
use crate::store::journal::Journal;
use crate::store::partners::PartnerLists;
use crate::store::replicated::{Cluster, ClusterError, Leases, Replicated, Tables};
use crate::store::terminal_blocks::TerminalBlocks;

/// Room a sealed batch needs besides its body in a replicated write: its
/// head and per-site summary (a site is about 150 bytes of JSON; a batch of
/// 1,000 events at 1,000 sites is the worst case).
const SEAL_HEAD_BYTES_MAX: usize = 256 * 1024;
use crate::store::{meta, venues, Cf, Store, StoreError};

/// Unique authorization ids: the boot number (persisted, bumped at every
/// start) and a counter within the boot, as 20 hex digits. Unique across
/// restarts without a write per request.
pub struct AuthIds {
    node: Option<Box<str>>,
    boot: u64,
    next: AtomicU64,
}

impl AuthIds {
    pub fn new(boot: u64) -> AuthIds {
        AuthIds {
            node: None,
            boot,
            next: AtomicU64::new(1),
        }
    }
    /// Cluster mode: every node counts its own boots, so its name goes
    /// in front.
    pub fn on_node(node: &str, boot: u64) -> AuthIds {
        AuthIds {
            node: Some(node.into()),
            ..AuthIds::new(boot)
        }
    }
    pub fn next(&self) -> AuthId {
        use std::fmt::Write as _;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = AuthId(SmallVec::new());
        if let Some(node) = &self.node {
            write!(id, "{node}-").expect("writing to memory");
        }
        write!(id, "{:08x}{:012x}", self.boot & 0xffff_ffff, n).expect("writing to memory");
        id
    }
}

/// The longest authorization id: a node's name (at most 32, the config
/// checks), a dash, 20 hex digits.
const AUTH_ID_LEN_MAX: usize = 32 + 1 + 20;

/// An authorization id, kept inline (any the config allows fits): every
/// decision makes one, and a tap's goes into its answer, its record and
/// its remembered answer without a heap allocation of its own.
#[derive(Clone)]
pub struct AuthId(SmallVec<[u8; AUTH_ID_LEN_MAX]>);

impl AuthId {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("only strs are written")
    }
}

impl std::fmt::Write for AuthId {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl std::ops::Deref for AuthId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for AuthId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for AuthId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<AuthId> for String {
    fn from(id: AuthId) -> String {
        id.as_str().to_owned()
    }
}

pub struct Gateway {
    pub config: Config,
    pub policy: Policy,
    pub store: Store,
    /// Where every durable write goes (today: RocksDB group commit).
    pub journal: Arc<dyn Durable>,
    /// Where the time comes from: the wall clock, or a test's.
    pub clock: Arc<dyn Clock>,
    /// Shared with the cluster's applier, which sets the cards other
    /// nodes change.
    pub cards: Arc<CardTable>,
    /// Cluster mode: one gate per card-lock stripe, held by a decision
    /// from before it reads the card until its commit is applied here
    /// (see `pipeline::Committed`).
    pub card_gates: Option<Box<[Arc<tokio::sync::Mutex<()>>]>>,
    pub deny: Arc<DenyList>,
    pub idem: Idempotency,
    pub metrics: HotMetrics,
    /// Each settlement sink's status, shared by its delivery task and the
    /// admin API.
    pub settlement: crate::service::sinks::Settlement,
    pub auth_ids: AuthIds,
    ready: AtomicBool,
    /// Scans: issuer keys and replay cache; `None` without keys.
    pub scanner: Option<Arc<credential::Scanner>>,
    pub audit: crate::store::audit::Audit,
    /// Serializes card-life changes and credential bindings: rare, and
    /// each reads then writes several records.
    pub life: tokio::sync::Mutex<()>,
    /// The key of personal-ID hashes, if personal IDs are used.
    pub id_key: Option<Vec<u8>>,
    /// Serializes offline uploads (their risk counters are read, then
    /// written).
    pub offline: tokio::sync::Mutex<()>,
    /// The last full deny list sent to a validator, by version: after an
    /// outage thousands of validators ask for the same one.
    pub deny_full: parking_lot::Mutex<Option<(u64, bytes::Bytes)>>,
    /// One full deny list built at a time.
    pub deny_full_build: tokio::sync::Mutex<()>,
    /// Culture venues' entries today, for their quotas.
    pub venues: Arc<venues::Venues>,
    /// Allow-lists of controlled doors and gates.
    pub allow: Arc<AllowList>,
    /// Partner regions' deny lists.
    pub partners: Arc<PartnerLists>,
    /// Serializes allow-list changes and partner deny-list imports (rare,
    /// and each reads then writes).
    pub lists: tokio::sync::Mutex<()>,
    /// Cluster mode, on a node with `cluster.settle`: the sinks' delivery
    /// leases (one node at a time delivers each sink).
    pub leases: Option<Arc<Leases>>,
    /// Latency percentiles of the last seconds, per route and scenario,
    /// for the SRE's page and `GET /admin/v1/stats`.
    pub stats: crate::service::stats::Stats,
    /// Terminal certificates the security team blocked.
    pub terminal_blocks: Arc<TerminalBlocks>,
    /// Terminals connected with a certificate, and whose expires soon.
    pub terminals: Arc<crate::service::terminals::Terminals>,
    /// When this gateway started (ms since the epoch).
    pub started_at_ms: i64,
    /// Serializes changes to card applications (each reads, then writes).
    pub applications_lock: tokio::sync::Mutex<()>,
    /// Per application id: the hour (since the epoch) and the wrong
    /// last-four-digit answers to its status query within it.
    pub application_misses: dashmap::DashMap<String, (i64, u32)>,
    /// Serializes changes to complaints.
    pub complaints_lock: tokio::sync::Mutex<()>,
    /// Open complaints per unit (count, oldest filed ms), as last counted.
    pub complaints_open: dashmap::DashMap<String, (u64, i64)>,
    /// One count of the journal into the rollout report at a time (the
    /// follower's, or a report request's catching up).
    pub rollout_lock: tokio::sync::Mutex<()>,
}

impl Gateway {
    /// Opens the store, rebuilds memory from it and starts the journal
    /// writer. `clock` is where every request reads the time.
    pub fn open(config: Config, clock: Arc<dyn Clock>) -> Result<Gateway, StoreError> {
        let (store, boot) = open_store(&config)?;
        let tables = load_tables(&config, &store)?;
        let scanner = credential::Scanner::from_config(&config.qr).map(Arc::new);
        let journal: Arc<dyn Durable> = Arc::new(Journal::start(
            store.clone(),
            config.journal.durability,
            config.journal.batch_events_max,
            config.journal.queue_events_max,
        )?);
        Gateway::assemble(config, clock, store, boot, tables, scanner, journal)
    }

    /// [`Gateway::open`] in cluster mode: the journal is the cluster's
    /// stream, and this node's RocksDB first catches up with it, so the
    /// tables are rebuilt from what the whole cluster has decided.
    pub async fn open_cluster(
        config: Config,
        clock: Arc<dyn Clock>,
        cluster: Cluster,
    ) -> Result<Gateway, ClusterError> {
        let (store, boot) = open_store(&config)?;
        let tables = load_tables(&config, &store)?;
        let scanner = credential::Scanner::from_config(&config.qr).map(Arc::new);
        // Codes scanned at any node are spent here too, before the card's
        // subject moves past their scan.
        let on_record: Option<Box<dyn Fn(&[u8]) + Send + Sync>> = scanner.clone().map(|s| {
            let clock = clock.clone();
            Box::new(move |record: &[u8]| {
                #[derive(serde::Deserialize)]
                struct Scanned {
                    #[serde(default)]
                    scan: Option<onecard_core::record::ScanRef>,
                }
                if let Ok(Scanned { scan: Some(spent) }) = serde_json::from_slice(record) {
                    s.recorded_elsewhere(&spent, clock.now_ms());
                }
            }) as Box<dyn Fn(&[u8]) + Send + Sync>
        });
        let shared = Tables {
            cards: tables.cards.clone(),
            venues: tables.venues.clone(),
            deny: tables.deny.clone(),
            allow: tables.allow.clone(),
            partners: tables.partners.clone(),
            terminal_blocks: tables.terminal_blocks.clone(),
            on_record,
        };
        let replicated = Replicated::start(
            cluster,
            store.clone(),
            shared,
            config.journal.queue_events_max,
        )
        .await?;
        // A sealed batch travels in one message: it must fit.
        for sink in &config.settlement.sinks {
            let need = sink.bytes_max + SEAL_HEAD_BYTES_MAX;
            if need > replicated.max_payload() {
                return Err(ClusterError::Config(format!(
                    "settlement.sinks.{}: bytes_max {} does not fit in one NATS message \
                     (the servers' max_payload is {}): raise max_payload on the servers \
                     or lower bytes_max",
                    sink.name,
                    sink.bytes_max,
                    replicated.max_payload()
                )));
            }
        }
        let c = config
            .cluster
            .as_ref()
            .expect("cluster mode has its config");
        let leases = match c.settle {
            true => Some(Arc::new(
                replicated
                    .leases(std::time::Duration::from_millis(c.settle_lease_ms))
                    .await?,
            )),
            false => None,
        };
        let journal: Arc<dyn Durable> = Arc::new(replicated);
        let mut gw = Gateway::assemble(config, clock, store, boot, tables, scanner, journal)?;
        gw.leases = leases;
        Ok(gw)
    }

    /// The tables besides the cards, loaded once the journal is running
    /// (in a cluster: once this node has caught up).
    fn assemble(
        config: Config,
        clock: Arc<dyn Clock>,
        store: Store,
        boot: u64,
        tables: Tables,
        scanner: Option<Arc<credential::Scanner>>,
        journal: Arc<dyn Durable>,
    ) -> Result<Gateway, StoreError> {
        let policy = config.policy().expect("config was validated");
        let Tables {
            cards,
            venues,
            deny,
            allow,
            partners,
            terminal_blocks,
            on_record: _,
        } = tables;
        let idem = Idempotency::new(store.clone(), config.idempotency.retention_s);
        tracing::info!(
            cards = cards.len(),
            denylist.entries = deny.len(),
            denylist.version = deny.version(),
            journal.last_seq = journal.last_seq(),
            boot,
            "state rebuilt from RocksDB"
        );
        let settlement = crate::service::sinks::Settlement::new(&config.settlement.sinks);
        if let Some(s) = &scanner {
            let refilled = s.refill(&store, clock.now_ms())?;
            tracing::info!(
                codes = refilled,
                "QR replay cache refilled from the journal"
            );
        }
        let audit = crate::store::audit::Audit::load(&store)?;
        let id_key = config.privacy.id_hash_key().expect("config was validated");
        let auth_ids = match &config.cluster {
            Some(c) => AuthIds::on_node(&c.node, boot),
            None => AuthIds::new(boot),
        };
        let card_gates = config.cluster.as_ref().map(|_| {
            (0..crate::store::cards::CARD_LOCK_STRIPES)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect()
        });
        metrics::gauge!("onecard_tls_terminal_blocks").set(terminal_blocks.len() as f64);
        Ok(Gateway {
            card_gates,
            terminal_blocks,
            venues,
            allow,
            partners,
            lists: tokio::sync::Mutex::new(()),
            leases: None,
            stats: crate::service::stats::Stats::new(),
            terminals: Arc::default(),
            started_at_ms: clock.now_ms(),
            applications_lock: tokio::sync::Mutex::new(()),
            application_misses: dashmap::DashMap::new(),
            complaints_lock: tokio::sync::Mutex::new(()),
            complaints_open: dashmap::DashMap::new(),
            rollout_lock: tokio::sync::Mutex::new(()),
            scanner,
            audit,
            life: tokio::sync::Mutex::new(()),
            id_key,
            offline: tokio::sync::Mutex::new(()),
            deny_full: parking_lot::Mutex::new(None),
            deny_full_build: tokio::sync::Mutex::new(()),
            settlement,
            config,
            policy,
            store,
            journal,
            cards,
            deny,
            idem,
            clock,
            metrics: HotMetrics::new(),
            auth_ids,
            ready: AtomicBool::new(false),
        })
    }

    /// Sets the gauges that are read, not counted: called before each
    /// scrape, so that they cost nothing in between.
    pub fn publish_gauges(&self) {
        let now = self.now_ms();
        crate::service::metrics::publish_process();
        if let Some(m) = self.store.memory() {
            for (kind, bytes) in [
                ("memtables", m.memtables),
                ("table_readers", m.table_readers),
                ("block_cache", m.block_cache),
            ] {
                metrics::gauge!("onecard_store_memory_bytes", "kind" => kind).set(bytes as f64);
            }
        }
        metrics::gauge!("onecard_ready").set(if self.not_ready().is_none() { 1.0 } else { 0.0 });
        let fault = self.journal_fault();
        for f in Fault::ALL {
            metrics::gauge!("onecard_journal_fault", "fault" => f.label())
                .set(if fault == Some(f) { 1.0 } else { 0.0 });
        }
        metrics::gauge!("onecard_start_time_seconds").set(self.started_at_ms as f64 / 1000.0);
        if let Some(j) = self.journal.commit_figures(1) {
            metrics::gauge!("onecard_journal_pending_commits").set(j.pending as f64);
            metrics::gauge!("onecard_journal_oldest_pending_seconds")
                .set(j.oldest_pending_ms / 1000.0);
        }
        // A list that never changed counts from this start.
        let deny_at = self.deny.updated_at_ms().unwrap_or(self.started_at_ms);
        metrics::gauge!("onecard_denylist_updated_timestamp_seconds").set(deny_at as f64 / 1000.0);
        self.terminals.publish(now);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// What an SRE should know that does not stop authorization: each
    /// settlement sink's warnings, named by sink.
    pub fn warnings(&self) -> Vec<String> {
        let now = self.now_ms();
        self.settlement
            .all()
            .iter()
            .flat_map(|s| {
                let v = s.view(now);
                v.warnings
                    .into_iter()
                    .map(move |w| format!("settlement {}: {w}", s.name))
            })
            .collect()
    }

    /// Why the gateway should not take traffic, if it should not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("starting or shutting down");
        }
        if let Some(f) = self.journal_fault() {
            return Some(f.message());
        }
        if !self.journal.is_healthy() {
            return Some(match self.config.cluster {
                Some(_) => {
                    "this node cannot reach the quorum of the cluster's journal (NATS JetStream)"
                }
                None => "the journal cannot write",
            });
        }
        None
    }

    /// Why the journal cannot record decisions now (a full or failing
    /// disk, a stalled one), if it cannot.
    pub fn journal_fault(&self) -> Option<Fault> {
        self.journal.fault(std::time::Duration::from_millis(
            self.config.journal.stall_ms,
        ))
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Sets a card in memory once its commit is queued (call under the
    /// card's lock). In a cluster the applier sets it instead, once the
    /// stream has the commit, on every node alike: a set here could land
    /// after a newer state from another node.
    pub(crate) fn card_follows(&self, card_no: CardNo, card: Card) {
        if !self.journal.applies_memory() {
            self.cards.set(card_no, card);
        }
    }

    /// Makes planned deny-list changes visible once durable (or, in a
    /// cluster, leaves that to the applier); the version now.
    pub(crate) fn deny_follows(&self, plan: crate::store::denylist::Planned) -> u64 {
        if self.journal.applies_memory() {
            self.deny.version()
        } else {
            self.deny.apply(plan)
        }
    }
}

/// The tables a cluster's applier keeps up to date, loaded before it
/// starts.
fn load_tables(config: &Config, store: &Store) -> Result<Tables, StoreError> {
    let policy = config.policy().expect("config was validated");
    let partner_names: Vec<String> = policy
        .regions
        .partners
        .iter()
        .map(|p| p.name.clone())
        .collect();
    Ok(Tables {
        cards: Arc::new(CardTable::load(store)?),
        venues: Arc::new(venues::Venues::load(store, &policy.culture)?),
        deny: Arc::new(DenyList::load(store)?),
        allow: Arc::new(AllowList::load(store)?),
        partners: Arc::new(PartnerLists::load(store, &partner_names)?),
        terminal_blocks: Arc::new(TerminalBlocks::load(store)?),
        on_record: None,
    })
}

/// Opens RocksDB under `data_dir` and counts this start (`boot`).
fn open_store(config: &Config) -> Result<(Store, u64), StoreError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| StoreError::Corrupt {
        cf: "data_dir",
        detail: e.to_string(),
    })?;
    let store = Store::open(&config.data_dir.join("db"), &config.store)?;
    let boot = store.get_u64(Cf::Meta, meta::BOOT)?.unwrap_or(0) + 1;
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    store
        .db()
        .put_cf_opt(store.cf(Cf::Meta), meta::BOOT, boot.to_be_bytes(), &wo)?;
    Ok((store, boot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_ids_are_the_boot_and_a_counter_behind_the_node() {
        let ids = AuthIds::new(0x1_0000_002a);
        assert_eq!(ids.next().as_str(), "0000002a000000000001");
        assert_eq!(ids.next().to_string(), "0000002a000000000002");
        // The longest node name the config allows still fits inline.
        let node = "n".repeat(32);
        let ids = AuthIds::on_node(&node, 7);
        let id = ids.next();
        assert_eq!(&*id, format!("{node}-00000007000000000001"));
        assert_eq!(String::from(id).len(), AUTH_ID_LEN_MAX);
    }
}
