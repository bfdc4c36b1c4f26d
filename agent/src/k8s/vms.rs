//! The guests of this node: starts the VirtualMachines that name it, reports their phase
//! and console, stops them when asked, marks a guest that died as Failed (never a silent
//! restart), finishes deleted VMs (`delete`), and removes stray QEMUs that no VM or
//! migration accounts for (`sweep`). What to do about a guest is decided in `decide`, a
//! pure function of the facts gathered here.
//!
//! A running guest is found by the definition it started with (`status.domainXML`, the
//! copy in its state dir), never by the spec alone: a spec edited meanwhile only says
//! what the next start will be (`spec`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_agent::domain::Domain;
use ferry_agent::node::guest_key;
use ferry_agent::qmp::VncInfo;
use ferry_agent::storage::Owner;
use ferry_agent::supervisor::{StopMode, SupervisorError};
use ferry_crds::conditions::vm::READY;
use ferry_crds::{GUEST_FINALIZER, Graphics, VirtualMachine, VirtualMachineStatusPatch, VmPhase};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PatchParams;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

mod decide;
mod delete;
mod restore;
mod spec;
mod sweep;

pub use sweep::sweep;

use decide::{Act, Report, Then};
use spec::SpecNote;

use super::Agent;
use super::locks::{DiskLocks, LockError};
use super::phase::disks;

/// Why a VM reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("VirtualMachine {0}: it changed meanwhile; retrying")]
    Conflict(String),
    #[error("VirtualMachine {vm}: {source}")]
    Supervisor {
        vm: String,
        #[source]
        source: SupervisorError,
    },
    #[error(transparent)]
    Locks(#[from] LockError),
}

const RESYNC: Duration = Duration::from_secs(5);
/// The condition reason of a start refused for a host path of its definition
/// (`ferry_agent::storage`): the message names the field, the path and the rule.
pub const HOST_PATH_REFUSED: &str = "HostPathRefused";
/// How long QEMU is given to quit once the guest's grace period is over.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconciles every VirtualMachine (those of other nodes are skipped at once).
pub async fn run(agent: Arc<Agent>) {
    let vms: Api<VirtualMachine> = Api::all(agent.watches.clone());
    Controller::new(vms, watcher::Config::default())
        .run(reconcile, error_policy, agent)
        .for_each(|_| async {})
        .await;
}

fn error_policy(vm: Arc<VirtualMachine>, error: &VmError, _: Arc<Agent>) -> Action {
    let (name, namespace) = (vm.name_any(), vm.namespace().unwrap_or_default());
    if let VmError::Conflict(_) = error {
        info!(vm = %name, %namespace, "the VM changed meanwhile; looking again");
        return Action::requeue(CONFLICT_RETRY);
    }
    warn!(vm = %name, %namespace, %error, "VM reconcile failed; retrying");
    Action::requeue(RESYNC)
}

/// How soon a reconcile whose write lost a race looks again.
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
        claimed: AtomicBool::new(false),
    }
    .run()
    .instrument(span)
    .await
}

struct Reconcile<'a> {
    vm: &'a VirtualMachine,
    agent: &'a Agent,
    /// Whether this reconcile claimed `status.nodeName` (its first write at a first
    /// start): the writes after it go over the claim, not over the version it read.
    claimed: AtomicBool,
}

/// This VM's guest on this node: its state dir and the definition it runs with.
struct Located {
    key: String,
    definition: Domain,
}

/// The definitions a VM names: the running one (`status.domainXML`) and the spec's.
struct Definitions {
    recorded: Option<Domain>,
    spec: Result<Domain, ferry_agent::domain::DomainError>,
}

impl Reconcile<'_> {
    fn api(&self) -> Api<VirtualMachine> {
        Api::namespaced(
            self.agent.client.clone(),
            &self.vm.namespace().unwrap_or_default(),
        )
    }

    /// The VM as the owner of the host paths its definition names.
    fn owner(&self) -> Owner<'_> {
        Owner {
            namespace: self.vm.metadata.namespace.as_deref().unwrap_or_default(),
            definition: "spec.domainXML",
        }
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

    /// The key of this VM's guest that runs `domain` ([`guest_key`]): its state dir.
    fn key(&self, domain: &Domain) -> String {
        guest_key(
            self.vm.metadata.namespace.as_deref().unwrap_or_default(),
            &self.vm.name_any(),
            domain.uuid,
        )
    }

    fn definitions(&self) -> Definitions {
        Definitions {
            recorded: self
                .vm
                .status
                .as_ref()
                .and_then(|s| s.domain_xml.as_deref())
                .and_then(|xml| Domain::parse(xml).ok()),
            spec: Domain::parse(&self.vm.spec.domain_xml),
        }
    }

    /// Finds the VM's running guest: under the key of the definition it started with,
    /// else (a guest started before that was recorded) of the spec's. The key names
    /// this VM (namespace and name) and the definition's uuid, so no other VM's guest
    /// is ever found here, whatever its domain is called.
    fn locate(&self, defs: &Definitions) -> Option<Located> {
        let sup = &self.agent.sup;
        for d in defs.recorded.iter().chain(defs.spec.as_ref().ok()) {
            let key = self.key(d);
            if sup.running_pid(&key).is_none() {
                continue;
            }
            // Unreadable: it runs under this VM's key; count it as running `d`.
            let definition = sup.definition(&key).unwrap_or_else(|_| d.clone());
            return Some(Located { key, definition });
        }
        None
    }

    /// Gathers the facts, asks [`decide::decide`], and carries the decision out.
    async fn run(&self) -> Result<Action, VmError> {
        let status = self.status();
        let defs = self.definitions();
        let guest = self.locate(&defs);
        let spec = defs.spec.as_ref();
        let held = status.migration.is_some();
        let record_domain = guest
            .as_ref()
            .filter(|_| !held)
            .filter(|g| defs.recorded.as_ref() != Some(&g.definition))
            .map(|g| g.definition.to_xml());
        let deleting = self.vm.metadata.deletion_timestamp.is_some();
        let graphics = match &guest {
            Some(g) if self.vm.spec.running && !held && !deleting => self.graphics(&g.key).await,
            _ => None,
        };
        let facts = decide::Facts {
            node: &self.agent.node,
            spec_running: self.vm.spec.running,
            status: &status,
            spec: spec::check(guest.as_ref().map(|g| &g.definition), spec),
            running: guest.is_some(),
            record_domain,
            graphics,
            has_finalizer: self.vm.finalizers().iter().any(|f| f == GUEST_FINALIZER),
            deleting,
            grace: self.vm.spec.termination_grace_period(),
            now: Timestamp::now(),
        };
        let (act, then) = decide::decide(&facts);
        let key = guest.as_ref().map(|g| g.key.as_str());
        match act {
            Act::Nothing => {}
            Act::Report(r) => self.write_status(&r).await?,
            Act::AddFinalizer => self.add_finalizer().await?,
            Act::Start => {
                if let Ok(domain) = spec {
                    self.start_or_restore(domain).await?
                }
            }
            Act::PowerOff(why) => {
                if let Some(key) = key {
                    self.power_off(key, why, facts.grace).await?
                }
            }
            Act::Stop => self.stop(key).await?,
            Act::Died(message) => {
                warn!(%message);
                if let Err(e) = self.locks().release(&self.agent.node).await {
                    warn!(error = %e, "could not release the dead guest's disk locks");
                }
                self.write_status(&Report {
                    guarded: true,
                    ..report(VmPhase::Failed, false, "GuestDied", &message, None)
                })
                .await?;
            }
            Act::AwaitRelease(migration) => {
                info!(%migration, "the VM is being deleted; waiting for its migration to end (the operator cancels it)");
            }
            Act::Finalize => self.finalize(guest.as_ref(), &defs).await?,
        }
        Ok(match then {
            Then::AwaitChange => Action::await_change(),
            Then::Resync => Action::requeue(RESYNC),
            Then::After(after) => Action::requeue(after),
        })
    }

    async fn start(&self, domain: &Domain) -> Result<(), VmError> {
        info!(node = %self.agent.node, "starting the guest");
        // Guarded: a reconcile that read an older status (Starting, from the write of an
        // attempt that has failed since) must not start it again over that failure.
        self.write_status(&Report {
            guarded: true,
            ..report(VmPhase::Starting, false, "Starting", "starting QEMU", None)
        })
        .await?;
        if let Err(e) = self.locks().acquire(&disks(domain), &self.agent.node).await {
            self.report(VmPhase::Failed, false, "DiskLocked", &e.to_string(), None)
                .await?;
            return Ok(());
        }
        let key = self.key(domain);
        if let Err(e) = self
            .agent
            .sup
            .start(&key, domain, self.owner(), false)
            .await
        {
            let _ = self.locks().release(&self.agent.node).await;
            // A refused host path: the storage message alone (`<field>: <path>: <rule>`);
            // the status is the VM's own, and the guest's key would only add noise.
            let (reason, message) = match &e {
                SupervisorError::Storage { source, .. } => (HOST_PATH_REFUSED, source.to_string()),
                _ => ("StartFailed", e.to_string()),
            };
            warn!(error = %e, reason, "the guest did not start");
            self.report(VmPhase::Failed, false, reason, &message, None)
                .await?;
            return Ok(());
        }
        let graphics = self.graphics(&key).await;
        let message = format!("running on {}", self.agent.node);
        self.report_started("Running", &message, graphics).await
    }

    /// Stops the guest now if it runs (QMP `quit`, SIGKILL if it does not go), releases
    /// its disk locks and reports it Stopped.
    async fn stop(&self, key: Option<&str>) -> Result<(), VmError> {
        if let Some(key) = key {
            info!(guest = key, "stopping the guest's QEMU");
            self.agent
                .sup
                .stop(key, StopMode::Quit(QUIT_TIMEOUT))
                .await
                .map_err(|source| VmError::Supervisor {
                    vm: self.vm.name_any(),
                    source,
                })?;
        }
        self.locks().release(&self.agent.node).await?;
        self.write_status(&Report {
            note: Some(SpecNote::None),
            domain_xml: Some(None),
            ..report(
                VmPhase::Stopped,
                false,
                "Stopped",
                "stopped as spec.running asks",
                None,
            )
        })
        .await
    }

    /// Where the guest's VNC console listens (its UNIX socket), from QEMU itself.
    async fn graphics(&self, name: &str) -> Option<Graphics> {
        let guest = self.agent.sup.attach(name).await.ok()??;
        let vnc: VncInfo = guest.qmp.execute("query-vnc", None).await.ok()?;
        (vnc.enabled && vnc.family.as_deref() == Some("unix")).then(|| Graphics {
            type_: "vnc".into(),
            socket: vnc.service.unwrap_or_default(),
        })
    }

    /// Writes phase, Ready condition and graphics. The first write claims
    /// `status.nodeName` for this node, guarded by resourceVersion.
    async fn report(
        &self,
        phase: VmPhase,
        ready: bool,
        reason: &'static str,
        message: &str,
        graphics: Option<Graphics>,
    ) -> Result<(), VmError> {
        self.write_status(&report(phase, ready, reason, message, graphics))
            .await
    }

    /// The guest started from the spec: it runs, with the spec as its running
    /// definition, and what was said about an earlier spec is cleared.
    async fn report_started(
        &self,
        reason: &'static str,
        message: &str,
        graphics: Option<Graphics>,
    ) -> Result<(), VmError> {
        self.write_status(&Report {
            note: Some(SpecNote::None),
            domain_xml: Some(Some(self.vm.spec.domain_xml.clone())),
            ..report(VmPhase::Running, true, reason, message, graphics)
        })
        .await
    }

    /// Writes `r`. A guarded report only applies over the version this reconcile
    /// decided on: a status somebody else wrote since (a migration's Confirm that marked
    /// the guest lost) is never overwritten from a stale view; the conflict makes the
    /// reconciler look again.
    async fn write_status(&self, r: &Report) -> Result<(), VmError> {
        let status = self.status();
        let claim = status.node_name.is_none() && !self.claimed.load(Ordering::Relaxed);
        let mut conditions = status.conditions.clone();
        let now = Time(Timestamp::now());
        let generation = self.vm.metadata.generation;
        set_ready(
            &mut conditions,
            r.ready,
            r.reason,
            &r.message,
            generation,
            &now,
        );
        if let Some(note) = &r.note {
            note.apply(&mut conditions, generation, now);
        }
        let patch = VirtualMachineStatusPatch {
            phase: Some(r.phase),
            conditions: Some(conditions),
            graphics: Some(r.graphics.clone()),
            domain_xml: r.domain_xml.clone(),
            observed_generation: generation,
            // The first write claims the guest for this node.
            node_name: claim.then(|| Some(self.agent.node.clone())),
            ..Default::default()
        };
        let guard = (r.guarded || claim)
            .then_some(self.vm.metadata.resource_version.as_deref())
            .flatten();
        self.patch_status(&patch, guard).await?;
        if claim {
            self.claimed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends a status patch, over `guard` (a resourceVersion) when given.
    async fn patch_status(
        &self,
        patch: &VirtualMachineStatusPatch,
        guard: Option<&str>,
    ) -> Result<(), VmError> {
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

/// A report of `phase` and Ready, nothing else.
fn report(
    phase: VmPhase,
    ready: bool,
    reason: &'static str,
    message: &str,
    graphics: Option<Graphics>,
) -> Report {
    Report {
        phase,
        ready,
        reason,
        message: message.to_string(),
        graphics,
        guarded: false,
        note: None,
        domain_xml: None,
    }
}

fn set_ready(
    conditions: &mut Vec<ferry_crds::Condition>,
    ready: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    ferry_crds::set_condition(
        conditions,
        READY,
        ready,
        reason,
        message,
        generation,
        now.clone(),
    );
}
