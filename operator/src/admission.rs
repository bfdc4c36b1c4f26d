//! Admission of a Pending migration: is it valid, where does it go, may it start now.
//! Pure: the reconciler gathers the facts, this decides.

use std::collections::{BTreeMap, BTreeSet};

use ferry_crds::{Reason, TransportMode, VirtualMachine, VirtualMachineMigration, VmPhase};

use crate::config::Limits;
use crate::evacuate;

/// What to do with a Pending migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start it: Begin on `source`, then the rest towards `target`.
    Admit { source: String, target: String },
    /// Start a migration to a file (`spec.toFile`): Begin, Perform, Confirm on `source`;
    /// no target.
    Save { source: String },
    /// Leave it Pending; `Admitted=False` with this reason and message.
    Wait { reason: Reason, message: String },
    /// It can never run: end it Failed with this reason and message.
    Reject { reason: Reason, message: String },
}

/// The facts admission needs.
pub struct Facts<'a> {
    /// The VM the migration names, if it exists.
    pub vm: Option<&'a VirtualMachine>,
    /// Nodes whose agent is live (heart-beating).
    pub live_nodes: &'a [String],
    /// Nodes closed to new guests: cordoned, or tainted `ferry.dev/evacuate`.
    pub closed_nodes: &'a BTreeSet<String>,
    /// How many VMs each node runs, for picking a target.
    pub vms_per_node: &'a BTreeMap<String, usize>,
    /// Migrations past Pending and not ended, other than this one.
    pub active: &'a [&'a VirtualMachineMigration],
    pub limits: Limits,
}

fn reject(reason: Reason, message: String) -> Admission {
    Admission::Reject { reason, message }
}

fn wait(reason: Reason, message: String) -> Admission {
    Admission::Wait { reason, message }
}

/// Decides what to do with the Pending migration `m`.
pub fn admit(m: &VirtualMachineMigration, facts: &Facts) -> Admission {
    let spec = &m.spec;
    let ns = m.metadata.namespace.as_deref().unwrap_or("default");
    // A save has no stream between nodes: `transport` does not apply.
    if spec.transport.mode == TransportMode::Tunnelled
        && !spec.transport.tls
        && spec.to_file.is_none()
    {
        return reject(
            Reason::Invalid,
            "spec.transport.tls: false does not apply to transport.mode Tunnelled: the agents \
             always carry a tunnelled stream over their mutually authenticated TLS connection; \
             leave tls on, or use mode Direct for plain TCP"
                .into(),
        );
    }
    let Some(vm) = facts.vm else {
        return reject(
            Reason::VMNotFound,
            format!("VirtualMachine {ns}/{} does not exist", spec.vm_name),
        );
    };
    if vm.metadata.deletion_timestamp.is_some() {
        return reject(
            Reason::VMDeleting,
            format!(
                "VirtualMachine {ns}/{} is being deleted; a deleted VM does not migrate",
                spec.vm_name
            ),
        );
    }
    let status = vm.status.clone().unwrap_or_default();
    let source = match (status.phase, status.node_name) {
        (Some(VmPhase::Running | VmPhase::Migrating), Some(node)) => node,
        (Some(VmPhase::Stopped | VmPhase::Failed), _) => {
            return reject(
                Reason::VMNotRunning,
                format!(
                    "VirtualMachine {ns}/{} is {:?}; only a running guest can migrate",
                    spec.vm_name,
                    status.phase.expect("matched Some")
                ),
            );
        }
        _ => {
            return wait(
                Reason::VMNotRunning,
                format!("waiting for VirtualMachine {ns}/{} to run", spec.vm_name),
            );
        }
    };
    // An evacuation migration moves its guest off one node only: if the guest has left
    // it meanwhile (another migration moved it), there is nothing to evacuate.
    if let Some(from) = m
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(evacuate::EVACUATION_LABEL))
        && *from != evacuate::label_value(&source)
    {
        return reject(
            Reason::VMMoved,
            format!(
                "VirtualMachine {ns}/{} no longer runs on node {from}, which this migration evacuates",
                spec.vm_name
            ),
        );
    }
    let me = m.metadata.name.as_deref().unwrap_or_default();
    if let Some(holder) = status.migration.as_deref().filter(|h| *h != me) {
        return wait(
            Reason::VMBusy,
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
            Reason::VMBusy,
            format!(
                "VirtualMachine {ns}/{} is being moved by migration {}; this one starts after it",
                spec.vm_name,
                other.metadata.name.as_deref().unwrap_or_default()
            ),
        );
    }
    if spec.to_file.is_some() {
        return limit_reached(facts, &source).unwrap_or(Admission::Save { source });
    }
    let target = match spec.target_node.as_deref() {
        Some(t) if t == source => {
            return reject(
                Reason::SameNode,
                format!("target node {t} is the node the VM already runs on"),
            );
        }
        Some(t) if !facts.live_nodes.iter().any(|n| n == t) => {
            return reject(
                Reason::TargetNotReady,
                format!(
                    "target node {t} has no live Ferry agent (its heartbeat Lease {} is missing or expired)",
                    ferry_crds::node_lease_name(t)
                ),
            );
        }
        Some(t) if facts.closed_nodes.contains(t) => {
            return reject(
                Reason::TargetClosed,
                format!(
                    "target node {t} takes no new guests (cordoned, or tainted {})",
                    evacuate::EVACUATE_TAINT
                ),
            );
        }
        Some(t) => t.to_string(),
        None => match pick_target(
            &source,
            facts.live_nodes,
            facts.closed_nodes,
            facts.vms_per_node,
        ) {
            Some(t) => t,
            None => {
                return reject(
                    Reason::TargetNotReady,
                    format!(
                        "no node other than {source} has a live Ferry agent and takes new \
                         guests (not cordoned, no {} taint)",
                        evacuate::EVACUATE_TAINT
                    ),
                );
            }
        },
    };
    limit_reached(facts, &source).unwrap_or(Admission::Admit { source, target })
}

/// The cluster's and the source node's migration limits: `Some(Wait)` when one is reached.
fn limit_reached(facts: &Facts, source: &str) -> Option<Admission> {
    let running = facts.active.len();
    if running >= facts.limits.max_parallel {
        return Some(wait(
            Reason::LimitReached,
            format!(
                "{running} migrations are running in the cluster (limit {})",
                facts.limits.max_parallel
            ),
        ));
    }
    let outbound = facts
        .active
        .iter()
        .filter(|o| o.status.as_ref().and_then(|s| s.source_node.as_deref()) == Some(source))
        .count();
    if outbound >= facts.limits.max_outbound_per_node {
        return Some(wait(
            Reason::LimitReached,
            format!(
                "{outbound} migrations are leaving node {source} (limit {})",
                facts.limits.max_outbound_per_node
            ),
        ));
    }
    None
}

/// The live, open node, other than `source`, running the fewest VMs (by name on a tie).
pub fn pick_target(
    source: &str,
    live_nodes: &[String],
    closed_nodes: &BTreeSet<String>,
    vms_per_node: &BTreeMap<String, usize>,
) -> Option<String> {
    candidates(source, live_nodes, closed_nodes, vms_per_node)
        .into_iter()
        .next()
}

/// Every live, open node other than `source`, in the order [`pick_target`] prefers
/// them: with guest reservations, admission tries them in turn until the scheduler
/// finds room on one.
pub fn candidates(
    source: &str,
    live_nodes: &[String],
    closed_nodes: &BTreeSet<String>,
    vms_per_node: &BTreeMap<String, usize>,
) -> Vec<String> {
    let mut nodes: Vec<String> = live_nodes
        .iter()
        .filter(|n| *n != source && !closed_nodes.contains(*n))
        .cloned()
        .collect();
    nodes.sort_by_key(|n| (vms_per_node.get(n).copied().unwrap_or(0), n.clone()));
    nodes.dedup();
    nodes
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
                restore_from: None,
                termination_grace_period_seconds: None,
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
                closed_nodes: &BTreeSet::new(),
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
    fn a_vm_being_deleted_does_not_migrate() {
        let mut v = vm(VmPhase::Running, "node-a", None);
        v.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        ));
        let m = migration("m", "demo", Some("node-b"));
        match decide(&m, Some(&v), &[]) {
            Admission::Reject { reason, message } => {
                assert_eq!(reason, Reason::VMDeleting);
                assert!(
                    message.contains("default/demo is being deleted"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn candidates_are_the_live_open_nodes_least_loaded_first() {
        let live: Vec<String> = ["node-a", "node-b", "node-c", "node-d"]
            .map(String::from)
            .into();
        let closed = BTreeSet::from(["node-d".to_string()]);
        let load = BTreeMap::from([("node-b".to_string(), 2), ("node-c".to_string(), 1)]);
        assert_eq!(
            candidates("node-a", &live, &closed, &load),
            ["node-c", "node-b"]
        );
        assert_eq!(
            pick_target("node-a", &live, &closed, &load).as_deref(),
            Some("node-c")
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
        let none = BTreeSet::new();
        assert_eq!(
            pick_target("a", &["a".into()], &none, &BTreeMap::new()),
            None
        );
    }

    #[test]
    fn never_picks_or_accepts_a_closed_node() {
        let live = ["a".to_string(), "b".to_string(), "c".to_string()];
        let counts = BTreeMap::from([("b".to_string(), 5)]);
        let none = BTreeSet::new();
        assert_eq!(
            pick_target("a", &live, &none, &counts).as_deref(),
            Some("c")
        );
        let c_closed = BTreeSet::from(["c".to_string()]);
        assert_eq!(
            pick_target("a", &live, &c_closed, &counts).as_deref(),
            Some("b")
        );
        let all_closed = BTreeSet::from(["b".to_string(), "c".to_string()]);
        assert_eq!(pick_target("a", &live, &all_closed, &counts), None);

        let v = vm(VmPhase::Running, "node-a", None);
        let nodes = [
            "node-a".to_string(),
            "node-b".to_string(),
            "node-c".to_string(),
        ];
        let closed = BTreeSet::from(["node-b".to_string()]);
        let facts = Facts {
            vm: Some(&v),
            live_nodes: &nodes,
            closed_nodes: &closed,
            vms_per_node: &counts,
            active: &[],
            limits: LIMITS,
        };
        match admit(&migration("m", "demo", Some("node-b")), &facts) {
            Admission::Reject { reason, message } => {
                assert_eq!(reason.as_str(), "TargetClosed");
                assert!(message.contains("node-b takes no new guests"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_evacuation_migration_whose_guest_left_the_node_is_refused() {
        let v = vm(VmPhase::Running, "node-b", None);
        let mut m = migration("evacuate-demo-node-a-1", "demo", None);
        m.metadata.labels = Some(BTreeMap::from([(
            evacuate::EVACUATION_LABEL.to_string(),
            "node-a".to_string(),
        )]));
        assert!(matches!(
            decide(&m, Some(&v), &[]),
            Admission::Reject {
                reason: Reason::VMMoved,
                ..
            }
        ));
        let here = vm(VmPhase::Running, "node-a", None);
        assert!(matches!(
            decide(&m, Some(&here), &[]),
            Admission::Admit { .. }
        ));
    }

    #[test]
    fn a_save_picks_no_target_and_ignores_transport() {
        let v = vm(VmPhase::Running, "node-a", None);
        let mut m = migration("save", "demo", None);
        m.spec.to_file =
            Some(serde_json::from_value(serde_json::json!({"path": "/saves/demo.fsav"})).unwrap());
        m.spec.transport.tls = true;
        assert_eq!(
            decide(&m, Some(&v), &[]),
            Admission::Save {
                source: "node-a".into()
            }
        );
        // Still one migration of a VM at a time, and the source's outbound limit.
        let other = running("first", "demo", "node-a");
        assert!(matches!(
            decide(&m, Some(&v), &[&other]),
            Admission::Wait {
                reason: Reason::VMBusy,
                ..
            }
        ));
        let (x, y) = (
            running("x", "vm-x", "node-a"),
            running("y", "vm-y", "node-a"),
        );
        assert!(matches!(
            decide(&m, Some(&v), &[&x, &y]),
            Admission::Wait {
                reason: Reason::LimitReached,
                ..
            }
        ));
        let stopped = vm(VmPhase::Stopped, "node-a", None);
        assert!(matches!(
            decide(&m, Some(&stopped), &[]),
            Admission::Reject {
                reason: Reason::VMNotRunning,
                ..
            }
        ));
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
                    assert_eq!(reason.as_str(), want_reason);
                    assert!(message.contains(want_text), "{message}");
                }
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
        let stopped = vm(VmPhase::Stopped, "node-a", None);
        assert!(matches!(
            decide(&migration("m", "demo", None), Some(&stopped), &[]),
            Admission::Reject {
                reason: Reason::VMNotRunning,
                ..
            }
        ));
        // Tunnelled is always TLS: asking for it in plain TCP is refused, naming both.
        let mut tunnelled = migration("m", "demo", None);
        tunnelled.spec.transport.mode = TransportMode::Tunnelled;
        assert!(matches!(
            decide(&tunnelled, Some(&v), &[]),
            Admission::Admit { .. }
        ));
        tunnelled.spec.transport.tls = false;
        match decide(&tunnelled, Some(&v), &[]) {
            Admission::Reject {
                reason: Reason::Invalid,
                message,
            } => assert!(
                message.contains("spec.transport.tls: false")
                    && message.contains("transport.mode Tunnelled"),
                "{message}"
            ),
            other => panic!("expected a rejection, got {other:?}"),
        }
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
                reason: Reason::VMBusy,
                ..
            }
        ));

        let v = vm(VmPhase::Running, "node-a", None);
        let other = running("first", "demo", "node-a");
        assert!(matches!(
            decide(&m, Some(&v), &[&other]),
            Admission::Wait {
                reason: Reason::VMBusy,
                ..
            }
        ));

        let (x, y) = (
            running("x", "vm-x", "node-a"),
            running("y", "vm-y", "node-a"),
        );
        match decide(&m, Some(&v), &[&x, &y]) {
            Admission::Wait {
                reason: Reason::LimitReached,
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
                reason: Reason::LimitReached,
                ..
            }
        ));

        let starting = vm(VmPhase::Starting, "node-a", None);
        assert!(matches!(
            decide(&m, Some(&starting), &[]),
            Admission::Wait {
                reason: Reason::VMNotRunning,
                ..
            }
        ));
    }
}
