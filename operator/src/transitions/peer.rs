//! The operator's part in a peer-to-peer migration (`spec.mode: PeerToPeer`): the
//! source agent drives the phases; the operator only admitted it, watches it and times
//! it out. Pure, like the rest of `transitions`.
//!
//! - A phase ended: the source agent moves on by itself. The operator acts only on the
//!   ends (Begin failed or cancelled before the transfer; Confirm done).
//! - A phase runs too long, or its agent stopped heart-beating: the operator gives up
//!   on it by writing it Failed (guarded by the resourceVersion it read, so a result
//!   the agent wrote meanwhile wins); the source agent then takes the same failure path
//!   a managed migration takes. Begin ends the migration Failed at once, as in managed
//!   mode. A post-copy Perform is never given up on.
//! - The source agent set `status.cancelled`: the operator records why in the
//!   `RollingBack` condition, from the step that failed.

use ferry_crds::conditions::ROLLING_BACK;
use ferry_crds::sequence::{Next, Why, why};
use ferry_crds::{MigrationPhase as P, Reason, StepOutcome, VirtualMachineMigrationStatus};

use super::{Decision, POLL};

/// What the operator does after a step of a peer-to-peer migration ended.
pub(super) fn after_step(next: Next, confirmed: impl FnOnce() -> Decision) -> Decision {
    match next {
        Next::End { phase, why } => Decision::End { phase, why },
        Next::Confirmed => confirmed(),
        // The source agent enters the next phase, or runs Confirm again, itself.
        Next::Enter { .. } | Next::RetryConfirm(_) => Decision::Wait(POLL),
    }
}

/// What the operator does when `phase` is stuck (`stuck` says why).
pub(super) fn stuck(phase: P, stuck: Why) -> Decision {
    match phase {
        P::Begin => Decision::End {
            phase: P::Failed,
            why: stuck,
        },
        P::Prepare | P::Perform | P::Finish => Decision::GiveUp { phase, why: stuck },
        // Confirm has no timeout: the guest is safe where it is; wait for the source.
        _ => Decision::Wait(POLL),
    }
}

/// Why a peer-to-peer migration rolls back, when the source agent started a rollback
/// (`status.cancelled`) and no `RollingBack` condition says so yet.
pub(super) fn rollback_to_note(
    status: &VirtualMachineMigrationStatus,
    cancel_asked: bool,
) -> Option<Why> {
    let noted = status.conditions.iter().any(|c| c.type_ == ROLLING_BACK);
    if !status.cancelled || noted {
        return None;
    }
    let steps = status.steps.clone().unwrap_or_default();
    let failed = [
        (P::Prepare, Reason::PrepareFailed),
        (P::Perform, Reason::PerformFailed),
        (P::Finish, Reason::FinishFailed),
    ]
    .into_iter()
    .find_map(|(phase, reason)| {
        let step = steps.get(phase)?;
        (step.outcome == Some(StepOutcome::Failed)).then(|| {
            why(
                reason,
                step.message.clone().unwrap_or_else(|| "no message".into()),
            )
        })
    });
    Some(match failed {
        _ if cancel_asked => why(Reason::Cancelled, "the migration was cancelled"),
        Some(w) => w,
        None => why(Reason::RolledBack, "the source agent started a rollback"),
    })
}
