//! Who drives a migration's phases, and the order they follow.
//!
//! The phase sequence is one pure function, [`after`], shared by the two drivers: the
//! operator (mode `Managed`: it sets `status.phase` and each agent runs the phase named
//! for it) and the source agent (mode `PeerToPeer`: it runs Begin, Perform and Confirm
//! itself and calls the target agent for Prepare and Finish). Both therefore take the
//! same failure paths (docs/protocol.md, "Transitions").

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{MigrationPhase as P, Reason, StepOutcome, VirtualMachineMigration};

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
/// The annotation on an agent's heartbeat Lease naming its node's QEMU version.
pub const QEMU_VERSION_ANNOTATION: &str = "ferry.dev/qemu-version";
/// The annotation on an agent's heartbeat Lease listing the migration capabilities its
/// node's QEMU offers (`query-migrate-capabilities`), comma-separated.
pub const MIGRATION_CAPABILITIES_ANNOTATION: &str = "ferry.dev/migration-capabilities";

/// Why a migration rolls back or ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Why {
    pub reason: Reason,
    pub message: String,
}

/// A [`Why`].
pub fn why(reason: Reason, message: impl Into<String>) -> Why {
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

/// What [`after`] looks at: a migration whose current phase has an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View<'a> {
    /// The phase that ended.
    pub phase: P,
    pub outcome: StepOutcome,
    /// The step's message.
    pub message: &'a str,
    /// `spec.cancel` or a deletion.
    pub cancel_asked: bool,
    /// The status's rollback flag.
    pub cancelled: bool,
    /// The transfer switched to post-copy (after which nothing rolls back).
    pub post_copy: bool,
    /// A migration to a file: the source alone runs Begin, Perform and Confirm.
    pub to_file: bool,
}

impl<'a> View<'a> {
    /// `m` as [`after`] sees it; `None` while its current phase has no outcome.
    pub fn of(m: &'a VirtualMachineMigration) -> Option<View<'a>> {
        let phase = m.phase()?;
        let step = m.step(phase)?;
        Some(View {
            phase,
            outcome: step.outcome?,
            message: step.message.as_deref().unwrap_or("no message"),
            cancel_asked: m.cancel_asked(),
            cancelled: m.rolling_back(),
            post_copy: m.in_post_copy(),
            to_file: m.spec.to_file.is_some(),
        })
    }
}

/// What follows the phase `view` says ended; `None` for Pending and the terminal
/// phases. The tables are docs/protocol.md's ("Transitions", and "Migration to a
/// file" for `to_file`).
pub fn after(view: &View<'_>) -> Option<Next> {
    if view.to_file {
        return after_save(view);
    }
    let View {
        phase,
        message,
        cancel_asked,
        cancelled,
        post_copy,
        ..
    } = *view;
    let failed = view.outcome == StepOutcome::Failed;
    let enter = |phase, cancelled, rollback| Next::Enter {
        phase,
        cancelled,
        rollback,
    };
    let cancel_why = || why(Reason::Cancelled, "the migration was cancelled");
    Some(match (phase, failed) {
        (P::Begin, false) if cancel_asked => Next::End {
            phase: P::Cancelled,
            why: why(Reason::Cancelled, "cancelled before the transfer started"),
        },
        (P::Begin, false) => enter(P::Prepare, false, None),
        (P::Begin, true) => Next::End {
            phase: P::Failed,
            why: why(Reason::BeginFailed, message),
        },
        (P::Prepare, false) if cancel_asked || cancelled => {
            enter(P::Finish, true, Some(cancel_why()))
        }
        (P::Prepare, false) => enter(P::Perform, false, None),
        (P::Prepare, true) => enter(P::Confirm, true, Some(why(Reason::PrepareFailed, message))),
        (P::Perform, false) if (cancel_asked || cancelled) && !post_copy => {
            enter(P::Finish, true, Some(cancel_why()))
        }
        (P::Perform, false) => enter(P::Finish, false, None),
        (P::Perform, true) if cancel_asked => enter(P::Finish, true, Some(cancel_why())),
        (P::Perform, true) => enter(P::Finish, true, Some(why(Reason::PerformFailed, message))),
        (P::Finish, false) => enter(P::Confirm, cancelled, None),
        (P::Finish, true) => enter(P::Confirm, true, Some(why(Reason::FinishFailed, message))),
        (P::Confirm, false) => Next::Confirmed,
        (P::Confirm, true) => Next::RetryConfirm(why(Reason::ConfirmFailed, message)),
        _ => return None,
    })
}

/// The table of a migration to a file: Begin (checks, lock) → Perform (the save) →
/// Confirm (stops the guest once saved, or resumes it after a failure or cancel).
fn after_save(view: &View<'_>) -> Option<Next> {
    let failed = view.outcome == StepOutcome::Failed;
    let enter = |phase, cancelled, rollback| Next::Enter {
        phase,
        cancelled,
        rollback,
    };
    let message = view.message;
    Some(match (view.phase, failed) {
        (P::Begin, false) if view.cancel_asked => Next::End {
            phase: P::Cancelled,
            why: why(Reason::Cancelled, "cancelled before the save started"),
        },
        (P::Begin, false) => enter(P::Perform, false, None),
        (P::Begin, true) => Next::End {
            phase: P::Failed,
            why: why(Reason::BeginFailed, message),
        },
        // The file is in place: a cancel that did not stop the save comes too late.
        (P::Perform, false) => enter(P::Confirm, false, None),
        (P::Perform, true) => {
            let rollback = if view.cancel_asked {
                why(Reason::Cancelled, "the save was cancelled")
            } else {
                why(Reason::PerformFailed, message)
            };
            enter(P::Confirm, true, Some(rollback))
        }
        (P::Confirm, false) => Next::Confirmed,
        (P::Confirm, true) => Next::RetryConfirm(why(Reason::ConfirmFailed, message)),
        // A save has no target phases; should one ever be entered, undo on the source.
        (other @ (P::Prepare | P::Finish), _) => enter(
            P::Confirm,
            true,
            Some(why(
                Reason::Invalid,
                format!("a migration to a file has no {other:?} phase"),
            )),
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepOutcome::{Failed, Succeeded};

    fn view(phase: P, outcome: StepOutcome) -> View<'static> {
        View {
            phase,
            outcome,
            message: "m",
            cancel_asked: false,
            cancelled: false,
            post_copy: false,
            to_file: false,
        }
    }

    fn next(phase: P, outcome: StepOutcome) -> Next {
        after(&view(phase, outcome)).unwrap()
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
        let n = after(&View {
            cancelled: true,
            ..view(P::Finish, Succeeded)
        });
        assert_eq!(entered(n.unwrap()), (P::Confirm, true));
    }

    #[test]
    fn a_cancel_rolls_back_until_post_copy() {
        let cancel = |phase| View {
            cancel_asked: true,
            ..view(phase, Succeeded)
        };
        assert!(matches!(
            after(&cancel(P::Begin)).unwrap(),
            Next::End {
                phase: P::Cancelled,
                ..
            }
        ));
        assert_eq!(
            entered(after(&cancel(P::Prepare)).unwrap()),
            (P::Finish, true)
        );
        assert_eq!(
            entered(after(&cancel(P::Perform)).unwrap()),
            (P::Finish, true)
        );
        // After the switch to post-copy the guest arrived: it goes forward.
        let n = after(&View {
            cancelled: true,
            post_copy: true,
            ..cancel(P::Perform)
        });
        assert_eq!(entered(n.unwrap()), (P::Finish, false));
    }

    #[test]
    fn only_the_five_phases_have_a_next() {
        for p in [P::Pending, P::Succeeded, P::Failed, P::Cancelled] {
            assert_eq!(after(&view(p, Succeeded)), None);
            let save = View {
                to_file: true,
                ..view(p, Succeeded)
            };
            assert_eq!(after(&save), None);
        }
    }

    #[test]
    fn a_save_runs_begin_perform_confirm_on_the_source() {
        let save = |phase, outcome| View {
            to_file: true,
            ..view(phase, outcome)
        };
        assert_eq!(
            entered(after(&save(P::Begin, Succeeded)).unwrap()),
            (P::Perform, false)
        );
        assert_eq!(
            entered(after(&save(P::Perform, Succeeded)).unwrap()),
            (P::Confirm, false)
        );
        assert_eq!(
            entered(after(&save(P::Perform, Failed)).unwrap()),
            (P::Confirm, true)
        );
        assert_eq!(after(&save(P::Confirm, Succeeded)), Some(Next::Confirmed));
        // A late cancel does not undo a save that is in place.
        let late = View {
            cancel_asked: true,
            ..save(P::Perform, Succeeded)
        };
        assert_eq!(entered(after(&late).unwrap()), (P::Confirm, false));
        // Phases a save does not have undo on the source.
        let n = after(&save(P::Finish, Succeeded)).unwrap();
        assert!(matches!(
            n,
            Next::Enter {
                phase: P::Confirm,
                cancelled: true,
                rollback: Some(Why {
                    reason: Reason::Invalid,
                    ..
                })
            }
        ));
    }

    #[test]
    fn the_view_is_read_from_the_migration() {
        let m: VirtualMachineMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferry.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": "m", "namespace": "default"},
            "spec": {"vmName": "demo", "cancel": true},
            "status": {"phase": "Perform", "cancelled": true,
                "progress": {"mode": "PostCopy"},
                "steps": {"perform": {"node": "a", "start": "2026-01-01T00:00:00.000000Z",
                    "outcome": "Failed", "message": "cut"}}},
        }))
        .unwrap();
        let v = View::of(&m).unwrap();
        assert_eq!((v.phase, v.outcome, v.message), (P::Perform, Failed, "cut"));
        assert!(v.cancel_asked && v.cancelled && v.post_copy && !v.to_file);
    }
}
