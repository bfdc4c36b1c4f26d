//! Watches the migrations labelled with this node and runs the phase each one asks of
//! it, once at a time per migration and phase.

use std::sync::Arc;
use std::time::Duration;

use ferry_agent::postcopy::TargetReport;
use ferry_crds::{
    ControlMode, MigrationPhase, SOURCE_NODE_LABEL, TARGET_NODE_LABEL, VirtualMachineMigration,
    VirtualMachineMigrationStatus,
};
use futures::StreamExt;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Agent, peer, recovery, runner};

/// Runs until the process ends.
pub async fn run(agent: Arc<Agent>) {
    let api: Api<VirtualMachineMigration> = Api::all(agent.client.clone());
    let selector = |label: &str| format!("{label}={}", agent.node);
    let watch = |label: &str| {
        watcher(
            api.clone(),
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
    let runner = if phase.runs_on_source() {
        status.source_node.as_deref()
    } else {
        status.target_node.as_deref()
    };
    if runner != Some(node) {
        return None;
    }
    let done = status
        .steps
        .as_ref()
        .and_then(|s| s.get(phase))
        .is_some_and(|s| s.outcome.is_some());
    (!done).then_some(phase)
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

/// What the target says in `status` to a source running Perform.
pub fn target_report(status: &VirtualMachineMigrationStatus) -> TargetReport {
    TargetReport {
        listens_at: status.recovery_uri.clone(),
        lost: status.target_lost.clone(),
    }
}

fn dispatch(agent: &Arc<Agent>, m: VirtualMachineMigration) {
    let uid = m.uid().unwrap_or_default();
    let status = m.status.clone().unwrap_or_default();
    let mut tasks = agent
        .tasks
        .lock()
        .expect("the task table is never poisoned");
    // A running Perform stops when the operator asks for a cancel or has moved on.
    if let Some(token) = tasks.get(&(uid.clone(), MigrationPhase::Perform))
        && stops_perform(&status)
    {
        token.cancel();
    }
    // A running Perform learns where the target listens again after a cut.
    if let Some(tx) = agent
        .recovery_uris
        .lock()
        .expect("the recovery table is never poisoned")
        .get(&uid)
    {
        let report = target_report(&status);
        tx.send_if_modified(|current| {
            let changed = *current != report;
            if changed {
                *current = report;
            }
            changed
        });
    }
    recovery::dispatch(agent, &m);
    if m.spec.mode == ControlMode::PeerToPeer {
        // A phase the operator gave up on (recorded it Failed) stops here.
        for (key, token) in tasks.iter() {
            if key.0 == uid && given_up(&status, key.1) {
                token.cancel();
            }
        }
        drop(tasks);
        if status.source_node.as_deref() == Some(agent.node.as_str()) {
            peer::driver::ensure(agent, &m);
        }
        return;
    }
    let Some(phase) = phase_to_run(&m, &agent.node) else {
        return;
    };
    let key = (uid, phase);
    if tasks.contains_key(&key) {
        return;
    }
    let token = CancellationToken::new();
    tasks.insert(key.clone(), token.clone());
    drop(tasks);
    let agent = agent.clone();
    tokio::spawn(async move {
        runner::run(agent.clone(), m, phase, token).await;
        agent
            .tasks
            .lock()
            .expect("the task table is never poisoned")
            .remove(&key);
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
}
