//! The source's phases of a migration to a file (`spec.toFile`): Perform saves the guest
//! ([`save::save`]) and records `status.savedState`; Confirm after a successful save
//! stops the guest ([`save::confirm_saved`]), marks the VM Stopped with its
//! `savedState`, clears its `status.nodeName` (no QEMU runs anywhere; the node that
//! restores it takes it again) and releases the disk locks. Begin and a cancelled
//! Confirm are those of any migration.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_agent::phases::perform::Progress;
use ferry_agent::phases::save;
use ferry_crds::{SavedState, VmPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Outcome, Run, progress_json};

impl Run<'_> {
    pub(super) async fn save(&self, cancel: &CancellationToken) -> Outcome {
        if self.status().cancelled {
            return Err("migration cancelled before the save started".into());
        }
        let file = self.m.spec.to_file.clone().ok_or("no spec.toFile")?;
        let (_, domain) = self.vm().await?;
        let (tx, writer) = self.progress_writer();
        let mut last = Instant::now() - Duration::from_secs(1);
        let on_progress = |p: &Progress| {
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let _ = tx.try_send(progress_json(p));
            }
        };
        let result = save::save(
            &self.agent.sup,
            save::SaveInput {
                vm: &domain.name,
                migration: &self.id,
                path: Path::new(&file.path),
                compression: file.compression.into(),
                cancel,
            },
            on_progress,
        )
        .await;
        drop(tx);
        let _ = writer.await;
        let out = result.map_err(|e| e.to_string())?;
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
        Ok((
            format!(
                "saved {} MiB of guest state into {} ({:?}, {} KiB) in {} ms",
                out.stream_bytes >> 20,
                out.path,
                file.compression,
                out.file_bytes >> 10,
                out.save_time_ms
            ),
            json!({
                "savedState": saved,
                "totalTimeMs": out.save_time_ms,
                "progress": {
                    "bytesTotal": out.stream_bytes,
                    "bytesTransferred": out.stream_bytes,
                    "bytesRemaining": 0,
                    "percent": "100%",
                },
            }),
        ))
    }

    pub(super) async fn confirm_save(&self) -> Outcome {
        let (vm, domain) = self.vm().await?;
        let input = save::ConfirmSavedInput {
            vm: &domain.name,
            migration: &self.id,
        };
        let done = save::confirm_saved(&self.agent.sup, input)
            .await
            .map_err(|e| e.to_string())?;
        let mut saved = self
            .status()
            .saved_state
            .ok_or("Perform recorded no savedState")?;
        if let Some(out) = done {
            saved.path = out.path;
        }
        saved.saved_at = Some(Time(Timestamp::now()));
        let message = format!(
            "the guest's state is saved in {} on {}; set spec.restoreFrom to start it from there",
            saved.path, self.agent.node
        );
        // The migration still holds the VM, so nobody else writes its status now.
        let extra = json!({"savedState": saved, "nodeName": null});
        self.mark_vm_gone(&vm, VmPhase::Stopped, "Saved", &message, extra)
            .await?;
        info!(path = %saved.path, "the saved guest's QEMU is gone");
        Ok((
            format!(
                "the guest is stopped; its state is in {} on {}",
                saved.path, self.agent.node
            ),
            json!({}),
        ))
    }
}
