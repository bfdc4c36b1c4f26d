//! What the reconciler reports while a migration waits: the `Converging` and
//! `PostCopyPaused` conditions, from what the source agent writes in `status.progress`.

use ferry_crds::conditions::{CONVERGING, POST_COPY_PAUSED};
use ferry_crds::{MigrationPhase, Reason, set_condition};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::{info, warn};

use super::{Guard, Reconciler, now, patches};
use crate::error::Result;
use crate::transitions;

impl Reconciler<'_> {
    /// While the migration waits: the `Converging` and `PostCopyPaused` conditions, in
    /// one write when either changes.
    pub(super) async fn report_progress(&self) -> Result<()> {
        let mut conditions = self.conditions();
        let converging = self.report_convergence(&mut conditions);
        let paused = self.report_pause(&mut conditions);
        if converging || paused {
            self.write(patches::conditions(conditions), Guard::None)
                .await?;
        }
        Ok(())
    }

    /// While Perform runs: a `Converging` condition that follows the agent's judgement
    /// in `status.progress`, set when the judgement changes. Whether it changed.
    fn report_convergence(&self, conditions: &mut Vec<ferry_crds::Condition>) -> bool {
        let status = self.m.status.clone().unwrap_or_default();
        if status.phase != Some(MigrationPhase::Perform) {
            return false;
        }
        let Some(progress) = status.progress else {
            return false;
        };
        let Some(converging) = progress.converging else {
            return false;
        };
        let current = status.conditions.iter().find(|c| c.type_ == CONVERGING);
        let wanted = if converging { "True" } else { "False" };
        if current.is_some_and(|c| c.status == wanted) {
            return false;
        }
        let reason = if converging {
            Reason::Converging
        } else {
            Reason::NotConverging
        };
        let message = progress
            .convergence
            .unwrap_or_else(|| format!("{reason} (pass {})", progress.iteration));
        set_condition(
            conditions,
            CONVERGING,
            converging,
            reason,
            &message,
            self.m.metadata.generation,
            now(),
        );
        true
    }

    /// A `PostCopyPaused` condition (and an Event) when a cut stream pauses a post-copy
    /// migration, when the pause outlasts its bound, and when it is recovered. Whether
    /// it changed.
    fn report_pause(&self, conditions: &mut Vec<ferry_crds::Condition>) -> bool {
        let Some(pause) = transitions::post_copy_pause(
            self.m,
            Timestamp::now(),
            self.ctx.timeouts.post_copy_paused,
        ) else {
            return false;
        };
        set_condition(
            conditions,
            POST_COPY_PAUSED,
            pause.paused,
            pause.reason,
            &pause.message,
            self.m.metadata.generation,
            now(),
        );
        let kind = if pause.paused {
            warn!(reason = %pause.reason, message = %pause.message, "post-copy paused");
            EventType::Warning
        } else {
            info!("post-copy recovered");
            EventType::Normal
        };
        let event = Event {
            type_: kind,
            reason: pause.reason.to_string(),
            note: Some(pause.message),
            action: "Migrate".into(),
            secondary: None,
        };
        self.ctx.events.publish(event, self.m.object_ref(&()));
        true
    }
}
