//! Who drives a migration's phases, and the order they follow.
//!
//! The phase sequence is one pure function, [`after`], shared by the two drivers: the
//! operator (mode `Managed`: it sets `status.phase` and each agent runs the phase named
//! for it) and the source agent (mode `PeerToPeer`: it runs Begin, Perform and Confirm
//! itself and calls the target agent for Prepare and Finish). Both therefore take the
//! same failure paths (docs/protocol.md, "Transitions").

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{MigrationPhase as P, StepOutcome};

/// Who drives the phases of a migration.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ControlMode {
    /// The operator sets each phase in `status.phase`; the agent named for it runs it
    /// and hands its cookie on through the status.
    #[default]
    Managed,
    /// libvirt's peer-to-peer sequence: the source agent runs Begin, Perform and Confirm
    /// itself and calls the target agent's API (mutual TLS with the nodes' migration
    /// certificates) for Prepare and Finish, handing the cookies over directly. It
    /// still records every step and cookie in the status; the operator only admits the
    /// migration, watches it and times it out.
    PeerToPeer,
}

/// The five phases of the protocol, in order.
pub const PHASES: [P; 5] = [P::Begin, P::Prepare, P::Perform, P::Finish, P::Confirm];

/// The annotation on an agent's heartbeat Lease naming where its peer API listens
/// (`<ip>:<port>`). The Lease admission policy lets only that node's agent write it,
/// and a caller checks the certificate the endpoint shows names the node anyway.
pub const PEER_ENDPOINT_ANNOTATION: &str = "ferry.dev/peer-endpoint";

/// Why a migration rolls back or ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Why {
    pub reason: &'static str,
    pub message: String,
}

/// A [`Why`].
pub fn why(reason: &'static str, message: impl Into<String>) -> Why {
    Why {
        reason,
        message: message.into(),
    }
}

/// What follows a phase that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run `phase`; `rollback` says why a rollback starts (`cancelled` is then true).
    Enter {
        phase: P,
        cancelled: bool,
        rollback: Option<Why>,
    },
    /// The migration ends here, in `phase` (Begin failed, or a cancel came before the
    /// transfer started): nothing was started on the target.
    End { phase: P, why: Why },
    /// Confirm succeeded: the migration is over; where the guest runs says how.
    Confirmed,
    /// Confirm failed: run it again (the old QEMU must go, or the guest resume).
    RetryConfirm(Why),
}

/// What follows `phase`, which ended with `outcome` (`message` its step message).
/// `cancel_asked`: `spec.cancel` or a deletion; `cancelled`: the status's rollback flag;
/// `post_copy`: the transfer switched to post-copy (after which nothing rolls back).
pub fn after(
    phase: P,
    outcome: StepOutcome,
    message: &str,
    cancel_asked: bool,
    cancelled: bool,
    post_copy: bool,
) -> Option<Next> {
    let failed = outcome == StepOutcome::Failed;
    let enter = |phase, cancelled, rollback| Next::Enter {
        phase,
        cancelled,
        rollback,
    };
    let cancel_why = || why("Cancelled", "the migration was cancelled");
    Some(match (phase, failed) {
        (P::Begin, false) if cancel_asked => Next::End {
            phase: P::Cancelled,
            why: why("Cancelled", "cancelled before the transfer started"),
        },
        (P::Begin, false) => enter(P::Prepare, false, None),
        (P::Begin, true) => Next::End {
            phase: P::Failed,
            why: why("BeginFailed", message),
        },
        (P::Prepare, false) if cancel_asked || cancelled => {
            enter(P::Finish, true, Some(cancel_why()))
        }
        (P::Prepare, false) => enter(P::Perform, false, None),
        (P::Prepare, true) => enter(P::Confirm, true, Some(why("PrepareFailed", message))),
        (P::Perform, false) if (cancel_asked || cancelled) && !post_copy => {
            enter(P::Finish, true, Some(cancel_why()))
        }
        (P::Perform, false) => enter(P::Finish, false, None),
        (P::Perform, true) if cancel_asked => enter(P::Finish, true, Some(cancel_why())),
        (P::Perform, true) => enter(P::Finish, true, Some(why("PerformFailed", message))),
        (P::Finish, false) => enter(P::Confirm, cancelled, None),
        (P::Finish, true) => enter(P::Confirm, true, Some(why("FinishFailed", message))),
        (P::Confirm, false) => Next::Confirmed,
        (P::Confirm, true) => Next::RetryConfirm(why("ConfirmFailed", message)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepOutcome::{Failed, Succeeded};

    fn next(phase: P, outcome: StepOutcome) -> Next {
        after(phase, outcome, "m", false, false, false).unwrap()
    }

    fn entered(n: Next) -> (P, bool) {
        match n {
            Next::Enter {
                phase, cancelled, ..
            } => (phase, cancelled),
            other => panic!("expected Enter, got {other:?}"),
        }
    }

    #[test]
    fn the_happy_path_runs_the_five_phases_in_order() {
        assert_eq!(entered(next(P::Begin, Succeeded)), (P::Prepare, false));
        assert_eq!(entered(next(P::Prepare, Succeeded)), (P::Perform, false));
        assert_eq!(entered(next(P::Perform, Succeeded)), (P::Finish, false));
        assert_eq!(entered(next(P::Finish, Succeeded)), (P::Confirm, false));
        assert_eq!(next(P::Confirm, Succeeded), Next::Confirmed);
    }

    #[test]
    fn the_failure_paths_are_the_designs() {
        assert!(matches!(
            next(P::Begin, Failed),
            Next::End {
                phase: P::Failed,
                ..
            }
        ));
        assert_eq!(entered(next(P::Prepare, Failed)), (P::Confirm, true));
        assert_eq!(entered(next(P::Perform, Failed)), (P::Finish, true));
        assert_eq!(entered(next(P::Finish, Failed)), (P::Confirm, true));
        assert!(matches!(next(P::Confirm, Failed), Next::RetryConfirm(_)));
        // A rollback keeps its flag through Finish.
        let n = after(P::Finish, Succeeded, "m", false, true, false).unwrap();
        assert_eq!(entered(n), (P::Confirm, true));
    }

    #[test]
    fn a_cancel_rolls_back_until_post_copy() {
        let n = after(P::Begin, Succeeded, "m", true, false, false).unwrap();
        assert!(matches!(
            n,
            Next::End {
                phase: P::Cancelled,
                ..
            }
        ));
        let n = after(P::Prepare, Succeeded, "m", true, false, false).unwrap();
        assert_eq!(entered(n), (P::Finish, true));
        let n = after(P::Perform, Succeeded, "m", true, false, false).unwrap();
        assert_eq!(entered(n), (P::Finish, true));
        // After the switch to post-copy the guest arrived: it goes forward.
        let n = after(P::Perform, Succeeded, "m", true, true, true).unwrap();
        assert_eq!(entered(n), (P::Finish, false));
    }

    #[test]
    fn only_the_five_phases_have_a_next() {
        for p in [P::Pending, P::Succeeded, P::Failed, P::Cancelled] {
            assert_eq!(after(p, Succeeded, "m", false, false, false), None);
        }
    }
}
