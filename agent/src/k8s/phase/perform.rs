//! Perform on the source: sends the guest's state to the target's URI under the policy,
//! reporting progress into the status at most once a second from a task of its own,
//! until the transfer completed or switched to post-copy (Confirm then follows the
//! tail); gives Perform's cookie and the transfer's figures. A tunnelled stream goes
//! through this agent's [`Tunnel`].

use std::time::{Duration, Instant};

use ferry_agent::fault;
use ferry_agent::phases::perform::{self, TransferProgress as Sample};
use ferry_agent::postcopy::TargetReport;
use ferry_crds::{
    MigrationMode, MigrationPhase, MigrationStatusPatch, Progress, Reason,
    VirtualMachineMigrationStatus,
};
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;

use super::{Done, Run, StepError};
use crate::k8s::peer::tunnel::{Route, Tunnel};
use crate::k8s::peer::wire::tunnel_path;

impl Run<'_> {
    pub(super) async fn perform(&self, cancel: &CancellationToken) -> Result<Done, StepError> {
        if self.inputs.cancelled {
            return Err(StepError::Cancelled(
                "migration cancelled before the transfer started",
            ));
        }
        let (_, domain) = self.vm().await?;
        let uri = self
            .inputs
            .migration_uri
            .as_deref()
            .ok_or(StepError::MissingInput("Prepare left no migration URI"))?;
        let cookie = self
            .inputs
            .cookies
            .prepare
            .as_deref()
            .ok_or(StepError::MissingInput("Prepare left no cookie"))?;
        let params = self.policy()?;
        let tls = self.tls()?;
        let key = self.key(&domain);
        // Progress goes to the status at most once a second, from its own task.
        let (tx, writer) = self.progress_writer();
        let mut last = Instant::now() - Duration::from_secs(1);
        let mut last_sent: Option<Progress> = None;
        let on_progress = |p: &Sample| {
            if p.transferred_bytes > 0 {
                fault::pause_blocking("perform-early");
            }
            // Most of the guest's RAM is sent: under a quarter of it remains.
            if p.transferred_bytes > 0 && p.remaining_bytes.saturating_mul(4) <= p.total_bytes {
                fault::pause_blocking("perform-late");
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let progress = progress_of(p);
                if tx.try_send(progress.clone()).is_ok() {
                    last_sent = Some(progress);
                }
            }
        };
        // Tunnelled: QEMU goes to the tunnel socket, held open while Perform runs (and
        // the connections it carried after that, until their ends close them).
        let tunnel = self.tunnel(uri, &key)?;
        let qemu_uri = tunnel.as_ref().map(Tunnel::uri);
        let input = perform::PerformInput {
            vm: &key,
            migration: &self.id,
            uri: qemu_uri.as_deref().unwrap_or(uri),
            prepare_cookie: cookie,
            policy: &params,
            tls: tls.as_ref(),
            cancel,
        };
        let result = perform::perform(&self.agent.sup, input, on_progress).await;
        drop(tunnel);
        drop(tx);
        let _ = writer.await;
        let out = result?;
        let mode = if out.post_copy {
            MigrationMode::PostCopy
        } else {
            MigrationMode::PreCopy
        };
        // The last progress written, completed: what the status shows after Perform
        // (after a switch to post-copy, Confirm reports the tail from there).
        let progress = if out.post_copy {
            Progress {
                mode: Some(mode),
                cpu_throttle_percent: Some(out.max_cpu_throttle_percent as i64),
                convergence: Some(
                    "switched to post-copy: the guest resumes on the target while the rest of its memory follows".into(),
                ),
                ..last_sent.unwrap_or_default()
            }
        } else {
            Progress {
                bytes_total: out.transferred_bytes as i64,
                bytes_transferred: out.transferred_bytes as i64,
                bytes_remaining: 0,
                percent: Some("100%".into()),
                mode: Some(mode),
                eta_seconds: Some(0),
                cpu_throttle_percent: Some(out.max_cpu_throttle_percent as i64),
                ..last_sent.unwrap_or_default()
            }
        };
        // Console clients follow the guest through the VM's status.graphics, which the
        // target's agent reports once it owns the guest.
        let outputs = MigrationStatusPatch {
            downtime_ms: Some(out.downtime_ms as i64),
            total_time_ms: Some(out.total_time_ms as i64),
            progress: Some(progress),
            ..Default::default()
        }
        .with_cookie(MigrationPhase::Perform, Some(out.cookie));
        let stream = self.stream_words(tls.is_some(), &self.claim().1);
        if out.post_copy {
            let message = format!(
                "switched to post-copy after {} MiB ({stream}) in {} ms, vCPU throttle up to {} %: \
                 the guest resumes on the target in Finish while the rest of its memory follows",
                out.transferred_bytes >> 20,
                out.total_time_ms,
                out.max_cpu_throttle_percent
            );
            return Ok(Done::new(Reason::SwitchedToPostCopy, message).with(outputs));
        }
        let message = format!(
            "sent {} MiB ({stream}) in {} ms; guest downtime {} ms; pre-copy, vCPU throttle up to {} %",
            out.transferred_bytes >> 20,
            out.total_time_ms,
            out.downtime_ms,
            out.max_cpu_throttle_percent
        );
        Ok(Done::new(Reason::Transferred, message).with(outputs))
    }

    /// Tunnelled (`transport.mode: Tunnelled`): this guest's tunnel socket, whose
    /// connections this agent carries to the target agent for `uri` (`tunnel:<endpoint>`,
    /// a recovery one after a cut, as the target reports it). `None` for a direct stream.
    pub(super) fn tunnel(&self, uri: &str, key: &str) -> Result<Option<Tunnel>, StepError> {
        if !self.tunnelled() {
            return Ok(None);
        }
        let (_, target) = self.claim();
        let m = self.m;
        let route = Route {
            creds: self.node_credentials()?,
            target,
            path: tunnel_path(
                &m.namespace().unwrap_or_default(),
                &m.name_any(),
                &m.uid().unwrap_or_default(),
            ),
            uri: uri.to_string(),
            reports: self.target_reports(),
            counters: self.agent.metrics.tunnel(),
        };
        Ok(Some(Tunnel::open(&self.agent.sup.vm_dir(key), route)?))
    }

    /// What the target says while the stream may run (where it listens again after a
    /// cut, whether it lost its QEMU): the dispatcher passes on every new status.
    pub(super) fn target_reports(&self) -> tokio::sync::watch::Receiver<TargetReport> {
        self.agent.tasks.listen(
            &self.m.uid().unwrap_or_default(),
            self.phase,
            target_report(&self.status()),
        )
    }

    /// A task that writes each progress it receives into `status.progress`, off the
    /// phase's own path; it ends when the sender is dropped.
    pub(super) fn progress_writer(
        &self,
    ) -> (
        tokio::sync::mpsc::Sender<Progress>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Progress>(1);
        let writer = self.writer();
        let writer = tokio::spawn(async move {
            while let Some(progress) = rx.recv().await {
                let patch = MigrationStatusPatch {
                    progress: Some(progress),
                    ..Default::default()
                };
                // One try: the next sample replaces it anyway.
                let _ = writer.once(&patch, None).await;
            }
        });
        (tx, writer)
    }
}

/// What the target says in `status` to a source running Perform.
pub fn target_report(status: &VirtualMachineMigrationStatus) -> TargetReport {
    TargetReport {
        listens_at: status.recovery_uri.clone(),
        lost: status.target_lost.clone(),
    }
}

/// A data-plane progress sample as `status.progress`.
pub fn progress_of(p: &Sample) -> Progress {
    let percent = (p.transferred_bytes.min(p.total_bytes) * 100)
        .checked_div(p.total_bytes)
        .unwrap_or(0);
    Progress {
        bytes_total: p.total_bytes as i64,
        bytes_transferred: p.transferred_bytes as i64,
        bytes_remaining: p.remaining_bytes as i64,
        dirty_rate_bytes_per_second: p.dirty_rate_bytes_per_sec as i64,
        throughput_bytes_per_second: (p.throughput_mbps * 1_000_000.0 / 8.0) as i64,
        iteration: p.pass as i64,
        expected_downtime_ms: p.expected_downtime_ms as i64,
        percent: Some(format!("{percent}%")),
        mode: Some(match (p.post_copy, p.paused) {
            (_, true) => MigrationMode::PostCopyPaused,
            (true, false) => MigrationMode::PostCopy,
            (false, false) => MigrationMode::PreCopy,
        }),
        converging: p.converging,
        convergence: Some(p.convergence.clone()),
        eta_seconds: p.eta.map(|d| d.as_secs() as i64),
        cpu_throttle_percent: Some(p.cpu_throttle_percent as i64),
    }
}
