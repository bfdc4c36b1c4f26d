//! Test-only fault hooks of the agent: the pauses of [`ferry_runtime::fault`] (shared
//! with the operator; how they are armed is said there), and a relay address to
//! advertise. Compiled in only with the cargo feature `fault-hooks`, which the tests
//! crate turns on (so `cargo build --workspace` has them; `cargo build -p ferry-agent`,
//! e.g. a release build of the agent alone, does not): without it [`pause`] and
//! [`pause_blocking`] return at once and [`advertised_uri`] returns its argument, reading
//! no environment. Never set their variables in production.
//!
//! `FERRY_FAULT_ADVERTISE=<ip>:<port>` makes Prepare advertise that address (a relay the
//! test owns, which it can close to cut the stream) instead of the one QEMU listens on;
//! the real URI goes to `$FERRY_FAULT_DIR/migration-target`.

pub use ferry_runtime::fault::{DIR_VAR, PAUSE_VAR, pause, pause_blocking};

/// The relay address Prepare advertises instead of its own.
pub const ADVERTISE_VAR: &str = "FERRY_FAULT_ADVERTISE";

/// The migration URI Prepare advertises: `uri` itself, unless `FERRY_FAULT_ADVERTISE`
/// names a relay (then the real URI is left for the relay in the fault directory, and
/// the relay is advertised in the URI's scheme: `tcp:` direct, `tunnel:` tunnelled).
#[cfg(feature = "fault-hooks")]
pub fn advertised_uri(uri: &str) -> String {
    let Ok(relay) = std::env::var(ADVERTISE_VAR) else {
        return uri.to_string();
    };
    let _ = std::fs::write(ferry_runtime::fault::dir().join("migration-target"), uri);
    tracing::warn!(%relay, real = uri, "test fault hook: advertising a relay");
    let scheme = if uri.starts_with(crate::stream::TUNNEL_SCHEME) {
        crate::stream::TUNNEL_SCHEME
    } else {
        "tcp:"
    };
    format!("{scheme}{relay}")
}

/// `uri` itself (no `fault-hooks` feature).
#[cfg(not(feature = "fault-hooks"))]
pub fn advertised_uri(uri: &str) -> String {
    uri.to_string()
}
