//! The reconciler: gathers the facts about one migration, asks `admission` or
//! `transitions` what to do, and writes the result. All Kubernetes I/O of the operator's
//! state machine is here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_crds::conditions::{ADMITTED, ROLLING_BACK};
use ferry_crds::{
    ControlMode, MigrationPhase, MigrationStatusPatch, ROLLBACK_FINALIZER, Reason,
    SOURCE_NODE_LABEL, TARGET_NODE_LABEL, VirtualMachine, VirtualMachineMigration, set_condition,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

use crate::admission::{self, Admission, Facts};
use crate::config::{Limits, Timeouts};
use crate::error::{Error, Result};
use crate::metrics::{ErrorLabels, Metrics};
use crate::nodes;
use crate::transitions::{self, Decision, Observation, Why};

mod deleted_vm;
mod end;
mod hand_over;
mod patches;
mod peer;
mod report;

use patches::MetadataPatch;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// Ferry's own namespace, where the agents' heartbeat Leases are.
    pub namespace: String,
    pub limits: Limits,
    /// The cluster-wide policy defaults (the chart's `migrations.defaultPolicy`).
    pub default_policy: ferry_crds::MigrationPolicy,
    pub timeouts: Timeouts,
    pub metrics: Arc<Metrics>,
    pub events: crate::events::Events,
    /// The agents' heartbeat Leases, cached from a watch.
    pub leases: Store<Lease>,
    /// The VirtualMachines, cached from a watch (admission still reads the VM fresh).
    pub vms: Store<VirtualMachine>,
    /// The Nodes, cached from a watch: admission sends no guest to a closed one.
    pub nodes: Store<Node>,
    /// Admission is serialised so two reconciles never both take the last free slot.
    pub admission: tokio::sync::Mutex<()>,
    /// Finished migrations kept per VM; older ones are deleted (`history`).
    pub history_limit: usize,
    /// Guest reservations (placeholder Pods the scheduler sees), when on.
    pub reservations: Option<crate::reservations::Settings>,
}

/// Reconciles one migration.
pub async fn reconcile(m: Arc<VirtualMachineMigration>, ctx: Arc<Context>) -> Result<Action> {
    let ns = m
        .namespace()
        .ok_or_else(|| Error::NoNamespace(m.name_any()))?;
    let span =
        info_span!("reconcile", migration = %m.name_any(), namespace = %ns, vm = %m.spec.vm_name);
    async move {
        Reconciler {
            m: &m,
            ctx: &ctx,
            ns: &ns,
        }
        .run()
        .await
    }
    .instrument(span)
    .await
}

/// Counts the failure and retries soon.
pub fn error_policy(m: Arc<VirtualMachineMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(migration = %m.name_any(), vm = %m.spec.vm_name, %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    Action::requeue(Duration::from_secs(1))
}

struct Reconciler<'a> {
    m: &'a VirtualMachineMigration,
    ctx: &'a Context,
    ns: &'a str,
}

impl Reconciler<'_> {
    fn api(&self) -> Api<VirtualMachineMigration> {
        Api::namespaced(self.ctx.client.clone(), self.ns)
    }

    fn vms(&self) -> Api<VirtualMachine> {
        Api::namespaced(self.ctx.client.clone(), self.ns)
    }

    fn name(&self) -> String {
        self.m.name_any()
    }

    fn phase(&self) -> Option<MigrationPhase> {
        self.m.status.as_ref().and_then(|s| s.phase)
    }

    fn cancel_asked(&self) -> bool {
        self.m.spec.cancel || self.m.metadata.deletion_timestamp.is_some()
    }

    async fn run(&self) -> Result<Action> {
        let deleting = self.m.metadata.deletion_timestamp.is_some();
        let phase = self.phase();
        if phase.is_some_and(MigrationPhase::is_terminal) {
            self.release_vm().await?;
            if deleting {
                self.remove_finalizer().await?;
            } else {
                self.prune_history().await?;
            }
            return Ok(Action::await_change());
        }
        // A Pending migration has nothing to roll back: admission adds the finalizer
        // together with the node labels, in one write.
        let pending = matches!(phase, None | Some(MigrationPhase::Pending));
        if !deleting && !pending && !self.has_finalizer() {
            self.add_finalizer().await?;
        }
        match phase {
            None | Some(MigrationPhase::Pending) if self.cancel_asked() => {
                self.end(
                    MigrationPhase::Cancelled,
                    &Why {
                        reason: Reason::Cancelled,
                        message: "cancelled before it started".into(),
                    },
                )
                .await?;
                Ok(Action::requeue(Duration::from_millis(100)))
            }
            None | Some(MigrationPhase::Pending) => self.pending().await,
            Some(_) => self.running().await,
        }
    }

    async fn pending(&self) -> Result<Action> {
        let _slot = self.ctx.admission.lock().await;
        // The controller's cache may lag behind an admission this operator just
        // wrote: admitting again would set Begin over the phases that followed.
        if let Some(latest) = self.api().get_opt(&self.name()).await?
            && !is_pending(&latest)
        {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        let vm = self.vms().get_opt(&self.m.spec.vm_name).await?;
        let live = nodes::live_nodes(&self.ctx.leases, Timestamp::now());
        let closed = crate::evacuate::closed_nodes(self.ctx.nodes.state().iter().map(|n| &**n));
        let all = Api::<VirtualMachineMigration>::all(self.ctx.client.clone())
            .list(&ListParams::default())
            .await?;
        let me = self.m.uid();
        let active: Vec<&VirtualMachineMigration> = all
            .items
            .iter()
            .filter(|o| o.uid() != me)
            .filter(|o| {
                o.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p != MigrationPhase::Pending && !p.is_terminal())
            })
            .collect();
        let mut vms_per_node = BTreeMap::new();
        if self.m.spec.target_node.is_none() {
            for v in Api::<VirtualMachine>::all(self.ctx.client.clone())
                .list(&ListParams::default())
                .await?
            {
                if let Some(node) = v.status.and_then(|s| s.node_name) {
                    *vms_per_node.entry(node).or_insert(0) += 1;
                }
            }
        }
        let decision = admission::admit(
            self.m,
            &Facts {
                vm: vm.as_ref(),
                live_nodes: &live,
                closed_nodes: &closed,
                vms_per_node: &vms_per_node,
                active: &active,
                limits: self.ctx.limits,
            },
        );
        match decision {
            Admission::Reject { reason, message } => {
                self.end(MigrationPhase::Failed, &Why { reason, message })
                    .await?;
                Ok(Action::await_change())
            }
            Admission::Wait { reason, message } => self.wait(reason, message).await,
            Admission::Admit { source, target } => {
                let vm = vm.expect("admission admits only an existing VM");
                let target = if self.ctx.reservations.is_some() {
                    // Named: only that node. Picked: each open node in turn, until the
                    // scheduler finds room on one.
                    let candidates = match &self.m.spec.target_node {
                        Some(_) => vec![target],
                        None => admission::candidates(&source, &live, &closed, &vms_per_node),
                    };
                    match self.reserve_target(&vm, &candidates).await? {
                        Ok(target) => target,
                        Err(action) => return Ok(action),
                    }
                } else {
                    target
                };
                self.start(&vm, source, Some(target)).await
            }
            Admission::Save { source } => {
                let vm = vm.expect("admission admits only an existing VM");
                self.start(&vm, source, None).await
            }
        }
    }

    /// Reserves the guest on the first of `candidates` the scheduler has room on: `Ok`
    /// with that node once its reservation is placed; `Err` with what to do meanwhile
    /// (wait while the scheduler decides) or after (the migration failed before Begin:
    /// no candidate has room). Reservations the scheduler refused are kept until the
    /// decision, so the next look skips their nodes, then released.
    async fn reserve_target(
        &self,
        vm: &VirtualMachine,
        candidates: &[String],
    ) -> Result<std::result::Result<String, Action>> {
        use crate::reservation::Placed;
        let settings = self.ctx.reservations.as_ref().expect("reservations are on");
        let client = &self.ctx.client;
        let mut refused = Vec::new();
        let mut placed = None;
        for node in candidates {
            let (p, want) =
                crate::reservations::reserve(client, settings, self.m, vm, node).await?;
            match p {
                Placed::Yes => {
                    placed = Some(node.clone());
                    break;
                }
                Placed::NotYet => {
                    let message = format!(
                        "reserving {} MiB and {} vCPU for the guest on {node} (Pod {})",
                        want.memory_bytes >> 20,
                        want.vcpus,
                        want.pod_name()
                    );
                    return Ok(Err(self.wait(Reason::Reserving, message).await?));
                }
                Placed::Refused(why) => refused.push((want, why)),
            }
        }
        for (want, _) in &refused {
            crate::reservations::release(client, settings, want).await?;
        }
        if let Some(node) = placed {
            return Ok(Ok(node));
        }
        let size = refused.first().map_or(String::new(), |(w, _)| {
            format!(" ({} MiB and {} vCPU)", w.memory_bytes >> 20, w.vcpus)
        });
        let message = match refused.as_slice() {
            [(w, why)] => format!("node {} has no room for the guest{size}: {why}", w.node),
            _ => {
                let nodes: Vec<String> = refused
                    .iter()
                    .map(|(w, why)| format!("{}: {why}", w.node))
                    .collect();
                format!("no node has room for the guest{size}: {}", nodes.join("; "))
            }
        };
        self.end(
            MigrationPhase::Failed,
            &Why {
                reason: Reason::InsufficientResources,
                message,
            },
        )
        .await?;
        Ok(Err(Action::await_change()))
    }

    /// Keeps a migration Pending, saying why (condition Admitted=False).
    async fn wait(&self, reason: Reason, message: String) -> Result<Action> {
        let mut conditions = self.conditions();
        set_condition(
            &mut conditions,
            ADMITTED,
            false,
            reason,
            &message,
            self.m.metadata.generation,
            now(),
        );
        let patch = patches::pending(conditions, self.m.metadata.generation);
        self.write(patch, Guard::None).await?;
        // The VM, the limits and the reservation are not watched from here: look again
        // soon.
        Ok(Action::requeue(Duration::from_millis(500)))
    }

    /// Starts an admitted migration: labels, finalizer, VM held, Begin. `target` is
    /// `None` for a migration to a file.
    async fn start(
        &self,
        vm: &VirtualMachine,
        source: String,
        target: Option<String>,
    ) -> Result<Action> {
        let mut labels = BTreeMap::from([(SOURCE_NODE_LABEL.to_string(), source.clone())]);
        if let Some(target) = &target {
            labels.insert(TARGET_NODE_LABEL.to_string(), target.clone());
        }
        // The finalizer first: from the moment the VM is held, a deletion must wait for
        // the release.
        let metadata = MetadataPatch {
            labels: Some(labels),
            finalizers: Some(self.finalizers_with_ours()),
            ..Default::default()
        };
        let latest = self
            .api()
            .patch(&self.name(), &PatchParams::default(), &metadata.to_patch())
            .await?;
        if !is_pending(&latest) {
            info!("admitted already; this reconcile saw an older version");
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        self.hold_vm(vm, &source, target.as_deref()).await?;
        let message = match (&target, &self.m.spec.to_file) {
            (Some(target), _) => {
                format!("moving {} from {source} to {target}", self.m.spec.vm_name)
            }
            (None, Some(file)) => format!(
                "saving {} on {source} to {} ({:?})",
                self.m.spec.vm_name, file.path, file.compression
            ),
            (None, None) => format!("{} on {source}", self.m.spec.vm_name),
        };
        let mut conditions = self.conditions();
        set_condition(
            &mut conditions,
            ADMITTED,
            true,
            Reason::Admitted,
            &message,
            self.m.metadata.generation,
            now(),
        );
        let policy = || crate::policy::effective(&self.ctx.default_policy, &self.m.spec.policy);
        let patch = patches::begin(
            &source,
            target.as_deref().map(|t| (t, policy())),
            conditions,
            self.m.metadata.generation,
            now(),
        );
        // Only over the version just checked to be Pending.
        let guard = match latest.metadata.resource_version.as_deref() {
            Some(rv) => Guard::At(rv),
            None => Guard::None,
        };
        self.write(patch, guard).await?;
        info!(%source, ?target, "admitted; Begin");
        self.event(EventType::Normal, "Begin", &message).await;
        Ok(Action::requeue(Duration::from_secs(2)))
    }

    async fn running(&self) -> Result<Action> {
        if !self.m.spec.cancel && self.vm_deleting() {
            self.cancel_for_deleted_vm().await?;
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        // What a phase entered without this operator (peer-to-peer) needs.
        self.keep_hand_over().await?;
        let status = self.m.status.clone().unwrap_or_default();
        let live = nodes::live_nodes(&self.ctx.leases, Timestamp::now());
        let is_live = |n: &Option<String>| n.as_ref().is_some_and(|n| live.contains(n));
        let vm_ref = ObjectRef::new(&self.m.spec.vm_name).within(self.ns);
        let vm_node = self
            .ctx
            .vms
            .get(&vm_ref)
            .and_then(|v| v.status.clone())
            .and_then(|s| s.node_name);
        let obs = Observation {
            now: Timestamp::now(),
            source_live: is_live(&status.source_node),
            target_live: is_live(&status.target_node),
            vm_node,
        };
        match transitions::decide(self.m, &obs, &self.ctx.timeouts) {
            Decision::Wait(after) => {
                self.report_progress().await?;
                Ok(Action::requeue(after))
            }
            Decision::RequestCancel => {
                // Peer-to-peer, only while the Perform it saw still runs: the source
                // agent may have moved on meanwhile.
                let guard = if self.m.spec.mode == ControlMode::PeerToPeer {
                    Guard::Read
                } else {
                    Guard::None
                };
                self.write(patches::cancel(), guard).await?;
                info!("cancel requested during Perform");
                self.event(
                    EventType::Normal,
                    "Cancelling",
                    "asked the source to stop the transfer",
                )
                .await;
                Ok(Action::requeue(Duration::from_secs(1)))
            }
            Decision::RetryConfirm(why) => {
                warn!(reason = %why.reason, message = %why.message, "Confirm failed; running it again");
                self.event(EventType::Warning, why.reason.as_str(), &why.message)
                    .await;
                // `decide` waited until the failed step had ended a while ago.
                self.write(patches::retry_confirm(now()), Guard::None)
                    .await?;
                Ok(Action::requeue(Duration::from_secs(2)))
            }
            Decision::Enter {
                phase,
                cancelled,
                rollback,
            } => {
                if let Some(done) = status.phase.filter(|_| rollback.is_none()) {
                    ferry_runtime::fault::pause(&format!("after-{}", done.key())).await;
                }
                self.observe_step_duration();
                let conditions = match &rollback {
                    Some(why) => self.conditions_rolling_back(why),
                    None => self.conditions(),
                };
                // The admission policies' record first: the agent that sees the
                // phase may act on it at once.
                let to_node = self.m.spec.to_file.is_none();
                match (phase, cancelled) {
                    (MigrationPhase::Finish, false) if to_node => self.open_hand_over().await?,
                    (MigrationPhase::Confirm, true) if to_node => self.reverse_hand_over().await?,
                    _ => {}
                }
                let generation = self.m.metadata.generation;
                let patch = patches::enter(phase, cancelled, conditions, generation, now());
                self.write(patch, Guard::None).await?;
                let note = match &rollback {
                    Some(why) => format!("{phase:?} (rolling back: {})", why.message),
                    None => format!("{phase:?}"),
                };
                info!(?phase, cancelled, "{note}");
                let kind = if rollback.is_some() {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                self.event(kind, &format!("{phase:?}"), &note).await;
                Ok(Action::requeue(Duration::from_secs(2)))
            }
            Decision::End { phase, why } => {
                self.observe_step_duration();
                self.end(phase, &why).await?;
                Ok(Action::requeue(Duration::from_millis(100)))
            }
            Decision::GiveUp { phase, why } => {
                self.give_up(phase, &why).await?;
                Ok(Action::requeue(Duration::from_secs(1)))
            }
            Decision::NoteRollback(why) => {
                self.note_rollback(&why).await?;
                Ok(Action::requeue(Duration::from_secs(2)))
            }
        }
    }

    /// The conditions with `RollingBack` set True for `why`.
    fn conditions_rolling_back(&self, why: &Why) -> Vec<ferry_crds::Condition> {
        let mut conditions = self.conditions();
        set_condition(
            &mut conditions,
            ROLLING_BACK,
            true,
            why.reason,
            &why.message,
            self.m.metadata.generation,
            now(),
        );
        conditions
    }

    fn conditions(&self) -> Vec<ferry_crds::Condition> {
        self.m
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default()
    }

    /// Writes `patch` into the migration's status, over the version `guard` names (a
    /// conflict fails the reconcile, which runs again on the newer version). Every
    /// write of the status goes through here.
    async fn write(&self, patch: MigrationStatusPatch, guard: Guard<'_>) -> Result<()> {
        let resource_version = match guard {
            Guard::None => None,
            Guard::Read => self.m.metadata.resource_version.as_deref(),
            Guard::At(rv) => Some(rv),
        };
        self.api()
            .patch_status(
                &self.name(),
                &PatchParams::default(),
                &patch.to_patch(resource_version),
            )
            .await?;
        Ok(())
    }

    /// Marks the VM as held by this migration from `source` to `target` (`None`: to a
    /// file), unless another holds it: `status.migration` and the record the admission
    /// policies read, `status.holder`, in one write. The resourceVersion precondition
    /// makes two operators (or reconciles, or an agent's fence) agree on who holds the VM.
    async fn hold_vm(&self, vm: &VirtualMachine, source: &str, target: Option<&str>) -> Result<()> {
        let holder = hand_over::holder(&self.name(), source, target);
        self.write_holder(vm, Some(holder)).await
    }

    /// Clears the VM's `status.migration` and `status.holder` if either still names
    /// this migration (the source's fence clears only the first), and the hand-over
    /// stamps of its disk locks.
    async fn release_vm(&self) -> Result<()> {
        let Some(vm) = self.vms().get_opt(&self.m.spec.vm_name).await? else {
            return Ok(());
        };
        let status = vm.status.clone().unwrap_or_default();
        let me = self.name();
        let held = status.migration.as_deref() == Some(me.as_str())
            || status.holder.as_ref().is_some_and(|h| h.migration == me);
        if held {
            self.write_holder(&vm, None).await?;
        }
        self.close_hand_over().await
    }

    /// Deletes the finished migrations of this one's VM beyond the history limit.
    async fn prune_history(&self) -> Result<()> {
        let all = self.api().list(&ListParams::default()).await?;
        let old =
            crate::history::beyond_limit(&all.items, &self.m.spec.vm_name, self.ctx.history_limit);
        for m in old {
            let name = m.name_any();
            match self.api().delete(&name, &DeleteParams::background()).await {
                Ok(_) => {
                    info!(deleted = %name, limit = self.ctx.history_limit, "history limit: deleted a finished migration")
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn has_finalizer(&self) -> bool {
        self.m.finalizers().iter().any(|f| f == ROLLBACK_FINALIZER)
    }

    fn finalizers_with_ours(&self) -> Vec<String> {
        let mut finalizers = self.m.finalizers().to_vec();
        if !self.has_finalizer() {
            finalizers.push(ROLLBACK_FINALIZER.to_string());
        }
        finalizers
    }

    async fn add_finalizer(&self) -> Result<()> {
        self.set_finalizers(self.finalizers_with_ours()).await
    }

    async fn remove_finalizer(&self) -> Result<()> {
        let finalizers: Vec<String> = self
            .m
            .finalizers()
            .iter()
            .filter(|f| *f != ROLLBACK_FINALIZER)
            .cloned()
            .collect();
        if finalizers.len() == self.m.finalizers().len() {
            return Ok(());
        }
        self.set_finalizers(finalizers).await
    }

    async fn set_finalizers(&self, finalizers: Vec<String>) -> Result<()> {
        // resourceVersion guards against dropping a finalizer someone else just added.
        let patch = MetadataPatch {
            finalizers: Some(finalizers),
            resource_version: self.m.resource_version(),
            ..Default::default()
        };
        match self
            .api()
            .patch(&self.name(), &PatchParams::default(), &patch.to_patch())
            .await
        {
            Ok(_) => Ok(()),
            // Gone already: nothing holds it any more.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn event(&self, type_: EventType, reason: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1024).collect()),
            action: "Migrate".into(),
            secondary: None,
        };
        self.ctx.events.publish(event, self.m.object_ref(&()));
    }
}

/// Which version of the migration a status write applies to.
#[derive(Debug, Clone, Copy)]
enum Guard<'a> {
    /// Whatever version the API server has: the merge patch goes over it.
    None,
    /// Only the version this reconcile read (`Reconciler::m`).
    Read,
    /// Only this resourceVersion.
    At(&'a str),
}

/// Whether `m` still waits for admission.
fn is_pending(m: &VirtualMachineMigration) -> bool {
    matches!(
        m.status.as_ref().and_then(|s| s.phase),
        None | Some(MigrationPhase::Pending)
    )
}

pub(crate) fn now() -> Time {
    Time(Timestamp::now())
}
