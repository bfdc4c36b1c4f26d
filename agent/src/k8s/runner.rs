//! The managed runner: runs the phase the operator set in `status.phase` on this node
//! ([`phase::execute`] with the status's inputs) and records the step — its start, then
//! its outcome, reason, message and the phase's outputs in one status write
//! (docs/protocol.md).

use std::sync::Arc;

use ferry_agent::fault;
use ferry_crds::{MigrationPhase, MigrationStatusPatch, Step, VirtualMachineMigration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::Agent;
use super::phase::{self, Inputs};
use super::status::{StatusWriter, Unwritten};

/// Runs `phase` of `m` and records it. Never panics on I/O: a failed status write is
/// retried, and if it never lands the watcher dispatches the phase again (phases are
/// idempotent).
pub async fn run(
    agent: Arc<Agent>,
    m: VirtualMachineMigration,
    phase: MigrationPhase,
    cancel: CancellationToken,
) {
    let span =
        info_span!("phase", migration = %m.name_any(), vm = %m.spec.vm_name, phase = phase.key());
    async move {
        let writer = StatusWriter::new(
            Api::namespaced(agent.client.clone(), &m.namespace().unwrap_or_default()),
            &m.name_any(),
            agent.metrics.status_writes(),
        );
        let start = record_start(&agent, &writer, &m, phase).await;
        info!("running");
        let inputs = Inputs::of(&m.status.clone().unwrap_or_default());
        let report = phase::execute(&agent, &m, phase, inputs, &cancel).await;
        fault::pause(&format!("during-{}", phase.key())).await;
        agent.metrics.phase_done(phase, report.outcome);
        let step = Step::ended(
            &agent.node,
            start,
            report.outcome,
            report.reason,
            report.message,
        );
        let patch = report.outputs.with_step(phase, step);
        if phase == MigrationPhase::Finish {
            // The source keeps its paused copy until it reads what Finish did.
            land_for_sure(&writer, &patch).await;
        } else {
            land(&writer, &patch).await;
        }
        info!(outcome = ?report.outcome, reason = %report.reason, "done");
    }
    .instrument(span)
    .await
}

/// When this node started `phase` of `m`: the recorded start of a step it began before
/// (a re-run after a restart), else now.
async fn record_start(
    agent: &Agent,
    writer: &StatusWriter,
    m: &VirtualMachineMigration,
    phase: MigrationPhase,
) -> MicroTime {
    if let Some(step) = m.step(phase).filter(|s| s.node == agent.node) {
        return step.start.clone();
    }
    let start = MicroTime(Timestamp::now());
    // Only Perform lasts long enough for a "running" record to tell anyone something;
    // the other phases record start and end in one write, which keeps a status round
    // trip off the migration's critical path.
    if phase == MigrationPhase::Perform {
        let patch = MigrationStatusPatch::default()
            .with_step(phase, Step::started(&agent.node, start.clone()));
        land(writer, &patch).await;
    }
    start
}

/// Writes `patch` until it lands (or the migration is gone), however long the API
/// server fails.
async fn land_for_sure(writer: &StatusWriter, patch: &MigrationStatusPatch) {
    loop {
        match writer.write(patch, None).await {
            Ok(_) | Err(Unwritten::Gone) => return,
            Err(e) => warn!(?e, "the step was not recorded yet; writing it again"),
        }
    }
}

/// Writes `patch`, retried for a while: the step result must land.
async fn land(writer: &StatusWriter, patch: &MigrationStatusPatch) {
    match writer.write(patch, None).await {
        Ok(_) | Err(Unwritten::Gone) => {}
        Err(e) => warn!(?e, "the step was not recorded; the phase runs again"),
    }
}
