//! Perform (source): applies the migration [`Policy`] to the source QEMU, sends the guest
//! to the URI Prepare returned with `migrate`, reports progress while it runs, applies
//! the policy's decisions on the way ([`policy::decide`]: switch to post-copy, abort on a
//! timeout), can be cancelled (`migrate_cancel`, only before post-copy), and returns a
//! cookie with the statistics. It ends when the pre-copy migration completed, or at the
//! switch to post-copy, as libvirt's does: Finish then resumes the guest on the target
//! while the rest of its memory follows, and Confirm waits for that tail
//! ([`crate::postcopy::complete`]). A re-run finds a running or finished migration and
//! follows it. With node credentials the stream is TLS ([`crate::tls`]).

use crate::cookie::{Cookie, Expect, GraphicsInfo, Statistics};
use crate::error::{Ctx, ErrorKind, PhaseError};
use crate::phases::{MigrationRecord, Phase, TransferState, check_vm_name, transfer_state};
use crate::policy::{self, Action, Convergence, Judgement, Limit, Policy, Sample, Side, apply};
use crate::qmp::{Event, MigrationInfo, Qmp, QmpError};
use crate::stream::check_uri;
use crate::supervisor::Supervisor;
use crate::tls::{Credentials, Endpoint};
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

pub use super::record::PerformOutput;

const POLL: Duration = Duration::from_millis(250);

/// A progress report, from `query-migrate` and the policy's judgement.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransferProgress {
    pub total_bytes: u64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub dirty_rate_bytes_per_sec: u64,
    pub throughput_mbps: f64,
    /// RAM pass (QEMU's dirty-sync-count).
    pub pass: u64,
    pub expected_downtime_ms: u64,
    /// Whether the migration switched to post-copy.
    pub post_copy: bool,
    /// Whether the post-copy stream was cut and waits for recovery (`postcopy-paused`).
    pub paused: bool,
    /// How much auto-converge throttles the vCPUs, in percent.
    pub cpu_throttle_percent: u64,
    /// Whether pre-copy converges (`None`: too few passes to judge).
    pub converging: Option<bool>,
    /// The judgement and what the policy does about it, in a sentence.
    pub convergence: String,
    /// Estimated time to completion (`None` when it does not converge).
    pub eta: Option<Duration>,
}

impl TransferProgress {
    /// The report of `query-migrate` alone (no judgement).
    pub fn from_info(info: &MigrationInfo) -> TransferProgress {
        let s = sample(info);
        TransferProgress {
            total_bytes: s.total_bytes,
            transferred_bytes: info.ram.as_ref().map_or(0, |r| r.transferred),
            remaining_bytes: s.remaining_bytes,
            dirty_rate_bytes_per_sec: s.dirty_rate,
            throughput_mbps: info.ram.as_ref().map_or(0.0, |r| r.mbps),
            pass: s.pass,
            expected_downtime_ms: info.expected_downtime.unwrap_or(0),
            post_copy: s.post_copy,
            paused: crate::postcopy::is_paused(info.status.as_deref()),
            cpu_throttle_percent: s.cpu_throttle_percent,
            converging: None,
            convergence: String::new(),
            eta: None,
        }
    }
}

/// The policy's view of a `query-migrate` reply.
pub fn sample(info: &MigrationInfo) -> Sample {
    let ram = info.ram.clone().unwrap_or_default();
    Sample {
        pass: ram.dirty_sync_count,
        total_bytes: ram.total,
        remaining_bytes: ram.remaining,
        dirty_rate: ram.dirty_pages_rate * ram.page_size.max(1),
        throughput: (ram.mbps * 1_000_000.0 / 8.0) as u64,
        cpu_throttle_percent: info.cpu_throttle_percentage.unwrap_or(0),
        post_copy: info
            .status
            .as_deref()
            .is_some_and(|s| s.starts_with("postcopy")),
        elapsed: Duration::from_millis(info.total_time.unwrap_or(0)),
    }
}

/// What Perform needs: the migration's VM and name, where Prepare listens and its
/// cookie, the policy and TLS credentials (as Prepare got them), and the token that
/// cancels the transfer.
#[derive(Debug, Clone, Copy)]
pub struct PerformInput<'a> {
    pub vm: &'a str,
    pub migration: &'a str,
    /// Where QEMU sends the stream: the target's `tcp:` URI (Prepare's), or this guest's
    /// tunnel socket (tunnelled, [`crate::stream`]; its agent listens there).
    pub uri: &'a str,
    pub prepare_cookie: &'a str,
    /// The same policy Prepare applied to the target.
    pub policy: &'a Policy,
    /// This node's credentials when the stream is encrypted, `None` for plain TCP.
    pub tls: Option<&'a Credentials>,
    pub cancel: &'a CancellationToken,
}

/// Runs Perform: migrates `vm` to `uri` (from Prepare) under `policy` (the same policy
/// Prepare applied to the target), calling `on_progress` about four times a second,
/// until it completes, switches to post-copy, fails, a limit of the policy aborts it,
/// or `cancel` fires (a cancel is not sent once the switch to post-copy was asked for:
/// the guest's state goes to the target and the migration must finish). `tls`: this
/// node's credentials when the stream is encrypted (the target's certificate must name
/// the node that wrote Prepare's cookie), `None` for plain TCP; the TLS objects are
/// removed from the source QEMU once a pre-copy migration completed (after a switch to
/// post-copy the stream goes on, and they stay for its recovery).
#[tracing::instrument(skip_all, fields(vm = input.vm, migration = input.migration))]
pub async fn perform(
    sup: &Supervisor,
    input: PerformInput<'_>,
    mut on_progress: impl FnMut(&TransferProgress),
) -> Result<PerformOutput, PhaseError> {
    let PerformInput {
        vm,
        migration,
        uri,
        prepare_cookie,
        ..
    } = input;
    let cx = Ctx {
        phase: Phase::Perform,
        vm,
        migration,
    };
    check_vm_name(vm).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
    let dir = sup.vm_dir(vm);
    check_uri(uri, &dir).map_err(|m| cx.err(ErrorKind::Refused(m)))?;
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
            vm_name: &domain.name,
            vm_uuid: domain.uuid,
            writer: Phase::Prepare,
            own_host_uuid: node.host_uuid,
        },
    )
    .map_err(|e| cx.err(e))?;
    let guest = sup.require(vm).await.map_err(|e| cx.err(e))?;
    let mut transfer = Transfer::new(cx, &guest.qmp, input);
    transfer.start(&mut record, &dir, &target.host_name).await?;
    let info = transfer.follow(&mut on_progress).await?;
    let stats = transfer.conclude(info, &mut on_progress).await?;
    let mut cookie = Cookie::new(&domain.name, domain.uuid, &node.name, node.host_uuid);
    cookie.statistics = Some(stats.clone());
    let out = PerformOutput {
        cookie: cookie.encode(Phase::Perform).map_err(|e| cx.err(e))?,
        total_time_ms: stats.total_time_ms,
        downtime_ms: stats.downtime_ms,
        transferred_bytes: stats.transferred_bytes,
        graphics: target
            .graphics
            .map(|GraphicsInfo { listen, port, .. }| (listen, port)),
        post_copy: transfer.post_copy_sent || transfer.in_post_copy,
        max_cpu_throttle_percent: transfer.max_throttle,
    };
    record.perform = Some(out.clone());
    record.save(&dir).map_err(|e| cx.err(e))?;
    tracing::info!(
        vm,
        migration,
        total_time_ms = out.total_time_ms,
        downtime_ms = out.downtime_ms,
        post_copy = out.post_copy,
        max_cpu_throttle_percent = out.max_cpu_throttle_percent,
        "Perform done"
    );
    Ok(out)
}

/// One outgoing transfer as Perform drives it, and what it has seen of it so far.
struct Transfer<'a> {
    cx: Ctx<'a>,
    qmp: &'a Qmp,
    input: PerformInput<'a>,
    /// Subscribed before the first `query-migrate`, so no event of this transfer is missed.
    events: broadcast::Receiver<Event>,
    cancel_sent: bool,
    cancel_ignored: bool,
    in_post_copy: bool,
    post_copy_sent: bool,
    aborted: Option<Limit>,
    max_throttle: u64,
    conv: Convergence,
    /// When the guest paused here for the switch-over (QEMU's STOP event).
    stopped_at: Option<u64>,
    /// The downtime limit last set on QEMU ([`Policy::downtime_limit`]); `None` until
    /// this Perform set one.
    downtime_limit: Option<u64>,
}

impl<'a> Transfer<'a> {
    fn new(cx: Ctx<'a>, qmp: &'a Qmp, input: PerformInput<'a>) -> Self {
        Transfer {
            cx,
            qmp,
            input,
            events: qmp.subscribe(),
            cancel_sent: false,
            cancel_ignored: false,
            in_post_copy: false,
            post_copy_sent: false,
            aborted: None,
            max_throttle: 0,
            conv: Convergence::default(),
            stopped_at: None,
            downtime_limit: None,
        }
    }

    /// Starts the transfer to the target node `target` (Prepare's cookie names it): the
    /// policy's source settings, TLS (or none), `migrate`. A re-run that finds this
    /// migration running follows it, with this call's live parameters; one that finds it
    /// completed goes straight on.
    async fn start(
        &self,
        record: &mut MigrationRecord,
        dir: &Path,
        target: &str,
    ) -> Result<(), PhaseError> {
        let Transfer { cx, qmp, .. } = *self;
        let (vm, migration) = (cx.vm, cx.migration);
        let PerformInput {
            uri, policy, tls, ..
        } = self.input;
        let info: MigrationInfo = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| cx.err(e))?;
        let status = match transfer_state(info.status.as_deref()) {
            // The status of an earlier (e.g. incoming) migration, not of this one.
            TransferState::Completed if !record.perform_started => TransferState::NotStarted,
            other => other,
        };
        match status {
            TransferState::NotStarted | TransferState::Failed | TransferState::Cancelled => {
                record.perform_started = true;
                record.save(dir).map_err(|e| cx.err(e))?;
                apply(qmp, &policy.settings(Side::Source))
                    .await
                    .map_err(|e| cx.err(e))?;
                match tls {
                    Some(creds) => {
                        let endpoint = Endpoint::Source { target };
                        crate::tls::apply(qmp, dir, creds, endpoint).await
                    }
                    None => crate::tls::clear(qmp).await,
                }
                .map_err(|e| cx.err(e))?;
                qmp.run("migrate", Some(json!({ "uri": uri })))
                    .await
                    .map_err(|e| cx.err(e))?;
                tracing::info!(vm, migration, uri, ?policy, "migration started");
            }
            TransferState::InProgress => {
                // A re-run (e.g. after an agent restart) follows the running migration, with
                // the parameters of this call.
                let live = serde_json::Value::Object(policy.live_parameters());
                qmp.run("migrate-set-parameters", Some(live))
                    .await
                    .map_err(|e| cx.err(e))?;
                tracing::info!(vm, migration, "following the running migration");
            }
            TransferState::Completed => {}
        }
        Ok(())
    }

    /// The progress/policy loop: on every event or poll, looks at `query-migrate`,
    /// reports progress and applies the policy's decision, until the transfer ends or
    /// switched to post-copy; returns its last `query-migrate`.
    async fn follow(
        &mut self,
        on_progress: &mut impl FnMut(&TransferProgress),
    ) -> Result<MigrationInfo, PhaseError> {
        let Transfer { cx, qmp, .. } = *self;
        let (vm, migration) = (cx.vm, cx.migration);
        let cancel = self.input.cancel;
        let mut tick = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = cancel.cancelled(), if !self.cancel_sent && !self.cancel_ignored => {
                    if self.in_post_copy || self.post_copy_sent {
                        tracing::warn!(vm, migration, "cancel ignored: the migration switches to post-copy and must finish");
                        self.cancel_ignored = true;
                        continue;
                    }
                    tracing::info!(vm, migration, "cancelling migration");
                    qmp.run("migrate_cancel", None).await.map_err(|e| cx.err(e))?;
                    self.cancel_sent = true;
                    continue;
                }
                ev = self.events.recv() => match ev {
                    Ok(ev) if ev.event == "MIGRATION" => {
                        let status = ev.data["status"].as_str().unwrap_or("");
                        tracing::debug!(vm, migration, status, "MIGRATION event");
                        if transfer_state(Some(status)) == TransferState::InProgress {
                            continue;
                        }
                    }
                    Ok(ev) if ev.event == "STOP" => {
                        self.stopped_at = ev.unix_ms().or(self.stopped_at);
                        continue;
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
                TransferState::InProgress => {}
                TransferState::NotStarted => continue,
                _ => return Ok(info),
            }
            let s = sample(&info);
            self.in_post_copy |= s.post_copy;
            self.max_throttle = self.max_throttle.max(s.cpu_throttle_percent);
            self.conv.observe(&s);
            self.report(&info, &s, on_progress);
            if s.post_copy {
                // The switch is done: the source paused the guest and sent its devices.
                // Finish resumes it on the target while the rest of its memory follows.
                return Ok(info);
            }
            if self.cancel_sent {
                continue;
            }
            self.ramp_downtime(&s).await;
            self.decide(&s).await?;
        }
    }

    /// Reports the progress of `info` (sampled as `s`) with the policy's judgement.
    fn report(
        &self,
        info: &MigrationInfo,
        s: &Sample,
        on_progress: &mut impl FnMut(&TransferProgress),
    ) {
        let policy = self.input.policy;
        let judgement = if s.post_copy {
            Judgement::Converging
        } else {
            self.conv.judge()
        };
        let report = TransferProgress::from_info(info);
        on_progress(&if report.paused {
            TransferProgress {
                converging: judgement.converging(),
                convergence: crate::postcopy::PAUSED_WORDS.into(),
                ..report
            }
        } else {
            TransferProgress {
                converging: judgement.converging(),
                convergence: policy::explain(policy, judgement, s),
                eta: policy::eta(s, judgement),
                ..report
            }
        });
    }

    /// Sets QEMU's downtime limit for the pass of sample `s` when the ramp moved on
    /// ([`Policy::downtime_limit`]): low at first, higher each pass pre-copy goes on,
    /// never above the policy's maximum.
    /// A refusal is logged and tried again at the next sample: the transfer goes on
    /// under the limit it has, and a QEMU that is gone shows in the next `query-migrate`.
    async fn ramp_downtime(&mut self, s: &Sample) {
        let Transfer { cx, qmp, .. } = *self;
        let (vm, migration) = (cx.vm, cx.migration);
        let limit = self.input.policy.downtime_limit(s.pass);
        if s.post_copy || self.downtime_limit == Some(limit) {
            return;
        }
        let set = json!({ "downtime-limit": limit });
        match qmp.run("migrate-set-parameters", Some(set)).await {
            Ok(()) => {
                tracing::debug!(
                    vm,
                    migration,
                    pass = s.pass,
                    downtime_limit_ms = limit,
                    "downtime limit set"
                );
                self.downtime_limit = Some(limit);
            }
            Err(e) => {
                tracing::warn!(vm, migration, pass = s.pass, downtime_limit_ms = limit, error = %e, "could not set the downtime limit");
            }
        }
    }

    /// Applies the policy's decision on sample `s`: go on, switch to post-copy, or abort
    /// because a limit was hit.
    async fn decide(&mut self, s: &Sample) -> Result<(), PhaseError> {
        let Transfer { cx, qmp, .. } = *self;
        let (vm, migration) = (cx.vm, cx.migration);
        match policy::decide(self.input.policy, &self.conv, s) {
            Action::Continue => {}
            Action::StartPostCopy(why) if !self.post_copy_sent => {
                tracing::info!(vm, migration, reason = %why, pass = s.pass, "switching to post-copy");
                qmp.run("migrate-start-postcopy", None)
                    .await
                    .map_err(|e| cx.err(e))?;
                self.post_copy_sent = true;
            }
            Action::StartPostCopy(_) => {}
            Action::Abort(limit) => {
                tracing::warn!(vm, migration, %limit, pass = s.pass, "aborting the migration");
                qmp.run("migrate_cancel", None)
                    .await
                    .map_err(|e| cx.err(e))?;
                self.cancel_sent = true;
                self.aborted = Some(limit);
            }
        }
        Ok(())
    }

    /// The result of the transfer (`info`, its last `query-migrate`): an error unless it
    /// completed or switched to post-copy; else the last progress, the TLS objects
    /// removed (after a completion), and the statistics so far.
    async fn conclude(
        &mut self,
        info: MigrationInfo,
        on_progress: &mut impl FnMut(&TransferProgress),
    ) -> Result<Statistics, PhaseError> {
        let Transfer { cx, qmp, .. } = *self;
        let (vm, migration) = (cx.vm, cx.migration);
        let ended = transfer_state(info.status.as_deref());
        let switched = crate::postcopy::in_post_copy(info.status.as_deref());
        match ended {
            TransferState::Completed => {}
            TransferState::InProgress if switched => {}
            // A migration this Perform cancelled may end `failed` rather than `cancelled`:
            // the cancel shuts the socket down under a write in flight ("Unable to write to
            // socket: Bad file descriptor"). It is still the cancel.
            TransferState::Cancelled | TransferState::Failed
                if ended == TransferState::Cancelled || self.cancel_sent =>
            {
                return Err(cx.err(match self.aborted {
                    Some(limit) => ErrorKind::LimitExceeded(limit.to_string()),
                    None => ErrorKind::Cancelled,
                }));
            }
            _ => {
                let why = info.error_desc.unwrap_or_else(|| "unknown error".into());
                return Err(cx.err(ErrorKind::MigrationFailed(why)));
            }
        }
        on_progress(&TransferProgress::from_info(&info));
        // The STOP came before the completion, but the poll may have seen the completion
        // before the loop read the event.
        while let Ok(ev) = self.events.try_recv() {
            if ev.event == "STOP" {
                self.stopped_at = ev.unix_ms().or(self.stopped_at);
            }
        }
        if !switched && let Err(e) = crate::tls::clear(qmp).await {
            tracing::warn!(vm, migration, error = %e, "could not remove the TLS objects");
        }
        // After a switch the guest's downtime ends when Finish resumes it on the target
        // (the Finish cookie's `resumed_at_ms`), not with the stream.
        let mut stats = Statistics::from_info(&info);
        stats.stopped_at_ms = self.stopped_at;
        Ok(stats)
    }
}
