//! The source's phases of a migration to a file (`spec.toFile`): Perform saves the guest
//! ([`save::save`]) and records `status.savedState`; Confirm after a successful save
//! stops the guest ([`save::confirm_saved`]), marks the VM Stopped with its
//! `savedState`, clears its `status.nodeName` (no QEMU runs anywhere; the node that
//! restores it takes it again) and releases the disk locks. Begin and a cancelled
//! Confirm are those of any migration.
//!
//! The save's file is created beneath this node's storage roots, in the migration's
//! namespace's directory ([`save::save`]): a path they do not allow fails Perform with
//! reason `Refused` and a message naming `spec.toFile.path`, the path and the rule, and
//! Confirm (cancelled) finds the guest still running. The file is signed with the
//! cluster's state key; an agent that has not read it yet refuses the save (reason
//! `Refused`, the message saying why) before the guest is touched.

use std::time::{Duration, Instant};

use ferry_agent::phases::perform::TransferProgress as Sample;
use ferry_agent::phases::save;
use ferry_crds::{
    MigrationStatusPatch, Progress, Reason, SavedState, VirtualMachineStatusPatch, VmPhase,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Done, Run, StepError, progress_of};

impl Run<'_> {
    pub(super) async fn save(&self, cancel: &CancellationToken) -> Result<Done, StepError> {
        if self.inputs.cancelled {
            return Err(StepError::Cancelled(
                "migration cancelled before the save started",
            ));
        }
        let file = self
            .m
            .spec
            .to_file
            .clone()
            .ok_or(StepError::MissingInput("no spec.toFile"))?;
        // Before anything touches the guest: a file nobody could restore is not written.
        let key = self.agent.state_key.current()?;
        let (_, domain) = self.vm().await?;
        let namespace = self.m.namespace().unwrap_or_default();
        let (tx, writer) = self.progress_writer();
        let mut last = Instant::now() - Duration::from_secs(1);
        let mut last_sent: Option<Progress> = None;
        let on_progress = |p: &Sample| {
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let progress = progress_of(p);
                if tx.try_send(progress.clone()).is_ok() {
                    last_sent = Some(progress);
                }
            }
        };
        let input = save::SaveInput {
            vm: &self.key(&domain),
            migration: &self.id,
            namespace: &namespace,
            path: &file.path,
            compression: file.compression.into(),
            key: &key,
            cancel,
        };
        let result = save::save(&self.agent.sup, input, on_progress).await;
        drop(tx);
        let _ = writer.await;
        let out = result?;
        let saved = SavedState {
            path: out.path.clone(),
            compression: file.compression,
            node: self.agent.node.clone(),
            stream_bytes: out.stream_bytes as i64,
            file_bytes: out.file_bytes as i64,
            save_time_ms: out.save_time_ms as i64,
            migration: Some(self.m.name_any()),
            saved_at: None,
        };
        let message = format!(
            "saved {} MiB of guest state into {} ({:?}, {} KiB) in {} ms",
            out.stream_bytes >> 20,
            out.path,
            file.compression,
            out.file_bytes >> 10,
            out.save_time_ms
        );
        // The last progress written, completed.
        let progress = Progress {
            bytes_total: out.stream_bytes as i64,
            bytes_transferred: out.stream_bytes as i64,
            bytes_remaining: 0,
            percent: Some("100%".into()),
            ..last_sent.unwrap_or_default()
        };
        let outputs = MigrationStatusPatch {
            saved_state: Some(saved),
            total_time_ms: Some(out.save_time_ms as i64),
            progress: Some(progress),
            ..Default::default()
        };
        Ok(Done::new(Reason::Saved, message).with(outputs))
    }

    pub(super) async fn confirm_save(&self) -> Result<Done, StepError> {
        let (vm, domain) = self.vm().await?;
        let input = save::ConfirmSavedInput {
            vm: &self.key(&domain),
            migration: &self.id,
        };
        let done = save::confirm_saved(&self.agent.sup, input).await?;
        let mut saved = self
            .status()
            .saved_state
            .ok_or(StepError::MissingInput("Perform recorded no savedState"))?;
        if let Some(out) = done {
            saved.path = out.path;
        }
        saved.saved_at = Some(Time(Timestamp::now()));
        let message = format!(
            "the guest's state is saved in {} on {}; set spec.restoreFrom to start it from there",
            saved.path, self.agent.node
        );
        // The migration still holds the VM, so nobody else writes its status now.
        let extra = VirtualMachineStatusPatch {
            saved_state: Some(Some(saved.clone())),
            node_name: Some(None),
            ..Default::default()
        };
        self.mark_vm_gone(&vm, VmPhase::Stopped, "Saved", &message, extra)
            .await?;
        info!(path = %saved.path, "the saved guest's QEMU is gone");
        Ok(Done::new(
            Reason::Saved,
            format!(
                "the guest is stopped; its state is in {} on {}",
                saved.path, self.agent.node
            ),
        ))
    }
}
