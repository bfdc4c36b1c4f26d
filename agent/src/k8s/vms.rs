//! The guests of this node: starts the VirtualMachines that name it, reports their phase
//! and console, stops them when asked, marks a guest that died as Failed (never a silent
//! restart), and removes stray QEMUs that no VM or migration accounts for. What to do
//! about a guest is decided in `decide`, a pure function of the facts gathered here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::domain::Domain;
use ferry_agent::qmp::VncInfo;
use ferry_agent::supervisor::StopMode;
use ferry_crds::{
    Condition, Graphics, MigrationPhase, SOURCE_NODE_LABEL, TARGET_NODE_LABEL, VirtualMachine,
    VirtualMachineMigration, VirtualMachineStatusPatch, VmPhase, set_condition,
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

mod decide;
mod restore;

use decide::{Act, Then};

use super::Agent;
use super::locks::DiskLocks;
use super::phase::disks;

/// Why a VM reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("VirtualMachine {0}: its status changed meanwhile; retrying")]
    Conflict(String),
}

const RESYNC: Duration = Duration::from_secs(5);

/// Reconciles every VirtualMachine (those of other nodes are skipped at once).
pub async fn run(agent: Arc<Agent>) {
    let vms: Api<VirtualMachine> = Api::all(agent.client.clone());
    Controller::new(vms, watcher::Config::default())
        .run(reconcile, error_policy, agent)
        .for_each(|_| async {})
        .await;
}

fn error_policy(vm: Arc<VirtualMachine>, error: &VmError, _: Arc<Agent>) -> Action {
    if let VmError::Conflict(_) = error {
        info!(vm = %vm.name_any(), "the VM's status changed meanwhile; looking again");
        return Action::requeue(CONFLICT_RETRY);
    }
    warn!(vm = %vm.name_any(), %error, "VM reconcile failed; retrying");
    Action::requeue(RESYNC)
}

/// How soon a reconcile whose status write lost a race looks again.
const CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// Whether `vm` runs (or is to start) on `node`.
pub fn belongs_to(vm: &VirtualMachine, node: &str) -> bool {
    match vm.status.as_ref().and_then(|s| s.node_name.as_deref()) {
        Some(owner) => owner == node,
        None => vm.spec.node_name == node,
    }
}

async fn reconcile(vm: Arc<VirtualMachine>, agent: Arc<Agent>) -> Result<Action, VmError> {
    if !belongs_to(&vm, &agent.node) {
        return Ok(Action::await_change());
    }
    let span =
        info_span!("vm", vm = %vm.name_any(), namespace = %vm.namespace().unwrap_or_default());
    Reconcile {
        vm: &vm,
        agent: &agent,
    }
    .run()
    .instrument(span)
    .await
}

struct Reconcile<'a> {
    vm: &'a VirtualMachine,
    agent: &'a Agent,
}

impl Reconcile<'_> {
    fn api(&self) -> Api<VirtualMachine> {
        Api::namespaced(
            self.agent.client.clone(),
            &self.vm.namespace().unwrap_or_default(),
        )
    }

    fn status(&self) -> ferry_crds::VirtualMachineStatus {
        self.vm.status.clone().unwrap_or_default()
    }

    fn locks(&self) -> DiskLocks {
        DiskLocks::new(
            self.agent.client.clone(),
            &self.agent.namespace,
            &self.vm.namespace().unwrap_or_default(),
            &self.vm.name_any(),
        )
    }

    /// Gathers the facts, asks [`decide::decide`], and carries the decision out.
    async fn run(&self) -> Result<Action, VmError> {
        let status = self.status();
        let parsed = Domain::parse(&self.vm.spec.domain_xml);
        let domain = parsed.as_ref().ok();
        let name = domain.map(|d| d.name.as_str()).unwrap_or_default();
        let running = domain.is_some() && self.agent.sup.running_pid(name).is_some();
        let name_taken_by = domain
            .filter(|_| running)
            .and_then(|d| self.agent.sup.definition(&d.name).ok().map(|r| (d, r)))
            .filter(|(d, r)| r.uuid != d.uuid)
            .map(|(_, r)| r.uuid.to_string());
        let graphics = if running && self.vm.spec.running && status.migration.is_none() {
            self.graphics(name).await
        } else {
            None
        };
        let facts = decide::Facts {
            node: &self.agent.node,
            spec_running: self.vm.spec.running,
            status: &status,
            invalid_domain: parsed.as_ref().err().map(|e| e.to_string()),
            domain_name: name,
            name_taken_by,
            running,
            graphics,
        };
        let (act, then) = decide::decide(&facts);
        match act {
            Act::Nothing => {}
            Act::Report(r) => {
                self.write_status(
                    r.phase, r.ready, r.reason, &r.message, r.graphics, r.guarded,
                )
                .await?
            }
            Act::Start => {
                if let Some(domain) = domain {
                    self.start_or_restore(domain).await?
                }
            }
            Act::Stop => {
                info!("stopping the guest");
                if let Err(e) = self
                    .agent
                    .sup
                    .stop(name, StopMode::Powerdown(Duration::from_secs(30)))
                    .await
                {
                    warn!(error = %e, "graceful stop failed; forcing it");
                    let _ = self.agent.sup.destroy(name).await;
                }
                let _ = self.locks().release(&self.agent.node).await;
                self.report(
                    VmPhase::Stopped,
                    false,
                    "Stopped",
                    "stopped as spec.running asks",
                    None,
                )
                .await?;
            }
            Act::Died(message) => {
                warn!(%message);
                let _ = self.locks().release(&self.agent.node).await;
                self.report_guarded(VmPhase::Failed, false, "GuestDied", &message, None)
                    .await?;
            }
        }
        Ok(match then {
            Then::AwaitChange => Action::await_change(),
            Then::Resync => Action::requeue(RESYNC),
        })
    }

    async fn start(&self, domain: &Domain) -> Result<(), VmError> {
        info!(node = %self.agent.node, "starting the guest");
        self.report(VmPhase::Starting, false, "Starting", "starting QEMU", None)
            .await?;
        if let Err(e) = self.locks().acquire(&disks(domain), &self.agent.node).await {
            self.report(VmPhase::Failed, false, "DiskLocked", &e.to_string(), None)
                .await?;
            return Ok(());
        }
        if let Err(e) = self.agent.sup.start(domain, false).await {
            let _ = self.locks().release(&self.agent.node).await;
            self.report(VmPhase::Failed, false, "StartFailed", &e.to_string(), None)
                .await?;
            return Ok(());
        }
        let graphics = self.graphics(&domain.name).await;
        let message = format!("running on {}", self.agent.node);
        self.report(VmPhase::Running, true, "Running", &message, graphics)
            .await
    }

    /// Where the guest's VNC console listens, from QEMU itself.
    async fn graphics(&self, name: &str) -> Option<Graphics> {
        let guest = self.agent.sup.attach(name).await.ok()??;
        let vnc: VncInfo = guest.qmp.execute("query-vnc", None).await.ok()?;
        let port = vnc.service.as_deref()?.parse().ok()?;
        vnc.enabled.then(|| Graphics {
            type_: "vnc".into(),
            listen: vnc.host.unwrap_or_default(),
            port,
        })
    }

    /// Writes phase, Ready condition and graphics. The first write claims
    /// `status.nodeName` for this node, guarded by resourceVersion.
    async fn report(
        &self,
        phase: VmPhase,
        ready: bool,
        reason: &str,
        message: &str,
        graphics: Option<Graphics>,
    ) -> Result<(), VmError> {
        self.write_status(phase, ready, reason, message, graphics, false)
            .await
    }

    /// [`Self::report`], guarded by the version this reconcile decided on: a status
    /// somebody else wrote since (a migration's Confirm that marked the guest lost) is
    /// never overwritten from a stale view; the conflict makes the reconciler look again.
    async fn report_guarded(
        &self,
        phase: VmPhase,
        ready: bool,
        reason: &str,
        message: &str,
        graphics: Option<Graphics>,
    ) -> Result<(), VmError> {
        self.write_status(phase, ready, reason, message, graphics, true)
            .await
    }

    async fn write_status(
        &self,
        phase: VmPhase,
        ready: bool,
        reason: &str,
        message: &str,
        graphics: Option<Graphics>,
        guarded: bool,
    ) -> Result<(), VmError> {
        let status = self.status();
        let mut conditions: Vec<Condition> = status.conditions.clone();
        set_condition(
            &mut conditions,
            "Ready",
            ready,
            reason,
            message,
            self.vm.metadata.generation,
            Time(Timestamp::now()),
        );
        let patch = VirtualMachineStatusPatch {
            phase: Some(phase),
            conditions: Some(conditions),
            graphics: Some(graphics),
            observed_generation: self.vm.metadata.generation,
            // The first write claims the guest for this node.
            node_name: status
                .node_name
                .is_none()
                .then(|| Some(self.agent.node.clone())),
            ..Default::default()
        };
        let guard = (guarded || status.node_name.is_none())
            .then_some(self.vm.metadata.resource_version.as_deref())
            .flatten();
        match self
            .api()
            .patch_status(
                &self.vm.name_any(),
                &PatchParams::default(),
                &patch.to_patch(guard),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(VmError::Conflict(self.vm.name_any())),
            Err(e) => Err(e.into()),
        }
    }
}

/// Every few seconds: a QEMU on this node that no VM owned by this node and no running
/// migration through this node accounts for, seen twice in a row, is removed. This is
/// how a target cleans up after a rollback it missed while it was down.
pub async fn sweep(agent: Arc<Agent>) {
    let mut suspects: HashMap<String, u32> = HashMap::new();
    loop {
        tokio::time::sleep(RESYNC).await;
        match strays(&agent).await {
            Ok(found) => {
                suspects.retain(|name, _| found.contains(name));
                for name in found {
                    let seen = suspects.entry(name.clone()).or_insert(0);
                    *seen += 1;
                    if *seen >= 2 {
                        warn!(vm = %name, node = %agent.node, "removing a QEMU no VM or migration accounts for");
                        if let Err(e) = agent.sup.destroy(&name).await {
                            warn!(vm = %name, error = %e, "could not remove it");
                        }
                        suspects.remove(&name);
                    }
                }
            }
            Err(e) => warn!(error = %e, "sweep skipped"),
        }
    }
}

async fn strays(agent: &Agent) -> Result<Vec<String>, kube::Error> {
    let local: Vec<String> = agent
        .sup
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| agent.sup.running_pid(n).is_some())
        .collect();
    if local.is_empty() {
        return Ok(Vec::new());
    }
    let vms = Api::<VirtualMachine>::all(agent.client.clone())
        .list(&ListParams::default())
        .await?;
    let mut keep: Vec<String> = Vec::new();
    let mut names_by_vm: HashMap<(String, String), String> = HashMap::new();
    for vm in &vms.items {
        let Ok(domain) = Domain::parse(&vm.spec.domain_xml) else {
            continue;
        };
        names_by_vm.insert(
            (vm.namespace().unwrap_or_default(), vm.name_any()),
            domain.name.clone(),
        );
        if belongs_to(vm, &agent.node) {
            keep.push(domain.name);
        }
    }
    let migrations: Api<VirtualMachineMigration> = Api::all(agent.client.clone());
    for label in [SOURCE_NODE_LABEL, TARGET_NODE_LABEL] {
        let list = migrations
            .list(&ListParams::default().labels(&format!("{label}={}", agent.node)))
            .await?;
        for m in list.items {
            let phase = m.status.as_ref().and_then(|s| s.phase);
            let active = phase.is_some_and(|p| p != MigrationPhase::Pending && !p.is_terminal());
            if !active {
                continue;
            }
            if let Some(name) =
                names_by_vm.get(&(m.namespace().unwrap_or_default(), m.spec.vm_name.clone()))
            {
                keep.push(name.clone());
            }
        }
    }
    Ok(local.into_iter().filter(|n| !keep.contains(n)).collect())
}
