//! The per-migration record that makes each phase idempotent, and the phase outputs it
//! keeps: pure data, so this file depends on no phase.

use crate::statefile::Compression;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Per-migration record in the VM's state dir: what each phase already produced, so a
/// re-run after a crash returns the same result. Its presence on the source is also the
/// migration lock on the VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub migration: String,
    /// Whether the source vCPUs ran when Begin started (Confirm(cancelled) resumes only then).
    #[serde(default)]
    pub source_was_running: Option<bool>,
    /// Whether this migration's Perform issued `migrate`. A guest that once arrived here
    /// by migration reports that incoming migration as `completed`, which says nothing
    /// about an outgoing one that was never started.
    #[serde(default)]
    pub perform_started: bool,
    /// Target: Finish took ownership of the VM (the commit point) and may have sent
    /// `cont`. From here on Finish only goes forward; should this QEMU be found gone,
    /// the guest may have run here and its copy on the source is stale.
    #[serde(default)]
    pub committed: bool,
    pub begin: Option<BeginOutput>,
    pub prepare: Option<PrepareOutput>,
    pub perform: Option<PerformOutput>,
    pub finish: Option<FinishOutput>,
    /// What a migration to a file saved (its Perform).
    #[serde(default)]
    pub save: Option<SaveOutput>,
    /// The temporary file of a save under way, recorded before the guest is touched:
    /// an attempt that dies leaves it, and the next attempt or the rollback removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_partial: Option<PartialSave>,
}

/// A save's temporary file: where the save goes, for whom, and the file's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialSave {
    pub namespace: String,
    /// `spec.toFile.path`.
    pub path: String,
    /// The temporary file's name in that path's directory.
    pub temp: String,
}

pub const RECORD_FILE: &str = "migration.json";

impl MigrationRecord {
    pub fn new(migration: &str) -> Self {
        MigrationRecord {
            migration: migration.to_string(),
            ..Default::default()
        }
    }

    /// The record in `vm_dir`, if any.
    pub fn load(vm_dir: &Path) -> std::io::Result<Option<MigrationRecord>> {
        match std::fs::read(vm_dir.join(RECORD_FILE)) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The record of `migration` (a record of another migration is ignored).
    pub fn load_for(vm_dir: &Path, migration: &str) -> std::io::Result<Option<MigrationRecord>> {
        Ok(Self::load(vm_dir)?.filter(|r| r.migration == migration))
    }

    pub fn save(&self, vm_dir: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::node::write_atomic(&vm_dir.join(RECORD_FILE), &data)
    }

    pub fn remove(vm_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(vm_dir.join(RECORD_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// What Begin hands to Prepare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeginOutput {
    /// The definition the target starts QEMU with.
    pub domain_xml: String,
    /// The Begin cookie (guest and source identity, lock state).
    pub cookie: String,
}

/// What Prepare hands to Perform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareOutput {
    /// Where the incoming QEMU listens: `tcp:<target address>:<port>`, or
    /// `unix:<incoming socket>` (tunnelled; the source reaches it through the agents).
    pub uri: String,
    /// The Prepare cookie (target identity, graphics of the new QEMU).
    pub cookie: String,
}

/// What Perform hands to Finish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerformOutput {
    /// The Perform cookie (source identity, statistics).
    pub cookie: String,
    pub total_time_ms: u64,
    pub downtime_ms: u64,
    pub transferred_bytes: u64,
    /// Where console clients connect now (from Prepare's cookie).
    pub graphics: Option<(String, u16)>,
    /// Whether the migration switched to post-copy.
    #[serde(default)]
    pub post_copy: bool,
    /// The most auto-converge throttled the vCPUs, in percent.
    #[serde(default)]
    pub max_cpu_throttle_percent: u64,
}

/// What Finish hands to Confirm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishOutput {
    /// The Finish cookie (target identity, lock state now held by the target, statistics);
    /// `None` when Finish ran cancelled.
    pub cookie: Option<String>,
    /// Whether the guest now runs here.
    pub resumed: bool,
}

/// What a save produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveOutput {
    pub path: String,
    pub compression: Compression,
    /// Bytes of QEMU's migration stream.
    pub stream_bytes: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// From pausing the guest to the file in place.
    pub save_time_ms: u64,
    /// QEMU's own time for the migration.
    pub qemu_time_ms: u64,
    pub sha256: String,
}
