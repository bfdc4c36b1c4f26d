//! Runs one phase of one migration on this node: records the step's start, calls the
//! phase function of the data plane with the cookies from the status, and writes the
//! outcome, cookie and outputs back in one status patch (docs/protocol.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_agent::domain::{Device, Domain};
use ferry_agent::error::BoxError;
use ferry_agent::fault;
use ferry_agent::phases::perform::Progress;
use ferry_agent::phases::{begin, finish, perform, prepare};
use ferry_agent::policy;
use ferry_crds::{
    MigrationPhase, StepOutcome, VirtualMachine, VirtualMachineMigration, VmPhase, set_condition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

mod confirm;
mod to_file;

use super::Agent;
use super::locks::DiskLocks;
use super::ownership::Claim;

/// Runs `phase` of `m` and records it. Never panics on I/O: a failed status write is
/// retried, and if it never lands the watcher dispatches the phase again (phases are
/// idempotent).
pub async fn run(
    agent: Arc<Agent>,
    m: VirtualMachineMigration,
    phase: MigrationPhase,
    cancel: CancellationToken,
) {
    let span =
        info_span!("phase", migration = %m.name_any(), vm = %m.spec.vm_name, phase = phase.key());
    async move {
        let run = Run::new(&agent, &m, phase);
        let start = run.record_start().await;
        info!("running");
        let result = run.execute(&cancel).await;
        fault::pause(&format!("during-{}", phase.key())).await;
        let (outcome, message, outputs) = match result {
            Ok((message, outputs)) => (StepOutcome::Succeeded, message, outputs),
            Err(message) => {
                warn!(%message, "failed");
                (StepOutcome::Failed, message, json!({}))
            }
        };
        agent.metrics.phase_done(phase, outcome);
        run.record_end(start, outcome, &message, outputs).await;
        info!(?outcome, "done");
    }
    .instrument(span)
    .await
}

/// Runs `phase` of `m` without recording anything: its outcome, message and the status
/// fields it gives. A peer-to-peer migration's driver and the target's peer API record
/// it themselves.
pub async fn execute(
    agent: &Agent,
    m: &VirtualMachineMigration,
    phase: MigrationPhase,
    cancel: &CancellationToken,
) -> (StepOutcome, String, Value) {
    match Run::new(agent, m, phase).execute(cancel).await {
        Ok((message, outputs)) => (StepOutcome::Succeeded, message, outputs),
        Err(message) => {
            warn!(%message, "failed");
            (StepOutcome::Failed, message, json!({}))
        }
    }
}

struct Run<'a> {
    agent: &'a Agent,
    m: &'a VirtualMachineMigration,
    phase: MigrationPhase,
    api: Api<VirtualMachineMigration>,
    vms: Api<VirtualMachine>,
    /// The data plane's name for this migration: unique even if a migration of the
    /// same name is created again.
    id: String,
}

type Outcome = Result<(String, Value), String>;

impl<'a> Run<'a> {
    fn new(agent: &'a Agent, m: &'a VirtualMachineMigration, phase: MigrationPhase) -> Self {
        let ns = m.namespace().unwrap_or_default();
        Run {
            agent,
            m,
            phase,
            api: Api::namespaced(agent.client.clone(), &ns),
            vms: Api::namespaced(agent.client.clone(), &ns),
            id: format!("{ns}/{}@{}", m.name_any(), m.uid().unwrap_or_default()),
        }
    }

    fn status(&self) -> ferry_crds::VirtualMachineMigrationStatus {
        self.m.status.clone().unwrap_or_default()
    }

    /// The policy the operator fixed at admission (`spec.policy` for a migration admitted
    /// before there was one).
    fn policy(&self) -> ferry_crds::MigrationPolicy {
        self.status()
            .policy
            .unwrap_or_else(|| self.m.spec.policy.clone())
    }

    fn cookie(&self, phase: MigrationPhase) -> Option<String> {
        let c = self.status().cookies.unwrap_or_default();
        match phase {
            MigrationPhase::Begin => c.begin,
            MigrationPhase::Prepare => c.prepare,
            MigrationPhase::Perform => c.perform,
            MigrationPhase::Finish => c.finish,
            _ => None,
        }
    }

    async fn record_start(&self) -> MicroTime {
        let existing = self
            .status()
            .steps
            .and_then(|s| s.get(self.phase).cloned())
            .filter(|s| s.node == self.agent.node);
        if let Some(step) = existing {
            return step.start;
        }
        let start = MicroTime(Timestamp::now());
        // Only Perform lasts long enough for a "running" record to tell anyone
        // something; the other phases record start and end in one write, which keeps
        // a status round trip off the migration's critical path.
        if self.phase == MigrationPhase::Perform {
            let step = json!({"node": self.agent.node, "start": start});
            self.patch(json!({"steps": {self.phase.key(): step}})).await;
        }
        start
    }

    async fn record_end(
        &self,
        start: MicroTime,
        outcome: StepOutcome,
        message: &str,
        outputs: Value,
    ) {
        let step = json!({
            "node": self.agent.node,
            "start": start,
            "end": MicroTime(Timestamp::now()),
            "outcome": outcome,
            "message": message,
        });
        let mut status = json!({"steps": {self.phase.key(): step}});
        merge(&mut status, outputs);
        self.patch(status).await;
    }

    /// A merge patch of the status, retried for a while: the step result must land.
    async fn patch(&self, status: Value) {
        let body = Patch::Merge(json!({ "status": status }));
        for attempt in 1..=20 {
            match self
                .api
                .patch_status(&self.m.name_any(), &PatchParams::default(), &body)
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => {
                    warn!(attempt, error = %e, "status write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                }
            }
        }
    }

    /// The VM object and its domain.
    async fn vm(&self) -> Result<(VirtualMachine, Domain), String> {
        let vm = self
            .vms
            .get_opt(&self.m.spec.vm_name)
            .await
            .map_err(|e| format!("reading VirtualMachine {}: {e}", self.m.spec.vm_name))?
            .ok_or_else(|| format!("VirtualMachine {} does not exist", self.m.spec.vm_name))?;
        let domain = Domain::parse(&vm.spec.domain_xml)
            .map_err(|e| format!("VirtualMachine {}: {e}", self.m.spec.vm_name))?;
        Ok((vm, domain))
    }

    fn claim(&self) -> (String, String) {
        let s = self.status();
        (
            s.source_node.unwrap_or_default(),
            s.target_node.unwrap_or_default(),
        )
    }

    async fn execute(&self, cancel: &CancellationToken) -> Outcome {
        let sup = &self.agent.sup;
        let id = self.id.as_str();
        let status = self.status();
        match self.phase {
            MigrationPhase::Begin => {
                let (_, domain) = self.vm().await?;
                let out = begin::begin(
                    sup,
                    begin::BeginInput {
                        vm: &domain.name,
                        migration: id,
                        target_xml: self.m.spec.target_domain_xml.as_deref(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                Ok((
                    "the guest can migrate; migration lock taken".into(),
                    json!({"cookies": {"begin": out.cookie}, "targetDomainXML": out.domain_xml}),
                ))
            }
            MigrationPhase::Prepare => {
                let xml = status
                    .target_domain_xml
                    .ok_or("Begin left no domain XML for the target")?;
                let cookie = self
                    .cookie(MigrationPhase::Begin)
                    .ok_or("Begin left no cookie")?;
                // Held until Prepare returns: by then the incoming QEMU listens on it.
                let port = self
                    .agent
                    .reserve_port()
                    .ok_or("no free migration port in the configured range")?;
                let policy = policy::resolve(&self.policy()).map_err(|e| e.to_string())?;
                let tls = self.tls()?;
                let out = prepare::prepare(
                    sup,
                    prepare::PrepareInput {
                        migration: id,
                        domain_xml: &xml,
                        begin_cookie: &cookie,
                        port: Some(port.port),
                        policy: &policy,
                        tls: tls.as_ref(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                let uri = fault::advertised_uri(&out.uri);
                let (source, _) = self.claim();
                Ok((
                    format!(
                        "target QEMU waiting on {uri} ({})",
                        tls_words(tls.is_some(), &source)
                    ),
                    json!({"cookies": {"prepare": out.cookie}, "migrationURI": uri}),
                ))
            }
            MigrationPhase::Perform if self.m.spec.to_file.is_some() => self.save(cancel).await,
            MigrationPhase::Confirm if self.m.spec.to_file.is_some() && !status.cancelled => {
                self.confirm_save().await
            }
            MigrationPhase::Perform => self.perform(cancel).await,
            MigrationPhase::Finish => {
                let (_, domain) = self.vm().await?;
                let (source, target) = self.claim();
                let disks = disks(&domain);
                let ns = self.m.namespace().unwrap_or_default();
                let name = self.m.name_any();
                let take = async {
                    Claim {
                        vms: &self.vms,
                        vm: &self.m.spec.vm_name,
                        migration: &name,
                        source: &source,
                        target: &target,
                    }
                    .take()
                    .await?;
                    DiskLocks::new(
                        self.agent.client.clone(),
                        &self.agent.namespace,
                        &ns,
                        &self.m.spec.vm_name,
                    )
                    .hand_over(&disks, &source, &target)
                    .await?;
                    Ok::<(), BoxError>(())
                };
                let perform_cookie = self.cookie(MigrationPhase::Perform);
                let out = finish::finish(
                    sup,
                    finish::FinishInput {
                        vm: &domain.name,
                        migration: id,
                        perform_cookie: perform_cookie.as_deref(),
                        cancelled: status.cancelled,
                    },
                    take,
                )
                .await
                .map_err(|e| e.to_string())?;
                let message = if out.resumed {
                    format!("the guest runs on {target}")
                } else {
                    "the incoming QEMU was removed".to_string()
                };
                Ok((message, json!({"cookies": {"finish": out.cookie}})))
            }
            MigrationPhase::Confirm => self.confirm().await,
            other => Err(format!("{other:?} is not a phase an agent runs")),
        }
    }

    /// A task that writes each progress it receives into `status.progress`, off the
    /// phase's own path; it ends when the sender is dropped.
    fn progress_writer(
        &self,
    ) -> (
        tokio::sync::mpsc::Sender<Value>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(1);
        let api = self.api.clone();
        let name = self.m.name_any();
        let writer = tokio::spawn(async move {
            while let Some(progress) = rx.recv().await {
                let patch = Patch::Merge(json!({"status": {"progress": progress}}));
                if let Err(e) = api
                    .patch_status(&name, &PatchParams::default(), &patch)
                    .await
                {
                    warn!(error = %e, "could not write progress");
                }
            }
        });
        (tx, writer)
    }

    async fn perform(&self, cancel: &CancellationToken) -> Outcome {
        if self.status().cancelled {
            return Err("migration cancelled before the transfer started".into());
        }
        let (_, domain) = self.vm().await?;
        let uri = self
            .status()
            .migration_uri
            .ok_or("Prepare left no migration URI")?;
        let cookie = self
            .cookie(MigrationPhase::Prepare)
            .ok_or("Prepare left no cookie")?;
        let params = policy::resolve(&self.policy()).map_err(|e| e.to_string())?;
        let tls = self.tls()?;
        // Progress goes to the status at most once a second, from its own task.
        let (tx, writer) = self.progress_writer();
        let mut last = Instant::now() - Duration::from_secs(1);
        let on_progress = |p: &Progress| {
            if p.transferred_bytes > 0 {
                fault::pause_blocking("perform-early");
            }
            // Most of the guest's RAM is sent: under a quarter of it remains.
            if p.transferred_bytes > 0 && p.remaining_bytes.saturating_mul(4) <= p.total_bytes {
                fault::pause_blocking("perform-late");
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let _ = tx.try_send(progress_json(p));
            }
        };
        // Where the target listens again if a cut pauses the post-copy (the executor
        // passes on every new status.recoveryURI).
        let uid = self.m.uid().unwrap_or_default();
        let (recovery_tx, recovery) =
            tokio::sync::watch::channel(super::executor::target_report(&self.status()));
        self.agent
            .recovery_uris
            .lock()
            .expect("the recovery table is never poisoned")
            .insert(uid.clone(), recovery_tx);
        let result = perform::perform_with_recovery(
            &self.agent.sup,
            perform::PerformInput {
                vm: &domain.name,
                migration: &self.id,
                uri: &uri,
                prepare_cookie: &cookie,
                policy: &params,
                tls: tls.as_ref(),
                cancel,
            },
            recovery,
            on_progress,
        )
        .await;
        self.agent
            .recovery_uris
            .lock()
            .expect("the recovery table is never poisoned")
            .remove(&uid);
        drop(tx);
        let _ = writer.await;
        let out = result.map_err(|e| e.to_string())?;
        let mode = if out.post_copy { "PostCopy" } else { "PreCopy" };
        // Console clients follow the guest through the VM's status.graphics, which the
        // target's agent reports once it owns the guest.
        let outputs = json!({
            "cookies": {"perform": out.cookie},
            "downtimeMs": out.downtime_ms,
            "totalTimeMs": out.total_time_ms,
            "progress": {
                "bytesTotal": out.transferred_bytes,
                "bytesTransferred": out.transferred_bytes,
                "bytesRemaining": 0,
                "percent": "100%",
                "mode": mode,
                "etaSeconds": 0,
                "cpuThrottlePercent": out.max_cpu_throttle_percent,
            },
        });
        Ok((
            format!(
                "sent {} MiB ({}) in {} ms; guest downtime {} ms; {}, vCPU throttle up to {} %",
                out.transferred_bytes >> 20,
                tls_words(tls.is_some(), &self.claim().1),
                out.total_time_ms,
                out.downtime_ms,
                if out.post_copy {
                    "switched to post-copy"
                } else {
                    "pre-copy"
                },
                out.max_cpu_throttle_percent
            ),
            outputs,
        ))
    }

    /// This node's credentials when the migration's stream is TLS (`spec.transport.tls`);
    /// an error, not plain TCP, when the node has no certificate yet.
    fn tls(&self) -> Result<Option<ferry_agent::tls::Credentials>, String> {
        if !self.m.spec.transport.tls {
            return Ok(None);
        }
        self.agent.certs.current().map(Some).ok_or_else(|| {
            format!(
                "spec.transport.tls is on but node {} has no migration certificate yet ({}); \
                 set transport.tls: false to migrate in plain TCP",
                self.agent.node,
                self.agent.certs.why_none()
            )
        })
    }
}

impl Run<'_> {
    /// Writes into `vm`'s status that its guest no longer runs on this node: `phase`
    /// (Stopped after a save, Failed when lost), Ready False for `reason` with
    /// `message`, no graphics, and the `extra` status fields; then releases the VM's
    /// disk locks held here. A plain merge patch: what this says wins over what the VM
    /// reconciler last wrote, and its own writes of this kind are guarded (vms.rs).
    async fn mark_vm_gone(
        &self,
        vm: &VirtualMachine,
        phase: VmPhase,
        reason: &str,
        message: &str,
        extra: Value,
    ) -> Result<(), String> {
        let mut conditions = vm
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let now = Time(Timestamp::now());
        let generation = vm.metadata.generation;
        set_condition(
            &mut conditions,
            "Ready",
            false,
            reason,
            message,
            generation,
            now,
        );
        let mut status = json!({"phase": phase, "graphics": null, "conditions": conditions});
        merge(&mut status, extra);
        let name = &self.m.spec.vm_name;
        self.vms
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map_err(|e| format!("writing the status of VirtualMachine {name}: {e}"))?;
        let ns = self.m.namespace().unwrap_or_default();
        let _ = DiskLocks::new(self.agent.client.clone(), &self.agent.namespace, &ns, name)
            .release(&self.agent.node)
            .await;
        Ok(())
    }
}

/// The target devs of a domain's disks: what the disk locks are named by.
pub fn disks(domain: &Domain) -> Vec<String> {
    domain
        .devices
        .iter()
        .filter_map(|d| match d {
            Device::Disk(disk) => Some(disk.target_dev.clone()),
            _ => None,
        })
        .collect()
}

fn progress_json(p: &Progress) -> Value {
    let percent = (p.transferred_bytes.min(p.total_bytes) * 100)
        .checked_div(p.total_bytes)
        .unwrap_or(0);
    json!({
        "bytesTotal": p.total_bytes,
        "bytesTransferred": p.transferred_bytes,
        "bytesRemaining": p.remaining_bytes,
        "dirtyRateBytesPerSecond": p.dirty_rate_bytes_per_sec,
        "throughputBytesPerSecond": (p.throughput_mbps * 1_000_000.0 / 8.0) as u64,
        "iteration": p.pass,
        "expectedDowntimeMs": p.expected_downtime_ms,
        "percent": format!("{percent}%"),
        "mode": match (p.post_copy, p.paused) {
            (_, true) => "PostCopyPaused",
            (true, false) => "PostCopy",
            (false, false) => "PreCopy",
        },
        "converging": p.converging,
        "convergence": p.convergence,
        "etaSeconds": p.eta.map(|d| d.as_secs()),
        "cpuThrottlePercent": p.cpu_throttle_percent,
    })
}

/// Merges JSON object `b` into `a`, recursively.
pub fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// How a step message says whether the stream is encrypted, and who the peer must be.
fn tls_words(tls: bool, peer: &str) -> String {
    if tls {
        format!("TLS, peer certificate {peer} verified")
    } else {
        "plain TCP, transport.tls false".to_string()
    }
}
