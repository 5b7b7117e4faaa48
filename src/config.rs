//! The gateway's configuration: one typed struct read from TOML.
//!
//! Every key has a default constant below and a line in `config/README.md`;
//! unknown keys are rejected with a message naming the key, so a typo in a
//! limit never silently falls back to a default. Relative paths in a config
//! file are taken relative to that file's directory (`data_dir` too), so
//! the file means the same from any working directory; `--data-dir` on the
//! command line is relative to the working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use onecard_core::authz::{Policy, PolicyConfig, ScenariosConfig, Sections};
use onecard_core::model::Scenario;

pub const DATA_DIR_DEFAULT: &str = "./data";
pub const TERMINAL_ADDR_DEFAULT: &str = "0.0.0.0:8443";
pub const ADMIN_ADDR_DEFAULT: &str = "127.0.0.1:9090";
pub const CONNECTIONS_MAX_DEFAULT: usize = 20_000;
/// `0`: [`REQUESTS_IN_FLIGHT_PER_CPU`] for each CPU the gateway may use.
pub const REQUESTS_IN_FLIGHT_MAX_DEFAULT: usize = 0;
/// Requests in flight per CPU by default: a bound on memory, not the
/// overload control. Past the knee a 2-CPU gateway's queue is its CPUs'
/// run queue, which the runtime's lag sees (`overload_lag_ms`); a cap that
/// bites first refuses in bursts (a slow `fdatasync` holds a group commit's
/// requests) and cut goodput at twice the knee to 34-86 % of the knee
/// where 512 per CPU kept it at 100-116 % (`loadtest/overload`, issue 19's
/// note has the runs).
pub const REQUESTS_IN_FLIGHT_PER_CPU: usize = 512;
pub const BODY_BYTES_MAX_DEFAULT: usize = 16 * 1024;
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 5_000;
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 120_000;
pub const TERMINAL_RATE_PER_S_DEFAULT: u32 = 50;
pub const TERMINAL_BURST_DEFAULT: u32 = 100;
pub const TERMINALS_TRACKED_MAX_DEFAULT: usize = 200_000;
pub const SHUTDOWN_GRACE_MS_DEFAULT: u64 = 10_000;
/// The runtime lag past which terminals' requests are shed: CoDel's
/// order of target, a run queue a few milliseconds deep (at the knee the
/// lag averages 1-2 ms). The decided p99 at twice the knee follows it
/// steeply, from tens of milliseconds at 2-4 ms to 690 ms at 40 (the
/// first default); README's "Overload" table has the runs.
pub const OVERLOAD_LAG_MS_DEFAULT: u64 = 4;
/// How long a terminal refused by load shedding stays away. Each refusal
/// takes this many seconds of one terminal's load away, so the longer it
/// is, the fewer refusals (each costing nearly what a decision costs: the
/// TLS record, the HTTP head) shed the same excess; 2 s keeps the gateway's
/// recovery after a flood within seconds.
pub const OVERLOAD_RETRY_AFTER_S_DEFAULT: u32 = 2;
pub const JOURNAL_BATCH_EVENTS_MAX_DEFAULT: usize = 2_048;
pub const JOURNAL_QUEUE_EVENTS_MAX_DEFAULT: usize = 16_384;
/// A commit waiting this long means a stalled disk: no new decision is
/// taken (503) until it writes again.
pub const JOURNAL_STALL_MS_DEFAULT: u64 = 2_000;
pub const IDEMPOTENCY_RETENTION_S_DEFAULT: u64 = 72 * 3600;
pub const STORE_BLOCK_CACHE_MB_DEFAULT: usize = 256;
pub const STORE_MEMTABLES_MB_DEFAULT: usize = 256;
pub const STORE_OPEN_FILES_MAX_DEFAULT: u32 = 1024;
pub const IDEMPOTENCY_CLEANUP_INTERVAL_S_DEFAULT: u64 = 60;

/// The files of the development CA and its certificates under
/// `<data_dir>/certs` (`terminal.dev_certs`), which the config's default
/// paths name.
pub mod cert_files {
    pub const CA_CERT: &str = "terminal-ca.pem";
    pub const CA_KEY: &str = "terminal-ca.key";
    pub const SERVER_CERT: &str = "server.pem";
    pub const SERVER_KEY: &str = "server.key";
    pub const TERMINALS_DIR: &str = "terminals";
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl From<onecard_core::Invalid> for ConfigError {
    fn from(e: onecard_core::Invalid) -> ConfigError {
        ConfigError::Invalid(e.0)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where RocksDB (and development certificates) live.
    pub data_dir: PathBuf,
    pub terminal: TerminalConfig,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub journal: JournalConfig,
    pub idempotency: IdempotencyConfig,
    pub store: StoreConfig,
    pub policy: PolicyConfig,
    pub scenarios: ScenariosConfig,
    pub settlement: SettlementConfig,
    pub qr: QrConfig,
    pub privacy: PrivacyConfig,
    pub offline: OfflineConfig,
    pub transit: onecard_core::scenario::transit::TransitConfig,
    pub culture: onecard_core::scenario::culture::CultureConfig,
    pub access: onecard_core::scenario::access::AccessConfig,
    pub identity: onecard_core::scenario::identity::IdentityConfig,
    pub payment: onecard_core::scenario::payment::PaymentConfig,
    pub medical: onecard_core::scenario::medical::MedicalConfig,
    pub regions: onecard_core::scenario::region::RegionsConfig,
    pub disbursement: DisbursementConfig,
    pub applications: ApplicationsConfig,
    pub catalogue: onecard_core::catalogue::Catalogue,
    pub log: LogConfig,
    /// Cluster mode on NATS JetStream; absent: the single node on its own
    /// RocksDB journal.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: several gateways serve one city on one NATS JetStream
/// cluster. Every decision is published to its card's subject and answered
/// only once the stream's quorum has it; local RocksDB is a cache rebuilt
/// from the stream (see `store::replicated`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This gateway's name in the cluster: 1 to 32 of `a-z0-9_-`.
    pub node: String,
    /// NATS servers to connect to (`nats://host:port` or `tls://host:port`);
    /// the client moves to another one when its server goes away.
    pub urls: Vec<String>,
    /// NATS user and password, or a token; none: no authentication.
    pub user: Option<String>,
    pub password: Option<String>,
    /// The environment variable holding the password instead.
    pub password_env: Option<String>,
    pub token_env: Option<String>,
    /// CA of the NATS servers' certificates (PEM): TLS to NATS is required
    /// when set.
    pub ca: Option<PathBuf>,
    /// The journal stream's name, and the prefix of its subjects.
    pub stream: String,
    pub subject_prefix: String,
    /// Copies of every stream message: 3 tolerates the loss of any one
    /// NATS node; 1 is for a single development server only.
    pub replicas: usize,
    /// How long a publish may wait for the quorum's acknowledgement before
    /// the request is answered `503` (terminals then use their offline
    /// rules).
    pub publish_timeout_ms: u64,
    /// How long NATS remembers a message id to drop a duplicate publish:
    /// the window in which a retry sent to another node is recognised by
    /// the stream itself (after it, every node has applied the first).
    pub duplicate_window_s: u64,
    /// How long the journal stream keeps a message.
    pub max_age_days: u64,
    /// How many times one request is decided again after losing a race
    /// for its card to another node before it is answered `503`.
    pub conflict_retries_max: u32,
    /// This node may deliver the settlement sinks for the whole cluster
    /// (every node holds the same journal with the same sequence numbers,
    /// so its batches are the cluster's). Set it, with the same sinks, on
    /// two or more nodes: one at a time delivers each sink (it holds the
    /// sink's lease), and when it dies another takes over where it left
    /// off. Sinks on a node without it are refused.
    pub settle: bool,
    /// How long a sink's delivery lease lasts unless its holder renews it
    /// (every third of it): the longest a sink waits for another node to
    /// take over after its delivering node died.
    pub settle_lease_ms: u64,
}

pub const CLUSTER_PUBLISH_TIMEOUT_MS_DEFAULT: u64 = 2_000;

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: String::new(),
            urls: vec!["nats://127.0.0.1:4222".into()],
            user: None,
            password: None,
            password_env: None,
            token_env: None,
            ca: None,
            stream: "ONECARD".into(),
            subject_prefix: "onecard".into(),
            replicas: 3,
            publish_timeout_ms: CLUSTER_PUBLISH_TIMEOUT_MS_DEFAULT,
            duplicate_window_s: 600,
            max_age_days: 400,
            conflict_retries_max: 8,
            settle: false,
            settle_lease_ms: 5_000,
        }
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let name_ok = |s: &str, extra: &[u8]| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
        };
        if !name_ok(&self.node, b"_-") {
            return bad("cluster.node must be 1 to 32 of a-z, 0-9, _ and -".into());
        }
        if self.urls.is_empty() {
            return bad("cluster.urls must name at least one NATS server".into());
        }
        for u in &self.urls {
            let ok = ["nats://", "tls://"]
                .iter()
                .any(|s| u.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
            if !ok || u.contains('@') {
                return bad(format!(
                    "cluster.urls: `{u}` must be nats://host:port or tls://host:port, without credentials (use cluster.user)"
                ));
            }
        }
        if !self
            .stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || self.stream.is_empty()
            || self.stream.len() > 32
        {
            return bad("cluster.stream must be 1 to 32 of A-Z, a-z, 0-9, _ and -".into());
        }
        if !name_ok(&self.subject_prefix, b"_-") {
            return bad("cluster.subject_prefix must be 1 to 32 of a-z, 0-9, _ and -".into());
        }
        if !(1..=5).contains(&self.replicas) || self.replicas % 2 == 0 {
            return bad("cluster.replicas must be 1, 3 or 5".into());
        }
        if !(100..=60_000).contains(&self.publish_timeout_ms) {
            return bad("cluster.publish_timeout_ms must be 100 to 60000".into());
        }
        if !(10..=86_400).contains(&self.duplicate_window_s) {
            return bad("cluster.duplicate_window_s must be 10 to 86400".into());
        }
        if !(1..=3_650).contains(&self.max_age_days) {
            return bad("cluster.max_age_days must be 1 to 3650".into());
        }
        if !(1..=100).contains(&self.conflict_retries_max) {
            return bad("cluster.conflict_retries_max must be 1 to 100".into());
        }
        if !(1_000..=60_000).contains(&self.settle_lease_ms) {
            return bad("cluster.settle_lease_ms must be 1000 to 60000".into());
        }
        if self.password.is_some() && self.password_env.is_some() {
            return bad("cluster: set password or password_env, not both".into());
        }
        Ok(())
    }

    /// The password, from the file or its environment variable.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        match (&self.password, &self.password_env) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(var)) => std::env::var(var).map(Some).map_err(|_| {
                ConfigError::Invalid(format!(
                    "cluster.password_env: the environment variable {var} is not set"
                ))
            }),
            (None, None) => Ok(None),
        }
    }

    /// The token, from its environment variable.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        match &self.token_env {
            Some(var) => std::env::var(var).map(Some).map_err(|_| {
                ConfigError::Invalid(format!(
                    "cluster.token_env: the environment variable {var} is not set"
                ))
            }),
            None => Ok(None),
        }
    }
}

pub const DISBURSEMENT_RECORDS_MAX_DEFAULT: usize = 10_000;
/// `disbursement.records_max` may be raised this far: one batch is one
/// journal commit, and ten times the default is still a few tens of MB.
pub const DISBURSEMENT_RECORDS_MAX_LIMIT: usize = 100_000;

/// Disbursements: subsidies and wages paid into card accounts, and the
/// programmes they are paid under. No programmes: every record is refused
/// `UNKNOWN_PROGRAMME`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisbursementConfig {
    /// Records in one batch at most.
    pub records_max: usize,
    /// `[disbursement.programmes.<name>]`, by name.
    pub programmes: std::collections::BTreeMap<String, onecard_core::disburse::Programme>,
}

impl Default for DisbursementConfig {
    fn default() -> Self {
        DisbursementConfig {
            records_max: DISBURSEMENT_RECORDS_MAX_DEFAULT,
            programmes: std::collections::BTreeMap::new(),
        }
    }
}

pub const QR_LIFETIME_MAX_S_DEFAULT: i64 = 120;
pub const QR_SKEW_S_DEFAULT: i64 = 30;
pub const QR_REPLAY_CACHE_MAX_DEFAULT: usize = 2_000_000;
pub const OFFLINE_BATCH_EVENTS_MAX_DEFAULT: usize = 500;
pub const OFFLINE_FUTURE_SKEW_S_DEFAULT: i64 = 300;

/// Scans: the issuer keys that sign dynamic QR codes, and how long a code
/// may live. No keys: scans are refused with a clear error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QrConfig {
    /// The longest `exp - iat` accepted.
    pub lifetime_max_s: i64,
    /// Clock difference tolerated between issuer, phone and gateway.
    pub skew_s: i64,
    /// Codes remembered for single use at most; at about
    /// scans/s × (lifetime + 2 × skew) it is never full.
    pub replay_cache_max: usize,
    /// Ed25519 scans that arrive together are verified as one batch
    /// (`service::sigbatch`); off, each is verified strictly on its own.
    pub batch_ed25519: bool,
    pub keys: Vec<QrKeyConfig>,
}

impl Default for QrConfig {
    fn default() -> Self {
        QrConfig {
            lifetime_max_s: QR_LIFETIME_MAX_S_DEFAULT,
            skew_s: QR_SKEW_S_DEFAULT,
            replay_cache_max: QR_REPLAY_CACHE_MAX_DEFAULT,
            batch_ed25519: true,
            keys: Vec::new(),
        }
    }
}

/// One issuer public key (`[[qr.keys]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QrKeyConfig {
    pub kid: String,
    /// `ed25519` or `sm2`.
    pub alg: String,
    /// The public key, an SPKI PEM file (`onecard qr keygen` writes one).
    pub public_key: PathBuf,
    /// RFC 3339; absent: valid from the beginning.
    pub valid_from: Option<String>,
    /// RFC 3339; absent: no end. A key past its end is retired: codes it
    /// signed are refused.
    pub valid_until: Option<String>,
}

/// `[log]`: what the gateway writes to standard error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (for people) or `json` (one object per line, for log
    /// shippers).
    pub format: LogFormat,
    /// Which events are written, as `RUST_LOG` takes it (`info`,
    /// `warn,onecard::service=debug`, ...). `RUST_LOG` wins when set;
    /// `PUT /admin/v1/log` changes it while the gateway runs.
    pub level: String,
    /// A terminal request slower than this (from received to answered)
    /// logs one warning with its phases, the masked card, terminal,
    /// scenario and auth id; 0: every request (for a short investigation).
    pub slow_request_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// The level when neither the config nor `RUST_LOG` says: the libraries'
/// chatter is left out.
pub const LOG_LEVEL_DEFAULT: &str = "info,hyper=warn,rustls=warn";

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: LOG_LEVEL_DEFAULT.into(),
            slow_request_ms: 200,
        }
    }
}

/// Personal data: the key of the keyed hash under which personal ID
/// numbers are kept (never in the clear).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    pub id_hash_key: Option<String>,
    /// The environment variable holding the key instead.
    pub id_hash_key_env: Option<String>,
}

impl PrivacyConfig {
    /// The hashing key; `None` when personal IDs are not used here.
    pub fn id_hash_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let key = match (&self.id_hash_key, &self.id_hash_key_env) {
            (None, None) => return Ok(None),
            (Some(k), None) => k.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                ConfigError::Invalid(format!(
                    "privacy: environment variable {var} (id_hash_key_env) is not set"
                ))
            })?,
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "privacy: set at most one of id_hash_key and id_hash_key_env".into(),
                ))
            }
        };
        if key.len() < 16 {
            return Err(ConfigError::Invalid(
                "privacy: the ID hashing key must be at least 16 bytes".into(),
            ));
        }
        Ok(Some(key.into_bytes()))
    }
}

/// Validators that decide offline and upload later.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OfflineConfig {
    /// Terminal-id prefixes of the validators that may upload offline
    /// decisions (e.g. `["bus-", "gate-"]`). Empty: none may, since an
    /// offline approval is settled without the gateway's checks.
    pub terminal_prefixes: Vec<String>,
    /// Events per `POST /v1/offline-batch` at most.
    pub batch_events_max: usize,
    /// How far in the future (by the gateway's clock) an offline event's
    /// time may lie: a validator's clock drifts.
    pub future_skew_s: i64,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        OfflineConfig {
            terminal_prefixes: Vec::new(),
            batch_events_max: OFFLINE_BATCH_EVENTS_MAX_DEFAULT,
            future_skew_s: OFFLINE_FUTURE_SKEW_S_DEFAULT,
        }
    }
}

/// Parses an RFC 3339 time into Unix seconds.
pub fn rfc3339_unix(what: &str, s: &str) -> Result<i64, ConfigError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| ConfigError::Invalid(format!("{what}: `{s}` is not an RFC 3339 time")))
}

impl QrConfig {
    /// The issuer keys, read from their files.
    pub fn keyring(&self) -> Result<onecard_core::qr::Keyring, ConfigError> {
        let mut keys = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            let what = format!("qr.keys.{}", k.kid);
            let alg = onecard_core::qr::Alg::parse(&k.alg).ok_or_else(|| {
                ConfigError::Invalid(format!("{what}.alg must be ed25519 or sm2"))
            })?;
            let pem = std::fs::read_to_string(&k.public_key).map_err(|e| {
                ConfigError::Invalid(format!(
                    "{what}.public_key: cannot read {}: {e}",
                    k.public_key.display()
                ))
            })?;
            let from = match &k.valid_from {
                Some(t) => rfc3339_unix(&format!("{what}.valid_from"), t)?,
                None => i64::MIN,
            };
            let until = match &k.valid_until {
                Some(t) => Some(rfc3339_unix(&format!("{what}.valid_until"), t)?),
                None => None,
            };
            let key = onecard_core::qr::IssuerKey::from_public_pem(&k.kid, alg, &pem, from, until)
                .map_err(|e| ConfigError::Invalid(format!("{what}.public_key: {e}")))?;
            keys.push(key);
        }
        onecard_core::qr::Keyring::new(keys)
            .map_err(|e| ConfigError::Invalid(format!("qr.keys: {e}")))
    }

    pub fn rules(&self) -> onecard_core::qr::Rules {
        onecard_core::qr::Rules {
            lifetime_max_s: self.lifetime_max_s,
            skew_s: self.skew_s,
        }
    }
}

/// Settlement: approved events forwarded in signed batches to downstream
/// systems. No sinks: settlement is off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlementConfig {
    pub sinks: Vec<SinkConfig>,
}

/// One downstream system (`[[settlement.sinks]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `transport`, `medical`, `payment`, ...: a metric label and part of
    /// every batch id; 1 to 32 of `a-z0-9_`.
    pub name: String,
    /// `https://host:port/path` of the receiver.
    pub url: String,
    /// The CA that signed the receiver's certificate. Absent: with
    /// `terminal.dev_certs`, the development CA under `<data_dir>/certs`
    /// (which signed the demo receiver's certificate); otherwise required.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Scenarios whose approved, charged events this sink settles.
    pub scenarios: Vec<String>,
    /// Partner regions (`[[regions.partners]]` names) whose cards this
    /// sink settles, and only theirs; empty: cards of home regions only.
    #[serde(default)]
    pub partners: Vec<String>,
    #[serde(default = "default_algorithm")]
    pub algorithm: onecard_core::settle::sign::Algorithm,
    /// The signing key shared with the receiver (or `key_env`).
    #[serde(default)]
    pub key: Option<String>,
    /// An environment variable holding the key.
    #[serde(default)]
    pub key_env: Option<String>,
    #[serde(default = "default_events_max")]
    pub events_max: usize,
    #[serde(default = "default_bytes_max")]
    pub bytes_max: usize,
    #[serde(default = "default_age_max_ms")]
    pub age_max_ms: i64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Batches sent at once, each on its own connection (1 to 64). With
    /// more than one, a receiver may book batches out of journal order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Attempts for one batch before it is parked for an operator.
    #[serde(default = "default_attempts_max")]
    pub attempts_max: u32,
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Failures in a row that open the circuit, and how long it stays open.
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    #[serde(default = "default_circuit_pause_ms")]
    pub circuit_pause_ms: i64,
    /// Stored batches awaiting acknowledgement, at most; past it the sink
    /// stops sealing and new events wait in the journal.
    #[serde(default = "default_backlog_batches_max")]
    pub backlog_batches_max: usize,
    /// `/readyz` and the settlement status warn when the oldest event
    /// awaiting acknowledgement is this old (or the backlog is at half its
    /// bound).
    #[serde(default = "default_backlog_warn_age_ms")]
    pub backlog_warn_age_ms: i64,
    /// A client certificate (PEM chain) and key to present to a receiver
    /// that asks for one; both or neither.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub cert_key: Option<PathBuf>,
}

fn default_algorithm() -> onecard_core::settle::sign::Algorithm {
    onecard_core::settle::sign::Algorithm::HmacSha256
}
fn default_events_max() -> usize {
    1_000
}
fn default_bytes_max() -> usize {
    1024 * 1024
}
fn default_age_max_ms() -> i64 {
    1_000
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_attempts_max() -> u32 {
    10
}
fn default_backoff_base_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    10_000
}
fn default_circuit_failures() -> u32 {
    5
}
fn default_circuit_pause_ms() -> i64 {
    10_000
}
fn default_backlog_batches_max() -> usize {
    100_000
}
fn default_backlog_warn_age_ms() -> i64 {
    300_000
}

impl SinkConfig {
    /// The signing key, from `key` or the environment variable `key_env`.
    pub fn signing_key(&self) -> Result<Vec<u8>, ConfigError> {
        let key = match (&self.key, &self.key_env) {
            (Some(k), None) => k.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                ConfigError::Invalid(format!(
                    "settlement.sinks.{}: environment variable {var} (key_env) is not set",
                    self.name
                ))
            })?,
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "settlement.sinks.{}: set exactly one of key and key_env",
                    self.name
                )))
            }
        };
        if key.len() < 16 {
            return Err(ConfigError::Invalid(format!(
                "settlement.sinks.{}: the signing key must be at least 16 bytes",
                self.name
            )));
        }
        Ok(key.into_bytes())
    }

    pub fn scenario_list(&self) -> Result<Vec<Scenario>, ConfigError> {
        self.scenarios
            .iter()
            .map(|s| {
                Scenario::parse(s).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "settlement.sinks.{}.scenarios: unknown scenario `{s}`; expected {}",
                        self.name,
                        Scenario::expected()
                    ))
                })
            })
            .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            terminal: TerminalConfig::default(),
            admin: AdminConfig::default(),
            limits: LimitsConfig::default(),
            journal: JournalConfig::default(),
            idempotency: IdempotencyConfig::default(),
            store: StoreConfig::default(),
            settlement: SettlementConfig::default(),
            policy: PolicyConfig::default(),
            scenarios: ScenariosConfig::default(),
            qr: QrConfig::default(),
            privacy: PrivacyConfig::default(),
            offline: OfflineConfig::default(),
            transit: Default::default(),
            culture: Default::default(),
            access: Default::default(),
            identity: Default::default(),
            payment: Default::default(),
            medical: Default::default(),
            regions: Default::default(),
            disbursement: DisbursementConfig::default(),
            applications: ApplicationsConfig::default(),
            catalogue: onecard_core::catalogue::Catalogue::default(),
            log: LogConfig::default(),
            cluster: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TerminalConfig {
    pub addr: SocketAddr,
    /// Server certificate chain (PEM). Empty: `<data_dir>/certs/server.pem`.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM). Empty: `<data_dir>/certs/server.key`.
    pub key: Option<PathBuf>,
    /// The terminal CA that client certificates must chain to (PEM).
    /// Empty: `<data_dir>/certs/terminal-ca.pem`.
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM or DER) of the terminal CA: a
    /// terminal whose certificate one of them lists is refused at the
    /// handshake. Once any is given, every CA in `client_ca` needs one (a
    /// terminal whose revocation status is unknown is refused, as nginx's
    /// `ssl_crl` does). Reloaded with SIGHUP or `POST /admin/v1/tls/reload`.
    pub crl: Vec<PathBuf>,
    /// Create a development CA, server certificate and terminal certificates
    /// under `<data_dir>/certs` on start when they are missing.
    pub dev_certs: bool,
    /// How many terminal certificates `dev_certs` creates.
    pub dev_terminals: u32,
    /// A plaintext listener for benchmarks; must be a loopback address.
    pub plaintext_addr: Option<SocketAddr>,
}

impl Default for TerminalConfig {
    fn default() -> Self {
        TerminalConfig {
            addr: TERMINAL_ADDR_DEFAULT
                .parse()
                .expect("valid default address"),
            cert: None,
            key: None,
            client_ca: None,
            crl: Vec::new(),
            dev_certs: false,
            dev_terminals: 8,
            plaintext_addr: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Bearer token for `/admin/**` with the `operator` role, named
    /// `admin` in the audit. Prefer the `ONECARD_ADMIN_TOKEN` environment
    /// variable over writing it here.
    pub token: Option<String>,
    /// More tokens, each with a name (for the audit) and a role.
    pub tokens: Vec<TokenConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            addr: ADMIN_ADDR_DEFAULT.parse().expect("valid default address"),
            token: None,
            tokens: Vec::new(),
        }
    }
}

/// What an admin token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Changes cards, deny list, settlement; everything.
    Operator,
    /// Hotline (12345, 12333): finds cards, reports losses and looks up
    /// transactions; changes nothing else.
    Agent,
    /// Terminal trust: blocks and unblocks terminal certificates, reloads
    /// the TLS certificates and CRLs; changes no card.
    Security,
    /// A service hall's or partner bank branch's counter: files card
    /// applications, takes them through production and pickup, issues
    /// cards (printing them on the spot, too), finds a resident's
    /// applications; changes nothing else.
    Counter,
    /// The resident's own channel (the city's app, a partner province's
    /// service): files `online` and `partner_province` applications and
    /// answers a resident's "where is my card?" by application id and the
    /// last four ID digits; sees nothing else.
    Channel,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Agent => "agent",
            Role::Security => "security",
            Role::Counter => "counter",
            Role::Channel => "channel",
        }
    }
}

/// One admin token (`[[admin.tokens]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who uses it, as the audit names them: 1 to 64 of `A-Za-z0-9._-`.
    pub name: String,
    pub role: Role,
    pub token: Option<String>,
    /// The environment variable holding the token instead.
    pub token_env: Option<String>,
}

/// A token the admin API accepts, and whose it is.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub token: String,
}

impl AdminConfig {
    /// Every accepted token: `token` (operator `admin`) and `tokens`.
    pub fn principals(&self) -> Result<Vec<Principal>, ConfigError> {
        let mut out = Vec::new();
        if let Some(t) = self.token.as_deref().filter(|t| !t.is_empty()) {
            out.push(Principal {
                name: "admin".into(),
                role: Role::Operator,
                token: t.to_owned(),
            });
        }
        for t in &self.tokens {
            let name_ok = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok {
                return Err(ConfigError::Invalid(
                    "admin.tokens: each name must be 1 to 64 of A-Za-z0-9._-".into(),
                ));
            }
            let token = match (&t.token, &t.token_env) {
                (Some(k), None) => k.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    ConfigError::Invalid(format!(
                        "admin.tokens.{}: environment variable {var} (token_env) is not set",
                        t.name
                    ))
                })?,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "admin.tokens.{}: set exactly one of token and token_env",
                        t.name
                    )))
                }
            };
            if token.len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "admin.tokens.{}: a token must be at least 16 characters",
                    t.name
                )));
            }
            if out.iter().any(|p| p.name == t.name || p.token == token) {
                return Err(ConfigError::Invalid(format!(
                    "admin.tokens.{}: names and tokens must be unique",
                    t.name
                )));
            }
            out.push(Principal {
                name: t.name.clone(),
                role: t.role,
                token,
            });
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub connections_max: usize,
    pub requests_in_flight_max: usize,
    pub body_bytes_max: usize,
    pub header_read_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub terminal_rate_per_s: u32,
    pub terminal_burst: u32,
    pub terminals_tracked_max: usize,
    pub shutdown_grace_ms: u64,
    /// The runtime's lag (how long a task that is ready waits for a CPU,
    /// smoothed) past which terminals' requests start to be refused, more
    /// of them the further past; 0 turns it off. See `http::admission`.
    pub overload_lag_ms: u64,
    /// The `Retry-After` of a request refused by load shedding, seconds.
    pub overload_retry_after_s: u32,
}

impl LimitsConfig {
    /// `requests_in_flight_max`, or where it is `0` (the default)
    /// [`REQUESTS_IN_FLIGHT_PER_CPU`] for each CPU this process may use.
    pub fn requests_in_flight_cap(&self) -> usize {
        if self.requests_in_flight_max > 0 {
            return self.requests_in_flight_max;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        REQUESTS_IN_FLIGHT_PER_CPU * cpus
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections_max: CONNECTIONS_MAX_DEFAULT,
            requests_in_flight_max: REQUESTS_IN_FLIGHT_MAX_DEFAULT,
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            terminal_rate_per_s: TERMINAL_RATE_PER_S_DEFAULT,
            terminal_burst: TERMINAL_BURST_DEFAULT,
            terminals_tracked_max: TERMINALS_TRACKED_MAX_DEFAULT,
            shutdown_grace_ms: SHUTDOWN_GRACE_MS_DEFAULT,
            overload_lag_ms: OVERLOAD_LAG_MS_DEFAULT,
            overload_retry_after_s: OVERLOAD_RETRY_AFTER_S_DEFAULT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every acknowledged decision is on disk: the WAL is fdatasync'ed before
    /// any answer in the group is sent. Survives power loss.
    Sync,
    /// The WAL is written to the OS but not synced: survives a crash of the
    /// process, not of the machine.
    Async,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    pub durability: Durability,
    pub batch_events_max: usize,
    pub queue_events_max: usize,
    /// A commit not durable after this long: the disk is stalled. New
    /// decisions are refused (503, `Retry-After`) and a request waiting on
    /// its commit answers 503 (its decision may still be recorded: a retry
    /// with the same event id gets it) until the disk writes again.
    pub stall_ms: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            durability: Durability::Sync,
            batch_events_max: JOURNAL_BATCH_EVENTS_MAX_DEFAULT,
            queue_events_max: JOURNAL_QUEUE_EVENTS_MAX_DEFAULT,
            stall_ms: JOURNAL_STALL_MS_DEFAULT,
        }
    }
}

/// `[store]`: what RocksDB may hold in memory and open. The journal and the
/// idempotency records grow for as long as the gateway runs; without these
/// bounds every table file stays open with its index and filter in memory,
/// and resident memory and open files grow with the data (a soak shows it
/// as a slope).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// One block cache for every column family: data blocks, and the index
    /// and filter blocks of every table file (those of the newest level
    /// stay pinned, since every new event id's lookup reads them).
    pub block_cache_mb: usize,
    /// All memtables together; past it the largest is flushed.
    pub memtables_mb: usize,
    /// Table files kept open at once (each an fd and a table reader); past
    /// it the least recently used is closed and reopened when read.
    pub open_files_max: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            block_cache_mb: STORE_BLOCK_CACHE_MB_DEFAULT,
            memtables_mb: STORE_MEMTABLES_MB_DEFAULT,
            open_files_max: STORE_OPEN_FILES_MAX_DEFAULT,
        }
    }
}

/// `[applications]`: card applications at service halls, bank branches,
/// online and through partner provinces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplicationsConfig {
    /// From this age a new card gets the `elderly` concession.
    pub elderly_age: u32,
    /// The service promise per channel, in days: an application that has
    /// waited in one state longer than its channel's promise is on the
    /// overdue list (`GET /admin/v1/applications/overdue`).
    pub promise_days: PromiseDays,
    /// Wrong last-four-digit answers to the resident's status query an
    /// application takes per hour before it refuses every query for the
    /// rest of the hour (`429`): four digits must not be guessable.
    pub status_misses_per_hour: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromiseDays {
    pub service_hall: u32,
    pub bank_branch: u32,
    pub online: u32,
    pub partner_province: u32,
}

impl Default for PromiseDays {
    fn default() -> Self {
        // Printed at the counter or produced centrally and sent to the
        // branch: a working week; a partner province's post takes longer.
        PromiseDays {
            service_hall: 7,
            bank_branch: 7,
            online: 10,
            partner_province: 15,
        }
    }
}

impl PromiseDays {
    pub fn of(&self, channel: onecard_core::application::Channel) -> u32 {
        use onecard_core::application::Channel;
        match channel {
            Channel::ServiceHall => self.service_hall,
            Channel::BankBranch => self.bank_branch,
            Channel::Online => self.online,
            Channel::PartnerProvince => self.partner_province,
        }
    }
}

impl Default for ApplicationsConfig {
    fn default() -> Self {
        ApplicationsConfig {
            elderly_age: 60,
            promise_days: PromiseDays::default(),
            status_misses_per_hour: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    pub retention_s: u64,
    pub cleanup_interval_s: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            retention_s: IDEMPOTENCY_RETENTION_S_DEFAULT,
            cleanup_interval_s: IDEMPOTENCY_CLEANUP_INTERVAL_S_DEFAULT,
        }
    }
}

impl Config {
    /// Reads and validates a config file; its relative paths are taken
    /// relative to the file's directory ([`Config::resolve_paths`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// A config from text, not from a file: relative paths stay relative
    /// to the working directory.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::Invalid(format!(
                "log.level is not a valid filter: {e} (e.g. \"info\" or \"warn,onecard::service=debug\")"
            )));
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            if !self.settlement.sinks.is_empty() && !c.settle {
                return bad(
                    "settlement.sinks on a cluster node: set cluster.settle = true on exactly one node, which delivers every sink's batches for the whole cluster, and configure no sinks on the others",
                );
            }
        }
        // Each scenario goes to one home sink and to one sink per partner
        // region: an event is settled once.
        let mut taken: Vec<(Scenario, Option<&str>, &str)> = Vec::new();
        for (i, sink) in self.settlement.sinks.iter().enumerate() {
            let n = &sink.name;
            if n.is_empty()
                || n.len() > 32
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return bad(&format!(
                    "settlement.sinks[{i}].name must be 1 to 32 of a-z, 0-9 and _"
                ));
            }
            if self.settlement.sinks[..i].iter().any(|o| &o.name == n) {
                return bad(&format!("settlement.sinks: the name `{n}` is used twice"));
            }
            let uri = sink.url.parse::<http::Uri>().ok();
            let https = uri.as_ref().is_some_and(|u| {
                u.scheme_str() == Some("https")
                    && u.host().is_some_and(|h| !h.is_empty())
                    && u.authority().is_some_and(|a| !a.as_str().contains('@'))
            });
            if !https {
                return bad(&format!(
                    "settlement.sinks.{n}.url must be an https://host[:port]/path URL without credentials"
                ));
            }
            let whose: Vec<Option<&str>> = if sink.partners.is_empty() {
                vec![None]
            } else {
                sink.partners.iter().map(|p| Some(p.as_str())).collect()
            };
            for sc in sink.scenario_list()? {
                for w in &whose {
                    if let Some((_, _, other)) = taken.iter().find(|(t, o, _)| *t == sc && o == w) {
                        return bad(&format!(
                            "settlement: scenario {sc} is routed to both {other} and {n}; an event is settled once"
                        ));
                    }
                    taken.push((sc, *w, n));
                }
            }
            sink.signing_key()?;
            if sink.events_max == 0 || sink.bytes_max < 1024 || sink.age_max_ms <= 0 {
                return bad(&format!(
                    "settlement.sinks.{n}: events_max ≥ 1, bytes_max ≥ 1024 and age_max_ms > 0"
                ));
            }
            if sink.timeout_ms == 0
                || sink.attempts_max == 0
                || sink.circuit_failures == 0
                || sink.backlog_batches_max == 0
            {
                return bad(&format!(
                    "settlement.sinks.{n}: timeout_ms, attempts_max, circuit_failures and backlog_batches_max must be positive"
                ));
            }
            if !(1..=64).contains(&sink.concurrency) {
                return bad(&format!("settlement.sinks.{n}.concurrency must be 1 to 64"));
            }
            if sink.ca.is_none() && !self.terminal.dev_certs {
                return bad(&format!(
                    "settlement.sinks.{n}.ca is required: the CA that signed the receiver's certificate (only with terminal.dev_certs may it be left out, for the development CA)"
                ));
            }
            if sink.cert.is_some() != sink.cert_key.is_some() {
                return bad(&format!(
                    "settlement.sinks.{n}: cert and cert_key go together (a client certificate and its key)"
                ));
            }
            if sink.backlog_warn_age_ms <= 0 {
                return bad(&format!(
                    "settlement.sinks.{n}.backlog_warn_age_ms must be positive"
                ));
            }
        }
        if let Some(addr) = self.terminal.plaintext_addr {
            if !addr.ip().is_loopback() {
                return bad(
                    "terminal.plaintext_addr must be a loopback address (127.0.0.0/8 or ::1)",
                );
            }
        }
        let l = &self.limits;
        if l.connections_max == 0 || l.body_bytes_max == 0 {
            return bad("limits.connections_max and body_bytes_max must be at least 1");
        }
        if l.body_bytes_max > 1024 * 1024 {
            return bad("limits.body_bytes_max must be at most 1048576");
        }
        if l.terminal_rate_per_s == 0 || l.terminal_burst == 0 {
            return bad("limits.terminal_rate_per_s and terminal_burst must be at least 1");
        }
        if l.overload_lag_ms > 10_000 {
            return bad("limits.overload_lag_ms must be 0 (off) to 10000");
        }
        if !(1..=60).contains(&l.overload_retry_after_s) {
            return bad("limits.overload_retry_after_s must be 1 to 60");
        }
        if l.header_read_timeout_ms == 0 || l.idle_timeout_ms == 0 {
            return bad("limits.header_read_timeout_ms and idle_timeout_ms must be at least 1");
        }
        if self.journal.batch_events_max == 0 || self.journal.queue_events_max == 0 {
            return bad("journal.batch_events_max and queue_events_max must be at least 1");
        }
        if !(100..=600_000).contains(&self.journal.stall_ms) {
            return bad("journal.stall_ms must be 100 to 600000");
        }
        let st = &self.store;
        if !(8..=65_536).contains(&st.block_cache_mb)
            || !(32..=65_536).contains(&st.memtables_mb)
            || !(64..=1_000_000).contains(&st.open_files_max)
        {
            return bad("store.block_cache_mb must be 8 to 65536, store.memtables_mb 32 to 65536 and store.open_files_max 64 to 1000000");
        }
        if self.idempotency.retention_s == 0 || self.idempotency.cleanup_interval_s == 0 {
            return bad("idempotency.retention_s and cleanup_interval_s must be at least 1");
        }
        if self.policy.card_daily_spend_max_fen < 0 {
            return bad("policy.card_daily_spend_max_fen must not be negative");
        }
        if !(-14 * 60..=14 * 60).contains(&self.policy.day_offset_minutes) {
            return bad("policy.day_offset_minutes must be within -840..=840");
        }
        let policy = self.policy()?;
        self.access.validate()?;
        for sink in &self.settlement.sinks {
            if let Some(p) = sink
                .partners
                .iter()
                .find(|p| policy.regions.partner(p).is_none())
            {
                return bad(&format!(
                    "settlement.sinks.{}.partners: `{p}` is not a [[regions.partners]] name",
                    sink.name
                ));
            }
        }
        self.admin.principals()?;
        self.privacy.id_hash_key()?;
        let q = &self.qr;
        if q.lifetime_max_s <= 0 || q.skew_s < 0 || q.replay_cache_max == 0 {
            return bad(
                "qr.lifetime_max_s and replay_cache_max must be positive, skew_s not negative",
            );
        }
        q.keyring()?;
        if self.offline.batch_events_max == 0 || self.offline.batch_events_max > 10_000 {
            return bad("offline.batch_events_max must be 1 to 10000");
        }
        if self.offline.future_skew_s < 0 {
            return bad("offline.future_skew_s must not be negative");
        }
        self.catalogue
            .validate()
            .map_err(|e| ConfigError::Invalid(e.0))?;
        let a = &self.applications;
        if !(1..=150).contains(&a.elderly_age) {
            return bad("applications.elderly_age must be 1 to 150");
        }
        let p = &a.promise_days;
        if [p.service_hall, p.bank_branch, p.online, p.partner_province]
            .iter()
            .any(|d| !(1..=365).contains(d))
        {
            return bad("applications.promise_days: each channel's promise must be 1 to 365 days");
        }
        if !(1..=100).contains(&a.status_misses_per_hour) {
            return bad("applications.status_misses_per_hour must be 1 to 100");
        }
        self.validate_disbursement()
    }

    fn validate_disbursement(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let d = &self.disbursement;
        if !(1..=DISBURSEMENT_RECORDS_MAX_LIMIT).contains(&d.records_max) {
            return bad(format!(
                "disbursement.records_max must be 1 to {DISBURSEMENT_RECORDS_MAX_LIMIT}"
            ));
        }
        for (name, p) in &d.programmes {
            if !onecard_core::disburse::valid_programme_name(name) {
                return bad(format!(
                    "disbursement.programmes: a name must be 1 to 32 of a-z, 0-9 and _ ({} characters given)",
                    name.chars().count()
                ));
            }
            if !(1..=onecard_core::wire::AMOUNT_FEN_MAX).contains(&p.amount_max_fen) {
                return bad(format!(
                    "disbursement.programmes.{name}.amount_max_fen must be 1 to {}",
                    onecard_core::wire::AMOUNT_FEN_MAX
                ));
            }
        }
        // A credit is paid by the payment sink: without one for home
        // cards, accepted records would be journaled and never reach
        // anyone's account. A sink naming `partners` settles only those
        // regions' cards, so it does not count.
        let paid = self.settlement.sinks.iter().any(|s| {
            s.partners.is_empty()
                && s.scenario_list()
                    .is_ok_and(|l| l.contains(&Scenario::Payment))
        });
        if !d.programmes.is_empty() && !paid {
            return bad(
                "disbursement.programmes need a settlement sink for home cards (no `partners`) whose scenarios include payment: it pays the credits"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// The decision core's view of the config: its rule sections, built
    /// and checked by the core crate.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        let policy = Policy::from_config(Sections {
            policy: &self.policy,
            scenarios: &self.scenarios,
            transit: &self.transit,
            culture: &self.culture,
            identity: &self.identity,
            regions: &self.regions,
            medical: &self.medical,
        })?;
        // A hold's event id must not be reusable while the hold lives.
        if !self.medical.categories.is_empty()
            && self.idempotency.retention_s < self.medical.hold_ttl_s
        {
            return Err(ConfigError::Invalid(format!(
                "idempotency.retention_s ({}) must be at least medical.hold_ttl_s ({}): a hold's event id is remembered for as long as the hold lives",
                self.idempotency.retention_s, self.medical.hold_ttl_s
            )));
        }
        Ok(policy)
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.data_dir.join("certs")
    }
    pub fn server_cert_path(&self) -> PathBuf {
        self.terminal
            .cert
            .clone()
            .unwrap_or_else(|| self.certs_dir().join(cert_files::SERVER_CERT))
    }
    pub fn server_key_path(&self) -> PathBuf {
        self.terminal
            .key
            .clone()
            .unwrap_or_else(|| self.certs_dir().join(cert_files::SERVER_KEY))
    }
    pub fn client_ca_path(&self) -> PathBuf {
        self.terminal
            .client_ca
            .clone()
            .unwrap_or_else(|| self.certs_dir().join(cert_files::CA_CERT))
    }
    /// The CA a sink's receiver is checked against: its own, or the
    /// development CA (validation allows that only with `dev_certs`).
    pub fn sink_ca_path(&self, sink: &SinkConfig) -> PathBuf {
        sink.ca
            .clone()
            .unwrap_or_else(|| self.certs_dir().join(cert_files::CA_CERT))
    }

    /// Takes every relative path written in a config file relative to the
    /// directory of that file, so that a config means the same from any
    /// working directory (`onecard serve --config /etc/onecard/gw.toml`
    /// from anywhere). `data_dir` is one of them, its default `./data`
    /// included. Paths given on the command line (`--data-dir`) stay
    /// relative to the working directory, as a shell user expects; files
    /// the gateway creates itself (development certificates, the
    /// database) follow `data_dir` and are not named in the file.
    pub fn resolve_paths(&mut self, base: &Path) {
        let at = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = lexical(&base.join(&*p));
            }
        };
        at(&mut self.data_dir);
        let t = &mut self.terminal;
        for p in [&mut t.cert, &mut t.key, &mut t.client_ca]
            .into_iter()
            .flatten()
        {
            at(p);
        }
        for p in &mut t.crl {
            at(p);
        }
        for k in &mut self.qr.keys {
            at(&mut k.public_key);
        }
        for sink in &mut self.settlement.sinks {
            for p in [&mut sink.ca, &mut sink.cert, &mut sink.cert_key]
                .into_iter()
                .flatten()
            {
                at(p);
            }
        }
        if let Some(ca) = self.cluster.as_mut().and_then(|c| c.ca.as_mut()) {
            at(ca);
        }
    }
}

/// `a/./b/../c` as `a/c`, without touching the file system: what a
/// person reading a log expects to see for `config/../data`. (A `..` after
/// a symbolic link is taken lexically too; configs that need otherwise can
/// name absolute paths.)
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use onecard_core::model::Function;

    #[test]
    fn empty_config_is_the_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.journal.durability, Durability::Sync);
        assert_eq!(c.limits.body_bytes_max, BODY_BYTES_MAX_DEFAULT);
        let p = c.policy().unwrap();
        assert_eq!(
            p.rule(Scenario::Payment).function,
            Some(Function::Financial)
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("[limits]\nbody_bytes_mux = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("body_bytes_mux"), "{e}");
        let e = Config::parse("colour = 1\n").unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let e = Config::parse("[scenarios.ferry]\ncharges = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ferry"), "{e}");
    }

    #[test]
    fn partial_scenario_tables_keep_their_defaults() {
        let c = Config::parse("[scenarios.transit]\namount_max_fen = 500\n").unwrap();
        let rule = c.policy().unwrap().rule(Scenario::Transit);
        assert_eq!(rule.amount_max_fen, 500);
        assert_eq!(rule.function, Some(Function::Transit));
        assert!(rule.charges);
    }

    #[test]
    fn the_shipped_files_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let default = Config::load(&root.join("config/default.toml")).unwrap();
        assert!(default.disbursement.programmes.is_empty());
        // dev.toml's paths are relative to config/, whatever the working
        // directory: its QR keys are read during validation.
        let dev = Config::load(&root.join("config/dev.toml")).unwrap();
        assert_eq!(
            dev.disbursement.programmes["project_wages"].kind,
            onecard_core::disburse::ProgrammeKind::Wages
        );
        assert_eq!(dev.data_dir, lexical(&root.join("data")));
        // Its sinks trust the development CA under the data directory,
        // wherever `--data-dir` puts it (issue 15).
        let mut moved = dev.clone();
        moved.data_dir = PathBuf::from("/some/where");
        assert_eq!(
            moved.sink_ca_path(&moved.settlement.sinks[0]),
            Path::new("/some/where/certs/terminal-ca.pem")
        );
    }

    #[test]
    fn relative_paths_in_a_file_are_relative_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("etc");
        std::fs::create_dir_all(&conf).unwrap();
        let file = conf.join("gw.toml");
        std::fs::write(
            &file,
            "data_dir = \"var\"\n[terminal]\ncert = \"tls/server.pem\"\nkey = \"/abs/server.key\"\n[[settlement.sinks]]\nname = \"transport\"\nurl = \"https://127.0.0.1:9/b\"\nca = \"ca/receiver.pem\"\nscenarios = [\"transit\"]\nkey = \"transport-signing-key-01\"\n",
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.data_dir, conf.join("var"));
        assert_eq!(c.terminal.cert, Some(conf.join("tls/server.pem")));
        assert_eq!(c.terminal.key, Some(PathBuf::from("/abs/server.key")));
        let sink = &c.settlement.sinks[0];
        assert_eq!(c.sink_ca_path(sink), conf.join("ca/receiver.pem"));
        // The default data directory, too, is beside the file.
        std::fs::write(&file, "").unwrap();
        assert_eq!(Config::load(&file).unwrap().data_dir, conf.join("data"));
        assert_eq!(
            lexical(Path::new("./a/../../b/./c")),
            PathBuf::from("../b/c")
        );
        assert_eq!(lexical(Path::new("config/..")), PathBuf::from("."));
        // Text that is not a file keeps paths as written.
        assert_eq!(
            Config::parse("data_dir = \"var\"").unwrap().data_dir,
            PathBuf::from("var")
        );
        // A sink without its CA only in development.
        let no_ca = "[[settlement.sinks]]\nname = \"t\"\nurl = \"https://127.0.0.1:9/b\"\nscenarios = [\"transit\"]\nkey = \"transport-signing-key-01\"\n";
        let e = Config::parse(no_ca).unwrap_err().to_string();
        assert!(e.contains("settlement.sinks.t.ca is required"), "{e}");
        let dev = Config::parse(&format!("[terminal]\ndev_certs = true\n{no_ca}")).unwrap();
        assert_eq!(
            dev.sink_ca_path(&dev.settlement.sinks[0]),
            Path::new("./data/certs/terminal-ca.pem")
        );
    }

    #[test]
    fn disbursement_programmes_are_checked() {
        let sink = "[[settlement.sinks]]\nname = \"payment\"\nurl = \"https://127.0.0.1:9/b\"\nca = \"ca.pem\"\nscenarios = [\"payment\"]\nkey = \"payment-signing-key-01\"\n";
        let grant = "[disbursement.programmes.student_grant]\nkind = \"subsidy\"\namount_max_fen = 100000\n";
        let c = Config::parse(&format!("{sink}{grant}")).unwrap();
        let p = c.disbursement.programmes["student_grant"];
        assert_eq!(p.kind, onecard_core::disburse::ProgrammeKind::Subsidy);
        assert_eq!(c.disbursement.records_max, DISBURSEMENT_RECORDS_MAX_DEFAULT);
        let refused = [
            // No payment sink: credits would never be paid.
            grant.to_owned(),
            format!("{sink}[disbursement.programmes.Grant]\nkind = \"subsidy\"\namount_max_fen = 1\n"),
            format!("{sink}[disbursement.programmes.g]\nkind = \"loan\"\namount_max_fen = 1\n"),
            format!("{sink}[disbursement.programmes.g]\nkind = \"wages\"\namount_max_fen = 0\n"),
            format!("{sink}[disbursement.programmes.g]\nkind = \"wages\"\n"),
            format!("{sink}[disbursement.programmes.g]\nkind = \"wages\"\namount_max_fen = 1\ncolour = 1\n"),
            "[disbursement]\nrecords_max = 0\n".to_owned(),
            "[disbursement]\nrecords_max = 100001\n".to_owned(),
        ];
        for text in refused {
            assert!(Config::parse(&text).is_err(), "{text}");
        }
        // A payment sink that settles only a partner's cards pays no home
        // card's credit: it does not satisfy the programmes.
        let sichuan = "[regions]\nhome = [\"50\"]\n[[regions.partners]]\nname = \"sichuan\"\nprefixes = [\"51\"]\nscenarios = [\"payment\"]\n";
        let partner_sink = sink.replace(
            "name = \"payment\"",
            "name = \"payment\"\npartners = [\"sichuan\"]",
        );
        assert!(Config::parse(&format!("{sichuan}{partner_sink}")).is_ok());
        let e = Config::parse(&format!("{sichuan}{partner_sink}{grant}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("settlement sink for home cards"), "{e}");
        Config::parse(&format!(
            "{sichuan}{partner_sink}{}{grant}",
            sink.replace("\"payment\"\nurl", "\"home\"\nurl")
        ))
        .unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::parse("[terminal]\nplaintext_addr = \"0.0.0.0:8080\"\n").is_err());
        assert!(Config::parse("[scenarios.medical]\nfunction = \"teleport\"\n").is_err());
        assert!(Config::parse("[journal]\ndurability = \"maybe\"\n").is_err());
        assert!(Config::parse("[limits]\nbody_bytes_max = 0\n").is_err());
    }

    #[test]
    fn medical_holds_need_a_charging_scenario_and_long_enough_answers() {
        let cats = "[medical.categories.outpatient]\ncoverage_pct = 70\n";
        Config::parse(cats).unwrap();
        for (extra, why) in [
            ("[scenarios.medical]\ncharges = false\n", "to charge"),
            (
                "[scenarios.medical]\nfunction = \"none\"\n",
                "medical function",
            ),
            (
                "[idempotency]\nretention_s = 600\n",
                "at least medical.hold_ttl_s",
            ),
        ] {
            let e = Config::parse(&format!("{extra}{cats}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{extra}: {e}");
            // Without categories there are no holds to keep promises for.
            Config::parse(extra).unwrap();
        }
    }
}
