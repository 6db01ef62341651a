//! What `up` starts: one process per rendezvous point, transmitter and cell, each with
//! its command line (from the spec, through `thynapse_resources::flags`, as the operator
//! does), and the ports a restarted child keeps.

use std::net::SocketAddr;

use thynapse_process::{Ready, RendezvousArgs, SidecarArgs, ToArgs, TransmitterArgs};
use thynapse_resources::{flags, MeshConfig};

use super::{Role, Spec};

/// A child's command line, typed (see `thynapse_process`).
#[derive(Clone, Debug)]
pub(super) enum Launch {
    Rendezvous(RendezvousArgs),
    Transmitter(TransmitterArgs),
    Cell(SidecarArgs),
}

impl Launch {
    pub(super) fn to_args(&self) -> Vec<String> {
        match self {
            Launch::Rendezvous(a) => a.to_args(),
            Launch::Transmitter(a) => a.to_args(),
            Launch::Cell(a) => a.to_args(),
        }
    }
}

/// The rendezvous carries the mesh's room policy: declared rooms and what to do with
/// others.
pub(super) fn rendezvous(cfg: &MeshConfig) -> Launch {
    let rooms = cfg.rooms.iter().map(|(n, r)| (n.as_str(), r.replicas));
    Launch::Rendezvous(flags::rendezvous(&cfg.name, &cfg.spec, rooms))
}

pub(super) fn plan(cfg: &MeshConfig, cells: &[(String, u32)], rendezvous: &[String]) -> Vec<Spec> {
    let spec = &cfg.spec;
    let mut out = Vec::new();
    for i in 0..spec.replicas {
        let name = format!("{}-{i}", cfg.name);
        out.push(Spec {
            role: Role::Transmitter,
            args: Launch::Transmitter(flags::transmitter(&cfg.name, &name, spec, rendezvous)),
            name,
            service: None,
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
            let mut args = flags::sidecar(&cfg.name, service, &name, sspec, spec, rendezvous);
            args.resp_bind = SocketAddr::from(([127, 0, 0, 1], 0));
            // Spread cells over the transmitters, as a scheduler would spread pods.
            args.prefer_transmitter =
                Some(format!("{}-{}", cfg.name, next_transmitter % spec.replicas));
            next_transmitter += 1;
            out.push(Spec {
                role: Role::Cell,
                name,
                service: Some(service.clone()),
                args: Launch::Cell(args),
            });
        }
    }
    out
}

/// After a child's first start, pin the ports it chose, so a restart serves the same
/// endpoints (as a StatefulSet pod keeps its name and address).
pub(super) fn pin_ports(spec: &mut Spec, ready: &Ready) {
    // `http://host:port/metrics` → host:port
    let metrics = |url: &str| {
        url.trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .parse::<SocketAddr>()
            .ok()
    };
    match (&mut spec.args, ready) {
        (Launch::Rendezvous(a), Ready::Rendezvous(r)) => {
            if let Ok(bind) = r.address.trim_start_matches("udp://").parse() {
                a.bind = bind;
            }
            a.metrics_bind = metrics(&r.metrics).unwrap_or(a.metrics_bind);
        }
        (Launch::Transmitter(a), Ready::Transmitter(r)) => {
            a.command_bind.clone_from(&r.command);
            a.event_bind.clone_from(&r.event);
            a.metrics_bind = metrics(&r.metrics).unwrap_or(a.metrics_bind);
        }
        (Launch::Cell(a), Ready::Sidecar(r)) => {
            a.resp_bind = r.resp.parse().unwrap_or(a.resp_bind);
            a.metrics_bind = metrics(&r.metrics).unwrap_or(a.metrics_bind);
        }
        _ => {}
    }
}
