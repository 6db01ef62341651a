//! The command-line flags each process of a mesh gets from its spec: one place, used by
//! `thynapse up` and by the operator's builders, so that local mode and a cluster run the
//! same configuration.

use crate::spec::TransmitterMeshSpec;

fn discovery(spec: &TransmitterMeshSpec) -> Vec<String> {
    vec![
        "--announce-interval-ms".into(),
        spec.rendezvous.announce_interval_ms.to_string(),
        "--expiry-multiplier".into(),
        spec.rendezvous.expiry_multiplier.to_string(),
        "--max-message-bytes".into(),
        spec.limits.max_message_bytes.to_string(),
    ]
}

/// Flags of `thynapse transmitter` (besides its name and addresses).
pub fn transmitter(spec: &TransmitterMeshSpec) -> Vec<String> {
    let mut args = discovery(spec);
    args.push("--link-buffer-bytes".into());
    args.push(spec.limits.link_buffer_bytes.to_string());
    args
}

/// Flags of `thynapse sidecar` (besides its Service, name and addresses).
pub fn sidecar(spec: &TransmitterMeshSpec) -> Vec<String> {
    let mut args = discovery(spec);
    args.push("--client-output-buffer-bytes".into());
    args.push(spec.limits.client_output_buffer_bytes.to_string());
    args
}

/// Flags of `thynapse rendezvous`: the room policy and the declared rooms.
pub fn rendezvous<'a>(
    spec: &TransmitterMeshSpec,
    rooms: impl IntoIterator<Item = (&'a str, Option<u32>)>,
) -> Vec<String> {
    let mut args = vec![
        "--default-replicas".to_string(),
        spec.rooms.default_replicas.to_string(),
    ];
    if !spec.rooms.allow_undeclared {
        args.push("--forbid-undeclared".into());
    }
    for (name, replicas) in rooms {
        args.push("--room".into());
        args.push(format!(
            "{name}={}",
            replicas.unwrap_or(spec.rooms.default_replicas)
        ));
    }
    args
}

/// `--rendezvous ADDRESS` for each rendezvous point.
pub fn rendezvous_points<'a>(addresses: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    addresses
        .into_iter()
        .flat_map(|a| ["--rendezvous".to_string(), a.clone()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_the_spec() {
        let spec: TransmitterMeshSpec = serde_yaml::from_str(
            "replicas: 1\nrendezvous: {announceIntervalMs: 250}\nrooms: {allowUndeclared: false, defaultReplicas: 3}\nlimits: {linkBufferBytes: 65536}",
        )
        .unwrap();
        assert_eq!(
            transmitter(&spec),
            [
                "--announce-interval-ms",
                "250",
                "--expiry-multiplier",
                "3",
                "--max-message-bytes",
                "1048576",
                "--link-buffer-bytes",
                "65536"
            ]
        );
        assert_eq!(
            sidecar(&spec)[6..],
            ["--client-output-buffer-bytes", "33554432"]
        );
        assert_eq!(
            rendezvous(&spec, [("lobby", None), ("game", Some(1))]),
            [
                "--default-replicas",
                "3",
                "--forbid-undeclared",
                "--room",
                "lobby=3",
                "--room",
                "game=1"
            ]
        );
        assert_eq!(
            rendezvous_points(&["udp://a:1".to_string()]),
            ["--rendezvous", "udp://a:1"]
        );
    }
}
