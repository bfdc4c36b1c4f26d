//! Typed writes of a migration's status: a [`MigrationStatusPatch`] names what one writer
//! changes and nothing else, and becomes the JSON merge patch (RFC 7386) the API server
//! applies. The operator, the agents' phases and the peer-to-peer driver all write
//! through it, so the status contract is these types, not JSON literals.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::Patch;
use serde::{Deserialize, Serialize};

use crate::{
    Condition, Cookies, MigrationPhase, MigrationPolicy, Progress, Reason, SavedState, Step,
    StepOutcome, VirtualMachineMigrationStatus,
};

/// A merge patch of `VirtualMachineMigrationStatus`: every field that is `Some` is
/// written, every `None` is left as it is. `recoveryURI` and a step can also be removed
/// (`Some(None)`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatusPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase_transition_time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<MigrationPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    #[serde(rename = "targetDomainXML", skip_serializing_if = "Option::is_none")]
    pub target_domain_xml: Option<String>,
    #[serde(rename = "migrationURI", skip_serializing_if = "Option::is_none")]
    pub migration_uri: Option<String>,
    #[serde(rename = "recoveryURI", skip_serializing_if = "Option::is_none")]
    pub recovery_uri: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_lost: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookies: Option<Cookies>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<StepsPatch>,
    /// Replaces the whole of `status.progress` (its unset fields are written as null),
    /// so a sample never mixes with the one before.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "progress_whole"
    )]
    pub progress: Option<Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_state: Option<SavedState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The steps a patch writes: `Some(step)` merges into the phase's record, `Some(None)`
/// removes it (a Confirm that runs again).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct StepsPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub begin: Option<Option<Step>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepare: Option<Option<Step>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perform: Option<Option<Step>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish: Option<Option<Step>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Option<Step>>,
}

impl StepsPatch {
    fn slot(&mut self, phase: MigrationPhase) -> Option<&mut Option<Option<Step>>> {
        match phase {
            MigrationPhase::Begin => Some(&mut self.begin),
            MigrationPhase::Prepare => Some(&mut self.prepare),
            MigrationPhase::Perform => Some(&mut self.perform),
            MigrationPhase::Finish => Some(&mut self.finish),
            MigrationPhase::Confirm => Some(&mut self.confirm),
            _ => None,
        }
    }
}

impl MigrationStatusPatch {
    /// Enters `phase` now, with the rollback flag `cancelled`.
    pub fn enter(phase: MigrationPhase, cancelled: bool) -> Self {
        MigrationStatusPatch {
            phase: Some(phase),
            cancelled: Some(cancelled),
            phase_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }
    }

    /// Writes `step` as the record of `phase` (one of the five; others are ignored).
    pub fn with_step(mut self, phase: MigrationPhase, step: Step) -> Self {
        if let Some(slot) = self.steps.get_or_insert_default().slot(phase) {
            *slot = Some(Some(step));
        }
        self
    }

    /// Removes the record of `phase`.
    pub fn without_step(mut self, phase: MigrationPhase) -> Self {
        if let Some(slot) = self.steps.get_or_insert_default().slot(phase) {
            *slot = Some(None);
        }
        self
    }

    /// Writes the cookie of `phase` (Begin to Finish).
    pub fn with_cookie(mut self, phase: MigrationPhase, cookie: Option<String>) -> Self {
        let cookies = self.cookies.get_or_insert_default();
        match phase {
            MigrationPhase::Begin => cookies.begin = cookie,
            MigrationPhase::Prepare => cookies.prepare = cookie,
            MigrationPhase::Perform => cookies.perform = cookie,
            MigrationPhase::Finish => cookies.finish = cookie,
            _ => {}
        }
        self
    }

    /// This patch, then `other` over it: what writing both in one merge patch does.
    pub fn and(mut self, other: MigrationStatusPatch) -> Self {
        macro_rules! over {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        over!(
            phase,
            phase_transition_time,
            cancelled,
            policy,
            source_node,
            target_node,
            target_domain_xml,
            migration_uri,
            recovery_uri,
            target_lost,
            progress,
            saved_state,
            downtime_ms,
            total_time_ms,
            conditions,
            observed_generation
        );
        if let Some(c) = other.cookies {
            merge_cookies(self.cookies.get_or_insert_default(), c);
        }
        if let Some(mut theirs) = other.steps {
            let mine = self.steps.get_or_insert_default();
            for phase in crate::sequence::PHASES {
                if let (Some(Some(step)), Some(slot)) =
                    (theirs.slot(phase).map(Option::take), mine.slot(phase))
                {
                    *slot = Some(step);
                }
            }
        }
        self
    }

    /// The merge patch to send, guarded by `resource_version` when given (the API
    /// server then refuses it with 409 if the object changed since).
    pub fn to_patch(&self, resource_version: Option<&str>) -> Patch<serde_json::Value> {
        status_merge_patch(self, resource_version)
    }

    /// What `status` becomes once the API server merged this patch into it: the same
    /// result as RFC 7386 on their JSON forms (a unit test checks that), without
    /// leaving the types.
    pub fn apply(&self, status: &mut VirtualMachineMigrationStatus) {
        let p = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = p.$f { status.$f = Some(v); } )* };
        }
        set!(
            phase,
            phase_transition_time,
            policy,
            source_node,
            target_node,
            target_domain_xml,
            migration_uri,
            target_lost,
            downtime_ms,
            total_time_ms,
            observed_generation
        );
        if let Some(c) = p.cancelled {
            status.cancelled = c;
        }
        if let Some(uri) = p.recovery_uri {
            status.recovery_uri = uri;
        }
        if let Some(c) = p.conditions {
            status.conditions = c;
        }
        if let Some(c) = p.cookies {
            merge_cookies(status.cookies.get_or_insert_default(), c);
        }
        if let Some(saved) = p.saved_state {
            status.saved_state = Some(match status.saved_state.take() {
                Some(old) => SavedState {
                    migration: saved.migration.or(old.migration),
                    saved_at: saved.saved_at.or(old.saved_at),
                    ..saved
                },
                None => saved,
            });
        }
        if let Some(progress) = p.progress {
            status.progress = Some(progress);
        }
        if let Some(mut steps) = p.steps {
            let mine = status.steps.get_or_insert_default();
            for phase in crate::sequence::PHASES {
                let Some(new) = steps.slot(phase).and_then(Option::take) else {
                    continue;
                };
                let slot = match phase {
                    MigrationPhase::Begin => &mut mine.begin,
                    MigrationPhase::Prepare => &mut mine.prepare,
                    MigrationPhase::Perform => &mut mine.perform,
                    MigrationPhase::Finish => &mut mine.finish,
                    _ => &mut mine.confirm,
                };
                *slot = match (slot.take(), new) {
                    (_, None) => None,
                    (Some(old), Some(new)) => Some(merge_step(old, new)),
                    (None, Some(new)) => Some(new),
                };
            }
        }
    }
}

/// The merge patch that writes `status` (a typed status patch), guarded by
/// `resource_version` when given.
pub(crate) fn status_merge_patch(
    status: &impl Serialize,
    resource_version: Option<&str>,
) -> Patch<serde_json::Value> {
    merge_patch("status", status, resource_version)
}

/// The merge patch writing `value` under the object's `key` (`spec`, `status`), guarded
/// by `resource_version` when given.
fn merge_patch(
    key: &str,
    value: &impl Serialize,
    resource_version: Option<&str>,
) -> Patch<serde_json::Value> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Guard<'a> {
        resource_version: &'a str,
    }
    let mut body = serde_json::Map::new();
    body.insert(
        key.to_string(),
        serde_json::to_value(value).expect("a patch always serializes"),
    );
    if let Some(rv) = resource_version {
        let guard = Guard {
            resource_version: rv,
        };
        body.insert(
            "metadata".into(),
            serde_json::to_value(guard).expect("a guard always serializes"),
        );
    }
    Patch::Merge(serde_json::Value::Object(body))
}

/// The spec write that asks a migration to cancel (`spec.cancel: true`), guarded by
/// `resource_version` when given.
pub fn cancel_request(resource_version: Option<&str>) -> Patch<serde_json::Value> {
    #[derive(Serialize)]
    struct Cancel {
        cancel: bool,
    }
    merge_patch("spec", &Cancel { cancel: true }, resource_version)
}

fn merge_cookies(into: &mut Cookies, from: Cookies) {
    for (mine, theirs) in [
        (&mut into.begin, from.begin),
        (&mut into.prepare, from.prepare),
        (&mut into.perform, from.perform),
        (&mut into.finish, from.finish),
    ] {
        if theirs.is_some() {
            *mine = theirs;
        }
    }
}

fn merge_step(old: Step, new: Step) -> Step {
    Step {
        end: new.end.or(old.end),
        outcome: new.outcome.or(old.outcome),
        reason: new.reason.or(old.reason),
        message: new.message.or(old.message),
        ..new
    }
}

/// The optional fields of `Progress`, which a whole write sends as null when unset.
const PROGRESS_OPTIONAL: [&str; 6] = [
    "percent",
    "mode",
    "converging",
    "convergence",
    "etaSeconds",
    "cpuThrottlePercent",
];

fn progress_whole<S: serde::Serializer>(
    progress: &Option<Progress>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut value = serde_json::to_value(progress).map_err(serde::ser::Error::custom)?;
    if let Some(fields) = value.as_object_mut() {
        for key in PROGRESS_OPTIONAL {
            fields.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    value.serialize(serializer)
}

impl Step {
    /// A step that started at `start` on `node` and has not ended.
    pub fn started(node: &str, start: MicroTime) -> Step {
        Step {
            node: node.to_string(),
            start,
            end: None,
            outcome: None,
            reason: None,
            message: None,
        }
    }

    /// A step that ran on `node` from `start` until now.
    pub fn ended(
        node: &str,
        start: MicroTime,
        outcome: StepOutcome,
        reason: Reason,
        message: impl Into<String>,
    ) -> Step {
        Step {
            end: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            outcome: Some(outcome),
            reason: Some(reason),
            message: Some(message.into()),
            ..Step::started(node, start)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_request_writes_only_spec_cancel() {
        let body = |p: Patch<serde_json::Value>| match p {
            Patch::Merge(v) => v,
            other => panic!("expected a merge patch, got {other:?}"),
        };
        assert_eq!(
            body(cancel_request(None)),
            serde_json::json!({"spec": {"cancel": true}})
        );
        assert_eq!(
            body(cancel_request(Some("9"))),
            serde_json::json!({"metadata": {"resourceVersion": "9"}, "spec": {"cancel": true}})
        );
    }
    use crate::MigrationMode;
    use serde_json::{Value, json};

    /// RFC 7386, as the API server applies a merge patch.
    fn json_merge(target: &mut Value, patch: Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        json_merge(t.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            other => *target = other,
        }
    }

    fn step(node: &str, outcome: Option<StepOutcome>) -> Step {
        let start = MicroTime("2026-01-01T00:00:00.000001Z".parse().unwrap());
        match outcome {
            Some(o) => Step {
                end: Some(MicroTime("2026-01-01T00:00:01.000001Z".parse().unwrap())),
                ..Step::ended(node, start, o, Reason::Transferred, "m")
            },
            None => Step::started(node, start),
        }
    }

    /// Entering `phase` at a whole second (Time is written in seconds).
    fn enter(phase: MigrationPhase, cancelled: bool) -> MigrationStatusPatch {
        MigrationStatusPatch {
            phase_transition_time: Some(Time("2026-01-01T00:00:02Z".parse().unwrap())),
            ..MigrationStatusPatch::enter(phase, cancelled)
        }
    }

    fn status() -> VirtualMachineMigrationStatus {
        let mut s = VirtualMachineMigrationStatus {
            phase: Some(MigrationPhase::Perform),
            source_node: Some("node-a".into()),
            target_node: Some("node-b".into()),
            recovery_uri: Some("tcp:127.0.0.3:4444".into()),
            cookies: Some(Cookies {
                begin: Some("<b/>".into()),
                prepare: Some("<p/>".into()),
                ..Default::default()
            }),
            progress: Some(Progress {
                bytes_total: 100,
                dirty_rate_bytes_per_second: 7,
                converging: Some(true),
                convergence: Some("fine".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        s.steps.get_or_insert_default().perform = Some(step("node-a", None));
        s.steps.get_or_insert_default().confirm = Some(step("node-a", Some(StepOutcome::Failed)));
        s
    }

    #[test]
    fn apply_is_what_the_api_servers_merge_does() {
        let patches = [
            enter(MigrationPhase::Finish, true),
            MigrationStatusPatch {
                progress: Some(Progress {
                    bytes_total: 100,
                    bytes_transferred: 100,
                    percent: Some("100%".into()),
                    mode: Some(MigrationMode::PostCopy),
                    ..Default::default()
                }),
                downtime_ms: Some(12),
                recovery_uri: Some(None),
                ..Default::default()
            }
            .with_cookie(MigrationPhase::Perform, Some("<s/>".into()))
            .with_step(
                MigrationPhase::Perform,
                step("node-a", Some(StepOutcome::Succeeded)),
            ),
            MigrationStatusPatch::default().without_step(MigrationPhase::Confirm),
            MigrationStatusPatch {
                saved_state: Some(SavedState {
                    path: "/s".into(),
                    compression: crate::SaveCompression::Zstd,
                    node: "node-a".into(),
                    stream_bytes: 1,
                    file_bytes: 2,
                    save_time_ms: 3,
                    migration: None,
                    saved_at: None,
                }),
                target_lost: Some("gone".into()),
                ..Default::default()
            },
        ];
        for patch in patches {
            let mut typed = status();
            patch.apply(&mut typed);
            let mut merged = serde_json::to_value(status()).unwrap();
            json_merge(&mut merged, serde_json::to_value(&patch).unwrap());
            let merged: VirtualMachineMigrationStatus = serde_json::from_value(merged).unwrap();
            assert_eq!(typed, merged, "{patch:?}");
        }
    }

    #[test]
    fn a_progress_is_written_whole() {
        let p = MigrationStatusPatch {
            progress: Some(Progress::default()),
            ..Default::default()
        };
        let json = serde_json::to_value(&p).unwrap();
        let written = json["progress"].as_object().unwrap().len();
        let schema = schemars::schema_for!(Progress);
        let fields = schema.as_value()["properties"].as_object().unwrap().len();
        assert_eq!(
            written, fields,
            "every field of Progress is written: {json}"
        );
        assert!(json["progress"]["etaSeconds"].is_null());
    }

    #[test]
    fn a_patch_writes_only_what_it_names() {
        let p =
            MigrationStatusPatch::default().with_cookie(MigrationPhase::Begin, Some("<c/>".into()));
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"cookies": {"begin": "<c/>"}})
        );
        let p = MigrationStatusPatch::default().without_step(MigrationPhase::Confirm);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"steps": {"confirm": null}})
        );
        let Patch::Merge(body) = p.to_patch(Some("42")) else {
            unreachable!()
        };
        assert_eq!(body["metadata"]["resourceVersion"], "42");
    }

    #[test]
    fn and_writes_both_the_later_winning() {
        let a = MigrationStatusPatch::default()
            .with_cookie(MigrationPhase::Begin, Some("<b/>".into()))
            .with_step(
                MigrationPhase::Begin,
                step("node-a", Some(StepOutcome::Succeeded)),
            );
        let b = enter(MigrationPhase::Prepare, false)
            .with_cookie(MigrationPhase::Prepare, Some("<p/>".into()));
        let both = a.clone().and(b.clone());
        let mut one = status();
        both.apply(&mut one);
        let mut two = status();
        a.apply(&mut two);
        b.apply(&mut two);
        assert_eq!(one, two);
    }
}
