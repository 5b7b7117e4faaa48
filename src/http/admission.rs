//! Admission: the limits in front of the decision. A connection cap, a cap
//! on requests in flight, a token bucket per terminal, and load shedding
//! when the CPUs are overloaded. Refusals are `429` or `503` with
//! `Retry-After`.
//!
//! The one wait: a request past the in-flight cap waits for a slot. A
//! refused terminal stays away a whole second, so a burst (a slow
//! `fdatasync` holding a group commit's requests, a flush) must be waited
//! out, not refused; a queue that stands must be refused at once. Which of
//! the two it is, is CoDel's test ([`StandingQueue`], as Facebook's servers
//! use it for admission): while some request of the last
//! [`QUEUE_INTERVAL`] got its slot within [`QUEUE_TARGET`], a request
//! waits up to the interval; once none has, the queue stands, and a
//! request waits only the target before it is refused.
//!
//! Overload. Past its knee the gateway's queue is not one it owns: the
//! requests wait in the sockets and in the runtime's run queue for a CPU,
//! unseen by the in-flight count (which the terminals' connections bound
//! anyway). What sees that queue is the runtime's *lag*: how late a timer
//! task that is ready gets to run ([`Admission::watch_lag`]). Past
//! `limits.overload_lag_ms` a growing share of terminals' requests is
//! refused with `503` and `Retry-After` (`limits.overload_retry_after_s`,
//! 2 s on average, each refusal's spread from 1 to 3 s by [`jittered`]),
//! before the body is read; a terminal that obeys works offline for
//! that long, so each refusal takes seconds of that terminal's load away
//! and a small share refused is enough (a refusal costs nearly what a
//! decision does: its TLS record and head are read all the same). The
//! share ramps from none at the target to all at five times it, spread
//! evenly over requests, so that the terminals refused do not all come
//! back in the same instant. This, not the in-flight cap, is the overload
//! control: the cap is a bound on memory, set well above what the knee
//! keeps in flight, because a cap that bites refuses in bursts (a group
//! commit's requests held by one slow `fdatasync`) and cost a quarter of the
//! goodput at twice the knee or more (`loadtest/overload`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use onecard_core::wire::ErrorCode;

use crate::config::LimitsConfig;
use crate::http::error::ApiError;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct Admission {
    in_flight: Arc<Semaphore>,
    connections: AtomicUsize,
    connections_max: usize,
    buckets: DashMap<Box<str>, Bucket, foldhash::fast::RandomState>,
    rate_per_s: f64,
    burst: f64,
    terminals_tracked_max: usize,
    /// `onecard_requests_in_flight`, resolved once: it moves twice per request.
    in_flight_gauge: metrics::Gauge,
    /// The runtime's smoothed lag, in microseconds ([`Admission::watch_lag`]):
    /// the probe's last reading, from which `shed_share` is set (its test
    /// reads it; admission decides on the share).
    lag_us: AtomicU64,
    /// The share of terminals' requests refused now, an `f64`'s bits
    /// ([`shed_share`] of the smoothed lag, set with each lag sample).
    shed_share: AtomicU64,
    /// `limits.overload_lag_ms` in microseconds; 0: never shed.
    overload_lag_us: u64,
    /// `limits.overload_retry_after_s`.
    overload_retry_after_s: u32,
    /// Counts requests while shedding, to spread the refusals evenly.
    shed_seq: AtomicU64,
    /// The queue for in-flight slots, and the origin of its clock.
    queue: StandingQueue,
    began: Instant,
}

/// The wait for a slot that counts as a queue standing, and the interval
/// over which the shortest wait is taken (CoDel's defaults, 5 and 100 ms).
pub const QUEUE_TARGET: Duration = Duration::from_millis(5);
pub const QUEUE_INTERVAL: Duration = Duration::from_millis(100);

/// Whether the queue for an in-flight slot stands: the shortest wait of the
/// last interval was longer than the target. Times are microseconds since
/// the admission began; races between requests only blur an interval's
/// edge.
#[derive(Debug)]
pub struct StandingQueue {
    interval_start_us: AtomicU64,
    interval_min_us: AtomicU64,
    standing: AtomicBool,
}

impl Default for StandingQueue {
    fn default() -> Self {
        StandingQueue {
            interval_start_us: AtomicU64::new(0),
            interval_min_us: AtomicU64::new(u64::MAX),
            standing: AtomicBool::new(false),
        }
    }
}

impl StandingQueue {
    /// Records that a request at `now_us` waited `waited_us` for its slot
    /// (0: none; a request refused counts the wait it gave up after).
    pub fn observe(&self, now_us: u64, waited_us: u64) {
        self.interval_min_us.fetch_min(waited_us, Ordering::Relaxed);
        let start = self.interval_start_us.load(Ordering::Relaxed);
        if now_us.saturating_sub(start) < QUEUE_INTERVAL.as_micros() as u64 {
            return;
        }
        if self
            .interval_start_us
            .compare_exchange(start, now_us, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let min = self.interval_min_us.swap(u64::MAX, Ordering::Relaxed);
            let standing = min > QUEUE_TARGET.as_micros() as u64;
            self.standing.store(standing, Ordering::Relaxed);
            metrics::gauge!("onecard_admission_queue_standing").set(if standing {
                1.0
            } else {
                0.0
            });
        }
    }

    /// How long a request may wait for a slot now.
    pub fn wait_max(&self) -> Duration {
        if self.standing.load(Ordering::Relaxed) {
            QUEUE_TARGET
        } else {
            QUEUE_INTERVAL
        }
    }
}

/// How often the lag is sampled, and how fast its average forgets.
const LAG_TICK: Duration = Duration::from_millis(5);
const LAG_SMOOTHING_S: f64 = 0.05;

/// The share of requests to refuse at `lag_us` with the target `target_us`:
/// none up to the target, all at five times it, linear between.
pub fn shed_share(lag_us: u64, target_us: u64) -> f64 {
    if target_us == 0 || lag_us <= target_us {
        return 0.0;
    }
    ((lag_us - target_us) as f64 / (4 * target_us) as f64).min(1.0)
}

/// The `Retry-After` of one refusal: `base` seconds on average, spread
/// evenly from half of it to one and a half times it by `u` in [0, 1).
/// Terminals refused in the same burst then come back over a span of
/// seconds, not all in the same one, which would be the next burst (with
/// one fixed value, goodput at twice the knee fell to half: the refused
/// came back in waves).
pub fn jittered(base: u32, u: f64) -> u32 {
    let low = base.div_ceil(2).max(1);
    let high = base + base / 2;
    let span = f64::from(high - low + 1);
    (low + (u.clamp(0.0, 0.999_999) * span) as u32).min(high)
}

/// Held while a request is being served.
pub struct RequestPermit {
    _permit: OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Held while a connection is open.
pub struct ConnectionPermit {
    admission: Arc<Admission>,
    listener: &'static str,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("onecard_connections_open", "listener" => self.listener).decrement(1.0);
    }
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Arc<Admission> {
        Arc::new(Admission {
            in_flight: Arc::new(Semaphore::new(limits.requests_in_flight_cap())),
            connections: AtomicUsize::new(0),
            connections_max: limits.connections_max,
            buckets: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            rate_per_s: f64::from(limits.terminal_rate_per_s),
            burst: f64::from(limits.terminal_burst),
            terminals_tracked_max: limits.terminals_tracked_max,
            in_flight_gauge: metrics::gauge!("onecard_requests_in_flight"),
            lag_us: AtomicU64::new(0),
            shed_share: AtomicU64::new(0f64.to_bits()),
            overload_lag_us: limits.overload_lag_ms * 1000,
            overload_retry_after_s: limits.overload_retry_after_s,
            shed_seq: AtomicU64::new(0),
            queue: StandingQueue::default(),
            began: Instant::now(),
        })
    }

    /// Samples the runtime's lag until `stop`: sleeps [`LAG_TICK`] and
    /// measures how much later than that it woke (the wait of a ready task
    /// for a worker, and of the timer and sockets for a worker to poll
    /// them), averaged over about [`LAG_SMOOTHING_S`] of wall time; each
    /// sample sets the share shed ([`shed_share`]).
    pub async fn watch_lag(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let gauge = metrics::gauge!("onecard_runtime_lag_seconds");
        let share_gauge = metrics::gauge!("onecard_admission_shed_share");
        let mut smoothed_us = 0.0f64;
        loop {
            let t = Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(LAG_TICK) => {}
                _ = stop.changed() => return,
            }
            let took = t.elapsed();
            let late_us = took.saturating_sub(LAG_TICK).as_secs_f64() * 1e6;
            // Weighted by the time the sample covers: one long stall moves
            // the average as far as many short ticks of the same lag.
            let w = 1.0 - (-took.as_secs_f64() / LAG_SMOOTHING_S).exp();
            smoothed_us += (late_us - smoothed_us) * w;
            let share = shed_share(smoothed_us as u64, self.overload_lag_us);
            self.observe(smoothed_us as u64, share);
            gauge.set(smoothed_us / 1e6);
            share_gauge.set(share);
        }
    }

    /// Takes the smoothed lag and the share of requests to refuse.
    pub fn observe(&self, smoothed_us: u64, share: f64) {
        self.lag_us.store(smoothed_us, Ordering::Relaxed);
        self.shed_share.store(share.to_bits(), Ordering::Relaxed);
    }

    /// Refuses this request if the gateway is shedding load and it falls
    /// in the share refused.
    fn shed(&self) -> Result<(), ApiError> {
        let share = f64::from_bits(self.shed_share.load(Ordering::Relaxed));
        if share == 0.0 {
            return Ok(());
        }
        // A Weyl sequence: successive requests' points are spread evenly
        // over [0, 1), so exactly `share` of them fall below it.
        let n = self.shed_seq.fetch_add(1, Ordering::Relaxed);
        let point = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        if point >= share {
            return Ok(());
        }
        metrics::counter!("onecard_admission_rejected_total", "limit" => "overload").increment(1);
        Err(ApiError::new(
            ErrorCode::Unavailable,
            "the gateway is overloaded (its CPUs are busy); work offline and retry after Retry-After",
        )
        .retry_after(jittered(self.overload_retry_after_s, point / share)))
    }

    /// A connection slot, or `None` when the gateway is at its connection
    /// cap (the caller closes the socket at once).
    pub fn connection(self: &Arc<Self>, listener: &'static str) -> Option<ConnectionPermit> {
        let prev = self.connections.fetch_add(1, Ordering::AcqRel);
        if prev >= self.connections_max {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("onecard_admission_rejected_total", "limit" => "connections")
                .increment(1);
            return None;
        }
        metrics::gauge!("onecard_connections_open", "listener" => listener).increment(1.0);
        Some(ConnectionPermit {
            admission: self.clone(),
            listener,
        })
    }

    pub fn connections_open(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Admits one request of `terminal` at `now`, or says why not.
    pub async fn request(&self, terminal: &str, now: Instant) -> Result<RequestPermit, ApiError> {
        self.shed()?;
        let asked = Instant::now();
        let at_us = |t: Instant| t.saturating_duration_since(self.began).as_micros() as u64;
        let permit = match self.in_flight.clone().try_acquire_owned() {
            Ok(p) => {
                self.queue.observe(at_us(asked), 0);
                p
            }
            Err(_) => {
                let slot = self.in_flight.clone().acquire_owned();
                let got = tokio::time::timeout(self.queue.wait_max(), slot).await;
                let done = Instant::now();
                self.queue
                    .observe(at_us(done), done.duration_since(asked).as_micros() as u64);
                match got {
                    Ok(Ok(p)) => p,
                    _ => {
                        metrics::counter!("onecard_admission_rejected_total", "limit" => "in_flight")
                            .increment(1);
                        return Err(ApiError::new(
                            ErrorCode::Unavailable,
                            "the gateway is at its limit of requests in flight; work offline and retry after Retry-After",
                        ));
                    }
                }
            }
        };
        self.in_flight_gauge.increment(1.0);
        let permit = RequestPermit {
            _permit: permit,
            gauge: self.in_flight_gauge.clone(),
        };
        self.take_token(terminal, now)?;
        Ok(permit)
    }

    fn take_token(&self, terminal: &str, now: Instant) -> Result<(), ApiError> {
        if let Some(mut b) = self.buckets.get_mut(terminal) {
            return self.spend(&mut b, now);
        }
        if self.buckets.len() >= self.terminals_tracked_max {
            // Forget terminals whose buckets are full again: they are idle,
            // and a new bucket starts full anyway.
            self.buckets
                .retain(|_, b| self.refilled(b, now) < self.burst);
            if self.buckets.len() >= self.terminals_tracked_max {
                metrics::counter!("onecard_admission_rejected_total", "limit" => "terminals_tracked").increment(1);
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "too many distinct terminals are active; retry shortly",
                ));
            }
        }
        let mut b = self.buckets.entry(terminal.into()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        self.spend(&mut b, now)
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        (b.tokens + dt * self.rate_per_s).min(self.burst)
    }

    fn spend(&self, b: &mut Bucket, now: Instant) -> Result<(), ApiError> {
        b.tokens = self.refilled(b, now);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            metrics::counter!("onecard_admission_rejected_total", "limit" => "terminal_rate")
                .increment(1);
            Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "this terminal sends more than {} requests per second",
                    self.rate_per_s
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(in_flight: usize, rate: u32, burst: u32) -> LimitsConfig {
        LimitsConfig {
            requests_in_flight_max: in_flight,
            terminal_rate_per_s: rate,
            terminal_burst: burst,
            ..LimitsConfig::default()
        }
    }

    #[tokio::test]
    async fn token_bucket_refills_at_the_rate() {
        let a = Admission::new(&limits(100, 10, 2));
        let t0 = Instant::now();
        assert!(a.request("t1", t0).await.is_ok());
        assert!(a.request("t1", t0).await.is_ok());
        let e = a.request("t1", t0).await.err().unwrap();
        assert_eq!(e.code, ErrorCode::RateLimited);
        // Another terminal has its own bucket.
        assert!(a.request("t2", t0).await.is_ok());
        // 100 ms at 10/s is one token.
        assert!(a
            .request("t1", t0 + Duration::from_millis(100))
            .await
            .is_ok());
        assert!(a
            .request("t1", t0 + Duration::from_millis(100))
            .await
            .is_err());
    }

    #[test]
    fn a_queue_stands_when_no_wait_of_an_interval_was_within_the_target() {
        let ms = 1000;
        let q = StandingQueue::default();
        assert_eq!(q.wait_max(), QUEUE_INTERVAL);
        // A burst: long waits, but one request of the interval got its
        // slot at once. Not standing.
        for (t, waited) in [(10, 30), (20, 40), (60, 0), (90, 50)] {
            q.observe(t * ms, waited * ms);
        }
        q.observe(101 * ms, 30 * ms);
        assert_eq!(q.wait_max(), QUEUE_INTERVAL);
        // A whole interval of waits over the target: it stands, and a
        // request waits only the target.
        for t in [120, 150, 190] {
            q.observe(t * ms, 8 * ms);
        }
        q.observe(202 * ms, 6 * ms);
        assert_eq!(q.wait_max(), QUEUE_TARGET);
        // One request within the target in the next interval ends it.
        q.observe(250 * ms, 5 * ms);
        q.observe(303 * ms, 9 * ms);
        assert_eq!(q.wait_max(), QUEUE_INTERVAL);
    }

    #[test]
    fn retry_after_spreads_around_its_base() {
        // (base, the values it spreads over, evenly)
        for (base, want) in [
            (1u32, vec![1u32]),
            (2, vec![1, 2, 3]),
            (3, vec![2, 3, 4]),
            (5, vec![3, 4, 5, 6, 7]),
        ] {
            let n: usize = 1000;
            let mut seen: std::collections::BTreeMap<u32, usize> = Default::default();
            for i in 0..n {
                *seen.entry(jittered(base, i as f64 / n as f64)).or_insert(0) += 1;
            }
            assert_eq!(seen.keys().copied().collect::<Vec<_>>(), want, "{base}");
            let mean: f64 = seen
                .iter()
                .map(|(k, c)| f64::from(*k) * *c as f64)
                .sum::<f64>()
                / n as f64;
            assert!((mean - f64::from(base)).abs() < 0.01, "{base}: {mean}");
            assert!(
                seen.values().all(|&c| c >= n / want.len() - 1),
                "{base}: {seen:?}"
            );
        }
        assert_eq!(jittered(2, 1.0), 3);
        assert_eq!(jittered(2, -1.0), 1);
    }

    #[test]
    fn the_share_shed_ramps_from_the_target_to_five_times_it() {
        let ms = 1000;
        for (lag, target, share) in [
            (0, 10 * ms, 0.0),
            (10 * ms, 10 * ms, 0.0),
            (20 * ms, 10 * ms, 0.25),
            (30 * ms, 10 * ms, 0.5),
            (50 * ms, 10 * ms, 1.0),
            (900 * ms, 10 * ms, 1.0),
            // Off.
            (900 * ms, 0, 0.0),
        ] {
            assert_eq!(
                shed_share(lag, target),
                share,
                "lag {lag} µs, target {target} µs"
            );
        }
    }

    #[tokio::test]
    async fn past_the_in_flight_cap_a_request_waits_for_a_slot_then_is_refused() {
        let a = Admission::new(&limits(1, 1000, 1000));
        let t0 = Instant::now();
        let held = a.request("t1", t0).await.unwrap();
        // No queue yet: a request waits the interval, then is refused.
        let asked = Instant::now();
        assert_eq!(
            a.request("t2", t0).await.err().unwrap().code,
            ErrorCode::Unavailable
        );
        assert!(asked.elapsed() >= QUEUE_INTERVAL);
        // A slot freed within the wait is taken.
        let release = tokio::spawn(async move {
            tokio::time::sleep(QUEUE_INTERVAL / 4).await;
            drop(held);
        });
        assert!(a.request("t2", t0).await.is_ok());
        release.await.unwrap();
        // Held for a whole interval and more, with every request waiting
        // past the target: the queue stands, and the refusal comes after
        // the target, not the interval.
        let _held = a.request("t1", t0).await.unwrap();
        for _ in 0..2 {
            let _ = a.request("t2", t0).await;
        }
        assert_eq!(a.queue.wait_max(), QUEUE_TARGET);
        let asked = Instant::now();
        assert!(a.request("t2", t0).await.is_err());
        assert!(asked.elapsed() < QUEUE_INTERVAL, "{:?}", asked.elapsed());
    }

    /// Of `n` requests, how many are refused (each as overloaded).
    async fn refused(a: &Admission, n: usize) -> usize {
        let mut refused = 0;
        for _ in 0..n {
            if let Err(e) = a.request("t1", Instant::now()).await {
                assert_eq!(e.code, ErrorCode::Unavailable);
                assert!(e.message.contains("overloaded"), "{}", e.message);
                // Shed terminals stay away 2 s on average, spread from 1 to 3.
                let after = e.retry_after_header().unwrap();
                assert!((1..=3).contains(&after), "{after}");
                refused += 1;
            }
        }
        refused
    }

    #[tokio::test]
    async fn the_share_shed_is_refused_evenly_and_none_after() {
        let a = Admission::new(&LimitsConfig {
            overload_lag_ms: 10,
            ..limits(100_000, 1_000_000, 1_000_000)
        });
        assert_eq!(refused(&a, 1000).await, 0);
        // A quarter to refuse: a quarter refused, and any 100 in a row have
        // about 25 of them (spread, not in bursts).
        a.observe(20_000, 0.25);
        let n = refused(&a, 1000).await;
        assert!((240..=260).contains(&n), "{n}");
        let in_a_row = refused(&a, 100).await;
        assert!((20..=30).contains(&in_a_row), "{in_a_row}");
        a.observe(60_000, 1.0);
        assert_eq!(refused(&a, 1000).await, 1000);
        a.observe(9_000, 0.0);
        assert_eq!(refused(&a, 1000).await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lag_probe_sees_busy_workers() {
        let a = Admission::new(&limits(100, 1000, 1000));
        let (stop, stop_rx) = watch::channel(false);
        let probe = tokio::spawn(a.clone().watch_lag(stop_rx));
        // Both workers blocked for 200 ms at a time, as by requests that
        // need more CPU than there is: the probe wakes that late.
        let hogs: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(async {
                    for _ in 0..3 {
                        std::thread::sleep(Duration::from_millis(200));
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let watcher = {
            let a = a.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let mut seen = 0;
                while t.elapsed() < Duration::from_millis(500) {
                    seen = seen.max(a.lag_us.load(Ordering::Relaxed));
                    std::thread::sleep(Duration::from_millis(1));
                }
                seen
            })
        };
        for h in hogs {
            h.await.unwrap();
        }
        let seen = watcher.join().unwrap();
        assert!(seen >= 100_000, "lag seen {seen} µs");
        // Idle again: the average falls back within a second (not to
        // nothing: other tests share the machine's CPUs).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = a.lag_us.load(Ordering::Relaxed);
        assert!(now < 50_000, "lag {now} µs after the hogs stopped");
        stop.send(true).unwrap();
        probe.await.unwrap();
    }

    #[test]
    fn connection_cap() {
        let a = Admission::new(&LimitsConfig {
            connections_max: 1,
            ..LimitsConfig::default()
        });
        let c = a.connection("terminal").unwrap();
        assert!(a.connection("terminal").is_none());
        drop(c);
        assert!(a.connection("terminal").is_some());
    }
}
