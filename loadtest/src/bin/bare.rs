//! `onecard-bare`: the baseline for benchmarks. The same hyper + rustls
//! plumbing as the gateway (same TLS config with client certificates, same
//! connection handling), answering `200` with a fixed JSON body after reading
//! the request body: no decision, no journal. The gateway's figures are
//! reported as a ratio of this server's, the limit of HTTP and TLS here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use onecard::http::ingress;
use onecard::net::certs;
use tokio::net::TcpListener;
use tokio::sync::watch;

// The same allocator as the gateway, so the baseline is a fair one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1:8600")]
    addr: SocketAddr,
    /// Serve mTLS with the certificates in this directory (as made by
    /// `onecard certs`); plaintext without it.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Stop by itself after this many seconds.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
}

const BODY: &[u8] = br#"{"event_id":"bare","auth_id":"00000000000000000000","decision":"approve","reason":"OK","amount_fen":200}"#;

async fn answer(req: ingress::Req) -> Response<ingress::Body> {
    let _ = req.into_body().collect().await;
    let mut r = Response::new(Full::new(Bytes::from_static(BODY)));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.addr.ip().is_loopback(),
        "the baseline server listens on loopback only"
    );
    let tls = match &args.certs {
        Some(dir) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            onecard::net::tls::server_tls(
                &dir.join(certs::SERVER_CERT),
                &dir.join(certs::SERVER_KEY),
                &dir.join(certs::CA_CERT),
            )?,
        ))),
        None => None,
    };
    let listener = TcpListener::bind(args.addr).await?;
    println!(
        "onecard-bare: listening on {} ({})",
        listener.local_addr()?,
        if tls.is_some() { "mTLS" } else { "plaintext" }
    );
    let (_stop_tx, stop) = watch::channel(false);
    let deadline = tokio::time::sleep(Duration::from_secs(args.seconds));
    tokio::pin!(deadline);
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => a?,
            _ = &mut deadline => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let t = Duration::from_secs(5);
            let idle = Duration::from_secs(120);
            match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(stream).await {
                        // The same plumbing as the gateway: the slow-head
                        // check for HTTP/1.1 only.
                        let h1 = s.get_ref().1.alpn_protocol() != Some(b"h2");
                        ingress::serve_connection(s, answer, t, idle, h1, stop).await;
                    }
                }
                None => ingress::serve_connection(stream, answer, t, idle, true, stop).await,
            }
        });
    }
}
