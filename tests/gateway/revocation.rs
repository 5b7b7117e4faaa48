//! A stolen terminal shut out: by the CA's revocation list, or by the
//! security team's block list, which also closes the connections it has
//! open; and the terminal listener's certificate, CA and CRLs reloaded
//! without a restart (admin route and SIGHUP), connections open kept.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::config::{Role, TokenConfig};
use onecard::net::certs;
use onecard::net::client::{self, Connection, Protocol};
use serde_json::{json, Value};
use tokio_rustls::rustls;

use crate::common::process::{spawn_gateway_full, wait_ready};
use crate::common::{decision, tap, TestGateway, TOKEN};

const SECURITY: &str = "security-team-token";
const AGENT: &str = "hotline-agent-token";
const CARD: &str = "500118R00000001";

fn tokens(c: &mut onecard::config::Config) {
    for (name, role, token) in [
        ("security-desk", Role::Security, SECURITY),
        ("hotline-12345", Role::Agent, AGENT),
    ] {
        c.admin.tokens.push(TokenConfig {
            name: name.into(),
            role,
            token: Some(token.into()),
            token_env: None,
        });
    }
}

async fn call(
    gw: &TestGateway,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> client::Answer {
    client::admin(gw.admin_addr(), Some(token), method, path, body.as_ref())
        .await
        .unwrap()
}

/// Taps once as terminal `n` on a new connection: `Ok` with the
/// decision, or `Err` when the TLS handshake or the first request fails
/// (under TLS 1.3 a client learns its certificate was refused only when
/// it reads: the server's alert comes after the client's Finished).
async fn tap_as(gw: &TestGateway, n: u32, event: &str) -> Result<String, String> {
    let mut conn = client::connect_terminal(
        gw.terminal_addr(),
        Some(&gw.certs_dir()),
        n,
        Protocol::Http1,
    )
    .await
    .map_err(|e| e.to_string())?;
    tap_on(&mut conn, event).await
}

/// Taps once on an open connection: the decision, or why there was none.
async fn tap_on(conn: &mut Connection, event: &str) -> Result<String, String> {
    let a = conn
        .authorize(&tap(event, CARD, "transit", 200))
        .await
        .map_err(|e| e.to_string())?;
    Ok(decision(&a).0)
}

async fn metrics(gw: &TestGateway) -> String {
    String::from_utf8_lossy(&gw.admin(Method::GET, "/metrics", None).await.body).into_owned()
}

/// The value of the first series of `name` whose labels contain `labels`.
fn series(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until `conn` is closed by the server, up to `within`.
async fn closed_within(conn: &Connection, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if conn.is_closed() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.is_closed()
}

async fn start_with_crl(revoked: &[&str]) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::generate(&certs_dir, 3).unwrap();
    let crl = dir.path().join("terminals.crl.pem");
    let revoked: Vec<String> = revoked.iter().map(|s| s.to_string()).collect();
    certs::write_crl(&certs_dir, &revoked, &crl, 1, 7).unwrap();
    let mut config = crate::common::test_config(dir.path());
    config.terminal.crl = vec![crl];
    tokens(&mut config);
    let gw = TestGateway::start_in(dir, config).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_on_the_crl_is_refused_at_the_handshake_and_a_reloaded_crl_refuses_the_next() {
    let gw = start_with_crl(&["term-00002"]).await;
    assert_eq!(tap_as(&gw, 1, "crl-1").await.unwrap(), "approve");
    let refused = tap_as(&gw, 2, "crl-2").await;
    assert!(
        refused.is_err(),
        "a revoked terminal was served: {refused:?}"
    );
    let m = metrics(&gw).await;
    assert!(
        series(
            &m,
            "onecard_tls_terminals_refused_total",
            "reason=\"revoked\""
        )
        .unwrap_or(0.0)
            >= 1.0,
        "refusal not counted"
    );
    assert_eq!(
        series(
            &m,
            "onecard_tls_crl_revoked_certificates",
            "terminals.crl.pem"
        ),
        Some(1.0)
    );
    let next = series(
        &m,
        "onecard_tls_crl_next_update_timestamp_seconds",
        "terminals.crl.pem",
    )
    .expect("the CRL's next update is a metric");
    let now_s = crate::common::qr::now_s() as f64;
    assert!(
        (next - now_s - 7.0 * 86_400.0).abs() < 600.0,
        "{next} vs {now_s}"
    );

    // Terminal 3 is connected; the CA revokes it in a new list, installed
    // without a restart. The connection it has stays up (reloads never
    // drop one); its next handshake is refused.
    let mut three = client::connect_terminal(
        gw.terminal_addr(),
        Some(&gw.certs_dir()),
        3,
        Protocol::Http2,
    )
    .await
    .unwrap();
    assert_eq!(tap_on(&mut three, "crl-3").await.unwrap(), "approve");
    let crl = gw.dir.path().join("terminals.crl.pem");
    certs::write_crl(
        &gw.certs_dir(),
        &["term-00002".into(), "term-00003".into()],
        &crl,
        2,
        7,
    )
    .unwrap();
    // An agent may not reload; the security team may.
    let a = call(&gw, AGENT, Method::POST, "/admin/v1/tls/reload", None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(&gw, SECURITY, Method::POST, "/admin/v1/tls/reload", None).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["tls"]["crls"][0]["revoked"], 2);
    assert_eq!(
        tap_on(&mut three, "crl-4").await.unwrap(),
        "approve",
        "the open connection survives the reload"
    );
    assert!(tap_as(&gw, 3, "crl-5").await.is_err());
    assert_eq!(tap_as(&gw, 1, "crl-6").await.unwrap(), "approve");

    // A CRL that cannot be read is refused whole: the old trust stays.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let a = call(&gw, SECURITY, Method::POST, "/admin/v1/tls/reload", None).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("terminals.crl.pem") && msg.contains("stay in use"),
        "{msg}"
    );
    assert_eq!(tap_as(&gw, 1, "crl-7").await.unwrap(), "approve");
    assert!(tap_as(&gw, 3, "crl-8").await.is_err(), "still revoked");
    // A CRL another CA signed (under the same name, as every development
    // CA has) would fail every handshake: refused at load, saying why.
    let other = tempfile::tempdir().unwrap();
    certs::generate(other.path(), 1).unwrap();
    certs::write_crl(other.path(), &[], &crl, 3, 7).unwrap();
    let a = call(&gw, SECURITY, Method::POST, "/admin/v1/tls/reload", None).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not signed by a CA of terminal.client_ca"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let audit = gw.admin_ok(Method::GET, "/admin/v1/audit", None).await;
    let reloads = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "tls_reload")
        .count();
    assert_eq!(
        reloads, 3,
        "each reload by the security team is audited: {audit}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_terminal_is_refused_and_its_open_connections_close_within_a_second() {
    let mut gw = TestGateway::start(tokens).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut one = gw.terminal(1, Protocol::Http1).await;
    let mut two = gw.terminal(2, Protocol::Http2).await;
    let mut three = gw.terminal(3, Protocol::Http1).await;
    for (i, c) in [&mut one, &mut two, &mut three].into_iter().enumerate() {
        assert_eq!(tap_on(c, &format!("blk-{i}")).await.unwrap(), "approve");
    }
    // The bus is reported stolen: the security team looks it up by its
    // terminal id and blocks its certificate, by serial for one and by
    // SHA-256 fingerprint (as a certificate viewer prints it) for two.
    let t1 = call(
        &gw,
        SECURITY,
        Method::GET,
        "/admin/v1/terminals/term-00001",
        None,
    )
    .await
    .json();
    assert_eq!(t1["connections_open"], 1);
    let serial = t1["cert_serial"].as_str().unwrap().to_owned();
    let t2 = call(
        &gw,
        SECURITY,
        Method::GET,
        "/admin/v1/terminals/term-00002",
        None,
    )
    .await
    .json();
    let fp = t2["cert_sha256"].as_str().unwrap().to_uppercase();
    let fp_colons: Vec<String> = fp
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let body = json!({"reason": "bus 12-0042 reported stolen", "terminal": "term-00001"});
    // An agent may not block.
    let a = call(
        &gw,
        AGENT,
        Method::PUT,
        &format!("/admin/v1/terminal-blocks/serial:{serial}"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // A key that is no key is a clear 400.
    let a = call(
        &gw,
        SECURITY,
        Method::PUT,
        "/admin/v1/terminal-blocks/serial:xyz",
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&a.body).contains("hexadecimal"));

    let blocked_at = Instant::now();
    let a = call(
        &gw,
        SECURITY,
        Method::PUT,
        &format!("/admin/v1/terminal-blocks/serial:{serial}"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["changed"], true);
    let a = call(
        &gw,
        SECURITY,
        Method::PUT,
        &format!("/admin/v1/terminal-blocks/sha256:{}", fp_colons.join(":")),
        Some(json!({"reason": "gate 7 lost"})),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(
        closed_within(&one, Duration::from_secs(1)).await,
        "HTTP/1.1 connection of a blocked terminal still open"
    );
    assert!(
        closed_within(&two, Duration::from_secs(1)).await,
        "HTTP/2 connection of a blocked terminal still open"
    );
    assert!(blocked_at.elapsed() < Duration::from_secs(3));
    assert!(one
        .authorize(&tap("blk-x", CARD, "transit", 200))
        .await
        .is_err());
    // Others go on; new handshakes of the blocked ones are refused.
    assert_eq!(tap_on(&mut three, "blk-3").await.unwrap(), "approve");
    assert!(tap_as(&gw, 1, "blk-4").await.is_err());
    assert!(tap_as(&gw, 2, "blk-5").await.is_err());
    // Blocking again changes nothing and says so.
    let a = call(
        &gw,
        SECURITY,
        Method::PUT,
        &format!("/admin/v1/terminal-blocks/serial:{serial}"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.json()["changed"], false);
    let list = call(
        &gw,
        SECURITY,
        Method::GET,
        "/admin/v1/terminal-blocks",
        None,
    )
    .await
    .json();
    assert_eq!(list["count"], 2);
    assert_eq!(list["blocks"][0]["by"], "security-desk");
    let m = metrics(&gw).await;
    assert!(
        series(
            &m,
            "onecard_tls_terminals_refused_total",
            "reason=\"blocked\""
        )
        .unwrap_or(0.0)
            >= 2.0
    );

    // The block survives a restart.
    drop((one, two, three));
    gw.restart().await;
    assert!(
        tap_as(&gw, 1, "blk-6").await.is_err(),
        "block lost in a restart"
    );
    assert_eq!(tap_as(&gw, 3, "blk-7").await.unwrap(), "approve");
    // Lifted: terminal 1 connects again. Both changes are audited.
    let a = call(
        &gw,
        SECURITY,
        Method::DELETE,
        &format!("/admin/v1/terminal-blocks/serial:{}", serial.to_uppercase()),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["changed"], true);
    assert_eq!(tap_as(&gw, 1, "blk-8").await.unwrap(), "approve");
    let audit = gw.admin_ok(Method::GET, "/admin/v1/audit", None).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| a.contains("block"))
        .collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "block_terminal").count(),
        2,
        "{audit}"
    );
    assert_eq!(
        actions.iter().filter(|a| **a == "unblock_terminal").count(),
        1,
        "{audit}"
    );
    gw.shutdown().await;
}

/// The serial of the certificate a server presents on a new handshake.
async fn server_serial(addr: std::net::SocketAddr, certs_dir: &Path) -> String {
    let id = certs::terminal_id(1);
    let config = client::tls_config(
        &certs_dir.join(certs::CA_CERT),
        Some((
            &certs::terminal_cert_path(certs_dir, &id),
            &certs::terminal_key_path(certs_dir, &id),
        )),
        Protocol::Http1,
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&config))
        .connect(name, tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    onecard::net::tls::CertKeys::of(&der).serial
}

/// The renewal as an operator does it: the real binary, a new server
/// certificate written in place, `kill -HUP`; the terminal connected
/// before goes on, the next handshake gets the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_server_certificate_while_a_connection_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_gateway_full(dir.path(), 1, "", "", &[]);
    let addrs = wait_ready(&mut child, dir.path());
    let certs_dir = dir.path().join("data/certs");
    crate::common::put_cards_at(addrs.admin, &[CARD.to_owned()], json!(["transit"])).await;
    let mut open =
        crate::common::connect_terminal(&certs_dir, addrs.terminal, 1, Protocol::Http2).await;
    let a = open
        .authorize(&tap("hup-1", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a).0, "approve");
    let before = server_serial(addrs.terminal, &certs_dir).await;

    certs::reissue_server(&certs_dir).unwrap();
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // The reload happens on the gateway's own time: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = server_serial(addrs.terminal, &certs_dir).await;
    while after == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = server_serial(addrs.terminal, &certs_dir).await;
    }
    assert_ne!(
        after, before,
        "the new server certificate is not in use after SIGHUP"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not end the gateway"
    );
    let a = open
        .authorize(&tap("hup-2", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(
        decision(&a).0,
        "approve",
        "the connection open before the reload goes on"
    );
    let tls = client::admin(addrs.admin, Some(TOKEN), Method::GET, "/admin/v1/tls", None)
        .await
        .unwrap();
    assert_eq!(tls.status, StatusCode::OK);
    assert!(
        tls.json()["server_cert_not_after_s"].as_i64().unwrap()
            > crate::common::qr::now_s() + 700 * 86_400
    );
    let _ = child.kill();
    let _ = child.wait();
}
