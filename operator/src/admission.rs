//! Admission of a Pending migration: is it valid, where does it go, may it start now.
//! Pure: the reconciler gathers the facts, this decides.

use std::collections::BTreeMap;

use ferry_crds::{TransportMode, VirtualMachine, VirtualMachineMigration, VmPhase};

use crate::config::Limits;

/// What to do with a Pending migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start it: Begin on `source`, then the rest towards `target`.
    Admit { source: String, target: String },
    /// Leave it Pending; `Admitted=False` with this reason and message.
    Wait {
        reason: &'static str,
        message: String,
    },
    /// It can never run: end it Failed with this reason and message.
    Reject {
        reason: &'static str,
        message: String,
    },
}

/// The facts admission needs.
pub struct Facts<'a> {
    /// The VM the migration names, if it exists.
    pub vm: Option<&'a VirtualMachine>,
    /// Nodes whose agent is live (heart-beating).
    pub live_nodes: &'a [String],
    /// How many VMs each node runs, for picking a target.
    pub vms_per_node: &'a BTreeMap<String, usize>,
    /// Migrations past Pending and not ended, other than this one.
    pub active: &'a [&'a VirtualMachineMigration],
    pub limits: Limits,
}

fn reject(reason: &'static str, message: String) -> Admission {
    Admission::Reject { reason, message }
}

fn wait(reason: &'static str, message: String) -> Admission {
    Admission::Wait { reason, message }
}

/// Decides what to do with the Pending migration `m`.
pub fn admit(m: &VirtualMachineMigration, facts: &Facts) -> Admission {
    let spec = &m.spec;
    let ns = m.metadata.namespace.as_deref().unwrap_or("default");
    if spec.transport.mode == TransportMode::Tunnelled {
        return reject(
            "Invalid",
            "spec.transport.mode: Tunnelled is not built; use Direct (with transport.tls, \
             on by default, QEMU encrypts the direct stream and checks both nodes' certificates)"
                .into(),
        );
    }
    let Some(vm) = facts.vm else {
        return reject(
            "VMNotFound",
            format!("VirtualMachine {ns}/{} does not exist", spec.vm_name),
        );
    };
    let status = vm.status.clone().unwrap_or_default();
    let source = match (status.phase, status.node_name) {
        (Some(VmPhase::Running | VmPhase::Migrating), Some(node)) => node,
        (Some(VmPhase::Stopped | VmPhase::Failed), _) => {
            return reject(
                "VMNotRunning",
                format!(
                    "VirtualMachine {ns}/{} is {:?}; only a running guest can migrate",
                    spec.vm_name,
                    status.phase.expect("matched Some")
                ),
            );
        }
        _ => {
            return wait(
                "VMNotRunning",
                format!("waiting for VirtualMachine {ns}/{} to run", spec.vm_name),
            );
        }
    };
    let me = m.metadata.name.as_deref().unwrap_or_default();
    if let Some(holder) = status.migration.as_deref().filter(|h| *h != me) {
        return wait(
            "VMBusy",
            format!(
                "VirtualMachine {ns}/{} is held by migration {holder}; this one starts after it",
                spec.vm_name
            ),
        );
    }
    if let Some(other) = facts
        .active
        .iter()
        .find(|o| o.spec.vm_name == spec.vm_name && o.metadata.namespace == m.metadata.namespace)
    {
        return wait(
            "VMBusy",
            format!(
                "VirtualMachine {ns}/{} is being moved by migration {}; this one starts after it",
                spec.vm_name,
                other.metadata.name.as_deref().unwrap_or_default()
            ),
        );
    }
    let target = match spec.target_node.as_deref() {
        Some(t) if t == source => {
            return reject(
                "SameNode",
                format!("target node {t} is the node the VM already runs on"),
            );
        }
        Some(t) if !facts.live_nodes.iter().any(|n| n == t) => {
            return reject(
                "TargetNotReady",
                format!(
                    "target node {t} has no live Ferry agent (its heartbeat Lease {} is missing or expired)",
                    ferry_crds::node_lease_name(t)
                ),
            );
        }
        Some(t) => t.to_string(),
        None => match pick_target(&source, facts.live_nodes, facts.vms_per_node) {
            Some(t) => t,
            None => {
                return reject(
                    "TargetNotReady",
                    format!("no node other than {source} has a live Ferry agent"),
                );
            }
        },
    };
    let running = facts.active.len();
    if running >= facts.limits.max_parallel {
        return wait(
            "LimitReached",
            format!(
                "{running} migrations are running in the cluster (limit {})",
                facts.limits.max_parallel
            ),
        );
    }
    let outbound = facts
        .active
        .iter()
        .filter(|o| o.status.as_ref().and_then(|s| s.source_node.as_deref()) == Some(&source))
        .count();
    if outbound >= facts.limits.max_outbound_per_node {
        return wait(
            "LimitReached",
            format!(
                "{outbound} migrations are leaving node {source} (limit {})",
                facts.limits.max_outbound_per_node
            ),
        );
    }
    Admission::Admit { source, target }
}

/// The live node, other than `source`, running the fewest VMs (by name on a tie).
pub fn pick_target(
    source: &str,
    live_nodes: &[String],
    vms_per_node: &BTreeMap<String, usize>,
) -> Option<String> {
    live_nodes
        .iter()
        .filter(|n| *n != source)
        .min_by_key(|n| (vms_per_node.get(*n).copied().unwrap_or(0), (*n).clone()))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::{
        MigrationPhase, VirtualMachineMigrationSpec, VirtualMachineMigrationStatus,
        VirtualMachineSpec, VirtualMachineStatus,
    };

    fn vm(phase: VmPhase, node: &str, holder: Option<&str>) -> VirtualMachine {
        let mut vm = VirtualMachine::new(
            "demo",
            VirtualMachineSpec {
                domain_xml: "<domain/>".into(),
                node_name: node.into(),
                running: true,
            },
        );
        vm.metadata.namespace = Some("default".into());
        vm.status = Some(VirtualMachineStatus {
            phase: Some(phase),
            node_name: Some(node.into()),
            migration: holder.map(Into::into),
            ..Default::default()
        });
        vm
    }

    fn migration(name: &str, vm: &str, target: Option<&str>) -> VirtualMachineMigration {
        let mut m = VirtualMachineMigration::new(
            name,
            serde_json::from_value::<VirtualMachineMigrationSpec>(serde_json::json!({
                "vmName": vm
            }))
            .unwrap(),
        );
        m.spec.target_node = target.map(Into::into);
        m.metadata.namespace = Some("default".into());
        m
    }

    fn running(name: &str, vm: &str, source: &str) -> VirtualMachineMigration {
        let mut m = migration(name, vm, None);
        m.status = Some(VirtualMachineMigrationStatus {
            phase: Some(MigrationPhase::Perform),
            source_node: Some(source.into()),
            ..Default::default()
        });
        m
    }

    const LIMITS: Limits = Limits {
        max_parallel: 5,
        max_outbound_per_node: 2,
    };

    fn decide(
        m: &VirtualMachineMigration,
        vm: Option<&VirtualMachine>,
        active: &[&VirtualMachineMigration],
    ) -> Admission {
        let live = [
            "node-a".to_string(),
            "node-b".to_string(),
            "node-c".to_string(),
        ];
        let counts = BTreeMap::from([("node-b".to_string(), 3), ("node-c".to_string(), 1)]);
        admit(
            m,
            &Facts {
                vm,
                live_nodes: &live,
                vms_per_node: &counts,
                active,
                limits: LIMITS,
            },
        )
    }

    #[test]
    fn admits_to_the_named_target() {
        let v = vm(VmPhase::Running, "node-a", None);
        let m = migration("m", "demo", Some("node-b"));
        assert_eq!(
            decide(&m, Some(&v), &[]),
            Admission::Admit {
                source: "node-a".into(),
                target: "node-b".into()
            }
        );
    }

    #[test]
    fn picks_the_least_loaded_live_node_other_than_the_source() {
        let v = vm(VmPhase::Running, "node-a", None);
        let m = migration("m", "demo", None);
        assert_eq!(
            decide(&m, Some(&v), &[]),
            Admission::Admit {
                source: "node-a".into(),
                target: "node-c".into()
            }
        );
        assert_eq!(pick_target("a", &["a".into()], &BTreeMap::new()), None);
    }

    #[test]
    fn refuses_what_can_never_run_naming_the_problem() {
        let v = vm(VmPhase::Running, "node-a", None);
        let cases = [
            (
                migration("m", "demo", Some("node-a")),
                Some(&v),
                "SameNode",
                "node-a is the node",
            ),
            (
                migration("m", "demo", Some("node-z")),
                Some(&v),
                "TargetNotReady",
                "node-z has no live Ferry agent",
            ),
            (
                migration("m", "gone", None),
                None,
                "VMNotFound",
                "default/gone does not exist",
            ),
        ];
        for (m, vm, want_reason, want_text) in cases {
            match decide(&m, vm, &[]) {
                Admission::Reject { reason, message } => {
                    assert_eq!(reason, want_reason);
                    assert!(message.contains(want_text), "{message}");
                }
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
        let stopped = vm(VmPhase::Stopped, "node-a", None);
        assert!(matches!(
            decide(&migration("m", "demo", None), Some(&stopped), &[]),
            Admission::Reject {
                reason: "VMNotRunning",
                ..
            }
        ));
        let mut tunnelled = migration("m", "demo", None);
        tunnelled.spec.transport.mode = TransportMode::Tunnelled;
        assert!(matches!(
            decide(&tunnelled, Some(&v), &[]),
            Admission::Reject {
                reason: "Invalid",
                ..
            }
        ));
        // TLS (the default) and plain TCP are both admitted.
        let tls = migration("m", "demo", None);
        assert!(tls.spec.transport.tls);
        assert!(matches!(
            decide(&tls, Some(&v), &[]),
            Admission::Admit { .. }
        ));
        let mut plain = migration("m", "demo", None);
        plain.spec.transport.tls = false;
        assert!(matches!(
            decide(&plain, Some(&v), &[]),
            Admission::Admit { .. }
        ));
    }

    #[test]
    fn waits_while_the_vm_is_held_or_limits_are_reached() {
        let held = vm(VmPhase::Migrating, "node-a", Some("first"));
        let m = migration("second", "demo", None);
        assert!(matches!(
            decide(&m, Some(&held), &[]),
            Admission::Wait {
                reason: "VMBusy",
                ..
            }
        ));

        let v = vm(VmPhase::Running, "node-a", None);
        let other = running("first", "demo", "node-a");
        assert!(matches!(
            decide(&m, Some(&v), &[&other]),
            Admission::Wait {
                reason: "VMBusy",
                ..
            }
        ));

        let (x, y) = (
            running("x", "vm-x", "node-a"),
            running("y", "vm-y", "node-a"),
        );
        match decide(&m, Some(&v), &[&x, &y]) {
            Admission::Wait {
                reason: "LimitReached",
                message,
            } => {
                assert!(
                    message.contains("2 migrations are leaving node node-a (limit 2)"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        let many: Vec<_> = (0..5)
            .map(|i| running(&format!("r{i}"), &format!("v{i}"), &format!("n{i}")))
            .collect();
        let refs: Vec<_> = many.iter().collect();
        assert!(matches!(
            decide(&m, Some(&v), &refs),
            Admission::Wait {
                reason: "LimitReached",
                ..
            }
        ));

        let starting = vm(VmPhase::Starting, "node-a", None);
        assert!(matches!(
            decide(&m, Some(&starting), &[]),
            Admission::Wait {
                reason: "VMNotRunning",
                ..
            }
        ));
    }
}
