//! Starting a guest from a saved state (`spec.restoreFrom`), and keeping a saved guest
//! stopped until it is restored.
//!
//! The file is opened read-only beneath this node's storage roots for the VM's namespace
//! ([`SavedFile::open`]; a path they refuse gets reason `HostPathRefused`) and checked
//! ([`restore::verify`]: its MAC under the cluster's state key, format, checksum, the
//! guest it holds, ABI against the saved definition) before anything changes: a refused
//! file leaves the VM as it was — no QEMU, no `status.nodeName` claimed, no disk lock
//! taken, the file untouched — with a `Ready=False` condition and a Warning Event naming
//! the problem, and is not tried again until the VM's spec changes (a new generation).
//! An agent without the state key yet says so (reason `StateKeyMissing`) and tries
//! again.
//!
//! A file is restored once. A restore records the file in `status.restoredFrom` (its
//! path) and `status.restoredSha256` (the SHA-256 its trailer records: its identity).
//! A later start with the same `spec.restoreFrom` whose file is still that one (or is
//! gone) boots the guest from its disks; another file written at that path since is
//! restored; the consumed file under another path is refused (`StateFileConsumed`).
//! Clearing `status.restoredFrom` is the override: the file may then be restored once
//! more ([`consumed`]).

use ferry_agent::domain::Domain;
use ferry_agent::restore::{self, RestoreError, SavedFile};
use ferry_agent::storage::Rule;
use ferry_crds::{
    VirtualMachine, VirtualMachineStatus, VirtualMachineStatusPatch, VmPhase, set_condition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PatchParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::{Reconcile, Report, VmError, disks, report};
use crate::k8s::state_key::NoStateKey;

/// The Ready reasons of a restore that was refused or failed: the same generation is not
/// tried again.
const REFUSALS: [&str; 16] = [
    "HostPathRefused",
    "StateFileUnreadable",
    "StateFileNotAStateFile",
    "StateFileUnsupportedVersion",
    "StateFileUnsigned",
    "StateFileBadMac",
    "StateFileUnknownCompression",
    "StateFileTruncated",
    "StateFileOversized",
    "StateFileDecoderLimit",
    "StateFileWrongVM",
    "StateFileCorrupted",
    "StateFileConsumed",
    "AbiMismatch",
    "AlreadyRunning",
    "RestoreFailed",
];

/// The Ready reason while this node's agent has no state key: tried again.
pub const STATE_KEY_MISSING: &str = "StateKeyMissing";

/// How a guest that is to run, and does not, starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Boot it from its disks.
    Boot,
    /// Restore it from this saved state (unless the file there is [`consumed`]).
    Restore(String),
    /// Its state is saved there and no restore is asked for: it stays stopped.
    Saved(String),
    /// The restore of this generation was refused or failed; wait for a spec change.
    Refused,
}

/// Decides how `vm` starts.
pub fn how_to_start(vm: &VirtualMachine) -> Start {
    let status = vm.status.clone().unwrap_or_default();
    if let Some(path) = &vm.spec.restore_from {
        // A restore recorded before files had an identity: the path is all there is.
        let consumed_by_path = status.restored_from.as_deref() == Some(path.as_str())
            && status.restored_sha256.is_none();
        if !consumed_by_path {
            let refused = status.conditions.iter().any(|c| {
                c.type_ == "Ready"
                    && c.status == "False"
                    && REFUSALS.contains(&c.reason.as_str())
                    && c.observed_generation == vm.metadata.generation
            });
            return if refused {
                Start::Refused
            } else {
                Start::Restore(path.clone())
            };
        }
    }
    match status.saved_state {
        Some(saved) => Start::Saved(saved.path),
        None => Start::Boot,
    }
}

/// Whether the file at `path` (`spec.restoreFrom`), whose trailer records `sha256`, is
/// the one the guest was restored from already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumed {
    /// No: restore it.
    No,
    /// Yes, at the same path: the guest went on from it, so a later start boots.
    Here,
    /// Yes, restored from this other path: refused (the same file is not restored twice).
    From(String),
}

/// [`Consumed`] for the file at `path` whose trailer records `sha256` (`None`: no
/// readable trailer, which the verification refuses), by what `status` records.
/// Clearing `status.restoredFrom` makes any file not consumed.
pub fn consumed(status: &VirtualMachineStatus, path: &str, sha256: Option<&str>) -> Consumed {
    match (&status.restored_from, &status.restored_sha256, sha256) {
        (Some(from), Some(done), Some(sha)) if done.eq_ignore_ascii_case(sha) => {
            if from == path {
                Consumed::Here
            } else {
                Consumed::From(from.clone())
            }
        }
        _ => Consumed::No,
    }
}

impl Reconcile<'_> {
    pub(super) async fn start_or_restore(&self, domain: &Domain) -> Result<(), VmError> {
        match how_to_start(self.vm) {
            Start::Boot => self.start(domain).await,
            Start::Refused => Ok(()),
            Start::Saved(path) => {
                let ready = self
                    .status()
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Ready");
                if ready.is_some_and(|c| c.reason == "Saved") {
                    return Ok(());
                }
                let message = format!(
                    "the guest's state is saved in {path}; set spec.restoreFrom to start it from there"
                );
                self.note(VmPhase::Stopped, "Saved", &message).await
            }
            Start::Restore(path) => self.restore(domain, &path).await,
        }
    }

    async fn restore(&self, domain: &Domain, path: &str) -> Result<(), VmError> {
        info!(node = %self.agent.node, path, "restoring the guest from its saved state");
        let key = match self.agent.state_key.current() {
            Ok(key) => key,
            Err(e) => return self.no_key(&e).await,
        };
        let status = self.status();
        let namespace = self.vm.namespace().unwrap_or_default();
        let file = match SavedFile::open(&self.agent.sup.node().storage, &namespace, path) {
            Ok(file) => file,
            Err(RestoreError::HostPath(e))
                if matches!(e.rule, Rule::NotFound)
                    && status.restored_from.as_deref() == Some(path) =>
            {
                info!(
                    path,
                    "the file the guest was restored from is gone; booting it"
                );
                return self.start(domain).await;
            }
            Err(e) => return self.refuse(&e).await,
        };
        let sha256 = file.recorded_sha256().await;
        match consumed(&status, path, sha256.as_deref()) {
            Consumed::No => {}
            Consumed::Here => {
                info!(
                    path,
                    sha256 = sha256.as_deref(),
                    "the guest was restored from this file already; booting it"
                );
                return self.start(domain).await;
            }
            Consumed::From(from) => {
                let e = RestoreError::Consumed {
                    path: path.to_string(),
                    from,
                    sha256: sha256.unwrap_or_default(),
                };
                return self.refuse(&e).await;
            }
        }
        let verified = match restore::verify(file, domain, &key).await {
            Ok(v) => v,
            Err(e) => return self.refuse(&e).await,
        };
        if let Err(e) = self.locks().acquire(&disks(domain), &self.agent.node).await {
            return self
                .report(VmPhase::Failed, false, "DiskLocked", &e.to_string(), None)
                .await;
        }
        let message = format!("restoring from {path}");
        // Guarded, as a boot's Starting report is (`Reconcile::start`).
        self.write_status(&Report {
            guarded: true,
            ..report(VmPhase::Starting, false, "Restoring", &message, None)
        })
        .await?;
        let sha256 = verified.verified.sha256();
        let guest = self.key(domain);
        match restore::restore_verified(&self.agent.sup, &guest, domain, self.owner(), verified)
            .await
        {
            Err(e) => {
                let _ = self.locks().release(&self.agent.node).await;
                warn!(error = %e, "restore failed");
                self.event(EventType::Warning, e.reason(), &e.to_string())
                    .await;
                self.report(VmPhase::Failed, false, e.reason(), &e.to_string(), None)
                    .await
            }
            Ok(out) => {
                let graphics = self.graphics(&guest).await;
                let message = format!(
                    "restored from {path} on {} ({} MiB of state, checked in {} ms, loaded in {} ms)",
                    self.agent.node,
                    out.stream_bytes >> 20,
                    out.verify_ms,
                    out.load_ms
                );
                info!(%message);
                self.patch(VirtualMachineStatusPatch {
                    restored_from: Some(Some(path.to_string())),
                    restored_sha256: Some(Some(sha256)),
                    saved_state: Some(None),
                    ..Default::default()
                })
                .await?;
                self.event(EventType::Normal, "Restored", &message).await;
                self.report_started("Restored", &message, graphics).await
            }
        }
    }

    /// No state key yet: a condition that says so (tried again at the next resync).
    async fn no_key(&self, e: &NoStateKey) -> Result<(), VmError> {
        warn!(error = %e, "restore waits for the state key");
        let phase = self.status().phase.unwrap_or(VmPhase::Stopped);
        self.note(phase, STATE_KEY_MISSING, &e.to_string()).await
    }

    /// A refused file: a condition and an Event, nothing else.
    async fn refuse(&self, e: &RestoreError) -> Result<(), VmError> {
        warn!(error = %e, "restore refused");
        self.event(EventType::Warning, e.reason(), &e.to_string())
            .await;
        let phase = self.status().phase.unwrap_or(VmPhase::Stopped);
        self.note(phase, e.reason(), &e.to_string()).await
    }

    /// Writes phase and the Ready condition, never `status.nodeName`.
    async fn note(&self, phase: VmPhase, reason: &str, message: &str) -> Result<(), VmError> {
        let mut conditions = self.status().conditions;
        set_condition(
            &mut conditions,
            "Ready",
            false,
            reason,
            message,
            self.vm.metadata.generation,
            Time(Timestamp::now()),
        );
        self.patch(VirtualMachineStatusPatch {
            phase: Some(phase),
            conditions: Some(conditions),
            observed_generation: self.vm.metadata.generation,
            ..Default::default()
        })
        .await
    }

    async fn patch(&self, patch: VirtualMachineStatusPatch) -> Result<(), VmError> {
        self.api()
            .patch_status(
                &self.vm.name_any(),
                &PatchParams::default(),
                &patch.to_patch(None),
            )
            .await?;
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: &str) {
        let recorder = Recorder::new(
            self.agent.client.clone(),
            Reporter {
                controller: "ferry-agent".into(),
                instance: Some(self.agent.node.clone()),
            },
        );
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1024).collect()),
            action: "Restore".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &self.vm.object_ref(&())).await {
            warn!(error = %e, "could not record an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_crds::{Condition, SaveCompression, SavedState, VirtualMachineStatus};

    fn vm(restore_from: Option<&str>, status: VirtualMachineStatus) -> VirtualMachine {
        let mut vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "demo", "namespace": "default", "generation": 3},
            "spec": {"domainXML": "<domain/>", "nodeName": "node-b"},
        }))
        .unwrap();
        vm.spec.restore_from = restore_from.map(Into::into);
        vm.status = Some(status);
        vm
    }

    fn saved(path: &str) -> SavedState {
        SavedState {
            path: path.into(),
            compression: SaveCompression::Zstd,
            node: "node-a".into(),
            stream_bytes: 1,
            file_bytes: 1,
            save_time_ms: 1,
            migration: None,
            saved_at: None,
        }
    }

    fn ready(reason: &str, generation: i64) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(generation),
            last_transition_time: Time(Timestamp::now()),
        }
    }

    #[test]
    fn how_a_guest_starts() {
        let none = VirtualMachineStatus::default();
        assert_eq!(how_to_start(&vm(None, none.clone())), Start::Boot);
        assert_eq!(
            how_to_start(&vm(Some("/s/a.fsav"), none.clone())),
            Start::Restore("/s/a.fsav".into())
        );
        let is_saved = VirtualMachineStatus {
            saved_state: Some(saved("/s/a.fsav")),
            ..Default::default()
        };
        // Saved and not asked to restore: it stays stopped rather than boot afresh.
        assert_eq!(
            how_to_start(&vm(None, is_saved.clone())),
            Start::Saved("/s/a.fsav".into())
        );
        assert_eq!(
            how_to_start(&vm(Some("/s/a.fsav"), is_saved)),
            Start::Restore("/s/a.fsav".into())
        );
        // Restored once, recorded by path only (before files had an identity): a later
        // start boots.
        let restored = VirtualMachineStatus {
            restored_from: Some("/s/a.fsav".into()),
            ..Default::default()
        };
        assert_eq!(how_to_start(&vm(Some("/s/a.fsav"), restored)), Start::Boot);
        // With its identity: the agent looks at the file ([`consumed`]).
        let restored = VirtualMachineStatus {
            restored_from: Some("/s/a.fsav".into()),
            restored_sha256: Some("aa".into()),
            ..Default::default()
        };
        assert_eq!(
            how_to_start(&vm(Some("/s/a.fsav"), restored)),
            Start::Restore("/s/a.fsav".into())
        );
        for reason in [
            "StateFileBadMac",
            "StateFileUnsigned",
            "StateFileOversized",
            "StateFileConsumed",
        ] {
            let refused = VirtualMachineStatus {
                conditions: vec![ready(reason, 3)],
                ..Default::default()
            };
            assert_eq!(
                how_to_start(&vm(Some("/s/a.fsav"), refused)),
                Start::Refused,
                "{reason}"
            );
        }
        // No state key yet: tried again.
        let waiting = VirtualMachineStatus {
            conditions: vec![ready(STATE_KEY_MISSING, 3)],
            ..Default::default()
        };
        assert_eq!(
            how_to_start(&vm(Some("/s/a.fsav"), waiting)),
            Start::Restore("/s/a.fsav".into())
        );
        // A refusal holds for its generation only.
        for reason in ["StateFileTruncated", "HostPathRefused"] {
            let refused = VirtualMachineStatus {
                conditions: vec![ready(reason, 3)],
                ..Default::default()
            };
            assert_eq!(
                how_to_start(&vm(Some("/s/a.fsav"), refused)),
                Start::Refused,
                "{reason}"
            );
        }
        let older = VirtualMachineStatus {
            conditions: vec![ready("StateFileTruncated", 2)],
            ..Default::default()
        };
        assert_eq!(
            how_to_start(&vm(Some("/s/a.fsav"), older)),
            Start::Restore("/s/a.fsav".into())
        );
        let other = VirtualMachineStatus {
            conditions: vec![ready("Stopped", 3)],
            ..Default::default()
        };
        assert_eq!(
            how_to_start(&vm(Some("/s/a.fsav"), other)),
            Start::Restore("/s/a.fsav".into())
        );
    }

    #[test]
    fn a_file_is_restored_once() {
        let restored = VirtualMachineStatus {
            restored_from: Some("/s/a.fsav".into()),
            restored_sha256: Some("AB12".into()),
            ..Default::default()
        };
        // The same file at the same path: a later start boots.
        assert_eq!(
            consumed(&restored, "/s/a.fsav", Some("ab12")),
            Consumed::Here
        );
        // Another file written at that path since: restored.
        assert_eq!(consumed(&restored, "/s/a.fsav", Some("cd34")), Consumed::No);
        // The same file under another path (a copy, a rename): refused.
        assert_eq!(
            consumed(&restored, "/s/copy.fsav", Some("ab12")),
            Consumed::From("/s/a.fsav".into())
        );
        // A file without a readable trailer is for the verification to refuse.
        assert_eq!(consumed(&restored, "/s/a.fsav", None), Consumed::No);
        // Never restored.
        let fresh = VirtualMachineStatus::default();
        assert_eq!(consumed(&fresh, "/s/a.fsav", Some("ab12")), Consumed::No);
        // The override: status.restoredFrom cleared (restoredSha256 may stay).
        let cleared = VirtualMachineStatus {
            restored_from: None,
            ..restored.clone()
        };
        assert_eq!(consumed(&cleared, "/s/a.fsav", Some("ab12")), Consumed::No);
        assert_eq!(
            consumed(&cleared, "/s/copy.fsav", Some("ab12")),
            Consumed::No
        );
    }

    #[test]
    fn every_refusal_of_the_library_is_listed() {
        use ferry_agent::statefile::StateFileError;
        let path = std::path::PathBuf::from("/s/a.fsav");
        let errors = [
            StateFileError::Unsigned { path: path.clone() },
            StateFileError::BadMac {
                path: path.clone(),
                why: String::new(),
            },
            StateFileError::Oversized {
                path: path.clone(),
                compression: ferry_agent::statefile::Compression::Gzip,
                declared: 1,
            },
            StateFileError::DecoderLimit {
                path: path.clone(),
                compression: ferry_agent::statefile::Compression::Xz,
                what: String::new(),
            },
            StateFileError::WrongMagic { path: path.clone() },
        ];
        for e in errors {
            let reason = RestoreError::File(e).reason();
            assert!(REFUSALS.contains(&reason), "{reason}");
        }
        let consumed = RestoreError::Consumed {
            path: "/s/copy.fsav".into(),
            from: "/s/a.fsav".into(),
            sha256: "ab12".into(),
        };
        assert!(REFUSALS.contains(&consumed.reason()));
        let message = consumed.to_string();
        assert!(message.contains("restored once"), "{message}");
        assert!(
            message.contains("clear the VM's status.restoredFrom"),
            "{message}"
        );
        assert!(!REFUSALS.contains(&STATE_KEY_MISSING));
    }
}
