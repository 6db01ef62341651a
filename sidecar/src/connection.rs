//! One Redis client connection: reads requests, answers what it can itself, passes
//! subscriptions and publishes to the hub, and writes replies and pushed messages.
//! Replies keep request order: a (S)PUBLISH's reply (the number of cells reached) comes
//! back from the transmitter, so later replies wait behind it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use thynapse_protocol::batch::{put_publish, Kind};
use thynapse_protocol::room::room_of;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::hub::{now_us, ClientHandle, ClientId, HubCmd, Out, Publishes, SubKind};
use crate::introspection::{self, ClientSummary, ServerFacts, REDIS_VERSION};
use crate::resp::{parse_request, retype_pushes, Reply, Request};

pub struct Shared {
    pub hub: mpsc::Sender<HubCmd>,
    pub max_message_bytes: usize,
    pub client_output_buffer_bytes: usize,
    /// Who this sidecar is, for INFO.
    pub mesh: String,
    pub service: String,
    pub cell: String,
    /// Where the sidecar serves its clients.
    pub bind: SocketAddr,
    pub started: Instant,
    pub started_unix: u64,
    /// Every connected client as CLIENT LIST shows it, updated after each command that is
    /// not a (S)PUBLISH (those stay off the lock).
    pub clients: Mutex<HashMap<ClientId, ClientSummary>>,
    pub total_connections: AtomicU64,
    pub total_commands: AtomicU64,
}

enum Pending {
    Ready(Reply),
    /// A (S)PUBLISH waiting for its acknowledgement; its token is its number in
    /// `pending` (see `pending_base`).
    Publish,
    /// Holds the (P|S)SUBSCRIBE confirmations behind it until the mesh knows the
    /// subscriptions (`Out::Confirmed`); writes nothing itself.
    Barrier,
    /// A barrier passed.
    Passed,
}

struct Client {
    id: ClientId,
    resp3: bool,
    /// The version the hub was last told (it writes this client's pushes).
    hub_resp3: bool,
    /// What CLIENT INFO / LIST say of this client (its name among them).
    info: ClientSummary,
    channels: BTreeSet<Bytes>,
    patterns: BTreeSet<Bytes>,
    shard: BTreeSet<Bytes>,
    /// Replies in request order. Every entry is numbered (`pending_base` is the number of
    /// the front one), so an acknowledgement finds its (S)PUBLISH's slot by subtraction.
    pending: VecDeque<Pending>,
    pending_base: u64,
    /// (S)PUBLISHes read but not yet handed to the hub, encoded as `PUBS` records: one
    /// hand-over per read, not per message.
    batch: BytesMut,
    publishes: Publishes,
    /// When the publishes of the batch were taken (their `ts`).
    batch_ts: u64,
    out: BytesMut,
    /// What goes out before `out`, in order: earlier replies and the hub's pushes.
    chunks: VecDeque<Bytes>,
    close: bool,
}

/// Largest request buffered; beyond it the client gets an error and is disconnected, as
/// Redis does past its query-buffer limit.
fn query_limit(max_message_bytes: usize) -> usize {
    max_message_bytes * 2 + (1 << 20)
}

pub async fn serve(mut socket: TcpStream, id: ClientId, shared: Arc<Shared>) {
    let _ = socket.set_nodelay(true);
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let now = Instant::now();
    let info = ClientSummary {
        id,
        addr: socket.peer_addr().unwrap_or(unknown),
        laddr: socket.local_addr().unwrap_or(unknown),
        created: now,
        last_active: now,
        name: None,
        lib_name: None,
        lib_ver: None,
        resp: 2,
        sub: 0,
        psub: 0,
        ssub: 0,
        last_command: String::new(),
    };
    shared.total_connections.fetch_add(1, Ordering::Relaxed);
    lock(&shared.clients).insert(id, info.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let kill = Arc::new(Notify::new());
    let handle = ClientHandle {
        tx,
        resp3: false,
        queued: queued.clone(),
        killed: killed.clone(),
        kill: kill.clone(),
    };
    if shared.hub.send(HubCmd::Register(id, handle)).await.is_err() {
        return;
    }
    let mut c = Client {
        id,
        resp3: false,
        hub_resp3: false,
        info,
        channels: BTreeSet::new(),
        patterns: BTreeSet::new(),
        shard: BTreeSet::new(),
        pending: VecDeque::new(),
        pending_base: 0,
        batch: BytesMut::with_capacity(16 * 1024),
        publishes: Publishes::default(),
        batch_ts: 0,
        out: BytesMut::with_capacity(16 * 1024),
        chunks: VecDeque::new(),
        close: false,
    };
    // 64 KiB: a pipeline of a few hundred publishes arrives in one read and one hand-over.
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut requests = Vec::new();
    let limit = query_limit(shared.max_message_bytes);
    loop {
        tokio::select! {
            biased;
            _ = kill.notified() => break,
            Some(out) = rx.recv() => {
                let mut freed = out.size();
                c.on_out(out);
                while let Ok(out) = rx.try_recv() {
                    freed += out.size();
                    c.on_out(out);
                    if freed > 64 * 1024 {
                        break; // write what is here before taking more
                    }
                }
                queued.fetch_sub(freed, Ordering::Relaxed);
            }
            read = socket.read_buf(&mut buf) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                // Every complete request in the buffer, then the bytes they take as one
                // chunk that their arguments are sliced from.
                let mut end = 0;
                let mut error = None;
                loop {
                    match parse_request(&buf, end) {
                        Ok(Some((args, next))) => {
                            requests.push(args);
                            end = next;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                let chunk = buf.split_to(end).freeze();
                shared.total_commands.fetch_add(requests.len() as u64, Ordering::Relaxed);
                for args in requests.drain(..) {
                    if c.close {
                        continue;
                    }
                    // (S)PUBLISH is most of the traffic: queued without the generic
                    // command lookup or a Vec of arguments.
                    match c.try_publish(&chunk, &args, shared.max_message_bytes) {
                        Some(false) => continue,
                        Some(true) => {
                            c.hand_over(&shared).await;
                            continue;
                        }
                        None => {}
                    }
                    if !args.is_empty() {
                        c.handle(&chunk, args, &shared).await;
                        c.publish_summary(&shared);
                        if c.resp3 != c.hub_resp3 {
                            // HELLO or RESET changed the version the hub writes pushes in.
                            c.hub_resp3 = c.resp3;
                            let _ = shared.hub.send(HubCmd::Protocol(c.id, c.resp3)).await;
                        }
                    }
                }
                if let Some(e) = error {
                    if !c.close {
                        c.reply(Reply::error(format!("ERR {e}")));
                        c.close = true;
                    }
                }
                c.hand_over(&shared).await;
                if buf.len() > limit {
                    c.reply(Reply::error("ERR Protocol error: request larger than the query buffer limit"));
                    c.close = true;
                }
            }
        }
        c.flush_ready();
        if !c.out.is_empty() {
            c.chunks.push_back(c.out.split().freeze());
        }
        if !c.chunks.is_empty() {
            // A client that stopped reading blocks this write: the hub's kill switch
            // still ends it, so its socket and queue are released.
            tokio::select! {
                written = write_chunks(&mut socket, &mut c.chunks) => if written.is_err() { break },
                _ = kill.notified() => break,
            }
        }
        if c.close && c.pending.is_empty() {
            break;
        }
        if killed.load(Ordering::Relaxed) {
            break;
        }
    }
    lock(&shared.clients).remove(&id);
    let _ = shared.hub.send(HubCmd::Unregister(id)).await;
}

/// The client registry's lock; a panic while it was held leaves nothing half-written
/// worth refusing (each entry is replaced whole).
fn lock(
    m: &Mutex<HashMap<ClientId, ClientSummary>>,
) -> std::sync::MutexGuard<'_, HashMap<ClientId, ClientSummary>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `chunks` in order with vectored writes, taking them off as they are written.
async fn write_chunks(socket: &mut TcpStream, chunks: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !chunks.is_empty() {
        let slices: Vec<IoSlice> = chunks.iter().take(64).map(|c| IoSlice::new(c)).collect();
        let mut written = socket.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let front = chunks.front_mut().expect("written bytes come from a chunk");
            if written >= front.len() {
                written -= front.len();
                chunks.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

fn sub_kind(command: &str) -> SubKind {
    match command {
        "subscribe" | "unsubscribe" => SubKind::Channel,
        "psubscribe" | "punsubscribe" => SubKind::Pattern,
        _ => SubKind::Shard,
    }
}

fn arity_error(name: &str) -> Reply {
    Reply::error(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

/// Redis 7's reply to an unknown command, argument list included.
fn unknown_command(args: &[Bytes]) -> Reply {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        String::from_utf8_lossy(&args[0])
    );
    for a in &args[1..] {
        if msg.len() >= 128 {
            break;
        }
        msg.push_str(&format!("'{}' ", String::from_utf8_lossy(a)));
    }
    Reply::error(msg)
}

fn unknown_subcommand(cmd: &str, sub: &[u8]) -> Reply {
    Reply::error(format!(
        "ERR unknown subcommand '{}'. Try {} HELP.",
        String::from_utf8_lossy(sub),
        cmd.to_ascii_uppercase()
    ))
}

/// Commands this sidecar serves, for COMMAND: name, arity, flags.
const COMMANDS: &[(&str, i64, &[&str])] = &[
    ("ping", -1, &["fast", "pubsub"]),
    ("echo", 2, &["fast"]),
    (
        "hello",
        -1,
        &[
            "noscript",
            "loading",
            "stale",
            "fast",
            "no_auth",
            "allow_busy",
        ],
    ),
    ("client", -2, &[]),
    ("select", 2, &["loading", "stale", "fast"]),
    (
        "quit",
        -1,
        &[
            "noscript",
            "loading",
            "stale",
            "fast",
            "no_auth",
            "allow_busy",
        ],
    ),
    (
        "reset",
        1,
        &[
            "noscript",
            "loading",
            "stale",
            "fast",
            "no_auth",
            "allow_busy",
        ],
    ),
    ("command", -1, &["loading", "stale"]),
    ("subscribe", -2, &["pubsub", "noscript", "loading", "stale"]),
    (
        "unsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
    ),
    (
        "psubscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
    ),
    (
        "punsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
    ),
    ("publish", 3, &["pubsub", "loading", "stale", "fast"]),
    (
        "ssubscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
    ),
    (
        "sunsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
    ),
    ("spublish", 3, &["pubsub", "loading", "stale", "fast"]),
    ("pubsub", -2, &[]),
    // Asked by clients and tools on their own (see `introspection`).
    ("info", -1, &["loading", "stale"]),
    ("config", -2, &[]),
    ("time", 1, &["loading", "stale", "fast"]),
    ("dbsize", 1, &["readonly", "fast"]),
    ("lastsave", 1, &["loading", "stale", "fast"]),
    ("role", 1, &["noscript", "loading", "stale", "fast"]),
    (
        "auth",
        -2,
        &[
            "noscript",
            "loading",
            "stale",
            "fast",
            "no_auth",
            "allow_busy",
        ],
    ),
    ("cluster", -2, &[]),
    ("readonly", 1, &["loading", "stale", "fast"]),
    ("readwrite", 1, &["loading", "stale", "fast"]),
];

/// Redis' answer to credentials of a user other than `default`, the only one here.
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// Redis' answer, without cluster mode, to the commands only Redis Cluster serves.
const NO_CLUSTER: &str = "ERR This instance has cluster support disabled";

fn command_info(name: &str, arity: i64, flags: &[&'static str]) -> Reply {
    Reply::Array(vec![
        Reply::bulk(name.to_string()),
        Reply::Int(arity),
        Reply::Array(flags.iter().map(|f| Reply::Simple(f)).collect()),
        Reply::Int(0),
        Reply::Int(0),
        Reply::Int(0),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
    ])
}

impl Client {
    fn reply(&mut self, r: Reply) {
        self.pending.push_back(Pending::Ready(r));
    }

    /// Refreshes this client's entry in the registry CLIENT LIST reads.
    fn publish_summary(&mut self, shared: &Shared) {
        self.info.resp = if self.resp3 { 3 } else { 2 };
        self.info.sub = self.channels.len();
        self.info.psub = self.patterns.len();
        self.info.ssub = self.shard.len();
        self.info.last_active = Instant::now();
        lock(&shared.clients).insert(self.id, self.info.clone());
    }

    fn set_of(&mut self, kind: SubKind) -> &mut BTreeSet<Bytes> {
        match kind {
            SubKind::Channel => &mut self.channels,
            SubKind::Pattern => &mut self.patterns,
            SubKind::Shard => &mut self.shard,
        }
    }

    fn subscribed(&self) -> bool {
        !self.channels.is_empty() || !self.patterns.is_empty() || !self.shard.is_empty()
    }

    /// The count in a (un)subscribe reply, as Redis 7 gives it: shard channels are counted
    /// apart from channels and patterns.
    fn subscription_count(&self, kind: SubKind) -> i64 {
        match kind {
            SubKind::Channel | SubKind::Pattern => {
                (self.channels.len() + self.patterns.len()) as i64
            }
            SubKind::Shard => self.shard.len() as i64,
        }
    }

    fn on_out(&mut self, out: Out) {
        match out {
            Out::Pushes { resp3, bytes } => {
                if resp3 == self.resp3 {
                    // Written as they are, after what is buffered so far (no copy).
                    if !self.out.is_empty() {
                        self.chunks.push_back(self.out.split().freeze());
                    }
                    self.chunks.push_back(bytes);
                } else {
                    let start = self.out.len();
                    self.out.extend_from_slice(&bytes);
                    retype_pushes(&mut self.out[start..], self.resp3);
                }
            }
            Out::Published { token, result } => self.answer(
                token,
                match result {
                    Ok(n) => Reply::Int(n),
                    Err(e) => Reply::error(format!("ERR {e}")),
                },
            ),
            Out::Acked(acks) => {
                for (token, n) in acks {
                    self.answer(token, Reply::Int(n));
                }
            }
            Out::Confirmed(token) => {
                if let Some(slot @ Pending::Barrier) = self.slot(token) {
                    *slot = Pending::Passed;
                }
                // The confirmations go out now: pushes handed over after this (the first
                // messages of the new subscriptions) are written behind them.
                self.flush_ready();
            }
        }
    }

    fn slot(&mut self, token: u64) -> Option<&mut Pending> {
        let i = token.checked_sub(self.pending_base)?;
        self.pending.get_mut(usize::try_from(i).ok()?)
    }

    /// Fills the reply slot of the (S)PUBLISH numbered `token`.
    fn answer(&mut self, token: u64, reply: Reply) {
        if let Some(slot @ Pending::Publish) = self.slot(token) {
            *slot = Pending::Ready(reply);
        }
    }

    /// Writes the replies that are ready, in order, up to the first unanswered (S)PUBLISH
    /// or unconfirmed subscription.
    fn flush_ready(&mut self) {
        while let Some(Pending::Ready(_) | Pending::Passed) = self.pending.front() {
            if let Some(Pending::Ready(r)) = self.pending.pop_front() {
                r.encode(self.resp3, &mut self.out);
            }
            self.pending_base += 1;
        }
    }

    async fn handle(&mut self, chunk: &Bytes, request: Request, shared: &Shared) {
        let args: Vec<Bytes> = request.into_iter().map(|r| chunk.slice(r)).collect();
        // Anything else may depend on the order of earlier publishes.
        self.hand_over(shared).await;
        let name = lower(&args[0]);
        self.info.last_command = match (name.as_str(), args.get(1)) {
            ("client" | "config" | "command" | "pubsub" | "cluster", Some(sub)) => {
                format!("{name}|{}", lower(sub))
            }
            _ => name.clone(),
        };
        // RESP2 clients in subscribed mode may only (un)subscribe, ping, quit and reset.
        if self.subscribed()
            && !self.resp3
            && !matches!(
                name.as_str(),
                "subscribe"
                    | "unsubscribe"
                    | "psubscribe"
                    | "punsubscribe"
                    | "ssubscribe"
                    | "sunsubscribe"
                    | "ping"
                    | "quit"
                    | "reset"
            )
        {
            self.reply(Reply::error(format!(
                "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                self.info.last_command
            )));
            return;
        }
        if let Some((_, arity, _)) = COMMANDS.iter().find(|(n, _, _)| *n == name) {
            let n = args.len() as i64;
            if (*arity > 0 && n != *arity) || (*arity < 0 && n < -*arity) {
                self.reply(arity_error(&name));
                return;
            }
        }
        match name.as_str() {
            "ping" => {
                let reply = match (args.len(), self.subscribed() && !self.resp3) {
                    (1, false) => Reply::Simple("PONG"),
                    (2, false) => Reply::Bulk(args[1].clone()),
                    (1, true) => Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]),
                    (2, true) => {
                        Reply::Array(vec![Reply::bulk("pong"), Reply::Bulk(args[1].clone())])
                    }
                    _ => arity_error("ping"),
                };
                self.reply(reply);
            }
            "echo" => self.reply(Reply::Bulk(args[1].clone())),
            "hello" => self.hello(&args),
            "client" => self.client_command(&args, shared),
            // Pub/sub ignores databases in Redis; accept the 16 a default Redis has.
            "select" => self.reply(
                match std::str::from_utf8(&args[1])
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(0..=15) => Reply::Simple("OK"),
                    Some(_) => Reply::error("ERR DB index is out of range"),
                    None => Reply::error("ERR value is not an integer or out of range"),
                },
            ),
            "quit" => {
                self.reply(Reply::Simple("OK"));
                self.close = true;
            }
            "reset" => {
                for kind in [SubKind::Channel, SubKind::Pattern, SubKind::Shard] {
                    self.unsubscribe_all(kind, shared, false).await;
                }
                self.resp3 = false;
                self.info.name = None;
                self.reply(Reply::Simple("RESET"));
            }
            "command" => self.command_command(&args),
            "subscribe" | "psubscribe" | "ssubscribe" => {
                let kind = sub_kind(&name);
                let names: Vec<Bytes> = args[1..].to_vec();
                let refused = if kind == SubKind::Shard {
                    self.admit_rooms(&names, shared).await
                } else {
                    BTreeMap::new()
                };
                // Subscriptions new to this client, by session (the mesh, or each room):
                // the confirmations wait behind one barrier per session.
                let mut new: BTreeMap<Option<&[u8]>, Vec<Bytes>> = BTreeMap::new();
                let mut replies = Vec::new();
                for n in &names {
                    if let Some(error) = refused.get(room_of(n)) {
                        replies.push(Reply::error(format!("ERR {error}")));
                        continue;
                    }
                    if self.set_of(kind).insert(n.clone()) {
                        let session = (kind == SubKind::Shard).then(|| room_of(n));
                        new.entry(session).or_default().push(n.clone());
                    }
                    let count = self.subscription_count(kind);
                    replies.push(Reply::Push(vec![
                        Reply::bulk(name.clone()),
                        Reply::Bulk(n.clone()),
                        Reply::Int(count),
                    ]));
                }
                for names in new.into_values() {
                    let token = self.pending_base + self.pending.len() as u64;
                    self.pending.push_back(Pending::Barrier);
                    let cmd = HubCmd::Subscribe {
                        client: self.id,
                        kind,
                        names,
                        token,
                    };
                    let _ = shared.hub.send(cmd).await;
                }
                for r in replies {
                    self.reply(r);
                }
            }
            "unsubscribe" | "punsubscribe" | "sunsubscribe" => {
                let kind = sub_kind(&name);
                if args.len() == 1 {
                    self.unsubscribe_all(kind, shared, true).await;
                } else {
                    let mut gone = Vec::new();
                    let mut replies = Vec::new();
                    for n in &args[1..] {
                        if self.set_of(kind).remove(n) {
                            gone.push(n.clone());
                        }
                        let count = self.subscription_count(kind);
                        replies.push(Reply::Push(vec![
                            Reply::bulk(name.clone()),
                            Reply::Bulk(n.clone()),
                            Reply::Int(count),
                        ]));
                    }
                    self.unsubscribe_in_hub(kind, gone, shared).await;
                    for r in replies {
                        self.reply(r);
                    }
                }
            }
            "publish" | "spublish" => match <[Bytes; 3]>::try_from(args) {
                Ok([_, channel, payload]) => {
                    self.publish(&channel, &payload, name == "spublish", shared)
                        .await
                }
                Err(_) => self.reply(arity_error(&name)),
            },
            "pubsub" => self.pubsub(&args, shared).await,
            "info" => self.info_command(&args, shared).await,
            "config" => self.config_command(&args, shared),
            "time" => {
                let (secs, micros) = introspection::time();
                self.reply(Reply::Array(vec![
                    Reply::bulk(secs.to_string()),
                    Reply::bulk(micros.to_string()),
                ]));
            }
            // No keys live here: an empty server's answers.
            "dbsize" => self.reply(Reply::Int(0)),
            "lastsave" => self.reply(Reply::Int(shared.started_unix as i64)),
            "role" => self.reply(Reply::Array(vec![
                Reply::bulk("master"),
                Reply::Int(0),
                Reply::Array(vec![]),
            ])),
            // The sidecar has no password (it serves its own pod on loopback): Redis'
            // answers when none is set, where the `default` user takes any password.
            "auth" if args.len() == 2 => self.reply(Reply::error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            )),
            "auth" if args.len() == 3 => self.reply(if args[1][..] == *b"default" {
                Reply::Simple("OK")
            } else {
                Reply::error(WRONGPASS)
            }),
            "auth" => self.reply(Reply::error("ERR syntax error")),
            "cluster" | "readonly" | "readwrite" => self.reply(Reply::error(NO_CLUSTER)),
            _ => self.reply(unknown_command(&args)),
        }
    }

    async fn publish(&mut self, channel: &[u8], payload: &[u8], shard: bool, shared: &Shared) {
        if self.queue_publish(channel, payload, shard, shared.max_message_bytes) {
            self.hand_over(shared).await;
        }
    }

    /// The (S)PUBLISH fast path, taken before `handle` (whose future is large, as it
    /// serves every command): queues the publish for the hub; true when the batch is full
    /// and should be handed over now.
    fn try_publish(
        &mut self,
        chunk: &[u8],
        request: &Request,
        max_message_bytes: usize,
    ) -> Option<bool> {
        // RESP2 clients in subscribed mode may not publish (handle() answers them).
        if request.len() != 3 || (!self.resp3 && self.subscribed()) {
            return None;
        }
        let name = &chunk[request[0].clone()];
        let shard = name.eq_ignore_ascii_case(b"spublish");
        if !shard && !name.eq_ignore_ascii_case(b"publish") {
            return None;
        }
        let channel = &chunk[request[1].clone()];
        let payload = &chunk[request[2].clone()];
        Some(self.queue_publish(channel, payload, shard, max_message_bytes))
    }

    /// Queues one (S)PUBLISH (or refuses an oversized one); true when the batch is full.
    fn queue_publish(
        &mut self,
        channel: &[u8],
        payload: &[u8],
        shard: bool,
        max_message_bytes: usize,
    ) -> bool {
        if payload.len() > max_message_bytes {
            self.reply(Reply::error(format!(
                "ERR message of {} bytes exceeds the mesh limit of {} bytes (maxMessageBytes)",
                payload.len(),
                max_message_bytes
            )));
            return false;
        }
        let token = self.pending_base + self.pending.len() as u64;
        self.pending.push_back(Pending::Publish);
        let p = &mut self.publishes;
        if p.count == 0 {
            self.batch_ts = now_us();
        }
        let kind = if shard { Kind::Shard } else { Kind::Mesh };
        put_publish(&mut self.batch, kind, self.batch_ts, channel, payload);
        match p.tokens.last_mut() {
            Some((first, n)) if *first + u64::from(*n) == token => *n += 1,
            _ => p.tokens.push((token, 1)),
        }
        p.count += 1;
        p.shard |= shard;
        p.payload_bytes += payload.len();
        p.count >= 256 || self.batch.len() >= 64 * 1024
    }

    /// Hands the publishes read so far to the hub.
    async fn hand_over(&mut self, shared: &Shared) {
        if self.publishes.count > 0 {
            let mut p = std::mem::take(&mut self.publishes);
            p.records = self.batch.split().freeze();
            let _ = shared.hub.send(HubCmd::Publish(self.id, p)).await;
        }
    }

    /// Asks the hub whether each room of `channels` may be used (placing new rooms);
    /// returns the refused rooms with the reason.
    async fn admit_rooms(
        &mut self,
        channels: &[Bytes],
        shared: &Shared,
    ) -> BTreeMap<Bytes, String> {
        let rooms: BTreeSet<Bytes> = channels
            .iter()
            .filter(|c| !self.shard.contains(*c))
            .map(|c| Bytes::copy_from_slice(room_of(c)))
            .collect();
        let mut asks = Vec::new();
        for room in rooms {
            let (tx, rx) = oneshot::channel();
            let _ = shared.hub.send(HubCmd::Admit(room.clone(), tx)).await;
            asks.push(async move { (room, rx.await) });
        }
        futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(room, verdict)| match verdict {
                Ok(Err(e)) => Some((room, e)),
                _ => None,
            })
            .collect()
    }

    /// Drops subscriptions in the hub. The replies that follow wait until it has: a
    /// message the hub delivered before then is written first, and none comes after the
    /// confirmation, as in Redis.
    async fn unsubscribe_in_hub(&mut self, kind: SubKind, names: Vec<Bytes>, shared: &Shared) {
        if names.is_empty() {
            return;
        }
        let token = self.pending_base + self.pending.len() as u64;
        self.pending.push_back(Pending::Barrier);
        let cmd = HubCmd::Unsubscribe {
            client: self.id,
            kind,
            names,
            token,
        };
        let _ = shared.hub.send(cmd).await;
    }

    async fn unsubscribe_all(&mut self, kind: SubKind, shared: &Shared, reply: bool) {
        let set = std::mem::take(self.set_of(kind));
        let verb = match kind {
            SubKind::Channel => "unsubscribe",
            SubKind::Pattern => "punsubscribe",
            SubKind::Shard => "sunsubscribe",
        };
        self.unsubscribe_in_hub(kind, set.iter().cloned().collect(), shared)
            .await;
        if reply {
            if set.is_empty() {
                let count = self.subscription_count(kind);
                self.reply(Reply::Push(vec![
                    Reply::bulk(verb),
                    Reply::Null,
                    Reply::Int(count),
                ]));
            }
            let mut remaining = self.subscription_count(kind) + set.len() as i64;
            for n in &set {
                remaining -= 1;
                self.reply(Reply::Push(vec![
                    Reply::bulk(verb),
                    Reply::Bulk(n.clone()),
                    Reply::Int(remaining),
                ]));
            }
        }
    }

    fn hello(&mut self, args: &[Bytes]) {
        let mut i = 1;
        if args.len() > 1 {
            match std::str::from_utf8(&args[1])
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                Some(2) => self.resp3 = false,
                Some(3) => self.resp3 = true,
                Some(_) => {
                    self.reply(Reply::error("NOPROTO unsupported protocol version"));
                    return;
                }
                None => {
                    self.reply(Reply::error(
                        "ERR Protocol version is not an integer or out of range",
                    ));
                    return;
                }
            }
            i = 2;
        }
        while i < args.len() {
            match lower(&args[i]).as_str() {
                "auth" if i + 2 < args.len() => {
                    if args[i + 1][..] != *b"default" {
                        self.reply(Reply::error(WRONGPASS));
                        return;
                    }
                    i += 3;
                }
                "setname" if i + 1 < args.len() => {
                    self.info.name = Some(args[i + 1].clone());
                    i += 2;
                }
                _ => {
                    self.reply(Reply::error(format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    )));
                    return;
                }
            }
        }
        self.reply(Reply::Map(vec![
            (Reply::bulk("server"), Reply::bulk("redis")),
            (Reply::bulk("version"), Reply::bulk(REDIS_VERSION)),
            (
                Reply::bulk("proto"),
                Reply::Int(if self.resp3 { 3 } else { 2 }),
            ),
            (Reply::bulk("id"), Reply::Int(self.id as i64)),
            (Reply::bulk("mode"), Reply::bulk("standalone")),
            (Reply::bulk("role"), Reply::bulk("master")),
            (Reply::bulk("modules"), Reply::Array(vec![])),
        ]));
    }

    fn client_command(&mut self, args: &[Bytes], shared: &Shared) {
        let sub = lower(&args[1]);
        let reply = match (sub.as_str(), args.len()) {
            ("setname", 3) => {
                if args[2].iter().any(|b| *b <= b' ' || *b > b'~') {
                    Reply::error(
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    )
                } else {
                    self.info.name = (!args[2].is_empty()).then(|| args[2].clone());
                    Reply::Simple("OK")
                }
            }
            ("getname", 2) => self.info.name.clone().map_or(Reply::Null, Reply::Bulk),
            ("setinfo", 4) => {
                let value = (!args[3].is_empty()).then(|| args[3].clone());
                match lower(&args[2]).as_str() {
                    "lib-name" => self.info.lib_name = value,
                    "lib-ver" => self.info.lib_ver = value,
                    _ => {}
                }
                Reply::Simple("OK")
            }
            ("id", 2) => Reply::Int(self.id as i64),
            ("info", 2) => {
                self.publish_summary(shared);
                Reply::Verbatim(format!("{}\n", self.info.line(Instant::now())).into())
            }
            ("list", _) => self.client_list(&args[2..], shared),
            // Eviction and LRU touches concern keys; there are none here.
            ("no-evict" | "no-touch", 3) => match lower(&args[2]).as_str() {
                "on" | "off" => Reply::Simple("OK"),
                _ => Reply::error("ERR syntax error"),
            },
            ("getredir", 2) => Reply::Int(-1),
            (
                "setname" | "getname" | "setinfo" | "id" | "info" | "no-evict" | "no-touch"
                | "getredir",
                _,
            ) => Reply::error(format!(
                "ERR wrong number of arguments for 'client|{sub}' command"
            )),
            _ => unknown_subcommand("client", &args[1]),
        };
        self.reply(reply);
    }

    /// CLIENT LIST [TYPE normal|pubsub] [ID id …], as Redis 7 filters it.
    fn client_list(&mut self, filters: &[Bytes], shared: &Shared) -> Reply {
        self.publish_summary(shared);
        let mut kind = None;
        let mut ids: Option<Vec<u64>> = None;
        let mut i = 0;
        while i < filters.len() {
            match (lower(&filters[i]).as_str(), filters.get(i + 1)) {
                ("type", Some(t)) => {
                    let t = lower(t);
                    if !matches!(
                        t.as_str(),
                        "normal" | "pubsub" | "master" | "replica" | "slave"
                    ) {
                        return Reply::error(format!("ERR Unknown client type '{t}'"));
                    }
                    kind = Some(t);
                    i += 2;
                }
                ("id", Some(_)) => {
                    let mut list = Vec::new();
                    i += 1;
                    while let Some(id) = filters.get(i) {
                        match std::str::from_utf8(id)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                        {
                            Some(id) => list.push(id),
                            None => return Reply::error("ERR Invalid client ID"),
                        }
                        i += 1;
                    }
                    ids = Some(list);
                }
                _ => return Reply::error("ERR syntax error"),
            }
        }
        let now = Instant::now();
        let clients = lock(&shared.clients);
        let mut listed: Vec<&ClientSummary> = clients
            .values()
            .filter(|c| ids.as_ref().is_none_or(|ids| ids.contains(&c.id)))
            .filter(|c| {
                let pubsub = c.sub + c.psub + c.ssub > 0;
                match kind.as_deref() {
                    None => true,
                    Some("normal") => !pubsub,
                    Some("pubsub") => pubsub,
                    Some(_) => false,
                }
            })
            .collect();
        listed.sort_by_key(|c| c.id);
        let text: String = listed.iter().map(|c| c.line(now) + "\n").collect();
        Reply::Verbatim(text.into())
    }

    async fn info_command(&mut self, args: &[Bytes], shared: &Shared) {
        let (tx, rx) = oneshot::channel();
        let _ = shared.hub.send(HubCmd::Info(tx)).await;
        let Ok(hub) = rx.await else {
            self.reply(Reply::error("ERR the sidecar is shutting down"));
            return;
        };
        let facts = ServerFacts {
            run_id: hub.run_id,
            port: shared.bind.port(),
            uptime: shared.started.elapsed(),
            connected_clients: lock(&shared.clients).len(),
            total_connections: shared.total_connections.load(Ordering::Relaxed),
            total_commands: shared.total_commands.load(Ordering::Relaxed),
            pubsub_channels: hub.channels,
            pubsub_patterns: hub.patterns,
            pubsub_shard_channels: hub.shard_channels,
            mesh: shared.mesh.clone(),
            service: shared.service.clone(),
            cell: shared.cell.clone(),
            transmitter: hub.transmitter,
            started_unix: shared.started_unix,
        };
        let text = introspection::info(&facts, &introspection::info_sections(&args[1..]));
        self.reply(Reply::Verbatim(text.into()));
    }

    fn config_command(&mut self, args: &[Bytes], shared: &Shared) {
        let sub = lower(&args[1]);
        let reply = match sub.as_str() {
            "get" if args.len() >= 3 => Reply::Map(
                introspection::config_get(shared.bind, &args[2..], shared.client_output_buffer_bytes)
                    .into_iter()
                    .map(|(k, v)| (Reply::bulk(k), Reply::bulk(v)))
                    .collect(),
            ),
            "resetstat" if args.len() == 2 => Reply::Simple("OK"),
            "set" if args.len() >= 4 && args.len().is_multiple_of(2) => Reply::error(format!(
                "ERR CONFIG SET failed (possibly related to argument '{}') - the Thynapse sidecar's settings come from its mesh",
                String::from_utf8_lossy(&args[2])
            )),
            "get" | "set" | "resetstat" => Reply::error(format!(
                "ERR wrong number of arguments for 'config|{sub}' command"
            )),
            _ => unknown_subcommand("config", &args[1]),
        };
        self.reply(reply);
    }

    fn command_command(&mut self, args: &[Bytes]) {
        let reply = match args.get(1).map(|a| lower(a)).as_deref() {
            None => Reply::Array(
                COMMANDS
                    .iter()
                    .map(|(n, a, f)| command_info(n, *a, f))
                    .collect(),
            ),
            Some("count") => Reply::Int(COMMANDS.len() as i64),
            Some("info") => Reply::Array(
                args[2..]
                    .iter()
                    .map(|n| {
                        let n = lower(n);
                        COMMANDS
                            .iter()
                            .find(|(c, _, _)| *c == n)
                            .map_or(Reply::Null, |(c, a, f)| command_info(c, *a, f))
                    })
                    .collect(),
            ),
            // Clients ask for docs to show hints; there are none to give.
            Some("docs") => Reply::Map(vec![]),
            Some(_) => unknown_subcommand("command", &args[1]),
        };
        self.reply(reply);
    }

    async fn pubsub(&mut self, args: &[Bytes], shared: &Shared) {
        let sub = lower(&args[1]);
        match sub.as_str() {
            "channels" | "shardchannels" if args.len() <= 3 => {
                let kind = if sub == "channels" {
                    SubKind::Channel
                } else {
                    SubKind::Shard
                };
                let (tx, rx) = oneshot::channel();
                let _ = shared
                    .hub
                    .send(HubCmd::Channels(kind, args.get(2).cloned(), tx))
                    .await;
                let names = rx.await.unwrap_or_default();
                self.reply(Reply::Array(names.into_iter().map(Reply::Bulk).collect()));
            }
            "numsub" | "shardnumsub" => {
                let kind = if sub == "numsub" {
                    SubKind::Channel
                } else {
                    SubKind::Shard
                };
                let names: Vec<Bytes> = args[2..].to_vec();
                let (tx, rx) = oneshot::channel();
                let _ = shared
                    .hub
                    .send(HubCmd::NumSub(kind, names.clone(), tx))
                    .await;
                let counts = rx.await.unwrap_or_default();
                let mut out = Vec::new();
                for (n, c) in names.into_iter().zip(counts) {
                    out.push(Reply::Bulk(n));
                    out.push(Reply::Int(c));
                }
                self.reply(Reply::Array(out));
            }
            "numpat" if args.len() == 2 => {
                let (tx, rx) = oneshot::channel();
                let _ = shared.hub.send(HubCmd::NumPat(tx)).await;
                self.reply(Reply::Int(rx.await.unwrap_or(0)));
            }
            "channels" | "numpat" | "shardchannels" => self.reply(Reply::error(format!(
                "ERR wrong number of arguments for 'pubsub|{sub}' command"
            ))),
            _ => self.reply(unknown_subcommand("pubsub", &args[1])),
        }
    }
}
