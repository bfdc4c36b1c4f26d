//! Test-only fault hook: lets the fault-injection tests (tests/tests/faults.rs) stop the
//! operator right after a phase succeeded, before it moves the migration on, so that a
//! real kill lands there. Compiled in only with the cargo feature `fault-hooks`, which
//! the tests crate turns on (so `cargo build --workspace` has it; `cargo build -p
//! ferry-operator`, e.g. a release build of the operator alone, does not): without it
//! [`pause`] returns at once, reading no environment. With it, a no-op unless
//! `FERRY_FAULT_PAUSE` is set; never set it in production.
//!
//! `FERRY_FAULT_PAUSE=after-<phase>` (e.g. `after-begin`) names the point; at it the
//! operator writes `$FERRY_FAULT_DIR/<point>.paused` and waits until
//! `$FERRY_FAULT_DIR/<point>.release` exists (or until it is killed). It pauses once per
//! process.

#[cfg(feature = "fault-hooks")]
pub use on::pause;

#[cfg(not(feature = "fault-hooks"))]
pub use off::pause;

/// The hook, with the `fault-hooks` feature.
#[cfg(feature = "fault-hooks")]
mod on {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    static FIRED: AtomicBool = AtomicBool::new(false);

    /// Pauses at `point` if `FERRY_FAULT_PAUSE` names it.
    pub async fn pause(point: &str) {
        if std::env::var("FERRY_FAULT_PAUSE").ok().as_deref() != Some(point)
            || FIRED.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let dir = PathBuf::from(std::env::var_os("FERRY_FAULT_DIR").unwrap_or_else(|| ".".into()));
        tracing::warn!(point, "test fault hook: pausing");
        let _ = std::fs::write(
            dir.join(format!("{point}.paused")),
            std::process::id().to_string(),
        );
        let release = dir.join(format!("{point}.release"));
        while !release.exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(point, "test fault hook: released");
    }
}

/// Without the `fault-hooks` feature: the same function, doing nothing.
#[cfg(not(feature = "fault-hooks"))]
mod off {
    /// Returns at once (no `fault-hooks` feature).
    pub async fn pause(_point: &str) {}
}
