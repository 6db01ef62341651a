//! The three systems under test, started on loopback and free ports: Debian's
//! redis-server and nats-server, and a `thynapse up` mesh.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc(Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the servers run: `Some(cpu)` confines every system's server processes (and the
/// processes they start) to that one CPU; the load generator is never confined.
#[derive(Clone, Copy, Debug)]
pub struct Placement(pub Option<usize>);

impl Placement {
    fn apply(self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt as _;
        let Some(cpu) = self.0 else { return };
        // SAFETY: between fork and exec the child only makes one system call (it
        // allocates nothing), and the child's one thread is the whole process.
        unsafe {
            cmd.pre_exec(move || crate::affinity::pin_current_thread(cpu));
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_tcp(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn redis(at: Placement) -> anyhow::Result<(Proc, SocketAddr)> {
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    at.apply(&mut cmd);
    let child = cmd
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let p = Proc(child);
    wait_tcp(addr, "redis-server")?;
    Ok((p, addr))
}

pub fn nats(at: Placement) -> anyhow::Result<(Proc, String)> {
    let port = free_port();
    let mut cmd = Command::new("nats-server");
    at.apply(&mut cmd);
    let child = cmd
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server (apt-get install nats-server)")?;
    let p = Proc(child);
    wait_tcp(([127, 0, 0, 1], port).into(), "nats-server")?;
    Ok((p, format!("nats://127.0.0.1:{port}")))
}

/// A running `thynapse up` and its endpoints JSON.
pub struct Mesh {
    _proc: Proc,
    pub endpoints: Value,
}

impl Mesh {
    /// The mesh tokens `up` generated (its endpoints' `token_file`), when it has any.
    pub fn tokens(&self) -> Option<Vec<Vec<u8>>> {
        let path = self.endpoints["token_file"].as_str()?;
        let text = std::fs::read_to_string(path).ok()?;
        Some(thynapse_protocol::auth::tokens_from(&text))
    }

    /// Cells of a Service with the transmitter each joined.
    pub fn cells(&self, service: &str) -> Vec<(SocketAddr, String, u32)> {
        self.endpoints["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["service"] == service)
            .map(|c| {
                (
                    c["resp"]
                        .as_str()
                        .unwrap_or_default()
                        .parse()
                        .expect("resp address"),
                    c["transmitter"].as_str().unwrap_or_default().to_string(),
                    c["pid"].as_u64().unwrap_or(0) as u32,
                )
            })
            .collect()
    }

    pub fn transmitters(&self) -> Vec<(String, String, String, u32)> {
        self.endpoints["transmitters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
                (
                    s("name"),
                    s("command"),
                    s("metrics"),
                    t["pid"].as_u64().unwrap_or(0) as u32,
                )
            })
            .collect()
    }
}

pub fn thynapse_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.with_file_name("thynapse")
}

/// `thynapse up` with `transmitters`, 12 multicatch cells (`bench`), 4 anycatch cells
/// (`workers`, anycatch on `any.*`), and on-demand rooms of one host each.
pub fn mesh(dir: &Path, transmitters: u32, at: Placement) -> anyhow::Result<Mesh> {
    start_mesh(dir, transmitters, at, "", &["bench=12", "workers=4"])
}

/// A second, small mesh with `spec.security.encryption` on: 2 transmitters, 4 `bench`
/// cells (so some are on each), for the encrypted rows.
pub fn encrypted_mesh(dir: &Path, at: Placement) -> anyhow::Result<Mesh> {
    let security = "  security: {encryption: true}\n";
    start_mesh(dir, 2, at, security, &["bench=4"])
}

fn start_mesh(
    dir: &Path,
    transmitters: u32,
    at: Placement,
    extra_spec: &str,
    cells: &[&str],
) -> anyhow::Result<Mesh> {
    std::fs::create_dir_all(dir)?;
    let manifest = format!(
        "apiVersion: thynapse.io/v1alpha1\nkind: TransmitterMesh\nmetadata: {{name: bench}}\nspec:\n  replicas: {transmitters}\n  rooms: {{defaultReplicas: 1}}\n{extra_spec}---\napiVersion: thynapse.io/v1alpha1\nkind: Service\nmetadata: {{name: bench}}\nspec: {{mesh: bench}}\n---\napiVersion: thynapse.io/v1alpha1\nkind: Service\nmetadata: {{name: workers}}\nspec: {{mesh: bench, delivery: [{{pattern: 'any.*', mode: anycatch}}]}}\n"
    );
    std::fs::write(dir.join("mesh.yaml"), manifest)?;
    let endpoints = dir.join("endpoints.json");
    let _ = std::fs::remove_file(&endpoints);
    let log = std::fs::File::create(dir.join("up.log"))?;
    let mut cmd = Command::new(thynapse_binary());
    at.apply(&mut cmd);
    let child = cmd
        .args(["up", "-f"])
        .arg(dir)
        .args(cells.iter().flat_map(|c| ["--cells", c]))
        .arg("--endpoints")
        .arg(&endpoints)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting thynapse up (cargo build --release first)")?;
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&endpoints) {
            if let Ok(endpoints) = serde_json::from_str(&text) {
                return Ok(Mesh {
                    _proc: proc,
                    endpoints,
                });
            }
        }
        if Instant::now() > deadline {
            bail!(
                "thynapse up did not get ready; see {}",
                dir.join("up.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The CPUs a process may run on (`Cpus_allowed_list`, e.g. "0-1").
pub fn allowed_cpus(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))?;
    Some(line.split_whitespace().nth(1)?.to_string())
}

/// CPU time each thread of a process used so far, in seconds, by thread id: the
/// scheduler's nanosecond count (`/proc/<pid>/task/<tid>/schedstat`) rather than the 10 ms
/// ticks of `/proc/<pid>/stat`, so that a short run's share of a CPU is exact. On a kernel
/// without schedstat, the process's ticks under its own id.
pub fn thread_cpu_seconds(pid: u32) -> BTreeMap<u32, f64> {
    let threads: BTreeMap<u32, f64> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|task| {
            let task = task.ok()?;
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns: f64 = stat.split_whitespace().next()?.parse().ok()?;
            Some((tid, ns / 1e9))
        })
        .collect();
    if !threads.is_empty() {
        return threads;
    }
    cpu_seconds(pid).map(|s| (pid, s)).into_iter().collect()
}

/// CPU time a process used so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// One Prometheus counter family summed by label value, from a /metrics page.
pub fn counter_by_label(url: &str, family: &str) -> Vec<(String, f64)> {
    let Ok(text) = http_get(url) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.starts_with(family) && l.contains('{'))
        .filter_map(|l| {
            let label = l.split('"').nth(1)?.to_string();
            let value: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((label, value))
        })
        .collect()
}

fn http_get(url: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = TcpStream::connect(host)?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
