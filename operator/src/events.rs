//! Kubernetes Events about migrations, published off the reconcile's path.
//!
//! kube-runtime's `Recorder` keeps every Event it published for six minutes in a hash
//! map (to fold repeats into a series), and a hash map's table never shrinks: one
//! Recorder shared by every migration made the operator's memory follow the busiest
//! six minutes it ever saw. A migration's Events are distinct steps of its story, not
//! repeats, so each is published through a Recorder of its own, dropped once the Event
//! is written. (The evacuator keeps its shared Recorder: it does repeat "no target"
//! warnings, and a closed node is rare.)

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};
use tracing::warn;

/// Publishes Events as one reporter.
#[derive(Clone)]
pub struct Events {
    client: Client,
    reporter: Reporter,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter }
    }

    /// A Recorder sharing this reporter, for callers that want series folding.
    pub fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }

    /// Publishes `event` about `regarding` in the background; a failure is logged,
    /// never returned: no phase waits for an Event.
    pub fn publish(&self, event: Event, regarding: ObjectReference) {
        let recorder = self.recorder();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &regarding).await {
                warn!(error = %e, reason = %event.reason, "could not record an Event");
            }
        });
    }
}
