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
//! Each round is one task's work, at most `BATCH_MAX` signatures (about
//! 0.4 ms): when more are queued, the leader hands the lead to the oldest
//! waiting scan instead of looping, so no request does others' work for
//! long. A leader that is dropped (its client went away) still finishes
//! its round in `Drop`, and a lead handed to a request that is gone passes
//! on, so the queue is never left without one. The queue is bounded: past
//! [`QUEUE_MAX`] a scan verifies its own signature where it stands.

use std::collections::VecDeque;

use onecard_core::qr::{self, Ed25519Check};
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Signatures per round. The saving per signature flattens past about
/// eight; sixteen keeps a round (the leader's poll) under half a
/// millisecond on this machine's 26 µs per batched signature.
pub const BATCH_MAX: usize = 16;

/// Scans waiting for a round. It is bounded anyway by the requests in
/// flight (admission); this is the cap of the queue itself.
pub const QUEUE_MAX: usize = 1024;

pub struct SigBatch {
    queue: Mutex<Queue>,
    rounds: metrics::Counter,
    signatures: metrics::Counter,
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
            rounds: metrics::counter!("onecard_qr_ed25519_rounds_total"),
            signatures: metrics::counter!("onecard_qr_ed25519_signatures_total"),
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

    /// One round: the oldest queued checks, up to `BATCH_MAX`, verified
    /// and answered; then the lead goes to the next waiting scan, or is
    /// put down when none waits.
    fn round(&self) {
        let jobs: Vec<Job> = {
            let mut q = self.queue.lock();
            let n = q.jobs.len().min(BATCH_MAX);
            q.jobs.drain(..n).collect()
        };
        if !jobs.is_empty() {
            let checks: Vec<&Ed25519Check> = jobs.iter().map(|j| &j.check).collect();
            let verdicts = qr::verify_ed25519_batch(&checks);
            self.count(jobs.len());
            for (job, ok) in jobs.into_iter().zip(verdicts) {
                // The requester may be gone; its verdict is then unwanted.
                let _ = job.answer.send(Answer::Verdict(ok));
            }
        }
        let mut q = self.queue.lock();
        while let Some(job) = q.jobs.pop_front() {
            match job.answer.send(Answer::Lead(job.check)) {
                Ok(()) => return,
                // Gone before it could lead: its check is dropped with it.
                Err(_) => continue,
            }
        }
        q.leading = false;
    }

    fn count(&self, signatures: usize) {
        self.rounds.increment(1);
        self.signatures.increment(signatures as u64);
    }
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
        if let Ok(Answer::Lead(_)) = self.rx.try_recv() {
            self.batch.round();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future as _;
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
    /// signatures: each gets its own verdict, and batches did form.
    #[test]
    fn concurrent_scans_get_their_own_verdicts() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let (keys, toks) = tokens(400, 7);
        let batch = Arc::new(SigBatch::new());
        let checks: Vec<(Ed25519Check, bool)> = toks
            .iter()
            .map(|(t, ok)| (check_of(&keys, t), *ok))
            .collect();
        rt.block_on(async {
            let tasks: Vec<_> = checks
                .into_iter()
                .map(|(c, want)| {
                    let batch = batch.clone();
                    tokio::spawn(async move { (batch.verify(c).await, want) })
                })
                .collect();
            for t in tasks {
                let (got, want) = t.await.expect("task");
                assert_eq!(got, want);
            }
        });
        assert!(batch.queue.lock().jobs.is_empty());
        assert!(!batch.queue.lock().leading, "the lead was put down");
    }

    /// Scans dropped while they lead or wait (clients that went away) do
    /// not leave the others without a leader.
    #[test]
    fn dropped_scans_do_not_strand_the_queue() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (keys, toks) = tokens(64, 5);
        let batch = Arc::new(SigBatch::new());
        rt.block_on(async {
            let mut tasks = Vec::new();
            for (i, (t, want)) in toks.iter().enumerate() {
                let (batch, c, want) = (batch.clone(), check_of(&keys, t), *want);
                tasks.push((
                    i,
                    tokio::spawn(async move { (batch.verify(c).await, want) }),
                ));
            }
            // Let some queue, then abort every third, leaders included
            // (the first of each round is one).
            tokio::task::yield_now().await;
            for (i, t) in &tasks {
                if i % 3 == 0 {
                    t.abort();
                }
            }
            for (i, t) in tasks {
                // A stranded queue would hang here; the bound only turns a
                // hang into a failure.
                match tokio::time::timeout(Duration::from_secs(60), t).await {
                    Ok(Ok((got, want))) => assert_eq!(got, want, "scan {i}"),
                    Ok(Err(e)) => assert!(e.is_cancelled() && i % 3 == 0, "scan {i}: {e}"),
                    Err(_) => panic!("scan {i} was never answered"),
                }
            }
        });
        assert!(!batch.queue.lock().leading);
    }

    /// A lead handed to a scan whose request is gone passes on to the
    /// next one (the `Waiting` guard runs the round).
    #[test]
    fn a_lead_handed_to_a_dropped_waiter_passes_on() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (keys, toks) = tokens(BATCH_MAX + 2, 0);
        let batch = SigBatch::new();
        // A stranded queue would hang; the bound turns that into a failure.
        let answered = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                let mut futs: Vec<_> = toks
                    .iter()
                    .map(|(t, _)| Box::pin(batch.verify(check_of(&keys, t))))
                    .collect();
                // Poll each once: the first leads (and yields), the rest queue.
                for f in futs.iter_mut() {
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    assert!(f.as_mut().poll(&mut cx).is_pending());
                }
                // The leader's round answers BATCH_MAX and hands the lead to
                // the next waiter, which is then dropped without being polled.
                let leader = futs.remove(0);
                let handed = futs.remove(BATCH_MAX - 1);
                let mut leader = leader;
                assert!(leader.as_mut().await);
                drop(handed);
                // The last one is answered by the round the dropped one ran.
                let last = futs.pop().expect("last");
                assert!(last.await);
                for f in futs {
                    assert!(f.await);
                }
            })
            .await
        });
        assert!(answered.is_ok(), "a scan was never answered");
        assert!(!batch.queue.lock().leading);
    }
}
