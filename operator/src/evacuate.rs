//! Node evacuation, the pure part: when a node is cordoned (`spec.unschedulable`) or
//! carries the taint `ferry.dev/evacuate`, every guest running there gets a migration
//! (no target: admission picks an open node), retried with a bounded backoff while the
//! node stays closed; a guest with nowhere to go is reported, never stopped.
//!
//! [`plan`] decides, from one node's facts, which migrations to create and cancel and
//! which guests are stuck; [`Tracker`] turns successive plans into the node's Events.
//! The I/O is in `evacuator`.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_crds::{MigrationPhase, VirtualMachine, VirtualMachineMigration, VmPhase};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

/// Label on every migration the evacuation creates; its value is the node (see
/// [`label_value`]).
pub const EVACUATION_LABEL: &str = "ferry.dev/evacuation";
/// Label holding the attempt number (1, 2, ...) of an evacuation migration.
pub const ATTEMPT_LABEL: &str = "ferry.dev/evacuation-attempt";
/// A node with a taint of this key (any value, any effect) is evacuated, cordoned or not.
pub const EVACUATE_TAINT: &str = "ferry.dev/evacuate";
/// Failed attempts in a row after which a guest is reported stuck and left alone.
pub const MAX_ATTEMPTS: u32 = 5;
/// Wait before the attempt after a failed one: 10 s, doubling, at most 160 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(10 << failures.saturating_sub(1).min(4))
}

/// Whether `node` is to be evacuated: tainted `ferry.dev/evacuate`, or cordoned when
/// `on_cordon`.
pub fn evacuating(node: &Node, on_cordon: bool) -> bool {
    tainted(node) || (on_cordon && cordoned(node))
}

/// Whether `node` takes no new guests: cordoned or tainted `ferry.dev/evacuate`.
/// Admission never picks such a node as a target.
pub fn closed(node: &Node) -> bool {
    cordoned(node) || tainted(node)
}

fn cordoned(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn tainted(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == EVACUATE_TAINT))
}

/// The names of the nodes closed to new guests.
pub fn closed_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<String> {
    nodes
        .into_iter()
        .filter(|n| closed(n))
        .map(|n| n.name_any())
        .collect()
}

/// The value of [`EVACUATION_LABEL`] for `node`: the node name, or, when it is longer
/// than a label value may be (63), a shortened form with a hash of the whole name.
pub fn label_value(node: &str) -> String {
    bounded(node, 63)
}

/// The name of evacuation attempt `attempt` of VM `vm` from `node`:
/// `evacuate-<vm>-<node>-<attempt>`, the same in every operator process, so that a
/// restarted operator finds the migrations it created instead of creating them again.
pub fn migration_name(vm: &str, node: &str, attempt: u32) -> String {
    bounded(&format!("evacuate-{vm}-{node}-{attempt}"), 253)
}

/// `s` if it has at most `max` characters; else its first characters, a dash and a
/// hash of the whole, `max` characters at most and still a valid DNS name.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let hash = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let prefix = s[..max - 17].trim_end_matches(['-', '.']);
    format!("{prefix}-{hash:016x}")
}

/// One guest whose `status.nodeName` is the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub namespace: String,
    pub name: String,
    /// Running (or Migrating): a QEMU to move. Other phases are not moved.
    pub running: bool,
    /// The migration holding the VM (`status.migration`), if any.
    pub held_by: Option<String>,
}

impl Guest {
    /// The guests of `vms` whose `status.nodeName` is `node`.
    pub fn on_node<'a>(
        vms: impl IntoIterator<Item = &'a VirtualMachine>,
        node: &str,
    ) -> Vec<Guest> {
        let mut guests: Vec<Guest> = vms
            .into_iter()
            .filter_map(|vm| {
                let status = vm.status.as_ref()?;
                (status.node_name.as_deref() == Some(node)).then(|| Guest {
                    namespace: vm.namespace().unwrap_or_default(),
                    name: vm.name_any(),
                    // A VM being deleted is powered off where it is, not moved.
                    running: matches!(status.phase, Some(VmPhase::Running | VmPhase::Migrating))
                        && vm.metadata.deletion_timestamp.is_none(),
                    held_by: status.migration.clone(),
                })
            })
            .collect();
        guests.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        guests
    }
}

/// One evacuation migration of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub namespace: String,
    pub name: String,
    pub vm: String,
    pub number: u32,
    /// None until the operator has seen it.
    pub phase: Option<MigrationPhase>,
    pub cancel_asked: bool,
    /// When it reached its terminal phase.
    pub ended: Option<Timestamp>,
    /// Where it went (status.targetNode).
    pub target: Option<String>,
    /// The reason and message of its `Failed` condition.
    pub failure: Option<(String, String)>,
}

impl Attempt {
    /// The evacuation migrations of `node` among `migrations`.
    pub fn of_node<'a>(
        migrations: impl IntoIterator<Item = &'a VirtualMachineMigration>,
        node: &str,
    ) -> Vec<Attempt> {
        let label = label_value(node);
        migrations
            .into_iter()
            .filter(|m| m.labels().get(EVACUATION_LABEL) == Some(&label))
            .map(|m| {
                let status = m.status.clone().unwrap_or_default();
                let terminal = status.phase.is_some_and(MigrationPhase::is_terminal);
                Attempt {
                    namespace: m.namespace().unwrap_or_default(),
                    name: m.name_any(),
                    vm: m.spec.vm_name.clone(),
                    number: m
                        .labels()
                        .get(ATTEMPT_LABEL)
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(1),
                    phase: status.phase,
                    cancel_asked: m.spec.cancel || m.metadata.deletion_timestamp.is_some(),
                    ended: terminal
                        .then(|| status.phase_transition_time.as_ref().map(|t| t.0))
                        .flatten(),
                    target: status.target_node.clone(),
                    failure: status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == ferry_crds::conditions::FAILED && c.status == "True")
                        .map(|c| (c.reason.clone(), c.message.clone())),
                }
            })
            .collect()
    }

    fn pending(&self) -> bool {
        matches!(self.phase, None | Some(MigrationPhase::Pending))
    }

    fn ended(&self) -> bool {
        self.phase.is_some_and(MigrationPhase::is_terminal)
    }
}

/// Everything [`plan`] looks at for one node.
pub struct Facts<'a> {
    pub node: &'a str,
    /// Whether the node is to be evacuated now ([`evacuating`]).
    pub evacuating: bool,
    /// The guests whose `status.nodeName` is the node.
    pub guests: &'a [Guest],
    /// The node's evacuation migrations.
    pub attempts: &'a [Attempt],
    /// Nodes a guest could go to: live agent, open, not this node.
    pub targets: &'a [String],
    pub now: Timestamp,
}

/// A migration to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMigration {
    pub namespace: String,
    pub name: String,
    pub vm: String,
    pub attempt: u32,
}

/// A guest that cannot leave the node; it keeps running there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stuck {
    pub namespace: String,
    pub vm: String,
    pub reason: String,
    pub message: String,
}

/// What to do for one node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub create: Vec<NewMigration>,
    /// Pending evacuation migrations to cancel (namespace, name): the node was opened
    /// again, or their guest is no longer there.
    pub cancel: Vec<(String, String)>,
    pub stuck: Vec<Stuck>,
    /// Running guests still on the node.
    pub remaining: usize,
    /// When to look again at the earliest for a retry that is waiting out its backoff.
    pub retry_at: Option<Timestamp>,
}

/// Decides what to do for one node.
pub fn plan(f: &Facts) -> Plan {
    let mut plan = Plan::default();
    let here: BTreeSet<(&str, &str)> = f
        .guests
        .iter()
        .map(|g| (g.namespace.as_str(), g.name.as_str()))
        .collect();
    for a in f.attempts {
        let still_here = here.contains(&(a.namespace.as_str(), a.vm.as_str()));
        if a.pending() && !a.cancel_asked && (!f.evacuating || !still_here) {
            plan.cancel.push((a.namespace.clone(), a.name.clone()));
        }
    }
    plan.remaining = f.guests.iter().filter(|g| g.running).count();
    if !f.evacuating {
        return plan;
    }
    for g in f.guests.iter().filter(|g| g.running) {
        let mut mine: Vec<&Attempt> = f
            .attempts
            .iter()
            .filter(|a| a.namespace == g.namespace && a.vm == g.name)
            .collect();
        mine.sort_by_key(|a| a.number);
        if mine.iter().any(|a| !a.ended()) {
            continue; // in flight (or waiting for admission)
        }
        if g.held_by.is_some() {
            continue; // another migration moves it; look again when it has ended
        }
        if f.targets.is_empty() {
            plan.stuck.push(Stuck {
                namespace: g.namespace.clone(),
                vm: g.name.clone(),
                reason: "NoTarget".into(),
                message: format!(
                    "no node other than {} has a live Ferry agent and is open to guests \
                     (not cordoned, no {EVACUATE_TAINT} taint); the guest keeps running there",
                    f.node
                ),
            });
            continue;
        }
        let next = mine.last().map_or(1, |a| a.number + 1);
        let failures = mine
            .iter()
            .rev()
            .take_while(|a| a.phase != Some(MigrationPhase::Succeeded))
            .count() as u32;
        if failures >= MAX_ATTEMPTS {
            let last = mine.last().expect("failures counts attempts");
            let (reason, message) = last
                .failure
                .clone()
                .unwrap_or_else(|| ("Failed".into(), "the migration failed".into()));
            plan.stuck.push(Stuck {
                namespace: g.namespace.clone(),
                vm: g.name.clone(),
                reason,
                message: format!(
                    "gave up after {failures} failed migrations (the last, {}: {message}); \
                     the guest keeps running on {}; delete the failed migrations \
                     (kubectl delete vmm -l {EVACUATION_LABEL}={}) to try again",
                    last.name,
                    f.node,
                    label_value(f.node)
                ),
            });
            continue;
        }
        // After a success the guest should be gone; if it is still listed here the cache
        // may be behind: wait as after a failure.
        let wait = backoff(failures.max(1));
        if let Some(ended) = mine.last().and_then(|a| a.ended) {
            let at = ended + wait;
            if at > f.now {
                plan.retry_at = Some(plan.retry_at.map_or(at, |r| r.min(at)));
                continue;
            }
        }
        plan.create.push(NewMigration {
            namespace: g.namespace.clone(),
            name: migration_name(&g.name, f.node, next),
            vm: g.name.clone(),
            attempt: next,
        });
    }
    plan
}

/// Something to record as an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The evacuation of the node started: this many guests to move.
    Started { guests: usize },
    /// A guest moved (its migration Succeeded).
    Moved {
        namespace: String,
        vm: String,
        migration: String,
        target: String,
    },
    /// An evacuation migration of a guest failed; it is retried.
    Failed {
        namespace: String,
        vm: String,
        migration: String,
        reason: String,
        message: String,
    },
    /// A guest cannot leave (Warning on the node and the VM).
    Stuck(Stuck),
    /// Every guest has left the node.
    Done,
    /// The node was opened again while guests were still there.
    Stopped { remaining: usize, cancelled: usize },
}

/// What the operator remembers about one node between passes, to record each Event
/// once. Lost on restart: a new leader may repeat a `Started` or `Stuck` Event, never
/// a `Moved` or `Failed` one for a migration that ended before it started.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Evacuating, with guests to move seen during this evacuation.
    active: bool,
    done: bool,
    stuck: BTreeSet<Stuck>,
    reported: BTreeSet<String>,
}

impl Tracker {
    /// The Events to record after `plan` for this node; `since` is when this operator
    /// process started (migrations that ended before are not reported).
    pub fn observe(&mut self, f: &Facts, plan: &Plan, since: Timestamp) -> Vec<Notice> {
        let mut notices = Vec::new();
        for a in f.attempts.iter().filter(|a| a.ended()) {
            if a.ended.is_none_or(|t| t < since) || self.reported.contains(&a.name) {
                continue;
            }
            self.reported.insert(a.name.clone());
            if a.phase == Some(MigrationPhase::Succeeded) {
                notices.push(Notice::Moved {
                    namespace: a.namespace.clone(),
                    vm: a.vm.clone(),
                    migration: a.name.clone(),
                    target: a.target.clone().unwrap_or_default(),
                });
            } else if f.evacuating {
                let (reason, message) = a
                    .failure
                    .clone()
                    .unwrap_or_else(|| ("Failed".into(), "the migration failed".into()));
                notices.push(Notice::Failed {
                    namespace: a.namespace.clone(),
                    vm: a.vm.clone(),
                    migration: a.name.clone(),
                    reason,
                    message,
                });
            }
        }
        if !f.evacuating {
            if self.active && plan.remaining > 0 {
                notices.push(Notice::Stopped {
                    remaining: plan.remaining,
                    cancelled: plan.cancel.len(),
                });
            }
            self.active = false;
            self.done = false;
            self.stuck.clear();
            return notices;
        }
        if plan.remaining > 0 && !self.active {
            self.active = true;
            self.done = false;
            notices.push(Notice::Started {
                guests: plan.remaining,
            });
        }
        let now_stuck: BTreeSet<Stuck> = plan.stuck.iter().cloned().collect();
        for s in now_stuck.difference(&self.stuck) {
            notices.push(Notice::Stuck(s.clone()));
        }
        self.stuck = now_stuck;
        let in_flight = f.attempts.iter().any(|a| !a.ended());
        if self.active && plan.remaining == 0 && !in_flight && !self.done {
            // Over: a guest that arrives later (opened node, new migration) starts a
            // new evacuation or, once the node is open, is none of its business.
            self.active = false;
            self.done = true;
            notices.push(Notice::Done);
        }
        notices
    }
}

/// Nodes a guest of `node` could go to: live, open, not `node`.
pub fn targets(node: &str, live: &[String], closed: &BTreeSet<String>) -> Vec<String> {
    live.iter()
        .filter(|n| *n != node && !closed.contains(*n))
        .cloned()
        .collect()
}

#[cfg(test)]
#[path = "evacuate_tests.rs"]
mod tests;
