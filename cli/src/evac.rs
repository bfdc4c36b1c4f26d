//! Where an evacuation stands, for `kubectl ferry evacuate` (pure).

use ferry_crds::{MigrationPhase, VirtualMachine, VirtualMachineMigration, VmPhase};
use kube::ResourceExt;

/// Where the evacuation of a node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No running guest is left on the node.
    Done,
    /// Every guest left is stuck (the operator said so in an `EvacuationStuck` Event and
    /// no migration of it runs): (namespace/vm, what the operator said).
    Stuck(Vec<(String, String)>),
    /// Guests are still moving (or waiting their turn).
    Going { left: usize },
}

/// `guests`: the VMs whose `status.nodeName` is the node; `migrations`: its
/// evacuation migrations; `stuck`: the notes of the `EvacuationStuck` Events about
/// the node since the command started.
pub fn state(
    node: &str,
    guests: &[VirtualMachine],
    migrations: &[VirtualMachineMigration],
    stuck: &[String],
) -> State {
    let left: Vec<String> = guests
        .iter()
        .filter(|v| {
            v.status.as_ref().is_some_and(|s| {
                s.node_name.as_deref() == Some(node)
                    && matches!(s.phase, Some(VmPhase::Running | VmPhase::Migrating))
            })
        })
        .map(|v| format!("{}/{}", v.namespace().unwrap_or_default(), v.name_any()))
        .collect();
    let ended = |m: &VirtualMachineMigration| {
        m.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(MigrationPhase::is_terminal)
    };
    let moving = |vm: &str| {
        migrations.iter().any(|m| {
            format!("{}/{}", m.namespace().unwrap_or_default(), m.spec.vm_name) == vm && !ended(m)
        })
    };
    if left.is_empty() {
        // Done once the migrations have ended too (the guest leaves in Finish).
        return if migrations.iter().any(|m| !ended(m)) {
            State::Going { left: 0 }
        } else {
            State::Done
        };
    }
    let said = |vm: &str| {
        stuck
            .iter()
            .find(|note| note.starts_with(&format!("{vm} cannot leave {node}")))
    };
    let mut reported = Vec::new();
    for vm in &left {
        match said(vm) {
            Some(note) if !moving(vm) => reported.push((vm.clone(), note.clone())),
            _ => return State::Going { left: left.len() },
        }
    }
    State::Stuck(reported)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(name: &str, node: &str) -> VirtualMachine {
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"domainXML": "<domain/>", "nodeName": node},
            "status": {"phase": "Running", "nodeName": node},
        }))
        .unwrap()
    }

    fn m(vm: &str, phase: &str) -> VirtualMachineMigration {
        serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": format!("evacuate-{vm}-node-a-1"), "namespace": "default"},
            "spec": {"vmName": vm},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn done_when_no_running_guest_is_left() {
        let elsewhere = [vm("a", "node-b")];
        assert_eq!(state("node-a", &elsewhere, &[], &[]), State::Done);
        // The guest leaves in Finish; the migration still has Confirm to go.
        let confirming = [m("a", "Confirm")];
        assert_eq!(
            state("node-a", &elsewhere, &confirming, &[]),
            State::Going { left: 0 }
        );
        let ended = [m("a", "Succeeded")];
        assert_eq!(state("node-a", &elsewhere, &ended, &[]), State::Done);
    }

    #[test]
    fn going_while_any_guest_moves_or_is_not_reported_stuck() {
        let here = [vm("a", "node-a"), vm("b", "node-a")];
        let ms = [m("a", "Perform")];
        assert_eq!(state("node-a", &here, &ms, &[]), State::Going { left: 2 });
        let note = "default/a cannot leave node-a (NoTarget): ...".to_string();
        assert_eq!(
            state("node-a", &here[..1], &ms, std::slice::from_ref(&note)),
            State::Going { left: 1 },
            "reported once, but a migration runs now"
        );
    }

    #[test]
    fn stuck_when_every_guest_left_was_reported_and_none_moves() {
        let here = [vm("a", "node-a")];
        let ms = [m("a", "Failed")];
        let note = "default/a cannot leave node-a (NoTarget): no node".to_string();
        assert_eq!(
            state("node-a", &here, &ms, std::slice::from_ref(&note)),
            State::Stuck(vec![("default/a".into(), note)])
        );
    }
}
