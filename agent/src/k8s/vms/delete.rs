//! A VM's way out: the `ferry.dev/guest` finalizer it carries from before its first
//! start, the power-off request that starts a stop or a deletion, and the end of a
//! deleted VM on this node — its QEMU stopped, its state dir removed, its disk locks
//! released, and only then the finalizer removed, so the API object outlives everything
//! it accounts for. The order is `decide`'s; waiting is by looking again, never here.

use std::time::Duration;

use ferry_crds::conditions::vm::SHUTTING_DOWN;
use ferry_crds::{GUEST_FINALIZER, VirtualMachineStatusPatch, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde::Serialize;
use tracing::{info, warn};

use super::decide::Shutdown;
use super::{Definitions, Located, QUIT_TIMEOUT, Reconcile, VmError};
use ferry_agent::supervisor::StopMode;

/// A merge patch of a VM's `metadata.finalizers`, over the resourceVersion it was
/// computed from (a finalizer someone else added meanwhile is never dropped).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct FinalizersPatch {
    finalizers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_version: Option<String>,
}

impl FinalizersPatch {
    fn to_patch(&self) -> Patch<serde_json::Value> {
        Patch::Merge(serde_json::json!({ "metadata": self }))
    }
}

/// The finalizers with ours added (`true`) or removed (`false`).
fn finalizers_with(current: &[String], ours: bool) -> Vec<String> {
    let mut out: Vec<String> = current
        .iter()
        .filter(|f| *f != GUEST_FINALIZER)
        .cloned()
        .collect();
    if ours {
        out.push(GUEST_FINALIZER.to_string());
    }
    out
}

impl Reconcile<'_> {
    /// Adds the `ferry.dev/guest` finalizer: from now on a deletion waits for the guest.
    pub(super) async fn add_finalizer(&self) -> Result<(), VmError> {
        info!("adding the {GUEST_FINALIZER} finalizer");
        self.set_finalizers(finalizers_with(self.vm.finalizers(), true))
            .await
    }

    async fn set_finalizers(&self, finalizers: Vec<String>) -> Result<(), VmError> {
        let patch = FinalizersPatch {
            finalizers,
            resource_version: self.vm.resource_version(),
        };
        match self
            .api()
            .patch(
                &self.vm.name_any(),
                &PatchParams::default(),
                &patch.to_patch(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(VmError::Conflict(self.vm.name_any())),
            // Gone already: nothing waits for it.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Asks the guest (its QEMU `key`) to power off and records when (`ShuttingDown`),
    /// which starts its grace period.
    pub(super) async fn power_off(
        &self,
        key: &str,
        why: Shutdown,
        grace: Duration,
    ) -> Result<(), VmError> {
        info!(
            guest = key,
            reason = why.reason(),
            grace_seconds = grace.as_secs(),
            "asking the guest to power off (ACPI)"
        );
        match self.agent.sup.attach(key).await {
            Ok(Some(guest)) => {
                if let Err(e) = guest.qmp.run("system_powerdown", None).await {
                    warn!(guest = key, error = %e, "system_powerdown failed; the guest is stopped when its grace period ends");
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(guest = key, error = %e, "cannot reach QEMU; the guest is stopped when its grace period ends")
            }
        }
        let what = match why {
            Shutdown::Stopping => "spec.running is false",
            Shutdown::Deleting => "the VM is being deleted",
        };
        let message = format!(
            "{what}: the guest was asked to power off (ACPI); its QEMU is stopped after {} s if it is still up",
            grace.as_secs()
        );
        let mut conditions = self.status().conditions;
        set_condition(
            &mut conditions,
            SHUTTING_DOWN,
            true,
            why.reason(),
            &message,
            self.vm.metadata.generation,
            Time(Timestamp::now()),
        );
        let patch = VirtualMachineStatusPatch {
            conditions: Some(conditions),
            ..Default::default()
        };
        self.patch_status(&patch, self.vm.metadata.resource_version.as_deref())
            .await
    }

    /// The end of a deleted VM on this node: its QEMU stopped, its state dirs removed,
    /// its disk locks released, then the finalizer removed.
    pub(super) async fn finalize(
        &self,
        guest: Option<&Located>,
        defs: &Definitions,
    ) -> Result<(), VmError> {
        let sup = &self.agent.sup;
        let failed = |source| VmError::Supervisor {
            vm: self.vm.name_any(),
            source,
        };
        if let Some(g) = guest {
            info!(guest = %g.key, "the VM is deleted: stopping its guest");
            sup.stop(&g.key, StopMode::Quit(QUIT_TIMEOUT))
                .await
                .map_err(failed)?;
        }
        // The state dirs of this VM's guests (the keys of its definitions), if no QEMU
        // runs in them.
        let named = guest
            .map(|g| &g.definition)
            .into_iter()
            .chain(defs.recorded.iter())
            .chain(defs.spec.as_ref().ok());
        for d in named {
            let key = self.key(d);
            if sup.vm_dir(&key).exists() && sup.running_pid(&key).is_none() {
                sup.destroy(&key).await.map_err(failed)?;
            }
        }
        self.locks().release(&self.agent.node).await?;
        if self.vm.finalizers().iter().any(|f| f == GUEST_FINALIZER) {
            self.set_finalizers(finalizers_with(self.vm.finalizers(), false))
                .await?;
        }
        info!("the VM is deleted: its guest, state dir and disk locks on this node are gone");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ours_is_added_once_and_removed_alone() {
        let others = vec!["example.com/keep".to_string()];
        let added = finalizers_with(&others, true);
        assert_eq!(added, vec!["example.com/keep", GUEST_FINALIZER]);
        assert_eq!(finalizers_with(&added, true), added);
        assert_eq!(finalizers_with(&added, false), others);
        let patch = FinalizersPatch {
            finalizers: added,
            resource_version: Some("7".into()),
        };
        match patch.to_patch() {
            Patch::Merge(body) => assert_eq!(
                body,
                json!({"metadata": {"finalizers": ["example.com/keep", GUEST_FINALIZER],
                                    "resourceVersion": "7"}})
            ),
            other => panic!("{other:?}"),
        }
    }
}
