//! What the VM reconciler does about one guest of this node: a pure function of the
//! facts the reconciler gathered (the spec, the status, whether the definition parses,
//! whether its QEMU runs here), tested on its own like the operator's `admit`.

use ferry_crds::{Graphics, VirtualMachineStatus, VmPhase};

/// What the reconciler knows about one VM of this node.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub node: &'a str,
    /// `spec.running`.
    pub spec_running: bool,
    pub status: &'a VirtualMachineStatus,
    /// Why `spec.domainXML` does not parse, if it does not.
    pub invalid_domain: Option<String>,
    /// The guest's domain name.
    pub domain_name: &'a str,
    /// The uuid of another guest that runs here under the same domain name.
    pub name_taken_by: Option<String>,
    /// Whether the guest's QEMU runs on this node.
    pub running: bool,
    /// Where its console listens now (asked of QEMU only when it runs and no migration
    /// holds it).
    pub graphics: Option<Graphics>,
}

/// A status write: phase, the Ready condition, graphics.
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
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    Nothing,
    Report(Report),
    /// Start the guest (boot it, or restore it from its saved state).
    Start,
    /// Stop it as `spec.running: false` asks, then report it Stopped.
    Stop,
    /// Its QEMU exited by itself: release its disk locks and report it Failed
    /// (`GuestDied`, guarded); it is not restarted.
    Died(String),
}

/// When to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Only when the VM changes.
    AwaitChange,
    /// After the resync period.
    Resync,
}

/// The decision about the guest `facts` describe.
pub fn decide(facts: &Facts<'_>) -> (Act, Then) {
    let status = facts.status;
    let report = |phase, ready, reason, message: String, graphics, guarded| {
        Act::Report(Report {
            phase,
            ready,
            reason,
            message,
            graphics,
            guarded,
        })
    };
    if let Some(why) = &facts.invalid_domain {
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
    // The domain name keys the guest on this node; another VM may not take it.
    if let Some(uuid) = &facts.name_taken_by {
        let message = format!(
            "domain name {} is already used on node {} by a guest with uuid {uuid}",
            facts.domain_name, facts.node
        );
        let act = report(VmPhase::Failed, false, "NameInUse", message, None, false);
        return (act, Then::AwaitChange);
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
        (true, true) => {
            let stale = status.phase != Some(VmPhase::Running)
                || status.graphics != facts.graphics
                || status.node_name.is_none();
            let act = if stale {
                let message = format!("running on {}", facts.node);
                let graphics = facts.graphics.clone();
                report(VmPhase::Running, true, "Running", message, graphics, true)
            } else {
                Act::Nothing
            };
            (act, Then::Resync)
        }
        (true, false) => match status.phase {
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
        },
        (false, true) => (Act::Stop, Then::Resync),
        (false, false) if status.phase != Some(VmPhase::Stopped) => {
            let message = "spec.running is false".to_string();
            let act = report(VmPhase::Stopped, false, "Stopped", message, None, false);
            (act, Then::Resync)
        }
        (false, false) => (Act::Nothing, Then::Resync),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(status: &VirtualMachineStatus, spec_running: bool, running: bool) -> Facts<'_> {
        Facts {
            node: "node-a",
            spec_running,
            status,
            invalid_domain: None,
            domain_name: "demo",
            name_taken_by: None,
            running,
            graphics: None,
        }
    }

    fn status(phase: Option<VmPhase>) -> VirtualMachineStatus {
        VirtualMachineStatus {
            phase,
            node_name: Some("node-a".into()),
            ..Default::default()
        }
    }

    fn reported(act: Act) -> (VmPhase, &'static str, bool) {
        match act {
            Act::Report(r) => (r.phase, r.reason, r.guarded),
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
        let s = status(Some(VmPhase::Running));
        assert_eq!(decide(&facts(&s, true, true)), (Act::Nothing, Then::Resync));
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
    }

    #[test]
    fn spec_running_false_stops_the_guest() {
        let s = status(Some(VmPhase::Running));
        assert_eq!(decide(&facts(&s, false, true)), (Act::Stop, Then::Resync));
        let (act, _) = decide(&facts(&s, false, false));
        assert_eq!(reported(act), (VmPhase::Stopped, "Stopped", false));
        let s = status(Some(VmPhase::Stopped));
        assert_eq!(
            decide(&facts(&s, false, false)),
            (Act::Nothing, Then::Resync)
        );
    }

    #[test]
    fn a_definition_that_does_not_parse_or_takes_a_name_is_failed() {
        let s = status(Some(VmPhase::Pending));
        let mut f = facts(&s, true, false);
        f.invalid_domain = Some("unsupported element <foo>".into());
        let (act, then) = decide(&f);
        assert_eq!(reported(act), (VmPhase::Failed, "InvalidDomain", false));
        assert_eq!(then, Then::AwaitChange);
        let mut f = facts(&s, true, false);
        f.name_taken_by = Some("1234".into());
        let (act, _) = decide(&f);
        assert_eq!(reported(act), (VmPhase::Failed, "NameInUse", false));
    }
}
