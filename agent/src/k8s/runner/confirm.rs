//! The source's Confirm: after the target took over, removes the old guest here and
//! reports the guest's downtime; after a rollback, fences the target out and resumes
//! the guest here, or says it is lost (the source's QEMU died, or the target's died
//! after the switch to post-copy).

use ferry_agent::phases::confirm::{self, Confirmed};
use ferry_crds::{MigrationPhase, VmPhase};
use kube::ResourceExt;
use serde_json::json;
use tracing::{info, warn};

use super::{DiskLocks, Outcome, Run};
use crate::k8s::ownership::{Claim, Owner};

impl Run<'_> {
    pub(super) async fn confirm(&self) -> Outcome {
        let (_, domain) = self.vm().await?;
        let (source, target) = self.claim();
        let mut cancelled = self.status().cancelled;
        let name = self.m.name_any();
        let ns = self.m.namespace().unwrap_or_default();
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
            .await
            .map_err(|e| e.to_string())?;
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
            return Ok((
                "rolled back, but the guest's QEMU on the source is gone: the guest died".into(),
                json!({}),
            ));
        }
        let finish_cookie = self.cookie(MigrationPhase::Finish);
        let confirmed = if !cancelled && finish_cookie.is_none() {
            // The target took over but its Finish never reported: nothing to check
            // against, but the old guest must go all the same.
            self.agent
                .sup
                .destroy(&domain.name)
                .await
                .map_err(|e| e.to_string())?;
            Confirmed::TargetRuns(None)
        } else {
            confirm::confirm(
                &self.agent.sup,
                confirm::ConfirmInput {
                    vm: &domain.name,
                    migration: &self.id,
                    finish_cookie: finish_cookie.as_deref(),
                    cancelled,
                },
            )
            .await
            .map_err(|e| e.to_string())?
        };
        let statistics = match confirmed {
            Confirmed::TargetRuns(statistics) => statistics,
            Confirmed::SourceRuns => {
                return Ok((
                    "rolled back: the guest runs on the source".into(),
                    json!({}),
                ));
            }
            Confirmed::GuestLost(why) => {
                warn!(%why, "the guest is lost");
                self.mark_vm_lost(&why).await?;
                return Ok((
                    format!("rolled back, but the guest is lost: {why}; its QEMU here was removed"),
                    json!({}),
                ));
            }
        };
        let _ = DiskLocks::new(
            self.agent.client.clone(),
            &self.agent.namespace,
            &ns,
            &self.m.spec.vm_name,
        )
        .release(&source)
        .await;
        // QEMU's downtime (written in Perform) ends with the stream; the guest's
        // ends when the target resumed it.
        match statistics.as_ref().and_then(|s| s.guest_downtime_ms()) {
            Some(ms) => Ok((
                format!(
                    "the old guest on the source is gone; the guest was paused {ms} ms \
                     (paused here → resumed on {target})"
                ),
                json!({"downtimeMs": ms}),
            )),
            None => Ok(("the old guest on the source is gone".into(), json!({}))),
        }
    }

    /// Marks the VM Failed, reason GuestLost, and releases its disk locks: its QEMU here
    /// was removed because the guest's state was split with a target QEMU that is gone.
    /// (The VM reconciler would call it GuestDied, as if the QEMU had exited by itself.)
    async fn mark_vm_lost(&self, why: &str) -> Result<(), String> {
        let (vm, _) = self.vm().await?;
        let message = format!(
            "the guest is lost: {why}; its QEMU on {} was removed. Ferry does not restart it \
             (set spec.running to false and back to true to start it again)",
            self.agent.node
        );
        self.mark_vm_gone(&vm, VmPhase::Failed, "GuestLost", &message, json!({}))
            .await
    }
}
