//! Confirm (source): if the target took over, waits for a post-copy migration's last
//! pages to reach it ([`postcopy::complete`], recovering a cut stream), then stops the
//! old QEMU and removes its state;
//! if the migration was cancelled, makes sure no migration runs any more and resumes
//! the source guest if Begin found it running — unless the outgoing migration had
//! switched to post-copy, which QEMU cannot take back: then the guest is lost and its
//! QEMU here is removed ([`Confirmed::GuestLost`]).

use crate::cookie::{Cookie, Expect, Statistics};
use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::perform::TransferProgress;
use crate::phases::{
    MigrationRecord, Phase, TransferState, check_vm_name, should_resume_source, transfer_state,
};
use crate::postcopy::{self, Resumption, Tail, TargetReport};
use crate::qmp::{MigrationInfo, StatusInfo};
use crate::supervisor::{StopMode, Supervisor};
use std::time::Duration;

/// How Confirm ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmed {
    /// The guest runs on the target and its QEMU here is gone. The statistics the Finish
    /// cookie carried (with the moments the guest paused here and resumed on the target:
    /// [`Statistics::guest_downtime_ms`]); `None` when an earlier run already confirmed.
    TargetRuns(Option<Statistics>),
    /// Rolled back: the guest runs here.
    SourceRuns,
    /// Rolled back after the switch to post-copy: the guest's state was split between
    /// this QEMU and the target's, which is gone (the rollback removed it), and QEMU
    /// cannot resume it here ("Migration is not finalized yet"). This QEMU was removed;
    /// the reason says what the outgoing migration was in.
    GuestLost(String),
    /// The target took the guest after the switch to post-copy and lost its QEMU before
    /// every page reached it: the guest is lost, and its stale QEMU here was removed.
    TargetLost(String),
}

/// What Confirm needs.
#[derive(Debug, Clone, Copy)]
pub struct ConfirmInput<'a> {
    pub vm: &'a str,
    /// The migration's unique name.
    pub migration: &'a str,
    /// Finish's cookie; required unless `cancelled`.
    pub finish_cookie: Option<&'a str>,
    /// Roll back: the guest carries on here (if it can).
    pub cancelled: bool,
}

/// Runs Confirm. `finish_cookie` is required when not `cancelled`. A post-copy tail is
/// waited for without recovery: see [`confirm_with`].
pub async fn confirm(sup: &Supervisor, input: ConfirmInput<'_>) -> Result<Confirmed, PhaseError> {
    confirm_with(sup, input, None, |_| {}).await
}

/// [`confirm`], recovering a post-copy tail cut on its way as `resume` says (where the
/// source QEMU resumes to, and the target's reports), reporting its progress to
/// `on_progress`.
#[tracing::instrument(
    skip_all,
    fields(vm = input.vm, migration = input.migration, cancelled = input.cancelled)
)]
pub async fn confirm_with(
    sup: &Supervisor,
    input: ConfirmInput<'_>,
    resume: Option<Resumption<'_>>,
    on_progress: impl FnMut(&TransferProgress),
) -> Result<Confirmed, PhaseError> {
    let ConfirmInput {
        vm,
        migration,
        finish_cookie,
        cancelled,
    } = input;
    let cx = Ctx {
        phase: Phase::Confirm,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let dir = sup.vm_dir(vm);
    if !cancelled {
        if !dir.exists() {
            tracing::info!(vm, migration, "Confirm already done");
            return Ok(Confirmed::TargetRuns(None));
        }
        let domain = sup.definition(vm).map_err(|e| cx.err(e))?;
        let node = sup.node();
        let cookie =
            finish_cookie.ok_or_else(|| cx.err(ErrorKind::Refused("no Finish cookie".into())))?;
        let target = Cookie::decode(
            cookie,
            &Expect {
                vm_name: &domain.name,
                vm_uuid: domain.uuid,
                writer: Phase::Finish,
                own_host_uuid: node.host_uuid,
            },
        )
        .map_err(|e| cx.err(e))?;
        match target.lock {
            Some(l) if l.holder != node.name => {}
            _ => {
                return Err(cx.err(ErrorKind::Refused(
                    "Finish cookie does not show the target holding the VM".into(),
                )));
            }
        }
        let mut statistics = target.statistics;
        match post_copy_tail(sup, &cx, resume, on_progress).await? {
            None => {}
            Some(Tail::Completed(info)) => {
                // The figures of the whole transfer, with the pause and resume moments.
                let all = Statistics::from_info(&info);
                statistics = statistics.map(|s| Statistics {
                    total_time_ms: all.total_time_ms,
                    downtime_ms: all.downtime_ms.max(s.downtime_ms),
                    transferred_bytes: all.transferred_bytes,
                    total_bytes: all.total_bytes,
                    passes: all.passes,
                    ..s
                });
            }
            Some(Tail::Lost(why)) => {
                tracing::error!(vm, migration, %why, "removing the source QEMU: the guest is lost on the target");
                sup.destroy(vm).await.map_err(|e| cx.err(e))?;
                return Ok(Confirmed::TargetLost(why));
            }
        }
        sup.stop(vm, StopMode::Quit(Duration::from_secs(10)))
            .await
            .map_err(|e| cx.err(e))?;
        sup.destroy(vm).await.map_err(|e| cx.err(e))?;
        tracing::info!(vm, migration, "Confirm done: source QEMU removed");
        return Ok(Confirmed::TargetRuns(statistics));
    }
    let record = MigrationRecord::load_for(&dir, migration).map_err(|e| cx.err(e))?;
    // A save to a file that is rolled back: the temporary file an attempt that died
    // left behind goes (one that ended removed its own).
    if let Some(partial) = record.as_ref().and_then(|r| r.save_partial.as_ref()) {
        crate::phases::save::remove_partial(sup, partial, migration);
    }
    let guest = sup.require(vm).await.map_err(|e| cx.err(e))?;
    let qmp = &guest.qmp;
    let info: MigrationInfo = qmp
        .execute("query-migrate", None)
        .await
        .map_err(|e| cx.err(e))?;
    if crate::postcopy::in_post_copy(info.status.as_deref()) {
        let why = format!(
            "the outgoing migration is {} (after the switch to post-copy): the guest's state \
             was split with the target's QEMU, which is gone, and QEMU cannot resume it here",
            info.status.as_deref().unwrap_or_default()
        );
        tracing::error!(vm, migration, %why, "removing the source QEMU: the guest is lost");
        drop(guest);
        sup.destroy(vm).await.map_err(|e| cx.err(e))?;
        return Ok(Confirmed::GuestLost(why));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info: MigrationInfo = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| cx.err(e))?;
        if transfer_state(info.status.as_deref()) != TransferState::InProgress {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(cx.err(ErrorKind::Refused("outgoing migration did not stop".into())));
        }
        if info.status.as_deref() != Some("cancelling") {
            qmp.run("migrate_cancel", None)
                .await
                .map_err(|e| cx.err(e))?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status: StatusInfo = qmp
        .execute("query-status", None)
        .await
        .map_err(|e| cx.err(e))?;
    // No TLS objects of the failed migration stay in the guest that carries on here.
    crate::tls::clear(qmp).await.map_err(|e| cx.err(e))?;
    let was_running = record.as_ref().and_then(|r| r.source_was_running);
    if should_resume_source(&status.status, was_running) {
        tracing::info!(vm, migration, from = %status.status, "resuming source guest");
        qmp.run("cont", None).await.map_err(|e| cx.err(e))?;
    }
    MigrationRecord::remove(&dir).map_err(|e| cx.err(e))?;
    tracing::info!(
        vm,
        migration,
        "Confirm(cancelled) done: guest runs on the source"
    );
    Ok(Confirmed::SourceRuns)
}

/// After a switch to post-copy the target runs the guest while the last pages still
/// come from here: waits for the outgoing migration to complete (recovering a cut
/// stream as `resume` says). `None` when there is no tail to wait for (a pre-copy
/// migration, or no QEMU any more: an earlier run stopped it).
async fn post_copy_tail(
    sup: &Supervisor,
    cx: &Ctx<'_>,
    resume: Option<Resumption<'_>>,
    on_progress: impl FnMut(&TransferProgress),
) -> Result<Option<Tail>, PhaseError> {
    let (vm, migration) = (cx.vm, cx.migration);
    let Some(guest) = sup.attach(vm).await.map_err(|e| cx.err(e))? else {
        return Ok(None);
    };
    let info: MigrationInfo = guest
        .qmp
        .execute("query-migrate", None)
        .await
        .map_err(|e| cx.err(e))?;
    if !postcopy::in_post_copy(info.status.as_deref()) {
        return Ok(None);
    }
    tracing::info!(
        vm,
        migration,
        "post-copy: the guest runs on the target; waiting for its last pages to reach it"
    );
    let dir = sup.vm_dir(vm);
    let (_none, reports) = tokio::sync::watch::channel(TargetReport::default());
    let resume = resume.unwrap_or(Resumption {
        uri: "",
        dir: &dir,
        reports,
    });
    let tail = postcopy::complete(&guest.qmp, vm, migration, resume, on_progress)
        .await
        .map_err(|e| cx.err(e))?;
    Ok(Some(tail))
}
