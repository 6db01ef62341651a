//! `thynapse-bench`: Thynapse side by side with Redis pub/sub and NATS, on this machine,
//! in one run: the same scenarios, the same load generator, interleaved and repeated.
//! Prints a Markdown table (median and spread, ratios to Redis and NATS, loss) and writes
//! the same as JSON. `--quick` proves it works in well under a minute; the default is the
//! full run recorded in bench/README.md.

mod affinity;
mod cpu;
mod load;
mod results;
mod scenarios;
mod servers;
mod wakeups;

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use cpu::{server_processes, tally, CpuSnapshot, CpuTally};
use results::{median, percentile_sample, Results, Sample, System, SYSTEMS};
use scenarios::{
    endpoints, endpoints_on, latency, rooms, settle, subscribe_round_trips, throughput,
    transmitter_rss_with_cells, Setup,
};

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

struct Sizes {
    count: u64,
    fanout_count: u64,
    latency_secs: f64,
    latency_rates: Vec<u64>,
    room_messages: u64,
    subscribes: u64,
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
    out.push_str(&results.table());
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
            subscribes: 200,
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
            subscribes: 2_000,
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
    // Running beside the main mesh throughout (its idle cost, two transmitters' worth,
    // is in every row), so that its rows interleave with the others like every row does.
    let wanted = Results {
        filter: args.filter.clone(),
        ..Results::default()
    };
    let encrypted_rows = [(64, "64 B"), (1024, "1 KiB")].map(|(size, label)| {
        let scenario = format!("throughput 1→1, {label}, different transmitter, encrypted");
        (size, scenario)
    });
    let wants_encrypted = encrypted_rows.iter().any(|(_, s)| wanted.wants(s));
    let encrypted = if !args.rooms_only && wants_encrypted {
        Some(servers::encrypted_mesh(&args.dir.join("encrypted"), at)?)
    } else {
        None
    };
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
        let token = setup.mesh.tokens().and_then(|t| t.into_iter().next());
        let rss = transmitter_rss_with_cells(&command, pid, cells, token.as_deref()).await?;
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
                        let before = CpuSnapshot::take(&setup, system);
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
                            let used = CpuSnapshot::take(&setup, system).since(&before);
                            tally(&mut cpu, &scenario).add(system, &used, sizes.count);
                        }
                        results.add(&scenario, "msg/s", true, system, s);
                    }
                }
            }
            // What encryption in transit costs: the same rows on the encrypted mesh (Redis
            // and NATS measured again beside them, unencrypted, as every row's baseline).
            for (size, scenario) in &encrypted_rows {
                let Some(mesh) = encrypted.as_ref().filter(|_| results.wants(scenario)) else {
                    continue;
                };
                let size = *size;
                for system in SYSTEMS {
                    let (p, subs) = endpoints_on(&setup, mesh, system, 1, false, "bench");
                    let prefix = format!("e{rep}{size}");
                    let s =
                        throughput(system, &p, &subs, &prefix, size, sizes.count, false).await?;
                    results.add(scenario, "msg/s", true, system, s);
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
                let before = CpuSnapshot::take(&setup, system);
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
                let used = CpuSnapshot::take(&setup, system).since(&before);
                tally(&mut cpu, scenario).add(system, &used, sizes.count);
                results.add(scenario, "msg/s", true, system, s);
            }
            for &rate in &sizes.latency_rates {
                if !results.wants(&format!("latency at {}K msg/s", rate / 1000)) {
                    continue;
                }
                for system in SYSTEMS {
                    let (p, subs) = endpoints(&setup, system, 1, false, "bench");
                    let (h, lost, duplicates) =
                        latency(system, &p, &subs[0], 64, rate, sizes.latency_secs).await?;
                    for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
                        results.add(
                            &format!("latency at {}K msg/s, {name}", rate / 1000),
                            "µs",
                            false,
                            system,
                            percentile_sample(&h, q, lost, duplicates),
                        );
                    }
                }
            }
        }
        if !args.rooms_only && results.wants("SUBSCRIBE") {
            for system in SYSTEMS {
                // A subscriber on another transmitter than the bench publisher's cell: the
                // confirmation waits for the other transmitters of the mesh.
                let (_, subs) = endpoints(&setup, system, 1, false, "bench");
                let h = subscribe_round_trips(&subs[0], sizes.subscribes).await?;
                for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
                    results.add(
                        &format!("SUBSCRIBE until confirmed (NATS: SUB + flush), {name}"),
                        "µs",
                        false,
                        system,
                        percentile_sample(&h, q, 0, 0),
                    );
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
        tally(&mut cpu, &scenario).add(System::Thynapse, &run.cpu_used, 64 * sizes.room_messages);
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
