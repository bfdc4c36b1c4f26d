//! The source's Confirm: after the target took over, removes the old guest here and
//! reports the guest's downtime; after a rollback, fences the target out and resumes
//! the guest here, or says it is lost (the source's QEMU died, or the target's died
//! after the switch to post-copy).

use ferry_agent::phases::confirm::{self, Confirmed};
use ferry_crds::{MigrationStatusPatch, Reason, VmPhase};
use kube::ResourceExt;
use tracing::{info, warn};

use super::{Done, Run, StepError};
use crate::k8s::ownership::{Claim, Owner};

impl Run<'_> {
    pub(super) async fn confirm(&self) -> Result<Done, StepError> {
        let (_, domain) = self.vm().await?;
        let (source, target) = self.claim();
        let mut cancelled = self.inputs.cancelled;
        let name = self.m.name_any();
        if cancelled {
            // Fence the target out before resuming here; if it already took the guest,
            // going forward is the only way to keep one guest.
            let owner = Claim {
                vms: &self.vms,
                vm: &self.m.spec.vm_name,
                migration: &name,
                source: &source,
                target: &target,
            }
            .fence()
            .await?;
            if owner == Owner::Target {
                info!("the target took over before the rollback; removing the source guest");
                cancelled = false;
            }
        }
        if cancelled && self.agent.sup.running_pid(&domain.name).is_none() {
            // Nothing to resume: the guest died on the source during the migration. The
            // rollback ends here; the VM reconciler marks the VM Failed (GuestDied) once
            // the migration releases it.
            warn!("the source guest's QEMU is gone: the guest died during the migration");
            return Ok(Done::new(
                Reason::GuestDied,
                "rolled back, but the guest's QEMU on the source is gone: the guest died",
            ));
        }
        let finish_cookie = self.inputs.cookies.finish.clone();
        let confirmed = if !cancelled && finish_cookie.is_none() {
            // The target took over but its Finish never reported: nothing to check
            // against, but the old guest must go all the same.
            self.agent.sup.destroy(&domain.name).await?;
            Confirmed::TargetRuns(None)
        } else {
            let input = confirm::ConfirmInput {
                vm: &domain.name,
                migration: &self.id,
                finish_cookie: finish_cookie.as_deref(),
                cancelled,
            };
            confirm::confirm(&self.agent.sup, input).await?
        };
        let statistics = match confirmed {
            Confirmed::TargetRuns(statistics) => statistics,
            Confirmed::SourceRuns => {
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
                     (paused here → resumed on {target})"
                ),
            )
            .with(MigrationStatusPatch {
                downtime_ms: Some(ms as i64),
                ..Default::default()
            })),
            None => Ok(Done::new(
                Reason::SourceRemoved,
                "the old guest on the source is gone",
            )),
        }
    }

    /// Marks the VM Failed, reason GuestLost, and releases its disk locks: its QEMU here
    /// was removed because the guest's state was split with a target QEMU that is gone.
    /// (The VM reconciler would call it GuestDied, as if the QEMU had exited by itself.)
    async fn mark_vm_lost(&self, why: &str) -> Result<(), StepError> {
        let (vm, _) = self.vm().await?;
        let message = format!(
            "the guest is lost: {why}; its QEMU on {} was removed. Ferry does not restart it \
             (set spec.running to false and back to true to start it again)",
            self.agent.node
        );
        self.mark_vm_gone(
            &vm,
            VmPhase::Failed,
            "GuestLost",
            &message,
            Default::default(),
        )
        .await
    }
}
