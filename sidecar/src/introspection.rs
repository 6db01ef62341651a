//! What clients and tools ask a Redis server about itself on their own (ioredis' ready
//! check reads INFO, tools run CLIENT LIST and CONFIG GET): answered as Redis 7 answers for
//! an empty standalone server, with the figures that are true of this sidecar. Pure text
//! building; the connection gathers the facts.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use thynapse_protocol::glob;

/// The version the sidecar reports (HELLO, INFO): the Redis whose replies it matches.
pub const REDIS_VERSION: &str = "7.0.0";

/// What is true of the sidecar when INFO is asked.
pub struct ServerFacts {
    /// The cell's id (40 hex): Redis' `run_id`, unique per process start.
    pub run_id: String,
    pub port: u16,
    pub uptime: Duration,
    pub connected_clients: usize,
    pub total_connections: u64,
    pub total_commands: u64,
    pub pubsub_channels: usize,
    pub pubsub_patterns: usize,
    pub pubsub_shard_channels: usize,
    pub mesh: String,
    pub service: String,
    pub cell: String,
    /// The transmitter the cell's mesh session is linked to, if any.
    pub transmitter: Option<String>,
    pub started_unix: u64,
}

/// INFO's sections in Redis 7.0's order.
const SECTIONS: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cpu",
    "modules",
    "commandstats",
    "errorstats",
    "latencystats",
    "cluster",
    "keyspace",
];

/// Sections INFO leaves out unless asked by name, `all` or `everything`.
const NOT_DEFAULT: &[&str] = &["commandstats", "latencystats"];

/// The sections INFO's arguments select: none is `default`; `all` and `everything` add
/// the statistics sections; an unknown name selects nothing (Redis answers it empty).
pub fn info_sections(args: &[Bytes]) -> Vec<&'static str> {
    let wanted: Vec<String> = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let every = wanted.iter().any(|w| w == "all" || w == "everything");
    let default = wanted.is_empty() || wanted.iter().any(|w| w == "default");
    SECTIONS
        .iter()
        .filter(|s| {
            every || (default && !NOT_DEFAULT.contains(s)) || wanted.iter().any(|w| w == *s)
        })
        .copied()
        .collect()
}

/// INFO's text for `sections`, formatted as Redis formats it (`# Title` then `key:value`
/// lines, sections apart by a blank line, `\r\n` throughout).
pub fn info(facts: &ServerFacts, sections: &[&str]) -> String {
    let mut out = String::new();
    for (i, section) in sections.iter().enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        let lines = section_lines(facts, section);
        let title = match *section {
            "cpu" => "CPU".to_string(),
            "errorstats" => "Errorstats".to_string(),
            "commandstats" => "Commandstats".to_string(),
            "latencystats" => "Latencystats".to_string(),
            s => format!("{}{}", s[..1].to_ascii_uppercase(), &s[1..]),
        };
        let _ = write!(out, "# {title}\r\n");
        for (k, v) in lines {
            let _ = write!(out, "{k}:{v}\r\n");
        }
    }
    out
}

fn section_lines(f: &ServerFacts, section: &str) -> Vec<(&'static str, String)> {
    let mem = Memory::read();
    match section {
        "server" => vec![
            ("redis_version", REDIS_VERSION.into()),
            ("redis_git_sha1", "00000000".into()),
            ("redis_git_dirty", "0".into()),
            ("redis_build_id", "0".into()),
            ("redis_mode", "standalone".into()),
            ("os", os()),
            ("arch_bits", (usize::BITS).to_string()),
            ("multiplexing_api", "epoll".into()),
            ("process_id", std::process::id().to_string()),
            ("process_supervised", "no".into()),
            ("run_id", f.run_id.clone()),
            ("tcp_port", f.port.to_string()),
            ("server_time_usec", unix_micros().to_string()),
            ("uptime_in_seconds", f.uptime.as_secs().to_string()),
            ("uptime_in_days", (f.uptime.as_secs() / 86_400).to_string()),
            ("executable", executable()),
            ("config_file", String::new()),
            // What this server really is (extra keys; parsers take any key:value line).
            ("thynapse_version", env!("CARGO_PKG_VERSION").into()),
            ("thynapse_mesh", f.mesh.clone()),
            ("thynapse_service", f.service.clone()),
            ("thynapse_cell", f.cell.clone()),
            (
                "thynapse_transmitter",
                f.transmitter.clone().unwrap_or_default(),
            ),
        ],
        "clients" => vec![
            ("connected_clients", f.connected_clients.to_string()),
            ("cluster_connections", "0".into()),
            ("maxclients", "10000".into()),
            ("blocked_clients", "0".into()),
            ("tracking_clients", "0".into()),
            ("clients_in_timeout_table", "0".into()),
        ],
        "memory" => vec![
            // No allocator statistics here: the resident set is what the sidecar uses.
            ("used_memory", mem.rss.to_string()),
            ("used_memory_human", human(mem.rss)),
            ("used_memory_rss", mem.rss.to_string()),
            ("used_memory_rss_human", human(mem.rss)),
            ("used_memory_peak", mem.peak.to_string()),
            ("used_memory_peak_human", human(mem.peak)),
            ("maxmemory", "0".into()),
            ("maxmemory_human", "0B".into()),
            ("maxmemory_policy", "noeviction".into()),
            ("mem_allocator", "libc".into()),
        ],
        "persistence" => vec![
            ("loading", "0".into()),
            ("async_loading", "0".into()),
            ("rdb_changes_since_last_save", "0".into()),
            ("rdb_bgsave_in_progress", "0".into()),
            ("rdb_last_save_time", f.started_unix.to_string()),
            ("rdb_last_bgsave_status", "ok".into()),
            ("aof_enabled", "0".into()),
            ("aof_rewrite_in_progress", "0".into()),
            ("aof_last_bgrewrite_status", "ok".into()),
            ("aof_last_write_status", "ok".into()),
        ],
        "stats" => vec![
            (
                "total_connections_received",
                f.total_connections.to_string(),
            ),
            ("total_commands_processed", f.total_commands.to_string()),
            ("rejected_connections", "0".into()),
            ("expired_keys", "0".into()),
            ("evicted_keys", "0".into()),
            ("keyspace_hits", "0".into()),
            ("keyspace_misses", "0".into()),
            ("pubsub_channels", f.pubsub_channels.to_string()),
            ("pubsub_patterns", f.pubsub_patterns.to_string()),
            ("pubsubshard_channels", f.pubsub_shard_channels.to_string()),
        ],
        "replication" => vec![
            ("role", "master".into()),
            ("connected_slaves", "0".into()),
            ("master_failover_state", "no-failover".into()),
            ("master_replid", f.run_id.clone()),
            ("master_replid2", "0".repeat(40)),
            ("master_repl_offset", "0".into()),
            ("second_repl_offset", "-1".into()),
            ("repl_backlog_active", "0".into()),
            ("repl_backlog_size", "0".into()),
            ("repl_backlog_first_byte_offset", "0".into()),
            ("repl_backlog_histlen", "0".into()),
        ],
        "cpu" => {
            let (sys, user) = cpu_seconds();
            vec![
                ("used_cpu_sys", format!("{sys:.6}")),
                ("used_cpu_user", format!("{user:.6}")),
            ]
        }
        "cluster" => vec![("cluster_enabled", "0".into())],
        // Modules, errors, keys, command and latency statistics: none to report.
        _ => Vec::new(),
    }
}

/// The settings CONFIG GET answers, as an empty standalone Redis 7.0 reports them where
/// they mean the same here.
fn config(bind: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("appendonly", "no".into()),
        ("bind", bind.ip().to_string()),
        ("client-output-buffer-limit", String::new()),
        ("cluster-enabled", "no".into()),
        ("databases", "16".into()),
        ("maxclients", "10000".into()),
        ("maxmemory", "0".into()),
        ("maxmemory-policy", "noeviction".into()),
        ("notify-keyspace-events", String::new()),
        ("port", bind.port().to_string()),
        ("protected-mode", "yes".into()),
        ("replica-read-only", "yes".into()),
        ("save", String::new()),
        ("slave-read-only", "yes".into()),
        ("timeout", "0".into()),
    ]
}

/// CONFIG GET: the settings matching any of the patterns (Redis globs), each once, as
/// (name, value) in the order the table holds them.
pub fn config_get(
    bind: SocketAddr,
    patterns: &[Bytes],
    output_buffer: usize,
) -> Vec<(String, String)> {
    let mut table = config(bind);
    for (k, v) in table.iter_mut() {
        if *k == "client-output-buffer-limit" {
            // The sidecar's one buffer limit applies to pub/sub clients, hard, no soft limit.
            *v = format!("normal 0 0 0 slave 0 0 0 pubsub {output_buffer} 0 0");
        }
    }
    table
        .into_iter()
        .filter(|(k, _)| {
            patterns
                .iter()
                .any(|p| glob::matches(&p.to_ascii_lowercase(), k.as_bytes()))
        })
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// What CLIENT INFO and CLIENT LIST say of one client.
#[derive(Clone, Debug)]
pub struct ClientSummary {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    pub created: Instant,
    pub last_active: Instant,
    pub name: Option<Bytes>,
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
    pub resp: u8,
    pub sub: usize,
    pub psub: usize,
    pub ssub: usize,
    pub last_command: String,
}

impl ClientSummary {
    /// One line in Redis 7.2's CLIENT LIST format (7.0's fields, then lib-name/lib-ver,
    /// as SETINFO is accepted); the figures about buffers are not tracked and read 0.
    pub fn line(&self, now: Instant) -> String {
        let text = |b: &Option<Bytes>| {
            b.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let flags = if self.sub + self.psub + self.ssub > 0 {
            "P"
        } else {
            "N"
        };
        format!(
            "id={} addr={} laddr={} fd=-1 name={} age={} idle={} flags={flags} db=0 sub={} psub={} ssub={} multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            text(&self.name),
            now.duration_since(self.created).as_secs(),
            now.duration_since(self.last_active).as_secs(),
            self.sub,
            self.psub,
            self.ssub,
            if self.last_command.is_empty() { "NULL" } else { &self.last_command },
            self.resp,
            text(&self.lib_name),
            text(&self.lib_ver),
        )
    }
}

/// Seconds and microseconds since the epoch, as TIME answers.
pub fn time() -> (u64, u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs(), u64::from(now.subsec_micros()))
}

fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

fn os() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("Linux {} {}", release.trim(), std::env::consts::ARCH)
}

fn executable() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

struct Memory {
    rss: u64,
    peak: u64,
}

impl Memory {
    /// The resident set now and at its peak, from /proc/self/status (0 where unreadable).
    fn read() -> Memory {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |k| k * 1024)
        };
        Memory {
            rss: kib("VmRSS:"),
            peak: kib("VmHWM:"),
        }
    }
}

/// CPU seconds used by the process, (system, user).
fn cpu_seconds() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::sys::time::TimeValLike;
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return (0.0, 0.0);
    };
    let secs = |t: nix::sys::time::TimeVal| t.num_microseconds() as f64 / 1e6;
    (secs(usage.system_time()), secs(usage.user_time()))
}

/// Bytes as Redis' `*_human` fields write them (`1.50M`).
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes}B"),
        1024..1_048_576 => format!("{:.2}K", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.2}M", b / 1_048_576.0),
        _ => format!("{:.2}G", b / 1_073_741_824.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ServerFacts {
        ServerFacts {
            run_id: "ab".repeat(20),
            port: 6379,
            uptime: Duration::from_secs(90_000),
            connected_clients: 2,
            total_connections: 5,
            total_commands: 40,
            pubsub_channels: 3,
            pubsub_patterns: 1,
            pubsub_shard_channels: 0,
            mesh: "demo".into(),
            service: "orders".into(),
            cell: "orders-0".into(),
            transmitter: Some("demo-1".into()),
            started_unix: 1,
        }
    }

    fn fields(text: &str) -> Vec<(String, String)> {
        text.split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once(':').expect("key:value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn default_info_has_what_clients_read() {
        let text = info(&facts(), &info_sections(&[]));
        assert!(text.starts_with("# Server\r\nredis_version:7.0.0\r\n"));
        assert!(text.ends_with("\r\n# Keyspace\r\n"), "{text}");
        assert!(!text.contains("# Commandstats"));
        let f = fields(&text);
        let get = |k: &str| {
            f.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        assert_eq!(get("redis_mode"), "standalone");
        assert_eq!(get("run_id").len(), 40);
        assert_eq!(get("tcp_port"), "6379");
        assert_eq!(get("uptime_in_seconds"), "90000");
        assert_eq!(get("uptime_in_days"), "1");
        assert_eq!(get("connected_clients"), "2");
        assert_eq!(get("loading"), "0");
        assert_eq!(get("pubsub_channels"), "3");
        assert_eq!(get("pubsub_patterns"), "1");
        assert_eq!(get("role"), "master");
        assert_eq!(get("thynapse_transmitter"), "demo-1");
        assert!(get("used_memory").parse::<u64>().unwrap() > 0);
        // One line per key: nothing else in the text.
        let keys: std::collections::HashSet<_> = f.iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), f.len());
    }

    #[test]
    fn sections_are_chosen_as_redis_chooses_them() {
        let args = |a: &[&str]| -> Vec<Bytes> {
            a.iter()
                .map(|s| Bytes::copy_from_slice(s.as_bytes()))
                .collect()
        };
        assert_eq!(info_sections(&args(&["Server"])), ["server"]);
        assert_eq!(
            info_sections(&args(&["keyspace", "server"])),
            ["server", "keyspace"]
        );
        assert!(info_sections(&args(&["nosuch"])).is_empty());
        assert_eq!(info(&facts(), &[]), "");
        assert_eq!(info_sections(&args(&["all"])).len(), SECTIONS.len());
        assert_eq!(info_sections(&args(&["default"])), info_sections(&[]));
        assert!(!info_sections(&[]).contains(&"commandstats"));
        let two = info(&facts(), &info_sections(&args(&["cluster", "keyspace"])));
        assert_eq!(two, "# Cluster\r\ncluster_enabled:0\r\n\r\n# Keyspace\r\n");
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn config_get_matches_globs_once_each() {
        let p = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        assert_eq!(
            config_get(addr(7000), &[p("port")], 1),
            [("port".to_string(), "7000".to_string())]
        );
        let max = config_get(addr(1), &[p("maxmemory*"), p("MAXMEMORY")], 1);
        assert_eq!(
            max.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["maxmemory", "maxmemory-policy"]
        );
        assert!(config_get(addr(1), &[p("nosuch")], 1).is_empty());
        let limit = config_get(addr(1), &[p("client-output-buffer-limit")], 33554432);
        assert_eq!(limit[0].1, "normal 0 0 0 slave 0 0 0 pubsub 33554432 0 0");
    }

    #[test]
    fn client_lines_carry_the_fields_tools_parse() {
        let now = Instant::now();
        let c = ClientSummary {
            id: 7,
            addr: "127.0.0.1:5000".parse().unwrap(),
            laddr: "127.0.0.1:6379".parse().unwrap(),
            created: now,
            last_active: now,
            name: Some(Bytes::from_static(b"worker")),
            lib_name: None,
            lib_ver: None,
            resp: 3,
            sub: 2,
            psub: 0,
            ssub: 1,
            last_command: "subscribe".into(),
        };
        let line = c.line(now);
        assert!(line.starts_with("id=7 addr=127.0.0.1:5000 laddr=127.0.0.1:6379 "));
        for field in [
            "name=worker",
            "flags=P",
            "sub=2",
            "ssub=1",
            "cmd=subscribe",
            "resp=3",
            "lib-name= ",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
        assert!(!line.contains('\n'));
    }

    #[test]
    fn human_sizes_read_like_redis() {
        assert_eq!(human(512), "512B");
        assert_eq!(human(1536), "1.50K");
        assert_eq!(human(8 << 20), "8.00M");
    }
}
