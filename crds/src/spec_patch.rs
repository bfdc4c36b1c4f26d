//! Typed writes of a migration's spec: the one field anyone but its author changes is
//! `spec.cancel` (the operator when the VM is deleted or a closed node opens again, the
//! `kubectl ferry cancel` plugin), and [`MigrationSpecPatch`] is that write.

use kube::api::Patch;
use serde::Serialize;

/// A merge patch of `VirtualMachineMigrationSpec` that names only `cancel`.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpecPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel: Option<bool>,
}

impl MigrationSpecPatch {
    /// Asks the migration to cancel (`spec.cancel: true`).
    pub fn cancel() -> Self {
        MigrationSpecPatch { cancel: Some(true) }
    }

    /// The merge patch to send, guarded by `resource_version` when given (the API
    /// server then refuses it with 409 if the object changed since).
    pub fn to_patch(&self, resource_version: Option<&str>) -> Patch<serde_json::Value> {
        let spec = serde_json::to_value(self).expect("a spec patch always serializes");
        let mut body = serde_json::json!({ "spec": spec });
        if let Some(rv) = resource_version {
            body["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        Patch::Merge(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cancel_writes_spec_cancel_and_only_that() {
        let body = |p: Patch<serde_json::Value>| match p {
            Patch::Merge(b) => b,
            other => panic!("expected a merge patch, got {other:?}"),
        };
        assert_eq!(
            body(MigrationSpecPatch::cancel().to_patch(None)),
            json!({"spec": {"cancel": true}})
        );
        assert_eq!(
            body(MigrationSpecPatch::cancel().to_patch(Some("42"))),
            json!({"metadata": {"resourceVersion": "42"}, "spec": {"cancel": true}})
        );
        // Every field it writes is one of the spec, by name.
        let spec: crate::VirtualMachineMigrationSpec = serde_json::from_value(json!({
            "vmName": "demo", "cancel": true
        }))
        .unwrap();
        assert!(spec.cancel);
    }
}
