//! Conditions as the Kubernetes API conventions describe them, and the one place they
//! are updated.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Sets condition `type_` in `conditions`.
///
/// `lastTransitionTime` moves only when the status changes, as the API conventions ask;
/// reason, message and observedGeneration always take the new values.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: impl AsRef<str>,
    message: &str,
    generation: Option<i64>,
    now: Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let reason = reason.as_ref();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut cs = Vec::new();
        set_condition(
            &mut cs,
            "Ready",
            false,
            "Starting",
            "booting",
            Some(1),
            at(10),
        );
        set_condition(
            &mut cs,
            "Ready",
            false,
            "Starting",
            "still booting",
            Some(2),
            at(20),
        );
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time, at(10));
        assert_eq!(cs[0].message, "still booting");
        assert_eq!(cs[0].observed_generation, Some(2));
        set_condition(&mut cs, "Ready", true, "Running", "up", Some(2), at(30));
        assert_eq!(cs[0].last_transition_time, at(30));
        assert_eq!(cs[0].status, "True");
    }
}
