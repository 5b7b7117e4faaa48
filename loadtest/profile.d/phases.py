#!/usr/bin/env python3
"""Sorts folded perf stacks of the gateway into a request's phases.

Reads folded stacks (`thread;root;...;leaf weight`, inferno-collapse-perf
--all: kernel frames end in `_[k]`; a cpu-clock sample weighs its period
in nanoseconds) on stdin; prints a Markdown table of
the gateway's CPU per phase, and writes the same as JSON with --json.

A sample belongs to the phase of the frame nearest its leaf that names a
phase (so serde_json under `parse_authorize` is JSON decode, and ring's
AES under rustls is TLS). Allocator and kernel frames name no phase: their
time goes to the phase that called them, and is also reported across all
phases (the two "of which" rows). Threads that serve no request (the
journal writer, RocksDB's flush and compaction threads) are their own rows.
"""

import argparse
import json
import re
import sys

# (phase, frame pattern), in the order they are tried on each frame. The
# patterns anchor on our own functions where one marks the phase, and on
# the libraries for TLS, HTTP and the runtime.
PHASES = [
    ("JSON decode", r"onecard_core::wire::(parse_|validate_|RawAuthorize|parse_object)|serde_json::de::"),
    ("answer encode", r"AuthorizeAnswer|onecard_core::wire::.*answer|serde_json::ser::"),
    ("journal record encode", r"onecard_core::record::|store::cards::encode|store::idem::(encode|Tail)"),
    ("idempotency", r"service::idempotency|pipeline::<impl onecard::service::gateway::Gateway>::begin|store::idem::"),
    ("credential", r"service::credential"),
    ("decide (rules, card state, facts)", r"onecard_core::authz|onecard_core::scenario|decide_authorize|authorize::<impl onecard::service::gateway::Gateway>::(gather|authorized|check_authorize)|store::cards::|store::denylist::|store::venues::"),
    ("commit: submit and wait", r"store::journal::Journal|store::durable::|pipeline::<impl onecard::service::gateway::Gateway>::(decide_and_commit|answered)"),
    ("metrics and SRE windows", r"\bmetrics::|metrics_exporter_prometheus|metrics_util|service::stats|onecard_core::window|hdrhistogram"),
    ("logging", r"\btracing::|tracing_core|tracing_subscriber"),
    ("phase timing (Server-Timing)", r"service::timing"),
    ("admission and limits", r"http::admission"),
    # The pipeline's async functions are inlined into the route's future:
    # what is left under these frames is their own glue (state machines
    # moved and polled, the answer's response built), not a named phase.
    ("request handler glue (our async code inlined into the route)", r"onecard::http::ingress::(authorize|terminal_request|ConnActivity|run_tls_listener)|onecard::service::"),
    ("TLS (rustls, ring)", r"rustls|\bring::|ring_core_|aes_hw|aes_nohw|gcm_|chacha20|poly1305|x25519|ecp_nistz256|sha256_block|sha512_block|bn_mul|GFp_"),
    ("HTTP (hyper, h2, route)", r"\bhyper::|\bh2::|hyper_util|\bhttp::|http_body|http::ingress|http::routes"),
    ("socket reads and writes", r"tokio::net::|tokio::io::|\bmio::|__libc_(send|recv|write|read)|\b__send\b|\b__recv\b|\b(write|read|writev|readv|sendmsg|recvmsg|sendto|recvfrom)\b"),
    ("runtime (tokio: scheduling, wake-ups, timers)", r"tokio::runtime|tokio::sync|tokio::time|parking_lot|std::thread|futex|epoll_wait|\bsyscall\b|sched_yield"),
]
COMPILED = [(name, re.compile(p)) for name, p in PHASES]

MEMCPY = re.compile(r"memcpy|memmove")
ALLOCATOR = re.compile(r"\bmi_|_mi_|mimalloc|\bmalloc\b|\bfree\b|\brealloc\b|__rust_(alloc|dealloc|realloc)|alloc::alloc::|_int_malloc|_int_free|cfree")
KERNEL = re.compile(r"_\[k\]$")


def thread_row(thread):
    if thread.startswith("journal-writer"):
        return "journal writer thread (group commit: RocksDB write, WAL, fdatasync)"
    if thread.startswith("rocksdb"):
        return "RocksDB background threads (flush, compaction)"
    return None


def phase_of(frames):
    """The phase of one sample: frames are root first, leaf last."""
    for frame in reversed(frames):
        if KERNEL.search(frame) or ALLOCATOR.search(frame):
            continue
        for name, pattern in COMPILED:
            if pattern.search(frame):
                return name
    return "other (unattributed)"


def leaf_is(frames, pattern):
    """Whether the sample's leaf-most frames are of `pattern` (the time is
    spent inside it, whoever called it)."""
    return bool(frames) and bool(pattern.search(frames[-1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--load", default="")
    ap.add_argument("--mode", default="")
    a = ap.parse_args()
    totals = {}
    allocator = kernel = memcpy = total = 0
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        row = thread_row(thread) or phase_of(frames)
        totals[row] = totals.get(row, 0) + n
        total += n
        # Allocator time: the leaf in the allocator (user space), or in
        # the kernel under it (page faults of a fresh span).
        user = [f for f in frames if not KERNEL.search(f)]
        if user and ALLOCATOR.search(user[-1]):
            allocator += n
        if frames and KERNEL.search(frames[-1]):
            kernel += n
        if user and MEMCPY.search(user[-1]):
            memcpy += n
    if total == 0:
        sys.exit("no samples")
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    # inferno weighs each sample by its period: cpu-clock counts nanoseconds.
    secs = lambda n: n / 1e9
    print(f"Gateway ({a.mode}): {secs(total):.2f} s of CPU sampled" + (f"; load: {a.load}" if a.load else ""))
    print()
    print("| phase | share of the gateway's CPU | CPU seconds |")
    print("|---|---:|---:|")
    for name, n in rows:
        print(f"| {name} | {100.0 * n / total:.1f} % | {secs(n):.2f} |")
    for what, n in [
        ("in the kernel (TCP, syscalls, page faults)", kernel),
        ("in the heap allocator", allocator),
        ("copying memory (memcpy: buffers, futures moved)", memcpy),
    ]:
        print(f"| *of which {what}, across phases* | {100.0 * n / total:.1f} % | {secs(n):.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "mode": a.mode,
                    "load": a.load,
                    "samples": total,
                    "phases": [{"phase": k, "samples": v, "share": v / total} for k, v in rows],
                    "kernel_share": kernel / total,
                    "allocator_share": allocator / total,
                    "memcpy_share": memcpy / total,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
