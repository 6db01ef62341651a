//! What `up` starts: one process per rendezvous point, transmitter and cell, each with
//! its command line (from the spec, through `thynapse_resources::flags`, as the operator
//! does), and the ports a restarted child keeps.

use serde_json::Value;
use thynapse_resources::{flags, MeshConfig};

use super::{Role, Spec};

/// The rendezvous carries the mesh's room policy: declared rooms and what to do with
/// others.
pub(super) fn rendezvous_args(cfg: &MeshConfig) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "rendezvous".into(),
        "--mesh".into(),
        cfg.name.clone(),
        "--bind".into(),
        "127.0.0.1:0".into(),
    ];
    let rooms = cfg.rooms.iter().map(|(n, r)| (n.as_str(), r.replicas));
    args.extend(flags::rendezvous(&cfg.spec, rooms));
    args
}

pub(super) fn plan(cfg: &MeshConfig, cells: &[(String, u32)], rendezvous: &[String]) -> Vec<Spec> {
    let spec = &cfg.spec;
    let mut out = Vec::new();
    let with = |mut a: Vec<String>, spec_flags: Vec<String>| {
        a.extend(spec_flags);
        a.extend(flags::rendezvous_points(rendezvous));
        a
    };
    for i in 0..spec.replicas {
        let name = format!("{}-{i}", cfg.name);
        out.push(Spec {
            role: Role::Transmitter,
            name: name.clone(),
            service: None,
            args: with(
                vec![
                    "transmitter".into(),
                    "--mesh".into(),
                    cfg.name.clone(),
                    "--name".into(),
                    name,
                ],
                flags::transmitter(spec),
            ),
        });
    }
    let mut next_transmitter = 0;
    for (service, sspec) in &cfg.services {
        let n = cells
            .iter()
            .rev()
            .find(|(s, _)| s == service)
            .map_or(1, |(_, n)| *n);
        for i in 0..n {
            let name = format!("{service}-{i}");
            // Spread cells over the transmitters, as a scheduler would spread pods.
            let prefer = format!("{}-{}", cfg.name, next_transmitter % spec.replicas);
            next_transmitter += 1;
            out.push(Spec {
                role: Role::Cell,
                name: name.clone(),
                service: Some(service.clone()),
                args: with(
                    vec![
                        "sidecar".into(),
                        "--mesh".into(),
                        cfg.name.clone(),
                        "--service".into(),
                        service.clone(),
                        "--name".into(),
                        name,
                        "--rules".into(),
                        serde_json::to_string(&sspec.delivery).expect("rules serialise"),
                        "--resp-bind".into(),
                        "127.0.0.1:0".into(),
                        "--prefer-transmitter".into(),
                        prefer,
                    ],
                    flags::sidecar(spec),
                ),
            });
        }
    }
    out
}

/// After a child's first start, pin the ports it chose, so a restart serves the same
/// endpoints (as a StatefulSet pod keeps its name and address).
pub(super) fn pin_ports(spec: &mut Spec, info: &Value) {
    let mut set = |flag: &str, value: Option<String>| {
        let Some(value) = value else { return };
        if let Some(i) = spec.args.iter().position(|a| a == flag) {
            spec.args[i + 1] = value;
        } else {
            spec.args.push(flag.to_string());
            spec.args.push(value);
        }
    };
    let s = |k: &str| info.get(k).and_then(Value::as_str).map(str::to_string);
    let host_port = |url: Option<String>| {
        url.map(|u| {
            u.trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_string()
        })
    };
    match spec.role {
        Role::Rendezvous => set(
            "--bind",
            s("address").map(|a| a.trim_start_matches("udp://").to_string()),
        ),
        Role::Transmitter => {
            set("--command-bind", s("command"));
            set("--event-bind", s("event"));
            set("--metrics-bind", host_port(s("metrics")));
        }
        Role::Cell => {
            set("--resp-bind", s("resp"));
            set("--metrics-bind", host_port(s("metrics")));
        }
    }
}
