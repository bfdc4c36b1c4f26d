//! The state machine of a migration to a file (`spec.toFile`): the source alone runs
//! Begin (checks, lock) → Perform (the save) → Confirm (stops the guest once saved, or
//! resumes it after a failure or cancel); there is no target, Prepare or Finish.
//!
//! | phase | outcome | next |
//! | --- | --- | --- |
//! | Begin | Succeeded | Perform (or Cancelled, when a cancel was asked) |
//! | Begin | Failed, agent lost, timeout | Failed |
//! | Perform | Succeeded | Confirm (the file is in place: a late cancel no longer applies) |
//! | Perform | Failed, agent lost, timeout, cancelled | Confirm with `cancelled` |
//! | Confirm | Succeeded | Succeeded (`Saved`), or Failed / Cancelled when `cancelled` |
//! | Confirm | Failed | run again, 2 s after it ended |

use super::{Decision, Observation, POLL, retry_confirm, rolled_back, why};
use crate::config::Timeouts;
use ferry_crds::sequence::{Next, View, after};
use ferry_crds::{MigrationPhase as P, Reason, VirtualMachineMigration};
use std::time::Duration;

pub(super) fn decide(m: &VirtualMachineMigration, obs: &Observation, t: &Timeouts) -> Decision {
    let status = m.status.clone().unwrap_or_default();
    let Some(phase) = status.phase else {
        return Decision::Wait(POLL);
    };
    let cancel_asked = m.cancel_asked();
    let source = m.nodes().0.to_string();
    let path = m
        .spec
        .to_file
        .as_ref()
        .map(|f| f.path.clone())
        .unwrap_or_default();
    let enter = |phase, cancelled, rollback| Decision::Enter {
        phase,
        cancelled,
        rollback,
    };
    // The table is the one in `ferry_crds::sequence` (`View::to_file`).
    if let Some(view) = View::of(m) {
        return match after(&view) {
            Some(Next::Enter {
                phase,
                cancelled,
                rollback,
            }) => enter(phase, cancelled, rollback),
            Some(Next::End { phase, why }) => Decision::End { phase, why },
            Some(Next::Confirmed) => end(m, cancel_asked, &source, &path),
            Some(Next::RetryConfirm(why)) => retry_confirm(m, obs, why),
            None => Decision::Wait(POLL),
        };
    }
    let elapsed = status
        .phase_transition_time
        .map(|tt| obs.now.duration_since(tt.0).unsigned_abs())
        .unwrap_or_default();
    let limit = match phase {
        P::Begin => Some(t.begin),
        P::Perform => Some(t.perform),
        _ => None,
    };
    let stuck = if !obs.source_live {
        Some(why(
            Reason::AgentLost,
            format!(
                "the agent on node {source} stopped heart-beating during {phase:?} (Lease {})",
                ferry_crds::node_lease_name(&source)
            ),
        ))
    } else {
        limit.filter(|l| elapsed > *l).map(|limit| {
            why(
                Reason::Timeout,
                format!(
                    "{phase:?} on node {source} did not end within {}s",
                    limit.as_secs()
                ),
            )
        })
    };
    let Some(stuck) = stuck else {
        if phase == P::Perform && cancel_asked && !status.cancelled {
            return Decision::RequestCancel;
        }
        let left = limit.map(|l| l.saturating_sub(elapsed)).unwrap_or(POLL);
        return Decision::Wait(left.min(POLL).max(Duration::from_millis(200)));
    };
    match phase {
        P::Begin => Decision::End {
            phase: P::Failed,
            why: stuck,
        },
        P::Perform => enter(P::Confirm, true, Some(stuck)),
        // Confirm has no timeout: the guest is paused or stopped on the source; wait.
        _ => Decision::Wait(POLL),
    }
}

fn end(m: &VirtualMachineMigration, cancel_asked: bool, source: &str, path: &str) -> Decision {
    let status = m.status.clone().unwrap_or_default();
    if !status.cancelled {
        let late = if cancel_asked {
            "; the cancel came after the state was saved"
        } else {
            ""
        };
        return Decision::End {
            phase: P::Succeeded,
            why: why(
                Reason::Saved,
                format!(
                    "the guest's state is saved in {path} on {source}; the guest is stopped{late}"
                ),
            ),
        };
    }
    rolled_back(&status, cancel_asked, source, "the save rolled back")
}

#[cfg(test)]
mod tests {
    use super::super::{Decision, decide};
    use super::*;
    use ferry_crds::StepOutcome;
    use ferry_crds::StepOutcome::{Failed as F, Succeeded as S};
    use ferry_crds::{Condition, Step, Steps, VirtualMachineMigrationSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    fn obs(secs: i64) -> Observation {
        Observation {
            now: at(secs).0,
            source_live: true,
            target_live: true,
            vm_node: Some("node-a".into()),
        }
    }

    const T: Timeouts = Timeouts {
        begin: Duration::from_secs(60),
        prepare: Duration::from_secs(60),
        perform: Duration::from_secs(600),
        finish: Duration::from_secs(60),
        post_copy_paused: Duration::from_secs(600),
    };

    fn save(phase: P, cancelled: bool, outcome: Option<StepOutcome>) -> VirtualMachineMigration {
        let spec: VirtualMachineMigrationSpec = serde_json::from_value(serde_json::json!({
            "vmName": "demo",
            "toFile": {"path": "/var/lib/ferry/saves/demo.fsav", "compression": "Zstd"}
        }))
        .unwrap();
        let mut m = VirtualMachineMigration::new("save", spec);
        let step = Step {
            node: "node-a".into(),
            start: MicroTime(at(0).0),
            end: outcome.map(|_| MicroTime(at(1).0)),
            outcome,
            reason: None,
            message: Some("disk full".into()),
        };
        let mut steps = Steps::default();
        match phase {
            P::Begin => steps.begin = Some(step),
            P::Perform => steps.perform = Some(step),
            P::Confirm => steps.confirm = Some(step),
            P::Prepare => steps.prepare = Some(step),
            _ => {}
        }
        m.status = Some(ferry_crds::VirtualMachineMigrationStatus {
            phase: Some(phase),
            phase_transition_time: Some(at(0)),
            cancelled,
            source_node: Some("node-a".into()),
            steps: Some(steps),
            ..Default::default()
        });
        m
    }

    fn entered(d: Decision) -> (P, bool, Option<&'static str>) {
        match d {
            Decision::Enter {
                phase,
                cancelled,
                rollback,
            } => (phase, cancelled, rollback.map(|w| w.reason.as_str())),
            other => panic!("expected a phase change, got {other:?}"),
        }
    }

    fn ended(d: Decision) -> (P, &'static str, String) {
        match d {
            Decision::End { phase, why } => (phase, why.reason.as_str(), why.message),
            other => panic!("expected the end, got {other:?}"),
        }
    }

    #[test]
    fn a_save_runs_begin_perform_confirm_on_the_source_only() {
        let o = obs(1);
        assert_eq!(
            entered(decide(&save(P::Begin, false, Some(S)), &o, &T)),
            (P::Perform, false, None)
        );
        assert_eq!(
            entered(decide(&save(P::Perform, false, Some(S)), &o, &T)),
            (P::Confirm, false, None)
        );
        let (phase, reason, message) = ended(decide(&save(P::Confirm, false, Some(S)), &o, &T));
        assert_eq!((phase, reason), (P::Succeeded, "Saved"));
        assert_eq!(
            message,
            "the guest's state is saved in /var/lib/ferry/saves/demo.fsav on node-a; the guest is stopped"
        );
        // No target is needed: a dead "target" changes nothing.
        let mut o = obs(1);
        o.target_live = false;
        assert!(matches!(
            decide(&save(P::Perform, false, None), &o, &T),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn a_failed_save_rolls_back_on_the_source() {
        let o = obs(1);
        let (phase, reason, message) = ended(decide(&save(P::Begin, false, Some(F)), &o, &T));
        assert_eq!(
            (phase, reason, message.as_str()),
            (P::Failed, "BeginFailed", "disk full")
        );
        assert_eq!(
            entered(decide(&save(P::Perform, false, Some(F)), &o, &T)),
            (P::Confirm, true, Some("PerformFailed"))
        );
        // Its step ended at 1: it runs again from 3 on.
        assert_eq!(
            decide(&save(P::Confirm, false, Some(F)), &o, &T),
            Decision::Wait(super::super::CONFIRM_RETRY_DELAY)
        );
        assert!(matches!(
            decide(&save(P::Confirm, false, Some(F)), &obs(3), &T),
            Decision::RetryConfirm(_)
        ));
        let mut done = save(P::Confirm, true, Some(S));
        done.status.as_mut().unwrap().conditions.push(Condition {
            type_: ferry_crds::conditions::ROLLING_BACK.into(),
            status: "True".into(),
            reason: "PerformFailed".into(),
            message: "no space left".into(),
            observed_generation: None,
            last_transition_time: at(0),
        });
        let (phase, reason, message) = ended(decide(&done, &o, &T));
        assert_eq!((phase, reason), (P::Failed, "PerformFailed"));
        assert_eq!(message, "no space left; the guest runs on node-a");
        // A Prepare step in a save is refused by undoing on the source.
        assert_eq!(
            entered(decide(&save(P::Prepare, false, Some(S)), &o, &T)),
            (P::Confirm, true, Some("Invalid"))
        );
    }

    #[test]
    fn cancel_lost_agent_and_timeout() {
        let mut m = save(P::Perform, false, None);
        m.spec.cancel = true;
        assert_eq!(decide(&m, &obs(1), &T), Decision::RequestCancel);
        let mut m = save(P::Perform, true, Some(F));
        m.spec.cancel = true;
        assert_eq!(
            entered(decide(&m, &obs(1), &T)),
            (P::Confirm, true, Some("Cancelled"))
        );
        let mut m = save(P::Confirm, true, Some(S));
        m.spec.cancel = true;
        assert_eq!(ended(decide(&m, &obs(1), &T)).0, P::Cancelled);
        // After the file is in place a cancel no longer undoes the save.
        for cancelled in [false, true] {
            let mut m = save(P::Perform, cancelled, Some(S));
            m.spec.cancel = true;
            assert_eq!(entered(decide(&m, &obs(1), &T)), (P::Confirm, false, None));
        }
        let mut m = save(P::Confirm, false, Some(S));
        m.spec.cancel = true;
        let (phase, _, message) = ended(decide(&m, &obs(1), &T));
        assert_eq!(phase, P::Succeeded);
        assert!(
            message.ends_with("the cancel came after the state was saved"),
            "{message}"
        );
        let mut m = save(P::Begin, false, Some(S));
        m.spec.cancel = true;
        assert_eq!(ended(decide(&m, &obs(1), &T)).0, P::Cancelled);

        let mut o = obs(1);
        o.source_live = false;
        assert_eq!(
            entered(decide(&save(P::Perform, false, None), &o, &T)),
            (P::Confirm, true, Some("AgentLost"))
        );
        assert_eq!(
            ended(decide(&save(P::Begin, false, None), &o, &T)).1,
            "AgentLost"
        );
        assert!(matches!(
            decide(&save(P::Confirm, true, None), &o, &T),
            Decision::Wait(_)
        ));
        assert_eq!(
            entered(decide(&save(P::Perform, false, None), &obs(601), &T)),
            (P::Confirm, true, Some("Timeout"))
        );
    }
}
