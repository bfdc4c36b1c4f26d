//! The error a phase returns: which phase, VM and migration, and what failed.

use crate::abi::AbiError;
use crate::cookie::CookieError;
use crate::domain::DomainError;
use crate::phases::Phase;
use crate::policy::ApplyError;
use crate::qmp::QmpError;
use crate::supervisor::SupervisorError;

/// An error from the caller's ownership hook.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong in a phase.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Abi(#[from] AbiError),
    #[error(transparent)]
    Cookie(#[from] CookieError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    PolicyRefused(#[from] crate::policy::PolicyError),
    /// The request is not allowed in the current state.
    #[error("{0}")]
    Refused(String),
    /// QEMU reported the migration failed.
    #[error("migration failed: {0}")]
    MigrationFailed(String),
    #[error("migration cancelled")]
    Cancelled,
    /// This QEMU did not take the policy's settings ([`ApplyError::Unsupported`]: it
    /// cannot apply them, e.g. it lacks a compression method).
    #[error(transparent)]
    PolicyApply(#[from] ApplyError),
    /// A limit of the policy was hit and the migration was aborted.
    #[error("migration aborted by the policy: {0}")]
    LimitExceeded(String),
    #[error("ownership hook failed: {0}")]
    Ownership(BoxError),
    #[error("guest did not arrive: {0}")]
    NotArrived(String),
    /// Target, after the commit point: its QEMU exited before Finish sent `cont`, so the
    /// guest never ran here and the source's paused copy is whole.
    #[error("the incoming QEMU exited before it ran the guest: {0}")]
    NeverRan(String),
    /// The target's QEMU died after the switch to post-copy: the guest's state was split
    /// between the two QEMUs and QEMU cannot resume it on the source.
    #[error("the guest is lost: {0}")]
    GuestLost(String),
    #[error("migration record: {0}")]
    Record(#[from] std::io::Error),
    #[error(transparent)]
    StateFile(#[from] crate::statefile::StateFileError),
    /// A host path from the spec that this node's storage roots do not allow for the
    /// object's namespace, or that could not be created or opened beneath them.
    #[error(transparent)]
    HostPath(#[from] crate::storage::StorageError),
    /// Turning TLS on or off in a QEMU failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl ErrorKind {
    /// A short, stable label per kind (for metrics and step outcomes).
    pub fn label(&self) -> &'static str {
        match self {
            ErrorKind::Domain(_) => "domain",
            ErrorKind::Abi(_) => "abi",
            ErrorKind::Cookie(_) => "cookie",
            ErrorKind::Qmp(_) => "qmp",
            ErrorKind::Supervisor(_) => "supervisor",
            ErrorKind::PolicyRefused(_) => "policy",
            ErrorKind::Refused(_) => "refused",
            ErrorKind::MigrationFailed(_) => "migration_failed",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::PolicyApply(e) => e.label(),
            ErrorKind::LimitExceeded(_) => "limit_exceeded",
            ErrorKind::Ownership(_) => "ownership",
            ErrorKind::NotArrived(_) => "not_arrived",
            ErrorKind::NeverRan(_) => "never_ran",
            ErrorKind::GuestLost(_) => "guest_lost",
            ErrorKind::Record(_) => "record",
            ErrorKind::StateFile(_) => "state_file",
            ErrorKind::HostPath(_) => "host_path",
            ErrorKind::Tls(_) => "tls",
        }
    }
}

/// A phase failed.
#[derive(Debug, thiserror::Error)]
#[error("{phase} of migration '{migration}' for VM '{vm}' failed: {kind}")]
pub struct PhaseError {
    pub phase: Phase,
    pub vm: String,
    pub migration: String,
    pub kind: ErrorKind,
}

/// The phase, VM and migration an error is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub phase: Phase,
    pub vm: &'a str,
    pub migration: &'a str,
}

impl Ctx<'_> {
    pub fn err(&self, kind: impl Into<ErrorKind>) -> PhaseError {
        let e = PhaseError {
            phase: self.phase,
            vm: self.vm.to_string(),
            migration: self.migration.to_string(),
            kind: kind.into(),
        };
        tracing::warn!(vm = self.vm, migration = self.migration, phase = %self.phase, error = %e.kind, "phase failed");
        e
    }
}
