//! Storage faults under the real binary: the journal's disk full (a small
//! tmpfs), failing with EIO, stalled, and a power cut that loses what was
//! not synced (the fault file system, `common::faultfs`).
//!
//! A full or failing disk: decisions stop with `503` and `Retry-After`,
//! `/readyz` and a metric say why, reads go on (replays of answers given,
//! the deny list, metrics); once the disk takes writes again the gateway
//! exits (status 75) for its supervisor, and the restart has every
//! decision a terminal was answered, once, and settlement books each
//! approval once. A stalled disk: `503` until it writes again, then
//! decisions resume by themselves.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::net::client::{self, Protocol};
use serde_json::json;

use crate::common::faultfs::{FaultFs, Mode};
use crate::common::process::{spawn_gateway, wait_exit, wait_ready};
use crate::common::sink::Sink;
use crate::common::{connect_terminal, put_cards_at, tap, TOKEN};

/// A gateway process, killed when dropped: a test that fails half-way
/// leaves no gateway writing to a file system being unmounted.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, terminals: u32, extra: &str) -> (Proc, onecard::app::server::Addrs) {
    let mut child = Proc(spawn_gateway(dir, terminals, extra));
    let addrs = wait_ready(&mut child.0, dir);
    (child, addrs)
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (and why, on stderr) where this machine cannot mount one: not
    /// root, or no mount permission (a container without CAP_SYS_ADMIN).
    fn mount(at: &Path, size_mb: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at.to_owned())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: no `mount` command: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` until a write fails with ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096, 1] {
        let buf = vec![7u8; chunk];
        while f.write_all(&buf).and_then(|_| f.flush()).is_ok() {}
    }
    path
}

fn card(i: usize) -> String {
    format!("500118D{i:08}")
}

const CARDS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_decisions_with_503_and_the_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(&dir.path().join("data"), 48) else {
        return;
    };
    const KEY: &str = "disk-transport-key";
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(sink_dir.path(), 1);
    let receiver = sink.start_hmac(KEY).await;
    let extra = format!(
        "{}age_max_ms = 100\nbackoff_base_ms = 10\nbackoff_max_ms = 200\n",
        sink.transport_entry(receiver.addr, KEY)
    );
    let (mut child, addrs) = start(dir.path(), 1, &extra);
    let certs = dir.path().join("data/certs");
    put_all_cards(addrs.admin).await;
    let mut t = connect_terminal(&certs, addrs.terminal, 1, Protocol::Http1).await;

    let mut answered = Answered::new();
    for i in 0..10 {
        let a = tap_keep(&mut t, 1, &mut answered, &format!("disk-{i}"), &card(i)).await;
        assert_eq!(a.status, StatusCode::OK);
    }

    let filler = fill(&dir.path().join("data"));
    let mut refused = None;
    for i in 10..2_000 {
        let event = format!("disk-{i}");
        let a = tap_keep(&mut t, 1, &mut answered, &event, &card_of(&event)).await;
        match a.status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                refused = Some(a);
                break;
            }
            s => panic!("{event}: {s} {}", String::from_utf8_lossy(&a.body)),
        }
    }
    let refused = refused.expect("a full disk never refused a decision");
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_eq!(refused.json()["error"]["code"], "UNAVAILABLE");
    // Every later decision is refused the same way, at once.
    let started = Instant::now();
    let a = t
        .authorize(&tap("disk-late", &card(0), "transit", 200))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("full"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // Reads go on: a replay of an answer given, the deny list, /readyz
    // saying why, the metric.
    let ((_, first), body) = answered.iter().next().unwrap();
    let a = t
        .authorize(&tap(first, &card_of(first), "transit", 200))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(&a.body.to_vec(), body, "a replay during the fault");
    let d = t
        .send(Method::GET, "/v1/denylist", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(d.status, StatusCode::OK);
    let (status, body) = readyz(addrs.admin).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("disk is full"));
    let m = client::admin(addrs.admin, None, Method::GET, "/metrics", None)
        .await
        .unwrap();
    let m = String::from_utf8_lossy(&m.body).into_owned();
    assert!(m.contains("onecard_journal_fault{fault=\"full\"} 1"), "{m}");
    assert!(m.contains("onecard_ready 0"));

    // Room again: the gateway exits for its supervisor (status 75)...
    std::fs::remove_file(&filler).unwrap();
    let status = wait_exit(&mut child.0, Duration::from_secs(30))
        .expect("the gateway did not exit once the disk had room");
    assert_eq!(status.code(), Some(75), "{status:?}");

    // ... which starts it again: every answer given stands, byte for
    // byte; the journal holds each decision once; settlement books each
    // approval once.
    let (_child, addrs) = start(dir.path(), 1, &extra);
    let mut approvals = assert_answers_stand(&addrs, &certs, &answered).await;
    assert_eq!(
        journal_last_seq(addrs.admin).await,
        Some(answered.len() as u64),
        "the journal holds exactly the decisions answered"
    );
    let mut t = connect_terminal(&certs, addrs.terminal, 1, Protocol::Http2).await;
    let a = t
        .authorize(&tap("disk-after", &card(1), "transit", 200))
        .await
        .unwrap();
    assert_eq!(
        a.status,
        StatusCode::OK,
        "decisions go on after the restart"
    );
    if a.json()["decision"] == "approve" {
        approvals += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = sink.ledger(receiver.addr).await;
        if l.events == approvals {
            assert_eq!(l.total_fen, 200 * approvals as i64);
            break;
        }
        assert!(l.events < approvals, "booked more than approved: {l:?}");
        assert!(
            Instant::now() < deadline,
            "settlement stuck at {l:?} of {approvals}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real binary on a fault file system mounted at `dir/data`; `None`
/// (the test skips, saying why) where FUSE is not available.
fn on_faultfs(dir: &Path, extra: &str) -> Option<(FaultFs, Proc, onecard::app::server::Addrs)> {
    let fs = FaultFs::mount(&dir.join("data"))?;
    let (child, addrs) = start(dir, 2, extra);
    Some((fs, child, addrs))
}

/// Answers a terminal was given: by (terminal number, event id), since
/// an event id is the terminal's own.
type Answered = BTreeMap<(u32, String), Vec<u8>>;

/// Sends `event` as terminal `n` on `t`, keeping a 200's body.
async fn tap_keep(
    t: &mut client::Connection,
    n: u32,
    answered: &mut Answered,
    event: &str,
    card_no: &str,
) -> client::Answer {
    let a = t
        .authorize(&tap(event, card_no, "transit", 200))
        .await
        .unwrap();
    if a.status == StatusCode::OK {
        answered.insert((n, event.to_owned()), a.body.to_vec());
    }
    a
}

/// After a restart: every answer a terminal was given comes back byte for
/// byte (so each decision is in the journal once: a second would have
/// been a second answer). Returns how many of them approved.
async fn assert_answers_stand(
    addrs: &onecard::app::server::Addrs,
    certs: &Path,
    answered: &Answered,
) -> u64 {
    let mut conns = BTreeMap::new();
    let mut approvals = 0;
    for ((n, event), body) in answered {
        if !conns.contains_key(n) {
            let c = connect_terminal(certs, addrs.terminal, *n, Protocol::Http2).await;
            conns.insert(*n, c);
        }
        let t = conns.get_mut(n).expect("connected above");
        let a = t
            .authorize(&tap(event, &card_of(event), "transit", 200))
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::OK, "{event}");
        assert_eq!(
            &a.body.to_vec(),
            body,
            "{event}: another answer after the restart"
        );
        if a.json()["decision"] == "approve" {
            approvals += 1;
        }
    }
    approvals
}

/// The journal's last sequence number, from `/admin/v1/status`.
async fn journal_last_seq(admin: std::net::SocketAddr) -> Option<u64> {
    client::admin(admin, Some(TOKEN), Method::GET, "/admin/v1/status", None)
        .await
        .unwrap()
        .json()["journal"]["last_seq"]
        .as_u64()
}

/// Registers the test's cards, active for transit.
async fn put_all_cards(admin: std::net::SocketAddr) {
    put_cards_at(
        admin,
        &(0..CARDS).map(card).collect::<Vec<_>>(),
        json!(["transit"]),
    )
    .await;
}

async fn readyz(admin: std::net::SocketAddr) -> (StatusCode, String) {
    let r = client::admin(admin, None, Method::GET, "/readyz", None)
        .await
        .unwrap();
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

fn card_of(event: &str) -> String {
    let i: usize = event.rsplit('-').next().unwrap().parse().unwrap();
    card(i % CARDS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_error_stops_decisions_and_the_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some((fs, mut child, addrs)) = on_faultfs(dir.path(), "") else {
        return;
    };
    let certs = dir.path().join("data/certs");
    put_all_cards(addrs.admin).await;
    let mut t = connect_terminal(&certs, addrs.terminal, 1, Protocol::Http1).await;
    let mut answered = Answered::new();
    for i in 0..10 {
        let a = tap_keep(&mut t, 1, &mut answered, &format!("eio-{i}"), &card(i)).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    fs.set_mode(Mode::Eio);
    let a = tap_keep(&mut t, 1, &mut answered, "eio-10", &card(10)).await;
    assert_eq!(
        a.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(a.headers.contains_key("retry-after"));
    let a = tap_keep(&mut t, 1, &mut answered, "eio-11", &card(11)).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        String::from_utf8_lossy(&a.body).contains("I/O error"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let (status, body) = readyz(addrs.admin).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("I/O error"), "{body}");
    // A replay is a read: still answered.
    let ((_, first), body) = answered
        .iter()
        .next()
        .map(|(e, b)| (e.clone(), b.clone()))
        .unwrap();
    let a = t
        .authorize(&tap(&first, &card_of(&first), "transit", 200))
        .await
        .unwrap();
    assert_eq!(a.body.to_vec(), body);

    fs.set_mode(Mode::Normal);
    let status = wait_exit(&mut child.0, Duration::from_secs(30))
        .expect("no exit once the disk wrote again");
    assert_eq!(status.code(), Some(75));
    let (child, addrs) = start(dir.path(), 2, "");
    assert_answers_stand(&addrs, &certs, &answered).await;
    assert_eq!(
        journal_last_seq(addrs.admin).await,
        Some(answered.len() as u64)
    );
    drop(child);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_answers_503_and_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Some((fs, mut child, addrs)) = on_faultfs(dir.path(), "[journal]\nstall_ms = 300\n") else {
        return;
    };
    let certs = dir.path().join("data/certs");
    put_all_cards(addrs.admin).await;
    let mut t = connect_terminal(&certs, addrs.terminal, 1, Protocol::Http1).await;
    let mut t2 = connect_terminal(&certs, addrs.terminal, 2, Protocol::Http1).await;
    let mut answered = Answered::new();
    for i in 0..5 {
        let a = tap_keep(&mut t, 1, &mut answered, &format!("slow-{i}"), &card(i)).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    fs.set_mode(Mode::SlowSync(Duration::from_millis(2_500)));
    // The decision waiting on the stalled sync is not answered as one...
    let started = Instant::now();
    let a = tap_keep(&mut t, 1, &mut answered, "slow-5", &card(5)).await;
    assert_eq!(
        a.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(
        started.elapsed() < Duration::from_millis(2_000),
        "waited {:?}",
        started.elapsed()
    );
    assert!(String::from_utf8_lossy(&a.body).contains("stalled"));
    // ... and no new one is taken while the disk is stalled.
    let a = tap_keep(&mut t2, 2, &mut answered, "slow-6", &card(6)).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(a.headers.contains_key("retry-after"));
    let (status, body) = readyz(addrs.admin).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("stalled"), "{body}");

    // The disk comes back: decisions resume by themselves, no restart.
    fs.set_mode(Mode::Normal);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 7;
    loop {
        let a = tap_keep(&mut t2, 2, &mut answered, &format!("slow-{n}"), &card(n)).await;
        n += 1;
        if a.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "decisions did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(readyz(addrs.admin).await.0, StatusCode::OK);
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "a stall needs no restart"
    );
    // The decision that was waiting was recorded after all: its retry
    // gets it.
    let a = tap_keep(&mut t, 1, &mut answered, "slow-5", &card(5)).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );

    drop(child);
    let (child, addrs) = start(dir.path(), 2, "[journal]\nstall_ms = 300\n");
    assert_answers_stand(&addrs, &certs, &answered).await;
    drop(child);
    drop(fs);
}

/// One power cut under load at a moment chosen by `seed`, then a restart
/// on what the disk kept: the answers terminals received that did not
/// come back the same (`None`: no FUSE here). Whatever is lost, each
/// card's counter is the sum of its approvals in the journal, and no
/// event is in the journal twice.
async fn power_cut(seed: u64, extra: &str) -> Option<Vec<String>> {
    {
        let dir = tempfile::tempdir().unwrap();
        let (fs, child, addrs) = on_faultfs(dir.path(), extra)?;
        let certs = dir.path().join("data/certs");
        const POWER_CARDS: usize = 6;
        let cards: Vec<String> = (0..POWER_CARDS).map(card).collect();
        put_cards_at(addrs.admin, &cards, json!(["transit"])).await;
        let cut_after = 15 + (seed * 37 % 60) as usize;
        let received = std::sync::Arc::new(tokio::sync::Mutex::new(BTreeMap::<
            String,
            (String, Vec<u8>),
        >::new()));
        let mut tasks = Vec::new();
        for n in 1..=2u32 {
            let mut t = connect_terminal(&certs, addrs.terminal, n, Protocol::Http1).await;
            let received = received.clone();
            let cards = cards.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0usize.. {
                    let event = format!("pc{seed}-{n}-{i}");
                    let card_no = &cards[(i * 7 + n as usize) % cards.len()];
                    let body = tap(&event, card_no, "transit", 100 + (i % 5) as i64 * 10);
                    let Ok(a) = t.authorize(&body).await else {
                        break;
                    };
                    if a.status == StatusCode::OK {
                        received
                            .lock()
                            .await
                            .insert(event, (card_no.clone(), a.body.to_vec()));
                    }
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while received.lock().await.len() < cut_after {
            assert!(Instant::now() < deadline, "seed {seed}: too few answers");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The power goes: the process dies and the page cache with it.
        drop(child);
        fs.cut_power();
        for t in tasks {
            t.await.unwrap();
        }
        let received = std::mem::take(&mut *received.lock().await);

        let (child, addrs) = start(dir.path(), 2, extra);
        let mut conns = Vec::new();
        for n in 1..=2 {
            conns.push(connect_terminal(&certs, addrs.terminal, n, Protocol::Http2).await);
        }
        let mut lost = Vec::new();
        for (event, (card_no, body)) in &received {
            // pc<seed>-<terminal>-<i>
            let mut parts = event.rsplit('-');
            let i: usize = parts.next().unwrap().parse().unwrap();
            let n: usize = parts.next().unwrap().parse().unwrap();
            let a = conns[n - 1]
                .authorize(&tap(event, card_no, "transit", 100 + (i % 5) as i64 * 10))
                .await
                .unwrap();
            assert_eq!(a.status, StatusCode::OK, "seed {seed} {event}");
            if &a.body.to_vec() != body {
                lost.push(event.clone());
            }
        }
        for card_no in &cards {
            let tx = client::admin(
                addrs.admin,
                Some(TOKEN),
                Method::GET,
                &format!("/admin/v1/cards/{card_no}/transactions?limit=500"),
                None,
            )
            .await
            .unwrap();
            // A cut that lost answers (async mode) may have lost the card's
            // registration too; then nothing of it is left to compare.
            if tx.status == StatusCode::NOT_FOUND && !lost.is_empty() {
                continue;
            }
            assert_eq!(
                tx.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&tx.body)
            );
            let tx = tx.json();
            let mut seen = std::collections::BTreeSet::new();
            let mut charged = 0;
            for r in tx["transactions"].as_array().unwrap() {
                let event = r["event_id"].as_str().unwrap().to_owned();
                assert!(
                    seen.insert(event.clone()),
                    "seed {seed}: {event} twice in the journal"
                );
                if r["decision"] == "approve" {
                    charged += r["charged_fen"].as_i64().unwrap();
                }
            }
            for (event, (c, _)) in &received {
                if c == card_no && !lost.contains(event) {
                    assert!(
                        seen.contains(event),
                        "seed {seed}: {event} answered but not in the journal"
                    );
                }
            }
            let record = client::admin(
                addrs.admin,
                Some(TOKEN),
                Method::GET,
                &format!("/admin/v1/cards/{card_no}"),
                None,
            )
            .await
            .unwrap()
            .json();
            assert_eq!(
                record["spent_fen"].as_i64().unwrap(),
                charged,
                "seed {seed} card {card_no}: the counter and the journal disagree"
            );
        }
        drop(child);
        drop(fs);
        Some(lost)
    }
}

/// Power cuts under load, each at another moment (the seed): after the
/// restart on what the disk kept, every answer a terminal received stands,
/// and each card's counter is the sum of its approvals in the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_under_load_loses_no_answer_and_the_counters_agree() {
    for seed in 0..5u64 {
        let Some(lost) = power_cut(seed, "").await else {
            return;
        };
        assert!(
            lost.is_empty(),
            "seed {seed}: answers lost in the power cut: {lost:?}"
        );
    }
}

/// The same cut with `journal.durability = "async"` (answers before the
/// sync) loses answers: the test above would see a gateway that did so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_answers_given_before_the_sync_in_async_mode() {
    let Some(lost) = power_cut(3, "[journal]\ndurability = \"async\"\n").await else {
        return;
    };
    assert!(
        !lost.is_empty(),
        "async mode lost nothing in a power cut: the cut simulates nothing"
    );
}

/// The file system itself: what was not synced is gone after a cut; what
/// was, stays.
#[test]
fn the_fault_file_system_loses_what_was_not_synced() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = FaultFs::mount(&dir.path().join("mnt")) else {
        return;
    };
    let synced = fs.path.join("synced");
    let mut f = std::fs::File::create(&synced).unwrap();
    f.write_all(b"kept").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" and lost").unwrap();
    drop(f);
    std::fs::write(fs.path.join("never-synced"), b"lost").unwrap();
    fs.cut_power();
    assert_eq!(std::fs::read(&synced).unwrap(), b"kept");
    // The name stays (metadata is kept at once, as in LazyFS); the data goes.
    assert_eq!(std::fs::read(fs.path.join("never-synced")).unwrap(), b"");
    fs.set_mode(Mode::Eio);
    assert!(std::fs::write(fs.path.join("eio"), b"x").is_err());
}
