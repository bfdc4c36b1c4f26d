//! The source's Confirm: once the target reported the guest running there, waits for
//! the last pages of a post-copy migration to reach it (reporting their progress, and
//! recovering a cut stream), removes the old guest here and reports the guest's
//! downtime; after a rollback, fences the target
//! out, takes the disk locks back and resumes the guest here, or says it is lost (the
//! source's QEMU died, or the target's died after the switch to post-copy). The copy
//! here is removed only when the target resumed the guest or lost it after running it
//! (docs/protocol.md, "The commit point").

use std::time::{Duration, Instant};

use ferry_agent::phases::confirm::{self, Confirmed};
use ferry_agent::phases::perform::TransferProgress;
use ferry_agent::postcopy::Resumption;
use ferry_crds::{
    ControlMode, MigrationMode, MigrationPhase, MigrationStatusPatch, Progress, Reason, StepOutcome,
};
use kube::ResourceExt;
use tracing::{info, warn};

use super::perform::progress_of;
use super::{Done, Run, StepError, disks};
use crate::k8s::ownership::Owner;
use crate::k8s::peer::client;
use crate::k8s::peer::tunnel::Tunnel;

/// What the target said of its Finish, as far as this Confirm knows.
enum TargetSaid {
    /// Its cookie: the guest runs there.
    Resumed(String),
    /// Its QEMU is gone after it may have run the guest: the copy here is stale.
    Lost(String),
}

impl Run<'_> {
    pub(super) async fn confirm(&self) -> Result<Done, StepError> {
        let (_, domain) = self.vm().await?;
        let (source, target) = self.claim();
        let mut cancelled = self.inputs.cancelled;
        let name = self.m.name_any();
        if cancelled {
            // Fence the target out before resuming here; if it already took the guest,
            // going forward is the only way to keep one guest — unless its QEMU died
            // before it ran the guest: then the copy here is whole, and taken back.
            let claim = self.ownership(&name, &source, &target);
            let mut owner = claim.fence().await?;
            let never_ran = self
                .m
                .step(MigrationPhase::Finish)
                .is_some_and(|s| s.reason == Some(Reason::TargetNeverRan));
            if owner == Owner::Target && never_ran {
                info!("the target's QEMU died before it ran the guest; taking the VM back");
                claim.reclaim().await?;
                owner = claim.fence().await?;
            }
            if owner == Owner::Target {
                info!("the target took over before the rollback; going forward");
                cancelled = false;
            }
        }
        if cancelled && self.agent.sup.running_pid(&self.key(&domain)).is_none() {
            // Nothing to resume: the guest died on the source during the migration. The
            // rollback ends here; the VM reconciler marks the VM Failed (GuestDied) once
            // the migration releases it.
            warn!("the source guest's QEMU is gone: the guest died during the migration");
            return Ok(Done::new(
                Reason::GuestDied,
                "rolled back, but the guest's QEMU on the source is gone: the guest died",
            ));
        }
        let mut outputs = MigrationStatusPatch::default();
        let finish_cookie = match (cancelled, self.inputs.cookies.finish.clone()) {
            (false, None) => match self.target_said(&target).await? {
                TargetSaid::Resumed(cookie) => {
                    outputs = outputs.with_cookie(MigrationPhase::Finish, Some(cookie.clone()));
                    Some(cookie)
                }
                TargetSaid::Lost(why) => {
                    warn!(%why, "the guest was lost on the target after it took it; removing the stale copy here");
                    self.agent.sup.destroy(&self.key(&domain)).await?;
                    return Ok(Done::new(
                        Reason::GuestLost,
                        format!(
                            "the guest is lost on {target}: {why}; its stale copy on the source was removed"
                        ),
                    ));
                }
            },
            (_, cookie) => cookie,
        };
        let key = self.key(&domain);
        let input = confirm::ConfirmInput {
            vm: &key,
            migration: &self.id,
            finish_cookie: finish_cookie.as_deref(),
            cancelled,
        };
        // After a switch to post-copy the last pages still go from here: a cut stream
        // resumes to where the target listens again (tunnelled: through this agent).
        let post_copy = !cancelled && self.m.in_post_copy();
        let uri = self.inputs.migration_uri.clone().unwrap_or_default();
        let tunnel = if post_copy {
            self.tunnel(&uri, &key)?
        } else {
            None
        };
        let qemu_uri = tunnel.as_ref().map(Tunnel::uri).unwrap_or(uri);
        let dir = self.agent.sup.vm_dir(&key);
        let resume = Resumption {
            uri: &qemu_uri,
            dir: &dir,
            reports: self.target_reports(),
        };
        let (tx, writer) = self.progress_writer();
        let mut last = Instant::now() - Duration::from_secs(1);
        let on_progress = |p: &TransferProgress| {
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let _ = tx.try_send(progress_of(p));
            }
        };
        let confirmed =
            confirm::confirm_with(&self.agent.sup, input, Some(resume), on_progress).await;
        drop(tunnel);
        drop(tx);
        let _ = writer.await;
        let statistics = match confirmed? {
            Confirmed::TargetRuns(statistics) => statistics,
            Confirmed::SourceRuns => {
                // A Finish that handed the disk locks over and then could not commit
                // left them with the target: they are the source's again.
                self.disk_locks()
                    .take(&disks(&domain), &target, &source)
                    .await?;
                return Ok(Done::new(
                    Reason::SourceResumed,
                    "rolled back: the guest runs on the source",
                ));
            }
            Confirmed::GuestLost(why) => {
                warn!(%why, "the guest is lost");
                self.mark_vm_lost(&why).await?;
                return Ok(Done::new(
                    Reason::GuestLost,
                    format!("rolled back, but the guest is lost: {why}; its QEMU here was removed"),
                ));
            }
            Confirmed::TargetLost(why) => {
                // The VM is the target's since Finish: its agent marks it lost.
                warn!(%why, "the guest is lost on the target after the switch to post-copy");
                let _ = self.disk_locks().release(&source).await;
                return Ok(Done::new(
                    Reason::GuestLost,
                    format!(
                        "the guest is lost on {target} after the switch to post-copy: {why}; \
                         its stale QEMU on the source was removed"
                    ),
                ));
            }
        };
        let _ = self.disk_locks().release(&source).await;
        if post_copy && let Some(s) = &statistics {
            // The tail is over: the whole transfer's figures.
            outputs.total_time_ms = Some(s.total_time_ms as i64);
            outputs.progress = Some(Progress {
                bytes_total: s.transferred_bytes as i64,
                bytes_transferred: s.transferred_bytes as i64,
                bytes_remaining: 0,
                percent: Some("100%".into()),
                mode: Some(MigrationMode::PostCopy),
                eta_seconds: Some(0),
                convergence: Some("post-copy complete: every page is on the target".into()),
                ..self.status().progress.unwrap_or_default()
            });
        }
        // QEMU's downtime (written in Perform) ends with the stream; the guest's
        // ends when the target resumed it.
        match statistics.as_ref().and_then(|s| s.guest_downtime_ms()) {
            Some(ms) => Ok(Done::new(
                Reason::SourceRemoved,
                format!(
                    "the old guest on the source is gone; the guest was paused {ms} ms \
                     (paused here → resumed on {target}){}",
                    self.downtime_over_policy(ms)
                ),
            )
            .with(MigrationStatusPatch {
                downtime_ms: Some(ms as i64),
                ..outputs
            })),
            None => Ok(
                Done::new(Reason::SourceRemoved, "the old guest on the source is gone")
                    .with(outputs),
            ),
        }
    }

    /// What Confirm's message adds when the guest's downtime `ms` exceeded the policy's
    /// maximum: a failure of the policy, said as such (and logged), though the guest
    /// runs on the target.
    fn downtime_over_policy(&self, ms: u64) -> String {
        let Ok(policy) = self.policy() else {
            return String::new();
        };
        if ms <= policy.max_downtime_ms {
            return String::new();
        }
        warn!(
            downtime_ms = ms,
            max_downtime_ms = policy.max_downtime_ms,
            "the guest's downtime exceeded the policy's maximum"
        );
        format!(
            "; that is over the policy's maximum of {} ms (maxDowntimeMs): the policy failed",
            policy.max_downtime_ms
        )
    }

    /// The target owns the guest but no Finish cookie reached this Confirm: what its
    /// Finish says (peer-to-peer: asked again over the peer API), or
    /// [`StepError::AwaitingTarget`] while it says nothing.
    async fn target_said(&self, target: &str) -> Result<TargetSaid, StepError> {
        let finish = self.m.step(MigrationPhase::Finish);
        if let Some(step) = finish.filter(|s| s.reason == Some(Reason::GuestLost)) {
            return Ok(TargetSaid::Lost(step.message.clone().unwrap_or_default()));
        }
        let awaiting = |why: String| StepError::AwaitingTarget {
            target: target.to_string(),
            why,
        };
        if self.m.spec.mode != ControlMode::PeerToPeer {
            return Err(awaiting(String::new()));
        }
        let step = client::ask_finish_again(self.agent, self.m)
            .await
            .map_err(|e| awaiting(format!(" (asking its Finish again: {e})")))?;
        let cookie = step.outputs.cookies.as_ref().and_then(|c| c.finish.clone());
        match (step.outcome, step.reason, cookie) {
            (StepOutcome::Succeeded, _, Some(cookie)) => Ok(TargetSaid::Resumed(cookie)),
            (StepOutcome::Failed, Some(Reason::GuestLost), _) => Ok(TargetSaid::Lost(step.message)),
            _ => Err(awaiting(format!(" (its Finish says: {})", step.message))),
        }
    }
}
