//! Settlement: approved events, forwarded after the answer in signed
//! batches to the downstream systems (transport, medical, payment), each
//! booked once (issue 4, DESIGN.md "After the answer").
//!
//! Built so far: [`batch`], the pure core that turns journal records into
//! the batches a sink receives (routing by scenario, sealing by count,
//! bytes and age, deterministic ids, totals); [`sign`], the batch
//! signatures a receiver checks; [`retry`], backoff with jitter and the
//! circuit breaker; and [`receiver`], a real downstream receiver
//! (`onecard sink-sim`) to deliver to. Not built yet, so nothing
//! here is wired into the gateway: the per-sink cursor and batch state in
//! RocksDB, the HTTPS delivery with retries, circuit and parking,
//! reversals and the operators' API.

pub mod batch;
pub mod receiver;
pub mod retry;
pub mod sign;
