//! `VirtualMachine`: a QEMU guest that Ferry runs on one node.

// Each `printcolumn(...)` of the CustomResource derive repeats keys such as `type_`,
// which clippy takes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Condition, SavedState};

/// A QEMU guest that Ferry runs. The agent on `status.nodeName` (or, before the first
/// start, `spec.nodeName`) starts it from `spec.domainXML` and reports what it sees.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "VirtualMachine",
    namespaced,
    status = "VirtualMachineStatus",
    shortname = "fvm",
    category = "ferry",
    annotation("helm.sh/resource-policy", "keep"),
    doc = "A QEMU guest that Ferry runs on one node and can live-migrate to another.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Migration", type_ = "string", json_path = ".status.migration"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// The guest's definition in libvirt's domain XML format, in the subset Ferry
    /// supports: name, uuid, memory, vcpu, os type (arch, machine), features, cpu mode,
    /// file disks, user-mode interfaces, a VNC graphics device and a serial console
    /// written to a file. Any other element or attribute is refused with a message
    /// naming it. A running guest keeps the definition it started with
    /// (`status.domainXML`): a change here applies at its next start (condition
    /// `RestartRequired`), and one that cannot apply is reported (`DomainRefused`).
    #[serde(rename = "domainXML")]
    #[schemars(length(min = 1, max = 65536))]
    pub domain_xml: String,

    /// The node to start the guest on. After the first start the node actually
    /// running the guest is `status.nodeName`; a migration moves that, not this.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,

    /// Whether the guest should be running. Setting it to false stops the guest
    /// gracefully (ACPI power-off, then a forced stop after
    /// `terminationGracePeriodSeconds`).
    #[serde(default = "default_true")]
    pub running: bool,

    /// Start the guest from a saved state (a file a migration with `toFile` wrote)
    /// instead of booting it: the agent of the node that starts the guest checks the
    /// file (its MAC under the cluster's state key, format, checksum, that it holds this
    /// guest, and that `domainXML` is ABI-compatible with the saved definition) before
    /// it starts QEMU, then loads the state and resumes the guest where it stopped. A
    /// refused file leaves the VM as it was, with a `Ready=False` condition and an Event
    /// naming the problem. Used once: after a restore `status.restoredFrom` and
    /// `status.restoredSha256` name the file, a later start boots, and the same file
    /// (by its SHA-256, at any path) is not restored again unless `status.restoredFrom`
    /// is cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/') && !self.endsWith('/') && !self.contains('/../') && !self.endsWith('/..') && !self.contains('/./')").message("restoreFrom must be an absolute file path without '.' or '..' components"))]
    pub restore_from: Option<String>,

    /// How long the guest is given to power off after the ACPI request — when the VM is
    /// deleted, or stopped through `running: false` — before its QEMU is stopped.
    /// Defaults to 30 seconds; 0 stops QEMU at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// The grace period a deleted VM's guest gets when the spec names none.
pub const DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS: i64 = 30;

impl VirtualMachineSpec {
    /// `terminationGracePeriodSeconds`, or its default.
    pub fn termination_grace_period(&self) -> std::time::Duration {
        let secs = self
            .termination_grace_period_seconds
            .unwrap_or(DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS)
            .max(0);
        std::time::Duration::from_secs(secs as u64)
    }
}

fn default_true() -> bool {
    true
}

/// What the agent running the guest observes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Where the guest is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmPhase>,

    /// The one node allowed to run the guest's vCPUs. A migration moves it to the
    /// target in its Finish phase, guarded by resourceVersion, before the guest resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,

    /// The definition the running guest started with (or that a migration moved it
    /// with, `targetDomainXML` when one was given). A running guest keeps it whatever
    /// `spec.domainXML` says meanwhile: a changed spec applies at the next start.
    #[serde(rename = "domainXML", default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,

    /// The name of the VirtualMachineMigration holding the guest, if one is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,

    /// What the operator recorded about the migration holding the guest: its nodes and
    /// whether it reached its hand-over (Finish). Written only by the operator, with
    /// `migration`; the admission policies read it to check an agent's `nodeName` write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<MigrationHolder>,

    /// Where a console client connects to the guest now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<Graphics>,

    /// The guest's state saved by a migration to a file; set while the guest is
    /// stopped in that state (`phase: Stopped`, no QEMU runs), cleared by a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_state: Option<SavedState>,

    /// The saved state (`spec.restoreFrom`) the running guest was restored from.
    /// Clearing it allows the file of `restoredSha256` to be restored once more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,

    /// The SHA-256 (hex, as the file's trailer records it) of the saved state the guest
    /// was restored from: the file's identity, so that another file written later at
    /// the same path is restored, and this one is not restored again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_sha256: Option<String>,

    /// Standard conditions: `Ready` (the guest runs and answers QMP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The migration holding a VM, as the operator recorded it in the VM's status
/// (`status.holder`): a ValidatingAdmissionPolicy cannot read the migration itself, so
/// what it needs to judge an agent's `status.nodeName` write is copied here.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationHolder {
    /// The holding migration's name (equal to `status.migration` while it holds the VM).
    pub migration: String,
    /// The node the guest migrates from.
    pub source: String,
    /// The node it migrates to; none for a migration to a file. (Always serialized: a
    /// merge patch with `null` removes a target left from before.)
    #[serde(default)]
    pub target: Option<String>,
    /// True from the moment the operator lets the migration enter Finish without
    /// `cancelled` (peer-to-peer: once it sees the source agent entered it): from then
    /// on, until the VM is released, the target may take `status.nodeName` (and the
    /// source take it back, after a Finish whose guest never ran on the target).
    #[serde(default)]
    pub hand_over: bool,
}

/// A guest's lifecycle phase.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VmPhase {
    /// Accepted, not yet started.
    Pending,
    /// QEMU is starting.
    Starting,
    /// The guest's vCPUs run.
    Running,
    /// The guest exists but its vCPUs are stopped.
    Paused,
    /// A migration holds the guest.
    Migrating,
    /// The guest is shut down.
    Stopped,
    /// The guest died or could not start; `conditions` say why.
    Failed,
}

/// A graphical console endpoint: a UNIX socket on the guest's node (`status.nodeName`),
/// never a TCP port.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Graphics {
    /// The protocol, e.g. `vnc`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The console's UNIX socket on the node, in the guest's state dir (only the agent
    /// and root on the node reach it).
    pub socket: String,
}
