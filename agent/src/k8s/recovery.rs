//! The target's part of post-copy recovery. While the stream may run (the source's
//! Perform, and after a switch to post-copy Finish and Confirm, while the guest runs
//! here and its last pages follow: [`VirtualMachineMigration::stream_runs`]) the target
//! agent watches its incoming QEMU: when a cut stream pauses a post-copy migration
//! there, it listens again on a fresh port (`migrate-recover`,
//! [`ferry_agent::postcopy::listen_again`]; tunnelled: on its incoming socket again) and
//! publishes the URI as `status.recoveryURI` (tunnelled: its peer endpoint,
//! `tunnel:<host>:<port>`); the source (Perform, or Confirm's wait for the tail) resumes
//! to it. Once the migration runs again the URI is cleared, so a later pause never sends
//! the source to a port that may meanwhile belong to another migration. Once the
//! incoming post-copy migration completed it removes the stream's TLS objects from the
//! guest; if its QEMU is gone after the switch it reports the guest lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent::domain::Domain;
use ferry_agent::node::guest_key;
use ferry_agent::stream::{self, Listen};
use ferry_agent::{fault, postcopy};
use ferry_crds::{
    MigrationMode, MigrationPhase, MigrationStatusPatch, TransportMode, VirtualMachineMigration,
};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::status::StatusWriter;
use super::tasks::Task;
use super::{Agent, phase};

/// How often the target looks at its incoming QEMU while the stream may run.
const POLL: Duration = Duration::from_millis(500);

/// Whether this node should watch `m`'s incoming QEMU now: it is the target and the
/// stream may run.
pub fn watches_incoming(m: &VirtualMachineMigration, node: &str) -> bool {
    let Some(status) = &m.status else {
        return false;
    };
    m.stream_runs() && status.target_node.as_deref() == Some(node)
}

/// Whether a watcher must stop: the migration moved past its stream (past Perform
/// without a switch to post-copy, a rollback, or its end). (An event showing an
/// earlier phase may be stale: the two watches deliver versions out of order.)
fn stream_over(m: &VirtualMachineMigration) -> bool {
    use MigrationPhase::*;
    match m.status.as_ref().and_then(|s| s.phase) {
        Some(Succeeded | Failed | Cancelled) => true,
        Some(Finish | Confirm) => !m.stream_runs(),
        _ => false,
    }
}

/// Starts or stops the watcher of `m`'s incoming QEMU.
pub fn dispatch(agent: &Arc<Agent>, m: &VirtualMachineMigration) {
    let uid = m.uid().unwrap_or_default();
    if stream_over(m) {
        agent.tasks.stop(&uid, Task::TargetWatch);
        return;
    }
    if !watches_incoming(m, &agent.node) {
        return;
    }
    let Some(running) = agent.tasks.start(&uid, Task::TargetWatch) else {
        return;
    };
    let agent = agent.clone();
    let m = m.clone();
    let span = info_span!("recovery", migration = %m.name_any(), vm = %m.spec.vm_name);
    tokio::spawn(
        async move {
            watch(&agent, &m, &running.cancel).await;
            drop(running);
        }
        .instrument(span),
    );
}

/// Watches the incoming QEMU until `cancel` fires.
async fn watch(agent: &Agent, m: &VirtualMachineMigration, cancel: &CancellationToken) {
    let status = m.status.clone().unwrap_or_default();
    let ns = m.namespace().unwrap_or_default();
    let Some(vm) = status
        .target_domain_xml
        .as_deref()
        .and_then(|xml| Domain::parse(xml).ok())
        .map(|d| guest_key(&ns, &m.spec.vm_name, d.uuid))
    else {
        warn!("no target definition in the status; not watching the incoming QEMU");
        return;
    };
    let api: Api<VirtualMachineMigration> = Api::namespaced(agent.client.clone(), &ns);
    let name = m.name_any();
    let writer = StatusWriter::new(api.clone(), &name, agent.metrics.status_writes());
    let id = format!("{ns}/{name}@{}", m.uid().unwrap_or_default());
    // When this node last listened again in the current pause, and whether a recovery
    // URI is published.
    let mut listened: Option<Instant> = None;
    let mut published = status.recovery_uri.is_some();
    let mut post_copy_seen = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let Ok(state) = postcopy::migration_status(&agent.sup, &vm).await else {
            if agent.sup.running_pid(&vm).is_none()
                && let Ok(now) = api.get(&name).await
                && let Some(why) = lost(&now, &agent.node, &m.spec.vm_name)
            {
                warn!(%why, "the incoming QEMU is gone after the switch to post-copy");
                // A guest this node took in Finish is this node's to mark lost.
                if let Err(e) = phase::mark_lost_here(agent, &now, &vm, &why).await {
                    warn!(error = %e, "could not mark the VM lost");
                }
                let lost = MigrationStatusPatch {
                    target_lost: Some(why),
                    ..Default::default()
                };
                if writer.once(&lost, None).await.is_ok() {
                    return;
                }
            }
            continue;
        };
        post_copy_seen |= postcopy::in_post_copy(state.as_deref());
        if state.as_deref() == Some("completed") && (post_copy_seen || m.in_post_copy()) {
            // Every page is here: the stream is over, and so are its TLS objects.
            if let Ok(guest) = agent.sup.require(&vm).await
                && let Err(e) = ferry_agent::tls::clear(&guest.qmp).await
            {
                warn!(error = %e, "could not remove the TLS objects");
            }
            tracing::debug!("post-copy complete here");
            return;
        }
        let paused = postcopy::is_paused(state.as_deref());
        if !paused {
            listened = None;
            if published && state.as_deref() != Some("postcopy-recover") {
                let cleared = MigrationStatusPatch {
                    recovery_uri: Some(None),
                    ..Default::default()
                };
                published = writer.once(&cleared, None).await.is_err();
            }
            continue;
        }
        if !postcopy::should_listen(paused, listened.map(|t| t.elapsed())) {
            continue;
        }
        // Direct: a fresh port. Tunnelled: the incoming socket again, reached through
        // this agent's peer endpoint.
        let tunnelled = m.spec.transport.mode == TransportMode::Tunnelled;
        let port = if tunnelled {
            None
        } else {
            let Some(port) = agent.reserve_port() else {
                warn!("post-copy paused, but no free migration port to listen on");
                continue;
            };
            Some(port)
        };
        let listen = match &port {
            Some(p) => Listen::Tcp(Some(p.port)),
            None => Listen::Incoming,
        };
        match postcopy::listen_again(&agent.sup, &vm, &id, listen).await {
            Ok(Some(uri)) => {
                drop(port);
                listened = Some(Instant::now());
                let uri = if tunnelled {
                    stream::tunnel_uri(&agent.peer_endpoint)
                } else {
                    uri
                };
                let uri = fault::advertised_uri(&uri);
                info!(%uri, "post-copy paused: listening again for the source");
                let listens = MigrationStatusPatch {
                    recovery_uri: Some(Some(uri)),
                    ..Default::default()
                };
                published = writer.once(&listens, None).await.is_ok();
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "post-copy paused: could not listen again"),
        }
    }
}

/// Why `m` can never complete, when this node's incoming QEMU of `vm` is gone: the
/// source reports post-copy (`progress.mode`), so that QEMU held the guest's state since
/// the switch. `None` before the switch (the source's stream fails and Perform rolls
/// back as for any lost target) or once the stream is over.
pub fn lost(m: &VirtualMachineMigration, node: &str, vm: &str) -> Option<String> {
    let status = m.status.as_ref()?;
    let post_copy = status
        .progress
        .as_ref()
        .and_then(|p| p.mode)
        .is_some_and(MigrationMode::is_post_copy);
    (watches_incoming(m, node) && post_copy && status.target_lost.is_none()).then(|| {
        format!(
            "the incoming QEMU of VM {vm} on {node} is gone after the switch to post-copy; \
             it held the guest's state since the switch, so the migration can never complete"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn migration(phase: MigrationPhase) -> VirtualMachineMigration {
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {"vmName": "demo"},
            "status": {"phase": phase, "sourceNode": "node-a", "targetNode": "node-b"},
        }))
        .unwrap()
    }

    #[test]
    fn the_target_reports_the_guest_lost_only_after_the_switch() {
        use MigrationMode::*;
        let with_mode = |phase, mode: Option<MigrationMode>| {
            let mut m = migration(phase);
            m.status.as_mut().unwrap().progress = mode.map(|mode| ferry_crds::Progress {
                mode: Some(mode),
                ..Default::default()
            });
            m
        };
        for mode in [PostCopy, PostCopyPaused] {
            let m = with_mode(MigrationPhase::Perform, Some(mode));
            let why = lost(&m, "node-b", "demo").expect("lost after the switch");
            assert!(why.contains("demo on node-b"), "{why}");
            assert_eq!(lost(&m, "node-a", "demo"), None, "only the target reports");
            let mut reported = m.clone();
            reported.status.as_mut().unwrap().target_lost = Some(why);
            assert_eq!(lost(&reported, "node-b", "demo"), None, "reported once");
        }
        assert_eq!(
            lost(
                &with_mode(MigrationPhase::Perform, Some(PreCopy)),
                "node-b",
                "demo"
            ),
            None
        );
        assert_eq!(
            lost(&with_mode(MigrationPhase::Perform, None), "node-b", "demo"),
            None
        );
        // After the switch Finish and Confirm carry the tail: the target still reports.
        for phase in [MigrationPhase::Finish, MigrationPhase::Confirm] {
            assert!(lost(&with_mode(phase, Some(PostCopy)), "node-b", "demo").is_some());
            assert_eq!(
                lost(&with_mode(phase, Some(PreCopy)), "node-b", "demo"),
                None
            );
        }
    }

    #[test]
    fn only_the_target_watches_and_only_while_the_stream_may_run() {
        use MigrationPhase::*;
        assert!(watches_incoming(&migration(Perform), "node-b"));
        assert!(!watches_incoming(&migration(Perform), "node-a"));
        for phase in [Pending, Begin, Prepare, Finish, Confirm, Succeeded, Failed] {
            assert!(!watches_incoming(&migration(phase), "node-b"), "{phase:?}");
        }
        for phase in [Finish, Confirm, Succeeded, Failed, Cancelled] {
            assert!(stream_over(&migration(phase)), "{phase:?}");
        }
        for phase in [Pending, Begin, Prepare, Perform] {
            assert!(!stream_over(&migration(phase)), "{phase:?}");
        }
        // After a switch to post-copy the target watches on through Finish and Confirm.
        for phase in [Finish, Confirm] {
            let mut m = migration(phase);
            m.status.as_mut().unwrap().progress = Some(ferry_crds::Progress {
                mode: Some(MigrationMode::PostCopy),
                ..Default::default()
            });
            assert!(watches_incoming(&m, "node-b"), "{phase:?}");
            assert!(!stream_over(&m), "{phase:?}");
            m.status.as_mut().unwrap().cancelled = true;
            assert!(stream_over(&m), "{phase:?}: rolled back");
        }
    }
}
