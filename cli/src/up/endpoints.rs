//! What `up` tells its user: where declared rooms were placed (asked of the rendezvous),
//! the endpoints table, and the same as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;
use thynapse_process::Ready;
use thynapse_protocol::seal::Sealer;
use tokio::sync::{mpsc, watch};

use super::plan::Launch;
use super::{Report, Role, Spec, State};

/// Where a declared room lives, as the rendezvous says.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct RoomPlacement {
    pub(super) name: String,
    pub(super) replicas: u32,
    pub(super) transmitters: Vec<String>,
}

/// The order declared rooms are placed in: by name, so that a mesh's rooms go to the same
/// transmitters whatever the order of its manifests (each goes to the least busy).
fn placement_order(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

/// Places the declared rooms (in name order, once the rendezvous knows all `transmitters`)
/// and then reports where they live every second, so the endpoints follow failovers.
pub(super) async fn follow_rooms(
    mesh: String,
    rendezvous: Vec<String>,
    sealer: Option<Sealer>,
    names: Vec<String>,
    transmitters: usize,
    reports: mpsc::Sender<Report>,
    mut stop: watch::Receiver<bool>,
) {
    use thynapse_protocol::discovery::Datagram;
    let names = placement_order(names);
    let ask = |d: Datagram| {
        let (rendezvous, sealer) = (&rendezvous, sealer.as_ref());
        async move { thynapse_rendezvous::ask(rendezvous, &d, Duration::from_millis(500), sealer).await }
    };
    let pause = Duration::from_millis(20);
    // Wait until every transmitter has announced itself.
    loop {
        if let Some(Datagram::Peers {
            transmitters: live, ..
        }) = ask(Datagram::Query { mesh: mesh.clone() }).await
        {
            if live.len() >= transmitters {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
    let mut settled = false;
    loop {
        let mut placed = Vec::new();
        for name in &names {
            loop {
                let answer = ask(Datagram::Locate {
                    mesh: mesh.clone(),
                    room: name.clone(),
                })
                .await;
                match answer {
                    Some(Datagram::Room {
                        replicas,
                        transmitters,
                        ..
                    }) if !transmitters.is_empty() || settled => {
                        placed.push(RoomPlacement {
                            name: name.clone(),
                            replicas,
                            transmitters: transmitters.into_iter().map(|t| t.name).collect(),
                        });
                        break;
                    }
                    Some(Datagram::Error { error }) => {
                        eprintln!("thynapse up: room {name}: {error}");
                        break;
                    }
                    _ => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
        settled = true;
        if reports.send(Report::Rooms(placed)).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[derive(Serialize)]
pub(super) struct Endpoints {
    mesh: String,
    /// The mesh token's file, for a raw wire client to authenticate (docs/protocol.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<String>,
    rendezvous: Vec<Value>,
    transmitters: Vec<Value>,
    cells: Vec<Value>,
    rooms: Vec<RoomPlacement>,
}

pub(super) fn endpoints(
    mesh: &str,
    specs: &[Spec],
    states: &[State],
    rooms: &[RoomPlacement],
) -> Endpoints {
    let token_file = specs.iter().find_map(|s| match &s.args {
        Launch::Transmitter(a) => a.token_file.clone(),
        _ => None,
    });
    let mut e = Endpoints {
        mesh: mesh.to_string(),
        token_file,
        rendezvous: vec![],
        transmitters: vec![],
        cells: vec![],
        rooms: rooms.to_vec(),
    };
    for (spec, state) in specs.iter().zip(states) {
        let pid = state.pid;
        let info = state.info.as_ref();
        match spec.role {
            Role::Rendezvous => {
                let r = info.and_then(Ready::rendezvous);
                let (address, metrics) = (r.map(|r| &r.address), r.map(|r| &r.metrics));
                e.rendezvous.push(
                    serde_json::json!({"name": spec.name, "address": address, "metrics": metrics, "pid": pid}),
                );
            }
            Role::Transmitter => {
                let t = info.and_then(Ready::transmitter);
                e.transmitters.push(serde_json::json!({
                    "name": spec.name, "command": t.map(|t| &t.command), "event": t.map(|t| &t.event),
                    "metrics": t.map(|t| &t.metrics), "id": t.map(|t| t.id), "pid": pid,
                }));
            }
            Role::Cell => {
                let c = info.and_then(Ready::sidecar);
                e.cells.push(serde_json::json!({
                    "service": spec.service, "name": spec.name, "resp": c.map(|c| &c.resp), "metrics": c.map(|c| &c.metrics),
                    "transmitter": c.map(|c| &c.transmitter), "id": c.map(|c| c.id), "pid": pid,
                }));
            }
        }
    }
    e
}

/// Writes the endpoints JSON atomically: a reader sees the old file or the new one.
pub(super) fn write_endpoints(
    path: &PathBuf,
    mesh: &str,
    specs: &[Spec],
    states: &[State],
    rooms: &[RoomPlacement],
) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(&endpoints(mesh, specs, states, rooms))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

pub(super) fn print_table(mesh: &str, specs: &[Spec], states: &[State], rooms: &[RoomPlacement]) {
    let mut rows: BTreeMap<(Role, usize), [String; 6]> = BTreeMap::new();
    for (i, (spec, state)) in specs.iter().zip(states).enumerate() {
        let dash = || "-".to_string();
        let (kind, endpoint, metrics, extra) = match (spec.role, &state.info) {
            (Role::Rendezvous, Some(Ready::Rendezvous(r))) => {
                ("rendezvous", r.address.clone(), r.metrics.clone(), dash())
            }
            (Role::Rendezvous, _) => ("rendezvous", dash(), dash(), dash()),
            (Role::Transmitter, Some(Ready::Transmitter(t))) => (
                "transmitter",
                t.command.clone(),
                t.metrics.clone(),
                format!("event {}", t.event),
            ),
            (Role::Transmitter, _) => ("transmitter", dash(), dash(), "event -".into()),
            (Role::Cell, info) => {
                let c = info.as_ref().and_then(Ready::sidecar);
                (
                    "cell",
                    format!("redis://{}", c.map_or("-", |c| &c.resp)),
                    c.map_or_else(dash, |c| c.metrics.clone()),
                    format!(
                        "{} on {}",
                        spec.service.as_deref().unwrap_or("-"),
                        c.map_or("-", |c| &c.transmitter)
                    ),
                )
            }
        };
        let pid = state.pid.map_or("-".into(), |p| p.to_string());
        rows.insert(
            (spec.role, i),
            [
                kind.into(),
                spec.name.clone(),
                endpoint,
                metrics,
                extra,
                pid,
            ],
        );
    }
    let mut rows: Vec<[String; 6]> = rows.into_values().collect();
    for r in rooms {
        rows.push([
            "room".into(),
            r.name.clone(),
            format!("{{{}}}*", r.name),
            "-".into(),
            format!("on {}", r.transmitters.join(", ")),
            "-".into(),
        ]);
    }
    let headers = ["KIND", "NAME", "ENDPOINT", "METRICS", "DETAIL", "PID"];
    let mut widths = headers.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: [&str; 6]| {
        let mut out = String::new();
        for (c, w) in cols.iter().zip(widths) {
            out.push_str(&format!("{c:<w$}  "));
        }
        println!("{}", out.trim_end());
    };
    println!("mesh {mesh} is up");
    line(headers);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
    if let Some(cell) = specs.iter().zip(states).find(|(s, _)| s.role == Role::Cell) {
        if let Some(Ready::Sidecar(c)) = &cell.1.info {
            let resp = &c.resp;
            let (host, port) = resp.rsplit_once(':').unwrap_or((resp, "6379"));
            println!(
                "try: redis-cli -h {host} -p {port} publish hello world    (Ctrl-C stops the mesh)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_protocol::discovery::TransmitterInfo;
    use thynapse_rendezvous::placement::{RoomPolicy, Rooms};

    fn transmitter(name: &str) -> TransmitterInfo {
        TransmitterInfo::named(name)
    }

    #[test]
    fn declared_rooms_are_placed_in_name_order_whatever_the_manifests_order() {
        let live = ["t-0", "t-1", "t-2"].map(transmitter);
        let declared = ["zeta", "alpha", "mid"];
        for manifests in [declared, ["mid", "zeta", "alpha"], ["alpha", "mid", "zeta"]] {
            let policy = RoomPolicy {
                declared: declared.iter().map(|n| (n.to_string(), 1)).collect(),
                default_replicas: 1,
                allow_undeclared: false,
            };
            let mut rooms = Rooms::new("m", policy);
            let names = manifests.iter().map(|n| n.to_string()).collect();
            let placed: Vec<(String, Vec<String>)> = placement_order(names)
                .into_iter()
                .map(|name| {
                    let (_, hosts) = rooms.locate(&name, &live).unwrap();
                    (name, hosts)
                })
                .collect();
            let expected = [("alpha", "t-0"), ("mid", "t-1"), ("zeta", "t-2")]
                .map(|(room, host)| (room.to_string(), vec![host.to_string()]));
            assert_eq!(placed, expected, "manifests in the order {manifests:?}");
        }
    }
}
