//! The log level, changed while the gateway runs (`PUT /admin/v1/log`):
//! an SRE turns on `debug` for one module during an incident and back off,
//! without a restart that would drop terminals' connections. The app layer
//! sets the logs up and hands the level's switch over here.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// The switch of the level filter the logs were set up with.
pub type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

static FILTER: OnceLock<(FilterHandle, parking_lot::Mutex<String>)> = OnceLock::new();

/// Called once by the app layer when it sets up the logs at `level`.
pub fn install(handle: FilterHandle, level: String) {
    let _ = FILTER.set((handle, parking_lot::Mutex::new(level)));
}

/// The level now, if this process's logs were set up by the gateway.
pub fn level() -> Option<String> {
    FILTER.get().map(|(_, l)| l.lock().clone())
}

/// Why the level cannot be changed.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error(
        "`level` is not a valid filter: {0} (e.g. \"info\" or \"warn,onecard::service=debug\")"
    )]
    Invalid(String),
    #[error(
        "this process's logs were not set up by the gateway; their level cannot be changed here"
    )]
    NotOurs,
}

/// Changes the level without a restart; returns the level before.
pub fn set_level(level: &str) -> Result<String, LevelError> {
    let filter = EnvFilter::try_new(level).map_err(|e| LevelError::Invalid(e.to_string()))?;
    let (handle, now) = FILTER.get().ok_or(LevelError::NotOurs)?;
    // Held across the reload: two changes at once leave the level shown
    // and the level in force the same.
    let mut now = now.lock();
    handle.reload(filter).map_err(|_| LevelError::NotOurs)?;
    let before = std::mem::replace(&mut *now, level.to_owned());
    drop(now);
    // `filter`, not `level`: JSON lines already have a `level` key.
    tracing::warn!(filter = level, before, "log level changed by an operator");
    Ok(before)
}
