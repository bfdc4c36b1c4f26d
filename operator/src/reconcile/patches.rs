//! What the reconciler writes, as typed patches built by pure functions: each status
//! write of a migration is a [`MigrationStatusPatch`], the VM's holder a
//! [`VirtualMachineStatusPatch`], labels and finalizers a [`MetadataPatch`]. The tests
//! hold each to the JSON the operator sent when these were literals.

use std::collections::BTreeMap;

use ferry_crds::{
    Condition, MigrationHolder, MigrationPhase, MigrationPolicy, MigrationStatusPatch, Step,
    VirtualMachineStatusPatch,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Patch;
use serde::Serialize;

/// Still Pending: why, in the `Admitted` condition of `conditions`.
pub(super) fn pending(conditions: Vec<Condition>, generation: Option<i64>) -> MigrationStatusPatch {
    MigrationStatusPatch {
        phase: Some(MigrationPhase::Pending),
        conditions: Some(conditions),
        observed_generation: generation,
        ..Default::default()
    }
}

/// Admitted: Begin on `source`, towards `target` with the policy in force (`None` for a
/// migration to a file).
pub(super) fn begin(
    source: &str,
    target: Option<(&str, MigrationPolicy)>,
    conditions: Vec<Condition>,
    generation: Option<i64>,
    now: Time,
) -> MigrationStatusPatch {
    let (target_node, policy) = match target {
        Some((node, policy)) => (Some(node.to_string()), Some(policy)),
        None => (None, None),
    };
    MigrationStatusPatch {
        phase: Some(MigrationPhase::Begin),
        phase_transition_time: Some(now),
        source_node: Some(source.to_string()),
        target_node,
        policy,
        conditions: Some(conditions),
        observed_generation: generation,
        ..Default::default()
    }
}

/// The next phase, with the rollback flag.
pub(super) fn enter(
    phase: MigrationPhase,
    cancelled: bool,
    conditions: Vec<Condition>,
    generation: Option<i64>,
    now: Time,
) -> MigrationStatusPatch {
    MigrationStatusPatch {
        phase_transition_time: Some(now),
        conditions: Some(conditions),
        observed_generation: generation,
        ..MigrationStatusPatch::enter(phase, cancelled)
    }
}

/// The terminal `phase` (the rollback flag stays as it is).
pub(super) fn end(
    phase: MigrationPhase,
    conditions: Vec<Condition>,
    generation: Option<i64>,
    now: Time,
) -> MigrationStatusPatch {
    MigrationStatusPatch {
        phase: Some(phase),
        phase_transition_time: Some(now),
        conditions: Some(conditions),
        observed_generation: generation,
        ..Default::default()
    }
}

/// Asks the source to stop the transfer.
pub(super) fn cancel() -> MigrationStatusPatch {
    MigrationStatusPatch {
        cancelled: Some(true),
        ..Default::default()
    }
}

/// Confirm runs again: its step cleared, its time counted anew.
pub(super) fn retry_confirm(now: Time) -> MigrationStatusPatch {
    MigrationStatusPatch {
        phase_transition_time: Some(now),
        ..Default::default()
    }
    .without_step(MigrationPhase::Confirm)
}

/// The operator gave up on `phase`: its record `step` (Failed), and why it rolls back.
pub(super) fn gave_up(
    phase: MigrationPhase,
    step: Step,
    conditions: Vec<Condition>,
) -> MigrationStatusPatch {
    MigrationStatusPatch {
        conditions: Some(conditions),
        ..Default::default()
    }
    .with_step(phase, step)
}

/// The conditions, and nothing else.
pub(super) fn conditions(conditions: Vec<Condition>) -> MigrationStatusPatch {
    MigrationStatusPatch {
        conditions: Some(conditions),
        ..Default::default()
    }
}

/// The VM held by the migration `holder` records, or released (`None`): its
/// `status.migration` and `status.holder` together.
pub(super) fn vm_holder(holder: Option<MigrationHolder>) -> VirtualMachineStatusPatch {
    VirtualMachineStatusPatch::held_by(holder)
}

/// A merge patch of an object's metadata: the labels it adds, its finalizers, and the
/// resourceVersion it applies to.
#[derive(Serialize, Default, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) struct MetadataPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finalizers: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

impl MetadataPatch {
    pub(super) fn to_patch(&self) -> Patch<serde_json::Value> {
        Patch::Merge(serde_json::json!({ "metadata": self }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::StepOutcome;
    use ferry_crds::{Reason, SOURCE_NODE_LABEL, TARGET_NODE_LABEL};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use serde_json::{Value, json};

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    fn conds() -> Vec<Condition> {
        let mut cs = Vec::new();
        ferry_crds::set_condition(
            &mut cs,
            ferry_crds::conditions::ADMITTED,
            true,
            Reason::Admitted,
            "moving",
            Some(2),
            at(0),
        );
        cs
    }

    fn status(p: &MigrationStatusPatch) -> Value {
        serde_json::to_value(p).unwrap()
    }

    fn body(p: Patch<Value>) -> Value {
        match p {
            Patch::Merge(v) => v,
            other => panic!("expected a merge patch, got {other:?}"),
        }
    }

    // Each `json!` below is the literal the reconciler sent before the patches were typed.

    #[test]
    fn admission_writes_what_it_wrote() {
        let gen_ = Some(2);
        assert_eq!(
            status(&pending(conds(), gen_)),
            json!({"phase": MigrationPhase::Pending, "conditions": conds(), "observedGeneration": gen_})
        );
        let policy = MigrationPolicy::default();
        let mut old = json!({
            "phase": MigrationPhase::Begin,
            "phaseTransitionTime": at(5),
            "sourceNode": "node-a",
            "conditions": conds(),
            "observedGeneration": gen_,
        });
        assert_eq!(status(&begin("node-a", None, conds(), gen_, at(5))), old);
        old["targetNode"] = json!("node-b");
        old["policy"] = json!(policy.clone());
        assert_eq!(
            status(&begin(
                "node-a",
                Some(("node-b", policy)),
                conds(),
                gen_,
                at(5)
            )),
            old
        );
    }

    #[test]
    fn the_phase_writes_are_what_they_were() {
        let gen_ = Some(3);
        for cancelled in [false, true] {
            assert_eq!(
                status(&enter(
                    MigrationPhase::Finish,
                    cancelled,
                    conds(),
                    gen_,
                    at(7)
                )),
                json!({
                    "phase": MigrationPhase::Finish,
                    "cancelled": cancelled,
                    "phaseTransitionTime": at(7),
                    "conditions": conds(),
                    "observedGeneration": gen_,
                })
            );
        }
        assert_eq!(
            status(&end(MigrationPhase::Cancelled, conds(), gen_, at(8))),
            json!({
                "phase": MigrationPhase::Cancelled,
                "phaseTransitionTime": at(8),
                "conditions": conds(),
                "observedGeneration": gen_,
            })
        );
        assert_eq!(status(&cancel()), json!({"cancelled": true}));
        assert_eq!(
            status(&retry_confirm(at(9))),
            json!({"steps": {"confirm": null}, "phaseTransitionTime": at(9)})
        );
        assert_eq!(status(&conditions(conds())), json!({"conditions": conds()}));
    }

    #[test]
    fn a_given_up_step_is_what_it_was_and_says_why() {
        let (start, end) = (MicroTime(at(1).0), MicroTime(at(2).0));
        let step = Step {
            end: Some(end.clone()),
            outcome: Some(StepOutcome::Failed),
            reason: Some(Reason::Timeout),
            message: Some("too slow".into()),
            ..Step::started("node-b", start.clone())
        };
        let mut got = status(&gave_up(MigrationPhase::Prepare, step, conds()));
        // New: the step carries the reason too.
        let reason = got["steps"]["prepare"]
            .as_object_mut()
            .unwrap()
            .remove("reason");
        assert_eq!(reason, Some(json!("Timeout")));
        assert_eq!(
            got,
            json!({
                "steps": {"prepare": {
                    "node": "node-b",
                    "start": start,
                    "end": end,
                    "outcome": "Failed",
                    "message": "too slow",
                }},
                "conditions": conds(),
            })
        );
    }

    #[test]
    fn the_guards_and_the_vm_holder_are_what_they_were() {
        assert_eq!(
            body(cancel().to_patch(Some("41"))),
            json!({"metadata": {"resourceVersion": "41"}, "status": {"cancelled": true}})
        );
        assert_eq!(
            body(cancel().to_patch(None)),
            json!({"status": {"cancelled": true}})
        );
        // The VM's holder now comes with the record the admission policies read.
        let held = super::super::hand_over::holder("m1", "node-a", Some("node-b"));
        assert_eq!(
            body(vm_holder(Some(held)).to_patch(Some("42"))),
            json!({
                "metadata": {"resourceVersion": "42"},
                "status": {"migration": "m1", "holder": {"migration": "m1",
                    "source": "node-a", "target": "node-b", "handOver": false}},
            })
        );
        assert_eq!(
            body(vm_holder(None).to_patch(Some("43"))),
            json!({
                "metadata": {"resourceVersion": "43"},
                "status": {"migration": null, "holder": null},
            })
        );
    }

    #[test]
    fn the_metadata_writes_are_what_they_were() {
        let finalizers = vec!["a".to_string(), ferry_crds::ROLLBACK_FINALIZER.into()];
        let labels = BTreeMap::from([
            (SOURCE_NODE_LABEL.to_string(), "node-a".to_string()),
            (TARGET_NODE_LABEL.to_string(), "node-b".to_string()),
        ]);
        let p = MetadataPatch {
            labels: Some(labels),
            finalizers: Some(finalizers.clone()),
            ..Default::default()
        };
        assert_eq!(
            body(p.to_patch()),
            json!({"metadata": {
                "labels": {SOURCE_NODE_LABEL: "node-a", TARGET_NODE_LABEL: "node-b"},
                "finalizers": finalizers,
            }})
        );
        let p = MetadataPatch {
            finalizers: Some(finalizers.clone()),
            resource_version: Some("43".into()),
            ..Default::default()
        };
        assert_eq!(
            body(p.to_patch()),
            json!({"metadata": {"finalizers": finalizers, "resourceVersion": "43"}})
        );
    }
}
