//! The migration policy, decided without QEMU: [`resolve`] turns the spec's
//! `policy` (a [`Preset`] plus explicit fields) into the effective [`Policy`];
//! [`Policy::settings`] lists the QMP capabilities and parameters each side gets before
//! the transfer; [`Convergence`] judges from the last passes whether pre-copy converges;
//! [`decide`] says, on every progress sample, whether to go on, switch to post-copy or
//! abort because a limit was hit. Only `apply` (policy/apply.rs) talks to QEMU: it sets
//! one side's [`Settings`] over QMP, failing with an [`ApplyError`].

mod apply;

pub use apply::ApplyError;
pub(crate) use apply::apply;

use ferry_crds::{Compression, MigrationPolicy, PostCopyMode, Preset};
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::time::Duration;

/// Bandwidth meaning "unlimited" (QEMU's own default is 128 MiB/s).
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 50;
/// QEMU's `max-cpu-throttle` (left at its default): the most auto-converge throttles.
pub const MAX_CPU_THROTTLE: u64 = 99;
/// Passes (after the first full copy) the convergence judgement looks at.
pub const WINDOW: usize = 3;
/// Pre-copy does not converge while the dirty rate is at least this share of the
/// throughput.
pub const NOT_CONVERGING_RATIO: f64 = 0.9;
/// The downtime limit a migration starts with (the policy's maximum if that is lower):
/// QEMU switches over as soon as what is left fits in it, so an easy guest pauses
/// little. QEMU's own default is 300 ms.
pub const INITIAL_DOWNTIME_MS: u64 = 50;
/// Passes over which the limit rises from [`INITIAL_DOWNTIME_MS`] to the maximum.
pub const DOWNTIME_STEPS: u64 = 5;
/// Progress means the remaining bytes fell below this share of their lowest value so far.
const PROGRESS_RATIO: f64 = 0.99;

/// When to switch to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostCopy {
    Never,
    /// When pre-copy does not converge (with auto-converge: once the throttle is at its
    /// maximum and it still does not).
    Allowed,
    /// After this long in pre-copy.
    After(Duration),
}

/// The effective policy of one migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Bytes per second; `None` is unlimited.
    pub max_bandwidth: Option<u64>,
    /// Longest acceptable pause at switch-over.
    pub max_downtime_ms: u64,
    /// Multifd channels; 1 with no compression is a single plain stream.
    pub parallel_connections: u8,
    pub compression: Compression,
    pub auto_converge: bool,
    pub post_copy: PostCopy,
    /// Abort pre-copy after this long per GiB of guest memory.
    pub completion_timeout_per_gib: Option<Duration>,
    /// Abort pre-copy when the remaining bytes did not shrink for this long.
    pub progress_timeout: Option<Duration>,
}

impl Default for Policy {
    /// The Balanced preset.
    fn default() -> Self {
        preset(Preset::Balanced)
    }
}

/// A policy the agent cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy field {field} is {value}: {why}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        why: &'static str,
    },
    #[error(
        "post-copy ({mode:?}) cannot be combined with multifd (parallelConnections {channels}, compression {compression:?}): QEMU (up to 10.0) cannot switch a multifd stream to post-copy"
    )]
    PostCopyWithMultifd {
        mode: PostCopyMode,
        channels: u8,
        compression: Compression,
    },
    /// The node's QEMU lacks a capability the policy needs ([`crate::qemu`]).
    #[error(
        "policy field {field} needs QEMU's migration capability {capability}, which QEMU {version} on node {node} does not offer"
    )]
    Unsupported {
        capability: &'static str,
        field: &'static str,
        version: String,
        node: String,
    },
}

/// What a preset sets (see the `Preset` docs in the CRD).
pub fn preset(p: Preset) -> Policy {
    let secs = Duration::from_secs;
    match p {
        Preset::Fastest => Policy {
            max_bandwidth: None,
            max_downtime_ms: 1000,
            parallel_connections: 4,
            compression: Compression::None,
            auto_converge: true,
            post_copy: PostCopy::Never,
            completion_timeout_per_gib: Some(secs(150)),
            progress_timeout: Some(secs(60)),
        },
        Preset::Safest => Policy {
            max_bandwidth: None,
            max_downtime_ms: 300,
            parallel_connections: 1,
            compression: Compression::None,
            auto_converge: true,
            post_copy: PostCopy::Never,
            completion_timeout_per_gib: Some(secs(800)),
            progress_timeout: Some(secs(300)),
        },
        Preset::Balanced => Policy {
            max_bandwidth: None,
            max_downtime_ms: 500,
            parallel_connections: 1,
            compression: Compression::None,
            auto_converge: true,
            post_copy: PostCopy::Allowed,
            completion_timeout_per_gib: Some(secs(300)),
            progress_timeout: Some(secs(150)),
        },
    }
}

fn positive(field: &'static str, v: i64) -> Result<u64, PolicyError> {
    if v < 1 {
        return Err(PolicyError::OutOfRange {
            field,
            value: v,
            why: "must be at least 1",
        });
    }
    Ok(v as u64)
}

/// The effective policy: the preset (Balanced when absent), with every explicit field
/// of `spec` overriding it.
pub fn resolve(spec: &MigrationPolicy) -> Result<Policy, PolicyError> {
    let mut p = preset(spec.preset.unwrap_or_default());
    if let Some(b) = spec.bandwidth_mi_bps {
        p.max_bandwidth = match b {
            0 => None,
            b if b < 0 => {
                return Err(PolicyError::OutOfRange {
                    field: "bandwidthMiBps",
                    value: b,
                    why: "must not be negative",
                });
            }
            b => Some((b as u64).saturating_mul(1 << 20)),
        };
    }
    if let Some(d) = spec.max_downtime_ms {
        p.max_downtime_ms = positive("maxDowntimeMs", d)?;
    }
    if let Some(c) = spec.parallel_connections {
        if !(1..=64).contains(&c) {
            return Err(PolicyError::OutOfRange {
                field: "parallelConnections",
                value: c.into(),
                why: "must be between 1 and 64",
            });
        }
        p.parallel_connections = c as u8;
    }
    if let Some(c) = spec.compression {
        p.compression = c;
    }
    if let Some(a) = spec.auto_converge {
        p.auto_converge = a;
    }
    if let Some(pc) = &spec.post_copy {
        p.post_copy = match pc.mode {
            PostCopyMode::Never => PostCopy::Never,
            PostCopyMode::Allowed => PostCopy::Allowed,
            PostCopyMode::AfterSeconds => {
                let s = pc.after_seconds.unwrap_or(0);
                if s < 0 {
                    return Err(PolicyError::OutOfRange {
                        field: "postCopy.afterSeconds",
                        value: s,
                        why: "must not be negative",
                    });
                }
                PostCopy::After(Duration::from_secs(s as u64))
            }
        };
    }
    if let Some(t) = spec.completion_timeout_per_gi_b_seconds {
        p.completion_timeout_per_gib = Some(Duration::from_secs(positive(
            "completionTimeoutPerGiBSeconds",
            t,
        )?));
    }
    if let Some(t) = spec.progress_timeout_seconds {
        p.progress_timeout = Some(Duration::from_secs(positive("progressTimeoutSeconds", t)?));
    }
    // An explicit field wins over what the preset set for the other side of the
    // multifd / post-copy conflict; only two explicit fields can conflict.
    if p.check().is_err() {
        let explicit_multifd = spec.parallel_connections.is_some_and(|c| c > 1)
            || spec.compression.is_some_and(|c| c != Compression::None);
        match (spec.post_copy.is_some(), explicit_multifd) {
            (false, _) => p.post_copy = PostCopy::Never,
            (true, false) => {
                p.parallel_connections = 1;
                p.compression = Compression::None;
            }
            (true, true) => {}
        }
    }
    p.check()?;
    Ok(p)
}

/// Which QEMU a setting is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The running guest, before `migrate`.
    Source,
    /// The incoming QEMU, before `migrate-incoming`.
    Target,
}

/// What one side's QEMU gets: `migrate-set-capabilities`, then `migrate-set-parameters`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub capabilities: Vec<(&'static str, bool)>,
    pub parameters: Map<String, Value>,
}

impl Settings {
    /// The `migrate-set-capabilities` arguments.
    pub fn capabilities_args(&self) -> Value {
        let caps: Vec<Value> = self
            .capabilities
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        json!({ "capabilities": caps })
    }

    /// The `migrate-set-parameters` arguments.
    pub fn parameters_args(&self) -> Value {
        Value::Object(self.parameters.clone())
    }
}

impl Policy {
    /// Refuses combinations QEMU cannot run.
    pub fn check(&self) -> Result<(), PolicyError> {
        if self.post_copy != PostCopy::Never && self.multifd() {
            return Err(PolicyError::PostCopyWithMultifd {
                mode: match self.post_copy {
                    PostCopy::Allowed => PostCopyMode::Allowed,
                    _ => PostCopyMode::AfterSeconds,
                },
                channels: self.parallel_connections,
                compression: self.compression,
            });
        }
        Ok(())
    }

    /// The QEMU migration capabilities this policy turns on, each with the policy field
    /// that asks for it (see [`crate::qemu::QemuFeatures::check`]).
    pub fn needs(&self) -> Vec<(&'static str, &'static str)> {
        let mut needs = vec![("events", "progress (always)")];
        if self.multifd() {
            needs.push(("multifd", "parallelConnections or compression"));
        }
        if self.post_copy != PostCopy::Never {
            needs.push(("postcopy-ram", "postCopy.mode"));
            needs.push(("postcopy-preempt", "postCopy.mode"));
        }
        if self.auto_converge {
            needs.push(("auto-converge", "autoConverge"));
        }
        needs
    }

    /// Whether the stream uses multifd (several connections, or compression).
    pub fn multifd(&self) -> bool {
        self.parallel_connections > 1 || self.compression != Compression::None
    }

    /// The capabilities and parameters of `side`. Every capability the policy governs is
    /// listed, on or off, so a QEMU reused by a re-run gets exactly this policy.
    pub fn settings(&self, side: Side) -> Settings {
        let multifd = self.multifd();
        let post_copy = self.post_copy != PostCopy::Never;
        // Post-copy with a channel of its own for the pages the target faults on, so
        // they do not queue behind the background stream (libvirt's
        // VIR_MIGRATE_POSTCOPY_PREEMPT); both sides must have it.
        let mut capabilities = vec![
            ("events", true),
            ("multifd", multifd),
            ("postcopy-ram", post_copy),
            ("postcopy-preempt", post_copy),
        ];
        let mut parameters = Map::new();
        if multifd {
            parameters.insert("multifd-channels".into(), json!(self.parallel_connections));
            parameters.insert(
                "multifd-compression".into(),
                json!(compression_name(self.compression)),
            );
        }
        if side == Side::Source {
            capabilities.push(("auto-converge", self.auto_converge));
            parameters.extend(self.live_parameters());
        }
        Settings {
            capabilities,
            parameters,
        }
    }

    /// The parameters that may change while a migration runs (a re-run of Perform
    /// applies them to the migration it follows); the downtime limit is the ramp's first
    /// ([`Policy::downtime_limit`]), which Perform raises pass by pass.
    pub fn live_parameters(&self) -> Map<String, Value> {
        let mut p = Map::new();
        p.insert(
            "max-bandwidth".into(),
            json!(self.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH)),
        );
        // The limit holds after a switch to post-copy too (QEMU's 0: unlimited).
        p.insert(
            "max-postcopy-bandwidth".into(),
            json!(self.max_bandwidth.unwrap_or(0)),
        );
        p.insert("downtime-limit".into(), json!(self.downtime_limit(1)));
        p
    }

    /// QEMU's downtime limit during RAM pass `pass` (its dirty-sync-count): the initial
    /// limit for the first full copy and the pass after it, then one step higher per
    /// pass that did not end the migration, reaching the policy's maximum after
    /// [`DOWNTIME_STEPS`] steps and never going above it (OpenStack Nova ramps its
    /// downtime the same way, in time rather than passes).
    pub fn downtime_limit(&self, pass: u64) -> u64 {
        let max = self.max_downtime_ms;
        let start = INITIAL_DOWNTIME_MS.min(max);
        let step = pass.saturating_sub(2).min(DOWNTIME_STEPS);
        start + (max - start) * step / DOWNTIME_STEPS
    }

    /// The completion timeout for a guest with `total_bytes` of memory.
    pub fn completion_timeout(&self, total_bytes: u64) -> Option<Duration> {
        self.completion_timeout_per_gib
            .map(|t| t.mul_f64(total_bytes as f64 / (1u64 << 30) as f64))
    }
}

/// QEMU's name of a multifd compression.
pub fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Zstd => "zstd",
        Compression::Zlib => "zlib",
    }
}

/// One progress sample, from `query-migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// QEMU's dirty-sync-count: 1 during the first full copy.
    pub pass: u64,
    pub total_bytes: u64,
    pub remaining_bytes: u64,
    pub dirty_rate: u64,
    /// Bytes per second.
    pub throughput: u64,
    pub cpu_throttle_percent: u64,
    pub post_copy: bool,
    /// Time since the migration started (QEMU's total-time).
    pub elapsed: Duration,
}

/// Whether pre-copy converges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Not enough passes yet.
    Unknown,
    Converging,
    /// The dirty rate stayed at or above [`NOT_CONVERGING_RATIO`] of the throughput over
    /// the last [`WINDOW`] passes.
    NotConverging,
}

impl Judgement {
    pub fn converging(self) -> Option<bool> {
        match self {
            Judgement::Unknown => None,
            Judgement::Converging => Some(true),
            Judgement::NotConverging => Some(false),
        }
    }
}

/// The last sample of each of the last passes, and the progress of the remaining bytes.
#[derive(Debug, Clone, Default)]
pub struct Convergence {
    passes: VecDeque<Sample>,
    lowest_remaining: Option<u64>,
    last_progress: Duration,
}

impl Convergence {
    pub fn observe(&mut self, s: &Sample) {
        match self.passes.back_mut() {
            Some(last) if last.pass == s.pass => *last = *s,
            _ => {
                self.passes.push_back(*s);
                if self.passes.len() > WINDOW {
                    self.passes.pop_front();
                }
            }
        }
        let progressed = match self.lowest_remaining {
            None => true,
            Some(low) => (s.remaining_bytes as f64) < low as f64 * PROGRESS_RATIO,
        };
        if progressed {
            self.lowest_remaining = Some(s.remaining_bytes);
            self.last_progress = s.elapsed;
        }
    }

    /// The judgement over the last [`WINDOW`] passes from the third on: QEMU computes
    /// the rates at the sync that starts a pass, over the pass before, so pass 2 still
    /// describes the first full copy.
    pub fn judge(&self) -> Judgement {
        let judged: Vec<&Sample> = self.passes.iter().filter(|s| s.pass >= 3).collect();
        if judged.len() < WINDOW {
            return Judgement::Unknown;
        }
        let hot = judged
            .iter()
            .all(|s| s.dirty_rate as f64 >= NOT_CONVERGING_RATIO * s.throughput as f64);
        if hot {
            Judgement::NotConverging
        } else {
            Judgement::Converging
        }
    }

    /// How long the remaining bytes have not shrunk, as of `now` (migration time).
    pub fn since_progress(&self, now: Duration) -> Duration {
        now.saturating_sub(self.last_progress)
    }
}

/// Estimated time to completion: in post-copy the rest at full throughput; in
/// converging pre-copy the remaining bytes over what each second takes off them; `None`
/// when pre-copy does not converge or nothing moves yet.
pub fn eta(s: &Sample, judgement: Judgement) -> Option<Duration> {
    if s.throughput == 0 {
        return None;
    }
    let net = if s.post_copy || s.pass <= 1 {
        s.throughput as f64
    } else if judgement == Judgement::NotConverging {
        return None;
    } else {
        s.throughput as f64 - s.dirty_rate.min(s.throughput) as f64
    };
    if net <= 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(s.remaining_bytes as f64 / net))
}

/// A limit of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Completion { limit: Duration },
    Progress { limit: Duration },
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Completion { limit } => write!(
                f,
                "completion timeout: pre-copy ran longer than {:.1} s (completionTimeoutPerGiBSeconds times the guest's memory)",
                limit.as_secs_f64()
            ),
            Limit::Progress { limit } => write!(
                f,
                "progress timeout: the remaining data did not shrink for {:.1} s (progressTimeoutSeconds)",
                limit.as_secs_f64()
            ),
        }
    }
}

/// What Perform does after a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Continue,
    /// `migrate-start-postcopy`, with the reason.
    StartPostCopy(String),
    /// `migrate_cancel`: a limit was hit.
    Abort(Limit),
}

/// Decides what to do after `s`: post-copy never aborts (it cannot be cancelled);
/// otherwise the timeouts first, then the switch to post-copy.
pub fn decide(policy: &Policy, conv: &Convergence, s: &Sample) -> Action {
    if s.post_copy {
        return Action::Continue;
    }
    if let Some(limit) = policy.completion_timeout(s.total_bytes)
        && s.total_bytes > 0
        && s.elapsed > limit
    {
        return Action::Abort(Limit::Completion { limit });
    }
    if let Some(limit) = policy.progress_timeout
        && conv.since_progress(s.elapsed) > limit
    {
        return Action::Abort(Limit::Progress { limit });
    }
    match policy.post_copy {
        PostCopy::Never => Action::Continue,
        PostCopy::After(after) if s.elapsed >= after => Action::StartPostCopy(format!(
            "{:.1} s of pre-copy (postCopy.afterSeconds)",
            after.as_secs_f64()
        )),
        PostCopy::After(_) => Action::Continue,
        PostCopy::Allowed => {
            let throttled_out = !policy.auto_converge || s.cpu_throttle_percent >= MAX_CPU_THROTTLE;
            if conv.judge() == Judgement::NotConverging && throttled_out {
                Action::StartPostCopy(format!(
                    "pre-copy does not converge: dirty rate {} MiB/s against throughput {} MiB/s over the last {WINDOW} passes, vCPU throttle {} %",
                    s.dirty_rate >> 20,
                    s.throughput >> 20,
                    s.cpu_throttle_percent
                ))
            } else {
                Action::Continue
            }
        }
    }
}

/// A sentence for `status.progress.convergence`: how pre-copy stands and what the policy
/// does if it does not converge.
pub fn explain(policy: &Policy, judgement: Judgement, s: &Sample) -> String {
    if s.post_copy {
        return "post-copy: the rest of the memory follows the guest".into();
    }
    let plan = match (policy.auto_converge, policy.post_copy) {
        (_, PostCopy::After(a)) => {
            format!("switches to post-copy after {} s of pre-copy", a.as_secs())
        }
        (true, PostCopy::Allowed) => {
            "throttles the vCPUs (auto-converge), then switches to post-copy".into()
        }
        (false, PostCopy::Allowed) => "switches to post-copy".into(),
        (true, PostCopy::Never) => "throttles the vCPUs (auto-converge)".into(),
        (false, PostCopy::Never) => "waits for the timeouts".into(),
    };
    let abort = match policy.progress_timeout {
        Some(t) => format!("; aborts when nothing progresses for {} s", t.as_secs()),
        None => String::new(),
    };
    let state = match judgement {
        Judgement::Unknown => "not judged yet (too few passes)",
        Judgement::Converging => "converging",
        Judgement::NotConverging => "not converging",
    };
    format!(
        "{state}: dirty rate {} MiB/s, throughput {} MiB/s, vCPU throttle {} %; if it does not converge the policy {plan}{abort}",
        s.dirty_rate >> 20,
        s.throughput >> 20,
        s.cpu_throttle_percent
    )
}

#[cfg(test)]
mod tests;
