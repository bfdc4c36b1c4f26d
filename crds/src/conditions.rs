//! The condition types of a migration and of a VirtualMachine, named in one place: the
//! operator and the agents set each of them through these constants, and a reader can
//! look them up by the same names.

/// False while the migration waits in Pending (the reason says for what); True once
/// the operator admitted it.
pub const ADMITTED: &str = "Admitted";
/// Why a rollback started.
pub const ROLLING_BACK: &str = "RollingBack";
/// The guest runs on the target (False when the migration ended otherwise).
pub const COMPLETE: &str = "Complete";
/// The migration ended without moving the guest; the reason and message say why.
pub const FAILED: &str = "Failed";
/// Whether pre-copy converges, as the source agent judges it.
pub const CONVERGING: &str = "Converging";
/// A cut stream paused a post-copy migration (False once recovered).
pub const POST_COPY_PAUSED: &str = "PostCopyPaused";

/// Every condition type of a migration.
pub const ALL: &[&str] = &[
    ADMITTED,
    ROLLING_BACK,
    COMPLETE,
    FAILED,
    CONVERGING,
    POST_COPY_PAUSED,
];

/// The condition types of a VirtualMachine (the agent of its node writes them).
pub mod vm {
    /// The guest runs and answers QMP.
    pub const READY: &str = "Ready";
    /// True while `spec.domainXML` differs from the definition the running guest started
    /// with (reason `DomainChanged`, the message lists what changed): it applies when the
    /// guest is stopped and started again.
    pub const RESTART_REQUIRED: &str = "RestartRequired";
    /// True while `spec.domainXML` cannot be applied to the running guest (reason
    /// `InvalidDomain`: it does not parse or is not supported; `IdentityChanged`: it
    /// renames the guest or changes its uuid); the guest keeps running as it started.
    pub const DOMAIN_REFUSED: &str = "DomainRefused";
    /// True from the moment the guest was asked to power off (ACPI; reason `Stopping`
    /// for `spec.running: false`, `Deleting` for a deleted VM) until it is stopped: its
    /// `lastTransitionTime` starts the grace period (`spec.terminationGracePeriodSeconds`).
    pub const SHUTTING_DOWN: &str = "ShuttingDown";

    /// Every condition type of a VirtualMachine.
    pub const ALL: &[&str] = &[READY, RESTART_REQUIRED, DOMAIN_REFUSED, SHUTTING_DOWN];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_types_are_distinct_camel_case_words() {
        for (i, t) in ALL.iter().enumerate() {
            assert!(t.chars().next().unwrap().is_ascii_uppercase(), "{t}");
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric()), "{t}");
            assert!(!ALL[..i].contains(t), "{t} twice");
        }
        for (i, t) in vm::ALL.iter().enumerate() {
            assert!(t.chars().next().unwrap().is_ascii_uppercase(), "{t}");
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric()), "{t}");
            assert!(!vm::ALL[..i].contains(t), "{t} twice");
        }
    }
}
