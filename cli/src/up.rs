//! `thynapse up`: local mode. Reads manifests, starts the rendezvous, the transmitters and
//! the cells as child processes of this one, waits until every cell is connected, prints
//! the endpoints (and writes them as JSON), restarts a child that dies as Kubernetes
//! would, and stops them all on SIGINT or SIGTERM.
//!
//! Children report on stdout with one line each: `READY {json}` when serving, and
//! `MOVED {json}` when a cell changes transmitter. Their logs go to stderr.

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::Value;
use thynapse_resources::{flags, load_path, MeshConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A manifest file or a folder of them (as for `kubectl apply -f`).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Cells to run per Service, `SERVICE=N` (default 1 each; repeat the flag).
    #[arg(long = "cells", value_parser = parse_cells)]
    pub cells: Vec<(String, u32)>,
    /// Write the endpoints as JSON to this file once everything is connected.
    #[arg(long)]
    pub endpoints: Option<PathBuf>,
    /// Which TransmitterMesh to run when the manifests hold several.
    #[arg(long)]
    pub mesh: Option<String>,
    /// Seconds to wait for every cell to connect.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    #[arg(long)]
    pub mesh: Option<String>,
}

fn parse_cells(s: &str) -> Result<(String, u32), String> {
    let (service, n) = s.split_once('=').ok_or("expected SERVICE=N")?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{n:?} is not a number of cells"))?;
    if n > 1000 {
        return Err("at most 1000 cells per Service".into());
    }
    Ok((service.to_string(), n))
}

fn load(file: &std::path::Path, mesh: Option<&str>) -> anyhow::Result<MeshConfig> {
    let docs = load_path(file)?;
    Ok(MeshConfig::from_documents(&docs, mesh)?)
}

pub fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let cfg = load(&args.file, args.mesh.as_deref())?;
    println!(
        "mesh {}: {} transmitters, {} rendezvous, services: [{}], rooms: [{}]",
        cfg.name,
        cfg.spec.replicas,
        cfg.spec.rendezvous.replicas,
        cfg.services
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.rooms
            .iter()
            .map(|r| r.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Rendezvous,
    Transmitter,
    Cell,
}

/// One child process as `up` supervises it.
#[derive(Clone, Debug)]
struct Spec {
    role: Role,
    name: String,
    service: Option<String>,
    args: Vec<String>,
}

enum Report {
    Ready {
        index: usize,
        pid: u32,
        info: Value,
    },
    Moved {
        index: usize,
        info: Value,
    },
    /// A transmitter's number of peers with a ready link (`LINKED {"peers": n}`).
    Linked {
        index: usize,
        peers: usize,
    },
    Exited {
        index: usize,
        status: String,
    },
    Rooms(Vec<RoomPlacement>),
}

/// Where a declared room lives, as the rendezvous says.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct RoomPlacement {
    name: String,
    replicas: u32,
    transmitters: Vec<String>,
}

#[derive(Clone, Default)]
struct State {
    pid: Option<u32>,
    info: Option<Value>,
    /// Transmitters: peers linked, as last reported.
    linked: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = load(&args.file, args.mesh.as_deref())?;
    for (service, _) in &args.cells {
        if !cfg.services.iter().any(|(s, _)| s == service) {
            bail!(
                "--cells {service}=…: no Service {service:?} in mesh {:?}",
                cfg.name
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(up(args, cfg))
}

/// The rendezvous carries the mesh's room policy: declared rooms and what to do with
/// others.
fn rendezvous_args(cfg: &MeshConfig) -> Vec<String> {
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

/// Places the declared rooms (in name order, once the rendezvous knows all `transmitters`)
/// and then reports where they live every second, so the endpoints follow failovers.
async fn follow_rooms(
    mesh: String,
    rendezvous: Vec<String>,
    mut names: Vec<String>,
    transmitters: usize,
    reports: mpsc::Sender<Report>,
    mut stop: watch::Receiver<bool>,
) {
    use thynapse_protocol::discovery::Datagram;
    names.sort();
    let ask = |d: Datagram| {
        let rendezvous = &rendezvous;
        async move { thynapse_rendezvous::ask(rendezvous, &d, Duration::from_millis(500)).await }
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

fn plan(cfg: &MeshConfig, cells: &[(String, u32)], rendezvous: &[String]) -> Vec<Spec> {
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
fn pin_ports(spec: &mut Spec, info: &Value) {
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

async fn up(args: Args, cfg: MeshConfig) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the thynapse executable")?;
    let (reports_tx, mut reports) = mpsc::channel::<Report>(256);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut specs: Vec<Spec> = Vec::new();
    let mut states: Vec<State> = Vec::new();

    // Rendezvous first: everyone else needs its address.
    for i in 0..cfg.spec.rendezvous.replicas {
        specs.push(Spec {
            role: Role::Rendezvous,
            name: format!("{}-rendezvous-{i}", cfg.name),
            service: None,
            args: rendezvous_args(&cfg),
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ready_timeout);
    for (index, spec) in specs.iter().enumerate() {
        states.push(State::default());
        tasks.push(tokio::spawn(supervise(
            exe.clone(),
            index,
            spec.clone(),
            reports_tx.clone(),
            stop_rx.clone(),
        )));
    }
    let mut rendezvous = Vec::new();
    while rendezvous.len() < specs.len() {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some(Report::Ready { index, pid, info })) => {
                rendezvous.push(info["address"].as_str().unwrap_or_default().to_string());
                states[index] = State {
                    pid: Some(pid),
                    info: Some(info),
                    linked: 0,
                };
            }
            Ok(Some(Report::Exited { index, status })) => {
                let _ = stop_tx.send(true);
                bail!(
                    "{} exited before it was ready ({status})",
                    specs[index].name
                );
            }
            _ => {
                let _ = stop_tx.send(true);
                bail!("the rendezvous did not start in time");
            }
        }
    }
    let first = specs.len();
    for spec in plan(&cfg, &args.cells, &rendezvous) {
        let index = specs.len();
        specs.push(spec.clone());
        states.push(State::default());
        tasks.push(tokio::spawn(supervise(
            exe.clone(),
            index,
            spec,
            reports_tx.clone(),
            stop_rx.clone(),
        )));
    }

    let mut stop_signals = thynapse_telemetry::StopSignals::new()?;
    let mut announced = false;
    let mut failure: Option<String> = None;
    let mut rooms: Option<Vec<RoomPlacement>> = None;
    let mut placing = false;
    let transmitters = cfg.spec.replicas as usize;
    loop {
        let ready = |role: Role| {
            specs
                .iter()
                .zip(&states)
                .filter(|(s, _)| s.role == role)
                .all(|(_, s)| s.info.is_some())
        };
        if !placing && ready(Role::Transmitter) {
            // Declared rooms are placed once every transmitter is live, so they spread
            // over all of them; then their placement is followed for the endpoints.
            placing = true;
            let names = cfg.rooms.iter().map(|(n, _)| n.clone()).collect();
            tasks.push(tokio::spawn(follow_rooms(
                cfg.name.clone(),
                rendezvous.clone(),
                names,
                transmitters,
                reports_tx.clone(),
                stop_rx.clone(),
            )));
        }
        // Up means linked too: every transmitter to every other, so that a subscription
        // confirmed from now on is known mesh-wide (see docs/architecture.md).
        let linked = specs
            .iter()
            .zip(&states)
            .filter(|(s, _)| s.role == Role::Transmitter)
            .all(|(_, s)| s.linked + 1 >= transmitters);
        let all_ready =
            states[first..].iter().all(|s| s.info.is_some()) && rooms.is_some() && linked;
        if all_ready && !announced {
            announced = true;
            print_table(
                &cfg.name,
                &specs,
                &states,
                rooms.as_deref().unwrap_or_default(),
            );
        }
        if announced {
            if let Some(path) = &args.endpoints {
                write_endpoints(
                    path,
                    &cfg.name,
                    &specs,
                    &states,
                    rooms.as_deref().unwrap_or_default(),
                )?;
            }
        }
        let timeout = if announced { None } else { Some(deadline) };
        tokio::select! {
            report = reports.recv() => match report {
                Some(Report::Ready { index, pid, info }) => {
                    if announced {
                        eprintln!("thynapse up: {} is ready again (pid {pid})", specs[index].name);
                    }
                    states[index] = State { pid: Some(pid), info: Some(info), linked: 0 };
                }
                Some(Report::Moved { index, info }) => {
                    if let (Some(old), Some(t)) = (states[index].info.as_mut(), info.get("transmitter")) {
                        old["transmitter"] = t.clone();
                    }
                }
                Some(Report::Linked { index, peers }) => states[index].linked = peers,
                Some(Report::Exited { index, status }) => {
                    eprintln!("thynapse up: {} exited ({status}); restarting it", specs[index].name);
                    states[index].pid = None;
                    // Its links went with it: not up again until it is linked again.
                    states[index].linked = 0;
                }
                Some(Report::Rooms(placed)) => {
                    if announced && rooms.as_ref() != Some(&placed) {
                        for r in &placed {
                            eprintln!("thynapse up: room {} is on {}", r.name, r.transmitters.join(", "));
                        }
                    }
                    rooms = Some(placed);
                }
                None => break,
            },
            _ = async { match timeout { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                let waiting: Vec<String> = specs.iter().zip(&states).filter_map(|(spec, s)| match (&s.info, spec.role) {
                    (None, _) => Some(spec.name.clone()),
                    (Some(_), Role::Transmitter) if s.linked + 1 < transmitters => Some(format!("{} (linked to {} of {} peers)", spec.name, s.linked, transmitters - 1)),
                    _ => None,
                }).collect();
                failure = Some(format!("not ready after {}s: {}", args.ready_timeout, waiting.join(", ")));
                break;
            }
            _ = stop_signals.recv() => break,
        }
    }
    eprintln!("thynapse up: stopping");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    match failure {
        Some(f) => bail!(f),
        None => Ok(()),
    }
}

/// Runs one child and restarts it when it dies, until told to stop; then stops it with
/// SIGTERM (SIGKILL after a grace period). Cells stop first, so transmitters have nothing
/// left to drain, and the rendezvous last.
async fn supervise(
    exe: PathBuf,
    index: usize,
    mut spec: Spec,
    reports: mpsc::Sender<Report>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut cmd = Command::new(&exe);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        // SAFETY: pre_exec runs between fork and exec, where only async-signal-safe calls
        // may be made; prctl is one. It asks the kernel to send SIGTERM to this child if
        // `up` itself dies, so no process outlives a killed `up`.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(Signal::SIGTERM))?;
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = reports
                    .send(Report::Exited {
                        index,
                        status: format!("spawn failed: {e}"),
                    })
                    .await;
                return;
            }
        };
        let pid = child.id().unwrap_or_default();
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let status = loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        if let Some(json) = line.strip_prefix("READY ") {
                            let info: Value = serde_json::from_str(json).unwrap_or(Value::Null);
                            pin_ports(&mut spec, &info);
                            backoff = Duration::from_millis(500);
                            let _ = reports.send(Report::Ready { index, pid, info }).await;
                        } else if let Some(json) = line.strip_prefix("MOVED ") {
                            let info: Value = serde_json::from_str(json).unwrap_or(Value::Null);
                            let _ = reports.send(Report::Moved { index, info }).await;
                        } else if let Some(json) = line.strip_prefix("LINKED ") {
                            let info: Value = serde_json::from_str(json).unwrap_or(Value::Null);
                            let peers = info["peers"].as_u64().unwrap_or(0) as usize;
                            let _ = reports.send(Report::Linked { index, peers }).await;
                        }
                    }
                    _ => break child.wait().await,
                },
                status = child.wait() => break status,
                _ = stop.changed() => {
                    stop_child(&mut child, spec.role).await;
                    return;
                }
            }
        };
        if *stop.borrow() {
            return;
        }
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let _ = reports.send(Report::Exited { index, status }).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn stop_child(child: &mut tokio::process::Child, role: Role) {
    // Let cells go before transmitters, and transmitters before the rendezvous.
    let delay = match role {
        Role::Cell => 0,
        Role::Transmitter => 200,
        Role::Rendezvous => 400,
    };
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

#[derive(Serialize)]
struct Endpoints {
    mesh: String,
    rendezvous: Vec<Value>,
    transmitters: Vec<Value>,
    cells: Vec<Value>,
    rooms: Vec<RoomPlacement>,
}

fn endpoints(mesh: &str, specs: &[Spec], states: &[State], rooms: &[RoomPlacement]) -> Endpoints {
    let mut e = Endpoints {
        mesh: mesh.to_string(),
        rendezvous: vec![],
        transmitters: vec![],
        cells: vec![],
        rooms: rooms.to_vec(),
    };
    for (spec, state) in specs.iter().zip(states) {
        let info = state.info.clone().unwrap_or(Value::Null);
        let s = |k: &str| info.get(k).cloned().unwrap_or(Value::Null);
        let pid = state.pid.map_or(Value::Null, Value::from);
        match spec.role {
            Role::Rendezvous => e.rendezvous.push(serde_json::json!({"name": spec.name, "address": s("address"), "pid": pid})),
            Role::Transmitter => e.transmitters.push(serde_json::json!({
                "name": spec.name, "command": s("command"), "event": s("event"), "metrics": s("metrics"), "id": s("id"), "pid": pid,
            })),
            Role::Cell => e.cells.push(serde_json::json!({
                "service": spec.service, "name": spec.name, "resp": s("resp"), "metrics": s("metrics"),
                "transmitter": s("transmitter"), "id": s("id"), "pid": pid,
            })),
        }
    }
    e
}

/// Writes the endpoints JSON atomically: a reader sees the old file or the new one.
fn write_endpoints(
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

fn print_table(mesh: &str, specs: &[Spec], states: &[State], rooms: &[RoomPlacement]) {
    let mut rows: BTreeMap<(Role, usize), [String; 6]> = BTreeMap::new();
    for (i, (spec, state)) in specs.iter().zip(states).enumerate() {
        let info = state.info.clone().unwrap_or(Value::Null);
        let s = |k: &str| {
            info.get(k)
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_string()
        };
        let (kind, endpoint, extra) = match spec.role {
            Role::Rendezvous => ("rendezvous", s("address"), "-".to_string()),
            Role::Transmitter => ("transmitter", s("command"), format!("event {}", s("event"))),
            Role::Cell => (
                "cell",
                format!("redis://{}", s("resp")),
                format!(
                    "{} on {}",
                    spec.service.as_deref().unwrap_or("-"),
                    s("transmitter")
                ),
            ),
        };
        let pid = state.pid.map_or("-".into(), |p| p.to_string());
        rows.insert(
            (spec.role, i),
            [
                kind.into(),
                spec.name.clone(),
                endpoint,
                s("metrics"),
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
        if let Some(resp) = cell
            .1
            .info
            .as_ref()
            .and_then(|i| i.get("resp"))
            .and_then(Value::as_str)
        {
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

    #[test]
    fn cells_flag() {
        assert_eq!(parse_cells("orders=4").unwrap(), ("orders".to_string(), 4));
        assert!(parse_cells("orders").is_err());
        assert!(parse_cells("orders=x").is_err());
    }

    #[test]
    fn plan_spreads_cells_over_transmitters() {
        let docs = thynapse_resources::parse_manifests(
            "apiVersion: thynapse.io/v1alpha1\nkind: TransmitterMesh\nmetadata: {name: m}\nspec: {replicas: 2}\n---\napiVersion: thynapse.io/v1alpha1\nkind: Service\nmetadata: {name: s}\nspec: {mesh: m}\n",
            "t",
        )
        .unwrap();
        let cfg = MeshConfig::from_documents(&docs, None).unwrap();
        let p = plan(&cfg, &[("s".into(), 3)], &["udp://127.0.0.1:1".into()]);
        assert_eq!(p.iter().filter(|s| s.role == Role::Transmitter).count(), 2);
        let prefs: Vec<&String> = p
            .iter()
            .filter(|s| s.role == Role::Cell)
            .map(|s| {
                &s.args[s
                    .args
                    .iter()
                    .position(|a| a == "--prefer-transmitter")
                    .unwrap()
                    + 1]
            })
            .collect();
        assert_eq!(prefs, ["m-0", "m-1", "m-0"]);
    }

    #[test]
    fn pinning_ports_keeps_endpoints_across_restarts() {
        let mut spec = Spec {
            role: Role::Transmitter,
            name: "t".into(),
            service: None,
            args: vec!["transmitter".into()],
        };
        pin_ports(
            &mut spec,
            &serde_json::json!({"command": "tcp://127.0.0.1:5", "event": "tcp://127.0.0.1:6", "metrics": "http://127.0.0.1:7/metrics"}),
        );
        assert_eq!(
            spec.args,
            [
                "transmitter",
                "--command-bind",
                "tcp://127.0.0.1:5",
                "--event-bind",
                "tcp://127.0.0.1:6",
                "--metrics-bind",
                "127.0.0.1:7"
            ]
        );
    }
}
