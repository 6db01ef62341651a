//! `thynapse up`: local mode. Reads manifests, starts the rendezvous, the transmitters and
//! the cells as child processes of this one, waits until every cell is connected, prints
//! the endpoints (and writes them as JSON), restarts a child that dies as Kubernetes
//! would, and stops them all on SIGINT or SIGTERM.
//!
//! Children report on stdout with one line each: `READY {json}` when serving, `MOVED
//! {json}` when a cell changes transmitter, `LINKED {"peers": n}` when a transmitter's
//! links change (the mesh is up once every transmitter is linked to every other). Their
//! logs go to stderr. `plan` says what to start, `children` runs each, `endpoints`
//! reports where everything is.

mod children;
mod endpoints;
mod plan;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use thynapse_process::{Ready, SidecarReady};
use thynapse_resources::{load_path, MeshConfig};
use tokio::sync::{mpsc, watch};

use children::supervise;
use endpoints::{follow_rooms, print_table, write_endpoints, RoomPlacement};
use plan::Launch;
use thynapse_protocol::seal::Sealer;

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
    /// The mesh token (docs/security.md); by default a new one is generated for each run,
    /// into a file only this user can read, named in the endpoints JSON (`token_file`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
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
    args: Launch,
}

enum Report {
    Ready {
        index: usize,
        pid: u32,
        info: Ready,
    },
    Moved {
        index: usize,
        info: SidecarReady,
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

#[derive(Clone, Default)]
struct State {
    pid: Option<u32>,
    info: Option<Ready>,
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

async fn up(args: Args, cfg: MeshConfig) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the thynapse executable")?;
    let (reports_tx, mut reports) = mpsc::channel::<Report>(256);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut specs: Vec<Spec> = Vec::new();
    let mut states: Vec<State> = Vec::new();
    // Every process proves itself with the token (and seals its datagrams), as in a
    // cluster; a generated one is removed however `up` ends.
    let token = match &args.token_file {
        Some(path) => TokenFile::given(path),
        None => TokenFile::generate()?,
    };
    let tokens = thynapse_process::read_tokens(&token.path).map_err(anyhow::Error::msg)?;
    let sealer = Sealer::peer(&tokens, &cfg.name);

    // Rendezvous first: everyone else needs its address.
    for i in 0..cfg.spec.rendezvous.replicas {
        let mut args = plan::rendezvous(&cfg);
        if let Launch::Rendezvous(a) = &mut args {
            a.token_file = Some(token.path.clone());
        }
        specs.push(Spec {
            role: Role::Rendezvous,
            name: format!("{}-rendezvous-{i}", cfg.name),
            service: None,
            args,
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
                if let Ready::Rendezvous(r) = &info {
                    rendezvous.push(r.address.clone());
                }
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
    for mut spec in plan::plan(&cfg, &args.cells, &rendezvous) {
        match &mut spec.args {
            Launch::Transmitter(a) => a.token_file = Some(token.path.clone()),
            Launch::Cell(a) => a.token_file = Some(token.path.clone()),
            Launch::Rendezvous(_) => {}
        }
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
                sealer.clone(),
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
                    if let Some(Ready::Sidecar(old)) = states[index].info.as_mut() {
                        old.transmitter = info.transmitter;
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
    // Children keep reporting while they stop (a draining transmitter prints `LINKED` as
    // each peer leaves): read on, or a supervisor blocked on a full channel would never
    // stop its child nor reap it (zombies, and `up` never exiting).
    tokio::spawn(async move { while reports.recv().await.is_some() {} });
    for t in tasks {
        let _ = t.await;
    }
    drop(token);
    match failure {
        Some(f) => bail!(f),
        None => Ok(()),
    }
}

/// The token file of a run: given, or generated for it and removed when dropped.
struct TokenFile {
    path: String,
    generated: bool,
}

impl TokenFile {
    fn given(path: &std::path::Path) -> TokenFile {
        TokenFile {
            path: path.display().to_string(),
            generated: false,
        }
    }

    fn generate() -> anyhow::Result<TokenFile> {
        Ok(TokenFile {
            path: generate_token()?,
            generated: true,
        })
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        if self.generated {
            // The token of this run dies with it.
            if let Some(dir) = std::path::Path::new(&self.path).parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// A fresh random mesh token, in a file only this user can read; its path.
fn generate_token() -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    // A name nobody can guess, made here (not found): another local user cannot have
    // prepared it, or a link in its place.
    let name = format!("thynapse-up-{}", thynapse_protocol::auth::nonce());
    let dir = std::env::temp_dir().join(name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("token");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    // 256 random bits, as hex.
    let token = format!(
        "{}{}",
        thynapse_protocol::auth::nonce(),
        thynapse_protocol::auth::nonce()
    );
    writeln!(file, "{token}")?;
    Ok(path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::plan::{pin_ports, plan};
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
        let prefs: Vec<&str> = p
            .iter()
            .filter_map(|s| match &s.args {
                Launch::Cell(a) => a.prefer_transmitter.as_deref(),
                _ => None,
            })
            .collect();
        assert_eq!(prefs, ["m-0", "m-1", "m-0"]);
    }

    #[test]
    fn pinning_ports_keeps_endpoints_across_restarts() {
        let mut spec = Spec {
            role: Role::Transmitter,
            name: "m-0".into(),
            service: None,
            args: Launch::Transmitter(thynapse_process::TransmitterArgs::new(
                "m",
                "m-0",
                &["udp://127.0.0.1:1".into()],
            )),
        };
        let ready: Ready = serde_json::from_str(
            r#"{"name": "m-0", "id": "0000000000000000000000000000000000000000", "command": "tcp://127.0.0.1:5", "event": "tcp://127.0.0.1:6", "metrics": "http://127.0.0.1:7/metrics"}"#,
        )
        .unwrap();
        pin_ports(&mut spec, &ready);
        let Launch::Transmitter(a) = &spec.args else {
            unreachable!()
        };
        assert_eq!(
            (
                &a.command_bind[..],
                &a.event_bind[..],
                a.metrics_bind.port()
            ),
            ("tcp://127.0.0.1:5", "tcp://127.0.0.1:6", 7)
        );
    }
}
