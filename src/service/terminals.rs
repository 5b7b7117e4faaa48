//! The terminals that connect with a certificate: how many are connected
//! now, and whose certificate runs out soon. An SRE is paged 30 days
//! before a validator's certificate expires, not on the morning the
//! validator stops working; the page lists which ones.
//!
//! Bounded: at most [`TRACKED_MAX`] terminals; beyond that, terminals with
//! no connection open that were seen longest ago are forgotten first.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use crate::net::tls::CertKeys;

/// Terminals remembered at most (a city has thousands).
pub const TRACKED_MAX: usize = 100_000;
/// A terminal not seen for this long is no longer counted as expiring:
/// it may have been retired.
pub const SEEN_WITHIN_MS: i64 = 24 * 3_600_000;
/// Certificates expiring within this many days are reported.
pub const EXPIRING_WITHIN_DAYS: i64 = 30;

struct Entry {
    open: u32,
    not_after_s: i64,
    last_seen_ms: i64,
    /// The certificate it last connected with, for the security team's
    /// block list (a stolen bus is known by its id, a block by its
    /// certificate).
    cert: Option<Arc<CertKeys>>,
}

/// One terminal as the security team looks it up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TerminalView {
    pub terminal: String,
    pub connections_open: u32,
    pub last_seen_ms: i64,
    pub cert_not_after_s: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
}

#[derive(Default)]
pub struct Terminals {
    map: Mutex<HashMap<Arc<str>, Entry>>,
}

/// A certificate that expires soon: which terminal, and when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expiring {
    pub terminal: String,
    pub not_after_s: i64,
}

/// What the page and the metrics show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TerminalsView {
    /// Terminals with at least one connection open.
    pub connected: usize,
    /// Terminals seen in the last 24 h.
    pub seen_24h: usize,
    /// Of those, the ones whose certificate expires within 30 days,
    /// soonest first (at most 20 listed; `expiring_count` counts all).
    pub expiring: Vec<Expiring>,
    pub expiring_count: usize,
    /// The soonest expiry among terminals seen in the last 24 h.
    pub soonest_not_after_s: Option<i64>,
}

/// Held while a terminal's connection is open.
pub struct Connected {
    terminals: Arc<Terminals>,
    id: Arc<str>,
    at_ms: i64,
    since: std::time::Instant,
}

impl Drop for Connected {
    fn drop(&mut self) {
        if let Some(e) = self.terminals.map.lock().get_mut(&self.id) {
            e.open = e.open.saturating_sub(1);
            // Seen until now: a terminal connected for days stays
            // counted for a day after it leaves.
            let now = self.at_ms + self.since.elapsed().as_millis() as i64;
            e.last_seen_ms = e.last_seen_ms.max(now);
        }
    }
}

impl Terminals {
    /// A terminal connected with a certificate valid until `not_after_s`.
    pub fn connected(
        self: &Arc<Self>,
        id: Arc<str>,
        not_after_s: i64,
        cert: Option<Arc<CertKeys>>,
        now_ms: i64,
    ) -> Connected {
        let mut map = self.map.lock();
        if map.len() >= TRACKED_MAX && !map.contains_key(&id) {
            forget_oldest_idle(&mut map);
        }
        let e = map.entry(id.clone()).or_insert(Entry {
            open: 0,
            not_after_s,
            last_seen_ms: now_ms,
            cert: None,
        });
        e.open += 1;
        e.not_after_s = not_after_s;
        e.last_seen_ms = now_ms;
        if cert.is_some() {
            e.cert = cert;
        }
        Connected {
            terminals: self.clone(),
            id,
            at_ms: now_ms,
            since: std::time::Instant::now(),
        }
    }

    /// One terminal, if it has connected since this gateway started (and
    /// was not forgotten to keep the table bounded).
    pub fn get(&self, id: &str, now_ms: i64) -> Option<TerminalView> {
        let map = self.map.lock();
        let e = map.get(id)?;
        Some(TerminalView {
            terminal: id.to_owned(),
            connections_open: e.open,
            last_seen_ms: if e.open > 0 { now_ms } else { e.last_seen_ms },
            cert_not_after_s: e.not_after_s,
            cert_serial: e.cert.as_ref().map(|c| c.serial.clone()),
            cert_sha256: e.cert.as_ref().map(|c| c.sha256.clone()),
        })
    }

    pub fn view(&self, now_ms: i64) -> TerminalsView {
        let map = self.map.lock();
        let limit_s = now_ms / 1000 + EXPIRING_WITHIN_DAYS * 86_400;
        let mut connected = 0;
        let mut seen = 0;
        let mut soonest: Option<i64> = None;
        let mut expiring: Vec<(&Arc<str>, i64)> = Vec::new();
        for (id, e) in map.iter() {
            if e.open > 0 {
                connected += 1;
            }
            if e.open == 0 && now_ms - e.last_seen_ms > SEEN_WITHIN_MS {
                continue;
            }
            seen += 1;
            soonest = Some(soonest.map_or(e.not_after_s, |s| s.min(e.not_after_s)));
            if e.not_after_s <= limit_s {
                expiring.push((id, e.not_after_s));
            }
        }
        // Only the listed ones become strings: a fleet enrolled together
        // may expire together.
        expiring.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
        let expiring_count = expiring.len();
        TerminalsView {
            connected,
            seen_24h: seen,
            expiring: expiring
                .into_iter()
                .take(20)
                .map(|(id, not_after_s)| Expiring {
                    terminal: id.to_string(),
                    not_after_s,
                })
                .collect(),
            expiring_count,
            soonest_not_after_s: soonest,
        }
    }

    /// Sets the terminals' gauges; called before each scrape.
    pub fn publish(&self, now_ms: i64) {
        let v = self.view(now_ms);
        metrics::gauge!("onecard_terminals_connected").set(v.connected as f64);
        metrics::gauge!("onecard_tls_terminal_certs_expiring").set(v.expiring_count as f64);
        if let Some(s) = v.soonest_not_after_s {
            metrics::gauge!("onecard_tls_terminal_cert_soonest_expiry_timestamp_seconds")
                .set(s as f64);
        }
    }
}

fn forget_oldest_idle(map: &mut HashMap<Arc<str>, Entry>) {
    let oldest = map
        .iter()
        .filter(|(_, e)| e.open == 0)
        .min_by_key(|(_, e)| e.last_seen_ms)
        .map(|(id, _)| id.clone());
    if let Some(id) = oldest {
        map.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_S: i64 = 86_400;

    #[test]
    fn counts_connected_terminals_and_lists_certificates_expiring_soon() {
        let t = Arc::new(Terminals::default());
        let now_ms = 1_800_000_000_000;
        let now_s = now_ms / 1000;
        let cert = Arc::new(CertKeys {
            serial: "1a".into(),
            sha256: "ab".repeat(32),
        });
        let a = t.connected("bus-1".into(), now_s + 10 * DAY_S, None, now_ms);
        let a2 = t.connected(
            "bus-1".into(),
            now_s + 10 * DAY_S,
            Some(cert.clone()),
            now_ms,
        );
        let _b = t.connected("gate-2".into(), now_s + 400 * DAY_S, None, now_ms);
        let c = t.connected(
            "door-3".into(),
            now_s + 29 * DAY_S,
            None,
            now_ms - 2 * SEEN_WITHIN_MS,
        );
        drop(c);
        let v = t.view(now_ms);
        assert_eq!((v.connected, v.seen_24h), (2, 2));
        // door-3 was last seen two days ago and is not connected: retired
        // terminals do not page anyone.
        assert_eq!(v.expiring_count, 1);
        assert_eq!(v.expiring[0].terminal, "bus-1");
        assert_eq!(v.soonest_not_after_s, Some(now_s + 10 * DAY_S));
        let bus = t.get("bus-1", now_ms).expect("seen");
        assert_eq!(bus.connections_open, 2);
        assert_eq!(bus.cert_serial.as_deref(), Some("1a"));
        assert!(t.get("bus-9", now_ms).is_none());
        drop(a);
        assert_eq!(t.view(now_ms).connected, 2, "bus-1 still has a connection");
        drop(a2);
        assert_eq!(t.view(now_ms).connected, 1);
        // Still seen today, so still listed.
        assert_eq!(t.view(now_ms).expiring_count, 1);
    }
}
