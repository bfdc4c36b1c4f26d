//! Test-only fault hook, shared by the operator and the agent: lets the fault tests
//! (tests/tests/faults.rs, tests/tests/api_faults.rs, tests/tests/soak_chaos.rs) stop a
//! process at a precise point of a migration, so that a real kill, cut or API fault lands
//! there. Compiled in only with the cargo feature `fault-hooks`, which the tests crate
//! turns on through the agent's and the operator's features of that name (so
//! `cargo build --workspace` has it; `cargo build -p ferry-agent`, e.g. a release build
//! of one binary alone, does not): without it [`pause`] and [`pause_blocking`] return at
//! once, reading no environment. With it they do nothing unless one of the variables
//! below is set; never set them in production.
//!
//! - `FERRY_FAULT_PAUSE=<point>`: at that point the process pauses, once per process (the
//!   matrices start the process with it for each row).
//! - `FERRY_FAULT_ARM=<file>`: the process pauses at the point the file names, each time
//!   the test writes the file (the chaos soak's processes live through many
//!   migrations). At a point, the process claims the file by removing it, and only if it
//!   names that point.
//!
//! To pause, the process writes `$FERRY_FAULT_DIR/<point>.paused` (its pid) and waits
//! until `$FERRY_FAULT_DIR/<point>.release` exists (or until it is killed). Once released
//! by an armed file it removes both markers, so that the next arming starts clean.

/// The variable naming the point to pause at, once per process.
pub const PAUSE_VAR: &str = "FERRY_FAULT_PAUSE";
/// The variable naming the file that arms the next pause.
pub const ARM_VAR: &str = "FERRY_FAULT_ARM";
/// The directory of the marker files.
pub const DIR_VAR: &str = "FERRY_FAULT_DIR";

/// The directory of the marker files: `FERRY_FAULT_DIR`, or the working directory.
pub fn dir() -> std::path::PathBuf {
    std::env::var_os(DIR_VAR)
        .unwrap_or_else(|| ".".into())
        .into()
}

#[cfg(feature = "fault-hooks")]
pub use on::{pause, pause_blocking};

#[cfg(not(feature = "fault-hooks"))]
pub use off::{pause, pause_blocking};

/// The hooks, with the `fault-hooks` feature.
#[cfg(feature = "fault-hooks")]
mod on {
    use super::{ARM_VAR, PAUSE_VAR, dir};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    static FIRED: AtomicBool = AtomicBool::new(false);

    /// Where a pause at a point waits.
    struct Markers {
        paused: PathBuf,
        release: PathBuf,
        /// Whether to remove the markers once released (an armed file's pause).
        clean: bool,
    }

    /// The marker files of `point`, if the process is to pause there now.
    fn armed(point: &str) -> Option<Markers> {
        let once = std::env::var(PAUSE_VAR).ok().as_deref() == Some(point)
            && !FIRED.swap(true, Ordering::SeqCst);
        let by_file = !once && claim(point);
        if !once && !by_file {
            return None;
        }
        let dir = dir();
        tracing::warn!(point, "test fault hook: pausing");
        let paused = dir.join(format!("{point}.paused"));
        let _ = std::fs::write(&paused, std::process::id().to_string());
        Some(Markers {
            paused,
            release: dir.join(format!("{point}.release")),
            clean: by_file,
        })
    }

    /// Whether the armed file names `point`; if so it is removed, so it fires once.
    fn claim(point: &str) -> bool {
        let Some(file) = std::env::var_os(ARM_VAR).map(PathBuf::from) else {
            return false;
        };
        std::fs::read_to_string(&file).is_ok_and(|s| s.trim() == point)
            && std::fs::remove_file(&file).is_ok()
    }

    fn released(m: &Markers, point: &str) {
        if m.clean {
            let _ = std::fs::remove_file(&m.release);
            let _ = std::fs::remove_file(&m.paused);
        }
        tracing::warn!(point, "test fault hook: released");
    }

    /// Pauses at `point` if the process is armed for it.
    pub async fn pause(point: &str) {
        if let Some(m) = armed(point) {
            while !m.release.exists() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            released(&m, point);
        }
    }

    /// [`pause`] for synchronous code (a progress callback); blocks the calling thread, off
    /// the async runtime's workers.
    pub fn pause_blocking(point: &str) {
        if let Some(m) = armed(point) {
            let wait = || {
                while !m.release.exists() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::task::block_in_place(wait),
                Err(_) => wait(),
            }
            released(&m, point);
        }
    }
}

/// Without the `fault-hooks` feature: the same functions, doing nothing.
#[cfg(not(feature = "fault-hooks"))]
mod off {
    /// Returns at once (no `fault-hooks` feature).
    pub async fn pause(_point: &str) {}

    /// Returns at once (no `fault-hooks` feature).
    pub fn pause_blocking(_point: &str) {}
}
