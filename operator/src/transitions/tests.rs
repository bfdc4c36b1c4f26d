use super::*;
use ferry_crds::Reason;
use ferry_crds::conditions::{POST_COPY_PAUSED, ROLLING_BACK};
use ferry_crds::{
    Condition, Step, StepOutcome, Steps, VirtualMachineMigrationSpec, VirtualMachineMigrationStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

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

fn migration(phase: P, cancelled: bool, outcome: Option<StepOutcome>) -> VirtualMachineMigration {
    let spec: VirtualMachineMigrationSpec =
        serde_json::from_value(serde_json::json!({"vmName": "demo"})).unwrap();
    let mut m = VirtualMachineMigration::new("m", spec);
    let step = Step {
        node: "x".into(),
        start: MicroTime(at(0).0),
        end: outcome.map(|_| MicroTime(at(1).0)),
        outcome,
        reason: None,
        message: Some("it broke".into()),
    };
    let mut steps = Steps::default();
    match phase {
        P::Begin => steps.begin = Some(step),
        P::Prepare => steps.prepare = Some(step),
        P::Perform => steps.perform = Some(step),
        P::Finish => steps.finish = Some(step),
        P::Confirm => steps.confirm = Some(step),
        _ => {}
    }
    m.status = Some(VirtualMachineMigrationStatus {
        phase: Some(phase),
        phase_transition_time: Some(at(0)),
        cancelled,
        source_node: Some("node-a".into()),
        target_node: Some("node-b".into()),
        steps: Some(steps),
        ..Default::default()
    });
    m
}

fn rolling_back(mut m: VirtualMachineMigration, reason: &str) -> VirtualMachineMigration {
    let status = m.status.as_mut().unwrap();
    status.conditions.push(Condition {
        type_: ROLLING_BACK.into(),
        status: "True".into(),
        reason: reason.into(),
        message: "target QEMU died".into(),
        observed_generation: None,
        last_transition_time: at(0),
    });
    m
}

const T: Timeouts = Timeouts {
    begin: Duration::from_secs(60),
    prepare: Duration::from_secs(60),
    perform: Duration::from_secs(600),
    finish: Duration::from_secs(60),
    post_copy_paused: Duration::from_secs(300),
};

fn enter(phase: P, cancelled: bool) -> (P, bool) {
    (phase, cancelled)
}

fn entered(d: Decision) -> (P, bool) {
    match d {
        Decision::Enter {
            phase, cancelled, ..
        } => (phase, cancelled),
        other => panic!("expected a phase change, got {other:?}"),
    }
}

fn ended(d: Decision) -> (P, &'static str, String) {
    match d {
        Decision::End { phase, why } => (phase, why.reason.as_str(), why.message),
        other => panic!("expected the end, got {other:?}"),
    }
}

use StepOutcome::{Failed as F, Succeeded as S};

#[test]
fn the_happy_path_walks_the_five_phases() {
    let o = obs(1);
    assert_eq!(
        entered(decide(&migration(P::Begin, false, Some(S)), &o, &T)),
        enter(P::Prepare, false)
    );
    assert_eq!(
        entered(decide(&migration(P::Prepare, false, Some(S)), &o, &T)),
        enter(P::Perform, false)
    );
    assert_eq!(
        entered(decide(&migration(P::Perform, false, Some(S)), &o, &T)),
        enter(P::Finish, false)
    );
    assert_eq!(
        entered(decide(&migration(P::Finish, false, Some(S)), &o, &T)),
        enter(P::Confirm, false)
    );
    let (phase, reason, _) = ended(decide(&migration(P::Confirm, false, Some(S)), &o, &T));
    assert_eq!((phase, reason), (P::Succeeded, "Migrated"));
}

#[test]
fn a_running_phase_waits() {
    assert!(matches!(
        decide(&migration(P::Perform, false, None), &obs(5), &T),
        Decision::Wait(_)
    ));
    assert!(matches!(
        decide(&migration(P::Pending, false, None), &obs(5), &T),
        Decision::Wait(_)
    ));
    assert!(matches!(
        decide(&migration(P::Succeeded, false, None), &obs(5), &T),
        Decision::Wait(_)
    ));
}

#[test]
fn failure_paths_follow_the_design() {
    let o = obs(1);
    let (phase, reason, message) = ended(decide(&migration(P::Begin, false, Some(F)), &o, &T));
    assert_eq!((phase, reason), (P::Failed, "BeginFailed"));
    assert_eq!(message, "it broke");
    assert_eq!(
        entered(decide(&migration(P::Prepare, false, Some(F)), &o, &T)),
        enter(P::Confirm, true)
    );
    assert_eq!(
        entered(decide(&migration(P::Perform, false, Some(F)), &o, &T)),
        enter(P::Finish, true)
    );
    assert_eq!(
        entered(decide(&migration(P::Finish, true, Some(S)), &o, &T)),
        enter(P::Confirm, true)
    );
    assert_eq!(
        entered(decide(&migration(P::Finish, false, Some(F)), &o, &T)),
        enter(P::Confirm, true)
    );
    // A failed Confirm runs again (see the tests below for when).
    assert!(matches!(
        decide(&migration(P::Confirm, false, Some(F)), &obs(3), &T),
        Decision::RetryConfirm(_)
    ));
    let done = rolling_back(migration(P::Confirm, true, Some(S)), "PerformFailed");
    let (phase, reason, message) = ended(decide(&done, &o, &T));
    assert_eq!((phase, reason), (P::Failed, "PerformFailed"));
    assert_eq!(message, "target QEMU died; the guest runs on node-a");
}

#[test]
fn a_confirm_that_found_the_guest_lost_or_dead_ends_failed_saying_so() {
    for (reason, owner) in [(Reason::GuestLost, "node-b"), (Reason::GuestDied, "node-a")] {
        for cancelled in [false, true] {
            let mut m = migration(P::Confirm, cancelled, Some(S));
            let step = m.status.as_mut().unwrap().steps.as_mut().unwrap();
            let confirm = step.confirm.as_mut().unwrap();
            confirm.reason = Some(reason);
            confirm.message = Some("the guest is lost on node-b".into());
            let mut o = obs(1);
            o.vm_node = Some(owner.into());
            let (phase, said, message) = ended(decide(&m, &o, &T));
            assert_eq!((phase, said), (P::Failed, reason.as_str()), "{reason:?}");
            assert_eq!(message, "the guest is lost on node-b");
        }
    }
}

#[test]
fn a_lost_agent_or_a_timeout_fails_the_phase() {
    let mut o = obs(1);
    o.target_live = false;
    match decide(&migration(P::Prepare, false, None), &o, &T) {
        Decision::Enter {
            phase: P::Confirm,
            cancelled: true,
            rollback: Some(w),
        } => {
            assert_eq!(w.reason, Reason::AgentLost);
            assert!(
                w.message
                    .contains("node node-b stopped heart-beating during Prepare"),
                "{}",
                w.message
            );
        }
        other => panic!("{other:?}"),
    }
    let (phase, reason, _) = ended(decide(&migration(P::Begin, false, None), &obs(61), &T));
    assert_eq!((phase, reason), (P::Failed, "Timeout"));
    assert_eq!(
        entered(decide(&migration(P::Perform, false, None), &obs(601), &T)),
        enter(P::Finish, true)
    );
    // Confirm never times out: the guest is safe, the source comes back to it.
    let mut o = obs(100_000);
    o.source_live = false;
    assert!(matches!(
        decide(&migration(P::Confirm, true, None), &o, &T),
        Decision::Wait(_)
    ));
}

#[test]
fn a_finish_that_took_ownership_goes_forward_even_if_the_target_is_lost() {
    let mut o = obs(1);
    o.target_live = false;
    assert_eq!(
        entered(decide(&migration(P::Finish, false, None), &o, &T)),
        enter(P::Confirm, true)
    );
    o.vm_node = Some("node-b".into());
    assert_eq!(
        entered(decide(&migration(P::Finish, false, None), &o, &T)),
        enter(P::Confirm, false)
    );
    // And a cancelled Confirm after the hand-over is still a success.
    let (phase, _, _) = ended(decide(&migration(P::Confirm, true, Some(S)), &o, &T));
    assert_eq!(phase, P::Succeeded);
}

#[test]
fn cancelling_rolls_back_until_the_hand_over() {
    let cancel = |phase, cancelled, outcome| {
        let mut m = migration(phase, cancelled, outcome);
        m.spec.cancel = true;
        m
    };
    let o = obs(1);
    let (phase, ..) = ended(decide(&cancel(P::Begin, false, Some(S)), &o, &T));
    assert_eq!(phase, P::Cancelled);
    assert_eq!(
        entered(decide(&cancel(P::Prepare, false, Some(S)), &o, &T)),
        enter(P::Finish, true)
    );
    assert_eq!(
        decide(&cancel(P::Perform, false, None), &o, &T),
        Decision::RequestCancel
    );
    assert!(matches!(
        decide(&cancel(P::Perform, true, None), &o, &T),
        Decision::Wait(_)
    ));
    assert_eq!(
        entered(decide(&cancel(P::Perform, true, Some(F)), &o, &T)),
        enter(P::Finish, true)
    );
    let (phase, reason, _) = ended(decide(
        &rolling_back(cancel(P::Confirm, true, Some(S)), "Cancelled"),
        &o,
        &T,
    ));
    assert_eq!((phase, reason), (P::Cancelled, "Cancelled"));
    // Past the hand-over the migration completes.
    assert_eq!(
        entered(decide(&cancel(P::Finish, false, Some(S)), &o, &T)),
        enter(P::Confirm, false)
    );
    let (phase, _, message) = ended(decide(&cancel(P::Confirm, false, Some(S)), &o, &T));
    assert_eq!(phase, P::Succeeded);
    assert!(message.contains("after the hand-over"));
}

#[test]
fn a_cancel_after_the_switch_to_post_copy_is_too_late() {
    let mut m = migration(P::Perform, false, None);
    m.spec.cancel = true;
    m.status.as_mut().unwrap().progress = Some(ferry_crds::Progress {
        mode: Some(ferry_crds::MigrationMode::PostCopy),
        ..Default::default()
    });
    assert!(matches!(decide(&m, &obs(1), &T), Decision::Wait(_)));
    let mut done = m.clone();
    done.status
        .as_mut()
        .unwrap()
        .steps
        .as_mut()
        .unwrap()
        .perform
        .as_mut()
        .unwrap()
        .outcome = Some(S);
    assert_eq!(entered(decide(&done, &obs(1), &T)), enter(P::Finish, false));
}

fn in_post_copy(
    mut m: VirtualMachineMigration,
    mode: ferry_crds::MigrationMode,
) -> VirtualMachineMigration {
    m.status.as_mut().unwrap().progress = Some(ferry_crds::Progress {
        mode: Some(mode),
        ..Default::default()
    });
    m
}

#[test]
fn a_post_copy_perform_never_rolls_back() {
    use ferry_crds::MigrationMode::*;
    for mode in [PostCopy, PostCopyPaused] {
        let m = in_post_copy(migration(P::Perform, false, None), mode);
        // Past Perform's timeout, and with the source agent lost: it waits.
        assert!(
            matches!(decide(&m, &obs(601), &T), Decision::Wait(_)),
            "{mode:?}"
        );
        let lost = Observation {
            source_live: false,
            ..obs(1)
        };
        assert!(
            matches!(decide(&m, &lost, &T), Decision::Wait(_)),
            "{mode:?}"
        );
        // A cancel is too late.
        let mut cancelled = m.clone();
        cancelled.spec.cancel = true;
        assert!(matches!(decide(&cancelled, &obs(1), &T), Decision::Wait(_)));
    }
    // Before the switch the same timeout rolls back.
    let pre = in_post_copy(migration(P::Perform, false, None), PreCopy);
    assert_eq!(entered(decide(&pre, &obs(601), &T)), enter(P::Finish, true));
}

#[test]
fn a_post_copy_finish_is_waited_for_not_rolled_back() {
    use ferry_crds::MigrationMode::*;
    // Finish resumes the guest on the target while its last pages follow: a Finish
    // that runs long or whose agent is lost, the VM still naming the source, waits.
    for mode in [PostCopy, PostCopyPaused] {
        let m = in_post_copy(migration(P::Finish, false, None), mode);
        assert!(
            matches!(decide(&m, &obs(601), &T), Decision::Wait(_)),
            "{mode:?}"
        );
        let lost = Observation {
            target_live: false,
            ..obs(1)
        };
        assert!(
            matches!(decide(&m, &lost, &T), Decision::Wait(_)),
            "{mode:?}"
        );
    }
    // Before the switch it rolls back; so does a rollback's own Finish (the guest is
    // lost then, and nothing waits for it).
    let pre = in_post_copy(migration(P::Finish, false, None), PreCopy);
    assert_eq!(
        entered(decide(&pre, &obs(601), &T)),
        enter(P::Confirm, true)
    );
    let rolled_back = in_post_copy(migration(P::Finish, true, None), PostCopy);
    assert_eq!(
        entered(decide(&rolled_back, &obs(601), &T)),
        enter(P::Confirm, true)
    );
}

#[test]
fn a_pause_during_the_post_copy_tail_is_reported() {
    use ferry_crds::MigrationMode::*;
    for phase in [P::Finish, P::Confirm] {
        let paused = in_post_copy(migration(phase, false, None), PostCopyPaused);
        let pause = post_copy_pause(&paused, at(10).0, T.post_copy_paused).unwrap();
        assert!(pause.paused, "{phase:?}");
    }
}

#[test]
fn a_paused_post_copy_is_reported_and_overdue_after_its_bound() {
    use ferry_crds::MigrationMode::*;
    let bound = T.post_copy_paused;
    let running = in_post_copy(migration(P::Perform, false, None), PostCopy);
    assert_eq!(post_copy_pause(&running, at(1).0, bound), None);
    let mut paused = in_post_copy(migration(P::Perform, false, None), PostCopyPaused);
    let first = post_copy_pause(&paused, at(10).0, bound).unwrap();
    assert!(first.paused);
    assert_eq!(first.reason, Reason::WaitingForPath);
    ferry_crds::set_condition(
        &mut paused.status.as_mut().unwrap().conditions,
        POST_COPY_PAUSED,
        true,
        first.reason,
        &first.message,
        None,
        at(10),
    );
    // Unchanged while within the bound.
    assert_eq!(post_copy_pause(&paused, at(10 + 300).0, bound), None);
    let overdue = post_copy_pause(&paused, at(10 + 301).0, bound).unwrap();
    assert_eq!(
        (overdue.paused, overdue.reason),
        (true, Reason::RecoveryOverdue)
    );
    assert!(overdue.message.contains("keeps waiting"));
    // Still not a reason to end or roll back.
    assert!(matches!(
        decide(&paused, &obs(10_000), &T),
        Decision::Wait(_)
    ));
    // Recovered: the condition turns False.
    let mut recovered = paused.clone();
    recovered
        .status
        .as_mut()
        .unwrap()
        .progress
        .as_mut()
        .unwrap()
        .mode = Some(PostCopy);
    let back = post_copy_pause(&recovered, at(400).0, bound).unwrap();
    assert_eq!((back.paused, back.reason), (false, Reason::Recovered));
}

/// A failed Confirm whose step ended at `end` (seconds).
fn confirm_failed_at(end: Option<i64>) -> VirtualMachineMigration {
    let mut m = migration(P::Confirm, false, Some(F));
    let steps = m.status.as_mut().unwrap().steps.as_mut().unwrap();
    steps.confirm.as_mut().unwrap().end = end.map(|e| MicroTime(at(e).0));
    m
}

#[test]
fn a_failed_confirm_waits_until_it_ended_two_seconds_ago() {
    let m = confirm_failed_at(Some(10));
    // Ended just now, or ahead of the operator's clock: the whole delay is left.
    assert_eq!(
        decide(&m, &obs(10), &T),
        Decision::Wait(CONFIRM_RETRY_DELAY)
    );
    assert_eq!(decide(&m, &obs(8), &T), Decision::Wait(CONFIRM_RETRY_DELAY));
    let mut o = obs(10);
    o.now = o.now.checked_add(Duration::from_millis(1500)).unwrap();
    assert_eq!(
        decide(&m, &o, &T),
        Decision::Wait(Duration::from_millis(500))
    );
    // The same migration to a file.
    let mut save = m.clone();
    save.spec.to_file = Some(serde_json::from_value(serde_json::json!({"path": "/s/f"})).unwrap());
    assert_eq!(
        decide(&save, &o, &T),
        Decision::Wait(Duration::from_millis(500))
    );
}

#[test]
fn a_failed_confirm_runs_again_once_it_ended_two_seconds_ago() {
    let m = confirm_failed_at(Some(10));
    for now in [12, 13, 1_000] {
        match decide(&m, &obs(now), &T) {
            Decision::RetryConfirm(why) => {
                assert_eq!(why.reason, Reason::ConfirmFailed);
                assert_eq!(why.message, "it broke");
            }
            other => panic!("at {now}: expected RetryConfirm, got {other:?}"),
        }
    }
    let mut save = m.clone();
    save.spec.to_file = Some(serde_json::from_value(serde_json::json!({"path": "/s/f"})).unwrap());
    assert!(matches!(
        decide(&save, &obs(12), &T),
        Decision::RetryConfirm(_)
    ));
    // No end to count from: at once.
    assert!(matches!(
        decide(&confirm_failed_at(None), &obs(1), &T),
        Decision::RetryConfirm(_)
    ));
    // Peer-to-peer the source agent runs it again itself, whenever it ended.
    let peer = peer_to_peer(m);
    assert_eq!(decide(&peer, &obs(10), &T), Decision::Wait(POLL));
    assert_eq!(decide(&peer, &obs(12), &T), Decision::Wait(POLL));
}

fn peer_to_peer(mut m: VirtualMachineMigration) -> VirtualMachineMigration {
    m.spec.mode = ControlMode::PeerToPeer;
    m
}

#[test]
fn peer_to_peer_the_source_agent_moves_on_by_itself() {
    for phase in [P::Begin, P::Prepare, P::Perform, P::Finish] {
        let m = peer_to_peer(migration(phase, false, Some(StepOutcome::Succeeded)));
        assert_eq!(decide(&m, &obs(1), &T), Decision::Wait(POLL), "{phase:?}");
    }
    // Confirm failed: the agent runs it again; the operator does not clear the step.
    let m = peer_to_peer(migration(P::Confirm, false, Some(StepOutcome::Failed)));
    assert_eq!(decide(&m, &obs(1), &T), Decision::Wait(POLL));
}

#[test]
fn peer_to_peer_the_operator_ends_it() {
    let m = peer_to_peer(migration(P::Begin, false, Some(StepOutcome::Failed)));
    assert!(matches!(
        decide(&m, &obs(1), &T),
        Decision::End {
            phase: P::Failed,
            ..
        }
    ));
    let mut o = obs(1);
    o.vm_node = Some("node-b".into());
    let m = peer_to_peer(migration(P::Confirm, false, Some(StepOutcome::Succeeded)));
    assert!(matches!(
        decide(&m, &o, &T),
        Decision::End {
            phase: P::Succeeded,
            ..
        }
    ));
}

#[test]
fn peer_to_peer_a_stuck_phase_is_given_up_not_moved() {
    let m = peer_to_peer(migration(P::Prepare, false, None));
    match decide(&m, &obs(61), &T) {
        Decision::GiveUp { phase, why } => {
            assert_eq!(phase, P::Prepare);
            assert_eq!(why.reason, Reason::Timeout);
        }
        other => panic!("expected GiveUp, got {other:?}"),
    }
    let mut lost = obs(1);
    lost.target_live = false;
    let m = peer_to_peer(migration(P::Finish, true, None));
    assert!(matches!(
        decide(&m, &lost, &T),
        Decision::GiveUp { phase: P::Finish, ref why } if why.reason == Reason::AgentLost
    ));
    // Begin started nothing on the target: the migration fails at once.
    let m = peer_to_peer(migration(P::Begin, false, None));
    assert!(matches!(
        decide(&m, &obs(61), &T),
        Decision::End {
            phase: P::Failed,
            ..
        }
    ));
}

#[test]
fn peer_to_peer_the_rollback_reason_comes_from_the_failed_step() {
    // The source agent entered Confirm(cancelled) after Prepare failed.
    let mut m = peer_to_peer(migration(P::Prepare, true, Some(StepOutcome::Failed)));
    m.status.as_mut().unwrap().phase = Some(P::Confirm);
    match decide(&m, &obs(1), &T) {
        Decision::NoteRollback(why) => {
            assert_eq!(why.reason, Reason::PrepareFailed);
            assert_eq!(why.message, "it broke");
        }
        other => panic!("expected NoteRollback, got {other:?}"),
    }
    // Noted once.
    let m = rolling_back(m, "PrepareFailed");
    assert_eq!(decide(&m, &obs(1), &T), Decision::Wait(POLL));
}
