//! Save (the Perform of a migration to a file, on the source): pauses the guest, hands
//! QEMU the write end of a pipe (`getfd`, over the monitor socket with SCM_RIGHTS), lets
//! it `migrate fd:` into it, and on a blocking thread compresses what comes out of the
//! pipe into a [`statefile`] signed with the cluster's state key — no shell, no helper
//! process. The file is created beneath
//! the node's storage roots, in the migration's namespace's directory of a read-write
//! root ([`storage::create_save`]), before anything else: a path the roots do not allow,
//! or a file that exists, is refused while the guest still runs untouched. It is written
//! under a temporary name and linked into place ([`Finalize::commit`]) only once QEMU
//! reports the migration completed; a failed or cancelled save leaves nothing. The
//! guest then stays paused until Confirm stops it (or, on a failure or cancel, Confirm
//! resumes it). QEMU's own compression, multifd, post-copy and auto-converge are off
//! and the bandwidth is unlimited ([`save_policy`]).
//!
//! Begin is the ordinary [`begin`](crate::phases::begin::begin) (checks, migration lock); there
//! is no Prepare or Finish.

use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::perform::TransferProgress;
use crate::phases::record::PartialSave;
use crate::phases::{MigrationRecord, Phase, TransferState, check_vm_name, transfer_state};
use crate::policy::{Policy, PostCopy, Side};
use crate::qmp::{MigrationInfo, Qmp, QmpError, StatusInfo};
use crate::statefile::{self, Compression, Meta, StateKey};
use crate::storage::{self, Finalize, UserPath};
use crate::supervisor::Supervisor;
use serde_json::json;
use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

pub use super::record::SaveOutput;

/// The name QEMU knows the pipe by.
const FD_NAME: &str = "ferry-save";
const POLL: Duration = Duration::from_millis(250);

/// The settings of a save: one plain stream, nothing QEMU-side that a file cannot hold.
pub fn save_policy() -> Policy {
    Policy {
        max_bandwidth: None,
        max_downtime_ms: 300,
        parallel_connections: 1,
        compression: ferry_crds::Compression::None,
        auto_converge: false,
        post_copy: PostCopy::Never,
        completion_timeout_per_gib: None,
        progress_timeout: None,
    }
}

/// The field a save's path comes from, as refusals name it.
pub const PATH_FIELD: &str = "spec.toFile.path";

/// What a save needs.
#[derive(Debug, Clone, Copy)]
pub struct SaveInput<'a> {
    pub vm: &'a str,
    /// The migration's unique name (its Begin ran).
    pub migration: &'a str,
    /// The migration's namespace: the file must be in its directory of a read-write
    /// storage root of this node.
    pub namespace: &'a str,
    /// The file to write (`spec.toFile.path`); never overwritten.
    pub path: &'a str,
    pub compression: Compression,
    /// The cluster's state key, which signs the file (only a signed file is restored).
    pub key: &'a StateKey,
    pub cancel: &'a CancellationToken,
}

/// Saves `vm` into `path` as migration `migration` (after its Begin), calling
/// `on_progress` about four times a second. Idempotent: a re-run returns the recorded
/// result; a re-run after a crash mid-save starts the save again.
#[tracing::instrument(skip_all, fields(vm = input.vm, migration = input.migration, namespace = input.namespace))]
pub async fn save(
    sup: &Supervisor,
    input: SaveInput<'_>,
    mut on_progress: impl FnMut(&TransferProgress),
) -> Result<SaveOutput, PhaseError> {
    let SaveInput {
        vm,
        migration,
        namespace,
        path,
        compression,
        key,
        cancel,
    } = input;
    let cx = Ctx {
        phase: Phase::Perform,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let dir = sup.vm_dir(vm);
    let mut record = MigrationRecord::load_for(&dir, migration)
        .map_err(|e| cx.err(e))?
        .ok_or_else(|| {
            cx.err(ErrorKind::Refused(
                "no Begin record for this migration on this node".into(),
            ))
        })?;
    if let Some(out) = &record.save {
        tracing::info!(vm, migration, "save already done");
        return Ok(out.clone());
    }
    // What an attempt that died with its agent left behind goes first.
    if let Some(partial) = record.save_partial.take() {
        remove_partial(sup, &partial, migration);
        record.save(&dir).map_err(|e| cx.err(e))?;
    }
    // Before anything touches the guest: a refused path leaves it running.
    let (file, finalize) = create(sup, namespace, path).map_err(|e| cx.err(e))?;
    record.save_partial = Some(PartialSave {
        namespace: namespace.to_string(),
        path: path.to_string(),
        temp: finalize.temp_name(),
    });
    record.save(&dir).map_err(|e| cx.err(e))?;
    let domain = sup.definition(vm).map_err(|e| cx.err(e))?;
    let guest = sup.require(vm).await.map_err(|e| cx.err(e))?;
    let qmp = &guest.qmp;
    // An attempt that died with its agent may have left a migration running.
    stop_outgoing(qmp).await.map_err(|e| cx.err(e))?;
    let started = Instant::now();
    let status: StatusInfo = qmp
        .execute("query-status", None)
        .await
        .map_err(|e| cx.err(e))?;
    if status.running {
        qmp.run("stop", None).await.map_err(|e| cx.err(e))?;
    }
    record.perform_started = true;
    record.save(&dir).map_err(|e| cx.err(e))?;
    crate::policy::apply(qmp, &save_policy().settings(Side::Source))
        .await
        .map_err(|e| cx.err(e))?;
    let meta = Meta {
        vm: domain.name.clone(),
        uuid: domain.uuid,
        domain_xml: domain.to_xml(),
        qemu_version: qmp.version.clone(),
        node: sup.node().name.clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    let (reader, writer) = std::io::pipe().map_err(|e| cx.err(e))?;
    qmp.run_with_fd("getfd", Some(json!({ "fdname": FD_NAME })), writer.as_fd())
        .await
        .map_err(|e| cx.err(e))?;
    // QEMU holds its own copy: the writer thread sees EOF when QEMU closes it.
    drop(writer);
    let target = finalize.path().to_path_buf();
    let key = key.clone();
    let write = tokio::task::spawn_blocking(move || {
        statefile::write(file, &target, compression, &meta, &key, reader)
    });
    let mut events = qmp.subscribe();
    let uri = format!("fd:{FD_NAME}");
    if let Err(e) = qmp.run("migrate", Some(json!({ "uri": uri }))).await {
        let _ = qmp.run("closefd", Some(json!({ "fdname": FD_NAME }))).await;
        // The writer sees the end of the stream; dropping `finalize` removes its file.
        let _ = write.await;
        return Err(cx.err(e));
    }
    tracing::info!(vm, migration, path, %compression, "save started");
    let mut cancel_sent = false;
    let mut tick = tokio::time::interval(POLL);
    let info = loop {
        tokio::select! {
            _ = cancel.cancelled(), if !cancel_sent => {
                tracing::info!(vm, migration, "cancelling the save");
                qmp.run("migrate_cancel", None).await.map_err(|e| cx.err(e))?;
                cancel_sent = true;
                continue;
            }
            ev = events.recv() => match ev {
                Ok(ev) if ev.event == "MIGRATION" => {
                    if transfer_state(ev.data["status"].as_str()) == TransferState::InProgress {
                        continue;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return Err(cx.err(QmpError::Gone)),
            },
            _ = tick.tick() => {}
        }
        let info: MigrationInfo = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| cx.err(e))?;
        match transfer_state(info.status.as_deref()) {
            TransferState::InProgress => on_progress(&TransferProgress::from_info(&info)),
            TransferState::NotStarted => {}
            _ => break info,
        }
    };
    let written = write
        .await
        .map_err(|e| cx.err(ErrorKind::Refused(format!("the file writer died: {e}"))))?;
    // Every way out but the commit drops `finalize`, which removes the temporary file.
    let written = match (transfer_state(info.status.as_deref()), written) {
        (TransferState::Completed, Ok(written)) => {
            finalize.commit().map_err(|e| cx.err(e))?;
            written
        }
        // The writer's error is why QEMU's stream broke.
        (_, Err(e)) => return Err(cx.err(e)),
        (TransferState::Cancelled, Ok(_)) => return Err(cx.err(ErrorKind::Cancelled)),
        (_, Ok(_)) => {
            let why = info.error_desc.unwrap_or_else(|| "unknown error".into());
            return Err(cx.err(ErrorKind::MigrationFailed(why)));
        }
    };
    on_progress(&TransferProgress::from_info(&info));
    let out = SaveOutput {
        path: path.to_string(),
        compression,
        stream_bytes: written.stream_bytes,
        file_bytes: written.file_bytes,
        save_time_ms: started.elapsed().as_millis() as u64,
        qemu_time_ms: info.total_time.unwrap_or(0),
        sha256: written.sha256,
    };
    record.save = Some(out.clone());
    record.save_partial = None;
    record.save(&dir).map_err(|e| cx.err(e))?;
    tracing::info!(
        vm,
        migration,
        path = %out.path,
        %compression,
        stream_bytes = out.stream_bytes,
        file_bytes = out.file_bytes,
        save_time_ms = out.save_time_ms,
        "saved"
    );
    Ok(out)
}

/// Creates the temporary file of a save to `path` for `namespace`, beneath this node's
/// storage roots ([`storage::create_save`]).
fn create(
    sup: &Supervisor,
    namespace: &str,
    path: &str,
) -> Result<(File, Finalize), storage::StorageError> {
    let user = UserPath {
        field: PATH_FIELD,
        path,
    };
    let (fd, finalize) = storage::create_save(&sup.node().storage, namespace, user)?;
    Ok((File::from(fd), finalize))
}

/// Removes the temporary file `partial` of a save that did not end (its process died),
/// if it is still there; a failure is logged, never fatal: it leaves a file, no guest.
pub(crate) fn remove_partial(sup: &Supervisor, partial: &PartialSave, migration: &str) {
    let user = UserPath {
        field: PATH_FIELD,
        path: &partial.path,
    };
    let roots = &sup.node().storage;
    match storage::remove_partial(roots, &partial.namespace, user, &partial.temp) {
        Ok(true) => {
            tracing::info!(migration, path = %partial.path, temp = %partial.temp, "removed the temporary file an earlier attempt left")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(migration, error = %e, "could not remove the temporary file an earlier attempt left")
        }
    }
}

/// What the Confirm of a save that succeeded needs.
#[derive(Debug, Clone, Copy)]
pub struct ConfirmSavedInput<'a> {
    pub vm: &'a str,
    /// The migration's unique name (its save completed).
    pub migration: &'a str,
}

/// Confirm of a save that succeeded: the state is in the file, so the paused source
/// guest is stopped and its state dir removed. Idempotent: `None` when an earlier run
/// already removed it. (A failed or cancelled save
/// is confirmed by [`confirm`](crate::phases::confirm::confirm) with `cancelled`, which resumes
/// the guest.)
#[tracing::instrument(skip_all, fields(vm = input.vm, migration = input.migration))]
pub async fn confirm_saved(
    sup: &Supervisor,
    input: ConfirmSavedInput<'_>,
) -> Result<Option<SaveOutput>, PhaseError> {
    let ConfirmSavedInput { vm, migration } = input;
    let cx = Ctx {
        phase: Phase::Confirm,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let dir = sup.vm_dir(vm);
    if !dir.exists() {
        tracing::info!(vm, migration, "Confirm already done");
        return Ok(None);
    }
    let record = MigrationRecord::load_for(&dir, migration).map_err(|e| cx.err(e))?;
    let Some(out) = record.and_then(|r| r.save) else {
        return Err(cx.err(ErrorKind::Refused(
            "no completed save recorded for this migration: the guest is not stopped".into(),
        )));
    };
    sup.stop(
        vm,
        crate::supervisor::StopMode::Quit(Duration::from_secs(10)),
    )
    .await
    .map_err(|e| cx.err(e))?;
    sup.destroy(vm).await.map_err(|e| cx.err(e))?;
    tracing::info!(vm, migration, path = %out.path, "Confirm done: the saved guest's QEMU is gone");
    Ok(Some(out))
}

/// Cancels an outgoing migration left running and waits until it has stopped.
async fn stop_outgoing(qmp: &Qmp) -> Result<(), ErrorKind> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info: MigrationInfo = qmp.execute("query-migrate", None).await?;
        if transfer_state(info.status.as_deref()) != TransferState::InProgress {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ErrorKind::Refused(
                "an earlier outgoing migration did not stop".into(),
            ));
        }
        if info.status.as_deref() != Some("cancelling") {
            qmp.run("migrate_cancel", None).await?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_turns_off_everything_a_file_cannot_hold() {
        let s = save_policy().settings(Side::Source);
        for (cap, on) in &s.capabilities {
            assert_eq!(*on, *cap == "events", "{cap}");
        }
        assert!(s.capabilities.iter().any(|(c, _)| *c == "multifd"));
        assert!(!s.parameters.contains_key("multifd-compression"));
        assert_eq!(
            s.parameters["max-bandwidth"],
            json!(crate::policy::UNLIMITED_BANDWIDTH)
        );
    }
}
