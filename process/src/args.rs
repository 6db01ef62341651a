//! Each component's flags. The defaults live in the clap attributes only: `new` parses
//! the required flags, so code that starts a component gets the same defaults as a user.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use clap::Parser;
use thynapse_protocol::permissions::Permissions;
use thynapse_protocol::{DeliveryRule, DEFAULT_MAX_MESSAGE_BYTES};

/// Writes flags back as the command line that parses to them.
pub trait ToArgs {
    /// The subcommand and its flags, as `thynapse` takes them.
    fn to_args(&self) -> Vec<String>;
}

/// Parses `flags` as the component `A` would (the defaults filled in).
fn parse<A: clap::Args>(flags: &[&str]) -> A {
    #[derive(Parser)]
    struct Only<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    let argv = std::iter::once("thynapse").chain(flags.iter().copied());
    Only::<A>::try_parse_from(argv)
        .expect("the required flags parse")
        .args
}

fn rendezvous_flags<'a>(points: &'a [String], out: &mut Vec<&'a str>) {
    for p in points {
        out.extend(["--rendezvous", p]);
    }
}

/// Pushes `--flag value` pairs.
struct Argv(Vec<String>);

impl Argv {
    fn new(subcommand: &str) -> Self {
        Argv(vec![subcommand.to_string()])
    }

    fn flag(&mut self, name: &str, value: impl ToString) -> &mut Self {
        self.0.push(format!("--{name}"));
        self.0.push(value.to_string());
        self
    }

    fn switch(&mut self, name: &str, on: bool) -> &mut Self {
        if on {
            self.0.push(format!("--{name}"));
        }
        self
    }

    fn each<T: ToString>(&mut self, name: &str, values: impl IntoIterator<Item = T>) -> &mut Self {
        for v in values {
            self.flag(name, v);
        }
        self
    }
}

#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct TransmitterArgs {
    /// Mesh this transmitter belongs to.
    #[arg(long)]
    pub mesh: String,
    /// Unique name within the mesh (a StatefulSet pod name in a cluster).
    #[arg(long)]
    pub name: String,
    /// ZeroMQ endpoint of the ROUTER command socket.
    #[arg(long, default_value = "tcp://127.0.0.1:0")]
    pub command_bind: String,
    /// ZeroMQ endpoint of the PUB event socket.
    #[arg(long, default_value = "tcp://127.0.0.1:0")]
    pub event_bind: String,
    /// Host that others use to reach the bound endpoints (the pod IP in a cluster).
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_bind: SocketAddr,
    /// Rendezvous points, `udp://host:port` (repeat for several).
    #[arg(long = "rendezvous", required = true)]
    pub rendezvous: Vec<String>,
    #[arg(long, default_value_t = 500)]
    pub announce_interval_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub expiry_multiplier: u32,
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Bytes in flight per cell or peer link beyond which its messages are dropped.
    #[arg(long, default_value_t = 32 << 20)]
    pub link_buffer_bytes: usize,
    /// Cells (sidecar sessions) served at most; a HELO past it is answered `MOVE`.
    #[arg(long, default_value_t = 10_000)]
    pub max_cells: usize,
    /// The mesh token (one per line; two during a rotation, the first proving this
    /// transmitter): every connection must then authenticate (docs/security.md).
    #[arg(long)]
    pub token_file: Option<String>,
    /// Encrypt every connection: links to peers are, and cells and peers that do not
    /// ask for it are refused (needs --token-file; docs/security.md, "Encryption").
    #[arg(long, requires = "token_file")]
    pub encrypt: bool,
}

impl TransmitterArgs {
    pub fn new(mesh: &str, name: &str, rendezvous: &[String]) -> Self {
        let mut flags = vec!["--mesh", mesh, "--name", name];
        rendezvous_flags(rendezvous, &mut flags);
        parse(&flags)
    }
}

impl ToArgs for TransmitterArgs {
    fn to_args(&self) -> Vec<String> {
        let mut a = Argv::new("transmitter");
        a.flag("mesh", &self.mesh)
            .flag("name", &self.name)
            .flag("command-bind", &self.command_bind)
            .flag("event-bind", &self.event_bind)
            .flag("advertise-host", &self.advertise_host)
            .flag("metrics-bind", self.metrics_bind)
            .each("rendezvous", &self.rendezvous)
            .flag("announce-interval-ms", self.announce_interval_ms)
            .flag("expiry-multiplier", self.expiry_multiplier)
            .flag("max-message-bytes", self.max_message_bytes)
            .flag("link-buffer-bytes", self.link_buffer_bytes)
            .flag("max-cells", self.max_cells)
            .each("token-file", &self.token_file)
            .switch("encrypt", self.encrypt);
        a.0
    }
}

/// A Service's delivery rules, given as JSON: `[{"pattern": "jobs.*", "mode": "anycatch"}]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryRules(pub Vec<DeliveryRule>);

impl FromStr for DeliveryRules {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_str(s)
            .map(DeliveryRules)
            .map_err(|e| format!("not a JSON list of {{pattern, mode}}: {e}"))
    }
}

impl fmt::Display for DeliveryRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(&self.0).map_err(|_| fmt::Error)?;
        f.write_str(&json)
    }
}

/// A Service's permissions, given as JSON: `{"publish": ["orders.*"], "subscribe": []}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PermissionsArg(pub Permissions);

impl FromStr for PermissionsArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let p: Permissions = serde_json::from_str(s)
            .map_err(|e| format!("not a JSON object of publish and subscribe globs: {e}"))?;
        p.check()?;
        Ok(PermissionsArg(p))
    }
}

impl fmt::Display for PermissionsArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(&self.0).map_err(|_| fmt::Error)?;
        f.write_str(&json)
    }
}

#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct SidecarArgs {
    #[arg(long)]
    pub mesh: String,
    /// The Service this cell belongs to.
    #[arg(long)]
    pub service: String,
    /// This cell's name (the pod name in a cluster).
    #[arg(long)]
    pub name: String,
    /// The Service's delivery rules as JSON: `[{"pattern": "jobs.*", "mode": "anycatch"}]`.
    #[arg(long, default_value = "[]")]
    pub rules: DeliveryRules,
    /// What the Service's cells may publish and subscribe to, as JSON (`{"publish":
    /// [globs], "subscribe": [globs]}`; an absent list allows everything). Part of the
    /// cell's identity: its Service key is derived with it (docs/security.md).
    #[arg(long, default_value = "{}")]
    pub permissions: PermissionsArg,
    /// Rendezvous points, `udp://host:port` (repeat for several).
    #[arg(long = "rendezvous", required = true)]
    pub rendezvous: Vec<String>,
    /// Redis endpoint for the cell's applications; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub resp_bind: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_bind: SocketAddr,
    /// Transmitter to join first when it is live (local mode spreads cells this way).
    #[arg(long)]
    pub prefer_transmitter: Option<String>,
    #[arg(long, default_value_t = 500)]
    pub announce_interval_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub expiry_multiplier: u32,
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Bytes queued for one Redis client beyond which it is disconnected.
    #[arg(long, default_value_t = 32 << 20)]
    pub client_output_buffer_bytes: usize,
    /// On SIGTERM, how long to wait for the mesh to acknowledge the publishes taken so
    /// far before exiting (under Kubernetes' default grace period of 30 s).
    #[arg(long, default_value_t = 25)]
    pub drain_seconds: u64,
    /// The mesh token, from which this cell's Service key is derived (first line).
    #[arg(long, conflicts_with = "service_key_file")]
    pub token_file: Option<String>,
    /// This cell's Service key (64 hex digits): all a cell needs to authenticate, and
    /// all the operator gives its pod.
    #[arg(long)]
    pub service_key_file: Option<String>,
    /// Encrypt every link to a transmitter (needs a token or Service key; docs/security.md,
    /// "Encryption").
    #[arg(long)]
    pub encrypt: bool,
}

impl SidecarArgs {
    pub fn new(mesh: &str, service: &str, name: &str, rendezvous: &[String]) -> Self {
        let mut flags = vec!["--mesh", mesh, "--service", service, "--name", name];
        rendezvous_flags(rendezvous, &mut flags);
        parse(&flags)
    }
}

impl ToArgs for SidecarArgs {
    fn to_args(&self) -> Vec<String> {
        let mut a = Argv::new("sidecar");
        a.flag("mesh", &self.mesh)
            .flag("service", &self.service)
            .flag("name", &self.name)
            .flag("rules", &self.rules)
            .flag("permissions", &self.permissions)
            .each("rendezvous", &self.rendezvous)
            .flag("resp-bind", self.resp_bind)
            .flag("metrics-bind", self.metrics_bind)
            .each("prefer-transmitter", &self.prefer_transmitter)
            .flag("announce-interval-ms", self.announce_interval_ms)
            .flag("expiry-multiplier", self.expiry_multiplier)
            .flag("max-message-bytes", self.max_message_bytes)
            .flag(
                "client-output-buffer-bytes",
                self.client_output_buffer_bytes,
            )
            .flag("drain-seconds", self.drain_seconds)
            .each("token-file", &self.token_file)
            .each("service-key-file", &self.service_key_file)
            .switch("encrypt", self.encrypt);
        a.0
    }
}

#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct RendezvousArgs {
    /// Mesh served; datagrams for other meshes get an error.
    #[arg(long)]
    pub mesh: String,
    /// UDP address to bind (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind: SocketAddr,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_bind: SocketAddr,
    /// A declared room and its replicas, `NAME=REPLICAS` (repeat for each Room).
    #[arg(long = "room", value_parser = parse_room)]
    pub rooms: Vec<(String, u32)>,
    /// Replicas of a room created on demand (spec.rooms.defaultReplicas).
    #[arg(long, default_value_t = 2)]
    pub default_replicas: u32,
    /// Refuse rooms that are not declared (spec.rooms.allowUndeclared: false).
    #[arg(long)]
    pub forbid_undeclared: bool,
    /// Forget an on-demand room nobody used for this long: no cell asked for it, no host
    /// had a session in it (spec.rooms.forgetIdleAfterSeconds). Declared rooms are kept.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub forget_idle_rooms_after_seconds: u64,
    /// The mesh token (one per line; two during a rotation): every datagram must then be
    /// sealed with a key derived from it, and every answer is (docs/security.md).
    #[arg(long)]
    pub token_file: Option<String>,
}

impl RendezvousArgs {
    pub fn new(mesh: &str) -> Self {
        parse(&["--mesh", mesh])
    }
}

impl ToArgs for RendezvousArgs {
    fn to_args(&self) -> Vec<String> {
        let mut a = Argv::new("rendezvous");
        a.flag("mesh", &self.mesh)
            .flag("bind", self.bind)
            .flag("metrics-bind", self.metrics_bind)
            .each("room", self.rooms.iter().map(|(n, r)| format!("{n}={r}")))
            .flag("default-replicas", self.default_replicas)
            .switch("forbid-undeclared", self.forbid_undeclared)
            .flag(
                "forget-idle-rooms-after-seconds",
                self.forget_idle_rooms_after_seconds,
            )
            .each("token-file", &self.token_file);
        a.0
    }
}

fn parse_room(s: &str) -> Result<(String, u32), String> {
    let (name, replicas) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected NAME=REPLICAS, got {s:?}"))?;
    let replicas: u32 = replicas
        .parse()
        .map_err(|_| format!("replicas of room {name:?} must be a positive integer"))?;
    if name.is_empty() || replicas == 0 {
        return Err(format!("bad room {s:?}: a name and at least 1 replica"));
    }
    Ok((name.to_string(), replicas))
}

#[cfg(test)]
mod tests {
    use super::*;

    use thynapse_protocol::Mode;

    /// What the component parses from `to_args` is what was written.
    fn round_trip<A: clap::Args + ToArgs + PartialEq + fmt::Debug>(a: &A) {
        let argv = a.to_args();
        let flags: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        assert_eq!(&parse::<A>(&flags), a, "{argv:?}");
    }

    #[test]
    fn every_component_parses_what_to_args_writes() {
        let points = vec!["udp://10.0.0.1:7400".to_string(), "udp://b:1".to_string()];
        let mut t = TransmitterArgs::new("m", "m-0", &points);
        assert_eq!(t.command_bind, "tcp://127.0.0.1:0", "clap's default");
        round_trip(&t);
        t.advertise_host = "$(POD_IP)".into();
        t.link_buffer_bytes = 65536;
        t.token_file = Some("/var/run/thynapse/token".into());
        round_trip(&t);
        t.encrypt = true;
        round_trip(&t);

        let mut s = SidecarArgs::new("m", "orders", "orders-0", &points);
        assert_eq!(s.resp_bind.port(), 6379);
        round_trip(&s);
        s.rules = DeliveryRules(vec![DeliveryRule::new("jobs.*", Mode::Anycatch)]);
        s.prefer_transmitter = Some("m-1".into());
        s.service_key_file = Some("/var/run/thynapse/service-key".into());
        s.encrypt = true;
        round_trip(&s);
        s.permissions.0.subscribe = Some(vec!["news.*".into()]);
        round_trip(&s);

        let mut r = RendezvousArgs::new("m");
        round_trip(&r);
        r.rooms = vec![("lobby".into(), 2), ("a=b".into(), 1)];
        r.forbid_undeclared = true;
        round_trip(&r);
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        assert!("[{\"pattern\": 1}]".parse::<DeliveryRules>().is_err());
        assert!(parse_room("lobby").unwrap_err().contains("NAME=REPLICAS"));
        assert!(parse_room("lobby=0").is_err());
        assert!(parse_room("=2").is_err());
        assert_eq!(parse_room("a=b=3").unwrap(), ("a=b".to_string(), 3));
    }
}
