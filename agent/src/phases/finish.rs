//! Finish (target): if the guest arrived whole, lets the caller take ownership (move the
//! VM's `status.nodeName` and the disk lock here) and only then resumes the vCPUs with
//! `cont`. If cancelled, or anything fails, kills the new QEMU and removes its state.

use crate::cookie::{Cookie, Expect, LockState, Statistics};
use crate::error::{BoxError, Ctx, ErrorKind, PhaseError};
use crate::phases::{Arrival, MigrationRecord, Phase, arrival, check_vm_name};
use crate::qmp::{Event, MigrationInfo, StatusInfo};
use crate::supervisor::Supervisor;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast::{self, error::RecvError};

pub use super::record::FinishOutput;

/// What Finish needs.
#[derive(Debug, Clone, Copy)]
pub struct FinishInput<'a> {
    pub vm: &'a str,
    /// The migration's unique name.
    pub migration: &'a str,
    /// Perform's cookie; required unless `cancelled`.
    pub perform_cookie: Option<&'a str>,
    /// Roll back: remove the incoming QEMU instead of resuming it.
    pub cancelled: bool,
}

/// Runs Finish. `take_ownership` is awaited only when the guest arrived, before `cont`;
/// its error fails Finish (and the new QEMU is killed).
#[tracing::instrument(
    skip_all,
    fields(vm = input.vm, migration = input.migration, cancelled = input.cancelled)
)]
pub async fn finish<F>(
    sup: &Supervisor,
    input: FinishInput<'_>,
    take_ownership: F,
) -> Result<FinishOutput, PhaseError>
where
    F: Future<Output = Result<(), BoxError>>,
{
    let FinishInput {
        vm,
        migration,
        perform_cookie,
        cancelled,
    } = input;
    let cx = Ctx {
        phase: Phase::Finish,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let dir = sup.vm_dir(vm);
    let record = MigrationRecord::load_for(&dir, migration).map_err(|e| cx.err(e))?;
    if let Some(out) = record.as_ref().and_then(|r| r.finish.clone()) {
        tracing::info!(vm, migration, "Finish already done");
        return Ok(out);
    }
    if cancelled {
        abort(sup, &cx).await?;
        return Ok(FinishOutput {
            cookie: None,
            resumed: false,
        });
    }
    match take_over(sup, &cx, perform_cookie, take_ownership).await {
        Ok(cookie) => {
            let out = FinishOutput {
                cookie: Some(cookie),
                resumed: true,
            };
            let mut rec = record.unwrap_or_else(|| MigrationRecord::new(migration));
            rec.finish = Some(out.clone());
            rec.save(&dir).map_err(|e| cx.err(e))?;
            tracing::info!(vm, migration, "Finish done: guest runs here");
            Ok(out)
        }
        Err(kind) => {
            let err = cx.err(kind);
            abort(sup, &cx).await?;
            Err(err)
        }
    }
}

/// How long Finish waits for a guest whose stream has arrived to finish loading.
const ARRIVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Kills the incoming QEMU (if any) and removes its state dir.
async fn abort(sup: &Supervisor, cx: &Ctx<'_>) -> Result<(), PhaseError> {
    tracing::info!(
        vm = cx.vm,
        migration = cx.migration,
        "removing incoming QEMU"
    );
    sup.destroy(cx.vm).await.map_err(|e| cx.err(e))
}

async fn take_over<F>(
    sup: &Supervisor,
    cx: &Ctx<'_>,
    perform_cookie: Option<&str>,
    take_ownership: F,
) -> Result<String, ErrorKind>
where
    F: Future<Output = Result<(), BoxError>>,
{
    let vm = cx.vm;
    let domain = sup.definition(vm)?;
    let node = sup.node();
    let perform_cookie =
        perform_cookie.ok_or_else(|| ErrorKind::Refused("no Perform cookie".into()))?;
    let source = Cookie::decode(
        perform_cookie,
        &Expect {
            vm_name: vm,
            vm_uuid: domain.uuid,
            writer: Phase::Perform,
            own_host_uuid: node.host_uuid,
        },
    )?;
    let guest = sup.require(vm).await?;
    let mut events = guest.qmp.subscribe();
    let mut resumed_at = None;
    // The source saw the stream complete a moment before this QEMU finishes loading it.
    let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
    loop {
        let status: StatusInfo = guest.qmp.execute("query-status", None).await?;
        let info: MigrationInfo = guest.qmp.execute("query-migrate", None).await?;
        match arrival(&status.status, info.status.as_deref()) {
            Arrival::Arrived => {
                take_ownership.await.map_err(ErrorKind::Ownership)?;
                tracing::info!(vm, migration = cx.migration, "ownership taken, resuming");
                guest.qmp.run("cont", None).await?;
                resumed_at = resumed(&mut events).await;
                break;
            }
            Arrival::AlreadyResumed => break,
            Arrival::Arriving if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Arrival::Arriving => {
                return Err(ErrorKind::NotArrived(format!(
                    "the guest was still loading after {}s",
                    ARRIVAL_WAIT.as_secs()
                )));
            }
            Arrival::NotArrived(why) => return Err(ErrorKind::NotArrived(why)),
        }
    }
    // The stream is over: the guest keeps no TLS objects of this migration.
    if let Err(e) = crate::tls::clear(&guest.qmp).await {
        tracing::warn!(vm, migration = cx.migration, error = %e, "could not remove the TLS objects");
    }
    let mut cookie = Cookie::new(vm, domain.uuid, &node.name, node.host_uuid);
    cookie.lock = Some(LockState {
        holder: node.name.clone(),
        disks: domain.disks().map(|d| d.source.clone()).collect(),
    });
    cookie.statistics = source.statistics.map(|s| Statistics {
        resumed_at_ms: resumed_at,
        ..s
    });
    Ok(cookie.encode(Phase::Finish)?)
}

/// When the guest resumed here: the timestamp of QEMU's `RESUME` event, which `cont`
/// emits before it answers; the agent's clock if the event does not come.
async fn resumed(events: &mut broadcast::Receiver<Event>) -> Option<u64> {
    let wait = tokio::time::timeout(RESUME_EVENT_WAIT, async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.event == "RESUME" => return ev.unix_ms(),
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return None,
            }
        }
    });
    match wait.await {
        Ok(Some(at)) => Some(at),
        _ => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok()),
    }
}

/// How long Finish looks for the `RESUME` event after `cont` answered.
const RESUME_EVENT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
