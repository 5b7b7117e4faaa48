//! Settlement: approved events, forwarded after the answer in signed
//! batches to the downstream systems (transport, medical, payment), each
//! booked once (issue 4, DESIGN.md "After the answer").
//!
//! Built so far: [`batch`], the pure core that turns journal records into
//! the batches a sink receives (routing by scenario, sealing by count,
//! bytes and age, deterministic ids, totals); [`sign`], the batch
//! signatures a receiver checks; [`retry`], backoff with jitter and the
//! circuit breaker; [`receiver`], a real downstream receiver
//! (`onecard sink-sim`) to deliver to; and [`deliver`], one task per
//! configured sink (`[[settlement.sinks]]`) that follows the journal from a
//! durable cursor, stores sealed batches before sending them, and forgets
//! them on a matching acknowledgement (retries with backoff, a circuit,
//! parking), with [`status`] shared with the operators' API (status,
//! parked batches, replay, pause and resume). Not built yet: reversals, the
//! daily report, the readiness warning on a growing backlog, and the seeded
//! simulation test.

pub mod batch;
pub mod deliver;
pub mod receiver;
pub mod retry;
pub mod sign;
pub mod status;
