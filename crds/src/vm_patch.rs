//! Typed writes of a VirtualMachine's status: a [`VirtualMachineStatusPatch`] names what
//! one writer changes and nothing else, and becomes the JSON merge patch (RFC 7386) the
//! API server applies, as [`crate::MigrationStatusPatch`] does for a migration.

use kube::api::Patch;
use serde::{Deserialize, Serialize};

use crate::{Condition, Graphics, MigrationHolder, SavedState, VmPhase};

/// A merge patch of `VirtualMachineStatus`: every field that is `Some` is written, every
/// `None` is left as it is. The fields a writer may clear are `Option<Option<_>>`:
/// `Some(None)` removes them (`null` in the patch).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatusPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmPhase>,
    /// The one node allowed to run the guest; `Some(None)` clears it (a saved guest
    /// runs nowhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<Option<String>>,
    /// The definition the running guest runs with; `Some(None)` clears it.
    #[serde(rename = "domainXML", skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<Option<String>>,
    /// The migration holding the VM; `Some(None)` releases it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Option<String>>,
    /// The operator's record of the holding migration; `Some(None)` removes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<Option<MigrationHolder>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graphics: Option<Option<Graphics>>,
    /// `Some(Some(_))` merges into the state already there, field by field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_state: Option<Option<SavedState>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_sha256: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl VirtualMachineStatusPatch {
    /// Names `migration` as the VM's holder, or (`None`) releases it.
    pub fn holder(migration: Option<String>) -> Self {
        VirtualMachineStatusPatch {
            migration: Some(migration),
            ..Default::default()
        }
    }

    /// The operator's write of the holder: `status.migration` and `status.holder`
    /// together, set to `holder` or (`None`) both removed.
    pub fn held_by(holder: Option<MigrationHolder>) -> Self {
        VirtualMachineStatusPatch {
            migration: Some(holder.as_ref().map(|h| h.migration.clone())),
            holder: Some(holder),
            ..Default::default()
        }
    }

    /// The merge patch to send, guarded by `resource_version` when given (the API
    /// server then refuses it with 409 if the object changed since).
    pub fn to_patch(&self, resource_version: Option<&str>) -> Patch<serde_json::Value> {
        crate::patch::status_merge_patch(self, resource_version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(patch: Patch<serde_json::Value>) -> serde_json::Value {
        match patch {
            Patch::Merge(body) => body,
            other => panic!("expected a merge patch, got {other:?}"),
        }
    }

    #[test]
    fn a_patch_writes_only_what_it_names() {
        assert_eq!(
            body(VirtualMachineStatusPatch::default().to_patch(None)),
            json!({"status": {}})
        );
        assert_eq!(
            body(VirtualMachineStatusPatch::holder(Some("m1".into())).to_patch(Some("7"))),
            json!({"metadata": {"resourceVersion": "7"}, "status": {"migration": "m1"}})
        );
        // Releasing writes null: the merge removes the field.
        assert_eq!(
            body(VirtualMachineStatusPatch::holder(None).to_patch(Some("8"))),
            json!({"metadata": {"resourceVersion": "8"}, "status": {"migration": null}})
        );
        // The operator's hold writes the migration and its record together; a save's
        // record has no target, written as null so that no earlier target stays.
        let save = MigrationHolder {
            migration: "m1".into(),
            source: "node-a".into(),
            target: None,
            hand_over: false,
        };
        assert_eq!(
            body(VirtualMachineStatusPatch::held_by(Some(save)).to_patch(None)),
            json!({"status": {"migration": "m1", "holder":
                {"migration": "m1", "source": "node-a", "target": null, "handOver": false}}})
        );
        assert_eq!(
            body(VirtualMachineStatusPatch::held_by(None).to_patch(None)),
            json!({"status": {"migration": null, "holder": null}})
        );
        let p = VirtualMachineStatusPatch {
            phase: Some(VmPhase::Running),
            node_name: Some(Some("node-b".into())),
            graphics: Some(None),
            saved_state: Some(None),
            restored_from: Some(Some("/s/demo.fsav".into())),
            observed_generation: Some(3),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"phase": "Running", "nodeName": "node-b", "graphics": null,
                   "savedState": null, "restoredFrom": "/s/demo.fsav", "observedGeneration": 3})
        );
    }

    #[test]
    fn every_field_is_one_of_the_status() {
        // Every field a patch can write is a field of VirtualMachineStatus, by name.
        let p = VirtualMachineStatusPatch {
            phase: Some(VmPhase::Stopped),
            node_name: Some(Some("n".into())),
            migration: Some(Some("m".into())),
            holder: Some(Some(MigrationHolder {
                migration: "m".into(),
                source: "a".into(),
                target: Some("b".into()),
                hand_over: true,
            })),
            graphics: Some(Some(Graphics {
                type_: "vnc".into(),
                socket: "/var/lib/ferry/vms/demo/vnc.sock".into(),
            })),
            restored_from: Some(Some("/f".into())),
            restored_sha256: Some(Some("00ff".into())),
            observed_generation: Some(1),
            ..Default::default()
        };
        let status: crate::VirtualMachineStatus =
            serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::to_value(&p).unwrap()
        );
    }
}
