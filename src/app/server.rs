//! Start and stop: binds the listeners, spawns the accept loops and the
//! clean-up task, and shuts everything down in order (stop accepting,
//! finish requests in flight, flush the journal, close RocksDB).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::tls::{TerminalTls, TlsFiles};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use onecard_core::time::{Clock, SystemClock};

use crate::app::telemetry;
use crate::config::{Config, LimitsConfig};
use crate::http::admin::Admin;
use crate::http::admission::Admission;
use crate::http::{ingress, Front};
use crate::net::certs::{self, CertError};
use crate::net::tls::TlsSetupError;
use crate::service::gateway::Gateway;
use crate::service::idempotency;
use crate::store::StoreError;

/// Written into the data directory once every listener is bound, so that
/// scripts and tests started with port 0 can find the gateway.
pub const LISTENERS_FILE: &str = "listeners.json";
/// Connections the admin listener accepts at once, apart from terminals'.
pub const ADMIN_CONNECTIONS_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addrs {
    pub terminal: SocketAddr,
    pub plaintext: Option<SocketAddr>,
    pub admin: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::store::replicated::ClusterError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Settlement(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Running {
    pub addrs: Addrs,
    gateway: Arc<Gateway>,
    admission: Arc<Admission>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Set once the gateway must be restarted to go on (its journal's disk
    /// failed and writes again): what to tell the supervisor.
    restart: watch::Receiver<Option<&'static str>>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

fn local(l: &TcpListener) -> SocketAddr {
    l.local_addr().expect("a bound listener has an address")
}

/// The kernel's range of ports for outgoing connections, where it says.
fn ephemeral_ports() -> Option<std::ops::RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some(it.next()??..=it.next()??)
}

/// A fixed listening port inside the ephemeral range can be taken by any
/// outgoing connection of the machine (even a client probing the port
/// itself): a restart then fails with "address in use". Seen here in a
/// benchmark; worth a warning at every start.
fn warn_ephemeral(config: &Config) {
    let Some(range) = ephemeral_ports() else {
        return;
    };
    let fixed = [
        Some(config.terminal.addr),
        config.terminal.plaintext_addr,
        Some(config.admin.addr),
    ];
    for addr in fixed.into_iter().flatten() {
        if addr.port() != 0 && range.contains(&addr.port()) {
            tracing::warn!(%addr, ephemeral = ?range, "this port is in the kernel's ephemeral range: an outgoing connection can hold it and make a restart fail with \"address in use\"; choose one below {}", range.start());
        }
    }
}

/// Starts a gateway on the wall clock and returns once it is ready to
/// take traffic.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// Starts a gateway whose requests read the time from `clock` (a test
/// moves it instead of waiting).
pub async fn start_with_clock(
    config: Config,
    clock: Arc<dyn Clock>,
) -> Result<Running, ServerError> {
    let started = Instant::now();
    warn_ephemeral(&config);
    let prometheus = telemetry::prometheus();
    telemetry::register_zero(&config);
    if config.terminal.dev_certs
        && certs::ensure(&config.certs_dir(), config.terminal.dev_terminals)?
    {
        tracing::info!(dir = %config.certs_dir().display(), terminals = config.terminal.dev_terminals, "created development certificates");
    }
    let listeners_file = config.data_dir.join(LISTENERS_FILE);
    let _ = std::fs::remove_file(&listeners_file);

    let principals = config.admin.principals()?;
    // Opening RocksDB and rebuilding memory blocks; it happens once, before
    // any listener exists, so nothing else waits on this thread.
    let gateway = Arc::new(match config.cluster.clone() {
        None => Gateway::open(config, clock)?,
        // Cluster mode: join the NATS cluster and catch up with its
        // journal before any listener exists.
        Some(c) => {
            let cluster = crate::store::replicated::Cluster::connect(&c).await?;
            Gateway::open_cluster(config, clock, cluster).await?
        }
    });
    // Open complaints per unit, for their gauges (read once here, then
    // counted again at every filing and closing).
    gateway.count_open_complaints_blocking()?;
    let config = &gateway.config;
    // The terminal listener's trust: its certificate, the terminal CA,
    // the CRLs, and the block list kept in the store. Expiry gauges are
    // set here and on each reload.
    let tls = Arc::new(TerminalTls::load(
        TlsFiles {
            cert: config.server_cert_path(),
            key: config.server_key_path(),
            client_ca: config.client_ca_path(),
            crls: config.terminal.crl.clone(),
        },
        gateway.terminal_blocks.clone(),
    )?);
    let terminal = bind(config.terminal.addr).await?;
    let admin = bind(config.admin.addr).await?;
    let plain = match config.terminal.plaintext_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let addrs = Addrs {
        terminal: local(&terminal),
        plaintext: plain.as_ref().map(local),
        admin: local(&admin),
    };

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let admission = Admission::new(&config.limits);
    let front = Arc::new(Front::new(gateway.clone(), admission.clone()));
    tasks.push(tokio::spawn(admission.clone().watch_lag(stop_rx.clone())));
    tasks.push(tokio::spawn(ingress::run_tls_listener(
        front.clone(),
        terminal,
        tls.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(reload_on_sighup(tls.clone(), stop_rx.clone())));
    let (restart_tx, restart) = watch::channel(None);
    tasks.push(tokio::spawn(watch_journal_disk(
        gateway.clone(),
        restart_tx,
        stop_rx.clone(),
    )));
    if let Some(plain) = plain {
        tracing::warn!(addr = %addrs.plaintext.expect("bound"), "plaintext terminal listener enabled (loopback only, for benchmarks); terminal ids come from X-Terminal-Id");
        tasks.push(tokio::spawn(ingress::run_plain_listener(
            front.clone(),
            plain,
            stop_rx.clone(),
        )));
    }
    if principals.is_empty() {
        tracing::warn!("no admin token configured (admin.token, admin.tokens or ONECARD_ADMIN_TOKEN): the admin API answers 401");
    }
    let admin_state = Arc::new(Admin::new(
        gateway.clone(),
        admission.clone(),
        principals,
        prometheus.clone(),
        tls.clone(),
    ));
    let limits = config.limits.clone();
    let stop_admin = stop_rx.clone();
    tasks.push(tokio::spawn(ingress::accept_loop(
        admin,
        stop_rx.clone(),
        "admin",
        gateway.clone(),
        // Operators keep their own connections: a flood of terminals must
        // not lock them out of the deny list, nor SREs out of /metrics.
        Admission::new(&LimitsConfig {
            connections_max: ADMIN_CONNECTIONS_MAX,
            ..config.limits.clone()
        }),
        move |stream, _gw: Arc<Gateway>, permit| {
            let admin_state = admin_state.clone();
            let stop = stop_admin.clone();
            let limits = limits.clone();
            async move {
                let handler = move |req| admin_state.clone().handle(req);
                ingress::serve_plain(stream, handler, &limits, stop, permit).await;
            }
        },
    )));
    for sink in &config.settlement.sinks {
        // A CA or client certificate that cannot be read stops the start,
        // not settlement later.
        let identity = sink.cert.as_deref().zip(sink.cert_key.as_deref());
        let tls = crate::net::client::tls_config(
            &config.sink_ca_path(sink),
            identity,
            crate::net::client::Protocol::Http1,
        )
        .map_err(|e| {
            ServerError::Settlement(format!(
                "settlement.sinks.{}: ca, cert or cert_key: {e}",
                sink.name
            ))
        })?;
        let host = sink
            .url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned));
        tracing::info!(sink = %sink.name, host = host.as_deref().unwrap_or(""), "settlement sink");
        tasks.push(tokio::spawn(crate::service::settle::run(
            gateway.clone(),
            sink.clone(),
            tls,
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(idempotency::run_cleanup(
        gateway.store.clone(),
        gateway.journal.clone(),
        gateway.clock.clone(),
        config.idempotency.retention_s,
        Duration::from_secs(config.idempotency.cleanup_interval_s),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::service::rollout::run(
        gateway.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::service::holds::run_sweep(
        gateway.clone(),
        Duration::from_secs(config.medical.sweep_interval_s),
        stop_rx.clone(),
    )));
    let upkeep = prometheus.clone();
    let mut stop_upkeep = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
                _ = stop_upkeep.changed() => return,
            }
        }
    }));

    let json = serde_json::to_vec_pretty(&addrs).expect("addresses serialize");
    std::fs::write(&listeners_file, json).map_err(|source| ServerError::Io {
        path: listeners_file.clone(),
        source,
    })?;
    crate::service::metrics::set_startup(started.elapsed());
    gateway.set_ready(true);
    tracing::info!(terminal = %addrs.terminal, admin = %addrs.admin, durability = ?config.journal.durability, "gateway ready");
    Ok(Running {
        addrs,
        gateway,
        admission,
        stop,
        tasks,
        restart,
    })
}

/// How often a failed journal's disk is tried again.
const DISK_PROBE_EVERY: Duration = Duration::from_secs(1);

/// After a write to the journal's disk failed (full, I/O error), the
/// gateway keeps serving what needs no write (replays, status, metrics,
/// deny-list deltas) and refuses decisions with `503`. It cannot go on
/// in place: RocksDB refuses writes after a failed one, and memory may be
/// ahead of what reached the disk. So once a second it tries whether the
/// disk takes a synced write again; when it does, it asks to be restarted
/// (`onecard serve` then exits with status 75 for its supervisor), and
/// the next start rebuilds memory from what RocksDB made durable.
async fn watch_journal_disk(
    gw: Arc<Gateway>,
    restart: watch::Sender<Option<&'static str>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(DISK_PROBE_EVERY) => {}
            _ = stop.changed() => return,
        }
        let Some(fault) = gw.journal_fault().filter(|f| f.needs_restart()) else {
            continue;
        };
        let dir = gw.config.data_dir.join("db");
        let writable = tokio::task::spawn_blocking(move || disk_takes_a_write(&dir))
            .await
            .unwrap_or(false);
        if writable {
            tracing::error!(
                fault = fault.label(),
                "the journal's disk takes writes again; the gateway must restart to go on (memory is rebuilt from what RocksDB made durable)"
            );
            let _ = restart.send(Some(fault.message()));
            return;
        }
    }
}

/// Whether `dir` takes a synced write of 1 MiB now.
fn disk_takes_a_write(dir: &std::path::Path) -> bool {
    use std::io::Write;
    let path = dir.join(".onecard-disk-probe");
    let ok = std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(&vec![0u8; 1 << 20])?;
            f.sync_all()
        })
        .is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

/// `kill -HUP` reloads the terminal listener's certificate, CA and CRLs
/// (as `POST /admin/v1/tls/reload` does): new handshakes use them, open
/// connections keep theirs. A file that does not load leaves the old ones
/// in use and says why in the log.
async fn reload_on_sighup(tls: Arc<TerminalTls>, mut stop: watch::Receiver<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload TLS with POST /admin/v1/tls/reload");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                let tls = tls.clone();
                match tokio::task::spawn_blocking(move || tls.reload()).await {
                    Ok(Ok(info)) => tracing::info!(crls = info.crls.len(), "SIGHUP: terminal TLS reloaded"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "SIGHUP: terminal TLS reload failed; the certificates loaded before stay in use"),
                    Err(_) => tracing::warn!("SIGHUP: terminal TLS reload interrupted"),
                }
            }
            _ = stop.changed() => return,
        }
    }
}

impl Running {
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Completes when the gateway must be restarted to go on (its
    /// journal's disk failed, and takes writes again), with why.
    pub async fn restart_needed(&self) -> &'static str {
        let mut rx = self.restart.clone();
        loop {
            if let Some(why) = *rx.borrow_and_update() {
                return why;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops accepting, lets requests in flight finish (up to
    /// `limits.shutdown_grace_ms`), then flushes and closes the journal.
    pub async fn shutdown(self) {
        let gw = self.gateway;
        gw.set_ready(false);
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let deadline = Instant::now() + Duration::from_millis(gw.config.limits.shutdown_grace_ms);
        while self.admission.connections_open() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.admission.connections_open();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "shutdown grace period over; closing with connections still open"
            );
        }
        let journal = gw.journal.clone();
        // Joins the writer thread after it has drained its queue: brief, and
        // nothing else is running any more.
        journal.close();
        tracing::info!(
            journal.last_seq = gw.journal.last_seq(),
            "journal flushed and closed"
        );
        // A connection's last HTTP/2 stream task (hyper spawns them) may
        // still hold the gateway for a moment after its connection
        // counted as closed; RocksDB's lock goes with the last holder, and
        // a gateway started next on the same data directory needs it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&gw) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
