//! One phase of one migration on this node, between the status and the data plane: per
//! phase, how its inputs are read ([`Inputs`], from the status or from a peer call) and
//! how its output becomes a typed status patch ([`Done`]), or why it failed
//! ([`StepError`], with the [`Reason`] the step records). Recording the step is the
//! caller's: the managed runner (`runner`), the peer-to-peer driver, the peer server.
//!
//! | phase | file | reads | writes |
//! | --- | --- | --- | --- |
//! | Begin | `begin.rs` | the VM, `spec.targetDomainXML` | `cookies.begin`, `targetDomainXML` |
//! | Prepare | `prepare.rs` | `targetDomainXML`, `cookies.begin`, the policy | `cookies.prepare`, `migrationURI` |
//! | Perform | `perform.rs` (`to_file.rs` for a save) | `migrationURI`, `cookies.prepare`, the policy | `cookies.perform`, `progress`, `downtimeMs`, `totalTimeMs` (`savedState`) |
//! | Finish | `finish.rs` | `cookies.perform`, `cancelled` | `cookies.finish` |
//! | Confirm | `confirm.rs` (`to_file.rs` for a save) | `cookies.finish`, `cancelled` | `downtimeMs` |

use ferry_agent::domain::{Device, Domain, DomainError};
use ferry_agent::error::{ErrorKind, PhaseError};
use ferry_agent::node::guest_key;
use ferry_agent::policy::ApplyError;
use ferry_crds::{
    Cookies, MigrationPhase, MigrationStatusPatch, Reason, StepOutcome, TransportMode,
    VirtualMachine, VirtualMachineMigration, VirtualMachineMigrationStatus,
    VirtualMachineStatusPatch, VmPhase, set_condition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PatchParams;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Agent;
use super::locks::DiskLocks;
use super::ownership::{Claim, OwnershipError};
use super::peer::tunnel::TunnelError;
use super::status::StatusWriter;

mod begin;
mod confirm;
mod finish;
mod perform;
mod prepare;
mod to_file;

pub use perform::{progress_of, target_report};

/// What a phase takes from the phases before it. The managed runner and the driver
/// read it from the status; the target's peer server from the source's call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// The rollback flag: Finish and Confirm undo their side.
    pub cancelled: bool,
    /// Begin's definition for the target (Prepare).
    pub target_domain_xml: Option<String>,
    /// Where the target listens (Perform).
    pub migration_uri: Option<String>,
    pub cookies: Cookies,
}

impl Inputs {
    /// The inputs as the status has them.
    pub fn of(status: &VirtualMachineMigrationStatus) -> Inputs {
        Inputs {
            cancelled: status.cancelled,
            target_domain_xml: status.target_domain_xml.clone(),
            migration_uri: status.migration_uri.clone(),
            cookies: status.cookies.clone().unwrap_or_default(),
        }
    }
}

/// A phase that did its work: why (the step's reason), what it says, and the status
/// fields it gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub reason: Reason,
    pub message: String,
    pub outputs: MigrationStatusPatch,
}

impl Done {
    fn new(reason: Reason, message: impl Into<String>) -> Done {
        Done {
            reason,
            message: message.into(),
            outputs: MigrationStatusPatch::default(),
        }
    }

    fn with(mut self, outputs: MigrationStatusPatch) -> Done {
        self.outputs = outputs;
        self
    }
}

/// Why a phase failed on this node.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Phase(Box<PhaseError>),
    /// An earlier phase left no input this one takes.
    #[error("{0}")]
    MissingInput(&'static str),
    #[error("reading VirtualMachine {vm}: {source}")]
    ReadVm { vm: String, source: kube::Error },
    #[error("VirtualMachine {0} does not exist")]
    NoVm(String),
    #[error("VirtualMachine {vm}: {source}")]
    Domain { vm: String, source: DomainError },
    /// Prepare: the definition Begin handed on is not the one the VM's owner wrote.
    #[error("VirtualMachine {vm}: {source}")]
    Handed {
        vm: String,
        source: ferry_agent::abi::HandedError,
    },
    #[error("no free migration port in the configured range")]
    NoPort,
    #[error("node {node} has no migration certificate yet ({why}); {needs}")]
    NoCertificate {
        node: String,
        why: String,
        /// What needs it, and the way out if there is one.
        needs: &'static str,
    },
    #[error(transparent)]
    NoStateKey(#[from] crate::k8s::state_key::NoStateKey),
    #[error(transparent)]
    Policy(#[from] ferry_agent::policy::PolicyError),
    /// The migration was cancelled before this phase could do anything.
    #[error("{0}")]
    Cancelled(&'static str),
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    #[error(transparent)]
    Locks(#[from] crate::k8s::locks::LockError),
    /// Source, in Confirm: the target owns the guest but has not reported it running,
    /// so the paused copy here stays (it is the guest, should the target never run it).
    #[error(
        "the target {target} owns the guest but has not reported it running yet{why}; the \
         paused copy on the source stays until it does"
    )]
    AwaitingTarget { target: String, why: String },
    #[error(transparent)]
    Supervisor(#[from] ferry_agent::supervisor::SupervisorError),
    #[error(transparent)]
    Tunnel(#[from] crate::k8s::peer::tunnel::TunnelError),
    #[error("writing the status of VirtualMachine {vm}: {source}")]
    VmStatus { vm: String, source: kube::Error },
    /// `phase` is not one an agent runs.
    #[error("{0:?} is not a phase an agent runs")]
    NotAPhase(MigrationPhase),
}

impl From<PhaseError> for StepError {
    fn from(e: PhaseError) -> Self {
        StepError::Phase(Box::new(e))
    }
}

impl StepError {
    /// The reason the step records.
    pub fn reason(&self) -> Reason {
        match self {
            StepError::Phase(e) => reason_of(&e.kind),
            StepError::MissingInput(_) => Reason::MissingInput,
            StepError::ReadVm { .. } | StepError::VmStatus { .. } => Reason::ApiError,
            StepError::NoVm(_) => Reason::VMNotFound,
            StepError::Domain { .. } => Reason::InvalidDomain,
            StepError::Handed { .. } => Reason::Refused,
            StepError::NoPort => Reason::NoPort,
            StepError::NoCertificate { .. } => Reason::TlsUnavailable,
            StepError::NoStateKey(_) => Reason::Refused,
            StepError::Policy(_) => Reason::PolicyRefused,
            StepError::Cancelled(_) => Reason::Cancelled,
            StepError::Ownership(_) => Reason::OwnershipFailed,
            StepError::Locks(_) => Reason::ApiError,
            StepError::AwaitingTarget { .. } => Reason::AwaitingTarget,
            StepError::Supervisor(_) => Reason::QemuFailed,
            StepError::Tunnel(TunnelError::NotTunnelled(_)) => Reason::MissingInput,
            StepError::Tunnel(TunnelError::Listen { .. }) => Reason::TransferFailed,
            StepError::NotAPhase(_) => Reason::Invalid,
        }
    }
}

/// The reason of a data-plane error.
fn reason_of(kind: &ErrorKind) -> Reason {
    match kind {
        ErrorKind::Domain(_) => Reason::InvalidDomain,
        ErrorKind::Abi(_) => Reason::AbiUnstable,
        ErrorKind::Cookie(_) => Reason::InvalidCookie,
        ErrorKind::Qmp(_) => Reason::QmpFailed,
        ErrorKind::Supervisor(_) => Reason::QemuFailed,
        ErrorKind::PolicyRefused(_) | ErrorKind::PolicyApply(ApplyError::Unsupported(_)) => {
            Reason::PolicyRefused
        }
        ErrorKind::PolicyApply(ApplyError::Qmp(_)) => Reason::QmpFailed,
        ErrorKind::Tls(_) => Reason::TlsUnavailable,
        ErrorKind::Refused(_) => Reason::Refused,
        ErrorKind::MigrationFailed(_) => Reason::TransferFailed,
        ErrorKind::Cancelled => Reason::Cancelled,
        ErrorKind::LimitExceeded(_) => Reason::LimitExceeded,
        ErrorKind::Ownership(_) => Reason::OwnershipFailed,
        ErrorKind::NotArrived(_) => Reason::NotArrived,
        ErrorKind::NeverRan(_) => Reason::TargetNeverRan,
        ErrorKind::GuestLost(_) => Reason::GuestLost,
        ErrorKind::Record(_) => Reason::RecordFailed,
        ErrorKind::StateFile(_) => Reason::StateFileInvalid,
        // The step's reason is one of the published list (the CRD's enum); the message
        // names the field, the path and the rule.
        ErrorKind::HostPath(_) => Reason::Refused,
    }
}

/// How a phase ended, as a step records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub outcome: StepOutcome,
    pub reason: Reason,
    pub message: String,
    pub outputs: MigrationStatusPatch,
}

impl From<Result<Done, StepError>> for Report {
    fn from(result: Result<Done, StepError>) -> Report {
        match result {
            Ok(done) => Report {
                outcome: StepOutcome::Succeeded,
                reason: done.reason,
                message: done.message,
                outputs: done.outputs,
            },
            Err(e) => {
                let message = e.to_string();
                warn!(%message, reason = %e.reason(), "failed");
                Report {
                    outcome: StepOutcome::Failed,
                    reason: e.reason(),
                    message,
                    outputs: MigrationStatusPatch::default(),
                }
            }
        }
    }
}

/// Runs `phase` of `m` on this node with `inputs`, without recording anything.
pub async fn execute(
    agent: &Agent,
    m: &VirtualMachineMigration,
    phase: MigrationPhase,
    inputs: Inputs,
    cancel: &CancellationToken,
) -> Report {
    Run::new(agent, m, phase, inputs)
        .execute(cancel)
        .await
        .into()
}

/// The target, after the switch to post-copy, found its incoming QEMU gone: if it took
/// the guest in Finish (the VM names this node), marks the VM Failed (`GuestLost`, with
/// `why`), releases its disk locks and removes what is left of the guest here (its
/// state dir `key`); else the source's rollback does. Whether it did.
pub async fn mark_lost_here(
    agent: &Agent,
    m: &VirtualMachineMigration,
    key: &str,
    why: &str,
) -> Result<bool, StepError> {
    let run = Run::new(agent, m, MigrationPhase::Finish, Inputs::default());
    let (vm, _) = run.vm().await?;
    if vm.status.as_ref().and_then(|s| s.node_name.as_deref()) != Some(agent.node.as_str()) {
        return Ok(false);
    }
    run.mark_vm_lost(why).await?;
    agent.sup.destroy(key).await?;
    Ok(true)
}

/// One phase of one migration, with what it reads.
pub(crate) struct Run<'a> {
    agent: &'a Agent,
    m: &'a VirtualMachineMigration,
    phase: MigrationPhase,
    inputs: Inputs,
    api: Api<VirtualMachineMigration>,
    vms: Api<VirtualMachine>,
    /// The data plane's name for this migration: unique even if a migration of the
    /// same name is created again.
    id: String,
}

impl<'a> Run<'a> {
    fn new(
        agent: &'a Agent,
        m: &'a VirtualMachineMigration,
        phase: MigrationPhase,
        inputs: Inputs,
    ) -> Self {
        let ns = m.namespace().unwrap_or_default();
        Run {
            agent,
            m,
            phase,
            inputs,
            api: Api::namespaced(agent.client.clone(), &ns),
            vms: Api::namespaced(agent.client.clone(), &ns),
            id: format!("{ns}/{}@{}", m.name_any(), m.uid().unwrap_or_default()),
        }
    }

    async fn execute(&self, cancel: &CancellationToken) -> Result<Done, StepError> {
        let to_file = self.m.spec.to_file.is_some();
        match self.phase {
            MigrationPhase::Begin => self.begin().await,
            MigrationPhase::Prepare => self.prepare().await,
            MigrationPhase::Perform if to_file => self.save(cancel).await,
            MigrationPhase::Perform => self.perform(cancel).await,
            MigrationPhase::Finish => self.finish().await,
            MigrationPhase::Confirm if to_file && !self.inputs.cancelled => {
                self.confirm_save().await
            }
            MigrationPhase::Confirm => self.confirm().await,
            other => Err(StepError::NotAPhase(other)),
        }
    }

    fn status(&self) -> VirtualMachineMigrationStatus {
        self.m.status.clone().unwrap_or_default()
    }

    /// The policy the operator fixed at admission (`spec.policy` for a migration admitted
    /// before there was one).
    fn policy(&self) -> Result<ferry_agent::policy::Policy, StepError> {
        let policy = self
            .status()
            .policy
            .unwrap_or_else(|| self.m.spec.policy.clone());
        let policy = ferry_agent::policy::resolve(&policy)?;
        let node = self.agent.sup.node();
        if let Some(qemu) = &node.qemu {
            qemu.check(&policy, &node.name)?;
        }
        Ok(policy)
    }

    /// The source and target nodes.
    /// Who owns the guest, as the ownership writes of Finish and Confirm see it.
    fn ownership<'c>(&'c self, name: &'c str, source: &'c str, target: &'c str) -> Claim<'c> {
        Claim {
            vms: &self.vms,
            vm: &self.m.spec.vm_name,
            migration: name,
            source,
            target,
        }
    }

    fn claim(&self) -> (String, String) {
        let (source, target) = self.m.nodes();
        (source.to_string(), target.to_string())
    }

    /// The key of the migrated VM's guest running `domain` on a node (its state dir,
    /// [`guest_key`]); the target definition has the source's uuid, so both nodes
    /// agree on it.
    fn key(&self, domain: &Domain) -> String {
        guest_key(
            self.m.metadata.namespace.as_deref().unwrap_or_default(),
            &self.m.spec.vm_name,
            domain.uuid,
        )
    }

    /// The VM object and the definition its guest runs with: `status.domainXML` when
    /// the agent recorded it (a spec edited meanwhile applies at the next start only),
    /// else the spec's.
    async fn vm(&self) -> Result<(VirtualMachine, Domain), StepError> {
        let (object, domain, _) = self.vm_recorded().await?;
        Ok((object, domain))
    }

    /// [`Run::vm`], and whether the definition is the recorded one.
    async fn vm_recorded(&self) -> Result<(VirtualMachine, Domain, bool), StepError> {
        let vm = &self.m.spec.vm_name;
        let object = self
            .vms
            .get_opt(vm)
            .await
            .map_err(|source| StepError::ReadVm {
                vm: vm.clone(),
                source,
            })?
            .ok_or_else(|| StepError::NoVm(vm.clone()))?;
        let running = object.status.as_ref().and_then(|s| s.domain_xml.as_deref());
        let xml = running.unwrap_or(&object.spec.domain_xml);
        let domain = Domain::parse(xml).map_err(|source| StepError::Domain {
            vm: vm.clone(),
            source,
        })?;
        let recorded = running.is_some();
        Ok((object, domain, recorded))
    }

    /// This node's credentials when QEMU encrypts the migration's stream (direct mode
    /// with `spec.transport.tls`); an error, not plain TCP, when the node has no
    /// certificate yet. `None` in tunnelled mode: the agents encrypt it.
    fn tls(&self) -> Result<Option<ferry_agent::tls::Credentials>, StepError> {
        if !self.m.spec.transport.tls || self.tunnelled() {
            return Ok(None);
        }
        self.node_credentials().map(Some)
    }

    /// This node's current certificate, or why it has none.
    fn node_credentials(&self) -> Result<ferry_agent::tls::Credentials, StepError> {
        self.agent
            .certs
            .current()
            .ok_or_else(|| StepError::NoCertificate {
                node: self.agent.node.clone(),
                why: self.agent.certs.why_none(),
                needs: if self.tunnelled() {
                    "transport.mode Tunnelled needs it: the agents' connection is always TLS"
                } else {
                    "spec.transport.tls is on; set transport.tls: false to migrate in plain TCP"
                },
            })
    }

    /// Whether the stream goes through the agents (`spec.transport.mode: Tunnelled`).
    fn tunnelled(&self) -> bool {
        self.m.spec.transport.mode == TransportMode::Tunnelled
    }

    /// How a step message says how the stream travels, and who the peer must be.
    fn stream_words(&self, qemu_tls: bool, peer: &str) -> String {
        if self.tunnelled() {
            format!("tunnelled through the agents, TLS, peer certificate {peer} verified")
        } else {
            tls_words(qemu_tls, peer)
        }
    }

    /// The writer of this migration's status.
    fn writer(&self) -> StatusWriter {
        StatusWriter::new(
            self.api.clone(),
            &self.m.name_any(),
            self.agent.metrics.status_writes(),
        )
    }

    fn disk_locks(&self) -> DiskLocks {
        DiskLocks::new(
            self.agent.client.clone(),
            &self.agent.namespace,
            &self.m.namespace().unwrap_or_default(),
            &self.m.spec.vm_name,
        )
    }

    /// Marks the VM Failed, reason GuestLost, and releases its disk locks held here: its
    /// QEMU here was removed because the guest's state was split between two QEMUs and
    /// the other is gone (Confirm), or the target may have run it and lost it (Finish).
    /// (The VM reconciler would call it GuestDied, as if the QEMU had exited by itself.)
    pub(super) async fn mark_vm_lost(&self, why: &str) -> Result<(), StepError> {
        let (vm, _) = self.vm().await?;
        let message = format!(
            "the guest is lost: {why}; its QEMU on {} was removed. Ferry does not restart it \
             (set spec.running to false and back to true to start it again)",
            self.agent.node
        );
        self.mark_vm_gone(
            &vm,
            VmPhase::Failed,
            "GuestLost",
            &message,
            Default::default(),
        )
        .await
    }

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
        extra: VirtualMachineStatusPatch,
    ) -> Result<(), StepError> {
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
        let patch = VirtualMachineStatusPatch {
            phase: Some(phase),
            graphics: Some(None),
            conditions: Some(conditions),
            ..extra
        };
        let name = &self.m.spec.vm_name;
        self.vms
            .patch_status(name, &PatchParams::default(), &patch.to_patch(None))
            .await
            .map_err(|source| StepError::VmStatus {
                vm: name.clone(),
                source,
            })?;
        let _ = self.disk_locks().release(&self.agent.node).await;
        Ok(())
    }
}

/// The images a domain writes (its disks but the read-only ones): what the disk locks
/// lock, one per image ([`ferry_agent::storage::image_lock_name`]).
pub fn disks(domain: &Domain) -> Vec<String> {
    domain
        .devices
        .iter()
        .filter_map(|d| match d {
            Device::Disk(disk) if !disk.readonly => Some(disk.source.clone()),
            _ => None,
        })
        .collect()
}

/// How a step message says whether the stream is encrypted, and who the peer must be.
fn tls_words(tls: bool, peer: &str) -> String {
    if tls {
        format!("TLS, peer certificate {peer} verified")
    } else {
        "plain TCP, transport.tls false".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_its_reason_up_to_the_step() {
        let report: Report = Err(StepError::NoPort).into();
        assert_eq!(report.outcome, StepOutcome::Failed);
        assert_eq!(report.reason, Reason::NoPort);
        assert_eq!(
            report.message,
            "no free migration port in the configured range"
        );
        let lost = PhaseError {
            phase: ferry_agent::phases::Phase::Perform,
            vm: "demo".into(),
            migration: "m".into(),
            kind: ErrorKind::GuestLost("the target QEMU is gone".into()),
        };
        let report: Report = Err(StepError::from(lost)).into();
        assert_eq!(report.reason, Reason::GuestLost);
        assert!(
            report.message.contains("the guest is lost"),
            "{}",
            report.message
        );
    }

    #[test]
    fn inputs_are_read_from_the_status() {
        let status = VirtualMachineMigrationStatus {
            cancelled: true,
            migration_uri: Some("tcp:127.0.0.3:4444".into()),
            cookies: Some(Cookies {
                prepare: Some("<p/>".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let inputs = Inputs::of(&status);
        assert!(inputs.cancelled);
        assert_eq!(inputs.migration_uri.as_deref(), Some("tcp:127.0.0.3:4444"));
        assert_eq!(inputs.cookies.prepare.as_deref(), Some("<p/>"));
    }
}
