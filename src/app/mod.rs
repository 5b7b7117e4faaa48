//! The application: [`server`] starts the store, the services, the
//! listeners and the background tasks in order and stops them in reverse;
//! [`telemetry`] installs the metrics recorder and the log subscriber;
//! [`demo`] is the walk-through `scripts/run` shows; [`sink_sim`] is the
//! settlement receiver behind `onecard sink-sim`.

pub mod demo;
pub mod server;
pub mod sink_sim;
pub mod telemetry;
