//! The agent's one table of running work, by migration uid: the phases it runs (managed,
//! driven peer-to-peer, or served to a peer), the peer-to-peer drivers, and the target's
//! watchers of incoming QEMUs. A task is in the table while its [`Running`] guard
//! lives; the dispatcher reaches a task through the table only — to cancel it, or to
//! pass a running Perform what the target reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_agent::postcopy::TargetReport;
use ferry_crds::MigrationPhase;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A kind of work on one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// A phase this node runs.
    Phase(MigrationPhase),
    /// The source's driver of a peer-to-peer migration.
    Driver,
    /// The target's watcher of its incoming QEMU during Perform (post-copy recovery).
    TargetWatch,
}

type Key = (String, Task);

struct Entry {
    /// Tells apart an entry from a newer one under the same key.
    id: u64,
    cancel: CancellationToken,
    /// A running Perform's view of what the target reports.
    reports: Option<watch::Sender<TargetReport>>,
}

/// The table; clones share it.
#[derive(Clone, Default)]
pub struct Tasks {
    inner: Arc<Mutex<HashMap<Key, Entry>>>,
    next_id: Arc<AtomicU64>,
}

/// A task in the table; dropping it takes the task out.
pub struct Running {
    tasks: Tasks,
    key: Key,
    id: u64,
    /// Fires when the dispatcher cancels the task.
    pub cancel: CancellationToken,
}

impl Tasks {
    fn table(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.inner.lock().expect("the task table is never poisoned")
    }

    /// Puts `task` of migration `uid` in the table, unless it is there already.
    pub fn start(&self, uid: &str, task: Task) -> Option<Running> {
        let key = (uid.to_string(), task);
        let mut table = self.table();
        if table.contains_key(&key) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        table.insert(
            key.clone(),
            Entry {
                id,
                cancel: cancel.clone(),
                reports: None,
            },
        );
        Some(Running {
            tasks: self.clone(),
            key,
            id,
            cancel,
        })
    }

    /// Whether `task` of `uid` runs.
    #[cfg(test)]
    fn runs(&self, uid: &str, task: Task) -> bool {
        self.table().contains_key(&(uid.to_string(), task))
    }

    /// Cancels the tasks of `uid` that `which` picks. They stay in the table until they
    /// ended, so the same work does not start again while they wind down.
    pub fn cancel(&self, uid: &str, which: impl Fn(Task) -> bool) {
        for ((u, task), entry) in self.table().iter() {
            if u == uid && which(*task) {
                entry.cancel.cancel();
            }
        }
    }

    /// Cancels `task` of `uid` and takes it out of the table at once: a newer one may
    /// start while it winds down (a watcher, which changes nothing).
    pub fn stop(&self, uid: &str, task: Task) {
        if let Some(entry) = self.table().remove(&(uid.to_string(), task)) {
            entry.cancel.cancel();
        }
    }

    /// What the target reports, from `initial` on, to the running `phase` of `uid` (one
    /// of [`HEARS_THE_TARGET`]), for as long as it runs.
    pub fn listen(
        &self,
        uid: &str,
        phase: MigrationPhase,
        initial: TargetReport,
    ) -> watch::Receiver<TargetReport> {
        let (tx, rx) = watch::channel(initial);
        let key = (uid.to_string(), Task::Phase(phase));
        if let Some(entry) = self.table().get_mut(&key) {
            entry.reports = Some(tx);
        }
        rx
    }

    /// Passes `report` to the running phases of `uid` that listen, if it is news.
    pub fn report(&self, uid: &str, report: &TargetReport) {
        let table = self.table();
        for phase in HEARS_THE_TARGET {
            let key = (uid.to_string(), Task::Phase(phase));
            if let Some(tx) = table.get(&key).and_then(|e| e.reports.as_ref()) {
                tx.send_if_modified(|current| {
                    let changed = current != report;
                    if changed {
                        *current = report.clone();
                    }
                    changed
                });
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut table = self.tasks.table();
        // A cancelled task's entry is gone already, and may be a newer task's now.
        if table.get(&self.key).is_some_and(|e| e.id == self.id) {
            table.remove(&self.key);
        }
    }
}

/// The phases the source runs while the stream may need recovering: Perform, and
/// Confirm, which waits for a post-copy migration's last pages.
pub const HEARS_THE_TARGET: [MigrationPhase; 2] =
    [MigrationPhase::Perform, MigrationPhase::Confirm];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_runs_once_until_its_guard_goes() {
        let tasks = Tasks::default();
        let perform = Task::Phase(MigrationPhase::Perform);
        let first = tasks.start("u", perform).unwrap();
        assert!(tasks.start("u", perform).is_none());
        assert!(tasks.start("v", perform).is_some_and(|_| true));
        assert!(tasks.runs("u", perform));
        drop(first);
        assert!(!tasks.runs("u", perform));
        assert!(tasks.start("u", perform).is_some());
    }

    #[test]
    fn a_cancelled_phase_holds_its_place_a_stopped_watcher_does_not() {
        let tasks = Tasks::default();
        let perform = Task::Phase(MigrationPhase::Perform);
        let running = tasks.start("u", perform).unwrap();
        tasks.cancel("u", |t| t == perform);
        assert!(running.cancel.is_cancelled());
        assert!(tasks.start("u", perform).is_none(), "it winds down first");
        let old = tasks.start("u", Task::TargetWatch).unwrap();
        tasks.stop("u", Task::TargetWatch);
        assert!(old.cancel.is_cancelled());
        let new = tasks.start("u", Task::TargetWatch).unwrap();
        drop(old);
        assert!(
            tasks.runs("u", Task::TargetWatch),
            "the old guard left the new entry"
        );
        drop(new);
        assert!(!tasks.runs("u", Task::TargetWatch));
    }

    #[test]
    fn a_running_perform_hears_only_news() {
        let tasks = Tasks::default();
        let perform = tasks
            .start("u", Task::Phase(MigrationPhase::Perform))
            .unwrap();
        let mut rx = tasks.listen("u", MigrationPhase::Perform, TargetReport::default());
        let report = TargetReport {
            listens_at: Some("tcp:127.0.0.3:4445".into()),
            lost: None,
        };
        tasks.report("u", &report);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), report);
        tasks.report("u", &report);
        assert!(!rx.has_changed().unwrap());
        drop(perform);
        assert!(rx.has_changed().is_err(), "the Perform is over");
        // Confirm, waiting for a post-copy tail, hears the target too.
        let confirm = tasks
            .start("u", Task::Phase(MigrationPhase::Confirm))
            .unwrap();
        let mut rx = tasks.listen("u", MigrationPhase::Confirm, TargetReport::default());
        tasks.report("u", &report);
        assert_eq!(*rx.borrow_and_update(), report);
        drop(confirm);
    }
}
