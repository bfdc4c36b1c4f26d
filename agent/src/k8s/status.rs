//! The one writer of migration statuses on this node: typed merge patches
//! ([`MigrationStatusPatch`]), guarded by a resourceVersion when the writer decided on
//! one, retried while the API server fails, counted in `ferry_agent_status_writes`.

use std::time::Duration;

use ferry_crds::{MigrationStatusPatch, VirtualMachineMigration};
use kube::Api;
use kube::api::PatchParams;
use tracing::warn;

use super::metrics::WriteCounter;

/// How many times a write that must land is tried.
const ATTEMPTS: u64 = 20;

/// Why a status write did not land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwritten {
    /// Someone wrote the migration since the version the write was guarded by.
    Conflict,
    /// The migration is gone.
    Gone,
    /// The API server kept failing.
    Failed,
}

/// Writes the status of one migration.
pub struct StatusWriter {
    api: Api<VirtualMachineMigration>,
    name: String,
    writes: WriteCounter,
}

impl StatusWriter {
    pub fn new(api: Api<VirtualMachineMigration>, name: &str, writes: WriteCounter) -> Self {
        StatusWriter {
            api,
            name: name.to_string(),
            writes,
        }
    }

    /// Writes `patch`, only over `resource_version` when given; retried while the API
    /// server fails. The migration as written.
    pub async fn write(
        &self,
        patch: &MigrationStatusPatch,
        resource_version: Option<&str>,
    ) -> Result<VirtualMachineMigration, Unwritten> {
        for attempt in 1..=ATTEMPTS {
            match self.once(patch, resource_version).await {
                Err(Unwritten::Failed) => {
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                }
                done => return done,
            }
        }
        Err(Unwritten::Failed)
    }

    /// One attempt to write `patch` (progress, which the next sample replaces anyway).
    pub async fn once(
        &self,
        patch: &MigrationStatusPatch,
        resource_version: Option<&str>,
    ) -> Result<VirtualMachineMigration, Unwritten> {
        let body = patch.to_patch(resource_version);
        let result = self
            .api
            .patch_status(&self.name, &PatchParams::default(), &body)
            .await;
        let (label, result) = match result {
            Ok(m) => ("ok", Ok(m)),
            Err(kube::Error::Api(e)) if e.code == 409 => ("conflict", Err(Unwritten::Conflict)),
            Err(kube::Error::Api(e)) if e.code == 404 => ("gone", Err(Unwritten::Gone)),
            Err(e) => {
                warn!(migration = %self.name, error = %e, "status write failed");
                ("error", Err(Unwritten::Failed))
            }
        };
        self.writes.count(label);
        result
    }
}
