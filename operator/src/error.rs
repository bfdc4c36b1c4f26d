//! The operator's errors.

/// Why a reconcile failed; the controller retries it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("migration {0} has no namespace")]
    NoNamespace(String),
    #[error("VirtualMachine {vm} changed while migration {migration} was updating it; retrying")]
    VmConflict { vm: String, migration: String },
}

impl Error {
    /// The error's kind, as a metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NoNamespace(_) => "no_namespace",
            Error::VmConflict { .. } => "vm_conflict",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
