use super::*;

fn guest(name: &str) -> Guest {
    Guest {
        namespace: "default".into(),
        name: name.into(),
        running: true,
        held_by: None,
    }
}

fn attempt(vm: &str, number: u32, phase: Option<MigrationPhase>, ended: i64) -> Attempt {
    let terminal = phase.is_some_and(MigrationPhase::is_terminal);
    Attempt {
        namespace: "default".into(),
        name: migration_name(vm, "node-a", number),
        vm: vm.into(),
        number,
        phase,
        cancel_asked: false,
        ended: terminal.then(|| Timestamp::from_second(ended).unwrap()),
        target: Some("node-b".into()),
        failure: (terminal && phase != Some(MigrationPhase::Succeeded))
            .then(|| ("PrepareFailed".into(), "no room".into())),
    }
}

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(second).unwrap()
}

fn facts<'a>(
    evacuating: bool,
    guests: &'a [Guest],
    attempts: &'a [Attempt],
    targets: &'a [String],
    now: i64,
) -> Facts<'a> {
    Facts {
        node: "node-a",
        evacuating,
        guests,
        attempts,
        targets,
        now: at(now),
    }
}

fn node(json: serde_json::Value) -> Node {
    serde_json::from_value(json).unwrap()
}

#[test]
fn a_cordoned_or_tainted_node_is_evacuated_and_closed() {
    let plain = node(serde_json::json!({"metadata": {"name": "n"}}));
    let cordoned =
        node(serde_json::json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}}));
    let tainted = node(serde_json::json!({"metadata": {"name": "n"}, "spec": {
        "taints": [{"key": EVACUATE_TAINT, "effect": "NoSchedule"}]}}));
    let other_taint = node(serde_json::json!({"metadata": {"name": "n"}, "spec": {
        "taints": [{"key": "example.com/gpu", "effect": "NoSchedule"}]}}));
    assert!(!evacuating(&plain, true) && !closed(&plain));
    assert!(evacuating(&cordoned, true) && closed(&cordoned));
    assert!(
        !evacuating(&cordoned, false),
        "cordon alone with on_cordon off"
    );
    assert!(evacuating(&tainted, false) && closed(&tainted));
    assert!(!evacuating(&other_taint, true) && !closed(&other_taint));
    let closed = closed_nodes([&plain, &cordoned]);
    assert_eq!(closed, BTreeSet::from(["n".to_string()]));
}

#[test]
fn names_are_deterministic_and_valid_even_when_long() {
    assert_eq!(migration_name("web", "node-a", 2), "evacuate-web-node-a-2");
    let long_vm = "v".repeat(250);
    let name = migration_name(&long_vm, "node-a", 1);
    assert!(name.len() <= 253, "{}", name.len());
    assert_eq!(name, migration_name(&long_vm, "node-a", 1));
    assert_ne!(name, migration_name(&long_vm, "node-a", 2));
    assert!(name.starts_with("evacuate-vvv"));
    let long_node = format!("{}.example.com", "n".repeat(70));
    let label = label_value(&long_node);
    assert!(label.len() <= 63, "{label}");
    assert!(label.chars().last().unwrap().is_ascii_alphanumeric());
    assert_eq!(label_value("node-a"), "node-a");
}

#[test]
fn every_running_guest_gets_one_migration() {
    let guests = [guest("a"), guest("b"), guest("c")];
    let targets = ["node-b".to_string()];
    let p = plan(&facts(true, &guests, &[], &targets, 100));
    let names: Vec<_> = p.create.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "evacuate-a-node-a-1",
            "evacuate-b-node-a-1",
            "evacuate-c-node-a-1"
        ]
    );
    assert_eq!(p.remaining, 3);
    assert!(p.stuck.is_empty() && p.cancel.is_empty());

    // Once they exist (whatever their phase short of the end), nothing more is created:
    // a restarted operator finds them by name and label.
    let attempts = [
        attempt("a", 1, None, 0),
        attempt("b", 1, Some(MigrationPhase::Pending), 0),
        attempt("c", 1, Some(MigrationPhase::Perform), 0),
    ];
    let p = plan(&facts(true, &guests, &attempts, &targets, 100));
    assert!(p.create.is_empty(), "{p:?}");
}

#[test]
fn stopped_or_held_guests_are_left_alone() {
    let mut stopped = guest("s");
    stopped.running = false;
    let mut held = guest("h");
    held.held_by = Some("user-migration".into());
    let guests = [stopped, held];
    let targets = ["node-b".to_string()];
    let p = plan(&facts(true, &guests, &[], &targets, 100));
    assert!(p.create.is_empty(), "{p:?}");
    assert_eq!(p.remaining, 1);
}

#[test]
fn a_failed_attempt_is_retried_after_a_growing_backoff_then_given_up() {
    let guests = [guest("a")];
    let targets = ["node-b".to_string()];
    let failed1 = [attempt("a", 1, Some(MigrationPhase::Failed), 100)];
    let p = plan(&facts(true, &guests, &failed1, &targets, 105));
    assert!(p.create.is_empty());
    assert_eq!(p.retry_at, Some(at(110)));
    let p = plan(&facts(true, &guests, &failed1, &targets, 110));
    assert_eq!(p.create[0].name, "evacuate-a-node-a-2");
    assert_eq!(p.create[0].attempt, 2);

    let failed2 = [
        attempt("a", 1, Some(MigrationPhase::Failed), 100),
        attempt("a", 2, Some(MigrationPhase::Cancelled), 200),
    ];
    assert!(
        plan(&facts(true, &guests, &failed2, &targets, 215))
            .create
            .is_empty()
    );
    assert_eq!(
        plan(&facts(true, &guests, &failed2, &targets, 220)).create[0].attempt,
        3
    );
    assert_eq!(backoff(1), Duration::from_secs(10));
    assert_eq!(backoff(5), Duration::from_secs(160));
    assert_eq!(backoff(50), Duration::from_secs(160));

    let all_failed: Vec<Attempt> = (1..=MAX_ATTEMPTS)
        .map(|n| attempt("a", n, Some(MigrationPhase::Failed), 100 * i64::from(n)))
        .collect();
    let p = plan(&facts(true, &guests, &all_failed, &targets, 100_000));
    assert!(p.create.is_empty());
    assert_eq!(p.stuck.len(), 1);
    assert_eq!(p.stuck[0].reason, "PrepareFailed");
    assert!(
        p.stuck[0]
            .message
            .contains("gave up after 5 failed migrations"),
        "{}",
        p.stuck[0].message
    );
}

#[test]
fn a_guest_with_nowhere_to_go_is_stuck_not_stopped() {
    let guests = [guest("a")];
    let p = plan(&facts(true, &guests, &[], &[], 100));
    assert!(p.create.is_empty());
    assert_eq!(p.stuck.len(), 1);
    assert_eq!(p.stuck[0].reason, "NoTarget");
    assert!(p.stuck[0].message.contains("keeps running"));
    assert!(p.cancel.is_empty());
}

#[test]
fn opening_the_node_cancels_what_has_not_started_and_creates_nothing() {
    let guests = [guest("a"), guest("b"), guest("c")];
    let targets = ["node-b".to_string()];
    let attempts = [
        attempt("a", 1, Some(MigrationPhase::Perform), 0),
        attempt("b", 1, Some(MigrationPhase::Pending), 0),
        attempt("c", 1, None, 0),
    ];
    let p = plan(&facts(false, &guests, &attempts, &targets, 100));
    assert!(p.create.is_empty());
    assert_eq!(
        p.cancel,
        [
            ("default".into(), "evacuate-b-node-a-1".into()),
            ("default".into(), "evacuate-c-node-a-1".into())
        ]
    );
    // Nor is a cancel asked twice.
    let mut asked = attempts.clone();
    asked[1].cancel_asked = true;
    asked[2].cancel_asked = true;
    assert!(
        plan(&facts(false, &guests, &asked, &targets, 100))
            .cancel
            .is_empty()
    );
}

#[test]
fn a_pending_attempt_for_a_guest_that_left_is_cancelled() {
    let targets = ["node-b".to_string()];
    let attempts = [attempt("gone", 1, Some(MigrationPhase::Pending), 0)];
    let p = plan(&facts(true, &[], &attempts, &targets, 100));
    assert_eq!(p.cancel.len(), 1);
    assert_eq!(p.remaining, 0);
}

#[test]
fn the_tracker_reports_start_each_move_and_done_once() {
    let mut t = Tracker::default();
    let targets = ["node-b".to_string()];
    let since = at(50);
    let guests = [guest("a"), guest("b")];
    let f = facts(true, &guests, &[], &targets, 100);
    let p = plan(&f);
    assert_eq!(t.observe(&f, &p, since), [Notice::Started { guests: 2 }]);
    assert!(t.observe(&f, &p, since).is_empty(), "once");

    let moving = [
        attempt("a", 1, Some(MigrationPhase::Succeeded), 120),
        attempt("b", 1, Some(MigrationPhase::Perform), 0),
    ];
    let left = [guest("b")];
    let f = facts(true, &left, &moving, &targets, 130);
    let p = plan(&f);
    assert_eq!(
        t.observe(&f, &p, since),
        [Notice::Moved {
            namespace: "default".into(),
            vm: "a".into(),
            migration: "evacuate-a-node-a-1".into(),
            target: "node-b".into()
        }]
    );
    let moved = [
        attempt("a", 1, Some(MigrationPhase::Succeeded), 120),
        attempt("b", 1, Some(MigrationPhase::Succeeded), 140),
    ];
    let f = facts(true, &[], &moved, &targets, 150);
    let p = plan(&f);
    let notices = t.observe(&f, &p, since);
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(matches!(&notices[0], Notice::Moved { vm, .. } if vm == "b"));
    assert_eq!(notices[1], Notice::Done);
    assert!(t.observe(&f, &p, since).is_empty());

    // Opening the node afterwards says nothing: nothing was left, and a guest that
    // comes back once it is open is not a stopped evacuation.
    let f = facts(false, &[], &moved, &targets, 160);
    assert!(t.observe(&f, &plan(&f), since).is_empty());
    let back = [guest("a")];
    let f = facts(false, &back, &moved, &targets, 170);
    assert!(t.observe(&f, &plan(&f), since).is_empty());
    // Nor if the guest came back before the operator saw the node open.
    let mut t2 = Tracker::default();
    let f = facts(true, &guests, &[], &targets, 100);
    t2.observe(&f, &plan(&f), since);
    let f = facts(true, &[], &moved, &targets, 150);
    t2.observe(&f, &plan(&f), since);
    let f = facts(false, &back, &moved, &targets, 170);
    assert!(t2.observe(&f, &plan(&f), since).is_empty());
}

#[test]
fn the_tracker_reports_failures_stuck_guests_and_a_stop() {
    let mut t = Tracker::default();
    let since = at(50);
    let guests = [guest("a")];
    let f = facts(true, &guests, &[], &[], 100);
    let p = plan(&f);
    let notices = t.observe(&f, &p, since);
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(matches!(&notices[1], Notice::Stuck(s) if s.reason == "NoTarget"));
    assert!(t.observe(&f, &p, since).is_empty(), "stuck is said once");

    let targets = ["node-b".to_string()];
    let failed = [attempt("a", 1, Some(MigrationPhase::Failed), 120)];
    let f = facts(true, &guests, &failed, &targets, 125);
    let notices = t.observe(&f, &plan(&f), since);
    assert!(
        matches!(&notices[..], [Notice::Failed { reason, .. }] if reason == "PrepareFailed"),
        "{notices:?}"
    );

    // A migration that ended before this operator started is not reported again.
    let mut fresh = Tracker::default();
    let f = facts(true, &guests, &failed, &targets, 125);
    let notices = fresh.observe(&f, &plan(&f), at(121));
    assert_eq!(notices, [Notice::Started { guests: 1 }]);

    let pending = [attempt("a", 2, Some(MigrationPhase::Pending), 0)];
    let f = facts(false, &guests, &pending, &targets, 130);
    let p = plan(&f);
    assert_eq!(
        t.observe(&f, &p, since),
        [Notice::Stopped {
            remaining: 1,
            cancelled: 1
        }]
    );
}

#[test]
fn targets_are_live_open_and_elsewhere() {
    let live = ["node-a".into(), "node-b".into(), "node-c".into()];
    let closed = BTreeSet::from(["node-c".to_string()]);
    assert_eq!(targets("node-a", &live, &closed), ["node-b"]);
}
