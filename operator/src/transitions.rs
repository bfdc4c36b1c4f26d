//! The migration state machine: given what the status says and what the operator
//! observes, what happens next. Pure; `reconcile` applies the decision.
//!
//! The table is in docs/protocol.md; the failure paths are the design's:
//! Begin fails → Failed; Prepare fails → Confirm(cancelled); Perform fails →
//! Finish(cancelled) → Confirm(cancelled); Finish fails → Confirm(cancelled); Confirm
//! fails → run again. A phase whose agent stopped heart-beating or that ran past its
//! timeout counts as failed — except after a switch to post-copy (Perform ends there,
//! Finish resumes the guest on the target while its last pages follow, Confirm waits
//! for them): the guest's state is then split between the nodes and the migration only
//! goes forward (a cut stream pauses it until the agents recover it; see
//! [`post_copy_pause`]).

use std::time::Duration;

use ferry_crds::conditions::{POST_COPY_PAUSED, ROLLING_BACK};
use ferry_crds::sequence::{Next, View, after};
use ferry_crds::{
    ControlMode, MigrationMode, MigrationPhase as P, Reason, VirtualMachineMigration,
};
use k8s_openapi::jiff::Timestamp;

use crate::config::Timeouts;

/// What the operator sees besides the migration itself.
#[derive(Debug, Clone)]
pub struct Observation {
    pub now: Timestamp,
    pub source_live: bool,
    pub target_live: bool,
    /// The VM's `status.nodeName` now: who owns the guest.
    pub vm_node: Option<String>,
}

pub use ferry_crds::sequence::{Why, why};

/// The next step for a migration past Pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do until something changes; look again after this long.
    Wait(Duration),
    /// Move to `phase`. `rollback` starts (or explains) a rollback: `cancelled` is then
    /// set.
    Enter {
        phase: P,
        cancelled: bool,
        rollback: Option<Why>,
    },
    /// Perform is running and a cancel was asked for: tell the source to stop.
    RequestCancel,
    /// Confirm failed, [`CONFIRM_RETRY_DELAY`] ago or longer: clear its step so the
    /// source runs it again.
    RetryConfirm(Why),
    /// The migration is over.
    End { phase: P, why: Why },
    /// Peer-to-peer: `phase` ran too long or lost its agent; record it Failed so the
    /// source agent takes the failure path (guarded by the resourceVersion read).
    GiveUp { phase: P, why: Why },
    /// Peer-to-peer: the source agent started a rollback; record why in `RollingBack`.
    NoteRollback(Why),
}

const POLL: Duration = Duration::from_secs(2);

/// How long after a failed Confirm ended it runs again.
pub const CONFIRM_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Decides what comes after the current phase of `m`.
pub fn decide(m: &VirtualMachineMigration, obs: &Observation, timeouts: &Timeouts) -> Decision {
    let status = m.status.clone().unwrap_or_default();
    let Some(phase) = status.phase else {
        return Decision::Wait(POLL);
    };
    if phase.is_terminal() || phase == P::Pending {
        return Decision::Wait(POLL);
    }
    if m.spec.to_file.is_some() {
        return save::decide(m, obs, timeouts);
    }
    let cancel_asked = m.cancel_asked();
    let peer_to_peer = m.spec.mode == ControlMode::PeerToPeer;
    let cancelled = status.cancelled;
    let (source, target) = m.nodes();
    let enter = |phase, cancelled, rollback| Decision::Enter {
        phase,
        cancelled,
        rollback,
    };
    // Once the guest's state started moving in post-copy there is no going back.
    let post_copy = m.in_post_copy();

    if let Some(view) = View::of(m) {
        let Some(next) = after(&view) else {
            return Decision::Wait(POLL);
        };
        if peer_to_peer {
            return peer::after_step(next, || end_after_confirm(m, obs, cancel_asked));
        }
        return match next {
            Next::Enter {
                phase,
                cancelled,
                rollback,
            } => enter(phase, cancelled, rollback),
            Next::End { phase, why } => Decision::End { phase, why },
            Next::Confirmed => end_after_confirm(m, obs, cancel_asked),
            Next::RetryConfirm(why) => retry_confirm(m, obs, why),
        };
    }

    // The phase has not ended. Is its agent still there, and is there time left?
    let (node, live) = if phase.runs_on_source() {
        (source, obs.source_live)
    } else {
        (target, obs.target_live)
    };
    let elapsed = status
        .phase_transition_time
        .as_ref()
        .map(|t| obs.now.duration_since(t.0).unsigned_abs())
        .unwrap_or_default();
    let limit = match phase {
        P::Begin => Some(timeouts.begin),
        P::Prepare => Some(timeouts.prepare),
        P::Perform => Some(timeouts.perform),
        P::Finish => Some(timeouts.finish),
        _ => None,
    };
    let stuck = if !live {
        Some(why(
            Reason::AgentLost,
            format!(
                "the agent on node {node} stopped heart-beating during {phase:?} (Lease {})",
                ferry_crds::node_lease_name(node)
            ),
        ))
    } else {
        limit.filter(|l| elapsed > *l).map(|limit| {
            why(
                Reason::Timeout,
                format!(
                    "{phase:?} on node {node} did not end within {}s",
                    limit.as_secs()
                ),
            )
        })
    };
    let Some(stuck) = stuck else {
        if phase == P::Perform && cancel_asked && !cancelled && !post_copy {
            return Decision::RequestCancel;
        }
        if peer_to_peer && let Some(why) = peer::rollback_to_note(&status, cancel_asked) {
            return Decision::NoteRollback(why);
        }
        let left = limit.map(|l| l.saturating_sub(elapsed)).unwrap_or(POLL);
        return Decision::Wait(left.min(POLL).max(Duration::from_millis(200)));
    };
    if matches!(phase, P::Perform | P::Finish) && post_copy && !cancelled {
        // A rollback would kill the target QEMU, which holds part of the guest's memory,
        // and the source QEMU cannot resume it: wait for the agent (its QEMU outlives a
        // lost agent, and a restarted one follows the migration) or for the path.
        return Decision::Wait(POLL);
    }
    if peer_to_peer {
        return peer::stuck(phase, stuck);
    }
    match phase {
        P::Begin => Decision::End {
            phase: P::Failed,
            why: stuck,
        },
        // The target may have started a QEMU; its agent removes it when it comes back
        // and finds the migration moved on.
        P::Prepare => enter(P::Confirm, true, Some(stuck)),
        P::Perform => enter(P::Finish, true, Some(stuck)),
        // Ownership is the commit point: once the VM names the target, the guest is
        // the target's and only going forward keeps one guest running.
        P::Finish if obs.vm_node.as_deref() == Some(target) => enter(P::Confirm, false, None),
        P::Finish => enter(P::Confirm, true, Some(stuck)),
        // Confirm has no timeout: the guest is safe where it is; wait for the source.
        _ => Decision::Wait(POLL),
    }
}

/// The `PostCopyPaused` condition a migration should carry now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// True while paused; False once recovered.
    pub paused: bool,
    /// `WaitingForPath`, `RecoveryOverdue` (paused longer than the bound) or `Recovered`.
    pub reason: Reason,
    pub message: String,
}

/// What the `PostCopyPaused` condition of `m` should say at `now`, when it should change
/// (`None`: leave it). Paused means the source reports `progress.mode: PostCopyPaused`:
/// its stream was cut after the switch to post-copy. The pause counts from the
/// condition's last transition; past `bound` the reason becomes `RecoveryOverdue`, but
/// the migration still waits (nothing here ends it: every end but a recovery loses the
/// guest).
pub fn post_copy_pause(
    m: &VirtualMachineMigration,
    now: Timestamp,
    bound: Duration,
) -> Option<Pause> {
    let status = m.status.as_ref()?;
    let current = status
        .conditions
        .iter()
        .find(|c| c.type_ == POST_COPY_PAUSED);
    let was_paused = current.is_some_and(|c| c.status == "True");
    let paused = m.stream_runs()
        && status.progress.as_ref().and_then(|p| p.mode) == Some(MigrationMode::PostCopyPaused);
    let source = status.source_node.as_deref().unwrap_or_default();
    let target = status.target_node.as_deref().unwrap_or_default();
    let wanted = if paused {
        let since = current
            .filter(|_| was_paused)
            .map(|c| now.duration_since(c.last_transition_time.0).unsigned_abs())
            .unwrap_or_default();
        if since > bound {
            Pause {
                paused: true,
                reason: Reason::RecoveryOverdue,
                message: format!(
                    "the post-copy stream from {source} to {target} has been cut for more than {} s; the migration keeps waiting for the path: the guest's memory is split between the two QEMUs, and ending the migration would lose it",
                    bound.as_secs()
                ),
            }
        } else {
            Pause {
                paused: true,
                reason: Reason::WaitingForPath,
                message: format!(
                    "the post-copy stream from {source} to {target} was cut; both QEMUs wait, and the agents resume the migration when the path is back"
                ),
            }
        }
    } else if was_paused {
        Pause {
            paused: false,
            reason: Reason::Recovered,
            message: "the post-copy stream was recovered".into(),
        }
    } else {
        return None;
    };
    let same = current.is_some_and(|c| {
        (c.status == "True") == wanted.paused && c.reason == wanted.reason.as_str()
    });
    (!same).then_some(wanted)
}

/// Confirm failed: it runs again once its step ended [`CONFIRM_RETRY_DELAY`] ago (the
/// operator's clock against the agent's `end`); until then the operator waits, so no
/// reconcile sleeps. A step without an end runs again at once.
fn retry_confirm(m: &VirtualMachineMigration, obs: &Observation, why: Why) -> Decision {
    let Some(end) = m.step(P::Confirm).and_then(|s| s.end.as_ref()) else {
        return Decision::RetryConfirm(why);
    };
    // An end ahead of the operator's clock counts as just now.
    let since = Duration::try_from(obs.now.duration_since(end.0)).unwrap_or_default();
    match CONFIRM_RETRY_DELAY.checked_sub(since) {
        Some(left) if !left.is_zero() => Decision::Wait(left),
        _ => Decision::RetryConfirm(why),
    }
}

fn end_after_confirm(
    m: &VirtualMachineMigration,
    obs: &Observation,
    cancel_asked: bool,
) -> Decision {
    let status = m.status.clone().unwrap_or_default();
    let target = status.target_node.clone().unwrap_or_default();
    // The source's Confirm found no guest to keep: it says where and why.
    if let Some(step) = m.step(P::Confirm)
        && let Some(reason @ (Reason::GuestLost | Reason::GuestDied)) = step.reason
    {
        return Decision::End {
            phase: P::Failed,
            why: why(reason, step.message.clone().unwrap_or_default()),
        };
    }
    if !status.cancelled || obs.vm_node.as_deref() == Some(target.as_str()) {
        let message = if cancel_asked {
            format!("the guest runs on {target}; the cancel came after the hand-over")
        } else {
            format!("the guest runs on {target}")
        };
        return Decision::End {
            phase: P::Succeeded,
            why: why(Reason::Migrated, message),
        };
    }
    let source = status.source_node.clone().unwrap_or_default();
    rolled_back(&status, cancel_asked, &source, "the migration rolled back")
}

/// The end of a rollback: Cancelled when a cancel was asked, else Failed with the reason
/// of the `RollingBack` condition (`otherwise` when there is none); the message says the
/// guest runs on `source`.
fn rolled_back(
    status: &ferry_crds::VirtualMachineMigrationStatus,
    cancel_asked: bool,
    source: &str,
    otherwise: &str,
) -> Decision {
    let (reason, message) = status
        .conditions
        .iter()
        .find(|c| c.type_ == ROLLING_BACK)
        // Only this module writes RollingBack, always with one of its reasons.
        .map(|c| {
            (
                c.reason.parse().unwrap_or(Reason::RolledBack),
                c.message.clone(),
            )
        })
        .unwrap_or_else(|| (Reason::RolledBack, otherwise.into()));
    let message = format!("{message}; the guest runs on {source}");
    if cancel_asked {
        Decision::End {
            phase: P::Cancelled,
            why: why(Reason::Cancelled, message),
        }
    } else {
        Decision::End {
            phase: P::Failed,
            why: Why { reason, message },
        }
    }
}

mod peer;
mod save;
#[cfg(test)]
mod tests;
