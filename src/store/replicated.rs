//! Cluster mode's durability: the replicated journal on NATS JetStream.
//!
//! Every [`Commit`] becomes one message of one JetStream stream (replicated
//! `cluster.replicas` times) and is durable when the stream's quorum has
//! acknowledged it. Local RocksDB and the in-memory tables are a cache of
//! that stream: one task per node (the *applier*) reads the stream in order
//! and writes each message's records and ops to RocksDB exactly as the
//! single node's journal does ([`super::journal::add_to_batch`]), so every
//! node holds the same journal with the same sequence numbers.
//!
//! **One card, one history.** A commit about a card goes on the card's
//! subject (`<prefix>.card.<hash>`) with the expected last subject sequence
//! the deciding node has applied for that subject. Two nodes deciding about
//! one card at once both expect the same sequence; the stream accepts the
//! first and refuses the second ("wrong last sequence"), whose node then
//! waits until it has applied the winner and decides again
//! ([`CommitError::Raced`]). The pipeline reads a card and submits its
//! commit under the card's lock, and the applier sets the card and the
//! subject's sequence under the same lock, so the sequence a commit expects
//! is always the one its decision saw.
//!
//! **Retries across nodes.** A commit carrying an idempotency record is
//! published with `Nats-Msg-Id` derived from its key: a retry decided at
//! another node within `cluster.duplicate_window_s` is dropped by the
//! stream, which names the first message; the node waits until it has
//! applied it and the request is replayed from the idempotency record.
//!
//! **Read your writes.** A commit is reported durable only once the
//! quorum has it *and* this node's applier has applied it, so the node's
//! next decision about the card sees it.
//!
//! **Fail closed.** A publish that is not acknowledged within
//! `cluster.publish_timeout_ms` fails ([`CommitError::Unreachable`], a
//! `503`); the node never decides on its own. It recovers by itself: the
//! next acknowledged publish (or the health probe) makes it healthy again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer, context, stream};
use futures_util::StreamExt;
use parking_lot::Mutex;
use rocksdb::{WriteBatch, WriteOptions};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch, Notify, Semaphore};

use onecard_core::model::CardNo;

use super::allow::AllowList;
use super::cards::{self, CardTable};
use super::denylist::DenyList;
use super::durable::{Commit, CommitError, Durable, Expired, Fence, Op, Pending};
use super::partners::PartnerLists;
use super::venues::Venues;
use super::{decode_u64, Cf, Store, StoreError};
use crate::config::ClusterConfig;

/// Keys in [`Cf::Meta`] that only cluster mode writes.
pub mod meta {
    /// The last stream sequence applied to this node's RocksDB.
    pub const APPLIED: &[u8] = b"cluster_applied";
}

/// Why the cluster could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS ({urls}): {detail}")]
    Connect { urls: String, detail: String },
    #[error("JetStream stream `{stream}`: {detail}")]
    Stream { stream: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("config: {0}")]
    Config(String),
}

/// A connection to the NATS cluster and its journal stream.
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    config: ClusterConfig,
}

impl Cluster {
    /// Connects to NATS and creates the journal stream if it does not
    /// exist (with `cluster.replicas` copies).
    pub async fn connect(config: &ClusterConfig) -> Result<Cluster, ClusterError> {
        let urls = config.urls.join(",");
        let connect_err = |detail: String| ClusterError::Connect {
            urls: urls.clone(),
            detail,
        };
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("onecard-{}", config.node))
            .connection_timeout(Duration::from_millis(config.publish_timeout_ms))
            // Reconnect for ever: a node cut off from NATS answers 503
            // until it is back, then serves again by itself.
            .max_reconnects(None);
        let password = config
            .password()
            .map_err(|e| ClusterError::Config(e.to_string()))?;
        if let (Some(user), Some(password)) = (&config.user, password) {
            opts = opts.user_and_password(user.clone(), password);
        }
        if let Some(token) = config
            .token()
            .map_err(|e| ClusterError::Config(e.to_string()))?
        {
            opts = opts.token(token);
        }
        if let Some(ca) = &config.ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = tokio::time::timeout(
            Duration::from_millis(config.publish_timeout_ms.max(5_000)),
            opts.connect(config.urls.as_slice()),
        )
        .await
        .map_err(|_| connect_err("no server answered in time".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(config.publish_timeout_ms))
            .build(client.clone());
        let stream_err = |detail: String| ClusterError::Stream {
            stream: config.stream.clone(),
            detail,
        };
        let wanted = stream::Config {
            name: config.stream.clone(),
            subjects: vec![format!("{}.>", config.subject_prefix)],
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(config.duplicate_window_s),
            max_age: Duration::from_secs(config.max_age_days * 86_400),
            // Direct gets serve a subject's last message from any replica:
            // the loser of a race reads where the winner left the card.
            allow_direct: true,
            // Atomic batches: a decision and its fences (a venue's count)
            // are stored together or not at all.
            allow_atomic_publish: true,
            ..Default::default()
        };
        let mut created = None;
        // Three gateways starting together race to create it; the losers
        // find it made. The stream's leader election takes a moment after
        // the servers start.
        for attempt in 0..40 {
            match js.get_or_create_stream(wanted.clone()).await {
                Ok(s) => {
                    created = Some(s);
                    break;
                }
                Err(e) if attempt < 39 => {
                    tracing::debug!(error = %e, "cluster: the journal stream is not ready yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(stream_err(e.to_string())),
            }
        }
        let mut stream = created.expect("the loop returns or sets it");
        let info = stream.info().await.map_err(|e| stream_err(e.to_string()))?;
        if !info.config.allow_atomic_publish {
            // A stream made by an earlier version: turn atomic batches on.
            let mut updated = info.config.clone();
            updated.allow_atomic_publish = true;
            js.update_stream(updated)
                .await
                .map_err(|e| stream_err(e.to_string()))?;
        }
        if info.config.num_replicas != config.replicas {
            return Err(stream_err(format!(
                "it has {} replicas, cluster.replicas says {}",
                info.config.num_replicas, config.replicas
            )));
        }
        Ok(Cluster {
            client,
            js,
            stream,
            config: config.clone(),
        })
    }
}

/// The subject of a card's decisions: a hash, so no card number appears in
/// NATS (its monitoring pages and logs list subjects). Two cards sharing
/// one would only race each other more often.
pub fn card_subject(prefix: &str, card: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"onecard card subject\0")
        .chain_update(card.as_bytes())
        .finalize();
    format!("{prefix}.card.{}", onecard_core::hex::encode(&digest[..12]))
}

/// The message id of a commit that stores an answer under an idempotency
/// key: the same event decided twice (at two nodes) has one id.
fn message_id(commit: &Commit) -> Option<String> {
    commit.ops.iter().find_map(|op| match op {
        Op::Put(Cf::Idem, key, _) => {
            let digest = Sha256::new()
                .chain_update(b"onecard idem\0")
                .chain_update(key)
                .finalize();
            Some(onecard_core::hex::encode(&digest[..16]))
        }
        _ => None,
    })
}

/// The one card a commit is about: the card of its record, or the only
/// card whose state it writes (a card-life change).
fn commit_card(commit: &Commit) -> Option<&str> {
    if let Some(card) = commit.card.as_deref().filter(|c| !c.is_empty()) {
        return (commit.also.is_empty()).then_some(card);
    }
    if !commit.also.is_empty() {
        return None;
    }
    let cards = commit_cards(commit);
    let mut only = cards.iter();
    match (only.next(), only.next()) {
        (Some(card), None) => Some(*card),
        _ => None,
    }
}

/// Every card a commit writes, each once.
fn commit_cards(commit: &Commit) -> std::collections::BTreeSet<&str> {
    commit
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Put(Cf::Cards, k, _) | Op::Delete(Cf::Cards, k) => std::str::from_utf8(k).ok(),
            _ => None,
        })
        .collect()
}

/// Messages in one atomic batch, at most (nats-server's limit): a commit
/// and its fences. Callers that write many cards at once (an import)
/// split them into commits of [`CARDS_PER_COMMIT_MAX`].
const BATCH_MESSAGES_MAX: usize = 1_000;

/// Cards one commit may write in cluster mode (each is fenced).
pub const CARDS_PER_COMMIT_MAX: usize = 500;

const FORMAT_VERSION: u8 = 1;

/// A commit as it travels in the stream: its records (each with its card)
/// and its ops, length-prefixed.
pub fn encode_commit(commit: &Commit) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut out = Vec::with_capacity(256);
    out.push(FORMAT_VERSION);
    let first = commit
        .record
        .as_deref()
        .map(|r| (r, commit.card.as_deref().unwrap_or("")));
    let also = commit.also.iter().map(|(r, c)| (&r[..], &**c));
    let records: Vec<(&[u8], &str)> = first.into_iter().chain(also).collect();
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for (record, card) in records {
        bytes(&mut out, record);
        bytes(&mut out, card.as_bytes());
    }
    out.extend_from_slice(&(commit.ops.len() as u32).to_be_bytes());
    for op in &commit.ops {
        let (kind, cf, key, value) = match op {
            Op::Put(cf, k, v) => (0u8, cf, k, Some(v)),
            Op::Delete(cf, k) => (1u8, cf, k, None),
        };
        out.push(kind);
        out.push(cf_index(*cf));
        bytes(&mut out, key);
        if let Some(v) = value {
            bytes(&mut out, v);
        }
    }
    out
}

/// A commit read back from the stream.
#[derive(Debug)]
pub struct Decoded {
    /// Records in journal order, each with its card ("" for none).
    pub records: Vec<(Vec<u8>, String)>,
    pub ops: Vec<Op>,
}

/// Why a stream message could not be read back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a journal message does not decode: {0}")]
pub struct BadMessage(&'static str);

pub fn decode_commit(mut b: &[u8]) -> Result<Decoded, BadMessage> {
    fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], BadMessage> {
        if b.len() < n {
            return Err(BadMessage(what));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn u32_of(b: &mut &[u8], what: &'static str) -> Result<usize, BadMessage> {
        let h = take(b, 4, what)?;
        Ok(u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
    }
    fn bytes(b: &mut &[u8], what: &'static str) -> Result<Vec<u8>, BadMessage> {
        let n = u32_of(b, what)?;
        Ok(take(b, n, what)?.to_vec())
    }
    if take(&mut b, 1, "empty")?[0] != FORMAT_VERSION {
        return Err(BadMessage("unknown format version"));
    }
    let n = u32_of(&mut b, "record count")?;
    // Every record takes at least 8 bytes: a count cannot promise more.
    if n > b.len() / 8 {
        return Err(BadMessage("record count"));
    }
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let record = bytes(&mut b, "record")?;
        let card = String::from_utf8(bytes(&mut b, "record card")?)
            .map_err(|_| BadMessage("record card is not UTF-8"))?;
        records.push((record, card));
    }
    let n = u32_of(&mut b, "op count")?;
    if n > b.len() / 6 {
        return Err(BadMessage("op count"));
    }
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let head = take(&mut b, 2, "op")?;
        let cf = *Cf::ALL
            .get(head[1] as usize)
            .ok_or(BadMessage("unknown column family"))?;
        let key = bytes(&mut b, "op key")?;
        ops.push(match head[0] {
            0 => Op::Put(cf, key, bytes(&mut b, "op value")?),
            1 => Op::Delete(cf, key),
            _ => return Err(BadMessage("unknown op")),
        });
    }
    if !b.is_empty() {
        return Err(BadMessage("trailing bytes"));
    }
    Ok(Decoded { records, ops })
}

fn cf_index(cf: Cf) -> u8 {
    Cf::ALL
        .iter()
        .position(|c| *c == cf)
        .expect("every column family is in Cf::ALL") as u8
}

/// What this node has applied of the stream, shared by the applier, the
/// publishers and the health view.
struct Applied {
    /// The last stream sequence applied (RocksDB and memory).
    last: watch::Sender<u64>,
    /// The last journal sequence number assigned locally.
    journal_last: std::sync::atomic::AtomicU64,
    /// Each card subject's last applied stream sequence: what the next
    /// commit about the card expects.
    subjects: dashmap::DashMap<String, u64>,
    /// Publishers waiting for their message to be applied, by stream
    /// sequence; and the recently applied messages' first journal
    /// sequence, for a publisher that comes after its message.
    waiting: Mutex<Waiting>,
    /// Woken by a publisher whose message the applier has not reached in
    /// time: the applier's consumer may be on a server that died.
    stalled: Notify,
    /// When the last message was applied here.
    applied_at: Mutex<Option<std::time::Instant>>,
}

#[derive(Default)]
struct Waiting {
    by_seq: BTreeMap<u64, oneshot::Sender<Option<u64>>>,
    recent: VecDeque<(u64, Option<u64>)>,
}

/// How many applied messages' journal numbers are kept for publishers
/// that arrive after their message was applied.
const RECENT_MAX: usize = 8_192;

/// How long a publisher waits for the applier before telling it that it
/// may be stuck.
const APPLY_STALL: Duration = Duration::from_millis(300);

/// The replicated journal. See the module's documentation.
pub struct Replicated {
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    timeout: Duration,
    applied: Arc<Applied>,
    healthy: Arc<AtomicBool>,
    closing: AtomicBool,
    /// Commits being published at once: a bound like the journal's queue.
    inflight: Arc<Semaphore>,
    handle: tokio::runtime::Handle,
    /// The applier and the health probe, stopped at close.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The stream as the probe last saw it.
    view: Arc<Mutex<StreamView>>,
    node: String,
    stream_name: String,
    replicas: usize,
    /// The largest message the servers take (`max_payload`).
    max_payload: usize,
}

/// The journal stream as the health probe last saw it.
#[derive(Default)]
struct StreamView {
    probed_at: Option<std::time::Instant>,
    last_seq: u64,
    messages: u64,
    leader: Option<String>,
    /// The other servers holding the stream: name, current, offline, lag.
    replicas: Vec<(String, bool, bool, u64)>,
}

impl Replicated {
    /// Starts the applier from where this node's RocksDB left off and
    /// returns once it has applied everything the stream held at start.
    pub async fn start(
        cluster: Cluster,
        store: Store,
        tables: Tables,
        queue_events_max: usize,
    ) -> Result<Replicated, ClusterError> {
        let from = store.get_u64(Cf::Meta, meta::APPLIED)?.unwrap_or(0);
        let journal_last = match store.last_key(Cf::Journal)? {
            None => 0,
            Some(k) => decode_u64(&k).ok_or(StoreError::Corrupt {
                cf: "journal",
                detail: "key is not a u64".into(),
            })?,
        };
        let applied = Arc::new(Applied {
            last: watch::Sender::new(from),
            journal_last: journal_last.into(),
            subjects: dashmap::DashMap::new(),
            waiting: Mutex::new(Waiting::default()),
            stalled: Notify::new(),
            applied_at: Mutex::new(None),
        });
        let max_payload = cluster.client.server_info().max_payload;
        let Cluster {
            client,
            js,
            mut stream,
            config,
        } = cluster;
        let prefix = config.subject_prefix.clone();
        let target = stream
            .info()
            .await
            .map_err(|e| ClusterError::Stream {
                stream: config.stream.clone(),
                detail: e.to_string(),
            })?
            .state
            .last_sequence;
        let applier = Applier {
            client,
            stream: stream.clone(),
            store,
            tables,
            applied: applied.clone(),
            prefix: prefix.clone(),
        };
        let task = tokio::spawn(applier.run());
        let healthy = Arc::new(AtomicBool::new(true));
        let view = Arc::new(Mutex::new(StreamView::default()));
        let probe = tokio::spawn(probe(
            js.clone(),
            config.stream.clone(),
            healthy.clone(),
            Duration::from_millis(config.publish_timeout_ms),
            view.clone(),
            applied.clone(),
        ));
        let mut rx = applied.last.subscribe();
        tracing::info!(from, target, "cluster: catching up with the journal stream");
        let _ = rx.wait_for(|a| *a >= target).await;
        tracing::info!(applied = *rx.borrow(), "cluster: caught up");
        Ok(Replicated {
            js,
            stream,
            prefix,
            timeout: Duration::from_millis(config.publish_timeout_ms),
            applied,
            healthy,
            closing: AtomicBool::new(false),
            inflight: Arc::new(Semaphore::new(queue_events_max)),
            handle: tokio::runtime::Handle::current(),
            tasks: Mutex::new(vec![task, probe]),
            view,
            node: config.node.clone(),
            stream_name: config.stream.clone(),
            replicas: config.replicas,
            max_payload,
        })
    }

    /// The largest message the NATS servers take: a commit (a sealed
    /// settlement batch, a disbursement batch) must fit in one.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Leases for work one node does for the whole cluster (delivering a
    /// sink's batches), in the key-value bucket `<stream>_LEASES`
    /// (replicated like the stream), each lasting `ttl` unless renewed.
    pub async fn leases(&self, ttl: Duration) -> Result<Leases, ClusterError> {
        let bucket = format!("{}_LEASES", self.stream_name);
        let err = |detail: String| ClusterError::Stream {
            stream: format!("KV_{bucket}"),
            detail,
        };
        let kv = match self.js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                let config = jetstream::kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    // A lease nobody renews is gone after this long: the
                    // node holding it died, and another takes over.
                    max_age: ttl,
                    num_replicas: self.replicas,
                    storage: stream::StorageType::File,
                    ..Default::default()
                };
                match self.js.create_key_value(config).await {
                    Ok(kv) => kv,
                    // Another node made it at the same moment.
                    Err(e) => self
                        .js
                        .get_key_value(&bucket)
                        .await
                        .map_err(|_| err(e.to_string()))?,
                }
            }
        };
        Ok(Leases {
            kv,
            owner: format!("{} {}", self.node, nuid_like()),
            ttl,
            stream: self.stream.clone(),
            applied: self.applied.clone(),
        })
    }
}

/// One node at a time does some work for the whole cluster: a lease in a
/// replicated key-value bucket, created by the first node to ask, renewed
/// by its holder, and gone `ttl` after the holder stops renewing it (its
/// process died or lost the quorum). A lease only says who should do the
/// work; what makes the work safe is that its writes are fenced (see
/// [`Fence::Sink`]): a holder that lost its lease without knowing it
/// cannot write over its successor.
pub struct Leases {
    kv: jetstream::kv::Store,
    /// This process: its node name and a token of this run, so a node
    /// restarted at once does not take its dead run's lease for its own.
    owner: String,
    pub ttl: Duration,
    stream: stream::Stream,
    applied: Arc<Applied>,
}

/// A lease held: its key and the revision this node last wrote.
pub struct Lease {
    key: String,
    revision: u64,
}

/// The key of the lease on `what` (a hash: keys allow few characters).
fn lease_key(what: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"onecard lease\0")
        .chain_update(what.as_bytes())
        .finalize();
    onecard_core::hex::encode(&digest[..12])
}

impl Leases {
    /// Takes the lease on `what` if nobody holds it (or this run already
    /// does); `None` when another node holds it.
    pub async fn try_acquire(&self, what: &str) -> Result<Option<Lease>, String> {
        let key = lease_key(what);
        let ask = tokio::time::timeout(self.ttl, self.kv.create(&key, self.owner.clone().into()))
            .await
            .map_err(|_| "the lease bucket did not answer in time".to_owned())?;
        match ask {
            Ok(revision) => Ok(Some(Lease { key, revision })),
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                match self.kv.entry(&key).await {
                    Ok(Some(entry)) if entry.value == self.owner.as_bytes() => Ok(Some(Lease {
                        key,
                        revision: entry.revision,
                    })),
                    Ok(_) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Renews a lease held; an error means it may be lost (another node
    /// holds it now, or the quorum did not answer in time).
    pub async fn renew(&self, lease: &mut Lease) -> Result<(), String> {
        let renewed = tokio::time::timeout(
            self.ttl / 3,
            self.kv
                .update(&lease.key, self.owner.clone().into(), lease.revision),
        )
        .await
        .map_err(|_| "the lease bucket did not answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
        lease.revision = renewed;
        Ok(())
    }

    /// Gives a lease up (a clean stop): another node takes over at once
    /// rather than after `ttl`.
    pub async fn release(&self, lease: Lease) {
        let _ = tokio::time::timeout(
            self.ttl / 3,
            self.kv
                .delete_expect_revision(&lease.key, Some(lease.revision)),
        )
        .await;
    }

    /// The node holding the lease on `what`, as far as this node can see.
    pub async fn holder(&self, what: &str) -> Option<String> {
        let entry = self.kv.entry(lease_key(what)).await.ok()??;
        if entry.operation != jetstream::kv::Operation::Put {
            return None;
        }
        let owner = String::from_utf8_lossy(&entry.value).into_owned();
        owner.split(' ').next().map(str::to_owned)
    }

    /// Waits until this node has applied everything the stream holds now:
    /// a new holder starts from all its predecessor wrote.
    pub async fn caught_up(&self) -> Result<(), String> {
        let target = tokio::time::timeout(self.ttl, self.stream.get_info())
            .await
            .map_err(|_| "the journal stream did not answer in time".to_owned())?
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        if wait_applied(&self.applied, target, self.ttl * 2).await {
            Ok(())
        } else {
            Err(format!(
                "not caught up with stream sequence {target} in time"
            ))
        }
    }
}

async fn wait_applied(applied: &Applied, seq: u64, timeout: Duration) -> bool {
    let mut rx = applied.last.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout(APPLY_STALL, rx.wait_for(|a| *a >= seq)).await {
            Ok(r) => return r.is_ok(),
            Err(_) if tokio::time::Instant::now() < deadline => applied.stalled.notify_one(),
            Err(_) => return false,
        }
    }
}

impl Durable for Replicated {
    fn submit(&self, commit: Commit) -> Result<Pending, CommitError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(CommitError::Closed);
        }
        let permit = self
            .inflight
            .clone()
            .try_acquire_owned()
            .map_err(|_| CommitError::Busy)?;
        let expected_of = |subject: &str| self.applied.subjects.get(subject).map_or(0, |s| *s);
        // Read under the locks the caller holds (the cards', a venue's),
        // as the applier moves them under the same locks.
        let (subject, expected, mut fences) = match commit_card(&commit) {
            Some(card) => {
                let subject = card_subject(&self.prefix, card);
                let expected = expected_of(&subject);
                (subject, Some(expected), Vec::new())
            }
            // A commit that writes several cards (an import's batch, a
            // replacement) goes on no card's subject, so it fences every
            // card it writes: a tap of one of them decided at another
            // node at the same moment, on the card as it was, must lose
            // (or make this lose), never overwrite it or be overwritten.
            None => {
                let fences = commit_cards(&commit)
                    .into_iter()
                    .map(|card| {
                        let subject = card_subject(&self.prefix, card);
                        let expected = expected_of(&subject);
                        (subject, expected)
                    })
                    .collect();
                (format!("{}.other", self.prefix), None, fences)
            }
        };
        fences.extend(commit.fences.iter().map(|f| {
            let subject = fence_subject(&self.prefix, f);
            let expected = expected_of(&subject);
            (subject, expected)
        }));
        if fences.len() >= BATCH_MESSAGES_MAX {
            return Err(CommitError::TooLarge);
        }
        let payload = encode_commit(&commit);
        if payload.len() > self.max_payload {
            // The servers would refuse it (and the refusal would look like
            // an outage): say what it is.
            return Err(CommitError::TooLarge);
        }
        let message = Outgoing {
            subject,
            expected,
            id: message_id(&commit),
            payload: payload.into(),
            fences,
        };
        let (reply, pending) = Pending::channel();
        let job = Publisher {
            js: self.js.clone(),
            stream: self.stream.clone(),
            applied: self.applied.clone(),
            healthy: self.healthy.clone(),
            timeout: self.timeout,
        };
        self.handle.spawn(async move {
            let result = job.publish(message).await;
            let _ = reply.send(result);
            // The guards go only now: the commit is durable or failed.
            drop(commit);
            drop(permit);
        });
        Ok(pending)
    }

    /// Deletes stored answers past their retention. In a cluster every node
    /// runs its own clean-up of its own cache, written locally: the
    /// answers are kept in the stream for as long as it keeps messages.
    fn cleanup(&self, expired: Vec<Expired>, cursor: u64) -> Result<Pending, CommitError> {
        let _ = (expired, cursor);
        let (reply, pending) = Pending::channel();
        let _ = reply.send(Ok(None));
        Ok(pending)
    }

    fn last_seq(&self) -> u64 {
        self.applied.journal_last.load(Ordering::Acquire)
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && !self.closing.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }

    fn applies_memory(&self) -> bool {
        true
    }

    fn applied_watch(&self) -> Option<watch::Receiver<u64>> {
        Some(self.applied.last.subscribe())
    }

    fn cluster_view(&self) -> Option<serde_json::Value> {
        let v = self.view.lock();
        let applied = *self.applied.last.borrow();
        let since_applied = self
            .applied
            .applied_at
            .lock()
            .map(|at| at.elapsed().as_secs_f64());
        let replicas: Vec<_> = v
            .replicas
            .iter()
            .map(|(name, current, offline, lag)| {
                serde_json::json!({"server": name, "current": current, "offline": offline, "lag": lag})
            })
            .collect();
        Some(serde_json::json!({
            "node": self.node,
            "quorum_reachable": self.healthy.load(Ordering::Acquire),
            "stream": {
                "name": self.stream_name,
                "leader": v.leader,
                "replicas": replicas,
                "last_seq": v.last_seq,
                "messages": v.messages,
                "probed_s_ago": v.probed_at.map(|t| t.elapsed().as_secs_f64()),
            },
            "applied_seq": applied,
            "apply_lag_messages": v.last_seq.saturating_sub(applied),
            "last_applied_s_ago": since_applied,
        }))
    }
}

/// How often the health probe asks the stream's leader for its state.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Keeps `healthy` true exactly when the journal stream answers (it has a
/// leader, so a quorum): `/readyz` goes red when this node is cut off and
/// green again by itself when the quorum is back, even with no traffic to
/// try a publish (a balancer sends none to a node that is not ready).
async fn probe(
    js: jetstream::Context,
    stream: String,
    healthy: Arc<AtomicBool>,
    timeout: Duration,
    view: Arc<Mutex<StreamView>>,
    applied: Arc<Applied>,
) {
    let mut was = true;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let info = match tokio::time::timeout(timeout, js.get_stream(&stream)).await {
            Ok(Ok(mut s)) => s.info().await.ok().cloned(),
            _ => None,
        };
        let ok = info.is_some();
        {
            let mut v = view.lock();
            v.probed_at = Some(std::time::Instant::now());
            if let Some(info) = info {
                v.last_seq = info.state.last_sequence;
                v.messages = info.state.messages;
                v.leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                v.replicas = info
                    .cluster
                    .map(|c| {
                        c.replicas
                            .into_iter()
                            .map(|p| (p.name, p.current, p.offline, p.lag.unwrap_or(0)))
                            .collect()
                    })
                    .unwrap_or_default();
                let lag = v.last_seq.saturating_sub(*applied.last.borrow());
                metrics::gauge!("onecard_cluster_apply_lag_messages").set(lag as f64);
            }
        }
        if let Some(at) = *applied.applied_at.lock() {
            metrics::gauge!("onecard_cluster_last_applied_age_seconds")
                .set(at.elapsed().as_secs_f64());
        }
        healthy.store(ok, Ordering::Release);
        metrics::gauge!("onecard_cluster_quorum_reachable").set(if ok { 1.0 } else { 0.0 });
        if ok != was {
            if ok {
                tracing::info!("cluster: the journal stream answers again; serving");
            } else {
                tracing::warn!(
                    "cluster: the journal stream does not answer; answering 503 until it does"
                );
            }
            was = ok;
        }
    }
}

/// One commit's publish, run on its own task.
struct Publisher {
    js: jetstream::Context,
    stream: stream::Stream,
    applied: Arc<Applied>,
    healthy: Arc<AtomicBool>,
    timeout: Duration,
}

/// A commit ready to go: its message, and the fences that travel with
/// it in one atomic batch.
struct Outgoing {
    subject: String,
    expected: Option<u64>,
    id: Option<String>,
    payload: bytes::Bytes,
    fences: Vec<(String, u64)>,
}

/// Why a publish did not store the commit.
enum Refused {
    /// Another node moved one of the subjects first.
    Raced,
    /// The same message id is being stored for another node right now.
    InProcess,
    Failed(String),
}

impl Publisher {
    async fn publish(self, m: Outgoing) -> Result<Option<u64>, CommitError> {
        let started = std::time::Instant::now();
        let subjects: Vec<String> = std::iter::once(m.subject.clone())
            .chain(m.fences.iter().map(|(s, _)| s.clone()))
            .collect();
        let stored = if m.fences.is_empty() {
            self.publish_one(m).await
        } else {
            self.publish_batch(m).await
        };
        metrics::histogram!("onecard_cluster_publish_seconds")
            .record(started.elapsed().as_secs_f64());
        let (seq, duplicate) = match stored {
            Ok(stored) => stored,
            Err(Refused::Raced) => {
                metrics::counter!("onecard_cluster_conflicts_total").increment(1);
                self.healthy.store(true, Ordering::Release);
                // Where the winner left the subjects: wait for it, then
                // decide again.
                let mut after = 0;
                let mut last = Vec::with_capacity(subjects.len());
                for subject in subjects {
                    match self.stream.get_last_raw_message_by_subject(&subject).await {
                        Ok(m) => {
                            after = after.max(m.sequence);
                            last.push((subject, m.sequence));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                stream::LastRawMessageErrorKind::NoMessageFound
                            ) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cluster: reading a subject's last message failed");
                            return Err(CommitError::Unreachable);
                        }
                    }
                }
                // A subject this node has not seen move since it started
                // (it resumed the stream past the subject's last message)
                // is where the stream says, once that message is applied
                // here: without this the next try would expect the same
                // stale sequence and lose again, to the past.
                if wait_applied(&self.applied, after, self.timeout).await {
                    for (subject, seq) in last {
                        let mut at = self.applied.subjects.entry(subject).or_insert(0);
                        *at = (*at).max(seq);
                    }
                }
                return Err(CommitError::Raced { after });
            }
            Err(Refused::InProcess) => {
                // The same event is being stored right now for another
                // node: decide again once it is (the retry finds it).
                metrics::counter!("onecard_cluster_duplicates_total").increment(1);
                self.healthy.store(true, Ordering::Release);
                // Nothing to wait for by number (it may be applied here
                // already): the retry backs off and finds it.
                let after = *self.applied.last.borrow();
                return Err(CommitError::Raced { after });
            }
            Err(Refused::Failed(e)) => {
                tracing::warn!(error = %e, "cluster: a publish was not acknowledged; answering 503");
                metrics::counter!("onecard_cluster_publish_failures_total").increment(1);
                self.healthy.store(false, Ordering::Release);
                return Err(CommitError::Unreachable);
            }
        };
        self.healthy.store(true, Ordering::Release);
        if duplicate {
            // The same event, decided first elsewhere (or before a lost
            // answer): its first answer is the one to give.
            metrics::counter!("onecard_cluster_duplicates_total").increment(1);
            return Err(CommitError::Raced { after: seq });
        }
        self.applied_here(seq).await
    }

    /// One message: the stream's acknowledgement, with its sequence.
    async fn publish_one(&self, m: Outgoing) -> Result<(u64, bool), Refused> {
        let mut publish = PublishMessage::build().payload(m.payload);
        if let Some(expected) = m.expected {
            publish = publish.expected_last_subject_sequence(expected);
        }
        if let Some(id) = m.id {
            publish = publish.message_id(id);
        }
        let ack = match self.js.send_publish(m.subject, publish).await {
            Ok(future) => future.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok((ack.sequence, ack.duplicate)),
            Err(e) if lost_race(&e) => Err(Refused::Raced),
            Err(e)
                if js_code(&e) == Some(jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT) =>
            {
                Err(Refused::InProcess)
            }
            Err(e) => Err(Refused::Failed(e.to_string())),
        }
    }

    /// The commit and its fences as one atomic batch (JetStream's atomic
    /// batch publish, server 2.12 or later): every subject's expected
    /// sequence holds, or nothing is stored. Returns the commit's own
    /// sequence (the batch's first). A batch carries no message id: the
    /// card's subject already stops a second decision of the same event.
    async fn publish_batch(&self, m: Outgoing) -> Result<(u64, bool), Refused> {
        let client = self.js.client();
        let batch = format!("{}", nuid_like());
        let count = 1 + m.fences.len();
        let headers = |n: usize, expected: Option<u64>| {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Batch-Id", batch.as_str());
            h.insert("Nats-Batch-Sequence", n.to_string().as_str());
            if let Some(e) = expected {
                h.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    e.to_string().as_str(),
                );
            }
            if n == count {
                h.insert("Nats-Batch-Commit", "1");
            }
            h
        };
        let mut messages = vec![(m.subject, m.expected, m.payload)];
        for (subject, expected) in m.fences {
            messages.push((subject, Some(expected), bytes::Bytes::from_static(FENCE)));
        }
        let last = messages.pop().expect("a batch has its commit message");
        for (n, (subject, expected, payload)) in messages.into_iter().enumerate() {
            client
                .publish_with_headers(subject, headers(n + 1, expected), payload)
                .await
                .map_err(|e| Refused::Failed(e.to_string()))?;
        }
        let reply = tokio::time::timeout(
            self.timeout,
            client.request_with_headers(last.0, headers(count, last.1), last.2),
        )
        .await
        .map_err(|_| Refused::Failed("the batch's commit was not answered in time".into()))?
        .map_err(|e| Refused::Failed(e.to_string()))?;
        #[derive(serde::Deserialize)]
        struct BatchAck {
            seq: Option<u64>,
            count: Option<u64>,
            error: Option<ApiError>,
        }
        #[derive(serde::Deserialize)]
        struct ApiError {
            err_code: Option<u64>,
            description: Option<String>,
        }
        let ack: BatchAck = serde_json::from_slice(&reply.payload).map_err(|e| {
            Refused::Failed(format!("a batch acknowledgement does not decode: {e}"))
        })?;
        if let Some(err) = ack.error {
            let code = err.err_code.unwrap_or(0);
            return Err(
                if code == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE.0
                    || code == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT.0
                {
                    Refused::Raced
                } else {
                    Refused::Failed(err.description.unwrap_or_else(|| format!("error {code}")))
                },
            );
        }
        match (ack.seq, ack.count) {
            (Some(seq), Some(n)) if n == count as u64 && seq >= n => Ok((seq + 1 - n, false)),
            _ => Err(Refused::Failed(
                "a batch acknowledgement is incomplete".into(),
            )),
        }
    }

    /// Waits until this node's applier has applied stream sequence `seq`;
    /// the first journal sequence it gave the commit's records.
    async fn applied_here(&self, seq: u64) -> Result<Option<u64>, CommitError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.applied.waiting.lock();
            if *self.applied.last.borrow() >= seq {
                let first = w
                    .recent
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .and_then(|(_, first)| *first);
                return Ok(first);
            }
            w.by_seq.insert(seq, tx);
        }
        if !wait_applied(&self.applied, seq, self.timeout).await {
            self.applied.waiting.lock().by_seq.remove(&seq);
            tracing::warn!(
                seq,
                "cluster: acknowledged but not applied here in time; answering 503"
            );
            return Err(CommitError::Unreachable);
        }
        Ok(rx.await.unwrap_or(None))
    }
}

/// The payload of a fence: a message that only moves its subject.
const FENCE: &[u8] = &[0xFE];

/// A batch id unique to this process: 1 to 64 characters.
fn nuid_like() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let boot = BOOT.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    });
    format!("{boot:016x}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The subject a fence moves.
fn fence_subject(prefix: &str, fence: &Fence) -> String {
    let (kind, name, domain): (&str, &str, &[u8]) = match fence {
        Fence::Venue(site) => ("venue", site, b"onecard venue subject\0"),
        Fence::Sink(sink) => ("sink", sink, b"onecard sink subject\0"),
    };
    let digest = Sha256::new()
        .chain_update(domain)
        .chain_update(name.as_bytes())
        .finalize();
    format!(
        "{prefix}.{kind}.{}",
        onecard_core::hex::encode(&digest[..12])
    )
}

/// Whether a publish was refused because the subject has moved on since
/// the sequence it expected (servers from 2.12 answer with a constant
/// message under another code).
fn lost_race(e: &context::PublishError) -> bool {
    e.kind() == context::PublishErrorKind::WrongLastSequence
        || js_code(e) == Some(jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

/// The JetStream error code behind a refused publish, if it has one.
fn js_code(e: &context::PublishError) -> Option<jetstream::ErrorCode> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(|j| j.error_code())
}

/// Reads the journal stream in order and applies each message to RocksDB
/// and memory.
struct Applier {
    client: async_nats::Client,
    stream: stream::Stream,
    store: Store,
    tables: Tables,
    applied: Arc<Applied>,
    prefix: String,
}

/// The in-memory tables the applier keeps up with the stream: what other
/// nodes decide must reach this node's decisions.
pub struct Tables {
    pub cards: Arc<CardTable>,
    pub venues: Arc<Venues>,
    pub deny: Arc<DenyList>,
    pub allow: Arc<AllowList>,
    pub partners: Arc<PartnerLists>,
    pub terminal_blocks: Arc<super::terminal_blocks::TerminalBlocks>,
    /// Called with each decision record as it is applied, before its
    /// card's subject moves on (the QR scanner marks the code it spent).
    pub on_record: Option<Box<dyn Fn(&[u8]) + Send + Sync>>,
}

impl Applier {
    async fn run(self) {
        loop {
            let from = *self.applied.last.borrow() + 1;
            let config = consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            };
            let messages = match self.stream.create_consumer(config).await {
                Ok(c) => c.messages().await,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot read the journal stream; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot read the journal stream; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                tokio::select! {
                    next = messages.next() => match next {
                        Some(Ok(m)) => {
                            let seq = match m.info() {
                                Ok(i) => i.stream_sequence,
                                Err(e) => {
                                    tracing::error!(error = %e, "cluster: a journal message without its sequence");
                                    break;
                                }
                            };
                            if seq <= *self.applied.last.borrow() {
                                continue;
                            }
                            if let Err(e) = self.apply(seq, m.subject.as_str(), &m.payload) {
                                // Stop here rather than skip: a node that
                                // skipped a message would decide on a
                                // wrong card. Publishers time out (503).
                                tracing::error!(error = %e, seq, "cluster: cannot apply a journal message; stopped");
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "cluster: the journal consumer failed; recreating");
                            break;
                        }
                        None => break,
                    },
                    () = self.applied.stalled.notified() => {
                        // A publisher waited for a message this consumer has
                        // not delivered: its server may have died while
                        // the connection lives on elsewhere. Start over
                        // from the last applied message.
                        metrics::counter!("onecard_cluster_consumer_restarts_total").increment(1);
                        tracing::info!("cluster: the journal consumer is behind; recreating it");
                        break;
                    }
                }
            }
        }
    }

    fn apply(&self, seq: u64, subject: &str, payload: &[u8]) -> Result<(), ClusterError> {
        if payload == FENCE {
            return self.apply_fence(seq, subject);
        }
        let mut decoded = decode_commit(payload).map_err(|e| StoreError::Corrupt {
            cf: "cluster",
            detail: e.to_string(),
        })?;
        self.tables.deny.renumber_and_apply(&mut decoded.ops)?;
        if let Some(hook) = &self.tables.on_record {
            for (record, _) in &decoded.records {
                hook(record);
            }
        }
        let mut batch = WriteBatch::default();
        let next = self.applied.journal_last.load(Ordering::Acquire) + 1;
        let records = decoded
            .records
            .iter()
            .map(|(r, c)| (&r[..], (!c.is_empty()).then_some(c.as_str())));
        let (first, next) =
            super::journal::add_to_batch(&self.store, &mut batch, next, records, &decoded.ops);
        batch.put_cf(self.store.cf(Cf::Meta), meta::APPLIED, seq.to_be_bytes());
        // Not synced: the stream is the durable copy, and a crash loses
        // only a tail this node reads again (the cursor is in the batch).
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.store
            .db()
            .write_opt(batch, &wo)
            .map_err(StoreError::from)?;
        self.applied.journal_last.store(next - 1, Ordering::Release);
        self.apply_memory(seq, subject, &decoded.ops)?;
        let mut w = self.applied.waiting.lock();
        self.applied.last.send_replace(seq);
        if let Some(tx) = w.by_seq.remove(&seq) {
            let _ = tx.send(first);
        }
        w.recent.push_back((seq, first));
        if w.recent.len() > RECENT_MAX {
            w.recent.pop_front();
        }
        metrics::gauge!("onecard_cluster_applied_seq").set(seq as f64);
        drop(w);
        *self.applied.applied_at.lock() = Some(std::time::Instant::now());
        Ok(())
    }

    /// A fence only moves its subject (and this node's position).
    fn apply_fence(&self, seq: u64, subject: &str) -> Result<(), ClusterError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.store
            .db()
            .put_cf_opt(
                self.store.cf(Cf::Meta),
                meta::APPLIED,
                seq.to_be_bytes(),
                &wo,
            )
            .map_err(StoreError::from)?;
        self.applied.subjects.insert(subject.to_owned(), seq);
        let mut w = self.applied.waiting.lock();
        self.applied.last.send_replace(seq);
        if let Some(tx) = w.by_seq.remove(&seq) {
            let _ = tx.send(None);
        }
        w.recent.push_back((seq, None));
        if w.recent.len() > RECENT_MAX {
            w.recent.pop_front();
        }
        Ok(())
    }

    /// Sets the cards a message wrote, and moves its card subject to
    /// `seq`, under the card's lock: a decision reads the card and the
    /// sequence its commit expects under that lock.
    fn apply_memory(&self, seq: u64, subject: &str, ops: &[Op]) -> Result<(), StoreError> {
        let mut moved = false;
        let mut partners = false;
        for op in ops {
            match op {
                Op::Put(Cf::Venues, site, count) => self.tables.venues.set_stored(site, count)?,
                Op::Put(Cf::Allow, key, entry) => self.tables.allow.set_stored(key, Some(entry))?,
                Op::Delete(Cf::Allow, key) => self.tables.allow.set_stored(key, None)?,
                Op::Put(Cf::TerminalBlocks, key, entry) => {
                    self.tables.terminal_blocks.set_stored(key, Some(entry))?
                }
                Op::Delete(Cf::TerminalBlocks, key) => {
                    self.tables.terminal_blocks.set_stored(key, None)?
                }
                Op::Put(Cf::PartnerDeny, ..) | Op::Delete(Cf::PartnerDeny, _) => partners = true,
                Op::Put(Cf::Meta, key, _)
                    if key.starts_with(super::partners::VERSION_KEY_PREFIX) =>
                {
                    partners = true
                }
                Op::Put(Cf::Cards, key, value) => {
                    let card_no = std::str::from_utf8(key)
                        .ok()
                        .and_then(|s| CardNo::parse(s).ok());
                    let (Some(card_no), Some(card)) = (card_no, cards::decode(value)) else {
                        return Err(StoreError::Corrupt {
                            cf: "cards",
                            detail: "a card record in the journal does not decode".into(),
                        });
                    };
                    let _lock = self.tables.cards.lock(&card_no);
                    self.tables.cards.set(card_no.clone(), card);
                    if !moved && card_subject(&self.prefix, card_no.as_str()) == subject {
                        self.applied.subjects.insert(subject.to_owned(), seq);
                        moved = true;
                    }
                }
                _ => {}
            }
        }
        if partners {
            self.tables.partners.reload(&self.store)?;
        }
        if !moved && subject.starts_with(&format!("{}.card.", self.prefix)) {
            // A decision that changed no card state (a decline): the
            // subject moves on all the same.
            self.applied.subjects.insert(subject.to_owned(), seq);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::idem;

    #[test]
    fn a_commit_reads_back_as_written() {
        let mut c = Commit::new(
            Some(b"{\"r\":1}".to_vec()),
            vec![
                Op::Put(Cf::Cards, b"500118D00000001".to_vec(), b"{}".to_vec()),
                Op::Delete(Cf::Holds, b"t\0e".to_vec()),
                Op::Put(Cf::Idem, b"t\0e1".to_vec(), Vec::new()),
            ],
        );
        c.card = Some("500118D00000001".into());
        c.also = vec![(b"x".to_vec(), "500118D00000002".into())];
        let d = decode_commit(&encode_commit(&c)).unwrap();
        assert_eq!(
            d.records,
            vec![
                (b"{\"r\":1}".to_vec(), "500118D00000001".to_string()),
                (b"x".to_vec(), "500118D00000002".to_string())
            ]
        );
        assert_eq!(d.ops.len(), 3);
        assert!(matches!(&d.ops[1], Op::Delete(Cf::Holds, k) if k == b"t\0e"));
        let empty = decode_commit(&encode_commit(&Commit::new(None, Vec::new()))).unwrap();
        assert!(empty.records.is_empty() && empty.ops.is_empty());
    }

    #[test]
    fn a_damaged_message_is_refused_not_misread() {
        let mut c = Commit::new(
            Some(b"record".to_vec()),
            vec![Op::Put(Cf::Meta, b"k".to_vec(), b"v".to_vec())],
        );
        c.card = Some("500118D00000001".into());
        let good = encode_commit(&c);
        for cut in 0..good.len() {
            assert!(decode_commit(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode_commit(&longer).is_err());
        let mut version = good.clone();
        version[0] = 9;
        assert_eq!(
            decode_commit(&version).unwrap_err(),
            BadMessage("unknown format version")
        );
        // A count that promises more than the message holds.
        let mut count = good;
        count[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_commit(&count).is_err());
    }

    #[test]
    fn subjects_hide_the_card_and_commits_find_their_card() {
        let s = card_subject("onecard", "500118D00000001");
        assert!(s.starts_with("onecard.card.") && !s.contains("500118"));
        assert_eq!(s, card_subject("onecard", "500118D00000001"));
        assert_ne!(s, card_subject("onecard", "500118D00000002"));
        let life = Commit::new(
            None,
            vec![
                Op::Put(Cf::Cards, b"500118D00000001".to_vec(), b"{}".to_vec()),
                Op::Put(Cf::Audit, b"1".to_vec(), b"{}".to_vec()),
            ],
        );
        assert_eq!(commit_card(&life), Some("500118D00000001"));
        let two = Commit::new(
            None,
            vec![
                Op::Put(Cf::Cards, b"500118D00000001".to_vec(), b"{}".to_vec()),
                Op::Put(Cf::Cards, b"500118D00000002".to_vec(), b"{}".to_vec()),
            ],
        );
        assert_eq!(commit_card(&two), None);
        let mut tap = Commit::new(Some(b"r".to_vec()), Vec::new());
        tap.card = Some("500118D00000003".into());
        assert_eq!(commit_card(&tap), Some("500118D00000003"));
        assert!(message_id(&tap).is_none());
        tap.ops
            .push(Op::Put(Cf::Idem, idem::key("t1", "e1"), Vec::new()));
        let id = message_id(&tap).unwrap();
        assert_eq!(id.len(), 32);
        let mut again = Commit::new(
            None,
            vec![Op::Put(Cf::Idem, idem::key("t1", "e1"), b"x".to_vec())],
        );
        again.card = None;
        assert_eq!(message_id(&again), Some(id));
    }
}
