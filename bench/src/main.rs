//! `thynapse-bench`: Thynapse side by side with Redis pub/sub and NATS, on this machine,
//! in one run: the same scenarios, the same load generator, interleaved and repeated.
//! Prints a Markdown table (median and spread, ratios to Redis and NATS, loss) and writes
//! the same as JSON. `--quick` proves it works in well under a minute; the default is the
//! full run recorded in bench/README.md.

mod affinity;
mod load;
mod servers;
mod wakeups;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use load::{Endpoint, Publisher};
use serde::Serialize;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(about = "Benchmarks Thynapse against Redis pub/sub and NATS in one run")]
struct Args {
    /// A short run (small counts, one repetition): proves the suite works.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every measurement (default 1 quick, 5 full).
    #[arg(long)]
    repeats: Option<usize>,
    /// Transmitters in the mesh.
    #[arg(long, default_value_t = 3)]
    transmitters: u32,
    /// Only the rooms scenario (for scaling runs over transmitter counts).
    #[arg(long)]
    rooms_only: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results.json")]
    json: PathBuf,
    /// Working folder for the mesh.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// Only the scenarios whose name contains this (for profiling one path).
    #[arg(long)]
    filter: Option<String>,
    /// Confine every system's servers (redis-server, nats-server, the whole mesh) to this
    /// one CPU, leaving the load generator free: shows what wake-ups across CPUs cost.
    #[arg(long, value_name = "CPU")]
    pin_servers: Option<usize>,
    /// Threads of the load generator. Two by default, as many as the machines CI runs on
    /// have; a scaling run on a larger machine gives it more, so that the mesh, not the
    /// load, is what runs out.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    load_threads: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum System {
    Redis,
    Nats,
    Thynapse,
}

const SYSTEMS: [System; 3] = [System::Redis, System::Nats, System::Thynapse];

#[derive(Clone, Debug, Serialize)]
struct Sample {
    value: f64,
    lost: u64,
    duplicates: u64,
}

#[derive(Default, Serialize)]
struct Row {
    unit: &'static str,
    /// Higher is better (throughput) or lower is (latency, memory).
    higher_is_better: bool,
    samples: BTreeMap<String, Vec<Sample>>,
}

#[derive(Default)]
struct Results {
    rows: Vec<(String, Row)>,
    notes: Vec<String>,
    filter: Option<String>,
}

impl Results {
    fn wants(&self, scenario: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| scenario.contains(f.as_str()))
    }
}

impl Results {
    fn add(&mut self, scenario: &str, unit: &'static str, higher: bool, system: System, s: Sample) {
        if self
            .filter
            .as_ref()
            .is_some_and(|f| !scenario.contains(f.as_str()))
        {
            return;
        }
        let i = match self.rows.iter().position(|(n, _)| n == scenario) {
            Some(i) => i,
            None => {
                self.rows.push((
                    scenario.to_string(),
                    Row {
                        unit,
                        higher_is_better: higher,
                        ..Row::default()
                    },
                ));
                self.rows.len() - 1
            }
        };
        self.rows[i]
            .1
            .samples
            .entry(format!("{system:?}"))
            .or_default()
            .push(s);
    }
}

struct Setup {
    redis: std::net::SocketAddr,
    nats: String,
    mesh: servers::Mesh,
    redis_pid: u32,
    nats_pid: u32,
}

struct Sizes {
    count: u64,
    fanout_count: u64,
    latency_secs: f64,
    latency_rates: Vec<u64>,
    room_messages: u64,
}

/// Publisher and subscriber endpoints for one system in a 1→n scenario.
fn endpoints(
    setup: &Setup,
    system: System,
    subscribers: usize,
    same_transmitter: bool,
    service: &str,
) -> (Endpoint, Vec<Endpoint>) {
    match system {
        System::Redis => (
            Endpoint::Resp(setup.redis),
            vec![Endpoint::Resp(setup.redis); subscribers],
        ),
        System::Nats => (
            Endpoint::Nats(setup.nats.clone()),
            vec![Endpoint::Nats(setup.nats.clone()); subscribers],
        ),
        System::Thynapse => {
            let publisher = setup.mesh.cells("bench")[0].clone();
            let candidates: Vec<_> = if service == "bench" {
                setup
                    .mesh
                    .cells("bench")
                    .into_iter()
                    .skip(1)
                    .filter(|c| (c.1 == publisher.1) == same_transmitter)
                    .collect()
            } else {
                setup.mesh.cells(service)
            };
            let subs = (0..subscribers)
                .map(|i| Endpoint::Resp(candidates[i % candidates.len()].0))
                .collect();
            (Endpoint::Resp(publisher.0), subs)
        }
    }
}

/// Receivers a probe must reach before measuring (cells for Thynapse, clients for Redis).
fn probe_receivers(system: System, subs: &[Endpoint], anycatch: bool) -> i64 {
    match system {
        System::Thynapse if anycatch => 1,
        System::Thynapse => {
            let mut cells: Vec<String> = subs.iter().map(|e| format!("{e:?}")).collect();
            cells.sort();
            cells.dedup();
            cells.len() as i64
        }
        _ => subs.len() as i64,
    }
}

/// Publishes `count` messages as fast as the system takes them; returns deliveries per
/// second (from the first send to the last delivery), loss and duplicates.
async fn throughput(
    system: System,
    publisher: &Endpoint,
    subs: &[Endpoint],
    channel: &str,
    size: usize,
    count: u64,
    anycatch: bool,
) -> anyhow::Result<Sample> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let queue = anycatch && system == System::Nats;
    let mut subscribers = Vec::new();
    for s in subs {
        subscribers.push(load::subscribe(s, channel, false, queue, count, stop_rx.clone()).await?);
    }
    let mut p = Publisher::connect(publisher).await?;
    p.until_routed(channel, false, probe_receivers(system, subs, anycatch))
        .await?;
    let expected = if anycatch {
        count
    } else {
        count * subs.len() as u64
    };
    let start = Instant::now();
    p.send(channel, false, 0, count, size).await?;
    wait_for_deliveries(&subscribers, expected).await;
    let _ = stop_tx.send(true);
    let mut received = 0;
    let mut duplicates = 0;
    let mut last = start;
    for s in subscribers {
        let r = s.task.await??;
        received += r.messages;
        duplicates += r.duplicates;
        last = last.max(r.last.unwrap_or(start));
    }
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-6);
    Ok(Sample {
        value: received as f64 / elapsed,
        lost: expected.saturating_sub(received),
        duplicates,
    })
}

/// Waits until the subscribers got `expected` messages in all, or made no progress for 3 s.
async fn wait_for_deliveries(subs: &[load::Subscriber], expected: u64) {
    use std::sync::atomic::Ordering;
    let mut last_total = 0;
    let mut last_change = Instant::now();
    loop {
        let total: u64 = subs.iter().map(|s| s.count.load(Ordering::Relaxed)).sum();
        if total >= expected {
            return;
        }
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(3) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One-way latency at a fixed rate: returns the histogram (µs) and loss.
async fn latency(
    system: System,
    publisher: &Endpoint,
    sub: &Endpoint,
    size: usize,
    rate: u64,
    secs: f64,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let total = (rate as f64 * secs) as u64;
    let s = load::subscribe(sub, "lat", false, false, total, stop_rx).await?;
    let mut p = Publisher::connect(publisher).await?;
    p.until_routed(
        "lat",
        false,
        probe_receivers(system, std::slice::from_ref(sub), false),
    )
    .await?;
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(
        Duration::from_millis(1).mul_f64(per_tick as f64 * 1000.0 / rate as f64),
    );
    let mut seq = 0;
    while seq < total {
        tick.tick().await;
        let n = per_tick.min(total - seq);
        p.send("lat", false, seq, n, size).await?;
        seq += n;
    }
    wait_for_deliveries(std::slice::from_ref(&s), total).await;
    let _ = stop_tx.send(true);
    let r = s.task.await??;
    Ok((r.latency_us, total.saturating_sub(r.messages)))
}

/// What one rooms run measured.
struct RoomsRun {
    sample: Sample,
    transmitters: Vec<RoomShare>,
    /// CPU seconds by mesh process and load generator, as the messages started and after
    /// the last was delivered.
    cpu_before: Vec<(String, f64)>,
    cpu_after: Vec<(String, f64)>,
}

/// One transmitter's part in a rooms run.
struct RoomShare {
    name: String,
    hosted: usize,
    carried: f64,
    /// CPU time over wall time while the messages flowed: 1.0 is one CPU used up.
    busy: f64,
}

impl RoomsRun {
    /// The aggregate rate the transmitters could carry before the busiest of them runs out
    /// of its CPU, from the rate measured and that transmitter's share of a CPU. On one
    /// machine the clients (load generator, sidecars) share the CPUs with the transmitters
    /// and cap the measured rate; this is what the transmitters themselves would allow.
    fn transmitter_capacity(&self) -> Option<f64> {
        let busiest = self.transmitters.iter().map(|t| t.busy).fold(0.0, f64::max);
        (busiest > 0.0).then(|| self.sample.value / busiest)
    }
}

/// Rooms: `rooms` rooms, a subscriber each and publishers on every cell, the publishers
/// driven in `groups` groups that run in parallel.
async fn rooms(
    setup: &Setup,
    rooms: usize,
    per_room: u64,
    groups: usize,
) -> anyhow::Result<RoomsRun> {
    let cells = setup.mesh.cells("bench");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subs = Vec::new();
    for i in 0..rooms {
        let ep = Endpoint::Resp(cells[i % cells.len()].0);
        subs.push(
            load::subscribe(
                &ep,
                &format!("{{room-{i}}}x"),
                true,
                false,
                per_room,
                stop_rx.clone(),
            )
            .await?,
        );
    }
    let mut publishers = Vec::new();
    for i in 0..rooms {
        let ep = Endpoint::Resp(cells[(i + 1) % cells.len()].0);
        let mut p = Publisher::connect(&ep).await?;
        p.until_routed(&format!("{{room-{i}}}x"), true, 1).await?;
        publishers.push(p);
    }
    // (name, room messages carried, rooms hosted) for every transmitter.
    let carried = |setup: &Setup| -> Vec<(String, f64, usize)> {
        setup
            .mesh
            .transmitters()
            .into_iter()
            .map(|(name, _, metrics, _)| {
                let counts =
                    servers::counter_by_label(&metrics, "thynapse_transmitter_room_messages_total");
                let ours = counts.iter().filter(|(room, _)| room.starts_with("room-"));
                (name, ours.clone().map(|(_, v)| v).sum(), ours.count())
            })
            .collect()
    };
    let before = carried(setup);
    let cpu_before = cpu_by_process(setup, System::Thynapse);
    let start = Instant::now();
    // The publishers in `groups` groups, each driving its share. The first runs here, on the
    // thread that drives this future (as every other scenario's publisher does); the rest
    // are tasks on the load threads. All in one group, one thread builds every publish,
    // which capped the aggregate on 16 cores.
    let mut shares: Vec<Vec<(usize, Publisher)>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, p) in publishers.into_iter().enumerate() {
        shares[i % groups].push((i, p));
    }
    let drive = |share: Vec<(usize, Publisher)>| {
        futures::future::try_join_all(share.into_iter().map(|(i, mut p)| async move {
            p.send(&format!("{{room-{i}}}x"), true, 0, per_room, 64)
                .await
        }))
    };
    let mut shares = shares.into_iter();
    let here = shares.next().unwrap_or_default();
    let spawned: Vec<_> = shares.map(|share| tokio::spawn(drive(share))).collect();
    drive(here).await?;
    for share in spawned {
        share.await??;
    }
    let expected = per_room * rooms as u64;
    wait_for_deliveries(&subs, expected).await;
    let cpu_after = cpu_by_process(setup, System::Thynapse);
    let wall = start.elapsed().as_secs_f64().max(1e-6);
    let _ = stop_tx.send(true);
    let (mut received, mut duplicates, mut last) = (0, 0, start);
    for s in subs {
        let r = s.task.await??;
        received += r.messages;
        duplicates += r.duplicates;
        last = last.max(r.last.unwrap_or(start));
    }
    let transmitters = carried(setup)
        .into_iter()
        .map(|(name, v, hosted)| {
            let was = before.iter().find(|b| b.0 == name).map_or(0.0, |b| b.1);
            let cpu = |at: &[(String, f64)]| {
                at.iter()
                    .find(|(n, _)| *n == format!("transmitter {name}"))
                    .map_or(0.0, |c| c.1)
            };
            RoomShare {
                busy: (cpu(&cpu_after) - cpu(&cpu_before)) / wall,
                name,
                hosted,
                carried: v - was,
            }
        })
        .collect();
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-6);
    Ok(RoomsRun {
        sample: Sample {
            value: received as f64 / elapsed,
            lost: expected.saturating_sub(received),
            duplicates,
        },
        transmitters,
        cpu_before,
        cpu_after,
    })
}

/// Waits (up to 15 s) until every transmitter announces a message rate under 50/s.
async fn settle(setup: &Setup) {
    use thynapse_protocol::discovery::Datagram;
    let Some(address) = setup.mesh.endpoints["rendezvous"][0]["address"].as_str() else {
        return;
    };
    let addresses = [address.to_string()];
    let query = Datagram::Query {
        mesh: "bench".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let answer = thynapse_rendezvous::ask(&addresses, &query, Duration::from_millis(500)).await;
        if let Some(Datagram::Peers { transmitters, .. }) = answer {
            if transmitters.iter().all(|t| t.rate < 50.0) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Opens `n` cells (raw DEALERs saying HELO) on one transmitter; returns its RSS then.
async fn transmitter_rss_with_cells(command: &str, pid: u32, n: usize) -> anyhow::Result<u64> {
    use thynapse_protocol::frame::CommandFrame;
    use thynapse_protocol::wire::{cmd, Events, Hello};
    use thynapse_protocol::Thid;
    use zeromq::{Socket, SocketRecv, SocketSend};
    let mut sockets = Vec::new();
    for i in 0..n {
        let mut s = zeromq::DealerSocket::new();
        s.connect(command).await?;
        let hello = Hello {
            id: Thid::random(),
            service: "idle".into(),
            rules: vec![],
            events: Events::Dealer,
            token: None,
            room: None,
        };
        s.send(CommandFrame::json(cmd::HELO, &hello).to_bytes().into())
            .await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .context("no WLCM")??;
        let mut subs = zeromq::ZmqMessage::from(
            CommandFrame::new(
                thynapse_protocol::Encoding::Binary,
                cmd::SUBS,
                bytes::Bytes::new(),
            )
            .to_bytes(),
        );
        let channel = format!("idle.{i}");
        subs.push_back(thynapse_protocol::wire::encode_interest([(
            thynapse_protocol::wire::Op::Add,
            thynapse_protocol::wire::Interest::Channel,
            channel.as_bytes(),
        )]));
        s.send(subs).await?;
        sockets.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = servers::rss(pid).unwrap_or(0);
    for mut s in sockets {
        let _ = s
            .send(
                CommandFrame::json(cmd::QUIT, &serde_json::json!({}))
                    .to_bytes()
                    .into(),
            )
            .await;
    }
    Ok(rss)
}

/// The processes serving `system` (every process of the mesh), by name.
fn server_processes(setup: &Setup, system: System) -> Vec<(String, u32)> {
    match system {
        System::Redis => vec![("redis-server".to_string(), setup.redis_pid)],
        System::Nats => vec![("nats-server".to_string(), setup.nats_pid)],
        System::Thynapse => {
            let mut procs: Vec<(String, u32)> = setup
                .mesh
                .transmitters()
                .into_iter()
                .map(|(name, _, _, pid)| (format!("transmitter {name}"), pid))
                .collect();
            for service in ["bench", "workers"] {
                let cells = setup.mesh.cells(service);
                for (i, (_, transmitter, pid)) in cells.iter().enumerate() {
                    procs.push((format!("sidecar {service}-{i} (on {transmitter})"), *pid));
                }
            }
            procs
        }
    }
}

/// CPU seconds used so far by the processes serving `system`, and by this load generator.
fn cpu_by_process(setup: &Setup, system: System) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = server_processes(setup, system)
        .into_iter()
        .filter_map(|(name, pid)| Some((name, servers::cpu_seconds(pid)?)))
        .collect();
    if let Some(own) = servers::cpu_seconds(std::process::id()) {
        out.push((format!("load generator ({system:?} runs)"), own));
    }
    out
}

/// CPU time by process over every repetition of one scenario.
#[derive(Default)]
struct CpuTally {
    seconds: Vec<(System, String, f64)>,
    messages: BTreeMap<System, u64>,
}

impl CpuTally {
    fn add(&mut self, system: System, before: &[(String, f64)], after: &[(String, f64)], n: u64) {
        for (name, a) in after {
            let b = before.iter().find(|(x, _)| x == name).map_or(*a, |x| x.1);
            match self.seconds.iter_mut().find(|(_, x, _)| x == name) {
                Some(entry) => entry.2 += a - b,
                None => self.seconds.push((system, name.clone(), a - b)),
            }
        }
        *self.messages.entry(system).or_default() += n;
    }

    /// Where the time goes: CPU microseconds per message, per process and system.
    fn note(&self, scenario: &str) -> String {
        let mut note = format!(
            "Where the CPU goes, {scenario}, all repetitions, CPU µs per message:\n\n| process | CPU µs / message |\n|---|---|\n"
        );
        for system in SYSTEMS {
            let Some(&n) = self.messages.get(&system) else {
                continue;
            };
            let mut served = 0.0;
            for (_, name, secs) in self.seconds.iter().filter(|(s, _, _)| *s == system) {
                let per = secs * 1e6 / n as f64;
                if per < 0.02 {
                    continue; // an idle cell or transmitter (heartbeats)
                }
                note.push_str(&format!("| {name} | {per:.2} |\n"));
                if !name.starts_with("load generator") {
                    served += per;
                }
            }
            if system == System::Thynapse {
                note.push_str(&format!("| all mesh processes | {served:.2} |\n"));
            }
        }
        note
    }
}

/// The tally for `scenario`, added on first use.
fn tally<'a>(cpu: &'a mut Vec<(String, CpuTally)>, scenario: &str) -> &'a mut CpuTally {
    let i = match cpu.iter().position(|(s, _)| s == scenario) {
        Some(i) => i,
        None => {
            cpu.push((scenario.to_string(), CpuTally::default()));
            cpu.len() - 1
        }
    };
    &mut cpu[i].1
}

fn percentile_sample(h: &Histogram<u64>, q: f64, lost: u64) -> Sample {
    Sample {
        value: h.value_at_quantile(q) as f64,
        lost,
        duplicates: 0,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "msg/s" => format!("{:.0}k", v / 1000.0),
        "µs" => format!("{v:.0}"),
        "MiB" => format!("{:.1}", v / (1024.0 * 1024.0)),
        _ => format!("{v:.1}"),
    }
}

fn report(
    results: &Results,
    machine: &str,
    wakeups: Option<&wakeups::WakeupCosts>,
    args: &Args,
    repeats: usize,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Machine: {machine}\n{}\nMode: {}, {repeats} repetition(s), load generator on {} thread(s); median [min–max].{}\n\n",
        wakeups.map_or_else(
            || "Wake-up round trip: not measured.".to_string(),
            wakeups::WakeupCosts::describe
        ),
        if args.quick { "quick" } else { "full" },
        args.load_threads,
        match args.pin_servers {
            Some(cpu) => format!(
                "\nServers (redis-server, nats-server, every mesh process) confined to CPU {cpu}; the load generator is not."
            ),
            None => String::new(),
        }
    ));
    out.push_str("| scenario | unit | Redis | NATS | Thynapse | Thynapse / Redis | Thynapse / NATS | lost (R/N/T) |\n|---|---|---|---|---|---|---|---|\n");
    for (name, row) in &results.rows {
        let cell = |sys: &str| -> (String, Option<f64>, String) {
            match row.samples.get(sys) {
                Some(samples) if !samples.is_empty() => {
                    let values: Vec<f64> = samples.iter().map(|s| s.value).collect();
                    let m = median(&values);
                    let lo = values.iter().cloned().fold(f64::MAX, f64::min);
                    let hi = values.iter().cloned().fold(f64::MIN, f64::max);
                    let lost: u64 = samples.iter().map(|s| s.lost + s.duplicates).sum();
                    let spread = if samples.len() > 1 {
                        format!(" [{}–{}]", fmt_value(lo, row.unit), fmt_value(hi, row.unit))
                    } else {
                        String::new()
                    };
                    (
                        format!("{}{spread}", fmt_value(m, row.unit)),
                        Some(m),
                        lost.to_string(),
                    )
                }
                _ => ("n/a".into(), None, "-".into()),
            }
        };
        let (r, rv, rl) = cell("Redis");
        let (n, nv, nl) = cell("Nats");
        let (t, tv, tl) = cell("Thynapse");
        let ratio = |other: Option<f64>| match (tv, other) {
            (Some(t), Some(o)) if o > 0.0 => format!("{:.2}×", t / o),
            _ => "n/a".into(),
        };
        out.push_str(&format!(
            "| {name} | {} | {r} | {n} | {t} | {} | {} | {rl}/{nl}/{tl} |\n",
            row.unit,
            ratio(rv),
            ratio(nv)
        ));
    }
    for note in &results.notes {
        out.push_str(&format!("\n{note}"));
    }
    out.push('\n');
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {}", kernel.trim())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.load_threads.into())
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 5 });
    let sizes = if args.quick {
        Sizes {
            count: 20_000,
            fanout_count: 5_000,
            latency_secs: 0.5,
            latency_rates: vec![1_000, 10_000],
            room_messages: 500,
        }
    } else {
        Sizes {
            count: 200_000,
            fanout_count: 50_000,
            latency_secs: 3.0,
            latency_rates: vec![1_000, 10_000, 100_000],
            // Enough that the fastest scaling run (8 transmitters on 16 cores) still measures
            // a second or so of traffic, not the start of it.
            room_messages: 20_000,
        }
    };
    if let Some(cpu) = args.pin_servers {
        let allowed = affinity::own_cpus();
        if !allowed.contains(&cpu) {
            anyhow::bail!("--pin-servers {cpu}: not a CPU this process may use ({allowed:?})");
        }
    }
    // Context for the results, not a result: a machine that refuses thread affinity
    // (some sandboxes) still gets its benchmark.
    let wakeups = match tokio::task::spawn_blocking(wakeups::WakeupCosts::measure).await? {
        Ok(costs) => Some(costs),
        Err(e) => {
            eprintln!("wake-up costs not measured: {e}");
            None
        }
    };
    let at = servers::Placement(args.pin_servers);
    let (_redis_proc, redis) = servers::redis(at)?;
    let (_nats_proc, nats) = servers::nats(at)?;
    let mesh = servers::mesh(&args.dir, args.transmitters, at)?;
    let setup = Setup {
        redis,
        nats,
        mesh,
        redis_pid: _redis_proc.pid(),
        nats_pid: _nats_proc.pid(),
    };
    // The CPUs each server may run on, as the kernel reports them (what --pin-servers did).
    let server_cpus: BTreeMap<String, String> = SYSTEMS
        .iter()
        .flat_map(|&system| server_processes(&setup, system))
        .filter_map(|(name, pid)| Some((name, servers::allowed_cpus(pid)?)))
        .collect();
    let mut results = Results {
        filter: args.filter.clone(),
        ..Results::default()
    };

    // Memory first, while idle.
    if !args.rooms_only && results.wants("memory") {
        let mut idle: Vec<f64> = setup
            .mesh
            .cells("bench")
            .iter()
            .filter_map(|c| servers::rss(c.2))
            .map(|b| b as f64)
            .collect();
        idle.sort_by(|a, b| a.total_cmp(b));
        if !idle.is_empty() {
            results.add(
                "memory: idle cell sidecar (RSS)",
                "MiB",
                false,
                System::Thynapse,
                Sample {
                    value: median(&idle),
                    lost: 0,
                    duplicates: 0,
                },
            );
        }
        let (_, command, _, pid) = setup.mesh.transmitters()[0].clone();
        let cells = if args.quick { 100 } else { 1000 };
        let rss = transmitter_rss_with_cells(&command, pid, cells).await?;
        results.add(
            &format!("memory: transmitter with {cells} cells (RSS)"),
            "MiB",
            false,
            System::Thynapse,
            Sample {
                value: rss as f64,
                lost: 0,
                duplicates: 0,
            },
        );
    }

    // Where the CPU goes, per throughput scenario, in the order measured.
    let mut cpu: Vec<(String, CpuTally)> = Vec::new();
    for rep in 0..repeats {
        eprintln!("repetition {}/{repeats}", rep + 1);
        if !args.rooms_only {
            for (size, label) in [(64, "64 B"), (1024, "1 KiB")] {
                for same in [false, true] {
                    let scenario = format!(
                        "throughput 1→1, {label}, {} transmitter",
                        if same { "same" } else { "different" }
                    );
                    if !results.wants(&scenario) {
                        continue;
                    }
                    for system in SYSTEMS {
                        let (p, subs) = endpoints(&setup, system, 1, same, "bench");
                        let before = cpu_by_process(&setup, system);
                        let s = throughput(
                            system,
                            &p,
                            &subs,
                            &format!("t{rep}{size}{same}"),
                            size,
                            sizes.count,
                            false,
                        )
                        .await?;
                        if !same {
                            let after = cpu_by_process(&setup, system);
                            tally(&mut cpu, &scenario).add(system, &before, &after, sizes.count);
                        }
                        results.add(&scenario, "msg/s", true, system, s);
                    }
                }
            }
            let fanout = results.wants("fan-out");
            for system in SYSTEMS.into_iter().filter(|_| fanout) {
                let (p, subs) = endpoints(&setup, system, 10, false, "bench");
                let s = throughput(
                    system,
                    &p,
                    &subs,
                    &format!("fan{rep}"),
                    64,
                    sizes.fanout_count,
                    false,
                )
                .await?;
                results.add("fan-out 1→10, 64 B (deliveries)", "msg/s", true, system, s);
            }
            let anycatch = results.wants("anycatch");
            for system in [System::Nats, System::Thynapse]
                .into_iter()
                .filter(|_| anycatch)
            {
                let (p, subs) = endpoints(&setup, system, 4, false, "workers");
                let before = cpu_by_process(&setup, system);
                let s = throughput(
                    system,
                    &p,
                    &subs,
                    &format!("any.{rep}"),
                    64,
                    sizes.count,
                    true,
                )
                .await?;
                let scenario = "anycatch to 4 cells (NATS: queue group of 4), 64 B";
                let after = cpu_by_process(&setup, system);
                tally(&mut cpu, scenario).add(system, &before, &after, sizes.count);
                results.add(scenario, "msg/s", true, system, s);
            }
            for &rate in &sizes.latency_rates {
                if !results.wants(&format!("latency at {}K msg/s", rate / 1000)) {
                    continue;
                }
                for system in SYSTEMS {
                    let (p, subs) = endpoints(&setup, system, 1, false, "bench");
                    let (h, lost) =
                        latency(system, &p, &subs[0], 64, rate, sizes.latency_secs).await?;
                    for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
                        results.add(
                            &format!("latency at {}K msg/s, {name}", rate / 1000),
                            "µs",
                            false,
                            system,
                            percentile_sample(&h, q, lost),
                        );
                    }
                }
            }
        }
        if !results.wants("rooms") {
            continue;
        }
        // Busy counts recent message rates: let the earlier scenarios' rates fade from the
        // announcements, so that placement sees the rooms alone.
        settle(&setup).await;
        // Publishes built on half as many threads as the load threads, which read the
        // 64 subscriptions: on 2, the one thread every other scenario publishes from.
        let publishing = usize::from(args.load_threads / 2).max(1);
        let run = rooms(&setup, 64, sizes.room_messages, publishing).await?;
        let scenario = format!(
            "rooms: 64 rooms on {} transmitters, aggregate",
            args.transmitters
        );
        tally(&mut cpu, &scenario).add(
            System::Thynapse,
            &run.cpu_before,
            &run.cpu_after,
            64 * sizes.room_messages,
        );
        results.add(
            &scenario,
            "msg/s",
            true,
            System::Thynapse,
            run.sample.clone(),
        );
        if let Some(capacity) = run.transmitter_capacity() {
            results.add(
                "rooms: what the transmitters could carry (aggregate ÷ busiest transmitter's CPU share)",
                "msg/s",
                true,
                System::Thynapse,
                Sample {
                    value: capacity,
                    lost: 0,
                    duplicates: 0,
                },
            );
        }
        if rep == 0 {
            let mut note = String::from("Room messages carried per transmitter (first repetition; each room has one host here), and the share of a CPU each used while they flowed:\n\n| transmitter | rooms hosted | room messages carried | CPU busy |\n|---|---|---|---|\n");
            for t in &run.transmitters {
                note.push_str(&format!(
                    "| {} | {} | {:.0} | {:.0}% |\n",
                    t.name,
                    t.hosted,
                    t.carried,
                    t.busy * 100.0
                ));
            }
            results.notes.push(note);
        }
    }

    for (i, (scenario, tally)) in cpu.iter().enumerate() {
        results.notes.insert(i, tally.note(scenario));
    }
    let text = report(&results, &machine(), wakeups.as_ref(), &args, repeats);
    println!("{text}");
    let json = serde_json::json!({
        "machine": machine(),
        "wakeup_us": wakeups,
        "mode": if args.quick { "quick" } else { "full" },
        "repeats": repeats,
        "transmitters": args.transmitters,
        "load_threads": args.load_threads,
        "servers_pinned_to_cpu": args.pin_servers,
        "server_cpus": server_cpus,
        "rows": results.rows.iter().map(|(n, r)| serde_json::json!({"scenario": n, "row": r})).collect::<Vec<_>>(),
        "notes": results.notes,
        "markdown": text,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&json)?)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}
