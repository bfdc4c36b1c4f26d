//! Node evacuation, the I/O: every second, for each Node, gathers the facts from the
//! operator's caches, asks [`evacuate::plan`] what to do, creates and cancels the
//! migrations it names and records the Events [`evacuate::Tracker`] asks for, on the
//! Node and on the VMs.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_crds::{VirtualMachine, VirtualMachineMigration};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::evacuate::{self, Attempt, Facts, Guest, NewMigration, Notice, Tracker};
use crate::nodes;

/// How evacuation behaves (the chart's `evacuation` values).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Evacuate cordoned nodes, not only the ones tainted `ferry.dev/evacuate`.
    pub on_cordon: bool,
    /// `spec.transport.tls` of the migrations it creates.
    pub tls: bool,
}

/// The evacuation loop and what it remembers between passes.
pub struct Evacuator {
    pub client: Client,
    pub settings: Settings,
    pub nodes: Store<Node>,
    pub vms: Store<VirtualMachine>,
    pub migrations: Store<VirtualMachineMigration>,
    pub leases: Store<Lease>,
    pub recorder: Recorder,
    /// When this process started leading: older outcomes are not reported again.
    pub since: Timestamp,
    pub trackers: BTreeMap<String, Tracker>,
}

impl Evacuator {
    /// Runs until the process ends.
    pub async fn run(mut self) {
        // The controller fills the migrations cache; an empty one would look like an
        // evacuation that has created nothing yet. kube's readiness signal wakes only
        // the last task that waited on it (the controller waits too), so ask again
        // every second instead of waiting once.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), self.migrations.wait_until_ready())
                .await
            {
                Ok(Ok(())) => break,
                Ok(Err(_)) => {
                    warn!("the migrations cache was dropped; evacuation does not run");
                    return;
                }
                Err(_) => continue,
            }
        }
        info!(
            on_cordon = self.settings.on_cordon,
            "evacuation: watching nodes"
        );
        loop {
            self.pass().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn pass(&mut self) {
        let now = Timestamp::now();
        let live = nodes::live_nodes(&self.leases, now);
        let all_nodes = self.nodes.state();
        let closed = evacuate::closed_nodes(all_nodes.iter().map(|n| &**n));
        let vms = self.vms.state();
        let migrations = self.migrations.state();
        let mut by_label: BTreeMap<&str, Vec<&VirtualMachineMigration>> = BTreeMap::new();
        for m in &migrations {
            if let Some(l) = m.labels().get(evacuate::EVACUATION_LABEL) {
                by_label.entry(l.as_str()).or_default().push(m);
            }
        }
        for node in &all_nodes {
            let name = node.name_any();
            let evacuating = evacuate::evacuating(node, self.settings.on_cordon);
            let mine = by_label
                .get(evacuate::label_value(&name).as_str())
                .cloned()
                .unwrap_or_default();
            if !evacuating && mine.is_empty() && !self.trackers.contains_key(&name) {
                continue;
            }
            let attempts = Attempt::of_node(mine.iter().copied(), &name);
            let guests = Guest::on_node(vms.iter().map(|v| &**v), &name);
            let targets = evacuate::targets(&name, &live, &closed);
            let facts = Facts {
                node: &name,
                evacuating,
                guests: &guests,
                attempts: &attempts,
                targets: &targets,
                now,
            };
            let plan = evacuate::plan(&facts);
            tracing::debug!(node = %name, evacuating, ?plan, "evacuation pass");
            for c in &plan.create {
                self.create(&name, c).await;
            }
            for (ns, migration) in &plan.cancel {
                let rv = mine
                    .iter()
                    .find(|m| m.namespace().as_deref() == Some(ns) && m.name_any() == *migration)
                    .and_then(|m| m.resource_version());
                self.cancel(ns, migration, rv).await;
            }
            let tracker = self.trackers.entry(name.clone()).or_default();
            let notices = tracker.observe(&facts, &plan, self.since);
            if !evacuating && mine.is_empty() {
                self.trackers.remove(&name);
            }
            for notice in notices {
                self.record(node, &name, notice).await;
            }
        }
    }

    async fn create(&self, node: &str, c: &NewMigration) {
        let m: VirtualMachineMigration = serde_json::from_value(json!({
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "VirtualMachineMigration",
            "metadata": {
                "name": c.name,
                "namespace": c.namespace,
                "labels": {
                    evacuate::EVACUATION_LABEL: evacuate::label_value(node),
                    evacuate::ATTEMPT_LABEL: c.attempt.to_string(),
                },
            },
            "spec": {"vmName": c.vm, "transport": {"tls": self.settings.tls}},
        }))
        .expect("a valid VirtualMachineMigration");
        let api: Api<VirtualMachineMigration> = Api::namespaced(self.client.clone(), &c.namespace);
        match api.create(&PostParams::default(), &m).await {
            Ok(_) => {
                info!(node, vm = %c.vm, namespace = %c.namespace, migration = %c.name, attempt = c.attempt, "evacuation: migration created");
            }
            // The cache had not seen it yet: created by an earlier pass (or process).
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                warn!(node, vm = %c.vm, migration = %c.name, error = %e, "evacuation: could not create the migration")
            }
        }
    }

    /// Asks a Pending migration to cancel, unless it changed since it was looked at (it
    /// may have been admitted: then it runs to its end).
    async fn cancel(&self, namespace: &str, migration: &str, rv: Option<String>) {
        let api: Api<VirtualMachineMigration> = Api::namespaced(self.client.clone(), namespace);
        let patch = ferry_crds::cancel_request(rv.as_deref());
        match api.patch(migration, &PatchParams::default(), &patch).await {
            Ok(_) => {
                info!(%migration, %namespace, "evacuation: cancelled a migration that had not started")
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => warn!(%migration, error = %e, "evacuation: could not cancel"),
        }
    }

    async fn record(&self, node: &Node, name: &str, notice: Notice) {
        let node_ref = node.object_ref(&());
        let (kind, reason, note, vm) = match notice {
            Notice::Started { guests } => (
                EventType::Normal,
                "EvacuationStarted",
                format!("evacuating {guests} guest(s) from {name}"),
                None,
            ),
            Notice::Moved {
                namespace,
                vm,
                migration,
                target,
            } => (
                EventType::Normal,
                "EvacuationMoved",
                format!("{namespace}/{vm} moved from {name} to {target} ({migration})"),
                Some((namespace, vm)),
            ),
            Notice::Failed {
                namespace,
                vm,
                migration,
                reason,
                message,
            } => (
                EventType::Warning,
                "EvacuationFailed",
                format!(
                    "{namespace}/{vm} could not leave {name}: migration {migration} failed \
                     ({reason}: {message}); retrying while the node stays closed"
                ),
                Some((namespace, vm)),
            ),
            Notice::Stuck(s) => (
                EventType::Warning,
                "EvacuationStuck",
                format!(
                    "{}/{} cannot leave {name} ({}): {}",
                    s.namespace, s.vm, s.reason, s.message
                ),
                Some((s.namespace, s.vm)),
            ),
            Notice::Done => (
                EventType::Normal,
                "EvacuationDone",
                format!("every guest has left {name}"),
                None,
            ),
            Notice::Stopped {
                remaining,
                cancelled,
            } => (
                EventType::Normal,
                "EvacuationStopped",
                format!(
                    "{name} takes guests again: {remaining} guest(s) still on it; {cancelled} \
                     migration(s) not yet started were cancelled, started ones finish"
                ),
                None,
            ),
        };
        match kind {
            EventType::Warning => warn!(node = name, reason, "{note}"),
            EventType::Normal => info!(node = name, reason, "{note}"),
        }
        let mut event = Event {
            type_: kind,
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: "Evacuate".into(),
            secondary: None,
        };
        let Some((namespace, vm)) = vm else {
            self.publish(&event, &node_ref).await;
            return;
        };
        let vm_ref = self
            .vms
            .get(&ObjectRef::new(&vm).within(&namespace))
            .map(|v| v.object_ref(&()))
            .unwrap_or_else(|| ObjectReference {
                api_version: Some("ferry.dev/v1alpha1".into()),
                kind: Some("VirtualMachine".into()),
                namespace: Some(namespace),
                name: Some(vm),
                ..Default::default()
            });
        // Each names the other as its related object: the recorder folds Events with
        // the same reason and objects into one series, and these are about different
        // guests.
        event.secondary = Some(vm_ref.clone());
        self.publish(&event, &node_ref).await;
        event.secondary = Some(node_ref);
        self.publish(&event, &vm_ref).await;
    }

    async fn publish(&self, event: &Event, reference: &ObjectReference) {
        if let Err(e) = self.recorder.publish(event, reference).await {
            warn!(error = %e, "could not record an Event");
        }
    }
}
