//! One plain transit approval through the gateway's service layer, in
//! process on a real RocksDB (async durability, so the figure is the CPU's
//! and not the disk's `fdatasync`): from the decoded request to the
//! encoded answer, i.e. idempotency, the credential, the facts, the
//! decision, the journal record, the commit to the writer thread and its
//! wait, and the answer's bytes.
//!
//! Two figures: its time (Criterion, `approval/transit_tap`) and its heap
//! allocations, counted by a counting global allocator over many
//! approvals and printed before the benches run (also in `cargo test
//! --all-targets`, which runs each bench once). RocksDB's own C++
//! allocations go to the C library's malloc and are not counted: the
//! count is the gateway's Rust code, the part a change here can take down.
//!
//! `cargo bench --bench approval` (figures in docs/performance.md).
//! `ALLOC_SITES=1 cargo bench --bench approval` also prints where the
//! counted allocations come from: each site's allocations per approval,
//! with the stack that made them (function names only: release builds
//! keep symbols, not line tables).

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, Criterion};
use onecard::config::Config;
use onecard::service::gateway::Gateway;
use onecard_core::model::{Card, CardNo, CardStatus, Function};
use onecard_core::time::SystemClock;
use onecard_core::wire::{parse_authorize, AuthorizeRequest};

/// Counts every allocation (and reallocation) of the process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

/// While set, every allocation also records its stack (`ALLOC_SITES=1`).
static TRACING: AtomicBool = AtomicBool::new(false);
/// The stacks recorded, with each allocation's size.
static SITES: Mutex<Vec<(usize, Backtrace)>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while this thread records a stack: recording allocates, and
    /// those allocations are the tracer's, not the approval's.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

/// Records the stack of an allocation of `size` bytes when tracing.
fn trace(size: usize) {
    if !TRACING.load(Ordering::Relaxed) {
        return;
    }
    let _ = RECORDING.try_with(|recording| {
        if recording.replace(true) {
            return;
        }
        let stack = Backtrace::force_capture();
        SITES.lock().unwrap().push((size, stack));
        recording.set(false);
    });
}

/// Whether an allocation is the tracer's own (not counted).
fn recording() -> bool {
    RECORDING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call is passed on unchanged to the system allocator, which
// upholds GlobalAlloc's contract; the counters are only added to.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the system's) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Counts one allocation of `size` bytes, unless it is the tracer's own.
fn count(size: usize) {
    if recording() {
        return;
    }
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    ALLOCATED_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    trace(size);
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Cards enrolled, each used once per round of requests.
const CARDS: u32 = 20_000;

struct Setup {
    gw: Arc<Gateway>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&format!(
        "data_dir = {:?}\n[terminal]\naddr = \"127.0.0.1:0\"\ndev_certs = true\n[admin]\naddr = \"127.0.0.1:0\"\n[journal]\ndurability = \"async\"\n[policy]\ncard_daily_spend_max_fen = 1000000000\n",
        dir.path().join("data")
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gw = Arc::new(Gateway::open(config, Arc::new(SystemClock)).unwrap());
    rt.block_on(async {
        for i in 0..CARDS {
            let card = Card::new(
                CardStatus::Active,
                &[Function::Transit, Function::Financial],
                &[],
            );
            gw.put_card(&card_no(i), card).await.unwrap();
        }
    });
    Setup { gw, rt, _dir: dir }
}

fn card_no(i: u32) -> CardNo {
    CardNo::parse(&format!("500118A{i:08}")).unwrap()
}

/// The request of approval `n`: a new event id, the next card, and a
/// line of its own for each round of the cards (no anti-passback decline).
fn request(n: u64) -> AuthorizeRequest {
    let body = format!(
        r#"{{"event_id":"bus-0042-{n:012}","kind":"tap","card_no":"500118A{:08}","scenario":"transit","amount_fen":200,"site":"line-{}"}}"#,
        n % CARDS as u64,
        n / CARDS as u64,
    );
    parse_authorize(body.as_bytes()).unwrap()
}

/// Heap allocations (and bytes) per approval, over `n` approvals whose
/// requests were decoded beforehand.
fn allocations_per_approval(s: &Setup, first: u64, n: u64) -> (f64, f64) {
    let requests: Vec<AuthorizeRequest> = (first..first + n).map(request).collect();
    let now = s.gw.now_ms();
    let (a0, b0) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    s.rt.block_on(async {
        for req in &requests {
            let answer = s.gw.authorize("term-00001", req, now).await.unwrap();
            // Checked in release builds too (a search, no allocation): the
            // count is of approvals, not of declines.
            assert!(answer.windows(9).any(|w| w == b"\"approve\""));
            black_box(answer);
        }
    });
    let (a1, b1) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    drop(requests);
    ((a1 - a0) as f64 / n as f64, (b1 - b0) as f64 / n as f64)
}

/// Prints where the allocations of `n` approvals come from, most frequent
/// first: allocations per approval, bytes, and the stack's first frames
/// past the allocator.
fn print_sites(s: &Setup, first: u64, n: u64) {
    let requests: Vec<AuthorizeRequest> = (first..first + n).map(request).collect();
    let now = s.gw.now_ms();
    TRACING.store(true, Ordering::Relaxed);
    s.rt.block_on(async {
        for req in &requests {
            black_box(s.gw.authorize("term-00001", req, now).await.unwrap());
        }
    });
    TRACING.store(false, Ordering::Relaxed);
    drop(requests);
    let sites = std::mem::take(&mut *SITES.lock().unwrap());
    // By stack and size: inlined frames do not show, and the size tells
    // apart allocations whose stacks look alike.
    let mut by_site: HashMap<(String, usize), u64> = HashMap::new();
    for (size, stack) in &sites {
        *by_site.entry((frames(stack), *size)).or_default() += 1;
    }
    let mut rows: Vec<_> = by_site.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for ((stack, size), allocations) in rows {
        println!(
            "{:.2} per approval, {size} bytes:\n{stack}",
            allocations as f64 / n as f64,
        );
    }
}

/// The first frames of an allocation's stack past the allocator and the
/// tracer, one per line, without the symbols' hashes.
fn frames(stack: &Backtrace) -> String {
    const SKIP: [&str; 7] = [
        "std::backtrace",
        "approval::trace",
        "approval::count",
        "Counting",
        "__rust_",
        "__rg_",
        "alloc::alloc::",
    ];
    format!("{stack}")
        .lines()
        .filter_map(|line| {
            let (number, name) = line.trim().split_once(": ")?;
            number.parse::<u32>().ok()?;
            Some(name)
        })
        .filter(|name| !SKIP.iter().any(|skip| name.contains(skip)))
        .take(10)
        .map(|name| {
            let name = match name.rfind("::h") {
                Some(i) if name.len() - i == 19 => &name[..i],
                _ => name,
            };
            format!("    {name}\n")
        })
        .collect()
}

fn bench_approval(c: &mut Criterion) {
    let s = setup();
    // Every answer is an approval: checked once here, where it is cheap.
    let first =
        s.rt.block_on(s.gw.authorize("term-00001", &request(0), s.gw.now_ms()))
            .unwrap();
    assert!(
        first.windows(9).any(|w| w == b"\"approve\""),
        "not an approval: {}",
        String::from_utf8_lossy(&first)
    );
    // Warm: the tables' maps, the runtime's and the journal's buffers.
    let _ = allocations_per_approval(&s, 1, 2_000);
    let (allocs, bytes) = allocations_per_approval(&s, 2_001, 5_000);
    println!(
        "approval/transit_tap: {allocs:.1} heap allocations ({bytes:.0} bytes) per approval, decoded request to encoded answer"
    );
    if std::env::var_os("ALLOC_SITES").is_some() {
        print_sites(&s, 8_001, 200);
    }
    // Every await moves nothing, but the future itself is moved whole
    // (into the route's future, the connection's dispatcher): its size is
    // what each move copies.
    let req = request(9_999);
    let future = s.gw.authorize("term-00001", &req, s.gw.now_ms());
    println!(
        "approval/transit_tap: the authorize future is {} bytes",
        std::mem::size_of_val(&future)
    );
    drop(future);
    let mut n = 10_000u64;
    c.bench_function("approval/transit_tap", |b| {
        b.iter_batched(
            || {
                n += 1;
                request(n)
            },
            |req| {
                s.rt.block_on(s.gw.authorize("term-00001", &req, s.gw.now_ms()))
                    .unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench_approval);
criterion_main!(benches);
