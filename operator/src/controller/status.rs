//! Status: what each reconcile observed, as the resource's `status` (pure: the reconcile
//! passes in what it saw and the time; conditions keep their transition times through
//! `conditions::merge`).

use k8s_openapi::jiff::Timestamp;
use thynapse_resources::{RoomStatus, ServiceStatus, TransmitterMeshStatus};

use crate::conditions::{self, MeshObservation};

pub(super) fn mesh(
    old: &TransmitterMeshStatus,
    o: &MeshObservation,
    rendezvous: &[String],
    now: Timestamp,
) -> TransmitterMeshStatus {
    TransmitterMeshStatus {
        observed_generation: o.generation,
        ready_transmitters: o.ready,
        rendezvous: Some(rendezvous.join(",")),
        conditions: conditions::merge(&old.conditions, conditions::mesh_conditions(o, now)),
    }
}

/// What a Room reconcile found out about its room.
pub(super) enum RoomLookup {
    Invalid(String),
    MeshNotFound {
        mesh: String,
        ns: String,
    },
    /// The rendezvous answered: the hosts, of `replicas` wanted.
    Located {
        hosts: Vec<String>,
        replicas: u32,
    },
    /// No rendezvous answered: the hosts last seen are kept.
    Unreachable(String),
}

pub(super) fn room(
    old: &RoomStatus,
    lookup: RoomLookup,
    generation: Option<i64>,
    now: Timestamp,
) -> RoomStatus {
    let not_ready = |reason: &str, message: String| (false, reason.to_string(), message);
    let (ok, reason, message, transmitters) = match lookup {
        RoomLookup::Invalid(e) => {
            let (ok, reason, message) = not_ready("InvalidSpec", e);
            (ok, reason, message, vec![])
        }
        RoomLookup::MeshNotFound { mesh, ns } => {
            let (ok, reason, message) = not_ready(
                "MeshNotFound",
                format!("no TransmitterMesh {mesh:?} in {ns}"),
            );
            (ok, reason, message, vec![])
        }
        RoomLookup::Located { hosts, replicas } => {
            let placed = hosts.len() as u32 >= replicas;
            let message = format!("on {} of {replicas} transmitters", hosts.len());
            let reason = if placed { "Placed" } else { "Placing" };
            (placed, reason.to_string(), message, hosts)
        }
        RoomLookup::Unreachable(e) => {
            let (ok, reason, message) = not_ready("RendezvousUnreachable", e);
            (ok, reason, message, old.transmitters.clone())
        }
    };
    RoomStatus {
        observed_generation: generation,
        transmitters,
        conditions: conditions::merge(
            &old.conditions,
            conditions::ready(ok, &reason, message, generation, now),
        ),
    }
}

/// A Service's status: its running cells, and whether its spec and mesh are usable.
pub(super) fn service(
    old: &ServiceStatus,
    problem: Option<(&str, String)>,
    cells: i32,
    generation: Option<i64>,
    now: Timestamp,
) -> ServiceStatus {
    let (ok, reason, message) = match problem {
        Some((reason, message)) => (false, reason, message),
        None => (true, "MeshFound", format!("{cells} cells running")),
    };
    ServiceStatus {
        observed_generation: generation,
        cells,
        conditions: conditions::merge(
            &old.conditions,
            conditions::ready(ok, reason, message, generation, now),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_of(c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> (&str, &str) {
        let r = c.iter().find(|c| c.type_ == "Ready").unwrap();
        (&r.status, &r.reason)
    }

    #[test]
    fn a_room_keeps_its_last_hosts_while_the_rendezvous_is_unreachable() {
        let now = Timestamp::now();
        let placed = room(
            &RoomStatus::default(),
            RoomLookup::Located {
                hosts: vec!["m-0".into()],
                replicas: 2,
            },
            Some(1),
            now,
        );
        assert_eq!(ready_of(&placed.conditions), ("False", "Placing"));
        let lost = room(
            &placed,
            RoomLookup::Unreachable("timeout".into()),
            Some(1),
            now,
        );
        assert_eq!(lost.transmitters, ["m-0"]);
        assert_eq!(
            ready_of(&lost.conditions),
            ("False", "RendezvousUnreachable")
        );
        let invalid = room(
            &lost,
            RoomLookup::Invalid("spec.replicas".into()),
            Some(2),
            now,
        );
        assert!(invalid.transmitters.is_empty());
        assert_eq!(ready_of(&invalid.conditions), ("False", "InvalidSpec"));
    }

    #[test]
    fn a_service_is_ready_with_its_mesh_and_counts_its_cells() {
        let now = Timestamp::now();
        let s = service(&ServiceStatus::default(), None, 3, Some(1), now);
        assert_eq!(
            (s.cells, ready_of(&s.conditions)),
            (3, ("True", "MeshFound"))
        );
        let s = service(
            &s,
            Some(("MeshNotFound", "no mesh".into())),
            0,
            Some(1),
            now,
        );
        assert_eq!(ready_of(&s.conditions), ("False", "MeshNotFound"));
    }
}
