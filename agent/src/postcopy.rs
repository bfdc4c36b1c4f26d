//! The post-copy tail and its recovery. Perform ends at the switch to post-copy; the
//! target's Finish then commits and resumes the guest while the rest of its memory
//! follows, and the source's Confirm waits for the outgoing migration to complete
//! ([`complete`]) before it removes its QEMU (docs/protocol.md, "Post-copy").
//!
//! After the switch the guest's memory is split between the two QEMUs: a cut stream
//! cannot be rolled back (the pages the target touched since the switch exist only
//! there, and QEMU neither cancels a paused post-copy on the source nor resumes the
//! source guest) and must be recovered. Both QEMUs then sit in status `postcopy-paused`
//! (the guest, running on the target, waits on each page it lacks) until
//! 1. the target listens again: [`listen_again`] (`migrate-recover {uri}`), and
//! 2. the source resumes to it: [`resume`] (`migrate {uri, resume: true}`), from
//!    [`complete`],
//!
//! after which both go `postcopy-recover` → `postcopy-active` → `completed`. A resume that
//! cannot connect (the path is still down) leaves the source paused: [`complete`] tries
//! again every [`RESUME_EVERY`]. No capability is needed beyond `postcopy-ram`, which
//! both sides already have for any migration that can switch to post-copy.
//!
//! Transport security: the TLS objects and parameters (`tls-creds`, `tls-authz` on the
//! target, `tls-creds`, `tls-hostname` on the source; see [`crate::tls`]) set before the
//! transfer stay in both QEMUs until the stream is over (on the target: its agent's
//! watcher removes them once the incoming migration completed; the source's QEMU goes
//! in Confirm), so the recovered
//! channel is encrypted and its peer checked exactly as the first one was. A tunnelled
//! stream ([`crate::stream`]) is recovered the same way through the agents: the target
//! listens again on its incoming socket, and the source resumes to its tunnel socket,
//! whose agent opens a new peer connection for it.

use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::perform::TransferProgress;
use crate::phases::{Phase, check_vm_name};
use crate::qmp::{MigrationInfo, Qmp, QmpError};
use crate::stream::{self, Listen};
use crate::supervisor::Supervisor;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

/// What a progress report says while a cut stream pauses a post-copy migration.
pub const PAUSED_WORDS: &str = "post-copy paused: the stream was cut; the guest's memory is split between the two nodes, so the migration waits for the path and resumes (it cannot roll back)";

/// How often [`complete`] looks at the outgoing migration.
const POLL: Duration = Duration::from_millis(250);

/// Where a source's post-copy tail resumes to after a cut, and what the target says.
#[derive(Debug)]
pub struct Resumption<'a> {
    /// The URI Perform sent QEMU to: the target's `tcp:` URI, or the guest's tunnel
    /// socket (tunnelled; its agent must listen there again, [`crate::stream`]).
    pub uri: &'a str,
    /// The guest's state dir.
    pub dir: &'a Path,
    /// What the target reports (`status.recoveryURI`, `status.targetLost`).
    pub reports: watch::Receiver<TargetReport>,
}

/// How the post-copy tail of an outgoing migration ended.
#[derive(Debug, Clone)]
pub enum Tail {
    /// Every page reached the target: `query-migrate`'s final figures.
    Completed(MigrationInfo),
    /// The migration can never complete (the target lost its QEMU, or QEMU ended the
    /// migration otherwise): why. The guest is lost.
    Lost(String),
}

/// Source: follows an outgoing migration that switched to post-copy until it completes,
/// calling `on_progress` about four times a second. While a cut stream pauses it, every
/// [`RESUME_EVERY`] it resumes to where the target listens again (`resume.reports`);
/// the target reporting its QEMU lost ends it ([`Tail::Lost`]). Nothing here cancels:
/// after the switch only completion or loss is left.
#[tracing::instrument(skip_all, fields(vm, migration))]
pub async fn complete(
    qmp: &Qmp,
    vm: &str,
    migration: &str,
    resume_to: Resumption<'_>,
    mut on_progress: impl FnMut(&TransferProgress),
) -> Result<Tail, QmpError> {
    let mut last_resume: Option<Instant> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let info: MigrationInfo = qmp.execute("query-migrate", None).await?;
        let status = info.status.as_deref();
        if status == Some("completed") {
            on_progress(&TransferProgress::from_info(&info));
            tracing::info!(
                vm,
                migration,
                "post-copy complete: every page is on the target"
            );
            return Ok(Tail::Completed(info));
        }
        if !in_post_copy(status) {
            let why = format!(
                "the outgoing migration ended {} after the switch to post-copy{}",
                status.unwrap_or("none"),
                info.error_desc
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            return Ok(Tail::Lost(why));
        }
        if let Some(why) = resume_to.reports.borrow().lost.clone() {
            tracing::error!(vm, migration, %why, "the target lost the guest during post-copy");
            return Ok(Tail::Lost(why));
        }
        let report = TransferProgress::from_info(&info);
        if report.paused {
            on_progress(&TransferProgress {
                convergence: PAUSED_WORDS.into(),
                ..report
            });
            let listens_at = resume_to.reports.borrow().listens_at.clone();
            let target = stream::resume_uri(resume_to.uri, listens_at.as_deref(), resume_to.dir);
            let due = last_resume.is_none_or(|t| t.elapsed() >= RESUME_EVERY);
            if let Some(target) = target.filter(|_| due) {
                last_resume = Some(Instant::now());
                match resume(qmp, &target).await {
                    Ok(()) => {
                        tracing::info!(vm, migration, uri = %target, "post-copy paused: resuming to the target")
                    }
                    Err(e) => {
                        tracing::warn!(vm, migration, uri = %target, error = %e, "post-copy paused: resume refused; trying again")
                    }
                }
            }
        } else {
            on_progress(&TransferProgress {
                converging: Some(true),
                convergence:
                    "post-copy: the guest runs on the target while the rest of its memory follows"
                        .into(),
                ..report
            });
        }
    }
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
