//! Telemetry: the Prometheus recorder behind the `metrics` facade, and the
//! `tracing` subscriber for binaries.
//!
//! Metric names are listed in `ARCHITECTURE.md`. Labels take only values
//! from closed sets (routes, scenarios, reasons, status codes): never a card
//! number, terminal id or event id, which would leak personal data and grow
//! without bound.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat, LOG_LEVEL_DEFAULT};

/// Latency buckets in seconds: 25 µs to 2.5 s, dense where the hot path lives.
pub const LATENCY_BUCKETS_S: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Settlement delivery (approval to acknowledgement), in seconds: batches
/// wait up to `age_max_ms` to seal, so the range is wider and dense around
/// the 2 s goal.
pub const SETTLE_BUCKETS_S: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
    3600.0,
];
/// Group-commit sizes.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder on first use and returns its handle.
/// Several gateways in one process (tests) share it.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_S)
                // A full name wins over a suffix (the exporter orders
                // matchers Full < Prefix < Suffix).
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("onecard_settle_delivery_seconds".into()),
                        SETTLE_BUCKETS_S,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_events".into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which
            // case metrics go there and this handle renders nothing.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_cluster();
    describe_counter!(
        "onecard_holds_expired_total",
        "Medical holds released because they were neither captured nor voided in time"
    );
    describe_counter!(
        "onecard_http_requests_total",
        "HTTP requests by listener, route and status code"
    );
    describe_counter!(
        "onecard_decisions_total",
        "Authorization decisions by scenario, decision and reason"
    );
    describe_counter!(
        "onecard_disbursement_records_total",
        "Disbursement records recorded, by outcome (accepted, rejected)"
    );
    describe_histogram!(
        "onecard_authorize_latency_seconds",
        Unit::Seconds,
        "Time from request received to answer ready, per scenario (includes the journal commit)"
    );
    describe_histogram!(
        "onecard_decide_latency_seconds",
        Unit::Seconds,
        "Time spent in the pure decision function"
    );
    describe_histogram!(
        "onecard_journal_commit_seconds",
        Unit::Seconds,
        "Time to write one group-commit batch (fdatasync included in sync mode)"
    );
    describe_histogram!(
        "onecard_journal_batch_events",
        Unit::Count,
        "Commits packed into one group-commit batch"
    );
    describe_counter!(
        "onecard_journal_records_total",
        "Decision records written to the journal"
    );
    describe_counter!(
        "onecard_journal_failures_total",
        "Journal write failures (the gateway refuses writes after one)"
    );
    describe_gauge!(
        "onecard_journal_last_seq",
        "Sequence number of the last journaled decision"
    );
    describe_gauge!("onecard_requests_in_flight", "Requests being served");
    describe_gauge!("onecard_connections_open", "Open connections by listener");
    describe_counter!(
        "onecard_admission_rejected_total",
        "Requests or connections refused by a limit"
    );
    describe_counter!(
        "onecard_idempotent_replays_total",
        "Answers replayed for a repeated (terminal, event_id)"
    );
    describe_counter!(
        "onecard_idempotency_expired_total",
        "Idempotency records removed after their retention"
    );
    describe_counter!(
        "onecard_tls_handshake_failures_total",
        "TLS handshakes that failed (no or bad client certificate, timeouts)"
    );
    describe_gauge!("onecard_denylist_version", "Current deny-list version");
    describe_gauge!("onecard_denylist_entries", "Cards on the deny list");
    describe_gauge!("onecard_cards", "Cards known to the gateway");
    describe_counter!(
        "onecard_settle_batches_total",
        "Settlement batches by sink and outcome (sealed, acked, failed, parked)"
    );
    describe_counter!(
        "onecard_settle_events_total",
        "Events acknowledged by each sink"
    );
    describe_histogram!(
        "onecard_settle_delivery_seconds",
        Unit::Seconds,
        "From the approval of a batch's oldest event to the sink's acknowledgement"
    );
    describe_gauge!(
        "onecard_settle_backlog_batches",
        "Sealed batches awaiting acknowledgement, by sink"
    );
    describe_gauge!(
        "onecard_settle_backlog_events",
        "Events in batches awaiting acknowledgement, by sink"
    );
    describe_gauge!(
        "onecard_settle_backlog_oldest_seconds",
        Unit::Seconds,
        "Age of the oldest event awaiting acknowledgement, by sink"
    );
    describe_gauge!(
        "onecard_settle_circuit",
        "Circuit to each sink: 0 closed, 1 half open (probing), 2 open"
    );
    describe_gauge!(
        "onecard_settle_unread_records",
        "Journal records a sink has not read yet (its events wait in the journal to be sealed)"
    );
    describe_counter!(
        "onecard_reversals_total",
        "Reversals by status (reversed, not_charged, unknown_event)"
    );
    describe_counter!(
        "onecard_qr_rejects_total",
        "Scanned codes refused, by why (malformed, unknown_kid, key_not_valid, bad_signature, lifetime_too_long, not_yet_valid, expired, type_mismatch)"
    );
    describe_counter!(
        "onecard_qr_replay_cache_full_total",
        "Scans refused because the replay cache held only live codes (raise qr.replay_cache_max)"
    );
    describe_counter!(
        "onecard_qr_ed25519_rounds_total",
        "Rounds of Ed25519 signature checks of scans (qr.batch_ed25519): one batch each, or one signature when it arrived alone"
    );
    describe_counter!(
        "onecard_qr_ed25519_signatures_total",
        "Ed25519 signatures checked in those rounds; over onecard_qr_ed25519_rounds_total, the mean batch size"
    );
    describe_counter!(
        "onecard_qr_ed25519_failed_batches_total",
        "Batches with a bad signature in them (each then checked one by one, and the next 64 rounds too): a steady rise means forged or corrupted codes are being scanned"
    );
    describe_counter!(
        "onecard_card_life_total",
        "Card-life changes by op (report_loss, lift_loss, freeze, unfreeze, cancel, replace)"
    );
    describe_counter!(
        "onecard_applications_total",
        "Card applications filed and their steps, by channel and step (submit, approve, produce, ready_for_pickup, issue, instant_issue, reject, withdraw)"
    );
    describe_gauge!(
        "onecard_applications_overdue",
        "Card applications waiting in one state longer than their channel's service promise, as last listed"
    );
    describe_counter!(
        "onecard_application_status_misses_total",
        "Residents' application status queries with the wrong last four ID digits"
    );
    describe_counter!(
        "onecard_complaints_total",
        "Complaints filed, by category (wrong_charge, card_refused, lost_card, service)"
    );
    describe_counter!(
        "onecard_complaints_closed_total",
        "Complaints closed, by outcome (refund, explanation, referral)"
    );
    describe_gauge!(
        "onecard_complaints_open",
        "Open complaints per responsible unit ([catalogue])"
    );
    describe_gauge!(
        "onecard_complaints_oldest_open_time_seconds",
        "When the oldest open complaint of a unit was filed (Unix seconds; 0: none open)"
    );
    describe_counter!(
        "onecard_offline_events_total",
        "Offline validator events uploaded, by result (accepted, duplicate, rejected)"
    );
    describe_counter!(
        "onecard_offline_risk_taps_total",
        "Offline approvals of cards deny-listed before the tap"
    );
    describe_gauge!(
        "onecard_settle_failed",
        "1 when a sink's settlement stopped on a storage failure (see the log)"
    );
    describe_gauge!(
        "onecard_process_resident_bytes",
        Unit::Bytes,
        "Resident memory of the gateway process (read at each scrape)"
    );
    describe_gauge!(
        "onecard_process_native_heap_bytes",
        Unit::Bytes,
        "The C library's heap, which RocksDB's C++ allocates from, by state: in_use (allocated), free (kept for reuse, not returned); read at each scrape"
    );
    describe_gauge!(
        "onecard_admission_queue_standing",
        "1 while the queue for in-flight slots stands (no request of the last 100 ms got its slot within 5 ms): requests past the cap are then refused after 5 ms"
    );
    describe_gauge!(
        "onecard_runtime_lag_seconds",
        Unit::Seconds,
        "How late a ready task runs, smoothed over 50 ms: past limits.overload_lag_ms terminals' requests are shed with 503"
    );
    describe_gauge!(
        "onecard_admission_shed_share",
        "The share of terminals' requests refused with 503 because the runtime lags: none up to limits.overload_lag_ms, all at five times it (0 to 1)"
    );
    describe_counter!(
        "onecard_store_disk_reads_total",
        "Point reads of a request that the memtables and the block cache could not answer, per column family: read on the blocking pool"
    );
    describe_gauge!(
        "onecard_store_memory_bytes",
        Unit::Bytes,
        "RocksDB's memory by kind: memtables, table_readers (open files' indexes kept outside the cache), block_cache (read at each scrape)"
    );
    describe_gauge!(
        "onecard_process_open_fds",
        "File descriptors the gateway process holds: connections, RocksDB's files (read at each scrape)"
    );
    describe_histogram!(
        "onecard_http_request_duration_seconds",
        Unit::Seconds,
        "Time from request received to answer ready, per terminal route"
    );
    describe_gauge!("onecard_ready", "1 while /readyz answers ready, else 0");
    describe_gauge!(
        "onecard_start_time_seconds",
        Unit::Seconds,
        "Unix time at which this gateway started"
    );
    describe_gauge!(
        "onecard_journal_pending_commits",
        "Commits waiting for the journal writer"
    );
    describe_gauge!(
        "onecard_journal_oldest_pending_seconds",
        Unit::Seconds,
        "How long the oldest commit not yet durable has waited, queued and being written (0 when idle): a stalled disk makes it grow"
    );
    describe_gauge!(
        "onecard_settle_parked_batches",
        "Batches parked for an operator (refused for good by the sink), by sink"
    );
    describe_gauge!(
        "onecard_denylist_updated_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last deny-list change (this start's time if it never changed)"
    );
    describe_gauge!(
        "onecard_tls_cert_expiry_timestamp_seconds",
        Unit::Seconds,
        "Unix time at which the gateway's server certificate or its terminal CA expires, by cert"
    );
    describe_gauge!(
        "onecard_tls_terminal_certs_expiring",
        "Terminals seen in the last 24 h whose certificate expires within 30 days"
    );
    describe_gauge!(
        "onecard_tls_terminal_cert_soonest_expiry_timestamp_seconds",
        Unit::Seconds,
        "Soonest expiry (Unix time) among terminal certificates seen in the last 24 h"
    );
    describe_gauge!(
        "onecard_terminals_connected",
        "Terminals with at least one connection open"
    );
    describe_gauge!(
        "onecard_journal_fault",
        "1 for why the journal cannot record decisions now (full, io, failed: until a restart; stalled: until the disk writes again), else 0"
    );
    describe_gauge!(
        "onecard_tls_crl_next_update_timestamp_seconds",
        Unit::Seconds,
        "Unix time at which each terminal CRL is due to be replaced, by crl (its path)"
    );
    describe_gauge!(
        "onecard_tls_crl_revoked_certificates",
        "Certificates each terminal CRL revokes, by crl (its path)"
    );
    describe_gauge!(
        "onecard_tls_loaded_timestamp_seconds",
        Unit::Seconds,
        "Unix time at which the terminal listener's certificate, CA and CRLs were last loaded"
    );
    describe_counter!(
        "onecard_tls_reloads_total",
        "Reloads of the terminal listener's TLS files (SIGHUP, POST /admin/v1/tls/reload), by result (ok, failed)"
    );
    describe_gauge!(
        "onecard_tls_terminal_blocks",
        "Terminal certificates on the security team's block list"
    );
    describe_counter!(
        "onecard_tls_terminal_connections_closed_total",
        "Open terminal connections closed because their certificate was blocked"
    );
    describe_counter!(
        "onecard_tls_terminals_refused_total",
        "Terminal certificates refused at the handshake although their chain is valid, by reason (revoked, revocation_unknown, blocked)"
    );
    describe_gauge!(
        "onecard_startup_seconds",
        Unit::Seconds,
        "Time from start to ready at the last start: opening RocksDB and rebuilding memory"
    );
}

/// Counters start at zero, every series of a closed label set: Prometheus's
/// `increase()` cannot see the first event of a series that appears with
/// it, so an alert on the first journal failure or the first refusal would
/// never fire.
pub fn register_zero(config: &crate::config::Config) {
    use metrics::counter;
    for name in [
        "onecard_journal_failures_total",
        "onecard_journal_records_total",
        "onecard_idempotent_replays_total",
        "onecard_idempotency_expired_total",
        "onecard_tls_handshake_failures_total",
        "onecard_qr_replay_cache_full_total",
        "onecard_offline_risk_taps_total",
        "onecard_holds_expired_total",
    ] {
        counter!(name).absolute(0);
    }
    for limit in [
        "connections",
        "in_flight",
        "terminals_tracked",
        "terminal_rate",
    ] {
        counter!("onecard_admission_rejected_total", "limit" => limit).absolute(0);
    }
    for op in [
        "report_loss",
        "lift_loss",
        "freeze",
        "unfreeze",
        "cancel",
        "replace",
    ] {
        counter!("onecard_card_life_total", "op" => op).absolute(0);
    }
    for result in ["accepted", "duplicate", "rejected"] {
        counter!("onecard_offline_events_total", "result" => result).absolute(0);
    }
    for outcome in ["accepted", "rejected"] {
        counter!("onecard_disbursement_records_total", "outcome" => outcome).absolute(0);
    }
    for result in ["ok", "failed"] {
        counter!("onecard_tls_reloads_total", "result" => result).absolute(0);
    }
    for reason in ["revoked", "revocation_unknown", "blocked"] {
        counter!("onecard_tls_terminals_refused_total", "reason" => reason).absolute(0);
    }
    counter!("onecard_tls_terminal_connections_closed_total").absolute(0);
    for status in ["reversed", "not_charged", "unknown_event"] {
        counter!("onecard_reversals_total", "status" => status).absolute(0);
    }
    for sink in &config.settlement.sinks {
        for outcome in ["sealed", "acked", "failed", "parked"] {
            counter!("onecard_settle_batches_total", "sink" => sink.name.clone(), "outcome" => outcome).absolute(0);
        }
        counter!("onecard_settle_events_total", "sink" => sink.name.clone()).absolute(0);
        // A gauge alerted on: 0 until a storage failure stops the sink.
        metrics::gauge!("onecard_settle_failed", "sink" => sink.name.clone()).set(0.0);
    }
    for why in [
        "malformed",
        "unknown_kid",
        "key_not_valid",
        "bad_signature",
        "lifetime_too_long",
        "not_yet_valid",
        "expired",
        "replayed",
        "type_mismatch",
    ] {
        counter!("onecard_qr_rejects_total", "why" => why).absolute(0);
    }
    if config.cluster.is_some() {
        for name in [
            "onecard_cluster_conflicts_total",
            "onecard_cluster_retries_total",
            "onecard_cluster_duplicates_total",
            "onecard_cluster_publish_failures_total",
            "onecard_cluster_consumer_restarts_total",
        ] {
            counter!(name).absolute(0);
        }
    }
}

/// Logs to stderr as text, with the default level; `RUST_LOG` overrides it.
pub fn init_tracing() {
    init_tracing_with(&LogConfig::default());
}

/// Logs to stderr as `log.format` says (text, or JSON lines for log
/// shippers), at `log.level` unless `RUST_LOG` is set. The level can be
/// changed later without a restart (`service::logs::set_level`).
pub fn init_tracing_with(log: &LogConfig) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let level = std::env::var("RUST_LOG")
        .ok()
        .filter(|l| EnvFilter::try_new(l).is_ok())
        .unwrap_or_else(|| log.level.clone());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new(LOG_LEVEL_DEFAULT));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        crate::service::logs::install(handle, level);
    }
}

/// Cluster mode's metrics (docs/metrics.md), described on every node so
/// that each series has its help text when it appears.
fn describe_cluster() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "onecard_cluster_publish_seconds",
        Unit::Seconds,
        "From publishing a commit to the journal stream's quorum acknowledgement (or failure)"
    );
    describe_counter!(
        "onecard_cluster_conflicts_total",
        "Publishes refused because another node wrote about the card first"
    );
    describe_counter!(
        "onecard_cluster_retries_total",
        "Requests decided again after losing a race to another node"
    );
    describe_counter!(
        "onecard_cluster_duplicates_total",
        "Publishes the stream dropped as duplicates of an event decided before"
    );
    describe_counter!(
        "onecard_cluster_publish_failures_total",
        "Publishes not acknowledged in time (answered 503)"
    );
    describe_gauge!(
        "onecard_cluster_quorum_reachable",
        "1 while the journal stream answers this node's probe, else 0"
    );
    describe_gauge!(
        "onecard_cluster_apply_lag_messages",
        "Journal stream messages this node has not applied yet"
    );
    describe_gauge!(
        "onecard_cluster_last_applied_age_seconds",
        Unit::Seconds,
        "Time since this node last applied a change from the cluster"
    );
    describe_gauge!(
        "onecard_cluster_applied_seq",
        "The last journal stream sequence this node has applied"
    );
    describe_counter!(
        "onecard_cluster_consumer_restarts_total",
        "Times the applier recreated its consumer because a publisher waited too long"
    );
    describe_gauge!(
        "onecard_settle_delivering",
        "1 on the node delivering the sink for the cluster (it holds the sink's lease), else 0"
    );
    describe_counter!(
        "onecard_settle_takeovers_total",
        "Times this node took a sink's delivery lease"
    );
}
