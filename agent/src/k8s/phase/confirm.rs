//! The source's Confirm: once the target reported the guest running there, removes the
//! old guest here and reports the guest's downtime; after a rollback, fences the target
//! out, takes the disk locks back and resumes the guest here, or says it is lost (the
//! source's QEMU died, or the target's died after the switch to post-copy). The copy
//! here is removed only when the target resumed the guest or lost it after running it
//! (docs/protocol.md, "The commit point").

use ferry_agent::phases::confirm::{self, Confirmed};
use ferry_crds::{ControlMode, MigrationPhase, MigrationStatusPatch, Reason, StepOutcome};
use kube::ResourceExt;
use tracing::{info, warn};

use super::{Done, Run, StepError, disks};
use crate::k8s::ownership::Owner;
use crate::k8s::peer::client;

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
        let input = confirm::ConfirmInput {
            vm: &self.key(&domain),
            migration: &self.id,
            finish_cookie: finish_cookie.as_deref(),
            cancelled,
        };
        let statistics = match confirm::confirm(&self.agent.sup, input).await? {
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
        };
        let _ = self.disk_locks().release(&source).await;
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
