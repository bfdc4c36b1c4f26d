//! Unit tests of the VM reconciler's decision.

use super::*;
use crate::k8s::vms::spec::Refusal;
use ferry_crds::conditions::vm::{DOMAIN_REFUSED, RESTART_REQUIRED};
use ferry_crds::set_condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn facts(status: &VirtualMachineStatus, spec_running: bool, running: bool) -> Facts<'_> {
    Facts {
        node: "node-a",
        spec_running,
        status,
        spec: SpecCheck::Current,
        running,
        record_domain: None,
        graphics: None,
        has_finalizer: true,
        deleting: false,
        grace: Duration::from_secs(30),
        now: at(0),
    }
}

fn status(phase: Option<VmPhase>) -> VirtualMachineStatus {
    VirtualMachineStatus {
        phase,
        node_name: Some("node-a".into()),
        ..Default::default()
    }
}

/// A guest that runs, with the definition it started with recorded.
fn running_status() -> VirtualMachineStatus {
    VirtualMachineStatus {
        domain_xml: Some("<domain/>".into()),
        ..status(Some(VmPhase::Running))
    }
}

fn asked_at(mut s: VirtualMachineStatus, secs: i64, why: Shutdown) -> VirtualMachineStatus {
    set_condition(
        &mut s.conditions,
        SHUTTING_DOWN,
        true,
        why.reason(),
        "asked",
        None,
        Time(at(secs)),
    );
    s
}

fn reported(act: Act) -> (VmPhase, &'static str, bool) {
    match act {
        Act::Report(r) => (r.phase, r.reason, r.guarded),
        other => panic!("expected a report, got {other:?}"),
    }
}

fn report_of(act: Act) -> Report {
    match act {
        Act::Report(r) => r,
        other => panic!("expected a report, got {other:?}"),
    }
}

#[test]
fn a_guest_to_run_starts_and_then_is_reported_running() {
    for phase in [None, Some(VmPhase::Pending), Some(VmPhase::Stopped)] {
        let s = status(phase);
        assert_eq!(decide(&facts(&s, true, false)), (Act::Start, Then::Resync));
    }
    let s = status(Some(VmPhase::Starting));
    let (act, _) = decide(&facts(&s, true, true));
    assert_eq!(reported(act), (VmPhase::Running, "Running", true));
    let s = running_status();
    assert_eq!(decide(&facts(&s, true, true)), (Act::Nothing, Then::Resync));
}

#[test]
fn the_finalizer_comes_first() {
    let s = status(None);
    let mut f = facts(&s, true, false);
    f.has_finalizer = false;
    assert_eq!(decide(&f), (Act::AddFinalizer, Then::AwaitChange));
    // A guest already running (started before the finalizer existed) gets it too.
    let s = running_status();
    let mut f = facts(&s, true, true);
    f.has_finalizer = false;
    assert_eq!(decide(&f), (Act::AddFinalizer, Then::AwaitChange));
}

#[test]
fn a_guest_whose_qemu_died_is_failed_not_restarted() {
    let s = status(Some(VmPhase::Running));
    let (act, then) = decide(&facts(&s, true, false));
    assert!(matches!(act, Act::Died(m) if m.contains("exited unexpectedly on node-a")));
    assert_eq!(then, Then::AwaitChange);
    let s = status(Some(VmPhase::Failed));
    assert_eq!(
        decide(&facts(&s, true, false)),
        (Act::Nothing, Then::AwaitChange)
    );
}

#[test]
fn a_migration_holding_the_guest_is_only_reported() {
    let mut s = status(Some(VmPhase::Running));
    s.migration = Some("m1".into());
    let (act, then) = decide(&facts(&s, false, true));
    assert_eq!(reported(act), (VmPhase::Migrating, "Migrating", false));
    assert_eq!(then, Then::Resync);
    s.phase = Some(VmPhase::Migrating);
    assert_eq!(
        decide(&facts(&s, true, false)),
        (Act::Nothing, Then::Resync)
    );
    // Whatever the spec says meanwhile.
    let mut f = facts(&s, true, true);
    f.spec = SpecCheck::Invalid("unsupported element <foo> in <domain>".into());
    assert_eq!(decide(&f), (Act::Nothing, Then::Resync));
}

#[test]
fn spec_running_false_asks_the_guest_to_power_off_then_stops_it() {
    let s = running_status();
    assert_eq!(
        decide(&facts(&s, false, true)),
        (
            Act::PowerOff(Shutdown::Stopping),
            Then::After(SHUTDOWN_POLL)
        )
    );
    // Asked 10 s ago: the grace period (30 s) runs; look again soon.
    let asked = asked_at(running_status(), -10, Shutdown::Stopping);
    assert_eq!(
        decide(&facts(&asked, false, true)),
        (Act::Nothing, Then::After(SHUTDOWN_POLL))
    );
    let mut f = facts(&asked, false, true);
    f.now = Timestamp::from_millisecond(at(19).as_millisecond() + 500).unwrap();
    assert_eq!(
        decide(&f),
        (Act::Nothing, Then::After(Duration::from_millis(500)))
    );
    // Over: stop it.
    let mut f = facts(&asked, false, true);
    f.now = at(20);
    assert_eq!(decide(&f), (Act::Stop, Then::Resync));
    // No grace period: at once.
    let mut f = facts(&s, false, true);
    f.grace = Duration::ZERO;
    assert_eq!(decide(&f), (Act::Stop, Then::Resync));
    // It powered off by itself (or was stopped): its locks go and it is reported Stopped.
    assert_eq!(
        decide(&facts(&asked, false, false)),
        (Act::Stop, Then::Resync)
    );
    let s = status(Some(VmPhase::Stopped));
    assert_eq!(
        decide(&facts(&s, false, false)),
        (Act::Nothing, Then::Resync)
    );
}

#[test]
fn a_guest_started_again_during_its_grace_period_is_reported_running() {
    let asked = asked_at(running_status(), -10, Shutdown::Stopping);
    let r = report_of(decide(&facts(&asked, true, true)).0);
    assert_eq!(r.phase, VmPhase::Running);
    assert_eq!(r.note, Some(SpecNote::None), "clears ShuttingDown");
}

#[test]
fn a_changed_spec_of_a_running_guest_is_noted_and_the_guest_keeps_running() {
    let s = running_status();
    let mut f = facts(&s, true, true);
    f.spec = SpecCheck::Changed(vec!["memory '65536 KiB' → '98304 KiB'".into()]);
    let r = report_of(decide(&f).0);
    assert_eq!(
        (r.phase, r.ready, r.reason),
        (VmPhase::Running, true, "Running")
    );
    assert!(
        matches!(&r.note, Some(SpecNote::RestartRequired(m)) if m.contains("memory")),
        "{r:?}"
    );
    assert_eq!(r.domain_xml, None, "the running definition stays");

    for (check, reason) in [
        (
            SpecCheck::Invalid("unsupported element <hugepages> in <domain>".into()),
            Refusal::InvalidDomain,
        ),
        (
            SpecCheck::IdentityChanged(vec!["name 'demo' → 'demo2'".into()]),
            Refusal::IdentityChanged,
        ),
    ] {
        let mut f = facts(&s, true, true);
        f.spec = check;
        let r = report_of(decide(&f).0);
        assert_eq!((r.phase, r.ready), (VmPhase::Running, true));
        assert!(
            matches!(&r.note, Some(SpecNote::Refused { reason: got, .. }) if *got == reason),
            "{r:?}"
        );
    }

    // Once noted, nothing more to write.
    let mut noted = running_status();
    let note = SpecNote::for_running(&SpecCheck::Invalid("bad".into()));
    note.apply(&mut noted.conditions, None, Time(at(0)));
    assert!(noted.conditions.iter().any(|c| c.type_ == DOMAIN_REFUSED));
    let mut f = facts(&noted, true, true);
    f.spec = SpecCheck::Invalid("bad".into());
    assert_eq!(decide(&f), (Act::Nothing, Then::Resync));
    // The spec put back: the note goes.
    let f = facts(&noted, true, true);
    let r = report_of(decide(&f).0);
    assert_eq!(r.note, Some(SpecNote::None));
}

#[test]
fn an_invalid_spec_never_stops_the_running_guest_and_stop_still_works() {
    let s = running_status();
    let mut f = facts(&s, false, true);
    f.spec = SpecCheck::Invalid("malformed XML".into());
    assert_eq!(
        decide(&f),
        (
            Act::PowerOff(Shutdown::Stopping),
            Then::After(SHUTDOWN_POLL)
        )
    );
    // Stopped: it clears what it said about the running guest.
    let mut stopped = status(Some(VmPhase::Stopped));
    SpecNote::RestartRequired("x".into()).apply(&mut stopped.conditions, None, Time(at(0)));
    assert!(
        stopped
            .conditions
            .iter()
            .any(|c| c.type_ == RESTART_REQUIRED)
    );
    assert_eq!(
        decide(&facts(&stopped, false, false)),
        (Act::Stop, Then::Resync)
    );
    // Started again with the invalid spec: now it counts.
    let mut f = facts(&stopped, true, false);
    f.spec = SpecCheck::Invalid("unsupported element <foo> in <domain>".into());
    let (act, then) = decide(&f);
    assert_eq!(reported(act), (VmPhase::Failed, "InvalidDomain", false));
    assert_eq!(then, Then::AwaitChange);
}

#[test]
fn the_running_definition_is_recorded() {
    let s = status(Some(VmPhase::Running));
    let mut f = facts(&s, true, true);
    f.record_domain = Some("<domain>...</domain>".into());
    let r = report_of(decide(&f).0);
    assert_eq!(r.domain_xml, Some(Some("<domain>...</domain>".into())));
}

#[test]
fn a_deleted_vm_waits_for_its_migration_then_powers_off_then_goes() {
    // Held by a migration: the operator cancels it; nothing happens here until it ends.
    let mut held = running_status();
    held.migration = Some("m1".into());
    let mut f = facts(&held, true, true);
    f.deleting = true;
    assert_eq!(
        decide(&f),
        (Act::AwaitRelease("m1".into()), Then::After(RELEASE_POLL))
    );
    // Released: the guest is asked to power off, given its grace period, then removed.
    let s = running_status();
    let mut f = facts(&s, true, true);
    f.deleting = true;
    assert_eq!(
        decide(&f),
        (
            Act::PowerOff(Shutdown::Deleting),
            Then::After(SHUTDOWN_POLL)
        )
    );
    let asked = asked_at(running_status(), -5, Shutdown::Deleting);
    let mut f = facts(&asked, true, true);
    f.deleting = true;
    f.grace = Duration::from_secs(10);
    assert_eq!(decide(&f), (Act::Nothing, Then::After(SHUTDOWN_POLL)));
    f.now = at(5);
    assert_eq!(decide(&f), (Act::Finalize, Then::Resync));
    // A stop asked before the deletion counts: no second request.
    let asked = asked_at(running_status(), -40, Shutdown::Stopping);
    let mut f = facts(&asked, false, true);
    f.deleting = true;
    assert_eq!(decide(&f), (Act::Finalize, Then::Resync));
    // No guest runs: everything goes at once, whatever the phase or the spec says.
    for phase in [Some(VmPhase::Failed), Some(VmPhase::Stopped), None] {
        let s = status(phase);
        let mut f = facts(&s, true, false);
        f.deleting = true;
        f.spec = SpecCheck::Invalid("malformed XML".into());
        assert_eq!(decide(&f), (Act::Finalize, Then::AwaitChange));
    }
    // Deleted before the finalizer was added: the same.
    let s = status(None);
    let mut f = facts(&s, true, false);
    f.deleting = true;
    f.has_finalizer = false;
    assert_eq!(decide(&f), (Act::Finalize, Then::AwaitChange));
}
