//! What the VM reconciler does about one guest of this node: a pure function of the
//! facts the reconciler gathered (the spec, the status, what `spec.domainXML` is to the
//! definition the guest runs with, whether its QEMU runs here, whether the VM is being
//! deleted), tested on its own like the operator's `admit`.
//!
//! A running guest keeps the definition it started with: a changed spec is only
//! reported (`spec::SpecNote`) and applies at the next start. Stopping and deleting ask
//! the guest to power off and give it `spec.terminationGracePeriodSeconds`, counted from
//! the `ShuttingDown` condition, by looking again rather than waiting.

use std::time::Duration;

use ferry_crds::conditions::vm::SHUTTING_DOWN;
use ferry_crds::{Graphics, VirtualMachineStatus, VmPhase};
use k8s_openapi::jiff::Timestamp;

use super::spec::{SpecCheck, SpecNote};

/// How often a guest that was asked to power off is looked at during its grace period.
pub const SHUTDOWN_POLL: Duration = Duration::from_secs(1);
/// How often a deleted VM looks again whether its migration released it.
pub const RELEASE_POLL: Duration = Duration::from_secs(2);

/// What the reconciler knows about one VM of this node.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub node: &'a str,
    /// `spec.running`.
    pub spec_running: bool,
    pub status: &'a VirtualMachineStatus,
    /// What `spec.domainXML` is to the definition the guest runs with.
    pub spec: SpecCheck,
    /// Whether this VM's guest runs on this node.
    pub running: bool,
    /// The definition the running guest runs with, when `status.domainXML` does not
    /// say it (yet): to record there.
    pub record_domain: Option<String>,
    /// Where its console listens now (asked of QEMU only when it runs and no migration
    /// holds it).
    pub graphics: Option<Graphics>,
    /// Whether the VM carries the `ferry.dev/guest` finalizer.
    pub has_finalizer: bool,
    /// Whether the VM is being deleted (`metadata.deletionTimestamp`).
    pub deleting: bool,
    /// `spec.terminationGracePeriodSeconds`.
    pub grace: Duration,
    pub now: Timestamp,
}

/// A status write: phase, the Ready condition, graphics, and what goes with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub phase: VmPhase,
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    pub graphics: Option<Graphics>,
    /// Only over the version this decision was made on (a status somebody else wrote
    /// since is never overwritten from a stale view).
    pub guarded: bool,
    /// The spec's conditions (`RestartRequired`, `DomainRefused`) to set, with
    /// `ShuttingDown` removed; `None` leaves every condition but Ready as it is.
    pub note: Option<SpecNote>,
    /// `status.domainXML`: `Some(Some(_))` records the running definition, `Some(None)`
    /// clears it (no guest runs).
    pub domain_xml: Option<Option<String>>,
}

/// Why a guest is asked to power off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// `spec.running` is false.
    Stopping,
    /// The VM is being deleted.
    Deleting,
}

impl Shutdown {
    /// The `ShuttingDown` condition's reason.
    pub fn reason(self) -> &'static str {
        match self {
            Shutdown::Stopping => "Stopping",
            Shutdown::Deleting => "Deleting",
        }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    Nothing,
    Report(Report),
    /// Add the `ferry.dev/guest` finalizer (before anything else happens to the guest).
    AddFinalizer,
    /// Start the guest (boot it, or restore it from its saved state) from the spec.
    Start,
    /// Ask the guest to power off (ACPI) and record when (`ShuttingDown`).
    PowerOff(Shutdown),
    /// Stop its QEMU now if it runs, release its disk locks, report it Stopped.
    Stop,
    /// Its QEMU exited by itself: release its disk locks and report it Failed
    /// (`GuestDied`, guarded); it is not restarted.
    Died(String),
    /// The VM is being deleted but this migration holds it: wait until it ends (the
    /// operator cancels it).
    AwaitRelease(String),
    /// The VM is being deleted and its guest may go: stop QEMU if it runs, remove its
    /// state dir, release its disk locks, remove the finalizer.
    Finalize,
}

/// When to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Only when the VM changes.
    AwaitChange,
    /// After the resync period.
    Resync,
    /// After this long.
    After(Duration),
}

/// When the guest was asked to power off: the `ShuttingDown` condition's transition.
pub fn asked_to_power_off(status: &VirtualMachineStatus) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == SHUTTING_DOWN && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// The decision about the guest `facts` describe.
pub fn decide(facts: &Facts<'_>) -> (Act, Then) {
    let status = facts.status;
    if facts.deleting {
        return deleting(facts);
    }
    if !facts.has_finalizer {
        return (Act::AddFinalizer, Then::AwaitChange);
    }
    if let Some(migration) = &status.migration {
        // A migration holds the guest; its phases act, this only reports.
        let act = if facts.running && status.phase != Some(VmPhase::Migrating) {
            let message = format!("held by migration {migration}");
            report(VmPhase::Migrating, true, "Migrating", message, None, false)
        } else {
            Act::Nothing
        };
        return (act, Then::Resync);
    }
    match (facts.spec_running, facts.running) {
        (true, true) => running(facts),
        (true, false) => to_start(facts),
        (false, true) => shut_down(facts, Shutdown::Stopping, Act::Stop),
        (false, false) => {
            let stale = status.phase != Some(VmPhase::Stopped)
                || status.domain_xml.is_some()
                || asked_to_power_off(status).is_some()
                || SpecNote::of(&status.conditions) != SpecNote::None;
            let act = if stale { Act::Stop } else { Act::Nothing };
            (act, Then::Resync)
        }
    }
}

fn report(
    phase: VmPhase,
    ready: bool,
    reason: &'static str,
    message: String,
    graphics: Option<Graphics>,
    guarded: bool,
) -> Act {
    Act::Report(Report {
        phase,
        ready,
        reason,
        message,
        graphics,
        guarded,
        note: None,
        domain_xml: None,
    })
}

/// The guest runs as it should: report it, with what the spec is to it.
fn running(facts: &Facts<'_>) -> (Act, Then) {
    let status = facts.status;
    let note = SpecNote::for_running(&facts.spec);
    let stale = status.phase != Some(VmPhase::Running)
        || status.graphics != facts.graphics
        || status.node_name.is_none()
        || facts.record_domain.is_some()
        || SpecNote::of(&status.conditions) != note
        || asked_to_power_off(status).is_some();
    if !stale {
        return (Act::Nothing, Then::Resync);
    }
    let act = Act::Report(Report {
        phase: VmPhase::Running,
        ready: true,
        reason: "Running",
        message: format!("running on {}", facts.node),
        graphics: facts.graphics.clone(),
        guarded: true,
        note: Some(note),
        domain_xml: facts.record_domain.clone().map(Some),
    });
    (act, Then::Resync)
}

/// The guest should run and does not: start it from the spec, unless it died.
fn to_start(facts: &Facts<'_>) -> (Act, Then) {
    let status = facts.status;
    if let SpecCheck::Invalid(why) = &facts.spec {
        let act = report(
            VmPhase::Failed,
            false,
            "InvalidDomain",
            why.clone(),
            None,
            false,
        );
        return (act, Then::AwaitChange);
    }
    match status.phase {
        None | Some(VmPhase::Pending | VmPhase::Starting | VmPhase::Stopped) => {
            (Act::Start, Then::Resync)
        }
        Some(VmPhase::Failed) => (Act::Nothing, Then::AwaitChange),
        Some(phase) => {
            let message = format!(
                "the guest's QEMU exited unexpectedly on {} while {phase:?}; Ferry does not restart it (set spec.running to false and back to true to start it again)",
                facts.node
            );
            (Act::Died(message), Then::AwaitChange)
        }
    }
}

/// The guest runs and must go (`why`): ask it to power off, give it the grace period,
/// then `then`.
fn shut_down(facts: &Facts<'_>, why: Shutdown, then: Act) -> (Act, Then) {
    if facts.grace.is_zero() {
        return (then, Then::Resync);
    }
    let Some(asked) = asked_to_power_off(facts.status) else {
        return (
            Act::PowerOff(why),
            Then::After(SHUTDOWN_POLL.min(facts.grace)),
        );
    };
    let elapsed_ms = (facts.now.as_millisecond() - asked.as_millisecond()).max(0) as u128;
    match facts.grace.as_millis().checked_sub(elapsed_ms) {
        Some(left) if left > 0 => {
            let left = Duration::from_millis(left as u64);
            (Act::Nothing, Then::After(SHUTDOWN_POLL.min(left)))
        }
        _ => (then, Then::Resync),
    }
}

/// The VM is being deleted: a migration holding it ends first, then the guest powers
/// off (or its grace period runs out), then everything of it on this node goes.
fn deleting(facts: &Facts<'_>) -> (Act, Then) {
    if let Some(migration) = &facts.status.migration {
        return (
            Act::AwaitRelease(migration.clone()),
            Then::After(RELEASE_POLL),
        );
    }
    if facts.running {
        shut_down(facts, Shutdown::Deleting, Act::Finalize)
    } else {
        (Act::Finalize, Then::AwaitChange)
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
