//! `VirtualMachineMigration`: one attempt to move one running guest to another node.

// Each `printcolumn(...)` of the CustomResource derive repeats keys such as `type_`,
// which clippy takes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Condition, MigrationPolicy};

/// The largest cookie a phase may hand to the next, in bytes (libvirt's limit too).
pub const MAX_COOKIE_BYTES: usize = 16384;

/// One attempt to live-migrate one VirtualMachine to another node.
///
/// The operator drives the five phases of libvirt's v3 protocol by setting
/// `status.phase`; the agents on the source and target nodes execute them and hand
/// each other XML cookies through `status.cookies`. A failed or cancelled migration
/// leaves the guest running where it was.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "VirtualMachineMigration",
    namespaced,
    status = "VirtualMachineMigrationStatus",
    shortname = "vmm",
    category = "ferry",
    annotation("helm.sh/resource-policy", "keep"),
    doc = "One attempt to live-migrate one VirtualMachine to another node.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.vmName"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceNode"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetNode"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.percent",
        description = "Percent of guest memory transferred"
    ),
    printcolumn(
        name = "Downtime",
        type_ = "integer",
        json_path = ".status.downtimeMs",
        description = "Guest downtime in milliseconds"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.toFile) || (!has(self.targetNode) && !has(self.targetDomainXML))").message("toFile cannot be combined with targetNode or targetDomainXML: a migration to a file has no target node"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.toFile) || !has(self.mode) || self.mode != 'PeerToPeer'").message("toFile cannot be combined with mode PeerToPeer: a migration to a file has no target agent"))]
pub struct VirtualMachineMigrationSpec {
    /// The VirtualMachine to migrate, in the migration's namespace. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("vmName is immutable"))]
    pub vm_name: String,

    /// The node to migrate to. When empty the operator picks a node whose agent is
    /// ready, other than the source. Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub target_node: Option<String>,

    /// A domain definition for the target (libvirt's `xmlin`). It may change host-side
    /// details only (disk source paths, interface backends, graphics listen address and
    /// port, serial output path); Begin checks it for guest ABI stability and refuses
    /// the migration, before any downtime, when it changes what the guest sees.
    #[serde(
        rename = "targetDomainXML",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1, max = 65536))]
    pub target_domain_xml: Option<String>,

    /// Save the guest's full state into a file instead of moving it to another node
    /// (libvirt's save). The source agent writes the file (through an optional
    /// compressor) and, once it is saved, stops the guest; the VM then reports
    /// `status.phase: Stopped` and `status.savedState`. A VirtualMachine whose
    /// `spec.restoreFrom` names the file starts from it. Cannot be combined with
    /// `targetNode` or `targetDomainXML`; `policy` and `transport` do not apply.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("toFile is immutable"))]
    pub to_file: Option<ToFile>,

    /// Who drives the five phases: `Managed` (default; the operator, through the
    /// status) or `PeerToPeer` (the source agent calls the target agent directly,
    /// recording every step and cookie in the status). Immutable.
    #[serde(default)]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("mode is immutable"))]
    pub mode: crate::ControlMode,

    /// How the transfer behaves: bandwidth, downtime, convergence.
    #[serde(default)]
    pub policy: MigrationPolicy,

    /// How the migration stream travels between the nodes.
    #[serde(default)]
    pub transport: Transport,

    /// Set to true to cancel the migration. A migration that has not yet handed the
    /// guest to the target rolls back and the guest keeps running on the source.
    /// Deleting the object cancels it too.
    #[serde(default)]
    pub cancel: bool,
}

impl VirtualMachineMigration {
    /// Whether the user asked to stop it: `spec.cancel`, or a deletion.
    pub fn cancel_asked(&self) -> bool {
        self.spec.cancel || self.metadata.deletion_timestamp.is_some()
    }

    /// The phase it is in (`None` before the operator first saw it).
    pub fn phase(&self) -> Option<MigrationPhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }

    /// Whether it is rolling back (`status.cancelled`).
    pub fn rolling_back(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.cancelled)
    }

    /// Whether the transfer switched to post-copy, after which nothing rolls back.
    pub fn in_post_copy(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .and_then(|p| p.mode)
            .is_some_and(MigrationMode::is_post_copy)
    }

    /// Whether the migration's stream may still run: during Perform, and after a switch
    /// to post-copy through Finish and Confirm (the target runs the guest while the
    /// last pages follow), unless a rollback started (the guest is then lost, and
    /// nothing is left to carry).
    pub fn stream_runs(&self) -> bool {
        let Some(status) = self.status.as_ref() else {
            return false;
        };
        match status.phase {
            Some(MigrationPhase::Perform) => true,
            Some(MigrationPhase::Finish | MigrationPhase::Confirm) => {
                self.in_post_copy() && !status.cancelled
            }
            _ => false,
        }
    }

    /// The record of `phase`, if it has one.
    pub fn step(&self, phase: MigrationPhase) -> Option<&Step> {
        self.status.as_ref()?.steps.as_ref()?.get(phase)
    }

    /// The source node and the target node (empty when not chosen yet).
    pub fn nodes(&self) -> (&str, &str) {
        let s = self.status.as_ref();
        (
            s.and_then(|s| s.source_node.as_deref()).unwrap_or_default(),
            s.and_then(|s| s.target_node.as_deref()).unwrap_or_default(),
        )
    }
}

/// Where and how a migration to a file saves the guest.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToFile {
    /// Absolute path of the file on the source node (a path or volume its agent can
    /// write, e.g. the chart's `agent.saveVolume`). The file must not exist: a save
    /// never overwrites one. It is written under a temporary name and renamed into
    /// place once complete.
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/') && !self.endsWith('/') && !self.contains('/../') && !self.endsWith('/..') && !self.contains('/./')").message("path must be an absolute file path without '.' or '..' components"))]
    pub path: String,

    /// How the file is compressed: None (the default), Gzip, Zstd or Xz.
    #[serde(default)]
    pub compression: SaveCompression,
}

/// Compression of a saved-state file.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SaveCompression {
    /// The stream as QEMU sends it.
    #[default]
    None,
    /// gzip (deflate), level 6.
    Gzip,
    /// zstd, level 3.
    Zstd,
    /// xz (LZMA2), preset 6.
    Xz,
}

/// A saved guest state: where it is and what it took.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    /// The file, on the node that saved it (and any node that can read it).
    pub path: String,
    /// How the file is compressed.
    pub compression: SaveCompression,
    /// The node that wrote it.
    pub node: String,
    /// Bytes of the guest's state (QEMU's migration stream, uncompressed).
    pub stream_bytes: i64,
    /// Bytes of the file (compressed, with Ferry's header and trailer).
    pub file_bytes: i64,
    /// How long the save took, from pausing the guest to the file in place, in
    /// milliseconds.
    pub save_time_ms: i64,
    /// The migration that saved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// When the file was in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_at: Option<Time>,
}

/// How the migration stream travels between the nodes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transport {
    /// Direct: QEMU to QEMU. Tunnelled: through the agents' own connection, so that only
    /// the agents' peer port need be open between the nodes.
    #[serde(default = "default_transport_mode")]
    pub mode: TransportMode,
    /// TLS on the stream (default true): QEMU encrypts it with the nodes' certificates
    /// from the cluster's migration CA, and the target accepts only the source node's
    /// certificate. false sends it in plain TCP; turning it off must be explicit, and is
    /// refused in mode Tunnelled (the agents' connection is always TLS).
    #[serde(default = "default_true")]
    pub tls: bool,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            mode: TransportMode::Direct,
            tls: true,
        }
    }
}

fn default_transport_mode() -> TransportMode {
    TransportMode::Direct
}

fn default_true() -> bool {
    true
}

/// How the migration stream travels.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TransportMode {
    /// QEMU on the source connects to QEMU on the target.
    Direct,
    /// The agents carry the stream between the nodes over their peer API (mutual TLS
    /// with the node certificates), one connection per QEMU channel; neither QEMU
    /// touches the network.
    Tunnelled,
}

/// What the operator and the agents have done so far. Only they write it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationStatus {
    /// The phase the migration is in. The operator sets it; the agent named for the
    /// phase executes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,

    /// When the operator moved the migration into its current phase; phase timeouts
    /// count from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_transition_time: Option<Time>,

    /// True once the migration is rolling back: Finish and Confirm then undo their
    /// side instead of completing it, and the guest stays on the source.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,

    /// The policy in force: the cluster-wide defaults (the chart's
    /// `migrations.defaultPolicy`) overlaid with `spec.policy`, fixed by the operator when
    /// it admits the migration. Both agents apply this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<MigrationPolicy>,

    /// The node the guest runs on when the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,

    /// The node the guest moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,

    /// The domain definition Begin chose for the target: the running one, or the
    /// ABI-checked `spec.targetDomainXML`. Prepare starts the target QEMU from it.
    #[serde(
        rename = "targetDomainXML",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 65536))]
    pub target_domain_xml: Option<String>,

    /// Where the target listens for the migration stream (set by Prepare).
    #[serde(
        rename = "migrationURI",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub migration_uri: Option<String>,

    /// Where the target listens again after a cut stream paused a post-copy migration
    /// (QEMU's `migrate-recover`); the source resumes the migration to it. Set by the
    /// target agent while `progress.mode` is PostCopyPaused.
    #[serde(
        rename = "recoveryURI",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub recovery_uri: Option<String>,

    /// Set by the target agent when its QEMU died after the switch to post-copy: why the
    /// migration can never complete. The guest's state was split between the two QEMUs,
    /// so the guest is lost; the source's Perform fails and the rollback removes the
    /// source QEMU, and the VM is marked Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_lost: Option<String>,

    /// The XML cookie each phase hands to the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookies: Option<Cookies>,

    /// When and where each phase ran, and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Steps>,

    /// Transfer progress while Perform runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// What a migration to a file saved (set by the source agent in Perform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_state: Option<SavedState>,

    /// How long the guest was paused for the switch-over, in milliseconds: from the
    /// source pausing it to the target resuming it (written in Confirm). Until then,
    /// QEMU's own figure, which ends with the stream (written in Perform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<i64>,

    /// How long the transfer took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<i64>,

    /// Standard conditions: `Admitted` (False while the migration waits in Pending, with
    /// the reason), `RollingBack` (why a rollback started), `Complete` (the guest runs on
    /// the target) and `Failed` (the migration ended without moving the guest; the
    /// reason and message say why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The phases of a migration: the five of libvirt's v3 protocol between Pending and
/// the three terminal ones.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MigrationPhase {
    /// Accepted, waiting to start (validation, limits).
    Pending,
    /// Source: checks the guest can migrate, takes the migration lock.
    Begin,
    /// Target: starts a paused QEMU waiting for the stream.
    Prepare,
    /// Source: sends the guest's state to the target.
    Perform,
    /// Target: takes ownership and resumes the guest, or kills its QEMU on rollback.
    Finish,
    /// Source: removes the old QEMU, or resumes the guest on rollback.
    Confirm,
    /// The guest runs on the target.
    Succeeded,
    /// The migration ended without moving the guest; it runs on the source.
    Failed,
    /// The migration was cancelled; the guest runs on the source.
    Cancelled,
}

impl MigrationPhase {
    /// The key of this phase in `status.steps` and `status.cookies`.
    pub fn key(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Begin => "begin",
            Self::Prepare => "prepare",
            Self::Perform => "perform",
            Self::Finish => "finish",
            Self::Confirm => "confirm",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the source node runs this phase (Begin, Perform, Confirm); otherwise the
    /// target does (Prepare, Finish). Meaningless for Pending and the terminal phases.
    pub fn runs_on_source(self) -> bool {
        matches!(self, Self::Begin | Self::Perform | Self::Confirm)
    }

    /// Whether the migration has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// The cookies each phase wrote, XML documents of at most 16384 bytes each.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cookies {
    /// Begin's cookie: guest and source host identity, lock state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub begin: Option<String>,
    /// Prepare's cookie: target host identity, graphics of the new QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub prepare: Option<String>,
    /// Perform's cookie: transfer statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub perform: Option<String>,
    /// Finish's cookie: the outcome on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub finish: Option<String>,
}

/// Per-phase records.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Steps {
    /// The Begin phase, on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin: Option<Step>,
    /// The Prepare phase, on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<Step>,
    /// The Perform phase, on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perform: Option<Step>,
    /// The Finish phase, on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<Step>,
    /// The Confirm phase, on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Step>,
}

impl Steps {
    /// The record of `phase`, if it is one of the five and has one.
    pub fn get(&self, phase: MigrationPhase) -> Option<&Step> {
        match phase {
            MigrationPhase::Begin => self.begin.as_ref(),
            MigrationPhase::Prepare => self.prepare.as_ref(),
            MigrationPhase::Perform => self.perform.as_ref(),
            MigrationPhase::Finish => self.finish.as_ref(),
            MigrationPhase::Confirm => self.confirm.as_ref(),
            _ => None,
        }
    }
}

/// One phase's execution.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// The node whose agent ran the phase.
    pub node: String,
    /// When the agent started the phase (microsecond precision).
    pub start: MicroTime,
    /// When the agent finished the phase (microsecond precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<MicroTime>,
    /// How the phase ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<StepOutcome>,
    /// Why it ended so, in one CamelCase word (e.g. `Transferred`, `AbiUnstable`,
    /// `GuestLost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<crate::Reason>,
    /// A human-readable account of the outcome, e.g. the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How a phase ended.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StepOutcome {
    /// The phase did its work.
    Succeeded,
    /// The phase failed; the message says why.
    Failed,
}

/// Transfer progress, refreshed at most once a second while Perform runs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Guest memory to transfer, in bytes.
    #[serde(default)]
    pub bytes_total: i64,
    /// Bytes sent so far.
    #[serde(default)]
    pub bytes_transferred: i64,
    /// Bytes still to send.
    #[serde(default)]
    pub bytes_remaining: i64,
    /// Rate at which the guest dirties memory, in bytes per second.
    #[serde(default)]
    pub dirty_rate_bytes_per_second: i64,
    /// Rate at which the stream sends, in bytes per second.
    #[serde(default)]
    pub throughput_bytes_per_second: i64,
    /// Pass over guest memory (1 is the first full copy).
    #[serde(default)]
    pub iteration: i64,
    /// QEMU's estimate of the switch-over downtime, in milliseconds.
    #[serde(default)]
    pub expected_downtime_ms: i64,
    /// Percent of the total transferred, as text for `kubectl get` (e.g. "42%").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
    /// PreCopy until the switch to post-copy, then PostCopy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigrationMode>,
    /// Whether pre-copy converges, judged from the dirty rate against the throughput
    /// over the last passes; absent until there are enough passes to judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converging: Option<bool>,
    /// Why the migration is or is not converging, and what the policy does about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<String>,
    /// Estimated seconds until the transfer completes; absent when it does not
    /// converge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// How much auto-converge throttles the guest's vCPUs, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percent: Option<i64>,
}

/// How a migration moves memory.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MigrationMode {
    /// The guest runs on the source while its memory is copied, pass after pass.
    PreCopy,
    /// The guest's state moved to the target; the rest of its memory follows.
    PostCopy,
    /// Post-copy, with the stream cut: both QEMUs wait, each holding part of the
    /// guest's memory, until the agents recover the stream (it cannot be rolled back).
    PostCopyPaused,
}

impl MigrationMode {
    /// Whether the guest's state has moved to the target (it can no longer roll back).
    pub fn is_post_copy(self) -> bool {
        matches!(self, Self::PostCopy | Self::PostCopyPaused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(
        phase: MigrationPhase,
        mode: MigrationMode,
        cancelled: bool,
    ) -> VirtualMachineMigration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {"vmName": "demo"},
            "status": {"phase": phase, "cancelled": cancelled, "progress": {
                "bytesTotal": 1, "bytesTransferred": 1, "bytesRemaining": 0, "mode": mode}},
        }))
        .unwrap()
    }

    #[test]
    fn the_stream_outlives_perform_only_after_a_switch_to_post_copy() {
        use MigrationMode::*;
        use MigrationPhase::*;
        for mode in [PreCopy, PostCopy, PostCopyPaused] {
            assert!(migration(Perform, mode, false).stream_runs(), "{mode:?}");
        }
        for phase in [Finish, Confirm] {
            assert!(!migration(phase, PreCopy, false).stream_runs(), "{phase:?}");
            assert!(migration(phase, PostCopy, false).stream_runs(), "{phase:?}");
            assert!(migration(phase, PostCopyPaused, false).stream_runs());
            // A rollback after the switch: the guest is lost, nothing is carried.
            assert!(!migration(phase, PostCopy, true).stream_runs(), "{phase:?}");
        }
        for phase in [Pending, Begin, Prepare, Succeeded, Failed, Cancelled] {
            assert!(
                !migration(phase, PostCopy, false).stream_runs(),
                "{phase:?}"
            );
        }
    }
}
