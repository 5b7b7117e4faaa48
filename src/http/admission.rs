//! Admission: the limits in front of the decision. A connection cap, a cap
//! on requests in flight and a token bucket per terminal. Every refusal is
//! immediate (`429` or `503` with `Retry-After`); nothing here queues.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
            in_flight: Arc::new(Semaphore::new(limits.requests_in_flight_max)),
            connections: AtomicUsize::new(0),
            connections_max: limits.connections_max,
            buckets: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            rate_per_s: f64::from(limits.terminal_rate_per_s),
            burst: f64::from(limits.terminal_burst),
            terminals_tracked_max: limits.terminals_tracked_max,
            in_flight_gauge: metrics::gauge!("onecard_requests_in_flight"),
        })
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
    pub fn request(&self, terminal: &str, now: Instant) -> Result<RequestPermit, ApiError> {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            metrics::counter!("onecard_admission_rejected_total", "limit" => "in_flight")
                .increment(1);
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "the gateway is at its limit of requests in flight; retry shortly",
            ));
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

    #[test]
    fn token_bucket_refills_at_the_rate() {
        let a = Admission::new(&limits(100, 10, 2));
        let t0 = Instant::now();
        assert!(a.request("t1", t0).is_ok());
        assert!(a.request("t1", t0).is_ok());
        let e = a.request("t1", t0).err().unwrap();
        assert_eq!(e.code, ErrorCode::RateLimited);
        // Another terminal has its own bucket.
        assert!(a.request("t2", t0).is_ok());
        // 100 ms at 10/s is one token.
        assert!(a.request("t1", t0 + Duration::from_millis(100)).is_ok());
        assert!(a.request("t1", t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn in_flight_cap_answers_unavailable() {
        let a = Admission::new(&limits(1, 1000, 1000));
        let t0 = Instant::now();
        let held = a.request("t1", t0).unwrap();
        assert_eq!(
            a.request("t2", t0).err().unwrap().code,
            ErrorCode::Unavailable
        );
        drop(held);
        assert!(a.request("t2", t0).is_ok());
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
