//! Metric handles of the hot path, registered once so that a request pays
//! an atomic add, not a registry lookup by name and labels; and the
//! process gauges, read when scraped.

use std::sync::atomic::{AtomicU64, Ordering};

use onecard_core::model::{Reason, Scenario};

/// Registering every (scenario, reason) pair up front also means each
/// series exists from the start at zero, which is what `rate()` and alerts
/// want.
pub struct HotMetrics {
    decisions: Vec<metrics::Counter>,
    latency: Vec<metrics::Histogram>,
    pub decide_latency: metrics::Histogram,
    pub replays: metrics::Counter,
    /// Cluster mode: requests decided again after losing a race for their
    /// card to another node.
    pub cluster_retries: metrics::Counter,
}

impl HotMetrics {
    pub fn new() -> HotMetrics {
        let mut decisions = Vec::with_capacity(Scenario::ALL.len() * Reason::ALL.len());
        for s in Scenario::ALL {
            for r in Reason::ALL {
                let decision = if *r == Reason::Ok {
                    "approve"
                } else {
                    "decline"
                };
                decisions.push(metrics::counter!("onecard_decisions_total", "scenario" => s.as_str(), "decision" => decision, "reason" => r.code()));
            }
        }
        let latency = Scenario::ALL
            .iter()
            .map(|s| metrics::histogram!("onecard_authorize_latency_seconds", "scenario" => s.as_str()))
            .collect();
        HotMetrics {
            decisions,
            latency,
            decide_latency: metrics::histogram!("onecard_decide_latency_seconds"),
            replays: metrics::counter!("onecard_idempotent_replays_total"),
            cluster_retries: metrics::counter!("onecard_cluster_retries_total"),
        }
    }

    pub fn decision(&self, s: Scenario, r: Reason) -> &metrics::Counter {
        &self.decisions[s as usize * Reason::ALL.len() + r as usize]
    }

    pub fn latency(&self, s: Scenario) -> &metrics::Histogram {
        &self.latency[s as usize]
    }
}

impl Default for HotMetrics {
    fn default() -> Self {
        HotMetrics::new()
    }
}

/// Updates the process gauges; called before each scrape, so that they cost
/// nothing in between.
pub fn publish_process() {
    if let Some(b) = resident_bytes() {
        metrics::gauge!("onecard_process_resident_bytes").set(b as f64);
    }
    if let Some(n) = open_fds() {
        metrics::gauge!("onecard_process_open_fds").set(n as f64);
    }
    if let Some(h) = native_heap() {
        metrics::gauge!("onecard_process_native_heap_bytes", "state" => "in_use")
            .set(h.in_use as f64);
        metrics::gauge!("onecard_process_native_heap_bytes", "state" => "free").set(h.free as f64);
    }
}

/// The C library's heap, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct NativeHeap {
    /// Allocated and not freed: small blocks in the heaps and large ones
    /// in their own mappings.
    pub in_use: u64,
    /// Freed but kept by the allocator for reuse (not returned to the
    /// system): fragmentation shows here.
    pub free: u64,
}

/// Where the C library's heap is read from: set by the binary, which may
/// call the C library (this crate forbids `unsafe`); none in tests.
static NATIVE_HEAP: std::sync::OnceLock<fn() -> Option<NativeHeap>> = std::sync::OnceLock::new();

/// Sets how [`native_heap`] reads the C library's heap (once; later calls
/// are ignored).
pub fn set_native_heap_probe(probe: fn() -> Option<NativeHeap>) {
    let _ = NATIVE_HEAP.set(probe);
}

/// glibc's heap, which only RocksDB's C++ allocates from (the gateway's
/// own allocations go to mimalloc). Beside `onecard_store_memory_bytes`
/// (what RocksDB counts itself) it tells a soak's growth apart: `in_use`
/// rising while RocksDB's count is flat is memory RocksDB holds without
/// counting; `free` rising is fragmentation.
pub fn native_heap() -> Option<NativeHeap> {
    NATIVE_HEAP.get().and_then(|probe| probe())
}

/// File descriptors the process holds (`/proc/self/fd`): a leak of
/// connections or files shows as a slope in a soak.
pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// The process's resident memory from `/proc/self/status` (`VmRSS`), where
/// there is one.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

static STARTUP_US: AtomicU64 = AtomicU64::new(0);

/// Records how long the last start took, for `/admin/v1/status` and metrics.
pub fn set_startup(d: std::time::Duration) {
    STARTUP_US.store(d.as_micros() as u64, Ordering::Relaxed);
    metrics::gauge!("onecard_startup_seconds").set(d.as_secs_f64());
}

pub fn startup_seconds() -> f64 {
    STARTUP_US.load(Ordering::Relaxed) as f64 / 1e6
}
