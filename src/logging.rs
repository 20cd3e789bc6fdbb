//! Logging with tracing to stderr, set up in the master before any fork. The subscriber writes
//! synchronously (no background thread), so forked children inherit a working logger.

use tracing_subscriber::EnvFilter;

/// `RUST_LOG` wins over `level` when it is set.
pub fn init(level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v).map_err(|e| format!("invalid RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(level).map_err(|e| format!("invalid log_level {level:?}: {e}"))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}
