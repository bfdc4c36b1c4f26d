//! Finish (target): if the guest arrived whole, lets the caller commit (hand the disk
//! locks over, then move the VM's `status.nodeName` here: the commit point) and only
//! then resumes the vCPUs with `cont`. Before the commit, a cancel or any failure kills
//! the new QEMU and removes its state; after it Finish only goes forward — it never
//! removes the incoming QEMU — and retries `cont` until the guest runs here
//! (docs/protocol.md, "The commit point").
//!
//! After a switch to post-copy the guest's devices are here while the rest of its memory
//! still follows from the source, as in libvirt: Finish commits and resumes it then, and
//! the pages it touches first come ahead of the background stream (postcopy-preempt).
//! There is no way back from the switch, so Finish neither waits with a deadline nor
//! aborts while the incoming QEMU lives: it tries the commit again until it lands.

use crate::cookie::{Cookie, Expect, LockState, Statistics};
use crate::error::{BoxError, Ctx, ErrorKind, PhaseError};
use crate::phases::{Arrival, MigrationRecord, Phase, arrival, check_vm_name};
use crate::qmp::{Event, MigrationInfo, StatusInfo};
use crate::supervisor::Supervisor;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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
    /// Roll back: remove the incoming QEMU instead of resuming it. Ignored once this
    /// node committed (its record says so): then only going forward keeps one guest.
    pub cancelled: bool,
}

/// Runs Finish. `commit` is called once the guest arrived, before `cont`: it does
/// everything that can fail before the guest may run here, then takes ownership. Its
/// `Err` must mean this node certainly does not own the guest (before a switch to
/// post-copy the incoming QEMU is then killed; after one `commit` is called again);
/// an ownership write whose answer was lost is the caller's to settle.
#[tracing::instrument(
    skip_all,
    fields(vm = input.vm, migration = input.migration, cancelled = input.cancelled)
)]
pub async fn finish<C, F>(
    sup: &Supervisor,
    input: FinishInput<'_>,
    mut commit: C,
) -> Result<FinishOutput, PhaseError>
where
    C: FnMut() -> F,
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
    let mut rec = record.unwrap_or_else(|| MigrationRecord::new(migration));
    if cancelled && !rec.committed {
        abort(sup, &cx).await?;
        return Ok(FinishOutput {
            cookie: None,
            resumed: false,
        });
    }
    let source = source_cookie(sup, &cx, perform_cookie).map_err(|k| cx.err(k))?;
    // Whether a `cont` may have reached the QEMU already: an earlier run committed and
    // may have sent it (this run has not).
    let cont_sent = rec.committed;
    if !rec.committed {
        if let Err(kind) = commit_here(sup, &cx, &mut commit).await {
            let err = cx.err(kind);
            abort(sup, &cx).await?;
            return Err(err);
        }
        rec.committed = true;
        if let Err(e) = rec.save(&dir) {
            // The VM names this node now: going forward is the only way left.
            tracing::error!(vm, migration, error = %e, "could not record the commit; resuming all the same");
        }
        crate::fault::pause("after-commit").await;
    }
    let resumed_at = match resume_here(sup, &cx, cont_sent).await {
        Ok(at) => at,
        Err(kind) => {
            // The QEMU is gone: what is left of it here goes too.
            let err = cx.err(kind);
            abort(sup, &cx).await?;
            return Err(err);
        }
    };
    let cookie = finish_cookie(sup, &cx, source, resumed_at).map_err(|k| cx.err(k))?;
    let out = FinishOutput {
        cookie: Some(cookie),
        resumed: true,
    };
    rec.finish = Some(out.clone());
    rec.save(&dir).map_err(|e| cx.err(e))?;
    tracing::info!(vm, migration, "Finish done: guest runs here");
    Ok(out)
}

/// How long Finish waits for a guest whose stream has arrived to finish loading.
const ARRIVAL_WAIT: Duration = Duration::from_secs(30);

/// How soon a `cont` that failed on a QEMU still running is sent again.
const CONT_RETRY: Duration = Duration::from_millis(200);
/// How soon a commit that failed after the switch to post-copy is tried again.
const COMMIT_RETRY: Duration = Duration::from_secs(1);
/// How long a NeverRan Finish waits for the exiting incoming QEMU to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(15);

/// Kills the incoming QEMU (if any) and removes its state dir.
async fn abort(sup: &Supervisor, cx: &Ctx<'_>) -> Result<(), PhaseError> {
    tracing::info!(
        vm = cx.vm,
        migration = cx.migration,
        "removing incoming QEMU"
    );
    sup.destroy(cx.vm).await.map_err(|e| cx.err(e))
}

/// Perform's cookie, checked against this guest and host.
fn source_cookie(
    sup: &Supervisor,
    cx: &Ctx<'_>,
    perform_cookie: Option<&str>,
) -> Result<Cookie, ErrorKind> {
    let domain = sup.definition(cx.vm)?;
    let perform_cookie =
        perform_cookie.ok_or_else(|| ErrorKind::Refused("no Perform cookie".into()))?;
    Ok(Cookie::decode(
        perform_cookie,
        &Expect {
            vm_name: &domain.name,
            vm_uuid: domain.uuid,
            writer: Phase::Perform,
            own_host_uuid: sup.node().host_uuid,
        },
    )?)
}

/// Waits for the guest to finish loading (after a switch to post-copy: for its devices),
/// then runs `commit`. Every error here comes before the commit point. After a switch
/// the incoming QEMU holds the only current copy of part of the guest's memory, so as
/// long as it lives nothing here gives up: the wait has no deadline, and a failed QMP
/// look or commit is tried again.
async fn commit_here<C, F>(sup: &Supervisor, cx: &Ctx<'_>, commit: &mut C) -> Result<(), ErrorKind>
where
    C: FnMut() -> F,
    F: Future<Output = Result<(), BoxError>>,
{
    let (vm, migration) = (cx.vm, cx.migration);
    // The source saw the stream complete a moment before this QEMU finishes loading it.
    let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
    let mut post_copy = false;
    let alive = || sup.running_pid(vm).is_some();
    loop {
        let look = async {
            let guest = sup.require(vm).await?;
            let status: StatusInfo = guest.qmp.execute("query-status", None).await?;
            let info: MigrationInfo = guest.qmp.execute("query-migrate", None).await?;
            Ok::<_, ErrorKind>((status.status, info.status))
        };
        let (run, incoming) = match look.await {
            Ok(seen) => seen,
            Err(e) if post_copy && alive() => {
                tracing::warn!(vm, migration, error = %e, "post-copy: cannot look at the incoming QEMU; trying again");
                tokio::time::sleep(CONT_RETRY).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        post_copy |= crate::postcopy::in_post_copy(incoming.as_deref());
        match arrival(&run, incoming.as_deref()) {
            // A guest already running here was resumed by an earlier run whose record
            // was lost; the commit is idempotent.
            Arrival::Arrived | Arrival::AlreadyResumed => break,
            Arrival::Arriving if post_copy || tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
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
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match commit().await {
            Ok(()) => break,
            Err(e) if post_copy && alive() => {
                if attempt == 1 || attempt.is_multiple_of(20) {
                    tracing::warn!(vm, migration, attempt, error = %e, "post-copy: the commit failed; trying again (there is no way back after the switch)");
                }
                tokio::time::sleep(COMMIT_RETRY).await;
            }
            Err(e) => return Err(ErrorKind::Ownership(e)),
        }
    }
    tracing::info!(
        vm,
        migration,
        post_copy,
        "committed: the guest is this node's; resuming"
    );
    Ok(())
}

/// After the commit: sends `cont` until the guest runs here; when it resumed (the
/// `RESUME` event's time, `None` if an earlier run resumed it). Should the QEMU be
/// gone, the guest never ran here unless a `cont` may have reached it (`cont_sent`).
async fn resume_here(
    sup: &Supervisor,
    cx: &Ctx<'_>,
    mut cont_sent: bool,
) -> Result<Option<u64>, ErrorKind> {
    let vm = cx.vm;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let guest = match sup.attach(vm).await {
            Ok(Some(guest)) => guest,
            Ok(None) if cont_sent => {
                return Err(ErrorKind::GuestLost(
                    "the target's QEMU exited after the guest was resumed there (or may have \
                     been): its copy on the source is stale"
                        .into(),
                ));
            }
            Ok(None) => {
                // The source resumes next: let the exiting QEMU release the images first.
                if !sup.wait_exited(vm, EXIT_WAIT).await {
                    tracing::warn!(
                        vm,
                        migration = cx.migration,
                        "the incoming QEMU is still exiting"
                    );
                }
                return Err(ErrorKind::NeverRan(
                    "it exited after the commit, before `cont`".into(),
                ));
            }
            Err(e) => {
                tracing::warn!(vm, migration = cx.migration, attempt, error = %e, "cannot reach the incoming QEMU; trying again");
                tokio::time::sleep(CONT_RETRY).await;
                continue;
            }
        };
        let mut events = guest.qmp.subscribe();
        let status: Result<StatusInfo, _> = guest.qmp.execute("query-status", None).await;
        if let Ok(s) = &status
            && s.status == "running"
        {
            // The guest is already running here; clear the stream's TLS objects again.
            clear_tls(&guest, cx).await;
            return Ok(None);
        }
        cont_sent = true;
        match guest.qmp.run("cont", None).await {
            Ok(()) => {
                let at = resumed(&mut events).await;
                clear_tls(&guest, cx).await;
                return Ok(at);
            }
            Err(e) => {
                tracing::warn!(vm, migration = cx.migration, attempt, error = %e, "cont failed; sending it again");
                tokio::time::sleep(CONT_RETRY).await;
            }
        }
    }
}

/// The stream is over: the guest keeps no TLS objects of this migration. After a switch
/// to post-copy the rest of the memory still comes (and may need recovering), so they
/// stay until it is over (the agent's watcher of the incoming QEMU removes them then).
async fn clear_tls(guest: &crate::supervisor::Guest, cx: &Ctx<'_>) {
    let incoming: Result<MigrationInfo, _> = guest.qmp.execute("query-migrate", None).await;
    if incoming.is_ok_and(|i| crate::postcopy::in_post_copy(i.status.as_deref())) {
        return;
    }
    if let Err(e) = crate::tls::clear(&guest.qmp).await {
        tracing::warn!(vm = cx.vm, migration = cx.migration, error = %e, "could not remove the TLS objects");
    }
}

/// The Finish cookie: this host holds the guest and its disks; the source's statistics
/// with the moment the guest resumed here.
fn finish_cookie(
    sup: &Supervisor,
    cx: &Ctx<'_>,
    source: Cookie,
    resumed_at: Option<u64>,
) -> Result<String, ErrorKind> {
    let domain = sup.definition(cx.vm)?;
    let node = sup.node();
    let mut cookie = Cookie::new(&domain.name, domain.uuid, &node.name, node.host_uuid);
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
