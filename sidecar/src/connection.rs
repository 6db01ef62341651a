//! One Redis client connection: reads requests, answers what it can itself, passes
//! subscriptions and publishes to the hub, and writes replies and pushed messages.
//! Replies keep request order: a (S)PUBLISH's reply (the number of cells reached) comes
//! back from the transmitter, so later replies wait behind it.

use std::collections::{BTreeSet, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use thynapse_protocol::permissions::refusal;

use bytes::{Buf, Bytes, BytesMut};
use thynapse_protocol::batch::{put_publish, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::api::{
    now_us, ClientHandle, ClientId, ClientPublishes, HubCmd, Out, PUBLISH_QUEUE_BYTES,
};
use crate::client::{lock, name_too_long, Client, Pending, Shared};
use crate::cmd::{arity_error, lower, COMMANDS};
use crate::introspection::ClientSummary;
use crate::resp::{parse_request, retype_pushes, Reply, Request};

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
        publishes: ClientPublishes::default(),
        batch_ts: 0,
        out: BytesMut::with_capacity(16 * 1024),
        chunks: VecDeque::new(),
        close: false,
        kill: kill.clone(),
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
                    match c.try_publish(&chunk, &args, &shared) {
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

impl Client {
    pub(crate) fn reply(&mut self, r: Reply) {
        self.pending.push_back(Pending::Ready(r));
    }

    /// Opens a reply slot answered later (a publish's acknowledgement, a barrier's
    /// confirmation): its token, by which the hub's answer finds it.
    pub(crate) fn open_slot(&mut self, p: Pending) -> u64 {
        let token = self.pending_base + self.pending.len() as u64;
        self.pending.push_back(p);
        token
    }

    /// Refreshes this client's entry in the registry CLIENT LIST reads.
    pub(crate) fn publish_summary(&mut self, shared: &Shared) {
        self.info.resp = if self.resp3 { 3 } else { 2 };
        self.info.sub = self.channels.len();
        self.info.psub = self.patterns.len();
        self.info.ssub = self.shard.len();
        self.info.last_active = Instant::now();
        lock(&shared.clients).insert(self.id, self.info.clone());
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
            "subscribe" | "psubscribe" | "ssubscribe" => self.subscribe(&name, &args, shared).await,
            "unsubscribe" | "punsubscribe" | "sunsubscribe" => {
                self.unsubscribe(&name, &args, shared).await
            }
            "publish" | "spublish" => match <[Bytes; 3]>::try_from(args) {
                Ok([_, channel, payload]) => {
                    self.publish(&channel, &payload, name == "spublish", shared)
                        .await
                }
                Err(_) => self.reply(arity_error(&name)),
            },
            "pubsub" => self.pubsub(&args, shared).await,
            "info" | "config" | "time" | "dbsize" | "lastsave" | "role" | "cluster"
            | "readonly" | "readwrite" => self.introspect(&name, &args, shared).await,
            _ => self.server_command(&name, &args, shared).await,
        }
    }

    async fn publish(&mut self, channel: &[u8], payload: &[u8], shard: bool, shared: &Shared) {
        if self.queue_publish(channel, payload, shard, shared) {
            self.hand_over(shared).await;
        }
    }

    /// The (S)PUBLISH fast path, taken before `handle` (whose future is large, as it
    /// serves every command): queues the publish for the hub; true when the batch is full
    /// and should be handed over now.
    fn try_publish(&mut self, chunk: &[u8], request: &Request, shared: &Shared) -> Option<bool> {
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
        Some(self.queue_publish(channel, payload, shard, shared))
    }

    /// Queues one (S)PUBLISH (or refuses one over a limit, counted); true when the batch
    /// is full.
    fn queue_publish(
        &mut self,
        channel: &[u8],
        payload: &[u8],
        shard: bool,
        shared: &Shared,
    ) -> bool {
        if !shared.permissions.may_publish(channel) {
            shared.refused.with_label_values(&["permission"]).inc();
            self.reply(Reply::error(refusal(&shared.service, channel)));
            return false;
        }
        let refused = if payload.len() > shared.max_message_bytes {
            Some((
                "message_size",
                format!(
                    "ERR message of {} bytes exceeds the mesh limit of {} bytes (maxMessageBytes)",
                    payload.len(),
                    shared.max_message_bytes
                ),
            ))
        } else {
            name_too_long(channel).map(|e| ("name_length", e))
        };
        if let Some((limit, error)) = refused {
            shared.refused.with_label_values(&[limit]).inc();
            shared.drops.with_label_values(&["too_large"]).inc();
            self.reply(Reply::error(error));
            return false;
        }
        let token = self.open_slot(Pending::Publish);
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
            let share = p.records.len().min(PUBLISH_QUEUE_BYTES) as u32;
            let queue = shared.publish_queue.clone();
            tokio::select! {
                permit = queue.acquire_many_owned(share) => p.queued = permit.ok(),
                // Killed while waiting: the connection ends, these publishes unanswered.
                _ = self.kill.notified() => {
                    self.kill.notify_one();
                    self.close = true;
                    return;
                }
            }
            let _ = shared.hub.send(HubCmd::Publish(self.id, p)).await;
        }
    }
}
