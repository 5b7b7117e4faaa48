//! Bulk import of cards and deny-list entries: the nightly card file from
//! the card issuer, a deny list handed over by another system, or a store
//! filled before a load test. Ten million single PUTs would take hours; an
//! import takes newline-delimited JSON (one entry per line, as the single
//! admin call takes it, plus `card_no`) and writes it in batches.
//!
//! - Every line is validated like the single call; valid lines are stored,
//!   invalid ones are counted and the first few named by line number (with
//!   the same messages, which never echo a card number).
//! - Each batch is one durable write; cards take effect as they are queued
//!   (under their locks, as a single PUT), deny-list entries once written.
//! - Importing is idempotent (a card is replaced, keeping its spending
//!   counters; a deny entry is re-added with a new version), so a client
//!   that lost an answer sends the same chunk again.
//! - One request carries at most [`IMPORT_BODY_BYTES_MAX`]; bigger files go
//!   in several requests. One import runs at a time (the caller's slot
//!   travels with it); once started it runs to its end even if the client
//!   hangs up, so that memory and disk agree.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;

use onecard_core::model::{Card, CardNo, CardStatus, Concession, Function};
use onecard_core::wire;

use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::store::durable::{Commit, CommitError, Op, Pending};
use crate::store::{cards, Cf};

/// One import request's body, at most.
pub const IMPORT_BODY_BYTES_MAX: usize = 32 * 1024 * 1024;
/// One line, at most: a card entry is about 100 bytes.
pub const IMPORT_LINE_BYTES_MAX: usize = 4 * 1024;
/// Entries per durable write. Cards hold their locks while a batch is built
/// (about a millisecond for this many), so a tap of a card being imported
/// waits at most that long.
pub const IMPORT_BATCH: usize = 1_000;
/// Rejected lines named in the answer, at most (all are counted).
pub const IMPORT_ERRORS_SHOWN: usize = 20;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the request body.
    pub line: u64,
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    /// Non-blank lines read.
    pub lines: u64,
    pub imported: u64,
    pub rejected: u64,
    /// The first rejected lines, with why.
    pub errors: Vec<LineError>,
    /// Cards (or deny-list entries) known after the import.
    pub total: u64,
    /// The deny-list version after the import (deny-list imports only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denylist_version: Option<u64>,
    pub seconds: f64,
}

impl ImportReport {
    fn reject(&mut self, line: u64, e: ServiceError) {
        self.rejected += 1;
        if self.errors.len() < IMPORT_ERRORS_SHOWN {
            self.errors.push(LineError {
                line,
                code: e.code().as_str(),
                message: e.to_string(),
            });
        }
    }
}

/// The non-blank lines of a body with their 1-based numbers (a trailing
/// `\r` is dropped, for files written on Windows).
fn lines(body: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
}

fn line_too_long() -> ServiceError {
    ServiceError::too_large(format!(
        "the line is longer than {IMPORT_LINE_BYTES_MAX} bytes"
    ))
}

/// A card line, typed and borrowed: the fast path. Anything it does not
/// take (escapes, wrong types, unknown names) goes to [`card_line_slow`],
/// which says precisely what is wrong.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCardLine<'a> {
    #[serde(borrow)]
    card_no: &'a str,
    #[serde(borrow)]
    status: &'a str,
    #[serde(borrow, default)]
    functions: Vec<&'a str>,
    #[serde(borrow, default)]
    concessions: Vec<&'a str>,
}

fn card_line_fast(line: &[u8]) -> Option<(CardNo, Card)> {
    let raw: RawCardLine = serde_json::from_slice(line).ok()?;
    let card_no = CardNo::parse(raw.card_no).ok()?;
    let status = CardStatus::parse(raw.status)?;
    let functions: Vec<Function> = raw
        .functions
        .iter()
        .map(|f| Function::parse(f))
        .collect::<Option<_>>()?;
    let concessions: Vec<Concession> = raw
        .concessions
        .iter()
        .map(|c| Concession::parse(c))
        .collect::<Option<_>>()?;
    Some((card_no, Card::new(status, &functions, &concessions)))
}

fn card_line_slow(line: &[u8]) -> Result<(CardNo, Card), ServiceError> {
    let m = wire::parse_object(line)?;
    wire::reject_unknown(&m, &["card_no", "status", "functions", "concessions"])?;
    let card_no = wire::card_no_field("card_no", wire::req_str(&m, "card_no")?)?;
    Ok((card_no, wire::card_fields(&m)?))
}

/// Parses one card line: `{"card_no": …, "status": …, "functions": […],
/// "concessions": […]}`.
pub fn card_line(line: &[u8]) -> Result<(CardNo, Card), ServiceError> {
    if line.len() > IMPORT_LINE_BYTES_MAX {
        return Err(line_too_long());
    }
    card_line_fast(line).map_or_else(|| card_line_slow(line), Ok)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDenyLine<'a> {
    #[serde(borrow)]
    card_no: &'a str,
    #[serde(borrow)]
    reason: &'a str,
}

/// Parses one deny-list line: `{"card_no": …, "reason": …}`.
pub fn deny_line(line: &[u8]) -> Result<(CardNo, String), ServiceError> {
    if line.len() > IMPORT_LINE_BYTES_MAX {
        return Err(line_too_long());
    }
    let fast = serde_json::from_slice::<RawDenyLine>(line)
        .ok()
        .and_then(|raw| Some((CardNo::parse(raw.card_no).ok()?, raw.reason)));
    let (card_no, reason) = match fast {
        Some((n, r)) => (n, r.to_owned()),
        None => {
            let m = wire::parse_object(line)?;
            wire::reject_unknown(&m, &["card_no", "reason"])?;
            let n = wire::card_no_field("card_no", wire::req_str(&m, "card_no")?)?;
            (n, wire::req_str(&m, "reason")?.to_owned())
        }
    };
    wire::deny_reason(&reason)?;
    Ok((card_no, reason))
}

/// Parses every line, keeping the valid entries in order.
fn parse_all<T>(
    body: &[u8],
    parse: fn(&[u8]) -> Result<T, ServiceError>,
    report: &mut ImportReport,
) -> Vec<T> {
    let mut out = Vec::new();
    for (n, line) in lines(body) {
        report.lines += 1;
        match parse(line) {
            Ok(t) => out.push(t),
            Err(e) => report.reject(n, e),
        }
    }
    out
}

/// Runs an import to its end on its own task, whatever its client does.
async fn to_completion(
    work: impl std::future::Future<Output = Result<ImportReport, ServiceError>> + Send + 'static,
) -> Result<ImportReport, ServiceError> {
    tokio::spawn(work).await.map_err(|_| {
        ServiceError::unavailable(
            "the import was interrupted; send the same lines again (importing is idempotent)",
        )
    })?
}

/// Parsing a 32 MiB body is CPU work of a fraction of a second: it goes to
/// the blocking pool, not to the workers that serve terminals.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ServiceError::unavailable("the import failed; retry"))
}

/// Parses a whole body on the blocking pool: the report so far (lines,
/// rejections) and the valid entries.
async fn parse_blocking<T: Send + 'static>(
    body: Bytes,
    parse: fn(&[u8]) -> Result<T, ServiceError>,
) -> Result<(ImportReport, Vec<T>), ServiceError> {
    blocking(move || {
        let mut report = ImportReport::default();
        let parsed = parse_all(&body, parse, &mut report);
        (report, parsed)
    })
    .await
}

/// Imports card lines (see the module documentation).
pub async fn cards(
    gw: Arc<Gateway>,
    body: Bytes,
    slot: OwnedSemaphorePermit,
) -> Result<ImportReport, ServiceError> {
    to_completion(async move {
        let _slot = slot;
        let started = Instant::now();
        let (mut report, parsed) = parse_blocking(body, card_line).await?;
        let parsed = Arc::new(parsed);
        // In a cluster every card a write touches is fenced, and one
        // replicated write fences so many at most.
        let per_commit = match gw.config.cluster {
            Some(_) => IMPORT_BATCH.min(crate::store::replicated::CARDS_PER_COMMIT_MAX),
            None => IMPORT_BATCH,
        };
        for start in (0..parsed.len()).step_by(per_commit) {
            let end = (start + per_commit).min(parsed.len());
            // A batch that lost a race for one of its cards (a tap of it
            // at another node) wrote nothing: read the cards again and
            // write it again (`retrying` waits for the winner first).
            gw.retrying(|| {
                let (gw2, batch) = (gw.clone(), parsed.clone());
                async move {
                    let pending = blocking(move || queue_cards(&gw2, &batch[start..end]))
                        .await?
                        .map_err(ServiceError::from)?;
                    pending.durable().await.map_err(ServiceError::from)
                }
            })
            .await?;
            report.imported += (end - start) as u64;
        }
        metrics::gauge!("onecard_cards").set(gw.cards.len() as f64);
        report.total = gw.cards.len() as u64;
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            imported = report.imported,
            rejected = report.rejected,
            cards = report.total,
            "cards imported"
        );
        Ok(report)
    })
    .await
}

/// Queues one batch of cards as one write, under the locks of every card in
/// it, and sets them in memory: the same order guarantee as a single PUT (a
/// tap of one of these cards is queued after this write and sees its
/// result).
fn queue_cards(gw: &Gateway, batch: &[(CardNo, Card)]) -> Result<Pending, CommitError> {
    let stripes: BTreeSet<usize> = batch.iter().map(|(n, _)| gw.cards.stripe(n)).collect();
    let _locks = gw.cards.lock_stripes(&stripes);
    let mut ops = Vec::with_capacity(batch.len());
    let mut stored = Vec::with_capacity(batch.len());
    for (card_no, new) in batch {
        // A card twice in one batch: the second sees the first in `stored`
        // only through memory, which is set below; both keep the counters
        // the card had before the batch, so the outcome is the same.
        let card = cards::keep_counters(gw.cards.get(card_no), *new);
        ops.push(Op::Put(
            Cf::Cards,
            card_no.as_str().as_bytes().to_vec(),
            cards::encode(&card),
        ));
        stored.push((card_no.clone(), card));
    }
    let pending = gw.journal.submit(Commit::new(None, ops))?;
    for (card_no, card) in stored {
        gw.card_follows(card_no, card);
    }
    Ok(pending)
}

/// Imports deny-list lines (see the module documentation).
pub async fn denylist(
    gw: Arc<Gateway>,
    body: Bytes,
    slot: OwnedSemaphorePermit,
) -> Result<ImportReport, ServiceError> {
    to_completion(async move {
        let _slot = slot;
        let started = Instant::now();
        let (mut report, parsed) = parse_blocking(body, deny_line).await?;
        let mut version = gw.deny.version();
        for batch in parsed.chunks(IMPORT_BATCH) {
            version = gw
                .deny
                .add_many(&*gw.journal, batch, gw.now_ms())
                .await
                .map_err(ServiceError::from)?;
            report.imported += batch.len() as u64;
        }
        report.total = gw.deny.len() as u64;
        report.denylist_version = Some(version);
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            imported = report.imported,
            rejected = report.rejected,
            denylist.entries = report.total,
            denylist.version = version,
            "deny-list entries imported"
        );
        Ok(report)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_blank_ones_skipped() {
        let body = b"a\r\n\n  \nb\nc";
        let got: Vec<(u64, &[u8])> = lines(body).collect();
        assert_eq!(got, vec![(1, &b"a"[..]), (4, &b"b"[..]), (5, &b"c"[..])]);
    }

    #[test]
    fn card_lines_fast_and_slow_agree() {
        let line = br#"{"card_no":"500118A00000001","status":"active","functions":["transit","medical"],"concessions":["elderly"]}"#;
        let (n, c) = card_line(line).unwrap();
        assert_eq!(n.as_str(), "500118A00000001");
        assert_eq!(c.status, CardStatus::Active);
        assert_eq!(
            c.function_list(),
            vec![Function::Transit, Function::Medical]
        );
        // An escaped string cannot be borrowed: the slow path takes it.
        let escaped = br#"{"card_no":"500118A0000000\u0031","status":"lost"}"#;
        let (n, c) = card_line(escaped).unwrap();
        assert_eq!(n.as_str(), "500118A00000001");
        assert_eq!(c.status, CardStatus::Lost);
    }

    #[test]
    fn bad_card_lines_say_why_without_echoing_the_card() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "not valid JSON"),
            (
                br#"{"card_no":"500118A00000001"}"#,
                "missing field `status`",
            ),
            (
                br#"{"card_no":"123","status":"active"}"#,
                "`card_no` must be 8 to 32",
            ),
            (
                br#"{"card_no":"500118A00000001","status":"gone"}"#,
                "`status` must be one of",
            ),
            (
                br#"{"card_no":"500118A00000001","status":"active","functions":["fly"]}"#,
                "`functions` entries must be among",
            ),
            (
                br#"{"card_no":"500118A00000001","status":"active","colour":"red"}"#,
                "unknown field `colour`",
            ),
        ];
        for (line, want) in cases {
            let e = card_line(line).unwrap_err();
            assert!(matches!(e, ServiceError::Invalid(_)), "{e}");
            assert!(
                e.to_string().contains(want),
                "{}: {}",
                String::from_utf8_lossy(line),
                e
            );
            assert!(!e.to_string().contains("500118A00000001"), "{}", e);
        }
        let long = format!(
            r#"{{"card_no":"500118A00000001","status":"active","x":"{}"}}"#,
            "a".repeat(IMPORT_LINE_BYTES_MAX)
        );
        assert!(matches!(
            card_line(long.as_bytes()).unwrap_err(),
            ServiceError::TooLarge(_)
        ));
    }

    #[test]
    fn deny_lines() {
        let (n, r) = deny_line(br#"{"card_no":"500118A00000001","reason":"lost"}"#).unwrap();
        assert_eq!((n.as_str(), r.as_str()), ("500118A00000001", "lost"));
        for (line, want) in [
            (
                &br#"{"card_no":"500118A00000001","reason":""}"#[..],
                "`reason` must be 1 to",
            ),
            (
                br#"{"card_no":"500118A00000001"}"#,
                "missing field `reason`",
            ),
            (
                br#"{"card_no":"500118A00000001","reason":"x","y":1}"#,
                "unknown field `y`",
            ),
            (br#"[1]"#, "must be a JSON object"),
        ] {
            let e = deny_line(line).unwrap_err();
            assert!(e.to_string().contains(want), "{}", e);
        }
    }

    #[test]
    fn report_counts_every_rejection_and_shows_the_first_few() {
        let mut body = Vec::new();
        for i in 0..50 {
            if i % 2 == 0 {
                body.extend_from_slice(
                    b"{\"card_no\":\"500118A00000001\",\"status\":\"active\"}\n",
                );
            } else {
                body.extend_from_slice(b"nonsense\n");
            }
        }
        let mut report = ImportReport::default();
        let parsed = parse_all(&body, card_line, &mut report);
        assert_eq!(parsed.len(), 25);
        assert_eq!((report.lines, report.rejected), (50, 25));
        assert_eq!(report.errors.len(), IMPORT_ERRORS_SHOWN);
        assert_eq!(report.errors[0].line, 2);
        assert_eq!(report.errors[1].line, 4);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// Import lines, random or a good line changed in places: never a
        /// panic, the same answer twice, and no card number in a message.
        #[test]
        fn import_lines_take_any_bytes(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 1..5),
        ) {
            let good = br#"{"card_no":"500118A00000001","status":"active","functions":["transit"],"reason":"lost"}"#;
            let mut mutated = good.to_vec();
            for (at, byte) in edits {
                let i = at.index(mutated.len());
                mutated[i] = byte;
            }
            for line in [noise, mutated] {
                let card = card_line(&line).map_err(|e| e.to_string());
                proptest::prop_assert_eq!(&card, &card_line(&line).map_err(|e| e.to_string()));
                let deny = deny_line(&line).map_err(|e| e.to_string());
                proptest::prop_assert_eq!(&deny, &deny_line(&line).map_err(|e| e.to_string()));
                for e in [card.err(), deny.err()].into_iter().flatten() {
                    proptest::prop_assert!(!e.contains("A00000001"), "{}", e);
                }
            }
        }

        /// Query strings of the terminal and admin routes: never a panic.
        #[test]
        fn query_strings_take_any_text(q in "\\PC{0,120}") {
            let since = crate::service::offline::since_param(Some(&q)).map_err(|e| e.to_string());
            proptest::prop_assert_eq!(&since, &crate::service::offline::since_param(Some(&q)).map_err(|e| e.to_string()));
            let window = crate::service::hotline::window(Some(&q)).map(|_| ()).map_err(|e| e.to_string());
            proptest::prop_assert_eq!(&window, &crate::service::hotline::window(Some(&q)).map(|_| ()).map_err(|e| e.to_string()));
            let month = onecard_core::disburse::month_query(Some(&q));
            proptest::prop_assert_eq!(&month, &onecard_core::disburse::month_query(Some(&q)));
        }
    }
}
