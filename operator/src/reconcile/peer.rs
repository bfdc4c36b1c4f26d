//! The operator's writes in a peer-to-peer migration, where the source agent writes
//! `status.phase` too: every one is guarded by the resourceVersion the decision was
//! made on, so the first of the operator and the agent to write wins and the other
//! decides again from what the winner wrote.

use ferry_crds::MigrationPhase;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::Reconciler;
use crate::error::Result;
use crate::transitions::Why;

impl Reconciler<'_> {
    /// A merge patch of the status that applies only to the version this reconcile read
    /// (a conflict fails the reconcile, which runs again on the newer version).
    pub(super) async fn patch_status_guarded(&self, status: Value) -> Result<()> {
        self.patch_status_at(self.m.metadata.resource_version.as_deref(), status)
            .await
    }

    /// A merge patch of the status that applies only to `resource_version`.
    pub(super) async fn patch_status_at(
        &self,
        resource_version: Option<&str>,
        status: Value,
    ) -> Result<()> {
        let body = json!({
            "metadata": {"resourceVersion": resource_version},
            "status": status,
        });
        self.api()
            .patch_status(&self.name(), &PatchParams::default(), &Patch::Merge(body))
            .await?;
        Ok(())
    }

    /// Gives up on `phase`: records its step Failed with `why`, and why the migration
    /// rolls back; the source agent takes the failure path from there.
    pub(super) async fn give_up(&self, phase: MigrationPhase, why: &Why) -> Result<()> {
        let status = self.m.status.clone().unwrap_or_default();
        let step = status.steps.as_ref().and_then(|s| s.get(phase));
        let node = step.map(|s| s.node.clone()).unwrap_or_else(|| {
            let runner = if phase.runs_on_source() {
                &status.source_node
            } else {
                &status.target_node
            };
            runner.clone().unwrap_or_default()
        });
        let start = step
            .map(|s| s.start.clone())
            .or_else(|| status.phase_transition_time.map(|t| MicroTime(t.0)))
            .unwrap_or_else(|| MicroTime(Timestamp::now()));
        let message = format!("{} (the operator gave up on it)", why.message);
        let conditions = self.conditions_rolling_back(why);
        self.patch_status_guarded(json!({
            "steps": {phase.key(): {
                "node": node,
                "start": start,
                "end": MicroTime(Timestamp::now()),
                "outcome": "Failed",
                "message": message,
            }},
            "conditions": conditions,
        }))
        .await?;
        warn!(?phase, reason = %why.reason, %message, "gave up on the phase");
        self.event(
            EventType::Warning,
            why.reason.as_str(),
            &format!("{phase:?}: {message}"),
        )
        .await;
        Ok(())
    }

    /// Records in the `RollingBack` condition why the source agent rolls back.
    pub(super) async fn note_rollback(&self, why: &Why) -> Result<()> {
        let conditions = self.conditions_rolling_back(why);
        self.patch_status(json!({"conditions": conditions})).await?;
        info!(reason = %why.reason, message = %why.message, "rolling back");
        self.event(EventType::Warning, "RollingBack", &why.message)
            .await;
        Ok(())
    }
}
