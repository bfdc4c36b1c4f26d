//! The source agent's driver of a peer-to-peer migration: it runs the five phases in
//! the order [`ferry_crds::sequence::after`] gives (the operator's table), Begin,
//! Perform and Confirm here and Prepare and Finish through the target agent's peer API,
//! and records each step, its cookie and the phase it enters next in the status in
//! one write.
//!
//! Every write that moves the phase is guarded by the resourceVersion the driver
//! decided on: the operator may meanwhile have given up on the phase (recorded it
//! Failed) or ended the migration, and then its record wins and the driver decides
//! again from it. A driver that stops (agent restart, a write that never lands) is
//! started again by the dispatcher and goes on from the status: a step without an
//! outcome runs again (phases are idempotent), one with an outcome is followed.

use std::sync::Arc;
use std::time::Duration;

use ferry_agent::fault;
use ferry_crds::sequence::{Next, View, after};
use ferry_crds::{
    MigrationPhase as P, MigrationStatusPatch, Reason, Step, StepOutcome, VirtualMachineMigration,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::client;
use super::wire::{FINISH_PATH, PREPARE_PATH, PeerRequest, PeerStep};
use crate::k8s::Agent;
use crate::k8s::phase::{self, Inputs};
use crate::k8s::status::{StatusWriter, Unwritten};
use crate::k8s::tasks::Task;

/// What the driver does next with a migration, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Run this phase (here, or on the target).
    Run(P),
    /// The phase ended: enter the next one.
    Enter { phase: P, cancelled: bool },
    /// Confirm failed: run it again (its new step replaces the failed one).
    RetryConfirm,
    /// Nothing more for the driver: the migration ended, or is the operator's to end.
    Stop,
}

/// What comes next for `m`, from its status. Pure.
pub fn next_move(m: &VirtualMachineMigration) -> Move {
    let Some(phase) = m.phase() else {
        return Move::Stop;
    };
    if phase == P::Pending || phase.is_terminal() {
        return Move::Stop;
    }
    let Some(view) = View::of(m) else {
        return Move::Run(phase);
    };
    match after(&view) {
        Some(Next::Enter {
            phase, cancelled, ..
        }) => Move::Enter { phase, cancelled },
        Some(Next::RetryConfirm(_)) => Move::RetryConfirm,
        _ => Move::Stop,
    }
}

/// Starts the driver of `m` unless one runs already.
pub fn ensure(agent: &Arc<Agent>, m: &VirtualMachineMigration) {
    if next_move(m) == Move::Stop {
        return;
    }
    let Some(running) = agent
        .tasks
        .start(&m.uid().unwrap_or_default(), Task::Driver)
    else {
        return;
    };
    let agent = agent.clone();
    let m = m.clone();
    let span = info_span!("peer-to-peer", migration = %m.name_any(), vm = %m.spec.vm_name);
    tokio::spawn(
        async move {
            Driver::new(&agent, &m).drive(m.clone()).await;
            drop(running);
        }
        .instrument(span),
    );
}

struct Driver<'a> {
    agent: &'a Agent,
    api: Api<VirtualMachineMigration>,
    writer: StatusWriter,
    leases: Api<Lease>,
    name: String,
    uid: String,
}

impl<'a> Driver<'a> {
    fn new(agent: &'a Agent, m: &VirtualMachineMigration) -> Self {
        let ns = m.namespace().unwrap_or_default();
        let api = Api::namespaced(agent.client.clone(), &ns);
        Driver {
            agent,
            writer: StatusWriter::new(api.clone(), &m.name_any(), agent.metrics.status_writes()),
            api,
            leases: Api::namespaced(agent.client.clone(), &agent.namespace),
            name: m.name_any(),
            uid: m.uid().unwrap_or_default(),
        }
    }

    async fn drive(&self, mut m: VirtualMachineMigration) {
        info!("driving");
        loop {
            let written = match next_move(&m) {
                Move::Stop => return,
                Move::Enter { phase, cancelled } => {
                    info!(?phase, cancelled, "entering");
                    self.write(&m, MigrationStatusPatch::enter(phase, cancelled))
                        .await
                }
                Move::RetryConfirm => {
                    warn!("Confirm failed; running it again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    match self.run(&m, P::Confirm).await {
                        Some(m) => Ok(m),
                        None => return,
                    }
                }
                Move::Run(phase) => match self.run(&m, phase).await {
                    Some(m) => Ok(m),
                    None => return,
                },
            };
            m = match written {
                Ok(m) => m,
                Err(Unwritten::Conflict) => match self.fresh().await {
                    Some(m) => m,
                    None => return,
                },
                Err(Unwritten::Gone | Unwritten::Failed) => return,
            };
        }
    }

    /// Runs `phase` and records it with the phase that follows; the migration as
    /// written, or `None` when the driver must stop.
    async fn run(&self, m: &VirtualMachineMigration, phase: P) -> Option<VirtualMachineMigration> {
        // The dispatcher cancels it when the operator gives up on the phase. A task of
        // this phase still winding down (given up on) is not waited for.
        let running = self.agent.tasks.start(&self.uid, Task::Phase(phase));
        let token = running
            .as_ref()
            .map(|r| r.cancel.clone())
            .unwrap_or_default();
        let step = if phase.runs_on_source() {
            self.local(m, phase, &token).await
        } else {
            self.remote(m, phase, &token).await
        };
        drop(running);
        self.agent.metrics.phase_done(phase, step.outcome);
        info!(?phase, outcome = ?step.outcome, reason = ?step.reason, message = %step.message, "step done");
        let node = if phase.runs_on_source() {
            self.agent.node.clone()
        } else {
            target_of(m)
        };
        let record = step.outputs.with_step(
            phase,
            Step {
                end: Some(step.end),
                outcome: Some(step.outcome),
                reason: step.reason,
                message: Some(step.message),
                ..Step::started(&node, step.start)
            },
        );
        let step_of = |m: &VirtualMachineMigration| {
            m.status
                .as_ref()
                .and_then(|s| s.steps.as_ref())
                .and_then(|s| s.get(phase).cloned())
        };
        // A failed Confirm runs again over its own record.
        let prior = step_of(m);
        let mut base = m.clone();
        loop {
            // The operator may have given up on the phase, or ended the migration:
            // then its record stands.
            let status = base.status.clone().unwrap_or_default();
            let theirs =
                step_of(&base).filter(|s| s.outcome.is_some() && Some(s) != prior.as_ref());
            if status.phase != Some(phase) || theirs.is_some() {
                info!(
                    ?phase,
                    "the operator recorded this phase first; following it"
                );
                return Some(base);
            }
            let write = with_next(&base, record.clone());
            match self.write(&base, write).await {
                Ok(written) => {
                    if matches!(phase, P::Begin | P::Prepare | P::Finish) {
                        fault::pause(&format!("after-{}", phase.key())).await;
                    }
                    return Some(written);
                }
                Err(Unwritten::Conflict) => base = self.fresh().await?,
                Err(Unwritten::Gone | Unwritten::Failed) => return None,
            }
        }
    }

    /// Begin, Perform or Confirm, here.
    async fn local(
        &self,
        m: &VirtualMachineMigration,
        phase: P,
        token: &CancellationToken,
    ) -> PeerStep {
        let start = MicroTime(Timestamp::now());
        if phase == P::Perform {
            // Perform lasts: show who runs it while it does.
            let running = MigrationStatusPatch::default()
                .with_step(phase, Step::started(&self.agent.node, start.clone()));
            if let Err(e) = self.writer.once(&running, None).await {
                warn!(error = ?e, "could not record Perform's start");
            }
        }
        let inputs = Inputs::of(&m.status.clone().unwrap_or_default());
        let report = phase::execute(self.agent, m, phase, inputs, token).await;
        fault::pause(&format!("during-{}", phase.key())).await;
        PeerStep {
            outcome: report.outcome,
            reason: Some(report.reason),
            message: report.message,
            start,
            end: MicroTime(Timestamp::now()),
            outputs: report.outputs,
        }
    }

    /// Prepare or Finish, on the target, called until it answers or the operator gives
    /// up on the phase (`token`).
    async fn remote(
        &self,
        m: &VirtualMachineMigration,
        phase: P,
        token: &CancellationToken,
    ) -> PeerStep {
        let start = MicroTime(Timestamp::now());
        let target = target_of(m);
        let request = PeerRequest::of(m);
        let path = if phase == P::Prepare {
            PREPARE_PATH
        } else {
            FINISH_PATH
        };
        let failed = |message: String| PeerStep {
            outcome: StepOutcome::Failed,
            reason: Some(Reason::PeerFailed),
            message,
            start: start.clone(),
            end: MicroTime(Timestamp::now()),
            outputs: MigrationStatusPatch::default(),
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let call = async {
                let creds = self.agent.certs.current().ok_or_else(|| {
                    format!(
                        "node {} has no migration certificate for the peer API yet ({})",
                        self.agent.node,
                        self.agent.certs.why_none()
                    )
                });
                let creds = match creds {
                    Ok(c) => c,
                    Err(message) => return Err((true, message)),
                };
                let endpoint = client::endpoint(&self.leases, &target)
                    .await
                    .map_err(|e| (e.retryable(), e.to_string()))?;
                client::call(&creds, &target, &endpoint, path, &request)
                    .await
                    .map_err(|e| (e.retryable(), e.to_string()))
            };
            let result = tokio::select! {
                r = call => r,
                _ = token.cancelled() => {
                    return failed(format!("{phase:?} on {target} abandoned: the operator gave up on it"));
                }
            };
            match result {
                Ok(step) => return step,
                Err((false, message)) => return failed(message),
                Err((true, message)) => {
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        warn!(?phase, %target, attempt, %message, "peer call failed; calling again");
                    }
                    // Now and then: is the migration still where this call belongs?
                    if attempt.is_multiple_of(5)
                        && let Some(now) = self.fresh().await
                        && now.status.as_ref().and_then(|s| s.phase) != Some(phase)
                    {
                        return failed(format!(
                            "{phase:?} on {target} abandoned: the migration left {phase:?}"
                        ));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = token.cancelled() => {
                            return failed(format!(
                                "{phase:?} on {target} abandoned after {attempt} calls: {message}"
                            ));
                        }
                    }
                }
            }
        }
    }

    /// A status write that applies only to `base`'s version, retried while the API
    /// server fails.
    async fn write(
        &self,
        base: &VirtualMachineMigration,
        patch: MigrationStatusPatch,
    ) -> Result<VirtualMachineMigration, Unwritten> {
        self.writer
            .write(&patch, base.metadata.resource_version.as_deref())
            .await
    }

    /// The migration as the API server has it now.
    async fn fresh(&self) -> Option<VirtualMachineMigration> {
        for attempt in 1..=20u64 {
            match self.api.get_opt(&self.name).await {
                Ok(m) => return m.filter(|m| m.uid().as_deref() == Some(self.uid.as_str())),
                Err(e) => {
                    warn!(attempt, error = %e, "reading the migration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                }
            }
        }
        None
    }
}

fn target_of(m: &VirtualMachineMigration) -> String {
    m.nodes().1.to_string()
}

/// `record` (a step and its outputs) plus, when the step lets the migration go on, the
/// phase it enters: one write for both.
fn with_next(base: &VirtualMachineMigration, record: MigrationStatusPatch) -> MigrationStatusPatch {
    let mut hypothetical = base.clone();
    record.apply(hypothetical.status.get_or_insert_default());
    match next_move(&hypothetical) {
        Move::Enter { phase, cancelled } => {
            record.and(MigrationStatusPatch::enter(phase, cancelled))
        }
        _ => record,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn migration(status: Value, spec: Value) -> VirtualMachineMigration {
        let mut spec_v = json!({"vmName": "demo", "mode": "PeerToPeer"});
        if let (Some(into), Value::Object(spec)) = (spec_v.as_object_mut(), spec) {
            into.extend(spec);
        }
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": "m", "namespace": "default", "uid": "u"},
            "spec": spec_v,
            "status": status,
        }))
        .unwrap()
    }

    fn step(outcome: &str) -> Value {
        json!({"node": "node-a", "start": "2026-01-01T00:00:00.000000Z", "outcome": outcome,
               "message": "m"})
    }

    #[test]
    fn a_phase_without_an_outcome_runs() {
        let m = migration(json!({"phase": "Prepare"}), json!({}));
        assert_eq!(next_move(&m), Move::Run(P::Prepare));
        for phase in ["Pending", "Succeeded", "Failed", "Cancelled"] {
            let m = migration(json!({"phase": phase}), json!({}));
            assert_eq!(next_move(&m), Move::Stop, "{phase}");
        }
    }

    #[test]
    fn an_outcome_leads_where_the_operators_table_does() {
        let m = migration(
            json!({"phase": "Perform", "steps": {"perform": step("Failed")}}),
            json!({}),
        );
        assert_eq!(
            next_move(&m),
            Move::Enter {
                phase: P::Finish,
                cancelled: true
            }
        );
        let m = migration(
            json!({"phase": "Confirm", "steps": {"confirm": step("Failed")}}),
            json!({}),
        );
        assert_eq!(next_move(&m), Move::RetryConfirm);
        // The ends are the operator's.
        let m = migration(
            json!({"phase": "Confirm", "steps": {"confirm": step("Succeeded")}}),
            json!({}),
        );
        assert_eq!(next_move(&m), Move::Stop);
        let m = migration(
            json!({"phase": "Begin", "steps": {"begin": step("Succeeded")}}),
            json!({"cancel": true}),
        );
        assert_eq!(next_move(&m), Move::Stop);
    }

    fn ended(outcome: StepOutcome) -> Step {
        Step::ended(
            "node-a",
            MicroTime("2026-01-01T00:00:00.000001Z".parse().unwrap()),
            outcome,
            Reason::Locked,
            "m",
        )
    }

    #[test]
    fn a_step_is_written_with_the_phase_it_leads_to() {
        let m = migration(json!({"phase": "Begin"}), json!({}));
        let record = MigrationStatusPatch::default()
            .with_cookie(P::Begin, Some("<c/>".into()))
            .with_step(P::Begin, ended(StepOutcome::Succeeded));
        let w = with_next(&m, record);
        assert_eq!(w.phase, Some(P::Prepare));
        assert_eq!(w.cancelled, Some(false));
        assert_eq!(w.cookies.unwrap().begin.as_deref(), Some("<c/>"));
        // A failed Prepare rolls back through Confirm.
        let m = migration(json!({"phase": "Prepare"}), json!({}));
        let w = with_next(
            &m,
            MigrationStatusPatch::default().with_step(P::Prepare, ended(StepOutcome::Failed)),
        );
        assert_eq!((w.phase, w.cancelled), (Some(P::Confirm), Some(true)));
        // Confirm done: no phase; the operator ends the migration.
        let m = migration(json!({"phase": "Confirm"}), json!({}));
        let w = with_next(
            &m,
            MigrationStatusPatch::default().with_step(P::Confirm, ended(StepOutcome::Succeeded)),
        );
        assert!(w.phase.is_none());
    }
}
