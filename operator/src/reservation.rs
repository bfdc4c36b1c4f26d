//! Guests the scheduler can see (issue 16, "The scheduler sees the guests"), without
//! I/O: one small placeholder Pod per guest and node it holds — a pause container whose
//! requests are the guest's memory (its RAM plus the QEMU overhead the agent's cgroup
//! allows, [`ferry_agent::cgroup::limits`]) and its vCPUs — so the kubelet and the
//! scheduler count the guest's resources, and ordinary Pods are not placed into memory
//! a guest uses.
//!
//! Which reservations should exist ([`wanted`]): one on the node each running VM's
//! `status.nodeName` names, and one on the target of each migration that holds a VM
//! (from admission to its end), so that a migration's target is reserved before any
//! downtime ([`crate::reservations::reserve`] refuses a migration whose reservation
//! the scheduler cannot place). [`plan`] compares that with the Pods that exist.

use std::collections::{BTreeMap, BTreeSet};

use ferry_agent::domain::Domain;
use ferry_crds::{MigrationPhase, VirtualMachine, VirtualMachineMigration, VmPhase};
use k8s_openapi::api::core::v1::{
    Affinity, Container, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    Pod, PodSpec, ResourceRequirements, Toleration,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

/// Label on every reservation Pod: the VM, `<namespace>.<name>` (as on disk locks).
pub use ferry_crds::VM_LABEL;
/// Label on every reservation Pod: the node it reserves on.
pub const NODE_LABEL: &str = "ferry.dev/reserved-node";
/// Label selecting every reservation Pod.
pub const COMPONENT: (&str, &str) = ("app.kubernetes.io/component", "guest-reservation");
/// Annotation: the migration whose admission created it (kept while that one is
/// Pending).
pub const MIGRATION_ANNOTATION: &str = "ferry.dev/migration-uid";

/// One guest's reservation on one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Want {
    pub namespace: String,
    pub vm: String,
    pub node: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
}

impl Want {
    /// The Pod's name: `ferry-guest-<digest of namespace, VM and node>` (a DNS label).
    pub fn pod_name(&self) -> String {
        pod_name(&self.namespace, &self.vm, &self.node)
    }

    pub fn vm_label(&self) -> String {
        format!("{}.{}", self.namespace, self.vm)
    }
}

pub fn pod_name(namespace: &str, vm: &str, node: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{namespace}/{vm}/{node}"));
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("ferry-guest-{hex}")
}

/// The resources of VM `vm` (its running definition, else its spec's), with
/// `overhead_mib` for QEMU beyond the guest's RAM; `None` if neither parses.
pub fn resources(vm: &VirtualMachine, overhead_mib: u64) -> Option<(u64, u32)> {
    let xml = vm
        .status
        .as_ref()
        .and_then(|s| s.domain_xml.as_deref())
        .unwrap_or(&vm.spec.domain_xml);
    let domain = Domain::parse(xml).ok()?;
    let l = ferry_agent::cgroup::limits(&domain, overhead_mib);
    Some((l.memory_bytes, l.vcpus))
}

/// The reservations that should exist: each VM whose guest runs (or starts, or is held
/// by a migration) on its node, and each active migration's target.
pub fn wanted(
    vms: &[VirtualMachine],
    migrations: &[VirtualMachineMigration],
    overhead_mib: u64,
) -> BTreeSet<Want> {
    let mut by_vm: BTreeMap<(String, String), &VirtualMachine> = BTreeMap::new();
    for vm in vms {
        by_vm.insert((vm.namespace().unwrap_or_default(), vm.name_any()), vm);
    }
    let mut out = BTreeSet::new();
    let mut add = |vm: &VirtualMachine, node: &str| {
        if let Some((memory_bytes, vcpus)) = resources(vm, overhead_mib) {
            out.insert(Want {
                namespace: vm.namespace().unwrap_or_default(),
                vm: vm.name_any(),
                node: node.to_string(),
                memory_bytes,
                vcpus,
            });
        }
    };
    for vm in vms {
        let status = vm.status.clone().unwrap_or_default();
        let holds = matches!(
            status.phase,
            Some(VmPhase::Starting | VmPhase::Running | VmPhase::Paused | VmPhase::Migrating)
        );
        if let (true, Some(node)) = (holds, status.node_name.as_deref()) {
            add(vm, node);
        }
    }
    for m in migrations {
        let status = m.status.clone().unwrap_or_default();
        let active = status
            .phase
            .is_some_and(|p| p != MigrationPhase::Pending && !p.is_terminal());
        let (Some(target), true) = (status.target_node.as_deref(), active) else {
            continue;
        };
        let key = (m.namespace().unwrap_or_default(), m.spec.vm_name.clone());
        if let Some(vm) = by_vm.get(&key) {
            add(vm, target);
        }
    }
    out
}

/// What exists of a reservation Pod, for [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub name: String,
    /// The migration whose admission created it, while that migration is Pending.
    pub pending_migration: bool,
}

/// Which Pods to create and which to delete so that the reservations are `wanted`.
pub fn plan(wanted: &BTreeSet<Want>, existing: &[Existing]) -> (Vec<Want>, Vec<String>) {
    let names: BTreeSet<String> = existing.iter().map(|e| e.name.clone()).collect();
    let want_names: BTreeSet<String> = wanted.iter().map(Want::pod_name).collect();
    let create = wanted
        .iter()
        .filter(|w| !names.contains(&w.pod_name()))
        .cloned()
        .collect();
    let delete = existing
        .iter()
        .filter(|e| !want_names.contains(&e.name) && !e.pending_migration)
        .map(|e| e.name.clone())
        .collect();
    (create, delete)
}

/// The disruption budget of one reservation Pod (`pod`, as created: its name, labels and
/// uid): `minAvailable: 1` over exactly that Pod, so no eviction (`kubectl drain`) may
/// take it while it exists; the operator deletes the Pod once the guest has left the
/// node, and the budget goes with it (the Pod owns it).
///
/// One budget per Pod, not one over all of them: a budget with `maxUnavailable` (or a
/// percentage) counts the Pods its controllers' scale expects, and the reservations'
/// controller is the operator's Deployment (1 or 2 replicas), so with more reservations
/// than replicas such a budget would allow evictions; an integer `minAvailable` over a
/// single Pod counts that Pod only.
pub fn budget(pod: &Pod) -> Option<PodDisruptionBudget> {
    let labels = pod.metadata.labels.clone()?;
    let selector: BTreeMap<String, String> = [COMPONENT.0, VM_LABEL, NODE_LABEL]
        .iter()
        .map(|k| Some((k.to_string(), labels.get(*k)?.clone())))
        .collect::<Option<_>>()?;
    Some(PodDisruptionBudget {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            labels: Some(selector.clone()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.metadata.name.clone()?,
                uid: pod.metadata.uid.clone()?,
                controller: Some(false),
                block_owner_deletion: Some(false),
            }]),
            ..Default::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

/// The placeholder Pod of `want`: a pause container with the guest's requests, placed by
/// the scheduler on exactly that node, tolerating every taint (a cordoned or tainted
/// node keeps its guests until they leave), never restarted for nothing.
///
/// `owner` is its controller (the operator's Deployment): `kubectl drain` evicts only
/// Pods that declare one, and the reservations go with Ferry when it is uninstalled.
pub fn pod(
    want: &Want,
    namespace: &str,
    image: &str,
    owner: Option<&OwnerReference>,
    migration_uid: Option<&str>,
) -> Pod {
    let requests = BTreeMap::from([
        (
            "memory".to_string(),
            Quantity(want.memory_bytes.to_string()),
        ),
        ("cpu".to_string(), Quantity(want.vcpus.to_string())),
    ]);
    let mut annotations = BTreeMap::new();
    if let Some(uid) = migration_uid {
        annotations.insert(MIGRATION_ANNOTATION.to_string(), uid.to_string());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(want.pod_name()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (COMPONENT.0.to_string(), COMPONENT.1.to_string()),
                ("app.kubernetes.io/name".to_string(), "ferry".to_string()),
                (VM_LABEL.to_string(), want.vm_label()),
                (NODE_LABEL.to_string(), want.node.clone()),
            ])),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: owner.map(|o| vec![o.clone()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_fields: Some(vec![NodeSelectorRequirement {
                                key: "metadata.name".into(),
                                operator: "In".into(),
                                values: Some(vec![want.node.clone()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: "reservation".into(),
                image: Some(image.to_string()),
                image_pull_policy: Some("IfNotPresent".into()),
                resources: Some(ResourceRequirements {
                    requests: Some(requests),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(0),
            priority_class_name: None,
            ..Default::default()
        }),
        status: None,
    }
}

/// Where a reservation Pod stands for an admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Bound to its node: the room is the guest's.
    Yes,
    /// The scheduler has not decided yet.
    NotYet,
    /// The scheduler cannot place it: its message (e.g. "0/2 nodes are available: 1
    /// Insufficient memory, ...").
    Refused(String),
}

/// [`Placed`] of `pod`, from its `spec.nodeName` and `PodScheduled` condition.
pub fn placed(pod: &Pod) -> Placed {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some()
    {
        return Placed::Yes;
    }
    let scheduled = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
    match scheduled {
        Some(c) if c.status == "False" && c.reason.as_deref() == Some("Unschedulable") => {
            Placed::Refused(c.message.clone().unwrap_or_else(|| "unschedulable".into()))
        }
        _ => Placed::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::{VirtualMachineMigrationSpec, VirtualMachineSpec, VirtualMachineStatus};
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    const XML: &str = "<domain type='kvm'><name>web</name>\
        <uuid>5f0e5fa4-3c3b-4cbb-9f2a-0e5a3b1f6c10</uuid><memory unit='MiB'>256</memory>\
        <vcpu>2</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>";

    fn vm(name: &str, phase: Option<VmPhase>, node: Option<&str>) -> VirtualMachine {
        let mut vm = VirtualMachine::new(
            name,
            VirtualMachineSpec {
                domain_xml: XML.into(),
                node_name: "node-a".into(),
                running: true,
                restore_from: None,
                termination_grace_period_seconds: None,
            },
        );
        vm.metadata.namespace = Some("t".into());
        vm.status = Some(VirtualMachineStatus {
            phase,
            node_name: node.map(str::to_string),
            ..Default::default()
        });
        vm
    }

    fn migration(vm: &str, phase: MigrationPhase, target: &str) -> VirtualMachineMigration {
        let mut m: VirtualMachineMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": format!("{vm}-m"), "namespace": "t"},
            "spec": {"vmName": vm},
        }))
        .unwrap();
        let _: &VirtualMachineMigrationSpec = &m.spec;
        m.status = Some(ferry_crds::VirtualMachineMigrationStatus {
            phase: Some(phase),
            target_node: Some(target.into()),
            ..Default::default()
        });
        m
    }

    #[test]
    fn a_running_guest_reserves_its_ram_overhead_and_vcpus_on_its_node() {
        let w = wanted(
            &[vm("web", Some(VmPhase::Running), Some("node-a"))],
            &[],
            512,
        );
        let w: Vec<_> = w.into_iter().collect();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].node, "node-a");
        assert_eq!(w[0].memory_bytes, (256 + 512) << 20);
        assert_eq!(w[0].vcpus, 2);
        // A stopped or never-started VM reserves nothing.
        assert!(
            wanted(
                &[vm("web", Some(VmPhase::Stopped), Some("node-a"))],
                &[],
                512
            )
            .is_empty()
        );
        assert!(wanted(&[vm("web", None, None)], &[], 512).is_empty());
    }

    #[test]
    fn an_active_migration_reserves_its_target_until_it_ends() {
        let vms = [vm("web", Some(VmPhase::Migrating), Some("node-a"))];
        let nodes = |m: &[VirtualMachineMigration]| -> Vec<String> {
            wanted(&vms, m, 512).into_iter().map(|w| w.node).collect()
        };
        assert_eq!(
            nodes(&[migration("web", MigrationPhase::Perform, "node-b")]),
            ["node-a", "node-b"]
        );
        assert_eq!(
            nodes(&[migration("web", MigrationPhase::Succeeded, "node-b")]),
            ["node-a"]
        );
        assert_eq!(
            nodes(&[migration("web", MigrationPhase::Pending, "node-b")]),
            ["node-a"]
        );
    }

    #[test]
    fn the_plan_creates_the_missing_and_deletes_the_unwanted_but_a_pending_admissions() {
        let want: BTreeSet<Want> = wanted(
            &[vm("web", Some(VmPhase::Running), Some("node-b"))],
            &[],
            512,
        );
        let on_b = pod_name("t", "web", "node-b");
        let on_a = pod_name("t", "web", "node-a");
        let on_c = pod_name("t", "web", "node-c");
        let existing = [
            Existing {
                name: on_a.clone(),
                pending_migration: false,
            },
            Existing {
                name: on_c.clone(),
                pending_migration: true,
            },
        ];
        let (create, delete) = plan(&want, &existing);
        assert_eq!(
            create.iter().map(Want::pod_name).collect::<Vec<_>>(),
            [on_b]
        );
        assert_eq!(delete, [on_a]);
    }

    /// The reservation of a running VM `web` on node-a.
    fn web_on_a() -> Want {
        wanted(
            &[vm("web", Some(VmPhase::Running), Some("node-a"))],
            &[],
            512,
        )
        .into_iter()
        .next()
        .unwrap()
    }

    #[test]
    fn the_pod_asks_for_the_guests_resources_on_exactly_its_node() {
        let w = web_on_a();
        let owner = OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "ferry-operator".into(),
            uid: "d-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        };
        let p = pod(
            &w,
            "ferry-system",
            "registry.k8s.io/pause:3.10",
            Some(&owner),
            Some("uid-1"),
        );
        assert_eq!(p.metadata.owner_references.as_deref(), Some(&[owner][..]));
        let spec = p.spec.unwrap();
        let req = spec.containers[0]
            .resources
            .clone()
            .unwrap()
            .requests
            .unwrap();
        assert_eq!(req["memory"].0, ((256u64 + 512) << 20).to_string());
        assert_eq!(req["cpu"].0, "2");
        let term = &spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(
            term.match_fields.as_ref().unwrap()[0].values.as_deref(),
            Some(&["node-a".to_string()][..])
        );
        assert_eq!(p.metadata.labels.unwrap()[VM_LABEL], "t.web");
        assert!(p.metadata.name.unwrap().len() <= 63);
    }

    #[test]
    fn placed_reads_the_binding_and_the_schedulers_refusal() {
        let mut p = Pod::default();
        assert_eq!(placed(&p), Placed::NotYet);
        p.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/2 nodes are available: 1 Insufficient memory.".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(
            placed(&p),
            Placed::Refused("0/2 nodes are available: 1 Insufficient memory.".into())
        );
        p.spec = Some(PodSpec {
            node_name: Some("node-b".into()),
            ..Default::default()
        });
        assert_eq!(placed(&p), Placed::Yes);
    }
    #[test]
    fn each_reservation_gets_a_budget_of_its_own_that_allows_no_eviction() {
        let w = web_on_a();
        let mut p = pod(&w, "ferry-system", "pause", None, None);
        // Not created yet: no uid for the budget's owner reference.
        assert!(budget(&p).is_none());
        p.metadata.uid = Some("p-1".into());
        let b = budget(&p).unwrap();
        assert_eq!(b.metadata.name, p.metadata.name);
        assert_eq!(b.metadata.namespace.as_deref(), Some("ferry-system"));
        let spec = b.spec.unwrap();
        assert_eq!(spec.min_available, Some(IntOrString::Int(1)));
        assert!(spec.max_unavailable.is_none());
        let selects = spec.selector.unwrap().match_labels.unwrap();
        let labels = p.metadata.labels.clone().unwrap();
        assert_eq!(selects.len(), 3);
        for (k, v) in &selects {
            assert_eq!(labels.get(k), Some(v), "{k}");
        }
        assert_eq!(selects.get(NODE_LABEL).map(String::as_str), Some("node-a"));
        let owner = &b.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Pod", "p-1"));
        assert_eq!(owner.controller, Some(false));
    }
}
