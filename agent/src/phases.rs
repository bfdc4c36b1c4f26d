//! What the five phases share: the phase names, the decisions that say how a migration
//! ends, and the per-migration record that makes each phase idempotent.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The five phases of the v3 migration protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Begin,
    Prepare,
    Perform,
    Finish,
    Confirm,
}

impl Phase {
    /// Where the phase runs.
    pub fn runs_on_source(self) -> bool {
        matches!(self, Phase::Begin | Phase::Perform | Phase::Confirm)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
