//! Criterion benches for every step of the hot path: decode, decide,
//! deny-list lookup (1 M entries), idempotency fingerprint and key, the
//! idempotency check on a real RocksDB (a new event and a replay), and a
//! journal group commit on a real RocksDB in both durability modes; the QR
//! verification of a scan (whole token: parse, decode, signature, claims)
//! for both algorithms, and the single-use check of its `jti`; the SRE's
//! latency windows (one record per route and scenario).
//!
//! `cargo bench --bench hot_path` (figures in README.md, "Performance").

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use onecard::config::Durability;
use onecard::service::idempotency;
use onecard::store::denylist::DenyEntry;
use onecard::store::denylist::DenyList;
use onecard::store::durable::{Commit, Durable, Op};
use onecard::store::journal::Journal;
use onecard::store::{idem, Cf, Store};

use onecard_core::authz::{decide, DenySet, Event, Facts, Policy};
use onecard_core::model::{Card, CardNo, CardStatus, Concession, Function, Scenario};
use onecard_core::wire::parse_authorize;

const BODY: &[u8] = br#"{"event_id":"bus-0042-000000123","kind":"tap","card_no":"500118A12345678","scenario":"transit","amount_fen":200,"site":"line-12","occurred_at":"2026-11-28T07:45:12Z"}"#;
const DENY_ENTRIES: u64 = 1_000_000;

fn deny_list(n: u64) -> DenyList {
    let list = DenyList::new();
    for i in 0..n {
        let card = CardNo::parse(&format!("500118{i:010}")).unwrap();
        list.insert_unversioned(
            card,
            DenyEntry {
                reason: "lost".into(),
                version: 1,
                added_at_ms: 0,
            },
        );
    }
    list
}

fn bench_decode(c: &mut Criterion) {
    c.bench_function("decode/authorize_body", |b| {
        b.iter(|| parse_authorize(black_box(BODY)).unwrap())
    });
    let req = parse_authorize(BODY).unwrap();
    c.bench_function("idempotency/fingerprint_and_key", |b| {
        b.iter(|| {
            let fp = black_box(&req).fingerprint();
            let k = idem::key(black_box("term-00001"), &req.event_id);
            (fp, k)
        })
    });
}

/// One decision per scenario under the pilot's rules (`config/dev.toml`:
/// route tariffs, concessions, transfers, caps, anti-passback, quotas,
/// allow-lists, purposes, a partner region), each against the 1 M-entry
/// deny list: no scenario may make a decision slower than a microsecond.
fn bench_scenarios(c: &mut Criterion, deny: &impl onecard_core::authz::DenySet) {
    use onecard_core::scenario::access::Allow;
    use onecard_core::scenario::access::Windows;
    use onecard_core::scenario::place_hash;
    let config = onecard::config::Config::load(std::path::Path::new("config/dev.toml")).unwrap();
    let policy = config.policy().unwrap();
    let now = 1_795_851_912;
    let home = CardNo::parse("500118A12345678").unwrap();
    let partner = CardNo::parse("510104A12345678").unwrap();
    let mut card = Card::new(
        CardStatus::Active,
        &[Function::Transit, Function::Financial, Function::Medical],
        &[Concession::Student],
    );
    // A card mid-journey: the transfer and cap rules have work to do.
    card.transit.place = place_hash("line-13");
    card.transit.tap_s = now - 600;
    card.transit.journey_s = now - 600;
    card.transit.legs = 1;
    card.transit.day = policy.local_day(now);
    card.transit.day_fen = 300;
    let purpose = policy.identity.purpose_of("term-00010").clone();
    let at = |site: &'static str| Facts {
        site: Some(site),
        place: place_hash(site),
        ..Facts::default()
    };
    let windows = Windows::parse(&["06:00-23:00"]).unwrap();
    let cases: Vec<(&str, &CardNo, Scenario, i64, Facts<'_>)> = vec![
        (
            "transit_route_transfer",
            &home,
            Scenario::Transit,
            0,
            at("line-12"),
        ),
        (
            "transit_stops",
            &home,
            Scenario::Transit,
            0,
            Facts {
                units: Some(9),
                ..at("metro-1")
            },
        ),
        (
            "culture_quota_venue",
            &home,
            Scenario::Culture,
            0,
            Facts {
                venue_entries: 1200,
                ..at("museum-1")
            },
        ),
        (
            "access_allow_list",
            &home,
            Scenario::Access,
            0,
            Facts {
                allow: Allow::Listed(windows),
                ..at("community-7")
            },
        ),
        ("payment", &home, Scenario::Payment, 4_500, Facts::default()),
        (
            "medical",
            &home,
            Scenario::Medical,
            12_000,
            Facts::default(),
        ),
        (
            "identity_purpose",
            &home,
            Scenario::Identity,
            0,
            Facts {
                purpose: Some(&purpose),
                ..Facts::default()
            },
        ),
        ("health", &home, Scenario::Health, 0, Facts::default()),
        (
            "partner_transit",
            &partner,
            Scenario::Transit,
            0,
            at("line-12"),
        ),
    ];
    for (name, card_no, scenario, amount_fen, facts) in cases {
        let event = Event {
            card_no,
            scenario,
            amount_fen,
        };
        let known = (card_no == &home).then_some(&card);
        let out = decide(event, known, deny, &policy, &facts, now);
        assert!(out.decision.is_approve(), "{name}: {:?}", out.decision);
        c.bench_function(&format!("decide/scenario/{name}"), |b| {
            b.iter(|| {
                decide(
                    black_box(event),
                    black_box(known),
                    deny,
                    &policy,
                    black_box(&facts),
                    black_box(now),
                )
            })
        });
    }
}

fn bench_decide(c: &mut Criterion) {
    let deny = deny_list(DENY_ENTRIES);
    let policy = Policy::with_defaults(100_000, 480);
    let card_no = CardNo::parse("500118A12345678").unwrap();
    let card = Card::new(
        CardStatus::Active,
        &[Function::Transit, Function::Financial],
        &[Concession::Student],
    );
    let event = Event {
        card_no: &card_no,
        scenario: Scenario::Transit,
        amount_fen: 200,
    };
    c.bench_function("decide/approve_with_1M_denylist", |b| {
        b.iter(|| {
            decide(
                black_box(event),
                black_box(Some(&card)),
                &deny,
                &policy,
                &Facts::default(),
                black_box(1_795_851_912),
            )
        })
    });
    bench_scenarios(c, &deny);
    let hit = CardNo::parse("5001180000424242").unwrap();
    let miss = CardNo::parse("500118A99999999").unwrap();
    c.bench_function("denylist/lookup_hit_1M", |b| {
        b.iter(|| deny.contains(black_box(&hit)))
    });
    c.bench_function("denylist/lookup_miss_1M", |b| {
        b.iter(|| deny.contains(black_box(&miss)))
    });
}

/// The idempotency check as `authorize` runs it: an in-flight entry and a
/// RocksDB read, over a store that already holds 100,000 answers.
fn bench_idempotency_check(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &Default::default()).unwrap();
    let fingerprint = [7u8; 32];
    let answer = idem::encode(
        &fingerprint,
        0,
        "0000000100000000001",
        idem::Tail::Origin(idem::Origin {
            approved: true,
            charged_fen: 200,
            scenario: onecard_core::model::Scenario::Transit,
            card_no: "500118A00000001",
            site: Some("line-12"),
        }),
        b"{\"decision\":\"approve\"}",
    );
    for i in 0..100_000u64 {
        let key = idem::key("term-00001", &format!("old-{i}"));
        store.db().put_cf(store.cf(Cf::Idem), key, &answer).unwrap();
    }
    let idem = idempotency::Idempotency::new(store, 72 * 3600);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut n = 0u64;
    c.bench_function("idempotency/check_new_event", |b| {
        b.iter(|| {
            n += 1;
            let key = idem::key("term-00001", &format!("new-{n}"));
            let lookup = rt.block_on(idem.begin(&key, &fingerprint, 1)).unwrap();
            assert!(matches!(lookup, idempotency::Lookup::Fresh(_)));
            black_box(lookup)
        })
    });
    c.bench_function("idempotency/check_replay", |b| {
        b.iter(|| {
            n += 1;
            let key = idem::key("term-00001", &format!("old-{}", n % 100_000));
            let lookup = rt.block_on(idem.begin(&key, &fingerprint, 1)).unwrap();
            assert!(matches!(lookup, idempotency::Lookup::Replay(_)));
            black_box(lookup)
        })
    });
}

fn bench_journal(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal/group_commit");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(20);
    for (durability, name) in [(Durability::Async, "async"), (Durability::Sync, "sync")] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Default::default()).unwrap();
        let journal = Journal::start(store, durability, 2_048, 16_384).unwrap();
        let record = vec![b'x'; 300];
        let answer = vec![b'y'; 120];
        for batch in [1usize, 64, 512] {
            group.throughput(Throughput::Elements(batch as u64));
            let mut n = 0u64;
            group.bench_with_input(BenchmarkId::new(name, batch), &batch, |b, &batch| {
                b.iter(|| {
                    let pending: Vec<_> = (0..batch)
                        .map(|_| {
                            n += 1;
                            let ops =
                                vec![Op::Put(Cf::Idem, n.to_be_bytes().to_vec(), answer.clone())];
                            journal
                                .submit(Commit::new(Some(record.clone()), ops))
                                .unwrap()
                        })
                        .collect();
                    for p in pending {
                        p.durable_blocking().unwrap();
                    }
                })
            });
        }
        journal.close();
    }
    group.finish();
}

fn bench_qr(c: &mut Criterion) {
    use onecard::service::replay::ReplayCache;
    use onecard_core::qr;
    use onecard_core::qr::Alg;
    use onecard_core::qr::CredType;
    use onecard_core::qr::IssuerKey;
    use onecard_core::qr::Keyring;
    use onecard_core::qr::Rules;
    use onecard_core::qr::SigningKey;
    let now = 1_795_851_912;
    for (alg, name) in [(Alg::Ed25519, "ed25519"), (Alg::Sm2, "sm2")] {
        let key = SigningKey::generate(alg, &mut rand_core::OsRng);
        let public = IssuerKey::from_public_pem("k1", alg, &key.public_pem(), 0, None).unwrap();
        let keys = Keyring::new(vec![public]).unwrap();
        let issue =
            |jti: &str| qr::issue(&key, "k1", "essc-0001", CredType::Essc, now, 60, jti).unwrap();
        let token = issue("jti-00000001");
        c.bench_function(&format!("qr/verify_{name}"), |b| {
            b.iter(|| qr::verify(black_box(&token), &keys, Rules::default(), now).unwrap())
        });
        if alg != Alg::Ed25519 {
            continue;
        }
        // Signatures only, as the gateway's batching point checks them: 1 is
        // strict verification alone, more is one batch (issue 21, item 3).
        let checks: Vec<qr::Ed25519Check> = (0..16)
            .map(|i| {
                let t = issue(&format!("jti-{i:08}"));
                qr::open(&t, &keys, now).unwrap().ed25519_check().unwrap()
            })
            .collect();
        let mut group = c.benchmark_group("qr/ed25519_signatures");
        for n in [1usize, 2, 4, 8, 16] {
            let batch: Vec<&qr::Ed25519Check> = checks[..n].iter().collect();
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::from_parameter(n), &batch, |b, batch| {
                b.iter(|| {
                    assert!(qr::verify_ed25519_batch(black_box(batch))
                        .iter()
                        .all(|ok| *ok))
                })
            });
        }
        group.finish();
    }
    let cache = ReplayCache::new(2_000_000);
    let mut i = 0u64;
    c.bench_function("qr/replay_check_new", |b| {
        b.iter(|| {
            i += 1;
            let jti = format!("jti-{i:012}");
            // Forgotten a minute later, as a live code would be.
            cache.check_and_remember(
                "essc-0001",
                &jti,
                (now + (i as i64) / 10_000) + 60,
                now + (i as i64) / 10_000,
            )
        })
    });
}

/// What the SRE's latency windows cost each request: one record into a
/// route's, a scenario's and an outcome's one-second slot (issue 18: the goal is under
/// 2 % of an authorization).
fn bench_stats(c: &mut Criterion) {
    use onecard::service::stats::{Kind, Stats};
    let stats = Stats::new();
    let mut us = 0u64;
    c.bench_function("stats/record_route_scenario_outcome", |b| {
        b.iter(|| {
            us = (us + 37) % 20_000;
            let took = Duration::from_micros(200 + us);
            stats.record(Kind::Route, "/v1/authorize", black_box(took));
            stats.record(Kind::Scenario, "transit", black_box(took));
            stats.record(Kind::Outcome, "approve", Duration::ZERO);
        })
    });
}

/// What explaining a request's latency costs it: a phase clock, the five
/// phase marks on the task-local clock and the `Server-Timing` value.
fn bench_timing(c: &mut Criterion) {
    use onecard::service::timing::{mark, timed, Phase, PhaseClock};
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    c.bench_function("timing/five_phases_and_header", |b| {
        b.iter(|| {
            let clock = PhaseClock::new(std::time::Instant::now());
            rt.block_on(timed(clock.clone(), async {
                for p in [
                    Phase::Decode,
                    Phase::Idempotency,
                    Phase::Credential,
                    Phase::Decide,
                    Phase::Commit,
                ] {
                    mark(p);
                }
            }));
            black_box(clock.header())
        })
    });
    // The runtime's block_on above is the bench's, not the request's: the
    // header alone, on a clock whose phases are marked.
    let clock = PhaseClock::new(std::time::Instant::now());
    rt.block_on(timed(clock.clone(), async {
        mark(Phase::Decode);
        mark(Phase::Commit);
    }));
    c.bench_function("timing/header", |b| b.iter(|| black_box(clock.header())));
    c.bench_function("timing/block_on_empty", |b| {
        b.iter(|| rt.block_on(async { black_box(1) }))
    });
}

criterion_group!(
    benches,
    bench_stats,
    bench_timing,
    bench_qr,
    bench_decode,
    bench_decide,
    bench_idempotency_check,
    bench_journal
);
criterion_main!(benches);
