//! Test-only fault hook: lets the fault-injection tests (tests/tests/faults.rs) stop this
//! process at a precise point of a migration, so that a real kill or cut lands there.
//! Compiled in only with the cargo feature `fault-hooks`, which the tests crate turns on
//! (so `cargo build --workspace` has it; `cargo build -p ferry-agent`, e.g. a release
//! build of the agent alone, does not): without it [`pause`] and [`pause_blocking`]
//! return at once and [`advertised_uri`] returns its argument, reading no environment.
//! With it they are a no-op unless `FERRY_FAULT_PAUSE` is set; never set it in production.
//!
//! `FERRY_FAULT_PAUSE=<point>` names the point; at it the process writes
//! `$FERRY_FAULT_DIR/<point>.paused` and waits until `$FERRY_FAULT_DIR/<point>.release`
//! exists (or until it is killed). It pauses once per process.
//! `FERRY_FAULT_ADVERTISE=<ip>:<port>` makes Prepare advertise that address (a relay the
//! test owns, which it can close to cut the stream) instead of the one QEMU listens on;
//! the real URI goes to `$FERRY_FAULT_DIR/migration-target`.

/// The variable naming the point to pause at.
pub const PAUSE_VAR: &str = "FERRY_FAULT_PAUSE";
/// The directory of the marker files.
pub const DIR_VAR: &str = "FERRY_FAULT_DIR";
/// The relay address Prepare advertises instead of its own.
pub const ADVERTISE_VAR: &str = "FERRY_FAULT_ADVERTISE";

#[cfg(feature = "fault-hooks")]
pub use on::{advertised_uri, pause, pause_blocking};

#[cfg(not(feature = "fault-hooks"))]
pub use off::{advertised_uri, pause, pause_blocking};

/// The hooks, with the `fault-hooks` feature.
#[cfg(feature = "fault-hooks")]
mod on {
    use super::{ADVERTISE_VAR, DIR_VAR, PAUSE_VAR};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    static FIRED: AtomicBool = AtomicBool::new(false);

    /// The marker files of `point`, if the process is to pause there (the first time only).
    fn armed(point: &str) -> Option<(PathBuf, PathBuf)> {
        if std::env::var(PAUSE_VAR).ok().as_deref() != Some(point)
            || FIRED.swap(true, Ordering::SeqCst)
        {
            return None;
        }
        let dir = PathBuf::from(std::env::var_os(DIR_VAR).unwrap_or_else(|| ".".into()));
        tracing::warn!(point, "test fault hook: pausing");
        let _ = std::fs::write(
            dir.join(format!("{point}.paused")),
            std::process::id().to_string(),
        );
        Some((dir.join(format!("{point}.release")), dir))
    }

    /// Pauses at `point` if `FERRY_FAULT_PAUSE` names it.
    pub async fn pause(point: &str) {
        if let Some((release, _)) = armed(point) {
            while !release.exists() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tracing::warn!(point, "test fault hook: released");
        }
    }

    /// [`pause`] for synchronous code (a progress callback); blocks the calling thread, off
    /// the async runtime's workers.
    pub fn pause_blocking(point: &str) {
        if let Some((release, _)) = armed(point) {
            let wait = || {
                while !release.exists() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::task::block_in_place(wait),
                Err(_) => wait(),
            }
            tracing::warn!(point, "test fault hook: released");
        }
    }

    /// The migration URI Prepare advertises: `uri` itself, unless `FERRY_FAULT_ADVERTISE`
    /// names a relay (then the real URI is left for the relay in the fault directory).
    pub fn advertised_uri(uri: &str) -> String {
        let Ok(relay) = std::env::var(ADVERTISE_VAR) else {
            return uri.to_string();
        };
        let dir = PathBuf::from(std::env::var_os(DIR_VAR).unwrap_or_else(|| ".".into()));
        let _ = std::fs::write(dir.join("migration-target"), uri);
        tracing::warn!(%relay, real = uri, "test fault hook: advertising a relay");
        format!("tcp:{relay}")
    }
}

/// Without the `fault-hooks` feature: the same functions, doing nothing.
#[cfg(not(feature = "fault-hooks"))]
mod off {
    /// Returns at once (no `fault-hooks` feature).
    pub async fn pause(_point: &str) {}

    /// Returns at once (no `fault-hooks` feature).
    pub fn pause_blocking(_point: &str) {}

    /// `uri` itself (no `fault-hooks` feature).
    pub fn advertised_uri(uri: &str) -> String {
        uri.to_string()
    }
}
