//! Restore: starts a guest from a saved-state file where it stopped.
//!
//! The file is opened first, read-only, beneath this node's storage roots for the VM's
//! namespace ([`SavedFile::open`], [`storage::open_beneath`]): a path the roots do not
//! allow, a symbolic link, a FIFO or anything else that is not a regular file is
//! refused (reason `HostPathRefused`). Everything after reads that open file, never the
//! path again. [`verify`] runs next, before any QEMU: the file must be a whole,
//! unchanged [`statefile`] signed with the cluster's state key (a file without a valid
//! MAC — another cluster's, an older unsigned one, one a tenant wrote — is refused
//! before any decoder reads it), of this very guest (name and uuid), and the definition to
//! start must be ABI-compatible with the one saved ([`abi::check`]). Only then
//! [`restore_verified`] starts QEMU paused with `-incoming defer`, hands it the read end
//! of a pipe (`getfd`), `migrate-incoming fd:` from it, and streams the decompressed
//! file into the pipe on a blocking thread (checking MAC and checksum again). Once the state
//! has loaded it resumes the vCPUs. Any failure after QEMU started removes that QEMU;
//! the file is never written.

use crate::abi::{self, AbiError};
use crate::domain::{Domain, DomainError};
use crate::phases::{Arrival, arrival};
use crate::policy::Side;
use crate::qmp::{MigrationInfo, QmpError, StatusInfo};
use crate::statefile::{self, StateFileError, StateKey, Verified};
use crate::storage::{self, Access, Owner, StorageError, StorageRoots, UserPath};
use crate::supervisor::{Supervisor, SupervisorError};
use serde_json::json;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FD_NAME: &str = "ferry-restore";
/// The field a restore's path comes from, as refusals name it.
pub const PATH_FIELD: &str = "spec.restoreFrom";
/// How long QEMU may take to load a state whose stream was fully handed to it.
const LOAD_WAIT: Duration = Duration::from_secs(60);

/// Why a restore was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The path is not one this node's storage roots allow for the VM's namespace, or
    /// names no regular file beneath them.
    #[error(transparent)]
    HostPath(#[from] StorageError),
    /// A refused file: `spec.restoreFrom: saved state <path> <the rule it broke>`.
    #[error("{PATH_FIELD}: {0}")]
    File(#[from] StateFileError),
    #[error("saved state {path}: its saved definition cannot be read: {source}")]
    SavedDefinition { path: PathBuf, source: DomainError },
    #[error("saved state {path} cannot be restored into this definition: {source}")]
    Abi { path: PathBuf, source: AbiError },
    /// The file is the one the guest was restored from already (by its SHA-256).
    #[error(
        "spec.restoreFrom: saved state {path} is the file the guest was restored from already (from {from}, \
         SHA-256 {sha256}): a saved state is restored once, since the guest and its disks \
         went on from it; to restore it again, clear the VM's status.restoredFrom"
    )]
    Consumed {
        path: String,
        from: String,
        sha256: String,
    },
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
    /// A condition reason: `HostPathRefused` for a path the storage roots refuse (the
    /// state file's or the definition's), `StateFile<kind>` for a refused file,
    /// `AbiMismatch`, `AlreadyRunning`, or `RestoreFailed` for a failure once QEMU ran.
    pub fn reason(&self) -> &'static str {
        match self {
            RestoreError::HostPath(_) => "HostPathRefused",
            RestoreError::File(e) => match e.label() {
                "Unreadable" => "StateFileUnreadable",
                "NotAStateFile" => "StateFileNotAStateFile",
                "UnsupportedVersion" => "StateFileUnsupportedVersion",
                "Unsigned" => "StateFileUnsigned",
                "BadMac" => "StateFileBadMac",
                "Oversized" => "StateFileOversized",
                "DecoderLimit" => "StateFileDecoderLimit",
                "UnknownCompression" => "StateFileUnknownCompression",
                "Truncated" => "StateFileTruncated",
                "WrongVM" => "StateFileWrongVM",
                _ => "StateFileCorrupted",
            },
            RestoreError::SavedDefinition { .. } => "StateFileCorrupted",
            RestoreError::Consumed { .. } => "StateFileConsumed",
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

/// A saved-state file opened for a restore, read-only, beneath the node's storage roots.
#[derive(Debug, Clone)]
pub struct SavedFile {
    /// Shared with the blocking threads that read it.
    file: Arc<File>,
    /// The path the spec wrote (for messages).
    path: PathBuf,
}

impl SavedFile {
    /// Opens `path` (`spec.restoreFrom`) for a VM of `namespace`: a regular file beneath
    /// one of `roots`, in the namespace's directory of a read-write root
    /// ([`storage::open_beneath`]).
    pub fn open(
        roots: &StorageRoots,
        namespace: &str,
        path: &str,
    ) -> Result<SavedFile, RestoreError> {
        let user = UserPath {
            field: PATH_FIELD,
            path,
        };
        let opened = storage::open_beneath(roots, namespace, user, Access::ReadOnly)?;
        Ok(SavedFile {
            path: opened.path().to_path_buf(),
            file: Arc::new(File::from(opened.into_fd())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SHA-256 (hex) its trailer records, unauthenticated (it tells one file from
    /// another; [`verify`] checks it); `None` for a file without a readable trailer.
    pub async fn recorded_sha256(&self) -> Option<String> {
        let reading = self.clone();
        tokio::task::spawn_blocking(move || {
            statefile::recorded_sha256(&reading.file, &reading.path).ok()
        })
        .await
        .ok()
        .flatten()
    }
}

/// A file [`verify`] accepted for a definition, still open.
#[derive(Debug)]
pub struct VerifiedFile {
    file: SavedFile,
    pub verified: Verified,
    /// The key it was verified with; streaming it checks the MAC again.
    key: StateKey,
}

/// Checks `file` for a restore of `domain`, without starting anything: it must be
/// signed with `key`, the cluster's state key.
pub async fn verify(
    file: SavedFile,
    domain: &Domain,
    key: &StateKey,
) -> Result<VerifiedFile, RestoreError> {
    let (vm, uuid) = (domain.name.clone(), domain.uuid);
    let reading = file.clone();
    let with = key.clone();
    let verified = tokio::task::spawn_blocking(move || {
        statefile::verify(
            &reading.file,
            &reading.path,
            statefile::Expect { vm: &vm, uuid },
            &with,
        )
    })
    .await
    .map_err(|e| RestoreError::Load(format!("the verifier died: {e}")))??;
    let saved = Domain::parse(&verified.meta.domain_xml).map_err(|source| {
        RestoreError::SavedDefinition {
            path: file.path.clone(),
            source,
        }
    })?;
    abi::check(&saved, domain).map_err(|source| RestoreError::Abi {
        path: file.path.clone(),
        source,
    })?;
    Ok(VerifiedFile {
        file,
        verified,
        key: key.clone(),
    })
}

/// Restores `domain` from `path` (`spec.restoreFrom` of a VM in `namespace`) on this
/// node as the guest keyed `vm` and resumes it: [`SavedFile::open`] beneath the node's storage roots,
/// [`verify`] (signed with `key`), [`restore_verified`].
#[tracing::instrument(skip_all, fields(vm = vm, namespace = owner.namespace, path))]
pub async fn restore(
    sup: &Supervisor,
    vm: &str,
    domain: &Domain,
    owner: Owner<'_>,
    path: &str,
    key: &StateKey,
) -> Result<RestoreOutput, RestoreError> {
    if let Some(pid) = sup.running_pid(vm) {
        return Err(RestoreError::AlreadyRunning {
            vm: vm.to_string(),
            pid,
        });
    }
    let file = SavedFile::open(&sup.node().storage, owner.namespace, path)?;
    let t0 = Instant::now();
    let checked = verify(file, domain, key).await?;
    let verify_ms = t0.elapsed().as_millis() as u64;
    let verified = &checked.verified;
    tracing::info!(vm, compression = %verified.compression, stream_bytes = verified.stream_bytes, verify_ms, "saved state verified; starting QEMU");
    let mut out = restore_verified(sup, vm, domain, owner, checked).await?;
    out.verify_ms = verify_ms;
    Ok(out)
}

/// The second half of [`restore`], for a file [`verify`] accepted for `domain`: starts
/// QEMU, loads the state (checking it again on the way) and resumes the guest.
pub async fn restore_verified(
    sup: &Supervisor,
    vm: &str,
    domain: &Domain,
    owner: Owner<'_>,
    checked: VerifiedFile,
) -> Result<RestoreOutput, RestoreError> {
    if let Some(pid) = sup.running_pid(vm) {
        return Err(RestoreError::AlreadyRunning {
            vm: vm.to_string(),
            pid,
        });
    }
    let t1 = Instant::now();
    let guest = sup.start(vm, domain, owner, true).await?;
    let (stream_bytes, file_bytes) = (checked.verified.stream_bytes, checked.verified.file_bytes);
    let loaded = load(&guest.qmp, checked).await;
    if let Err(e) = loaded {
        tracing::warn!(vm, error = %e, "restore failed; removing its QEMU");
        drop(guest);
        if let Err(e) = sup.destroy(vm).await {
            tracing::error!(vm, error = %e, "removing the QEMU of a failed restore");
        }
        return Err(e);
    }
    let out = RestoreOutput {
        stream_bytes,
        file_bytes,
        verify_ms: 0,
        load_ms: t1.elapsed().as_millis() as u64,
    };
    tracing::info!(vm, load_ms = out.load_ms, "restored; the guest runs");
    Ok(out)
}

async fn load(qmp: &crate::qmp::Qmp, checked: VerifiedFile) -> Result<(), RestoreError> {
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
    let fed = tokio::task::spawn_blocking(move || {
        statefile::stream(
            &checked.file.file,
            &checked.verified,
            &checked.key,
            &mut writer,
        )
    })
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
