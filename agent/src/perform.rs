//! Perform (source): sends the guest to the URI Prepare returned with `migrate`, reports
//! progress while it runs, can be cancelled (`migrate_cancel`), and returns a cookie with
//! the statistics. A re-run finds a running or finished migration and follows it.

use crate::cookie::{Cookie, Expect, GraphicsInfo, Statistics};
use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::{MigrationRecord, Outcome, Phase, check_uri, check_vm_name, outcome};
use crate::qmp::{MigrationInfo, QmpError};
use crate::supervisor::Supervisor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// Bandwidth meaning "unlimited" (QEMU's own default is 128 MiB/s).
const UNLIMITED_BANDWIDTH: u64 = 1 << 50;
const POLL: Duration = Duration::from_millis(250);

/// Migration parameters; a policy layer can extend this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerformParams {
    /// Bytes per second; `None` is unlimited.
    pub max_bandwidth: Option<u64>,
    /// Longest acceptable pause at switch-over; `None` keeps QEMU's default (300 ms).
    pub max_downtime_ms: Option<u64>,
}

/// A progress report, from `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub total_bytes: u64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub dirty_rate_bytes_per_sec: u64,
    pub throughput_mbps: f64,
    /// RAM pass (QEMU's dirty-sync-count).
    pub pass: u64,
    pub expected_downtime_ms: u64,
}

impl Progress {
    pub fn from_info(info: &MigrationInfo) -> Progress {
        let ram = info.ram.clone().unwrap_or_default();
        Progress {
            total_bytes: ram.total,
            transferred_bytes: ram.transferred,
            remaining_bytes: ram.remaining,
            dirty_rate_bytes_per_sec: ram.dirty_pages_rate * ram.page_size.max(1),
            throughput_mbps: ram.mbps,
            pass: ram.dirty_sync_count,
            expected_downtime_ms: info.expected_downtime.unwrap_or(0),
        }
    }
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
}

fn statistics(info: &MigrationInfo) -> Statistics {
    let ram = info.ram.clone().unwrap_or_default();
    Statistics {
        total_time_ms: info.total_time.unwrap_or(0),
        downtime_ms: info.downtime.unwrap_or(0),
        setup_time_ms: info.setup_time.unwrap_or(0),
        transferred_bytes: ram.transferred,
        total_bytes: ram.total,
        passes: ram.dirty_sync_count,
    }
}

/// Runs Perform: migrates `vm` to `uri` (from Prepare) with `params`, calling
/// `on_progress` about four times a second, until it completes, fails or `cancel` fires.
#[allow(clippy::too_many_arguments)]
#[tracing::instrument(skip_all, fields(vm, migration))]
pub async fn perform(
    sup: &Supervisor,
    vm: &str,
    migration: &str,
    uri: &str,
    prepare_cookie: &str,
    params: &PerformParams,
    cancel: &CancellationToken,
    mut on_progress: impl FnMut(&Progress),
) -> Result<PerformOutput, PhaseError> {
    let cx = Ctx {
        phase: Phase::Perform,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    check_uri(uri).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let dir = sup.vm_dir(vm);
    let mut record = match MigrationRecord::load_for(&dir, migration).map_err(|e| cx.err(e))? {
        Some(r) => r,
        None => {
            return Err(cx.err(ErrorKind::Refused(
                "no Begin record for this migration on this node".into(),
            )));
        }
    };
    if let Some(out) = &record.perform {
        return Ok(out.clone());
    }
    let domain = sup.definition(vm).map_err(|e| cx.err(e))?;
    let node = sup.node();
    let target = Cookie::decode(
        prepare_cookie,
        &Expect {
            vm_name: vm,
            vm_uuid: domain.uuid,
            writer: Phase::Prepare,
            own_host_uuid: node.host_uuid,
        },
    )
    .map_err(|e| cx.err(e))?;
    let guest = sup.require(vm).await.map_err(|e| cx.err(e))?;
    let qmp = &guest.qmp;
    let mut events = qmp.subscribe();
    let info: MigrationInfo = qmp
        .execute("query-migrate", None)
        .await
        .map_err(|e| cx.err(e))?;
    let status = match outcome(info.status.as_deref()) {
        // The status of an earlier (e.g. incoming) migration, not of this one.
        Outcome::Completed if !record.perform_started => Outcome::NotStarted,
        other => other,
    };
    match status {
        Outcome::NotStarted | Outcome::Failed | Outcome::Cancelled => {
            record.perform_started = true;
            record.save(&dir).map_err(|e| cx.err(e))?;
            start(qmp, uri, params).await.map_err(|e| cx.err(e))?;
            tracing::info!(vm, migration, uri, "migration started");
        }
        Outcome::InProgress => {
            // A re-run (e.g. after an agent restart) follows the running migration, with
            // the parameters of this call.
            qmp.run("migrate-set-parameters", Some(parameters(params)))
                .await
                .map_err(|e| cx.err(e))?;
            tracing::info!(vm, migration, "following the running migration");
        }
        Outcome::Completed => {}
    }
    let mut cancel_sent = false;
    let mut tick = tokio::time::interval(POLL);
    let info = loop {
        tokio::select! {
            _ = cancel.cancelled(), if !cancel_sent => {
                tracing::info!(vm, migration, "cancelling migration");
                qmp.run("migrate_cancel", None).await.map_err(|e| cx.err(e))?;
                cancel_sent = true;
                continue;
            }
            ev = events.recv() => match ev {
                Ok(ev) if ev.event == "MIGRATION" => {
                    let status = ev.data["status"].as_str().unwrap_or("");
                    tracing::debug!(vm, migration, status, "MIGRATION event");
                    if outcome(Some(status)) == Outcome::InProgress {
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
        match outcome(info.status.as_deref()) {
            Outcome::InProgress => on_progress(&Progress::from_info(&info)),
            Outcome::NotStarted => {}
            _ => break info,
        }
    };
    match outcome(info.status.as_deref()) {
        Outcome::Completed => {}
        Outcome::Cancelled => return Err(cx.err(ErrorKind::Cancelled)),
        _ => {
            let why = info.error_desc.unwrap_or_else(|| "unknown error".into());
            return Err(cx.err(ErrorKind::MigrationFailed(why)));
        }
    }
    on_progress(&Progress::from_info(&info));
    let stats = statistics(&info);
    let mut cookie = Cookie::new(vm, domain.uuid, &node.name, node.host_uuid);
    cookie.statistics = Some(stats.clone());
    let out = PerformOutput {
        cookie: cookie.encode(Phase::Perform).map_err(|e| cx.err(e))?,
        total_time_ms: stats.total_time_ms,
        downtime_ms: stats.downtime_ms,
        transferred_bytes: stats.transferred_bytes,
        graphics: target
            .graphics
            .map(|GraphicsInfo { listen, port, .. }| (listen, port)),
    };
    record.perform = Some(out.clone());
    record.save(&dir).map_err(|e| cx.err(e))?;
    tracing::info!(
        vm,
        migration,
        total_time_ms = out.total_time_ms,
        downtime_ms = out.downtime_ms,
        "Perform done"
    );
    Ok(out)
}

/// The migration parameters for `params` (also applied to a running migration).
fn parameters(params: &PerformParams) -> serde_json::Value {
    let mut p = json!({
        "max-bandwidth": params.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH),
    });
    if let Some(d) = params.max_downtime_ms {
        p["downtime-limit"] = json!(d);
    }
    p
}

async fn start(qmp: &crate::qmp::Qmp, uri: &str, params: &PerformParams) -> Result<(), QmpError> {
    let caps = json!({ "capabilities": [ { "capability": "events", "state": true } ] });
    qmp.run("migrate-set-capabilities", Some(caps)).await?;
    qmp.run("migrate-set-parameters", Some(parameters(params)))
        .await?;
    qmp.run("migrate", Some(json!({ "uri": uri }))).await
}
