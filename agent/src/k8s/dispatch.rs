//! The dispatcher: watches the migrations labelled with this node and starts the work
//! each one asks of it (a phase, a peer-to-peer driver, a watcher of the incoming
//! QEMU), once at a time per migration and kind ([`super::tasks`]).

use std::sync::Arc;
use std::time::Duration;

use ferry_crds::{
    ControlMode, MigrationPhase, SOURCE_NODE_LABEL, TARGET_NODE_LABEL, VirtualMachineMigration,
};
use futures::StreamExt;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tracing::warn;

use super::tasks::Task;
use super::{Agent, peer, phase, recovery, runner};

/// Runs until the process ends.
pub async fn run(agent: Arc<Agent>) {
    let watched: Api<VirtualMachineMigration> = Api::all(agent.watches.clone());
    let api: Api<VirtualMachineMigration> = Api::all(agent.client.clone());
    let selector = |label: &str| format!("{label}={}", agent.node);
    let watch = |label: &str| {
        watcher(
            watched.clone(),
            watcher::Config::default().labels(&selector(label)),
        )
        .default_backoff()
        .applied_objects()
        .boxed()
    };
    let mut events = futures::stream::select(watch(SOURCE_NODE_LABEL), watch(TARGET_NODE_LABEL));
    // A rescan now and then covers a phase whose result never reached the status.
    let mut rescan = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(m)) => dispatch(&agent, m),
                Some(Err(e)) => warn!(error = %e, "migration watch"),
                None => return,
            },
            _ = rescan.tick() => {
                for label in [SOURCE_NODE_LABEL, TARGET_NODE_LABEL] {
                    match api.list(&ListParams::default().labels(&selector(label))).await {
                        Ok(list) => list.items.into_iter().for_each(|m| dispatch(&agent, m)),
                        Err(e) => warn!(error = %e, "migration rescan"),
                    }
                }
            }
        }
    }
}

/// What this node should do about `m` now: run `phase`, or nothing. (The phases of a
/// peer-to-peer migration are the source's driver's, not the status's.)
pub fn phase_to_run(m: &VirtualMachineMigration, node: &str) -> Option<MigrationPhase> {
    if m.spec.mode == ControlMode::PeerToPeer {
        return None;
    }
    let status = m.status.as_ref()?;
    let phase = status.phase?;
    if matches!(phase, MigrationPhase::Pending) || phase.is_terminal() {
        return None;
    }
    let done = |phase| {
        status
            .steps
            .as_ref()
            .and_then(|s| s.get(phase))
            .is_some_and(|s| s.outcome.is_some())
    };
    // A target that may have committed (the guest arrived: Perform gave its cookie)
    // but never recorded its Finish goes on with it while the source waits in Confirm.
    let perform_gave = status.cookies.as_ref().is_some_and(|c| c.perform.is_some());
    if phase == MigrationPhase::Confirm
        && status.target_node.as_deref() == Some(node)
        && perform_gave
        && !done(MigrationPhase::Finish)
    {
        return Some(MigrationPhase::Finish);
    }
    let runner = if phase.runs_on_source() {
        status.source_node.as_deref()
    } else {
        status.target_node.as_deref()
    };
    if runner != Some(node) {
        return None;
    }
    (!done(phase)).then_some(phase)
}

/// Whether a running Perform must stop, given a version of the migration's status.
///
/// The two watches (source and target label) may deliver versions out of order, so an
/// event showing an earlier phase than Perform is stale, not a reason to stop: only a
/// cancel or a later phase (the operator timed Perform out) is.
pub fn stops_perform(status: &ferry_crds::VirtualMachineMigrationStatus) -> bool {
    use MigrationPhase::*;
    status.cancelled
        || matches!(
            status.phase,
            Some(Finish | Confirm | Succeeded | Failed | Cancelled)
        )
}

/// Whether `phase` of a peer-to-peer migration has an outcome already, or the migration
/// ended: a task still running it has lost its purpose.
pub fn given_up(status: &ferry_crds::VirtualMachineMigrationStatus, phase: MigrationPhase) -> bool {
    status.phase.is_some_and(MigrationPhase::is_terminal)
        || status
            .steps
            .as_ref()
            .and_then(|s| s.get(phase))
            .is_some_and(|s| s.outcome.is_some())
}

fn dispatch(agent: &Arc<Agent>, m: VirtualMachineMigration) {
    let uid = m.uid().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    // A running Perform stops when the operator asks for a cancel or has moved on.
    if stops_perform(&status) {
        agent
            .tasks
            .cancel(&uid, |t| t == Task::Phase(MigrationPhase::Perform));
    }
    // A running Perform (or Confirm, waiting for a post-copy tail) learns where the
    // target listens again after a cut.
    agent.tasks.report(&uid, &phase::target_report(&status));
    recovery::dispatch(agent, &m);
    if m.spec.mode == ControlMode::PeerToPeer {
        // A phase the operator gave up on (recorded it Failed) stops here.
        agent.tasks.cancel(
            &uid,
            |t| matches!(t, Task::Phase(p) if given_up(&status, p)),
        );
        if status.source_node.as_deref() == Some(agent.node.as_str()) {
            peer::driver::ensure(agent, &m);
        }
        return;
    }
    let Some(phase) = phase_to_run(&m, &agent.node) else {
        return;
    };
    let Some(running) = agent.tasks.start(&uid, Task::Phase(phase)) else {
        return;
    };
    let agent = agent.clone();
    tokio::spawn(async move {
        runner::run(agent.clone(), m, phase, running.cancel.clone()).await;
        drop(running);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(phase: MigrationPhase, outcome: Option<&str>) -> VirtualMachineMigration {
        let mut status = serde_json::json!({
            "phase": phase, "sourceNode": "node-a", "targetNode": "node-b"
        });
        if let Some(outcome) = outcome {
            status["steps"] = serde_json::json!({phase.key(): {
                "node": "x", "start": "2026-01-01T00:00:00Z", "outcome": outcome}});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {"vmName": "demo"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_stale_event_does_not_stop_perform() {
        use MigrationPhase::*;
        let status =
            |phase: MigrationPhase, cancelled: bool| ferry_crds::VirtualMachineMigrationStatus {
                phase: Some(phase),
                cancelled,
                ..Default::default()
            };
        for stale in [Pending, Begin, Prepare, Perform] {
            assert!(!stops_perform(&status(stale, false)), "{stale:?}");
        }
        assert!(stops_perform(&status(Perform, true)));
        for later in [Finish, Confirm, Succeeded, Failed, Cancelled] {
            assert!(stops_perform(&status(later, false)), "{later:?}");
        }
    }

    #[test]
    fn each_phase_runs_on_its_node_until_it_has_an_outcome() {
        use MigrationPhase::*;
        for (phase, node) in [
            (Begin, "node-a"),
            (Prepare, "node-b"),
            (Perform, "node-a"),
            (Finish, "node-b"),
            (Confirm, "node-a"),
        ] {
            let m = migration(phase, None);
            assert_eq!(phase_to_run(&m, node), Some(phase));
            let other = if node == "node-a" { "node-b" } else { "node-a" };
            assert_eq!(phase_to_run(&m, other), None);
            assert_eq!(
                phase_to_run(&migration(phase, Some("Succeeded")), node),
                None
            );
        }
        for phase in [Pending, Succeeded, Failed, Cancelled] {
            assert_eq!(phase_to_run(&migration(phase, None), "node-a"), None);
        }
    }

    #[test]
    fn a_target_that_may_have_committed_finishes_while_the_source_waits_in_confirm() {
        use MigrationPhase::*;
        let mut m = migration(Confirm, None);
        // No Perform cookie: the guest never arrived, so there is nothing to finish.
        assert_eq!(phase_to_run(&m, "node-b"), None);
        let status = m.status.as_mut().unwrap();
        status.cookies = Some(ferry_crds::Cookies {
            perform: Some("cookie".into()),
            ..Default::default()
        });
        assert_eq!(phase_to_run(&m, "node-b"), Some(Finish));
        assert_eq!(phase_to_run(&m, "node-a"), Some(Confirm));
        // Once Finish has an outcome the target has nothing left to do.
        let finished: ferry_crds::Step = serde_json::from_value(serde_json::json!({
            "node": "node-b", "start": "2026-01-01T00:00:00Z", "outcome": "Succeeded"
        }))
        .unwrap();
        ferry_crds::MigrationStatusPatch::default()
            .with_step(Finish, finished)
            .apply(m.status.as_mut().unwrap());
        assert_eq!(phase_to_run(&m, "node-b"), None);
    }
}
