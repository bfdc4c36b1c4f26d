//! Restore: starts a guest from a saved-state file where it stopped.
//!
//! [`verify`] runs first, before any QEMU: the file must be a whole, unchanged
//! [`statefile`] of this very guest (name and uuid), and the definition to start must be
//! ABI-compatible with the one saved ([`abi::check`]). Only then [`restore`] starts QEMU
//! paused with `-incoming defer`, hands it the read end of a pipe (`getfd`),
//! `migrate-incoming fd:` from it, and streams the decompressed file into the pipe on a
//! blocking thread (checking the checksum again). Once the state has loaded it resumes
//! the vCPUs. Any failure after QEMU started removes that QEMU; the file is never
//! written.

use crate::abi::{self, AbiError};
use crate::domain::{Domain, DomainError};
use crate::phases::{Arrival, arrival};
use crate::policy::Side;
use crate::qmp::{MigrationInfo, QmpError, StatusInfo};
use crate::statefile::{self, StateFileError, Verified};
use crate::storage::Owner;
use crate::supervisor::{Supervisor, SupervisorError};
use serde_json::json;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FD_NAME: &str = "ferry-restore";
/// How long QEMU may take to load a state whose stream was fully handed to it.
const LOAD_WAIT: Duration = Duration::from_secs(60);

/// Why a restore was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    File(#[from] StateFileError),
    #[error("saved state {path}: its saved definition cannot be read: {source}")]
    SavedDefinition { path: PathBuf, source: DomainError },
    #[error("saved state {path} cannot be restored into this definition: {source}")]
    Abi { path: PathBuf, source: AbiError },
    #[error("VM '{vm}' already runs on this node (pid {pid}); nothing was restored")]
    AlreadyRunning { vm: String, pid: i32 },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("loading the saved state: {0}")]
    Qmp(#[from] QmpError),
    #[error("loading the saved state: {0}")]
    Load(String),
}

impl RestoreError {
    /// A condition reason: `StateFile<kind>` for a refused file, `AbiMismatch`,
    /// `AlreadyRunning`, `HostPathRefused` for a host path of the definition the storage
    /// roots refuse, or `RestoreFailed` for a failure once QEMU ran.
    pub fn reason(&self) -> &'static str {
        match self {
            RestoreError::File(e) => match e.label() {
                "Unreadable" => "StateFileUnreadable",
                "NotAStateFile" => "StateFileNotAStateFile",
                "UnsupportedVersion" => "StateFileUnsupportedVersion",
                "UnknownCompression" => "StateFileUnknownCompression",
                "Truncated" => "StateFileTruncated",
                "WrongVM" => "StateFileWrongVM",
                _ => "StateFileCorrupted",
            },
            RestoreError::SavedDefinition { .. } => "StateFileCorrupted",
            RestoreError::Abi { .. } => "AbiMismatch",
            RestoreError::AlreadyRunning { .. } => "AlreadyRunning",
            RestoreError::Supervisor(SupervisorError::Storage { .. }) => "HostPathRefused",
            RestoreError::Supervisor(_) | RestoreError::Qmp(_) | RestoreError::Load(_) => {
                "RestoreFailed"
            }
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOutput {
    pub stream_bytes: u64,
    pub file_bytes: u64,
    /// The pre-pass: reading, decompressing and hashing the whole file.
    pub verify_ms: u64,
    /// From starting QEMU to the guest running.
    pub load_ms: u64,
}

/// Checks `path` for a restore of `domain`, without starting anything.
pub async fn verify(path: &Path, domain: &Domain) -> Result<Verified, RestoreError> {
    let p = path.to_path_buf();
    let (vm, uuid) = (domain.name.clone(), domain.uuid);
    let verified = tokio::task::spawn_blocking(move || {
        statefile::verify(&p, statefile::Expect { vm: &vm, uuid })
    })
    .await
    .map_err(|e| RestoreError::Load(format!("the verifier died: {e}")))??;
    let saved = Domain::parse(&verified.meta.domain_xml).map_err(|source| {
        RestoreError::SavedDefinition {
            path: path.to_path_buf(),
            source,
        }
    })?;
    abi::check(&saved, domain).map_err(|source| RestoreError::Abi {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(verified)
}

/// Restores `domain` from `path` on this node and resumes it.
#[tracing::instrument(skip_all, fields(vm = %domain.name, path = %path.display()))]
pub async fn restore(
    sup: &Supervisor,
    domain: &Domain,
    owner: Owner<'_>,
    path: &Path,
) -> Result<RestoreOutput, RestoreError> {
    let vm = domain.name.as_str();
    if let Some(pid) = sup.running_pid(vm) {
        return Err(RestoreError::AlreadyRunning {
            vm: vm.to_string(),
            pid,
        });
    }
    let t0 = Instant::now();
    let verified = verify(path, domain).await?;
    let verify_ms = t0.elapsed().as_millis() as u64;
    tracing::info!(vm, compression = %verified.compression, stream_bytes = verified.stream_bytes, verify_ms, "saved state verified; starting QEMU");
    let mut out = restore_verified(sup, domain, owner, verified).await?;
    out.verify_ms = verify_ms;
    Ok(out)
}

/// The second half of [`restore`], for a file [`verify`] accepted for `domain`: starts
/// QEMU, loads the state (checking it again on the way) and resumes the guest.
pub async fn restore_verified(
    sup: &Supervisor,
    domain: &Domain,
    owner: Owner<'_>,
    verified: Verified,
) -> Result<RestoreOutput, RestoreError> {
    let vm = domain.name.as_str();
    if let Some(pid) = sup.running_pid(vm) {
        return Err(RestoreError::AlreadyRunning {
            vm: vm.to_string(),
            pid,
        });
    }
    let t1 = Instant::now();
    let guest = sup.start(domain, owner, true).await?;
    let loaded = load(&guest.qmp, verified.clone()).await;
    if let Err(e) = loaded {
        tracing::warn!(vm, error = %e, "restore failed; removing its QEMU");
        drop(guest);
        if let Err(e) = sup.destroy(vm).await {
            tracing::error!(vm, error = %e, "removing the QEMU of a failed restore");
        }
        return Err(e);
    }
    let out = RestoreOutput {
        stream_bytes: verified.stream_bytes,
        file_bytes: verified.file_bytes,
        verify_ms: 0,
        load_ms: t1.elapsed().as_millis() as u64,
    };
    tracing::info!(vm, load_ms = out.load_ms, "restored; the guest runs");
    Ok(out)
}

async fn load(qmp: &crate::qmp::Qmp, verified: Verified) -> Result<(), RestoreError> {
    crate::policy::apply(
        qmp,
        &crate::phases::save::save_policy().settings(Side::Target),
    )
    .await
    .map_err(|e| RestoreError::Load(e.to_string()))?;
    let (reader, mut writer) = std::io::pipe().map_err(|e| RestoreError::Load(e.to_string()))?;
    qmp.run_with_fd("getfd", Some(json!({ "fdname": FD_NAME })), reader.as_fd())
        .await?;
    drop(reader);
    qmp.run(
        "migrate-incoming",
        Some(json!({ "uri": format!("fd:{FD_NAME}") })),
    )
    .await?;
    // Dropping the writer at the end is QEMU's end of stream.
    let fed = tokio::task::spawn_blocking(move || statefile::stream(&verified, &mut writer))
        .await
        .map_err(|e| RestoreError::Load(format!("the file reader died: {e}")))?;
    fed?;
    let deadline = Instant::now() + LOAD_WAIT;
    loop {
        let status: StatusInfo = qmp.execute("query-status", None).await?;
        let info: MigrationInfo = qmp.execute("query-migrate", None).await?;
        match arrival(&status.status, info.status.as_deref()) {
            Arrival::Arrived => break,
            Arrival::AlreadyResumed => return Ok(()),
            Arrival::Arriving if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Arrival::Arriving => {
                return Err(RestoreError::Load(format!(
                    "QEMU was still loading after {}s",
                    LOAD_WAIT.as_secs()
                )));
            }
            Arrival::NotArrived(why) => {
                let why = info.error_desc.unwrap_or(why);
                return Err(RestoreError::Load(why));
            }
        }
    }
    qmp.run("cont", None).await?;
    Ok(())
}
