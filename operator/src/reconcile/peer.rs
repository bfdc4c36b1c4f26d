//! The operator's writes in a peer-to-peer migration, where the source agent writes
//! `status.phase` too: every one is guarded by the resourceVersion the decision was
//! made on, so the first of the operator and the agent to write wins and the other
//! decides again from what the winner wrote.

use ferry_crds::{MigrationPhase, Step, StepOutcome};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::{Guard, Reconciler, patches};
use crate::error::Result;
use crate::transitions::Why;

impl Reconciler<'_> {
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
        let step = Step {
            end: Some(MicroTime(Timestamp::now())),
            outcome: Some(StepOutcome::Failed),
            reason: Some(why.reason),
            message: Some(message.clone()),
            ..Step::started(&node, start)
        };
        self.write(patches::gave_up(phase, step, conditions), Guard::Read)
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
        self.write(patches::conditions(conditions), Guard::None)
            .await?;
        info!(reason = %why.reason, message = %why.message, "rolling back");
        self.event(EventType::Warning, "RollingBack", &why.message)
            .await;
        Ok(())
    }
}
