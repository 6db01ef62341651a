//! Each process of a mesh as its spec configures it: one place, used by `thynapse up` and
//! by the operator's builders, so that local mode and a cluster run the same
//! configuration. Launchers then set what only they know (addresses, pod fields).

use thynapse_process::{
    DeliveryRules, PermissionsArg, RendezvousArgs, SidecarArgs, TransmitterArgs,
};

use crate::spec::{ServiceSpec, TransmitterMeshSpec};

fn size(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Transmitter `name` of `mesh`.
pub fn transmitter(
    mesh: &str,
    name: &str,
    spec: &TransmitterMeshSpec,
    rendezvous: &[String],
) -> TransmitterArgs {
    let mut a = TransmitterArgs::new(mesh, name, rendezvous);
    a.announce_interval_ms = spec.rendezvous.announce_interval_ms;
    a.expiry_multiplier = spec.rendezvous.expiry_multiplier;
    a.max_message_bytes = size(spec.limits.max_message_bytes);
    a.link_buffer_bytes = size(spec.limits.link_buffer_bytes);
    a.encrypt = spec.security.encryption;
    a
}

/// The sidecar of cell `name`, of a Service with delivery `rules`.
pub fn sidecar(
    mesh: &str,
    service: &str,
    name: &str,
    service_spec: &ServiceSpec,
    spec: &TransmitterMeshSpec,
    rendezvous: &[String],
) -> SidecarArgs {
    let mut a = SidecarArgs::new(mesh, service, name, rendezvous);
    a.rules = DeliveryRules(service_spec.delivery.clone());
    a.permissions = PermissionsArg(service_spec.permissions.clone());
    a.announce_interval_ms = spec.rendezvous.announce_interval_ms;
    a.expiry_multiplier = spec.rendezvous.expiry_multiplier;
    a.max_message_bytes = size(spec.limits.max_message_bytes);
    a.client_output_buffer_bytes = size(spec.limits.client_output_buffer_bytes);
    a.encrypt = spec.security.encryption;
    a
}

/// A rendezvous point: the room policy and the declared rooms (replicas, or the default).
pub fn rendezvous<'a>(
    mesh: &str,
    spec: &TransmitterMeshSpec,
    rooms: impl IntoIterator<Item = (&'a str, Option<u32>)>,
) -> RendezvousArgs {
    let mut a = RendezvousArgs::new(mesh);
    a.default_replicas = spec.rooms.default_replicas;
    a.forbid_undeclared = !spec.rooms.allow_undeclared;
    a.forget_idle_rooms_after_seconds = spec.rooms.forget_idle_after_seconds;
    a.rooms = rooms
        .into_iter()
        .map(|(name, replicas)| {
            let replicas = replicas.unwrap_or(spec.rooms.default_replicas);
            (name.to_string(), replicas)
        })
        .collect();
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_the_spec() {
        let spec: TransmitterMeshSpec = serde_yaml::from_str(
            "replicas: 1\nrendezvous: {announceIntervalMs: 250}\nrooms: {allowUndeclared: false, defaultReplicas: 3}\nlimits: {linkBufferBytes: 65536}\nsecurity: {encryption: true}",
        )
        .unwrap();
        let points = ["udp://a:1".to_string()];
        let t = transmitter("m", "m-0", &spec, &points);
        assert_eq!(
            (
                t.announce_interval_ms,
                t.expiry_multiplier,
                t.max_message_bytes
            ),
            (250, 3, 1048576)
        );
        assert_eq!(t.link_buffer_bytes, 65536);
        assert!(t.encrypt);
        assert_eq!(t.rendezvous, points);
        let orders: ServiceSpec =
            serde_json::from_str(r#"{"mesh": "m", "permissions": {"publish": ["orders.*"]}}"#)
                .unwrap();
        let s = sidecar("m", "orders", "orders-0", &orders, &spec, &points);
        assert_eq!(s.client_output_buffer_bytes, 33554432);
        assert_eq!(s.permissions.0.publish, Some(vec!["orders.*".to_string()]));
        assert_eq!(s.announce_interval_ms, 250);
        assert!(s.encrypt);
        let r = rendezvous("m", &spec, [("lobby", None), ("game", Some(1))]);
        assert!(r.forbid_undeclared);
        assert_eq!(r.default_replicas, 3);
        assert_eq!(r.rooms, [("lobby".to_string(), 3), ("game".to_string(), 1)]);
    }
}
