//! Why a migration's step, condition or end is what it is: the one list of reasons.
//!
//! Every `reason` Ferry writes into a migration — a step's, a condition's, an Event's —
//! is a [`Reason`], so a reason a reader can see is one the code names. The names follow
//! the API conventions: CamelCase, one word each, stable once published.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Why a migration step, rollback, condition or end happened.
        #[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
        pub enum Reason {
            $($(#[doc = $doc])* $name,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The reason as written in a status or an Event.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    // Admission.
    /// The operator admitted the migration.
    Admitted,
    /// The spec is not one Ferry can carry out.
    Invalid,
    /// The VirtualMachine does not exist.
    VMNotFound,
    /// The guest does not run.
    VMNotRunning,
    /// Another migration holds the VM.
    VMBusy,
    /// The VM moved to another node while the migration waited.
    VMMoved,
    /// The VirtualMachine is being deleted: no migration starts, a running one is
    /// cancelled.
    VMDeleting,
    /// The target is the node the guest runs on.
    SameNode,
    /// The target's agent does not heart-beat.
    TargetNotReady,
    /// The target node is cordoned or draining.
    TargetClosed,
    /// No node can take the guest.
    NoTarget,
    /// A limit on migrations at once is reached.
    LimitReached,
    /// The guest's reservation on the target (a placeholder Pod with its memory and
    /// CPU) waits for the scheduler.
    Reserving,
    /// The scheduler has no room on the target for the guest's memory and CPU.
    InsufficientResources,

    // The phases, as the agents report them.
    /// Begin checked the guest can migrate and took the migration lock.
    Locked,
    /// Prepare started the target QEMU; it waits for the stream.
    Listening,
    /// Perform sent the guest's state.
    Transferred,
    /// Perform switched the migration to post-copy: the guest's devices went to the
    /// target, which resumes it in Finish while the rest of its memory follows.
    SwitchedToPostCopy,
    /// Perform saved the guest's state into a file; Confirm stopped the saved guest.
    Saved,
    /// Finish resumed the guest on the target.
    Resumed,
    /// Finish removed the incoming QEMU (rollback).
    IncomingRemoved,
    /// The target took the guest but its QEMU exited before it ran the guest's vCPUs:
    /// it gave the VM back to the source, whose paused copy is whole.
    TargetNeverRan,
    /// The target owns the guest but has not reported it running yet; the source keeps
    /// its paused copy and Confirm runs again.
    AwaitingTarget,
    /// Confirm removed the old guest on the source.
    SourceRemoved,
    /// Confirm resumed the guest on the source (rollback).
    SourceResumed,
    /// The guest's QEMU on the source is gone: it died during the migration.
    GuestDied,
    /// The guest's state was split between two QEMUs and one of them is gone.
    GuestLost,
    /// The guest's definition could not be read or is not supported.
    InvalidDomain,
    /// The target definition changes what the guest sees.
    AbiUnstable,
    /// A cookie was missing, malformed or from the wrong host.
    InvalidCookie,
    /// An input the phase takes from an earlier one is missing.
    MissingInput,
    /// QEMU's QMP failed or refused a command.
    QmpFailed,
    /// QEMU could not be started, found or stopped.
    QemuFailed,
    /// The migration policy cannot be applied here.
    PolicyRefused,
    /// The request is not allowed in the guest's current state.
    Refused,
    /// QEMU reported that the transfer failed.
    TransferFailed,
    /// A limit of the policy was hit and the transfer aborted.
    LimitExceeded,
    /// The guest did not arrive whole on the target.
    NotArrived,
    /// The target could not take ownership of the guest.
    OwnershipFailed,
    /// TLS material for the stream or the peer API is missing or unusable.
    TlsUnavailable,
    /// No free migration port on the target.
    NoPort,
    /// The peer API of the other agent could not be reached or refused the call.
    PeerFailed,
    /// A read or write of the API server failed.
    ApiError,
    /// The agent's record of the migration could not be read or written.
    RecordFailed,
    /// A saved-state file is invalid.
    StateFileInvalid,

    // The migration's course, as the operator decides it.
    /// The guest runs on the target.
    Migrated,
    /// The migration was cancelled.
    Cancelled,
    /// The migration rolled back for a reason no longer known.
    RolledBack,
    /// Begin failed.
    BeginFailed,
    /// Prepare failed.
    PrepareFailed,
    /// Perform failed.
    PerformFailed,
    /// Finish failed.
    FinishFailed,
    /// Confirm failed; it runs again.
    ConfirmFailed,
    /// The agent running a phase stopped heart-beating.
    AgentLost,
    /// A phase ran past its timeout.
    Timeout,

    // Progress conditions.
    /// Pre-copy converges.
    Converging,
    /// Pre-copy does not converge.
    NotConverging,
    /// The post-copy stream is cut; the agents wait for the path.
    WaitingForPath,
    /// The post-copy stream has been cut for longer than the bound.
    RecoveryOverdue,
    /// The post-copy stream was recovered.
    Recovered,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for Reason {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::str::FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

/// A reason Ferry does not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a reason Ferry writes")]
pub struct UnknownReason(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_written_as_its_name_and_read_back() {
        for r in Reason::ALL {
            let json = serde_json::to_value(r).unwrap();
            assert_eq!(json, r.as_str());
            assert_eq!(r.as_str().parse::<Reason>(), Ok(*r));
        }
        assert!("NoSuchReason".parse::<Reason>().is_err());
    }

    #[test]
    fn reasons_are_camel_case_words_within_the_api_limit() {
        for r in Reason::ALL {
            let s = r.as_str();
            assert!(s.len() <= 1024 && s.chars().next().unwrap().is_ascii_uppercase());
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
        }
    }
}
