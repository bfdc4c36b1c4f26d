//! The agent's metrics (served with the probes by `ferry_runtime::serve`; `/readyz` is
//! ready once the node's heartbeat Lease has been written).

use ferry_crds::{MigrationPhase, StepOutcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    /// `source` (the source QEMU's connections carried out) or `target` (carried in).
    side: String,
}

/// Phases this agent ran, by phase and outcome; its writes of migration statuses; the
/// tunnelled streams it carried.
pub struct Metrics {
    registry: Registry,
    phases: Family<PhaseLabels, Counter>,
    status_writes: Family<WriteLabels, Counter>,
    tunnel: TunnelCounters,
}

/// The connections and bytes of tunnelled migration streams, by side; clones count into
/// the same families.
#[derive(Clone, Default)]
pub struct TunnelCounters {
    connections: Family<TunnelLabels, Counter>,
    bytes: Family<TunnelLabels, Counter>,
}

impl TunnelCounters {
    /// A connection of a tunnelled stream opened on `side`.
    pub fn opened(&self, side: &str) {
        self.connections
            .get_or_create(&TunnelLabels { side: side.into() })
            .inc();
    }

    /// `bytes` of a tunnelled stream carried on `side` (both directions).
    pub fn carried(&self, side: &str, bytes: u64) {
        self.bytes
            .get_or_create(&TunnelLabels { side: side.into() })
            .inc_by(bytes);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferry_agent");
        let phases = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "phases",
            "Migration phases this agent ran, by phase and outcome",
            phases.clone(),
        );
        let status_writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Writes of migration statuses by this agent, by result (ok, conflict, gone, error)",
            status_writes.clone(),
        );
        let tunnel = TunnelCounters::default();
        registry.register(
            "tunnel_connections",
            "Connections of tunnelled migration streams this agent carried, by side (source, target)",
            tunnel.connections.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes of tunnelled migration streams this agent carried, both directions, by side",
            tunnel.bytes.clone(),
        );
        Metrics {
            registry,
            phases,
            status_writes,
            tunnel,
        }
    }
}

impl Metrics {
    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn phase_done(&self, phase: MigrationPhase, outcome: StepOutcome) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.key().into(),
                outcome: format!("{outcome:?}"),
            })
            .inc();
    }

    /// The counters of the tunnelled streams.
    pub fn tunnel(&self) -> TunnelCounters {
        self.tunnel.clone()
    }

    /// The counter of this agent's status writes.
    pub fn status_writes(&self) -> WriteCounter {
        WriteCounter(self.status_writes.clone())
    }
}

/// Counts writes of migration statuses by result; clones count into the same family.
#[derive(Clone)]
pub struct WriteCounter(Family<WriteLabels, Counter>);

impl WriteCounter {
    /// One attempt to write a migration's status ended with `result`.
    pub fn count(&self, result: &str) {
        self.0
            .get_or_create(&WriteLabels {
                result: result.into(),
            })
            .inc();
    }
}
