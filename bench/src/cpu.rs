//! Where the CPU goes: CPU time of every server process and of the load generator, summed
//! over a scenario's repetitions and given per message.

use std::collections::BTreeMap;

use crate::results::{System, SYSTEMS};
use crate::scenarios::Setup;
use crate::servers;

/// The processes serving `system` (every process of the mesh), by name.
pub fn server_processes(setup: &Setup, system: System) -> Vec<(String, u32)> {
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

/// CPU time used so far by each process serving a system, and by this load generator,
/// thread by thread: the time between two snapshots counts every thread that lived through
/// both or began in between (one that ended in between loses its share; the servers'
/// threads live as long as they do).
pub struct CpuSnapshot(Vec<(String, BTreeMap<u32, f64>)>);

impl CpuSnapshot {
    pub fn take(setup: &Setup, system: System) -> CpuSnapshot {
        let mut out: Vec<(String, BTreeMap<u32, f64>)> = server_processes(setup, system)
            .into_iter()
            .map(|(name, pid)| (name, servers::thread_cpu_seconds(pid)))
            .collect();
        out.push((
            format!("load generator ({system:?} runs)"),
            servers::thread_cpu_seconds(std::process::id()),
        ));
        CpuSnapshot(out)
    }

    /// CPU seconds each process used since `before` (processes not in it are left out).
    pub fn since(&self, before: &CpuSnapshot) -> Vec<(String, f64)> {
        self.0
            .iter()
            .filter_map(|(name, threads)| {
                let was = &before.0.iter().find(|(n, _)| n == name)?.1;
                let used = threads
                    .iter()
                    .map(|(tid, s)| s - was.get(tid).copied().unwrap_or(0.0))
                    .sum();
                Some((name.clone(), used))
            })
            .collect()
    }
}

/// CPU time by process over every repetition of one scenario.
#[derive(Default)]
pub struct CpuTally {
    seconds: Vec<(System, String, f64)>,
    messages: BTreeMap<System, u64>,
}

impl CpuTally {
    /// Adds the CPU seconds each process used (`CpuSnapshot::since`) for `n` messages.
    pub fn add(&mut self, system: System, used: &[(String, f64)], n: u64) {
        for (name, secs) in used {
            match self.seconds.iter_mut().find(|(_, x, _)| x == name) {
                Some(entry) => entry.2 += secs,
                None => self.seconds.push((system, name.clone(), *secs)),
            }
        }
        *self.messages.entry(system).or_default() += n;
    }

    /// Where the time goes: CPU microseconds per message, per process and system.
    pub fn note(&self, scenario: &str) -> String {
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
pub fn tally<'a>(cpu: &'a mut Vec<(String, CpuTally)>, scenario: &str) -> &'a mut CpuTally {
    let i = match cpu.iter().position(|(s, _)| s == scenario) {
        Some(i) => i,
        None => {
            cpu.push((scenario.to_string(), CpuTally::default()));
            cpu.len() - 1
        }
    };
    &mut cpu[i].1
}
