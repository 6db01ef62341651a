//! Status conditions (`Ready`, `Progressing`, `Degraded`) computed from what was observed.
//! Pure: the controller passes in the observations and the time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// What the controller saw of a mesh's transmitters after applying.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshObservation {
    pub generation: Option<i64>,
    pub desired: i32,
    pub ready: i32,
    /// The last apply failed with this message (or the spec was refused, see `invalid`).
    pub error: Option<String>,
    /// The spec was refused before anything was applied.
    pub invalid: bool,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

pub fn mesh_conditions(o: &MeshObservation, now: Timestamp) -> Vec<Condition> {
    let ready = o.error.is_none() && o.ready >= o.desired;
    let progressing = o.error.is_none() && o.ready < o.desired;
    let failed = if o.invalid {
        "InvalidSpec"
    } else {
        "ApplyFailed"
    };
    let (ready_reason, ready_msg) = match &o.error {
        Some(e) => (failed, e.clone()),
        None if ready => (
            "AllTransmittersReady",
            format!("{}/{} transmitters ready", o.ready, o.desired),
        ),
        None => (
            "TransmittersStarting",
            format!("{}/{} transmitters ready", o.ready, o.desired),
        ),
    };
    vec![
        condition("Ready", ready, ready_reason, ready_msg, o.generation, now),
        condition(
            "Progressing",
            progressing,
            if progressing { "RollingOut" } else { "Stable" },
            format!("{}/{} transmitters ready", o.ready, o.desired),
            o.generation,
            now,
        ),
        condition(
            "Degraded",
            o.error.is_some(),
            if o.error.is_some() {
                failed
            } else {
                "AsExpected"
            },
            o.error.clone().unwrap_or_default(),
            o.generation,
            now,
        ),
    ]
}

/// A single `Ready` condition for Services and Rooms.
pub fn ready(
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    vec![condition("Ready", ok, reason, message, generation, now)]
}

/// Keeps `lastTransitionTime` of conditions whose status did not change, as Kubernetes
/// conventions ask, so a status write only moves it on a real transition.
pub fn merge(old: &[Condition], mut new: Vec<Condition>) -> Vec<Condition> {
    for c in &mut new {
        if let Some(o) = old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of<'a>(cs: &'a [Condition], t: &str) -> &'a str {
        &cs.iter().find(|c| c.type_ == t).unwrap().status
    }

    #[test]
    fn conditions_follow_readiness_and_errors() {
        let now = Timestamp::UNIX_EPOCH;
        let mut o = MeshObservation {
            generation: Some(3),
            desired: 3,
            ready: 1,
            error: None,
            invalid: false,
        };
        let cs = mesh_conditions(&o, now);
        assert_eq!(
            (
                status_of(&cs, "Ready"),
                status_of(&cs, "Progressing"),
                status_of(&cs, "Degraded")
            ),
            ("False", "True", "False")
        );
        assert!(cs.iter().all(|c| c.observed_generation == Some(3)));
        o.ready = 3;
        let cs = mesh_conditions(&o, now);
        assert_eq!(
            (status_of(&cs, "Ready"), status_of(&cs, "Progressing")),
            ("True", "False")
        );
        o.error = Some("forbidden".into());
        let cs = mesh_conditions(&o, now);
        assert_eq!(
            (status_of(&cs, "Ready"), status_of(&cs, "Degraded")),
            ("False", "True")
        );
        assert_eq!(cs[0].message, "forbidden");
    }

    #[test]
    fn transition_times_move_only_on_transitions() {
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = Timestamp::from_second(100).unwrap();
        let o = MeshObservation {
            generation: Some(1),
            desired: 1,
            ready: 1,
            error: None,
            invalid: false,
        };
        let first = mesh_conditions(&o, t0);
        let again = merge(&first, mesh_conditions(&o, t1));
        assert_eq!(again[0].last_transition_time, Time(t0));
        let broken = MeshObservation {
            error: Some("x".into()),
            ..o
        };
        let changed = merge(&again, mesh_conditions(&broken, t1));
        assert_eq!(changed[0].last_transition_time, Time(t1));
    }
}
