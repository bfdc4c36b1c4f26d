//! How a migration ends: its terminal phase, the `Complete` and `Failed` conditions,
//! the VM released, metrics and an Event.

use ferry_crds::conditions::{ADMITTED, COMPLETE, FAILED};
use ferry_crds::{ControlMode, MigrationPhase, set_condition};
use kube::runtime::events::EventType;
use tracing::info;

use super::{Guard, Reconciler, now, patches};
use crate::error::Result;
use crate::metrics::{OutcomeLabels, PhaseLabels};
use crate::transitions::Why;

impl Reconciler<'_> {
    /// Ends the migration in a terminal `phase`.
    pub(super) async fn end(&self, phase: MigrationPhase, why: &Why) -> Result<()> {
        let mut conditions = self.conditions();
        let generation = self.m.metadata.generation;
        let succeeded = phase == MigrationPhase::Succeeded;
        set_condition(
            &mut conditions,
            COMPLETE,
            succeeded,
            why.reason,
            &why.message,
            generation,
            now(),
        );
        set_condition(
            &mut conditions,
            FAILED,
            !succeeded,
            why.reason,
            &why.message,
            generation,
            now(),
        );
        if let Some(c) = conditions
            .iter_mut()
            .find(|c| c.type_ == ADMITTED && c.status == "False")
        {
            c.message = format!("never admitted: {}", c.message);
        }
        let patch = patches::end(phase, conditions, generation, now());
        if self.m.spec.mode == ControlMode::PeerToPeer {
            // The source agent writes phases too: end only the version read (a result
            // it wrote meanwhile wins), then release the VM.
            self.write(patch, Guard::Read).await?;
            self.release_vm().await?;
        } else {
            // The VM first: whoever sees the migration ended may start the next one at
            // once.
            self.release_vm().await?;
            self.write(patch, Guard::None).await?;
        }
        let status = self.m.status.clone().unwrap_or_default();
        let metrics = &self.ctx.metrics;
        metrics
            .migrations
            .get_or_create(&OutcomeLabels {
                outcome: format!("{phase:?}"),
            })
            .inc();
        if succeeded {
            if let Some(ms) = status.downtime_ms {
                metrics.downtime_seconds.observe(ms as f64 / 1000.0);
            }
            if let Some(p) = status.progress {
                metrics
                    .bytes_transferred
                    .inc_by(p.bytes_transferred.max(0) as u64);
            }
        }
        info!(?phase, reason = %why.reason, message = %why.message, "migration ended");
        let kind = if succeeded {
            EventType::Normal
        } else {
            EventType::Warning
        };
        self.event(kind, &format!("{phase:?}"), &why.message).await;
        Ok(())
    }

    pub(super) fn observe_step_duration(&self) {
        let Some(status) = &self.m.status else { return };
        let Some(phase) = status.phase else { return };
        let Some(step) = status.steps.as_ref().and_then(|s| s.get(phase)) else {
            return;
        };
        if let Some(end) = &step.end {
            let secs = end.0.duration_since(step.start.0).as_secs_f64().max(0.0);
            self.ctx
                .metrics
                .phase_seconds
                .get_or_create(&PhaseLabels {
                    phase: phase.key().into(),
                })
                .observe(secs);
        }
    }
}
