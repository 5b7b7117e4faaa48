//! Delivery to one sink: follows the journal from the sink's durable
//! cursor, seals batches ([`batch`]), stores each sealed batch (synced)
//! before it is sent, sends the oldest over HTTPS, and forgets it only when
//! the receiver acknowledges its id, count and total.
//!
//! Why it books each event once: a batch is stored, with the cursor moved
//! past its events, in one synced write before its first send, so after a
//! crash the same batch (same id, same bytes) is sent again and the
//! receiver de-duplicates it; an event is in exactly one stored batch.
//! A mismatched acknowledgement or a refusal that retrying cannot fix parks
//! the batch for an operator rather than retrying it blindly.
//!
//! Runs on its own task; the hot path never waits on it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use onecard_core::record::DecisionRecord;
use onecard_core::settle::batch::{Ack, Batch, Batcher, Cards, DaySite, Rules};
use onecard_core::settle::retry::{Backoff, Circuit, CircuitState};
use onecard_core::settle::sign::Signer;

use crate::config::SinkConfig;
use crate::net::client::{Connection, Protocol};
use crate::service::gateway::Gateway;
use crate::store::durable::{Commit, CommitError, Durable, Fence, Op};
use crate::store::{Cf, Store, StoreError};

/// Journal records read per pass.
const READ_BATCH: usize = 10_000;
/// Sealed batches kept ready per send in flight.
const SEAL_AHEAD_PER_SEND: usize = 4;
/// Batches with reversal lines, waiting for older batches to be
/// acknowledged, that the sends look past at most.
const HELD_BACK_MAX: usize = 16;
/// How often an idle sink looks at the journal again.
const POLL: Duration = Duration::from_millis(20);
/// Cluster mode: how often the cursor alone (nothing sealed) is written.
/// A node taking the sink over re-reads at most this much of the journal.
const CLUSTER_CURSOR_EVERY: Duration = Duration::from_secs(10);

/// A sealed batch as kept in [`Cf::Settle`] until acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    pub total_fen: i64,
    pub oldest_at_ms: i64,
    /// Not in the head: stored raw after it (see [`Stored::encode`]).
    #[serde(skip)]
    pub body: bytes::Bytes,
    /// Its lines by local day and site, added to the daily report when it
    /// is acknowledged.
    #[serde(default)]
    pub summary: Vec<DaySite>,
    /// Why it was parked, for parked batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
}

impl From<Batch> for Stored {
    fn from(b: Batch) -> Stored {
        Stored {
            id: b.id,
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            count: b.count,
            total_fen: b.total_fen,
            oldest_at_ms: b.oldest_at_ms,
            body: b.body.into(),
            summary: b.summary,
            parked: None,
        }
    }
}

impl Stored {
    /// Whether it has reversal lines (money given back for a charge sent
    /// in an earlier batch). A batch stored before summaries existed says
    /// no, and goes as it did then.
    pub fn gives_back(&self) -> bool {
        self.summary.iter().any(|d| d.reversals > 0)
    }

    /// The head as one line of JSON, a newline, then the body as it is
    /// sent: a 1,000-event body is not escaped into a JSON string on every
    /// store and read, and the head alone reads without touching it.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("a batch head serializes");
        v.push(b'\n');
        v.extend_from_slice(&self.body);
        v
    }

    /// The head only (an empty body).
    pub fn decode_head(v: &[u8]) -> Option<Stored> {
        match v.iter().position(|&b| b == b'\n') {
            Some(end) => serde_json::from_slice(&v[..end]).ok(),
            None => Stored::decode_legacy(v),
        }
    }

    pub fn decode(v: &[u8]) -> Option<Stored> {
        let Some(end) = v.iter().position(|&b| b == b'\n') else {
            return Stored::decode_legacy(v);
        };
        let mut s: Stored = serde_json::from_slice(&v[..end]).ok()?;
        s.body = bytes::Bytes::copy_from_slice(&v[end + 1..]);
        Some(s)
    }

    /// A batch stored by an earlier version: one JSON object with the
    /// body as a string (no newline anywhere). Its id and bytes are kept,
    /// so a receiver that booked it acknowledges it again.
    fn decode_legacy(v: &[u8]) -> Option<Stored> {
        let mut doc: serde_json::Value = serde_json::from_slice(v).ok()?;
        let body = doc.as_object_mut()?.remove("body")?;
        let mut s: Stored = serde_json::from_value(doc).ok()?;
        s.body = bytes::Bytes::from(body.as_str()?.to_owned());
        Some(s)
    }
}

pub fn cursor_key(sink: &str) -> Vec<u8> {
    [b"c/", sink.as_bytes()].concat()
}
pub fn batch_prefix(sink: &str) -> Vec<u8> {
    [b"b/", sink.as_bytes(), b"/"].concat()
}
pub fn parked_prefix(sink: &str) -> Vec<u8> {
    [b"p/", sink.as_bytes(), b"/"].concat()
}
fn key(prefix: &[u8], first_seq: u64) -> Vec<u8> {
    [prefix, &first_seq.to_be_bytes()].concat()
}
/// `r/<sink>/<day>/`: the acknowledged totals of a sink's local day, one
/// key per site. The day is offset so that its bytes sort in day order.
pub fn report_prefix(sink: &str, day: i32) -> Vec<u8> {
    let day = (day as u32) ^ 0x8000_0000;
    [b"r/", sink.as_bytes(), b"/", &day.to_be_bytes(), b"/"].concat()
}

/// Forgets an acknowledged batch and adds its lines to the daily report,
/// in one synced write: the report counts each batch once, whatever
/// crashes come between.
fn acknowledge(store: &Store, bp: &[u8], sink: &str, b: &Stored) -> Result<Vec<Op>, StoreError> {
    let mut ops = vec![Op::Delete(Cf::Settle, key(bp, b.first_seq))];
    for part in &b.summary {
        let k = [&report_prefix(sink, part.day)[..], part.site.as_bytes()].concat();
        let mut total = match store.get(Cf::Settle, &k)? {
            Some(v) => serde_json::from_slice::<DaySite>(&v).map_err(|e| StoreError::Corrupt {
                cf: "settle",
                detail: format!("a report record does not decode: {e}"),
            })?,
            None => DaySite {
                day: part.day,
                site: part.site.clone(),
                ..DaySite::default()
            },
        };
        total.add(part);
        ops.push(Op::Put(
            Cf::Settle,
            k,
            serde_json::to_vec(&total).expect("serializes"),
        ));
    }
    Ok(ops)
}

/// What of a sink's local day is in stored or parked batches (sealed, not
/// acknowledged).
pub fn pending(store: &Store, sink: &str, day: i32) -> Result<DaySite, StoreError> {
    let mut total = DaySite::default();
    for prefix in [batch_prefix(sink), parked_prefix(sink)] {
        for b in list_heads(store, &prefix, usize::MAX)? {
            for part in b.summary.iter().filter(|p| p.day == day) {
                total.add(part);
            }
        }
    }
    Ok(total)
}

/// A sink's acknowledged totals of one local day, by site.
pub fn report(store: &Store, sink: &str, day: i32) -> Result<Vec<DaySite>, StoreError> {
    let prefix = report_prefix(sink, day);
    let mut out = Vec::new();
    store.scan(Cf::Settle, &prefix, |k, v| {
        if !k.starts_with(&prefix) {
            return false;
        }
        if let Ok(d) = serde_json::from_slice(v) {
            out.push(d);
        }
        true
    })?;
    Ok(out)
}

/// Why a sink's delivery stopped.
#[derive(Debug, thiserror::Error)]
enum Stop {
    /// Its state cannot be read or written here: stop loudly.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// Cluster mode: another node wrote the sink's state since this node
    /// read it (it took over, or this node restarted and had not seen
    /// where the sink stands). Nothing was written: start over from the
    /// state as it is now.
    #[error("another node wrote this sink's state")]
    Stale,
    /// Cluster mode: the state could not be written to the cluster (no
    /// quorum): give the sink up for now.
    #[error("cannot write to the cluster's journal: {0}")]
    Cut(CommitError),
}

/// Where a sink's delivery state (sealed batches, cursor, report) is
/// written: this node's RocksDB, synced; or, in a cluster, the replicated
/// journal, fenced on the sink, so every node holds it and a node that
/// takes the sink over starts where its predecessor stopped.
struct Writes {
    cluster: Option<(Arc<dyn Durable>, Box<str>)>,
}

impl Writes {
    async fn write(&self, store: &Store, ops: Vec<Op>, sync: bool) -> Result<(), Stop> {
        match &self.cluster {
            None => {
                let store = store.clone();
                crate::store::blocking(move || {
                    let mut wb = rocksdb::WriteBatch::default();
                    for op in &ops {
                        match op {
                            Op::Put(cf, k, v) => wb.put_cf(store.cf(*cf), k, v),
                            Op::Delete(cf, k) => wb.delete_cf(store.cf(*cf), k),
                        }
                    }
                    let mut wo = rocksdb::WriteOptions::default();
                    wo.set_sync(sync);
                    store.db().write_opt(wb, &wo).map_err(StoreError::from)
                })
                .await
                .map_err(Stop::from)
            }
            Some((journal, sink)) => {
                let mut commit = Commit::new(None, ops);
                commit.fences = vec![Fence::Sink(sink.clone())];
                match journal.commit(commit).await {
                    Ok(_) => Ok(()),
                    Err(CommitError::Raced { .. }) => Err(Stop::Stale),
                    Err(e) => Err(Stop::Cut(e)),
                }
            }
        }
    }
}

/// The batches of a sink waiting under `prefix`, oldest first, at most `n`.
pub fn list(store: &Store, prefix: &[u8], n: usize) -> Result<Vec<Stored>, StoreError> {
    list_with(store, prefix, n, Stored::decode)
}

/// As [`list`], heads only (empty bodies).
pub fn list_heads(store: &Store, prefix: &[u8], n: usize) -> Result<Vec<Stored>, StoreError> {
    list_with(store, prefix, n, Stored::decode_head)
}

fn list_with(
    store: &Store,
    prefix: &[u8],
    n: usize,
    decode: fn(&[u8]) -> Option<Stored>,
) -> Result<Vec<Stored>, StoreError> {
    let mut out = Vec::new();
    let mut bad = None;
    store.scan(Cf::Settle, prefix, |k, v| {
        if !k.starts_with(prefix) || out.len() >= n {
            return false;
        }
        match decode(v) {
            Some(s) => out.push(s),
            None => bad = Some(k.to_vec()),
        }
        bad.is_none()
    })?;
    match bad {
        // A batch that cannot be read cannot be sent: stop loudly.
        Some(k) => Err(StoreError::Corrupt {
            cf: "settle",
            detail: format!(
                "stored batch {} does not decode",
                String::from_utf8_lossy(&k[..k.len().min(40)])
            ),
        }),
        None => Ok(out),
    }
}

/// The batch under `prefix` whose range holds journal record `seq`, head
/// only, if there is one.
pub fn holding(store: &Store, prefix: &[u8], seq: u64) -> Result<Option<Stored>, StoreError> {
    let mut found = None;
    store.scan_back(Cf::Settle, &key(prefix, seq), |k, v| {
        if k.starts_with(prefix) {
            found = Stored::decode_head(v).filter(|s| s.first_seq <= seq && seq <= s.last_seq);
        }
        false
    })?;
    Ok(found)
}

/// One stored batch, body included.
fn load(store: &Store, prefix: &[u8], first_seq: u64) -> Result<Option<Stored>, StoreError> {
    Ok(store
        .get(Cf::Settle, &key(prefix, first_seq))?
        .and_then(|v| Stored::decode(&v)))
}

/// How many batches of a sink are parked (at most [`PARKED_COUNTED_MAX`]).
pub fn count(store: &Store, sink: &str) -> Result<u64, StoreError> {
    let prefix = parked_prefix(sink);
    let mut n = 0u64;
    store.scan(Cf::Settle, &prefix, |k, _| {
        if !k.starts_with(&prefix) {
            return false;
        }
        n += 1;
        n < PARKED_COUNTED_MAX
    })?;
    Ok(n)
}

/// Parked batches counted for status and warnings, at most.
pub const PARKED_COUNTED_MAX: u64 = 10_000;

/// What a send came to.
enum Sent {
    Acked,
    /// The receiver answered, but not what was sent, or refused it for a
    /// reason that retrying cannot fix.
    Park(String),
    /// Try again later.
    Retry(String),
}

/// Why a receiver could not be reached (the send is retried).
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("no connection within {0} ms")]
    Timeout(u64),
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{0} has no address")]
    NoAddress(String),
    #[error("{0} is not a valid server name")]
    ServerName(String),
    #[error("connecting: {0}")]
    Connect(#[from] crate::net::client::ClientError),
}

/// How to reach a receiver; shared by the sends in flight, each on its own
/// connection.
struct Sink {
    cfg: SinkConfig,
    signer: Signer,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    host: String,
    port: u16,
    /// `host[:port]` as the URL has it: the `Host` of every request.
    authority: String,
    /// The origin-form target: path and query.
    path: String,
}

/// A send in flight, when it ends: the connection to use again (`None`:
/// closed), the batch, and what came of it.
type Done = (Option<Connection>, Stored, Sent);

impl Sink {
    /// Connects within `timeout_ms` (a receiver that accepts TCP and then
    /// stalls the handshake must not hold a send slot forever).
    async fn connect(&self) -> Result<Connection, ConnectError> {
        let ms = self.cfg.timeout_ms;
        tokio::time::timeout(Duration::from_millis(ms), self.connect_now())
            .await
            .unwrap_or(Err(ConnectError::Timeout(ms)))
    }

    async fn connect_now(&self) -> Result<Connection, ConnectError> {
        let host = || self.host.clone();
        let addr = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| ConnectError::Resolve {
                host: host(),
                source,
            })?
            .next()
            .ok_or_else(|| ConnectError::NoAddress(host()))?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|_| ConnectError::ServerName(host()))?;
        Ok(Connection::tls_named(
            addr,
            name,
            &self.authority,
            self.tls.clone(),
            Protocol::Http1,
        )
        .await?)
    }

    async fn send(self: Arc<Self>, conn: Option<Connection>, b: Stored) -> Done {
        let mut conn = match conn.filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => match self.connect().await {
                Ok(c) => c,
                Err(e) => return (None, b, Sent::Retry(e.to_string())),
            },
        };
        let sent = self.exchange(&mut conn, &b).await;
        let keep = match sent {
            Sent::Retry(_) => None,
            _ => Some(conn),
        };
        (keep, b, sent)
    }

    async fn exchange(&self, conn: &mut Connection, b: &Stored) -> Sent {
        let signature = self.signer.sign(&b.body);
        let headers = [
            ("content-type", "application/json"),
            ("idempotency-key", b.id.as_str()),
            ("x-onecard-signature", signature.as_str()),
        ];
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let answer = tokio::time::timeout(
            timeout,
            conn.send(Method::POST, &self.path, &headers, b.body.to_vec()),
        )
        .await;
        let a = match answer {
            Err(_) => return Sent::Retry(format!("no answer within {} ms", self.cfg.timeout_ms)),
            Ok(Err(e)) => return Sent::Retry(format!("{e}")),
            Ok(Ok(a)) => a,
        };
        match a.status {
            StatusCode::OK => match serde_json::from_slice::<Ack>(&a.body) {
                Ok(ack)
                    if ack.batch_id == b.id
                        && ack.count == b.count
                        && ack.total_fen == b.total_fen =>
                {
                    Sent::Acked
                }
                Ok(ack) => Sent::Park(format!(
                    "acknowledged {} events, {} fen for {}; sent {} events, {} fen",
                    ack.count, ack.total_fen, ack.batch_id, b.count, b.total_fen
                )),
                Err(_) => Sent::Park("the acknowledgement is not readable".into()),
            },
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                Sent::Retry(format!("answered {s}"))
            }
            // The status and the receiver's error code only: a body could
            // echo an event, card number included, into the gateway's logs.
            s => Sent::Park(format!(
                "refused with {s} ({})",
                a.json()["error"]["code"]
                    .as_str()
                    .unwrap_or("no error code")
            )),
        }
    }
}

/// Runs delivery for one sink until `stop` fires. In a cluster, only while
/// this node holds the sink's lease: it waits for the lease, delivers
/// while it holds it, and waits again if it loses it.
pub async fn run(
    gw: Arc<Gateway>,
    cfg: SinkConfig,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let name = cfg.name.clone();
    let result = match gw.leases.clone() {
        None => {
            let writes = Writes { cluster: None };
            run_inner(&gw, &cfg, &tls, &writes, &mut stop).await
        }
        Some(leases) => run_leased(&gw, &cfg, &tls, &leases, &mut stop).await,
    };
    if let Err(e) = result {
        tracing::error!(sink = %name, error = %e, "settlement stopped");
        metrics::gauge!("onecard_settle_failed", "sink" => name).set(1.0);
    }
}

/// Cluster mode: delivers the sink for the whole cluster while this node
/// holds its lease. A node that takes the lease first applies everything
/// the stream holds (its predecessor's last batches and acknowledgements),
/// then starts from the sink's replicated state: the same sealed batches,
/// with the same ids, go out again, and a receiver that booked one
/// acknowledges it again. Its writes are fenced on the sink, so a
/// predecessor that has not noticed it lost the lease cannot write over it.
async fn run_leased(
    gw: &Arc<Gateway>,
    cfg: &SinkConfig,
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    leases: &Arc<crate::store::replicated::Leases>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Stop> {
    let name = cfg.name.clone();
    let status = gw
        .settlement
        .get(&name)
        .cloned()
        .expect("every configured sink has a status");
    let writes = Writes {
        cluster: Some((gw.journal.clone(), name.as_str().into())),
    };
    let wait = leases.ttl / 3;
    let what = format!("settle/{name}");
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let mut lease = match leases.try_acquire(&what).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                status.set_deliverer(leases.holder(&what).await, false);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return Ok(()),
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(sink = %name, error = %e, "settlement: cannot ask for the sink's lease; asking again");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return Ok(()),
                }
                continue;
            }
        };
        if let Err(e) = leases.caught_up().await {
            tracing::warn!(sink = %name, error = %e, "settlement: holding the lease but not caught up; giving it back");
            leases.release(lease).await;
            continue;
        }
        tracing::info!(sink = %name, "settlement: this node delivers the sink for the cluster");
        status.set_deliverer(gw.config.cluster.as_ref().map(|c| c.node.clone()), true);
        metrics::counter!("onecard_settle_takeovers_total", "sink" => name.clone()).increment(1);
        metrics::gauge!("onecard_settle_delivering", "sink" => name.clone()).set(1.0);
        // Delivery runs until the outer stop, or until a renewal fails.
        let (inner_tx, mut inner_stop) = watch::channel(false);
        let mut outer = stop.clone();
        let renewals = async {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {
                        if let Err(e) = leases.renew(&mut lease).await {
                            tracing::warn!(sink = %name, error = %e, "settlement: the sink's lease was not renewed; stopping delivery here");
                            return false;
                        }
                    }
                    _ = outer.changed() => return true,
                }
            }
        };
        let delivery = async {
            loop {
                match run_inner(gw, cfg, tls, &writes, &mut inner_stop).await {
                    // Another node wrote the sink's state (this node had
                    // not seen all of it): start over from it, still
                    // holding the lease; a successor's writes win.
                    Err(Stop::Stale) => {
                        tracing::info!(sink = %name, "settlement: the sink's state moved elsewhere; reading it again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if *inner_stop.borrow() {
                            return Ok(());
                        }
                    }
                    other => return other,
                }
            }
        };
        tokio::pin!(delivery);
        let stopping = tokio::select! {
            r = &mut delivery => match r {
                Ok(()) => true,
                Err(Stop::Cut(e)) => {
                    tracing::warn!(sink = %name, error = %e, "settlement: cannot write to the cluster; giving the sink up for now");
                    false
                }
                Err(e) => return Err(e),
            },
            outer_stop = renewals => {
                let _ = inner_tx.send(true);
                let _ = (&mut delivery).await;
                outer_stop
            }
        };
        status.set_deliverer(None, false);
        metrics::gauge!("onecard_settle_delivering", "sink" => name.clone()).set(0.0);
        leases.release(lease).await;
        if stopping || *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}

async fn run_inner(
    gw: &Arc<Gateway>,
    cfg: &SinkConfig,
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    writes: &Writes,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Stop> {
    let (cfg, tls) = (cfg.clone(), tls.clone());
    let store = gw.store.clone();
    let name = cfg.name.clone();
    let uri: http::Uri = cfg.url.parse().expect("validated with the config");
    let sink = Arc::new(Sink {
        signer: Signer::new(cfg.algorithm, cfg.signing_key().expect("validated")),
        host: uri.host().unwrap_or("").trim_matches(['[', ']']).to_owned(),
        port: uri.port_u16().unwrap_or(443),
        authority: uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default(),
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        tls,
        cfg: cfg.clone(),
    });
    let concurrency = cfg.concurrency;
    // Batches on their way (by first seq), the sends, and connections
    // free for the next send.
    let mut inflight = std::collections::HashSet::new();
    let mut sends: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    let mut idle: Vec<Connection> = Vec::new();
    let batcher = Batcher::new(Rules {
        sink: name.clone(),
        scenarios: cfg.scenario_list().expect("validated"),
        cards: Cards::of(&gw.policy.regions, &cfg.partners),
        events_max: cfg.events_max,
        bytes_max: cfg.bytes_max,
        age_max_ms: cfg.age_max_ms,
        day_offset_minutes: gw.policy.day_offset_minutes,
    });
    let backoff = Backoff {
        base_ms: cfg.backoff_base_ms,
        max_ms: cfg.backoff_max_ms,
    };
    let mut circuit = Circuit::new(cfg.circuit_failures, cfg.circuit_pause_ms);
    let mut jitter = onecard_core::rng::Rng::new(gw.now_ms() as u64 ^ name.len() as u64);
    let (bp, pp, ck) = (batch_prefix(&name), parked_prefix(&name), cursor_key(&name));
    let next_seq = store.get_u64(Cf::Settle, &ck)?.unwrap_or(0);
    let mut durable_cursor = next_seq;
    let mut cursor_written_at = Instant::now();
    let mut follow = Follow {
        batcher,
        read_ahead: VecDeque::new(),
        next_seq,
    };
    // Failed attempts and the next try of each batch that failed: per
    // batch, since with several in flight one batch's failures must
    // neither be forgiven by another's success nor count against it.
    let mut retries: std::collections::HashMap<u64, (u32, Instant)> =
        std::collections::HashMap::new();
    let labels = [("sink", name.clone())];
    // Stored batches awaiting acknowledgement: counted once at start, then
    // kept up to date, for the backlog gauges and the bound.
    let mut backlog = Backlog::default();
    store.scan(Cf::Settle, &bp, |k, v| {
        if !k.starts_with(&bp) {
            return false;
        }
        if let Some(b) = Stored::decode_head(v) {
            backlog.add(&b);
        }
        true
    })?;
    let mut full_warned = false;
    let status = gw
        .settlement
        .get(&name)
        .cloned()
        .expect("every configured sink has a status");
    // Counted once here, then kept by park and replay: status and /readyz
    // read the number without touching the store.
    status.set_parked({
        let (store, name) = (store.clone(), name.clone());
        crate::store::blocking(move || count(&store, &name)).await?
    });
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        // Follow the journal; store every batch that seals. At the backlog
        // bound, stop: the events wait in the journal, on disk, and
        // authorization does not notice.
        let full = backlog.batches >= cfg.backlog_batches_max;
        // Seal only a few batches ahead of the sends: the journal already
        // holds the events on disk, and a batch sealed early is a quarter
        // megabyte written through RocksDB (WAL, flush, compaction) that
        // then waits. Sealing everything ahead halved the drain rate of a
        // million-event backlog.
        let ahead = cfg
            .backlog_batches_max
            .min(SEAL_AHEAD_PER_SEND * concurrency);
        if full && !full_warned {
            tracing::warn!(sink = %name, batches = backlog.batches, "settlement backlog at its bound; new events wait in the journal until the receiver catches up");
        }
        full_warned = full;
        if status.take_replay() {
            let (back, ops) = {
                let (store, name) = (store.clone(), name.clone());
                crate::store::blocking(move || replay(&store, &name)).await?
            };
            writes.write(&store, ops, true).await?;
            status.set_parked(0);
            tracing::info!(sink = %name, batches = back.len(), "parked batches put back in line by an operator");
            for b in &back {
                backlog.add(b);
            }
        }
        // Reading and decoding the journal and the synced writes are
        // blocking work: off the async workers, which serve terminals.
        let now_ms = gw.now_ms();
        let mut room = ahead.saturating_sub(backlog.batches);
        if writes.cluster.is_some() {
            // One batch per replicated write: a write is one message.
            room = room.min(1);
        }
        // On the blocking pool, the follower's state moved there and back
        // (`block_in_place` in this loop would hand a worker's place to a
        // new thread at every pass: the thread churn issue 19's soak
        // found in the rollout follower).
        let (back, filled) = {
            let (store, ck, bp) = (store.clone(), ck.clone(), bp.clone());
            let mut f = follow;
            crate::store::blocking(move || {
                let filled = fill(&store, &mut f, durable_cursor, (&ck, &bp), room, now_ms)?;
                Ok((f, filled))
            })
            .await?
        };
        follow = back;
        let Filled {
            read_any,
            stored,
            write,
        } = filled;
        match write {
            Some((ops, cursor)) if !stored.is_empty() => {
                writes.write(&store, ops, true).await?;
                durable_cursor = cursor;
                crate::store::crashpoint::hit("settle.after_seal");
            }
            // Only the cursor moved. Unsynced: losing it costs a re-read
            // from the last synced cursor, which rebuilds the same open
            // batch. In a cluster every write is a replicated message: the
            // cursor alone goes at most every few seconds.
            Some((ops, cursor))
                if writes.cluster.is_none()
                    || cursor_written_at.elapsed() >= CLUSTER_CURSOR_EVERY =>
            {
                writes.write(&store, ops, false).await?;
                durable_cursor = cursor;
                cursor_written_at = Instant::now();
                crate::store::crashpoint::hit("settle.after_cursor");
            }
            _ => {}
        }
        for b in &stored {
            backlog.add(b);
            metrics::counter!("onecard_settle_batches_total", "sink" => name.clone(), "outcome" => "sealed").increment(1);
        }

        // Keep up to `concurrency` of the oldest stored batches on their
        // way, each on its own connection, if the circuit, the backoff and
        // the operators allow. Paused: batches keep sealing (up to the
        // bound) and wait.
        let window = concurrency + inflight.len();
        let mut waiting = list_heads(&store, &bp, window)?;
        // Batches that give money back may have to wait for older ones
        // (below): look a little further, so that the batches behind them
        // still go and one held refund does not stop the sink.
        let held = waiting.iter().filter(|b| b.gives_back()).count();
        if held > 0 && waiting.len() == window {
            waiting = list_heads(&store, &bp, window + held.min(HELD_BACK_MAX))?;
        }
        backlog.publish(&labels, waiting.first(), gw.now_ms());
        status.set_backlog(
            backlog.batches as u64,
            backlog.events,
            waiting.first().map(|b| b.oldest_at_ms),
        );
        status.set_cursor(follow.next_seq, gw.journal.last_seq());
        metrics::gauge!("onecard_settle_unread_records", &labels)
            .set((gw.journal.last_seq() + 1).saturating_sub(follow.next_seq) as f64);
        status.set_circuit(circuit.state().level());
        metrics::gauge!("onecard_settle_circuit", &labels).set(f64::from(circuit.state().level()));
        if !status.is_paused() {
            let now = Instant::now();
            let mut parked_first: Option<Option<u64>> = None;
            for (i, b) in waiting.into_iter().enumerate() {
                if inflight.contains(&b.first_seq) {
                    continue;
                }
                // A batch that gives money back goes only once every older
                // batch of the sink is booked: the charge it reverses is in
                // one of them, and a receiver must never see a refund of a
                // charge it has not booked (with several sends in flight, or
                // an older batch parked, it could).
                if b.gives_back() {
                    let parked = match parked_first {
                        Some(p) => p,
                        None => {
                            let p = list_heads(&store, &pp, 1)?.first().map(|p| p.first_seq);
                            *parked_first.insert(p)
                        }
                    };
                    if i > 0 || parked.is_some_and(|p| p < b.first_seq) {
                        continue;
                    }
                }
                if retries.get(&b.first_seq).is_some_and(|r| r.1 > now) {
                    // Backing off. With one send at a time, batches go in
                    // journal order: the next waits too.
                    if concurrency == 1 {
                        break;
                    }
                    continue;
                }
                if sends.len() >= concurrency || !circuit.allow(gw.now_ms()) {
                    break;
                }
                let Some(b) = load(&store, &bp, b.first_seq)? else {
                    continue;
                };
                inflight.insert(b.first_seq);
                sends.spawn(sink.clone().send(idle.pop(), b));
            }
        }

        // What has come back; when there is nothing else to do, wait for
        // a send, the poll interval or the stop.
        let mut done = Vec::new();
        while let Some(r) = sends.try_join_next() {
            done.push(r);
        }
        if done.is_empty() && !read_any {
            tokio::select! {
                Some(r) = sends.join_next(), if !sends.is_empty() => done.push(r),
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
        let level_before = circuit.state().level();
        for r in done {
            let (conn, b, outcome) = match r {
                Ok(d) => d,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => unreachable!("sends are never aborted while the task runs"),
            };
            inflight.remove(&b.first_seq);
            idle.extend(conn);
            match outcome {
                Sent::Acked => {
                    // Booked by the receiver, not yet forgotten here.
                    crate::store::crashpoint::hit("settle.after_send");
                    backlog.remove(&b);
                    status.acked(gw.now_ms());
                    circuit.success();
                    retries.remove(&b.first_seq);
                    let ops = {
                        let (store, bp, name, b) =
                            (store.clone(), bp.clone(), name.clone(), b.clone());
                        crate::store::blocking(move || acknowledge(&store, &bp, &name, &b)).await?
                    };
                    writes.write(&store, ops, true).await?;
                    crate::store::crashpoint::hit("settle.after_ack");
                    metrics::counter!("onecard_settle_batches_total", "sink" => name.clone(), "outcome" => "acked").increment(1);
                    metrics::counter!("onecard_settle_events_total", "sink" => name.clone())
                        .increment(b.count);
                    metrics::histogram!("onecard_settle_delivery_seconds", &labels)
                        .record((gw.now_ms() - b.oldest_at_ms).max(0) as f64 / 1000.0);
                }
                Sent::Park(why) => {
                    circuit.success();
                    retries.remove(&b.first_seq);
                    writes.write(&store, park(&bp, &pp, &b, &why), true).await?;
                    status.parked_add(1);
                    backlog.remove(&b);
                    parked(&name, &b, &why);
                }
                Sent::Retry(why) => {
                    let circuit_was_closed =
                        matches!(circuit.state(), CircuitState::Closed { failures: 0 });
                    circuit.failure(gw.now_ms());
                    metrics::counter!("onecard_settle_batches_total", "sink" => name.clone(), "outcome" => "failed").increment(1);
                    // Attempts count only while the receiver is otherwise
                    // reachable (circuit closed): an outage is the
                    // circuit's business and parks nothing.
                    let mut attempts = retries.get(&b.first_seq).map_or(0, |r| r.0);
                    if matches!(circuit.state(), CircuitState::Closed { .. }) {
                        attempts += 1;
                    }
                    if attempts >= cfg.attempts_max {
                        let why = format!("{attempts} attempts failed; the last: {why}");
                        writes.write(&store, park(&bp, &pp, &b, &why), true).await?;
                        status.parked_add(1);
                        backlog.remove(&b);
                        parked(&name, &b, &why);
                        retries.remove(&b.first_seq);
                    } else {
                        // Once per outage at warn (the circuit's state and
                        // the metrics tell the rest): an outage of minutes
                        // must not flood the log.
                        if circuit_was_closed {
                            tracing::warn!(sink = %name, batch = %b.id, attempts, why, "delivery failed; will retry");
                        } else {
                            tracing::debug!(sink = %name, batch = %b.id, attempts, why, "delivery failed again; will retry");
                        }
                        let at = Instant::now() + backoff.delay(attempts, jitter.next_u64());
                        retries.insert(b.first_seq, (attempts, at));
                    }
                }
            }
        }
        match (level_before, circuit.state().level()) {
            (0, 2) => {
                tracing::warn!(sink = %name, pause_ms = cfg.circuit_pause_ms, "circuit open: the receiver keeps failing; probing after each pause")
            }
            (1 | 2, 0) => {
                tracing::info!(sink = %name, "the receiver answers again; circuit closed")
            }
            _ => {}
        }
    }
}

/// What one pass over the journal came to: whether anything was read, the
/// batches sealed, and what to write for them (all or nothing, synced when
/// it stores batches) with the cursor it moves to.
struct Filled {
    read_any: bool,
    stored: Vec<Stored>,
    write: Option<(Vec<Op>, u64)>,
}

/// The delivery task's place in the journal: the batcher with its open
/// batches, the records read and decoded but not offered yet, and the next
/// record to read.
struct Follow {
    batcher: Batcher,
    read_ahead: VecDeque<(u64, DecisionRecord)>,
    next_seq: u64,
}

/// One pass over the journal: offers records from `next_seq` on to the
/// batcher and returns every batch that seals (at most `room` of them) and
/// the write that stores them with the cursor past the last.
fn fill(
    store: &Store,
    follow: &mut Follow,
    durable_cursor: u64,
    (ck, bp): (&[u8], &[u8]),
    room: usize,
    now_ms: i64,
) -> Result<Filled, StoreError> {
    // Records read and decoded but not offered yet wait in `read_ahead`
    // (from `next_seq` on): when only a batch or two have room, the rest
    // of a read is not decoded again on the next pass.
    let Follow {
        batcher,
        read_ahead,
        next_seq,
    } = follow;
    if room > 0 && read_ahead.is_empty() {
        read_ahead.extend(crate::store::journal::read(store, *next_seq, READ_BATCH)?);
    }
    let mut read_any = false;
    let mut sealed = Vec::new();
    while sealed.len() < room {
        let Some((seq, r)) = read_ahead.pop_front() else {
            break;
        };
        read_any = true;
        sealed.extend(batcher.offer(seq, &r));
        *next_seq = seq + 1;
    }
    if sealed.len() < room {
        sealed.extend(batcher.tick(now_ms));
    }
    let stored: Vec<Stored> = sealed.into_iter().map(Stored::from).collect();
    // Where a restart reads the journal again: the first record that
    // shaped the open batch, not the one after the last stored event (a
    // reversal that took a charge out of the open batch may lie between
    // them, and offered again without its charge it would go out as a
    // refund of a charge never sent).
    let resume = batcher.resume_seq(*next_seq);
    let cursor = Op::Put(Cf::Settle, ck.to_vec(), resume.to_be_bytes().to_vec());
    let write = if !stored.is_empty() {
        let mut ops: Vec<Op> = stored
            .iter()
            .map(|b| {
                debug_assert!(b.last_seq < resume, "a stored batch is behind the cursor");
                Op::Put(Cf::Settle, key(bp, b.first_seq), b.encode())
            })
            .collect();
        ops.push(cursor);
        Some((ops, resume))
    } else if resume > durable_cursor {
        // Nothing new is stored, and everything before `resume` is in a
        // stored batch or cancelled out: skip it on the next start.
        Some((vec![cursor], resume))
    } else {
        None
    };
    Ok(Filled {
        read_any,
        stored,
        write,
    })
}

/// Batches and events stored and not yet acknowledged.
#[derive(Debug, Default)]
struct Backlog {
    batches: usize,
    events: u64,
}

impl Backlog {
    fn add(&mut self, b: &Stored) {
        self.batches += 1;
        self.events += b.count;
    }
    fn remove(&mut self, b: &Stored) {
        self.batches = self.batches.saturating_sub(1);
        self.events = self.events.saturating_sub(b.count);
    }
    fn publish(&self, labels: &[(&'static str, String); 1], oldest: Option<&Stored>, now_ms: i64) {
        metrics::gauge!("onecard_settle_backlog_batches", labels).set(self.batches as f64);
        metrics::gauge!("onecard_settle_backlog_events", labels).set(self.events as f64);
        let age = oldest.map_or(0, |b| (now_ms - b.oldest_at_ms).max(0));
        metrics::gauge!("onecard_settle_backlog_oldest_seconds", labels).set(age as f64 / 1000.0);
    }
}

/// Says that a batch was parked: an error log and the metric operators
/// alert on.
fn parked(sink: &str, b: &Stored, why: &str) {
    tracing::error!(sink, batch = %b.id, why, "batch parked");
    metrics::counter!("onecard_settle_batches_total", "sink" => sink.to_owned(), "outcome" => "parked").increment(1);
}

/// Puts every parked batch of a sink back in line (an operator's replay,
/// once the receiver is fixed), in one synced write, and returns them. Ids
/// and bytes are unchanged, so a receiver that booked one answers with its
/// acknowledgement again. Run by the delivery task, which counts them.
fn replay(store: &Store, sink: &str) -> Result<(Vec<Stored>, Vec<Op>), StoreError> {
    let (bp, pp) = (batch_prefix(sink), parked_prefix(sink));
    let parked = list(store, &pp, usize::MAX)?;
    let mut ops = Vec::with_capacity(parked.len() * 2);
    for b in &parked {
        let back = Stored {
            parked: None,
            ..b.clone()
        };
        ops.push(Op::Delete(Cf::Settle, key(&pp, b.first_seq)));
        ops.push(Op::Put(Cf::Settle, key(&bp, b.first_seq), back.encode()));
    }
    Ok((parked, ops))
}

/// Moves a batch from waiting to parked, in one synced write.
fn park(bp: &[u8], pp: &[u8], b: &Stored, why: &str) -> Vec<Op> {
    let parked = Stored {
        parked: Some(why.to_owned()),
        ..b.clone()
    };
    vec![
        Op::Delete(Cf::Settle, key(bp, b.first_seq)),
        Op::Put(Cf::Settle, key(pp, b.first_seq), parked.encode()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Stored {
        Stored {
            id: "transport-0000000000000001-0000000000000002".into(),
            first_seq: 1,
            last_seq: 2,
            count: 2,
            total_fen: 400,
            oldest_at_ms: 7,
            body: bytes::Bytes::from_static(b"{\"batch_id\":\"x\",\"events\":[{\"a\":\"b\\nc\"}]}"),
            summary: vec![DaySite {
                day: 20_000,
                site: "line-12".into(),
                charges: 2,
                charged_fen: 400,
                ..DaySite::default()
            }],
            parked: Some("why".into()),
        }
    }

    #[test]
    fn a_stored_batch_round_trips_head_and_body() {
        let s = stored();
        let v = s.encode();
        assert_eq!(Stored::decode(&v), Some(s.clone()));
        let head = Stored::decode_head(&v).unwrap();
        assert!(head.body.is_empty());
        assert_eq!(head.id, s.id);
        assert_eq!(Stored::decode(b"not a batch\n{}"), None);
    }

    #[test]
    fn a_batch_stored_by_the_earlier_version_still_reads() {
        // Before the head line: one JSON object, the body a string.
        let s = stored();
        let mut old = serde_json::to_value(&s).unwrap();
        old["body"] = serde_json::Value::from(std::str::from_utf8(&s.body).unwrap());
        old.as_object_mut().unwrap().remove("summary");
        let v = serde_json::to_vec(&old).unwrap();
        assert!(!v.contains(&b'\n'));
        let back = Stored::decode(&v).unwrap();
        assert_eq!((back.id.as_str(), &back.body), (s.id.as_str(), &s.body));
        assert!(back.summary.is_empty());
        assert_eq!(Stored::decode_head(&v).unwrap().total_fen, 400);
    }
}
