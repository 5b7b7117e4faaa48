//! `onecard`: the gateway binary. Thin by design: it parses the command
//! line, reads the config and calls into the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use onecard::app::{demo, server, telemetry};
use onecard::config::Config;
use onecard::net::certs;

// glibc's malloc showed as ~12% of the gateway's CPU under load (many
// small, short-lived allocations across threads); mimalloc halves that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "onecard",
    version,
    about = "OneCard Gateway: authorizes resident-card taps and scans, journaled durably"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Serve {
        /// TOML config file (see config/README.md); defaults apply without one.
        #[arg(long, env = "ONECARD_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long, env = "ONECARD_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Overrides `terminal.addr`.
        #[arg(long, env = "ONECARD_TERMINAL_ADDR")]
        terminal_addr: Option<SocketAddr>,
        /// Overrides `admin.addr`.
        #[arg(long, env = "ONECARD_ADMIN_ADDR")]
        admin_addr: Option<SocketAddr>,
        /// Overrides `terminal.plaintext_addr` (loopback only).
        #[arg(long, env = "ONECARD_PLAINTEXT_ADDR")]
        plaintext_addr: Option<SocketAddr>,
        /// Overrides `journal.durability` (`sync` or `async`).
        #[arg(long, env = "ONECARD_DURABILITY")]
        durability: Option<String>,
        /// After start, set up demo cards and tap them over mTLS, printing
        /// each decision and its latency; then keep serving.
        #[arg(long)]
        demo: bool,
    },
    /// Write a development terminal CA, a server certificate for
    /// localhost/127.0.0.1 and N terminal certificates.
    Certs {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        terminals: u32,
    },
    /// Write a certificate revocation list signed by the development CA,
    /// revoking development terminals (for `[terminal] crl`).
    Crl {
        /// Directory of the development CA (as `onecard certs` writes it).
        #[arg(long)]
        certs: PathBuf,
        /// A terminal id to revoke (its certificate under `<certs>/terminals`);
        /// repeat for more. None: an empty list.
        #[arg(long)]
        revoke: Vec<String>,
        /// Where the CRL (PEM) goes.
        #[arg(long)]
        out: PathBuf,
        /// The CRL number; each new list takes a higher one. Default: now
        /// in Unix seconds.
        #[arg(long)]
        number: Option<u64>,
        /// Days until the next update is due.
        #[arg(long, default_value_t = 7)]
        days: i64,
    },
    /// A downstream settlement receiver for tests and demos: HTTPS, checks
    /// signatures and totals, books each batch once into a ledger file.
    SinkSim {
        /// Listen address (loopback).
        #[arg(long, default_value = "127.0.0.1:9443")]
        addr: SocketAddr,
        /// Directory with server.pem and server.key (as `onecard certs` writes).
        #[arg(long)]
        certs: PathBuf,
        /// The ledger file (created if missing; read back at start).
        #[arg(long)]
        ledger: PathBuf,
        /// hmac-sha256 or hmac-sm3.
        #[arg(long, default_value = "hmac-sha256")]
        algorithm: String,
        /// The sink's signing key (the same as the gateway's for this sink).
        #[arg(long, env = "ONECARD_SINK_KEY")]
        key: String,
        /// Require senders to present a client certificate signed by this
        /// CA (PEM); without it any sender with the key may book.
        #[arg(long)]
        client_ca: Option<PathBuf>,
    },
    /// Dynamic QR codes: make issuer keys and issue codes, for operators
    /// and tests (the issuing side normally lives in the resident's app).
    Qr {
        #[command(subcommand)]
        command: QrCommand,
    },
}

#[derive(Subcommand)]
enum QrCommand {
    /// Make an issuer key pair: the private key (PKCS#8 PEM, mode 0600)
    /// and the public key (SPKI PEM) for `[[qr.keys]]`.
    Keygen {
        /// `sm2` or `ed25519`.
        #[arg(long)]
        alg: String,
        /// Where the private key goes; the public key goes beside it as
        /// `<FILE>.pub`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a signed code `OC1.<kid>.<payload>.<sig>`.
    Issue {
        /// The private key (PKCS#8 PEM, as keygen writes it).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        /// The credential id the code names.
        #[arg(long)]
        sub: String,
        /// `essc` (electronic social security card) or `ykm` (city code).
        #[arg(long, default_value = "essc")]
        typ: String,
        /// Seconds the code lives.
        #[arg(long, default_value_t = 60)]
        ttl: i64,
    },
}

/// RocksDB's C++ allocates through glibc's malloc (ours goes to mimalloc).
/// glibc serves a large request (a memtable's 1 MB arena blocks, the 8 MB
/// bucket array of a hash memtable) from a fresh mapping, returned to the
/// system when freed, but after the first such free it raises that
/// threshold to the freed size, and from then on serves those blocks from
/// its heaps, which may keep the pages of memtables flushed since (the
/// soak's resident memory grew by some 350 MB an hour beyond what RocksDB
/// itself held). A fixed threshold turns the adjustment off: with it a
/// flush gives its memory back at once (the soak's resident memory fell
/// by 67 MB at a flush). The variable `MALLOC_MMAP_THRESHOLD_` still wins,
/// for an operator who tunes glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_glibc_mmap_threshold() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets malloc's parameters, and this runs
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
        }
    }
}

/// Transparent huge pages off for this process. mimalloc (ours) asks the
/// kernel for them on every region it maps (`MADV_HUGEPAGE`) and gives
/// freed memory back in 64 KiB pieces, which splits a huge page; the
/// kernel's khugepaged later collapses the range into a whole 2 MiB page
/// again, faulting the freed pieces back in as zeros. Resident memory then
/// grows with nothing more allocated: in a 30-minute soak at half the knee
/// with mimalloc serving RocksDB too, 432 MB of the 800 MB resident were
/// huge pages and resident memory rose 458 MB an hour in the second half.
/// The flag covers every mapping of the process, on a kernel whose THP
/// mode is `always` as well as `madvise`. An operator who wants them back
/// sets `MIMALLOC_ALLOW_THP=1` (mimalloc's own switch, read at its start).
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process's
        // memory map; it takes no pointers.
        let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if r != 0 {
            eprintln!(
                "onecard: could not turn transparent huge pages off ({}); resident memory may grow in huge pages",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// glibc's heap statistics, for `onecard_process_native_heap_bytes`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_heap() -> Option<onecard::service::metrics::NativeHeap> {
    // SAFETY: mallinfo2 only reads the allocator's statistics (taking each
    // arena's lock in turn); it has no preconditions.
    let m = unsafe { libc::mallinfo2() };
    Some(onecard::service::metrics::NativeHeap {
        in_use: (m.uordblks + m.hblkhd) as u64,
        free: m.fordblks as u64,
    })
}

fn main() -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    disable_transparent_huge_pages();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        fix_glibc_mmap_threshold();
        onecard::service::metrics::set_native_heap_probe(glibc_heap);
    }
    let cli = Cli::parse();
    // `serve` sets its logs up from its config ([log]); the rest as text.
    if !matches!(cli.command, Command::Serve { .. }) {
        telemetry::init_tracing();
    }
    match cli.command {
        Command::Qr { command } => qr_command(command),
        Command::Certs { out, terminals } => {
            let w = certs::generate(&out, terminals)?;
            println!("terminal CA certificate:  {}", w.ca_cert.display());
            println!("terminal CA private key:  {}", w.ca_key.display());
            println!(
                "server certificate:       {} (localhost, 127.0.0.1, ::1)",
                w.server_cert.display()
            );
            println!("server private key:       {}", w.server_key.display());
            if let (Some(first), Some(last)) = (w.terminals.first(), w.terminals.last()) {
                println!(
                    "terminal certificates:    {} ({} .. {}, identity = subject CN)",
                    out.join(certs::TERMINALS_DIR).display(),
                    first.0,
                    last.0
                );
            }
            Ok(())
        }
        Command::Crl {
            certs: dir,
            revoke,
            out,
            number,
            days,
        } => {
            let number = number.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(1)
            });
            certs::write_crl(&dir, &revoke, &out, number, days)?;
            println!(
                "CRL number {number} revoking {} terminal(s), next update in {days} days: {}",
                revoke.len(),
                out.display()
            );
            Ok(())
        }
        Command::SinkSim {
            addr,
            certs: dir,
            ledger,
            algorithm,
            key,
            client_ca,
        } => {
            use onecard_core::settle::sign::Algorithm;
            use onecard_core::settle::sign::Signer;
            anyhow::ensure!(addr.ip().is_loopback(), "sink-sim listens on loopback only");
            anyhow::ensure!(!key.is_empty(), "--key must not be empty");
            let algorithm = match algorithm.as_str() {
                "hmac-sha256" => Algorithm::HmacSha256,
                "hmac-sm3" => Algorithm::HmacSm3,
                other => {
                    anyhow::bail!("--algorithm must be hmac-sha256 or hmac-sm3, not {other:?}")
                }
            };
            let tls = onecard::app::sink_sim::server_tls(
                &dir.join(certs::SERVER_CERT),
                &dir.join(certs::SERVER_KEY),
                client_ca.as_deref(),
            )?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let r = onecard::app::sink_sim::start(
                    addr,
                    tls,
                    &ledger,
                    Signer::new(algorithm, key.into_bytes()),
                )
                .await?;
                println!(
                    "sink-sim: receiving batches on https://{}/v1/batches; ledger {}",
                    r.addr,
                    ledger.display()
                );
                wait_for_signal().await;
                r.stop().await;
                anyhow::Ok(())
            })
        }
        Command::Serve {
            config,
            data_dir,
            terminal_addr,
            admin_addr,
            plaintext_addr,
            durability,
            demo,
        } => {
            let mut c = match &config {
                Some(path) => Config::load(path).inspect_err(|_| telemetry::init_tracing())?,
                None => Config::default(),
            };
            telemetry::init_tracing_with(&c.log);
            if let Some(d) = data_dir {
                c.data_dir = d;
            }
            if let Some(a) = terminal_addr {
                c.terminal.addr = a;
            }
            if let Some(a) = admin_addr {
                c.admin.addr = a;
            }
            if let Some(a) = plaintext_addr {
                c.terminal.plaintext_addr = Some(a);
            }
            if let Some(d) = durability {
                c.journal.durability = match d.as_str() {
                    "sync" => onecard::config::Durability::Sync,
                    "async" => onecard::config::Durability::Async,
                    other => anyhow::bail!("--durability must be sync or async, not {other:?}"),
                };
            }
            if let Ok(t) = std::env::var("ONECARD_ADMIN_TOKEN") {
                c.admin.token = Some(t);
            }
            c.validate()?;
            // For the crash simulation only: die by SIGKILL at a named
            // point (src/crashpoint.rs).
            if let Ok(spec) = std::env::var("ONECARD_CRASH_AT") {
                onecard::store::crashpoint::arm(&spec)?;
                eprintln!("onecard: ONECARD_CRASH_AT={spec}: this process will kill itself there");
            }
            // At most 64 threads for blocking work (tokio's default is
            // 512): store reads the cache cannot answer, journal steps,
            // reloads. More threads than that read no faster on a few
            // CPUs and one disk, and each costs a stack and a share of the
            // C heap's arenas; past it the work waits in line, behind
            // the in-flight cap that bounds the requests making it.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(64)
                .build()?;
            runtime.block_on(serve(c, demo))
        }
    }
}

fn qr_command(command: QrCommand) -> anyhow::Result<()> {
    use onecard_core::qr;
    match command {
        QrCommand::Keygen { alg, out } => {
            let alg = qr::Alg::parse(&alg)
                .ok_or_else(|| anyhow::anyhow!("--alg must be sm2 or ed25519"))?;
            let key = qr::SigningKey::generate(alg, &mut rand_core::OsRng);
            let public = out.with_extension(match out.extension() {
                Some(e) => format!("{}.pub", e.to_string_lossy()),
                None => "pub".into(),
            });
            write_private(&out, key.to_pkcs8_pem().as_bytes())?;
            std::fs::write(&public, key.public_pem())?;
            println!("private key: {} (keep it with the issuer)", out.display());
            println!(
                "public key:  {} (for [[qr.keys]] public_key)",
                public.display()
            );
            Ok(())
        }
        QrCommand::Issue {
            key,
            kid,
            sub,
            typ,
            ttl,
        } => {
            let pem = std::fs::read_to_string(&key)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", key.display()))?;
            let key = qr::SigningKey::from_pkcs8_pem(&pem).map_err(anyhow::Error::msg)?;
            let typ = qr::CredType::parse(&typ)
                .ok_or_else(|| anyhow::anyhow!("--typ must be essc or ykm"))?;
            let now = onecard_core::time::wall_ms() / 1000;
            let token = qr::issue(
                &key,
                &kid,
                &sub,
                typ,
                now,
                ttl,
                &qr::random_jti(&mut rand_core::OsRng),
            )
            .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

async fn serve(config: Config, run_demo: bool) -> anyhow::Result<()> {
    let certs_dir = config.certs_dir();
    let token = config.admin.token.clone().unwrap_or_default();
    let first_sink = config.settlement.sinks.first().cloned();
    // The credentials demo needs the dev issuer keys and hotline token.
    let qr_demo = demo::dev_qr_keys(&config.qr.keys);
    let data_dir = config.data_dir.clone();
    let scenario_demo = !config.transit.routes.is_empty();
    let running = server::start(config)
        .await
        .context("starting the gateway")?;
    let addrs = running.addrs;
    println!(
        "onecard: terminal listener (mTLS, h1/h2) on {}",
        addrs.terminal
    );
    if let Some(p) = addrs.plaintext {
        println!("onecard: plaintext benchmark listener on {p}");
    }
    println!(
        "onecard: admin listener on {} (/metrics, /healthz, /readyz, /admin/v1/...)",
        addrs.admin
    );
    // The demo's receiver: the settlement sinks' (loopback) address, with
    // the first sink's key, booking into the data directory.
    let mut receiver = None;
    if let Some(sink) = first_sink.filter(|_| run_demo) {
        let uri: http::Uri = sink.url.parse().context("settlement url")?;
        let addr: std::net::SocketAddr = format!(
            "{}:{}",
            uri.host().unwrap_or("127.0.0.1"),
            uri.port_u16().unwrap_or(443)
        )
        .parse()
        .context("the demo receiver needs an IP address in the sink url")?;
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "the demo receiver listens on loopback only"
        );
        let tls = onecard::app::sink_sim::server_tls(
            &certs_dir.join(certs::SERVER_CERT),
            &certs_dir.join(certs::SERVER_KEY),
            None,
        )?;
        let signer = onecard_core::settle::sign::Signer::new(sink.algorithm, sink.signing_key()?);
        let ledger = data_dir.join("demo-ledger.jsonl");
        let r = onecard::app::sink_sim::start(addr, tls, &ledger, signer).await?;
        println!(
            "onecard: demo settlement receiver on https://{} (ledger {})",
            r.addr,
            ledger.display()
        );
        receiver = Some(r);
    }
    if run_demo {
        if let Err(e) = demo::run(addrs.admin, addrs.terminal, &certs_dir, &token).await {
            eprintln!("demo failed: {e:#}");
        }
        if receiver.is_some() {
            if let Err(e) = demo::settlement(addrs.admin, addrs.terminal, &certs_dir, &token).await
            {
                eprintln!("settlement demo failed: {e:#}");
            }
        }
        if let Some(keys) = &qr_demo {
            if let Err(e) =
                demo::credentials(addrs.admin, addrs.terminal, &certs_dir, &token, keys).await
            {
                eprintln!("credentials demo failed: {e:#}");
            }
        }
        if scenario_demo {
            if let Err(e) = demo::scenarios(addrs.admin, addrs.terminal, &certs_dir, &token).await {
                eprintln!("scenarios demo failed: {e:#}");
            }
            if let Err(e) = demo::applications(addrs.admin, addrs.terminal, &certs_dir).await {
                eprintln!("applications demo failed: {e:#}");
            }
        }
        println!(
            "onecard: demo done; still serving. Ctrl-C (SIGINT) or SIGTERM stops the gateway."
        );
    }
    let restart = tokio::select! {
        _ = wait_for_signal() => None,
        why = running.restart_needed() => Some(why),
    };
    println!("onecard: shutting down: finishing requests in flight, flushing the journal");
    running.shutdown().await;
    if let Some(r) = receiver {
        r.stop().await;
    }
    if let Some(why) = restart {
        // EX_TEMPFAIL: a supervisor (systemd `Restart=on-failure`, a
        // container's restart policy) starts it again, on what RocksDB
        // made durable.
        eprintln!("onecard: exiting for a restart: {why}");
        std::process::exit(RESTART_EXIT_CODE);
    }
    println!("onecard: stopped");
    Ok(())
}

/// The exit status asking the supervisor for a restart (EX_TEMPFAIL).
const RESTART_EXIT_CODE: i32 = 75;

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
