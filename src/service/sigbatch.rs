//! Ed25519 scans that arrive together are verified together.
//!
//! A batch of signatures costs about half the work per signature of
//! checking each on its own (see [`onecard_core::qr::verify_ed25519_batch`],
//! which also says why a batch admits no code an issuer did not sign), and
//! a scan is mostly its signature. There is no timer and no thread: a scan
//! that finds nobody verifying becomes the leader, yields once to the
//! runtime so that the scans already read from other connections can queue
//! behind it, and then verifies what is queued, up to [`BATCH_MAX`], on its
//! own worker. At a low rate the batch is the leader alone (one yield, a
//! few microseconds); under load it grows with what arrived meanwhile.
//!
//! Each round is one task's work, at most `BATCH_MAX` signatures (under
//! half a millisecond even checked one by one). A round takes its checks
//! and hands the lead to the oldest scan still waiting before it verifies,
//! so that rounds on other workers overlap with it and no request does
//! others' work for long. A leader that is dropped (its client went away)
//! still runs its round in `Drop`, and a lead handed to a request that is
//! gone passes on, so the queue is never left without one. The queue is
//! bounded: past [`QUEUE_MAX`] a scan verifies its own signature where it
//! stands.
//!
//! A batch with one bad signature in it fails and is then checked one by
//! one, which costs more than not batching. So that forged codes cannot
//! make every batch pay that, after a failed batch the next
//! [`ALONE_AFTER_FAILURE`] rounds check one by one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};

use onecard_core::qr::{self, Ed25519Check};
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Signatures per round. The saving per signature is flat from eight on
/// (26.6 µs at 8, 26.1 at 16: `cargo bench --bench hot_path --
/// qr/ed25519_signatures`), and eight checked one by one (56 µs each) keep
/// a round under half a millisecond.
pub const BATCH_MAX: usize = 8;

/// Scans waiting for a round. It is bounded anyway by the requests in
/// flight (admission); this is the cap of the queue itself.
pub const QUEUE_MAX: usize = 1024;

/// Rounds checked one by one after a batch failed: a steady stream of bad
/// signatures then costs one failed batch per this many rounds.
pub const ALONE_AFTER_FAILURE: u32 = 64;

pub struct SigBatch {
    queue: Mutex<Queue>,
    /// Rounds still to check one by one after a failed batch.
    alone: AtomicU32,
    rounds: metrics::Counter,
    signatures: metrics::Counter,
    failed: metrics::Counter,
    /// The largest round so far, for the tests.
    #[cfg(test)]
    largest: std::sync::atomic::AtomicUsize,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// A task is leading: it will run a round, or hand the lead on.
    leading: bool,
}

struct Job {
    check: Ed25519Check,
    answer: oneshot::Sender<Answer>,
}

enum Answer {
    Verdict(bool),
    /// Run the next round; the check is the receiver's own, back to it.
    Lead(Ed25519Check),
}

impl Default for SigBatch {
    fn default() -> Self {
        SigBatch::new()
    }
}

impl SigBatch {
    pub fn new() -> SigBatch {
        SigBatch {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                leading: false,
            }),
            alone: AtomicU32::new(0),
            rounds: metrics::counter!("onecard_qr_ed25519_rounds_total"),
            signatures: metrics::counter!("onecard_qr_ed25519_signatures_total"),
            failed: metrics::counter!("onecard_qr_ed25519_failed_batches_total"),
            #[cfg(test)]
            largest: Default::default(),
        }
    }

    /// Whether the signature verifies, checked in a batch with the scans
    /// that arrived alongside it.
    pub async fn verify(&self, check: Ed25519Check) -> bool {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.queue.lock();
            if q.jobs.len() >= QUEUE_MAX {
                drop(q);
                self.count(1);
                return check.verify_alone();
            }
            q.jobs.push_back(Job { check, answer: tx });
            !std::mem::replace(&mut q.leading, true)
        };
        let mut wait = Waiting { batch: self, rx };
        if lead {
            // The round runs when the guard drops: after the yield, or in
            // `Drop` if this request is dropped while it yields.
            let _round = Round(self);
            tokio::task::yield_now().await;
        }
        loop {
            match (&mut wait.rx).await {
                Ok(Answer::Verdict(ok)) => return ok,
                Ok(Answer::Lead(own)) => {
                    let (tx, rx) = oneshot::channel();
                    self.queue.lock().jobs.push_front(Job {
                        check: own,
                        answer: tx,
                    });
                    wait.rx = rx;
                    self.round();
                }
                // Every queued job is answered by a round; a sender dropped
                // unanswered means a round panicked. Not verified, so not
                // accepted.
                Err(_) => return false,
            }
        }
    }

    /// One round: the oldest queued checks, up to `BATCH_MAX`, taken; the
    /// lead handed to the next waiting scan (or put down when none waits);
    /// then the checks verified and answered. Handing on first lets the
    /// next round run on another worker meanwhile, and leaves no queue
    /// without a leader should verifying panic.
    fn round(&self) {
        let jobs: Vec<Job> = {
            let mut q = self.queue.lock();
            let n = q.jobs.len().min(BATCH_MAX);
            let jobs = q.jobs.drain(..n).collect();
            hand_on(&mut q);
            jobs
        };
        if jobs.is_empty() {
            return;
        }
        #[cfg(test)]
        self.largest.fetch_max(jobs.len(), Ordering::Relaxed);
        let checks: Vec<&Ed25519Check> = jobs.iter().map(|j| &j.check).collect();
        let alone = self
            .alone
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        let verdicts: Vec<bool> = if alone {
            checks.iter().map(|c| c.verify_alone()).collect()
        } else {
            qr::verify_ed25519_batch(&checks)
        };
        if !alone && checks.len() > 1 && verdicts.contains(&false) {
            self.alone.store(ALONE_AFTER_FAILURE, Ordering::Relaxed);
            self.failed.increment(1);
        }
        self.count(jobs.len());
        for (job, ok) in jobs.into_iter().zip(verdicts) {
            // The requester may be gone; its verdict is then unwanted.
            let _ = job.answer.send(Answer::Verdict(ok));
        }
    }

    fn count(&self, signatures: usize) {
        self.rounds.increment(1);
        self.signatures.increment(signatures as u64);
    }
}

/// The lead to the oldest waiting scan that is still there, or put down.
fn hand_on(q: &mut Queue) {
    while let Some(job) = q.jobs.pop_front() {
        match job.answer.send(Answer::Lead(job.check)) {
            Ok(()) => return,
            // Gone before it could lead: its check is dropped with it.
            Err(_) => continue,
        }
    }
    q.leading = false;
}

/// The leader's round, run when it drops (after the yield, or when the
/// leading request is dropped mid-yield).
struct Round<'a>(&'a SigBatch);

impl Drop for Round<'_> {
    fn drop(&mut self) {
        self.0.round();
    }
}

/// A waiting scan. Dropped with a lead it was handed but never took (its
/// request went away between the two), it runs that round itself.
struct Waiting<'a> {
    batch: &'a SigBatch,
    rx: oneshot::Receiver<Answer>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Closed first, so that a lead sent from another worker from here
        // on fails to arrive (and `hand_on` passes it to the next scan)
        // rather than landing in a receiver nobody reads.
        self.rx.close();
        if let Ok(Answer::Lead(_)) = self.rx.try_recv() {
            self.batch.round();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use onecard_core::qr::{Alg, IssuerKey, Keyring};

    const NOW: i64 = 1_750_000_000;

    /// A keyring of one Ed25519 issuer and `n` tokens, every `bad_every`-th
    /// with a broken signature.
    fn tokens(n: usize, bad_every: usize) -> (Keyring, Vec<(String, bool)>) {
        let key = qr::SigningKey::generate(Alg::Ed25519, &mut rand_core::OsRng);
        let pem = key.public_pem();
        let keys = Keyring::new(vec![IssuerKey::from_public_pem(
            "k1",
            Alg::Ed25519,
            &pem,
            0,
            None,
        )
        .expect("key")])
        .expect("keyring");
        let toks = (0..n)
            .map(|i| {
                let t = qr::issue(
                    &key,
                    "k1",
                    &format!("sub-{i}"),
                    qr::CredType::Essc,
                    NOW,
                    60,
                    &format!("jti-{i:08}"),
                )
                .expect("issue");
                if bad_every > 0 && i % bad_every == 0 {
                    // Flip one character of the signature's base64.
                    let mut b = t.into_bytes();
                    let last = b.len() - 3;
                    b[last] = if b[last] == b'A' { b'B' } else { b'A' };
                    (String::from_utf8(b).expect("ascii"), false)
                } else {
                    (t, true)
                }
            })
            .collect();
        (keys, toks)
    }

    fn check_of(keys: &Keyring, tok: &str) -> Ed25519Check {
        qr::open(tok, keys, NOW)
            .expect("opens")
            .ed25519_check()
            .expect("ed25519")
    }

    /// Many scans at once on a two-worker runtime, some with bad
    /// signatures: each gets its own verdict.
    #[test]
    fn concurrent_scans_get_their_own_verdicts() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let (keys, toks) = tokens(400, 7);
        let batch = Arc::new(SigBatch::new());
        for (got, want) in run_all(&rt, &batch, &keys, &toks) {
            assert_eq!(got, want);
        }
        assert!(batch.queue.lock().jobs.is_empty());
        assert!(!batch.queue.lock().leading, "the lead was put down");
    }

    /// A lead handed to a scan whose request is gone passes on to the
    /// next one (the `Waiting` guard runs the round).
    #[test]
    fn a_lead_handed_to_a_dropped_waiter_passes_on() {
        let rt = current_thread();
        let (keys, toks) = tokens(BATCH_MAX + 2, 0);
        let batch = SigBatch::new();
        let answered = rt.block_on(within_a_minute(async {
            let mut futs = polled_once(&batch, &keys, &toks);
            // The leader's round answers BATCH_MAX and hands the lead to
            // the next waiter, which is then dropped without being polled.
            let mut leader = futs.remove(0);
            let handed = futs.remove(BATCH_MAX - 1);
            assert!(leader.as_mut().await);
            drop(handed);
            // The last one is answered by the round the dropped one ran.
            let last = futs.pop().expect("last");
            assert!(last.await);
            for f in futs {
                assert!(f.await);
            }
        }));
        assert!(answered, "a scan was never answered");
        assert!(!batch.queue.lock().leading);
    }

    /// Each check's `verify` polled once, in order, on the runtime: the
    /// first leads (and yields), the rest queue.
    fn polled_once<'a>(
        batch: &'a SigBatch,
        keys: &Keyring,
        toks: &[(String, bool)],
    ) -> Vec<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + 'a>>> {
        let mut futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + 'a>>> = toks
            .iter()
            .map(|(t, _)| Box::pin(batch.verify(check_of(keys, t))) as _)
            .collect();
        for f in futs.iter_mut() {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        futs
    }

    /// Whether `f` finished within a minute: a stranded queue would hang,
    /// and the bound turns that into a failure.
    async fn within_a_minute(f: impl std::future::Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .is_ok()
    }

    /// One task per token, each verifying its check through `batch` and
    /// returning its verdict with the one wanted. Called on the runtime.
    fn spawn_all(
        batch: &Arc<SigBatch>,
        keys: &Keyring,
        toks: &[(String, bool)],
    ) -> Vec<tokio::task::JoinHandle<(bool, bool)>> {
        toks.iter()
            .map(|(t, want)| {
                let (batch, check, want) = (batch.clone(), check_of(keys, t), *want);
                tokio::spawn(async move { (batch.verify(check).await, want) })
            })
            .collect()
    }

    /// [`spawn_all`] on `rt`, and each verdict with the one wanted, in order.
    fn run_all(
        rt: &tokio::runtime::Runtime,
        batch: &Arc<SigBatch>,
        keys: &Keyring,
        toks: &[(String, bool)],
    ) -> Vec<(bool, bool)> {
        rt.block_on(async {
            let mut out = Vec::new();
            for t in spawn_all(batch, keys, toks) {
                out.push(t.await.expect("task"));
            }
            out
        })
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    /// On one thread the order is fixed: the first scan leads and yields,
    /// the other nineteen queue meanwhile, and rounds of `BATCH_MAX` follow.
    #[test]
    fn batches_form_from_what_queued_during_the_yield() {
        let (keys, toks) = tokens(20, 0);
        let batch = Arc::new(SigBatch::new());
        for (got, want) in run_all(&current_thread(), &batch, &keys, &toks) {
            assert_eq!(got, want);
        }
        assert_eq!(batch.largest.load(Ordering::Relaxed), BATCH_MAX);
        assert_eq!(batch.alone.load(Ordering::Relaxed), 0, "no batch failed");
    }

    /// One bad signature in a round: the batch fails, each scan still gets
    /// its own verdict, and the rounds after it check one by one.
    #[test]
    fn after_a_failed_batch_rounds_check_one_by_one() {
        let rt = current_thread();
        let (keys, toks) = tokens(BATCH_MAX, BATCH_MAX);
        assert!(!toks[0].1 && toks[1..].iter().all(|t| t.1));
        let batch = Arc::new(SigBatch::new());
        for (got, want) in run_all(&rt, &batch, &keys, &toks) {
            assert_eq!(got, want);
        }
        assert_eq!(batch.alone.load(Ordering::Relaxed), ALONE_AFTER_FAILURE);
        let (keys, toks) = tokens(BATCH_MAX, 0);
        for (got, want) in run_all(&rt, &batch, &keys, &toks) {
            assert_eq!(got, want);
        }
        assert_eq!(
            batch.alone.load(Ordering::Relaxed),
            ALONE_AFTER_FAILURE - 1,
            "one round one by one"
        );
    }

    /// A leader dropped while it yields (its client went away) still runs
    /// its round: the scans queued behind it are answered.
    #[test]
    fn a_leader_dropped_while_it_yields_still_runs_its_round() {
        let rt = current_thread();
        let (keys, toks) = tokens(5, 0);
        let batch = SigBatch::new();
        let answered = rt.block_on(within_a_minute(async {
            let mut futs = polled_once(&batch, &keys, &toks);
            drop(futs.remove(0));
            for f in futs {
                assert!(f.await);
            }
        }));
        assert!(answered, "a scan was never answered");
        assert!(!batch.queue.lock().leading);
    }

    /// Two workers, scans aborted at random points (leaders mid-yield,
    /// heirs holding a lead, waiters): every scan not aborted is answered
    /// with its own verdict and the lead is put down at the end. A seeded
    /// stress run, since which abort meets which step depends on timing.
    #[test]
    fn random_aborts_on_two_workers_strand_nothing() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .expect("runtime");
        let (keys, toks) = tokens(96, 5);
        let mut rng = onecard_core::rng::Rng::new(21);
        for round in 0..20 {
            let batch = Arc::new(SigBatch::new());
            let aborts: Vec<(bool, u64)> = (0..toks.len())
                .map(|_| (rng.next_u64() % 3 == 0, rng.next_u64() % 4))
                .collect();
            let stranded = rt.block_on(async {
                let tasks = spawn_all(&batch, &keys, &toks);
                for ((abort, yields), t) in aborts.iter().zip(&tasks) {
                    for _ in 0..*yields {
                        tokio::task::yield_now().await;
                    }
                    if *abort {
                        t.abort();
                    }
                }
                tokio::time::timeout(Duration::from_secs(60), async {
                    for t in tasks {
                        match t.await {
                            Ok((got, want)) => assert_eq!(got, want),
                            Err(e) => assert!(e.is_cancelled(), "{e}"),
                        }
                    }
                })
                .await
                .is_err()
            });
            assert!(!stranded, "round {round}: a scan was never answered");
            assert!(!batch.queue.lock().leading, "round {round}");
        }
    }
}
