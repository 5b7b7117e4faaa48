//! Scans over real sockets: codes made with the crypto crates directly
//! (tests/common/qr.rs) resolve through bound credentials to cards and go
//! through the same decision as taps; every refusal has its reason; a code
//! is single use, also across a restart.

use http::{Method, StatusCode};
use onecard::config::{Config, QrKeyConfig};
use onecard::net::client::Protocol;
use serde_json::json;

use crate::common::qr::{now_s, scan, TestKey};
use crate::common::{decision, error_code, TestGateway};

const CARD: &str = "500118Q00000001";
const LOST: &str = "500118Q00000002";

/// Issuer keys: Ed25519 `ed-1`, SM2 `sm-1`, a retired `old-1` and one not
/// valid yet `next-1`.
struct Keys {
    _dir: tempfile::TempDir,
    ed: TestKey,
    sm: TestKey,
    old: TestKey,
    next: TestKey,
    configs: Vec<QrKeyConfig>,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let (ed, sm, old, next) = (
        TestKey::ed25519(11),
        TestKey::sm2(12),
        TestKey::ed25519(13),
        TestKey::sm2(14),
    );
    let conf = |kid: &str, k: &TestKey, from: Option<&str>, until: Option<&str>| QrKeyConfig {
        kid: kid.into(),
        alg: k.alg().into(),
        public_key: k.write_public(dir.path(), kid),
        valid_from: from.map(Into::into),
        valid_until: until.map(Into::into),
    };
    let configs = vec![
        conf("ed-1", &ed, Some("2020-01-01T00:00:00Z"), None),
        conf("sm-1", &sm, None, None),
        conf("old-1", &old, None, Some("2021-01-01T00:00:00+08:00")),
        conf("next-1", &next, Some("2099-01-01T00:00:00Z"), None),
    ];
    Keys {
        _dir: dir,
        ed,
        sm,
        old,
        next,
        configs,
    }
}

fn with_keys(k: &Keys) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        c.qr.keys = k.configs.clone();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_resolve_to_cards_and_every_refusal_has_its_reason() {
    let k = keys();
    let mut gw = TestGateway::start(with_keys(&k)).await;
    for card in [CARD, LOST] {
        gw.put_card(
            card,
            json!({"status": "active", "functions": ["transit", "medical"]}),
        )
        .await;
    }
    gw.bind(CARD, "essc-0001", "essc").await;
    gw.bind(CARD, "ykm-0001", "ykm").await;
    gw.bind(LOST, "essc-0002", "essc").await;
    let lost = gw
        .admin(Method::POST, &format!("/admin/v1/cards/{LOST}/loss"), None)
        .await;
    assert_eq!(
        lost.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&lost.body)
    );

    let mut t = gw.terminal(1, Protocol::Http2).await;
    let now = now_s();
    let good_ed =
        k.ed.code("ed-1", "essc-0001", "essc", now, 60, "jti-ed-000001");
    let good_sm =
        k.sm.code("sm-1", "ykm-0001", "ykm", now, 60, "jti-sm-000001");

    // Both algorithms approve, through the same decision as a tap.
    let a = t
        .authorize(&scan("s-1", &good_ed, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    let first = a.body.clone();
    let a = t
        .authorize(&scan("s-2", &good_sm, "medical", 1_500))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));

    // The same request again is a retry (same answer, byte for byte); the
    // same code in another event is a replay.
    let again = t
        .authorize(&scan("s-1", &good_ed, "transit", 200))
        .await
        .unwrap();
    assert_eq!(again.body, first);
    let a = t
        .authorize(&scan("s-3", &good_ed, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("decline".into(), "QR_REPLAYED".into()));

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "signed by another key under a known kid",
            TestKey::ed25519(99).code("ed-1", "essc-0001", "essc", now, 60, "jti-c-000001"),
            "QR_INVALID",
        ),
        (
            "payload altered after signing",
            {
                let t =
                    k.ed.code("ed-1", "essc-0001", "essc", now, 60, "jti-c-000002");
                let other =
                    k.ed.code("ed-1", "essc-0009", "essc", now, 60, "jti-c-000002");
                let p: Vec<&str> = t.split('.').collect();
                let q: Vec<&str> = other.split('.').collect();
                format!("{}.{}.{}.{}", p[0], p[1], q[2], p[3])
            },
            "QR_INVALID",
        ),
        (
            "expired beyond the skew",
            k.sm.code("sm-1", "ykm-0001", "ykm", now - 300, 60, "jti-c-000003"),
            "QR_EXPIRED",
        ),
        (
            "issued in the future beyond the skew",
            k.ed.code("ed-1", "essc-0001", "essc", now + 300, 60, "jti-c-000004"),
            "QR_INVALID",
        ),
        (
            "lives longer than allowed",
            k.ed.code("ed-1", "essc-0001", "essc", now, 3_600, "jti-c-000005"),
            "QR_INVALID",
        ),
        (
            "unknown kid",
            k.ed.code("nope-1", "essc-0001", "essc", now, 60, "jti-c-000006"),
            "QR_INVALID",
        ),
        (
            "retired key",
            k.old
                .code("old-1", "essc-0001", "essc", now, 60, "jti-c-000007"),
            "QR_INVALID",
        ),
        (
            "key not valid yet",
            k.next
                .code("next-1", "essc-0001", "essc", now, 60, "jti-c-000008"),
            "QR_INVALID",
        ),
        (
            "type differs from the binding",
            k.ed.code("ed-1", "ykm-0001", "essc", now, 60, "jti-c-000009"),
            "QR_INVALID",
        ),
        (
            "malformed",
            "OC1.ed-1.not-base64!.x".to_owned(),
            "QR_INVALID",
        ),
        (
            "wrong prefix",
            good_ed.replacen("OC1", "OC2", 1),
            "QR_INVALID",
        ),
        (
            "credential bound to no card",
            k.ed.code("ed-1", "essc-unbound", "essc", now, 60, "jti-c-000010"),
            "CREDENTIAL_UNBOUND",
        ),
        (
            "card reported lost",
            k.sm.code("sm-1", "essc-0002", "essc", now, 60, "jti-c-000011"),
            "CARD_LOST",
        ),
    ];
    for (i, (what, token, want)) in cases.iter().enumerate() {
        let a = t
            .authorize(&scan(&format!("c-{i}"), token, "transit", 200))
            .await
            .unwrap();
        assert_eq!(decision(&a), ("decline".into(), (*want).into()), "{what}");
        assert!(
            !String::from_utf8_lossy(&a.body).contains(CARD),
            "{what}: the answer names no card"
        );
    }

    // A restart does not reopen the code for replay: the cache is refilled
    // from the journal.
    gw.restart().await;
    let mut t = gw.terminal(2, Protocol::Http1).await;
    let a = t
        .authorize(&scan("r-1", &good_sm, "medical", 100))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("decline".into(), "QR_REPLAYED".into()));
    let fresh =
        k.sm.code("sm-1", "ykm-0001", "ykm", now_s(), 60, "jti-sm-000002");
    let a = t
        .authorize(&scan("r-2", &fresh, "medical", 100))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));

    // The scans are the card's: the hotline look-up lists them.
    let look = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/cards/{CARD}/transactions"),
            None,
        )
        .await;
    assert_eq!(
        look.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&look.body)
    );
    let kinds: Vec<String> = look.json()["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        kinds.iter().filter(|k| *k == "scan").count() >= 3,
        "{kinds:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_are_checked_and_scans_need_keys() {
    let k = keys();
    let gw = TestGateway::start(with_keys(&k)).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    gw.put_card(LOST, json!({"status": "active", "functions": ["transit"]}))
        .await;
    gw.bind(CARD, "essc-0001", "essc").await;
    // Binding again is harmless; to another card is a conflict.
    gw.bind(CARD, "essc-0001", "essc").await;
    let a = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/cards/{LOST}/credentials"),
            Some(json!({"credential_id": "essc-0001", "typ": "essc"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(error_code(&a), "CONFLICT");
    for (body, field) in [
        (
            json!({"credential_id": "bad id!", "typ": "essc"}),
            "credential_id",
        ),
        (json!({"credential_id": "x-1", "typ": "card"}), "typ"),
        (
            json!({"credential_id": "x-1", "typ": "essc", "extra": 1}),
            "extra",
        ),
    ] {
        let a = gw
            .admin(
                Method::POST,
                &format!("/admin/v1/cards/{CARD}/credentials"),
                Some(body),
            )
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(field));
    }
    let list = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/cards/{CARD}/credentials"),
            None,
        )
        .await;
    assert_eq!(
        list.json()["credentials"],
        json!([{"credential_id": "essc-0001", "typ": "essc"}])
    );

    // Unbound, the code leads nowhere.
    let a = gw
        .admin(Method::DELETE, "/admin/v1/credentials/essc-0001", None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let code =
        k.ed.code("ed-1", "essc-0001", "essc", now_s(), 60, "jti-u-000001");
    let a = t
        .authorize(&scan("u-1", &code, "transit", 200))
        .await
        .unwrap();
    assert_eq!(
        decision(&a),
        ("decline".into(), "CREDENTIAL_UNBOUND".into())
    );
    let a = gw
        .admin(Method::DELETE, "/admin/v1/credentials/essc-0001", None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    gw.shutdown().await;

    // Without issuer keys a scan is refused as a request error.
    let plain = TestGateway::start(|_| {}).await;
    let mut t = plain.terminal(1, Protocol::Http1).await;
    let a = t
        .authorize(&scan("n-1", &code, "transit", 200))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not configured"));
    plain.shutdown().await;
}

/// `onecard qr keygen` and `onecard qr issue`, as an operator runs them:
/// the key pair goes into the config and a printed code is approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_from_the_command_line_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_onecard");
    let mut configs = Vec::new();
    let mut codes = Vec::new();
    for (alg, kid, sub, typ) in [
        ("sm2", "cli-sm2", "ykm-cli1", "ykm"),
        ("ed25519", "cli-ed", "essc-cli1", "essc"),
    ] {
        let key = dir.path().join(format!("{alg}.pem"));
        let out = std::process::Command::new(bin)
            .args(["qr", "keygen", "--alg", alg, "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o777,
            0o600,
            "the private key is readable by its owner only"
        );
        configs.push(QrKeyConfig {
            kid: kid.into(),
            alg: alg.into(),
            public_key: dir.path().join(format!("{alg}.pem.pub")),
            valid_from: None,
            valid_until: None,
        });
        let out = std::process::Command::new(bin)
            .args([
                "qr", "issue", "--kid", kid, "--sub", sub, "--typ", typ, "--ttl", "60", "--key",
            ])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        codes.push((
            sub,
            typ,
            String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        ));
    }
    let bad = std::process::Command::new(bin)
        .args(["qr", "keygen", "--alg", "rsa", "--out"])
        .arg(dir.path().join("x.pem"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sm2 or ed25519"));

    let gw = TestGateway::start(|c| c.qr.keys = configs).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    for (i, (sub, typ, code)) in codes.iter().enumerate() {
        gw.bind(CARD, sub, typ).await;
        assert!(code.starts_with("OC1."), "{code}");
        let a = t
            .authorize(&scan(&format!("cli-{i}"), code, "transit", 200))
            .await
            .unwrap();
        assert_eq!(decision(&a), ("approve".into(), "OK".into()), "{sub}");
    }
    gw.shutdown().await;
}

/// Ed25519 scans that arrive together are verified in batches (the
/// default, `qr.batch_ed25519`): each still gets its own verdict, a bad
/// signature among good ones declines only its own scan, and every code
/// is spent once. The same scans with batching off get the same verdicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_verified_together_each_get_their_own_verdict() {
    const TERMINALS: usize = 8;
    const EACH: usize = 4;
    let k = keys();
    let forger = TestKey::ed25519(99);
    for batch in [true, false] {
        let gw = TestGateway::start(|c| {
            c.qr.keys = k.configs.clone();
            c.qr.batch_ed25519 = batch;
            c.terminal.dev_terminals = TERMINALS as u32;
        })
        .await;
        let now = now_s();
        // One card per scan, so that no transit rule (a re-tap, a cap)
        // stands between a valid code and its approval.
        let mut jobs = Vec::new();
        for i in 0..TERMINALS * EACH {
            let (card, sub) = (format!("500118Q{:08}", 100 + i), format!("essc-b{i:03}"));
            gw.put_card(&card, json!({"status": "active", "functions": ["transit"]}))
                .await;
            gw.bind(&card, &sub, "essc").await;
            let good = i % 3 != 1;
            let signer = if good { &k.ed } else { &forger };
            let code = signer.code(
                "ed-1",
                &sub,
                "essc",
                now,
                60,
                &format!("jti-b{batch}-{i:04}"),
            );
            jobs.push((format!("b-{i}"), code, good));
        }
        let mut tasks = Vec::new();
        for (t, chunk) in jobs.chunks(EACH).enumerate() {
            let mut conn = gw.terminal(t as u32 + 1, Protocol::Http1).await;
            let chunk = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for (event, code, good) in chunk {
                    let a = conn
                        .authorize(&scan(&event, &code, "transit", 200))
                        .await
                        .unwrap();
                    got.push((event, good, decision(&a)));
                }
                got
            }));
        }
        for task in tasks {
            for (event, good, got) in task.await.unwrap() {
                let want = if good {
                    ("approve".to_string(), "OK".to_string())
                } else {
                    ("decline".to_string(), "QR_INVALID".to_string())
                };
                assert_eq!(got, want, "{event} (batch {batch})");
            }
        }
        // Each good code is spent once: again, it is a replay.
        let mut t = gw.terminal(1, Protocol::Http1).await;
        for (event, code, good) in &jobs {
            let a = t
                .authorize(&scan(&format!("{event}-again"), code, "transit", 200))
                .await
                .unwrap();
            let want = if *good { "QR_REPLAYED" } else { "QR_INVALID" };
            assert_eq!(decision(&a), ("decline".into(), want.into()), "{event}");
        }
        if batch {
            // The scans went through the batching point (the counter is
            // the process's, shared with other tests: it moved, at least).
            let m = gw.admin(Method::GET, "/metrics", None).await;
            let m = String::from_utf8_lossy(&m.body);
            let n = m
                .lines()
                .find_map(|l| l.strip_prefix("onecard_qr_ed25519_signatures_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            assert!(n >= jobs.len() as f64, "{n} signatures counted");
        }
        gw.shutdown().await;
    }
}
