//! The policy's QMP side: sets one side's [`Settings`] (capabilities, then parameters)
//! on a QEMU, and says which of them this QEMU refused.

use super::Settings;
use crate::qmp::{Qmp, QmpError};

/// Why a QEMU did not take the policy's settings.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// This QEMU cannot apply the policy (e.g. lacks a compression method).
    #[error("this QEMU cannot apply the migration policy: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

impl ApplyError {
    /// The [`ErrorKind`](crate::error::ErrorKind) label of this error: `unsupported` or
    /// `qmp`.
    pub fn label(&self) -> &'static str {
        match self {
            ApplyError::Unsupported(_) => "unsupported",
            ApplyError::Qmp(_) => "qmp",
        }
    }
}

/// Applies one side's [`Settings`]: capabilities, then parameters. A parameter value this
/// QEMU does not know (e.g. a compression it was built without) is refused by name.
pub(crate) async fn apply(qmp: &Qmp, settings: &Settings) -> Result<(), ApplyError> {
    qmp.run(
        "migrate-set-capabilities",
        Some(settings.capabilities_args()),
    )
    .await
    .map_err(|e| unsupported(qmp, "capabilities", &settings.capabilities_args(), e))?;
    qmp.run("migrate-set-parameters", Some(settings.parameters_args()))
        .await
        .map_err(|e| unsupported(qmp, "parameters", &settings.parameters_args(), e))
}

fn unsupported(qmp: &Qmp, what: &str, args: &serde_json::Value, e: QmpError) -> ApplyError {
    match e {
        QmpError::Command { desc, .. } => ApplyError::Unsupported(format!(
            "QEMU {} refused the migration {what} {args}: {desc}",
            qmp.version
        )),
        e => ApplyError::Qmp(e),
    }
}
