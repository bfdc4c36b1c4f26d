//! Begin (source): checks the VM can migrate, validates an app-supplied target
//! definition for ABI stability, takes the migration lock and writes the first cookie.
//! Nothing here pauses the guest.

use crate::abi;
use crate::cookie::{Cookie, LockState};
use crate::domain::Domain;
use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::{MigrationRecord, Phase, check_vm_name, may_begin};
use crate::qmp::{MigrationInfo, StatusInfo};
use crate::supervisor::Supervisor;

pub use super::record::BeginOutput;

/// What Begin needs.
#[derive(Debug, Clone, Copy)]
pub struct BeginInput<'a> {
    pub vm: &'a str,
    /// The migration's unique name.
    pub migration: &'a str,
    /// An app-supplied target definition, checked for ABI stability against the running
    /// one; `None`: the target runs the source's definition.
    pub target_xml: Option<&'a str>,
}

/// Runs Begin for `vm` as part of migration `migration` (its unique name).
#[tracing::instrument(skip_all, fields(vm = input.vm, migration = input.migration))]
pub async fn begin(sup: &Supervisor, input: BeginInput<'_>) -> Result<BeginOutput, PhaseError> {
    let BeginInput {
        vm,
        migration,
        target_xml,
    } = input;
    let cx = Ctx {
        phase: Phase::Begin,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let dir = sup.vm_dir(vm);
    let record = MigrationRecord::load(&dir).map_err(|e| cx.err(e))?;
    if let Some(r) = &record
        && r.migration == migration
        && let Some(out) = &r.begin
    {
        tracing::info!(vm, migration, "Begin already done");
        return Ok(out.clone());
    }
    let guest = sup.require(vm).await.map_err(|e| cx.err(e))?;
    let status: StatusInfo = guest
        .qmp
        .execute("query-status", None)
        .await
        .map_err(|e| cx.err(e))?;
    let mig: MigrationInfo = guest
        .qmp
        .execute("query-migrate", None)
        .await
        .map_err(|e| cx.err(e))?;
    may_begin(
        &status.status,
        mig.status.as_deref(),
        record.as_ref(),
        migration,
    )
    .map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let source = sup.definition(vm).map_err(|e| cx.err(e))?;
    let target = match target_xml {
        Some(xml) => {
            let target = Domain::parse(xml).map_err(|e| cx.err(e))?;
            abi::check(&source, &target).map_err(|e| cx.err(e))?;
            target
        }
        None => source.clone(),
    };
    let node = sup.node();
    let mut cookie = Cookie::new(&source.name, source.uuid, &node.name, node.host_uuid);
    cookie.lock = Some(LockState {
        holder: node.name.clone(),
        disks: source.disks().map(|d| d.source.clone()).collect(),
    });
    let out = BeginOutput {
        domain_xml: target.to_xml(),
        cookie: cookie.encode(Phase::Begin).map_err(|e| cx.err(e))?,
    };
    let mut rec = MigrationRecord::new(migration);
    rec.source_was_running = Some(status.running);
    rec.begin = Some(out.clone());
    rec.save(&dir).map_err(|e| cx.err(e))?;
    tracing::info!(vm, migration, "Begin done");
    Ok(out)
}
