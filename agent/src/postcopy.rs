//! Post-copy recovery. Once a migration has switched to post-copy, the guest's memory is
//! split between the two QEMUs: a cut stream cannot be rolled back (the pages the target
//! touched since the switch exist only there, and QEMU neither cancels a paused
//! post-copy on the source nor resumes the source guest) and must be recovered. Both QEMUs then sit in status `postcopy-paused` until
//! 1. the target listens again: [`listen_again`] (`migrate-recover {uri}`), and
//! 2. the source resumes to it: [`resume`] (`migrate {uri, resume: true}`), from Perform,
//!
//! after which both go `postcopy-recover` → `postcopy-active` → `completed`. A resume that
//! cannot connect (the path is still down) leaves the source paused: Perform tries again
//! every [`RESUME_EVERY`]. No capability is needed beyond `postcopy-ram`, which both
//! sides already have for any migration that can switch to post-copy.
//!
//! Transport security: the TLS objects and parameters (`tls-creds`, `tls-authz` on the
//! target, `tls-creds`, `tls-hostname` on the source; see [`crate::tls`]) set before the
//! transfer stay in both QEMUs while post-copy is paused (they are removed only after
//! the migration completed, in Finish, or in a cancelled Confirm), so the recovered
//! channel is encrypted and its peer checked exactly as the first one was. A tunnelled
//! stream ([`crate::stream`]) is recovered the same way through the agents: the target
//! listens again on its incoming socket, and the source resumes to its tunnel socket,
//! whose agent opens a new peer connection for it.

use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::{Phase, check_vm_name};
use crate::qmp::{MigrationInfo, Qmp, QmpError};
use crate::stream::{self, Listen};
use crate::supervisor::Supervisor;
use serde_json::json;
use std::time::Duration;

/// QEMU's status of a post-copy migration whose stream broke.
pub const PAUSED: &str = "postcopy-paused";
/// How often a paused source tries to resume to the target's recovery URI.
pub const RESUME_EVERY: Duration = Duration::from_secs(2);
/// How long a target that listened again waits for the source before it listens anew
/// (on a fresh port), in case its listener was used up by an attempt that failed.
pub const RELISTEN_AFTER: Duration = Duration::from_secs(20);

/// What the target reports to a source whose post-copy stream it holds the other half
/// of (through the migration's status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetReport {
    /// Where the target listens again after a cut (`status.recoveryURI`).
    pub listens_at: Option<String>,
    /// Why the target can never take the stream back: its QEMU, holding the guest's
    /// state since the switch, is gone (`status.targetLost`).
    pub lost: Option<String>,
}

/// Whether `status` (of `query-migrate`) is a migration that switched to post-copy and
/// has not ended: neither side can give the guest back to the source any more.
pub fn in_post_copy(status: Option<&str>) -> bool {
    status.is_some_and(|s| s.starts_with("postcopy"))
}

/// Whether `status` (of `query-migrate`) is a paused post-copy.
pub fn is_paused(status: Option<&str>) -> bool {
    status == Some(PAUSED)
}

/// Whether the target should listen again now: its incoming migration is paused and it
/// has not listened since it paused, or listened more than [`RELISTEN_AFTER`] ago with no
/// source arriving. `listened_for` is how long ago it last listened in this pause.
pub fn should_listen(paused: bool, listened_for: Option<Duration>) -> bool {
    paused && listened_for.is_none_or(|t| t >= RELISTEN_AFTER)
}

/// The status of `vm`'s migration on this node (`query-migrate`), if any.
pub async fn migration_status(sup: &Supervisor, vm: &str) -> Result<Option<String>, ErrorKind> {
    let guest = sup.require(vm).await?;
    let info: MigrationInfo = guest.qmp.execute("query-migrate", None).await?;
    Ok(info.status)
}

/// Target: if the incoming migration of `vm` is paused in post-copy, listens again
/// (`migrate-recover`) as `listen` says — on this node's address and that port
/// (direct), or on the guest's incoming socket (tunnelled) — and returns QEMU's URI;
/// `None` when it is not paused (nothing to recover).
#[tracing::instrument(skip_all, fields(vm, migration))]
pub async fn listen_again(
    sup: &Supervisor,
    vm: &str,
    migration: &str,
    listen: Listen,
) -> Result<Option<String>, PhaseError> {
    let cx = Ctx {
        phase: Phase::Perform,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let guest = sup.require(vm).await.map_err(|e| cx.err(e))?;
    let info: MigrationInfo = guest
        .qmp
        .execute("query-migrate", None)
        .await
        .map_err(|e| cx.err(e))?;
    if !is_paused(info.status.as_deref()) {
        return Ok(None);
    }
    let uri = match listen {
        Listen::Tcp(port) => {
            let host = match sup.node().address {
                std::net::IpAddr::V4(a) => a.to_string(),
                std::net::IpAddr::V6(a) => format!("[{a}]"),
            };
            format!("tcp:{host}:{}", port.unwrap_or(0))
        }
        Listen::Incoming => stream::unix_uri(&stream::incoming_socket(&guest.dir)),
    };
    guest
        .qmp
        .run("migrate-recover", Some(json!({ "uri": uri })))
        .await
        .map_err(|e| cx.err(e))?;
    tracing::info!(vm, migration, %uri, "post-copy paused: the target listens again");
    Ok(Some(uri))
}

/// Source: resumes the paused migration to the target's recovery `uri`. QEMU connects in
/// the background; if it cannot, the migration stays paused and this may be called again.
pub async fn resume(qmp: &Qmp, uri: &str) -> Result<(), QmpError> {
    qmp.run("migrate", Some(json!({ "uri": uri, "resume": true })))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_listens_once_per_pause_and_again_when_nobody_came() {
        assert!(!should_listen(false, None));
        assert!(should_listen(true, None));
        assert!(!should_listen(true, Some(Duration::from_secs(1))));
        assert!(should_listen(true, Some(RELISTEN_AFTER)));
        assert!(!should_listen(false, Some(RELISTEN_AFTER)));
        assert!(is_paused(Some("postcopy-paused")));
        assert!(!is_paused(Some("postcopy-active")));
        assert!(!is_paused(None));
        for s in ["postcopy-active", "postcopy-paused", "postcopy-recover"] {
            assert!(in_post_copy(Some(s)), "{s}");
        }
        for s in ["active", "completed", "failed", "cancelling", "cancelled"] {
            assert!(!in_post_copy(Some(s)), "{s}");
        }
        assert!(!in_post_copy(None));
    }
}
