//! The hub's side of its sessions' links: finding and opening one (in a task, see
//! `session::connect`), the greeting on a new link, what the transmitter sends back,
//! liveness and moves, and flushing what each session owes its transmitter.

use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::FutureExt;
use thynapse_process::{Ready, SidecarReady, Status};
use thynapse_protocol::batch::{decode_acks, decode_envelopes};
use thynapse_protocol::frame::CommandFrame;
use thynapse_protocol::room::room_of;
use thynapse_protocol::wire::{self, cmd, Interest, Op};
use zeromq::ZmqMessage;

use super::delivery::Subscriptions;
use super::{Hub, HubConfig, CONFIRM_BOUND_EXPIRIES, ROOM_IDLE};
use crate::api::Out;
use crate::frames::json_frame;
use crate::session::{self, ConnectPlan, Heard, LinkEvent, Session, SessionKey, Via};

impl Hub {
    /// Starts a task that finds a transmitter for the session and links to it.
    pub(super) fn start_connect(&mut self, key: SessionKey) {
        self.generation += 1;
        let generation = self.generation;
        let wait_for_preferred = !self.ready_printed && self.started.elapsed() < self.cfg.expiry;
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(avoid) = s.begin_connect(generation) else {
            return;
        };
        let plan = ConnectPlan {
            key: key.clone(),
            generation,
            mesh: self.cfg.mesh.clone(),
            rendezvous: self.cfg.rendezvous.clone(),
            heartbeat: self.cfg.heartbeat,
            expiry: self.cfg.expiry,
            avoid,
            prefer: if key.is_none() {
                self.cfg.prefer.clone()
            } else {
                None
            },
            wait_for_preferred,
            max_message_bytes: self.cfg.max_message_bytes,
            spread: session::spread(&self.id, &key),
            auth: self
                .cfg
                .service_key
                .clone()
                .map(|k| (k, self.cfg.identity.clone())),
            encrypt: self.cfg.encrypt,
        };
        tokio::spawn(session::connect(plan, self.link_tx.clone()));
    }

    pub(super) fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Admitted(key, generation) => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.placed(generation);
                }
            }
            LinkEvent::Failed {
                key,
                generation,
                refused,
                avoid,
            } => self.on_failed(key, generation, refused, avoid),
            LinkEvent::Connected {
                key,
                generation,
                name,
                sender,
            } => self.on_connected(key, generation, name, sender),
            LinkEvent::Closed(key, generation) => {
                let Some(s) = self.sessions.get_mut(&key) else {
                    return;
                };
                if let Some(name) = s.link_closed(generation) {
                    tracing::warn!(transmitter = %name, room = ?s.room, "link to transmitter closed");
                    self.start_connect(key);
                }
            }
            LinkEvent::Message(key, generation, msg) => {
                self.on_message(key, generation, msg, Instant::now())
            }
        }
    }

    pub(super) fn on_failed(
        &mut self,
        key: SessionKey,
        generation: u64,
        refused: Option<String>,
        avoid: Option<String>,
    ) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        if !s.connect_failed(generation, avoid) {
            return;
        }
        match refused {
            Some(error) if key.is_some() => {
                tracing::warn!(room = ?s.room, "room refused: {error}");
                let mut s = self.sessions.remove(&key).expect("present");
                s.admit(Err(error.clone()));
                let mut released = Vec::new();
                s.confirm.release_all(&mut released);
                for (client, token) in released {
                    self.confirmed(client, token);
                }
                let (replies, messages, bytes) = s.abandon();
                self.unacked -= messages;
                self.unacked_bytes -= bytes;
                for (client, first, n) in replies {
                    for token in first..first + u64::from(n) {
                        let result = Err(error.clone());
                        self.send_to(client, Out::Published { token, result });
                    }
                }
                self.metrics.rooms.set(self.sessions.len() as i64 - 1);
            }
            // The rendezvous did not answer in time: subscribers go ahead (as Redis
            // subscriptions always do) and the session attaches as soon as it can.
            _ => s.admit(Ok(())),
        }
    }

    /// A new link: HELO, every subscription of the session, then (at the next flush)
    /// every publish not yet acknowledged.
    pub(super) fn on_connected(
        &mut self,
        key: SessionKey,
        generation: u64,
        name: String,
        sender: thynapse_link::LinkSender,
    ) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let hello = hello(&self.cfg, s);
        let snapshot = snapshot(&self.subs, &key);
        if s.linked(generation, name, sender, hello, snapshot)
            && key.is_none()
            && self.ready_printed
        {
            self.metrics.reconnects.inc();
        }
    }

    pub(super) fn on_message(
        &mut self,
        key: SessionKey,
        generation: u64,
        msg: ZmqMessage,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(frame) = msg.get(0).and_then(|f| CommandFrame::parse(f).ok()) else {
            tracing::warn!("unreadable frame from the transmitter");
            return;
        };
        let via = match s.heard(generation, now, self.cfg.expiry) {
            Heard::Via(via) => via,
            Heard::NotOurs => return,
            Heard::Stale(name) => {
                let dropped = match (&frame.cmd, msg.get(1)) {
                    (cmd::DLVR, Some(body)) => decode_envelopes(body).map_or(0, |(_, e)| e.count()),
                    _ => 0,
                };
                self.metrics
                    .drops
                    .with_label_values(&["stale_link"])
                    .inc_by(dropped as u64);
                tracing::warn!(transmitter = %name, room = ?s.room, dropped, "link silent past the expiry (paused?): letting it go with what it carried");
                if s.needs_link() {
                    self.start_connect(key);
                }
                return;
            }
        };
        match &frame.cmd {
            cmd::DLVR => {
                let Some(body) = msg.get(1).cloned() else {
                    return;
                };
                match decode_envelopes(&body) {
                    Ok((batch, envelopes)) => {
                        s.received(via, batch, body.len());
                        self.deliver(envelopes, body.len());
                    }
                    Err(e) => tracing::warn!("bad DLVR batch: {e}"),
                }
            }
            cmd::ACKS => {
                let Some(body) = msg.get(1).cloned() else {
                    return;
                };
                if let Ok((first, counts)) = decode_acks(&body) {
                    self.acknowledge(&key, first, &counts);
                }
            }
            cmd::WLCM => {
                s.welcomed();
                if let Ok(w) = frame.decode_json::<wire::Welcome>() {
                    if key.is_some() {
                        tracing::debug!(transmitter = %w.name, room = ?s.room, "room session linked");
                        return;
                    }
                    tracing::info!(transmitter = %w.name, "connected to transmitter");
                    let info = SidecarReady {
                        transmitter: w.name,
                        resp: self.cfg.resp.to_string(),
                        metrics: self.cfg.metrics_url.clone(),
                        id: self.id,
                    };
                    if !self.ready_printed {
                        self.ready_printed = true;
                        Status::Ready(Ready::Sidecar(info)).print();
                    } else {
                        Status::Moved(info).print();
                    }
                }
            }
            cmd::MOVE if via == Via::Current => {
                tracing::info!(room = ?s.room, "transmitter asks this session to move");
                s.move_away(Instant::now() + self.cfg.expiry);
                self.start_connect(key);
            }
            cmd::SUBD if via == Via::Current => {
                if let Ok(wire::SubsSync { sync: Some(n) }) = frame.decode_json() {
                    let mut released = Vec::new();
                    s.confirm.confirm(n, &mut released);
                    for (client, token) in released {
                        self.confirmed(client, token);
                    }
                }
            }
            cmd::ERRR if via == Via::Current && is_unknown_cell(&frame) => {
                let hello = hello(&self.cfg, s);
                if s.rejoin(hello, snapshot(&self.subs, &key)) {
                    tracing::warn!(room = ?s.room, "the transmitter dropped this session (silent too long): greeting it again");
                }
            }
            cmd::ERRR => tracing::warn!(
                "transmitter error: {}",
                String::from_utf8_lossy(&frame.payload)
            ),
            _ => {}
        }
    }

    pub(super) fn acknowledge(&mut self, key: &SessionKey, first: u64, counts: &[u32]) {
        let mut done = Vec::new();
        if let Some(s) = self.sessions.get_mut(key) {
            let (messages, bytes) = s.acknowledge(first, counts, &mut done);
            self.unacked -= messages;
            self.unacked_bytes -= bytes;
        }
        // One hand-over per client and acknowledgement frame, not one per publish.
        let mut i = 0;
        while i < done.len() {
            let client = done[i].0;
            let mut acks = Vec::new();
            while i < done.len() && done[i].0 == client {
                acks.push((done[i].1, done[i].2 as i64));
                i += 1;
            }
            self.send_to(client, Out::Acked(acks));
        }
    }

    pub(super) async fn housekeeping(&mut self, now: Instant) {
        let oversized = session::WIRE_OVERSIZED.swap(0, Ordering::Relaxed);
        self.metrics
            .refused
            .with_label_values(&["wire_message_bytes"])
            .inc_by(oversized);
        let mut reconnect = Vec::new();
        let mut idle = Vec::new();
        let mut released = Vec::new();
        for (key, s) in self.sessions.iter_mut() {
            let expired =
                s.confirm
                    .expire(now, CONFIRM_BOUND_EXPIRIES * self.cfg.expiry, &mut released);
            if expired > 0 {
                tracing::warn!(room = ?s.room, expired, "subscriptions confirmed before the mesh knew them (transmitter unreachable or slow)");
                self.metrics.confirm_timeouts.inc_by(expired as u64);
            }
            let tick = s.tick(now, self.cfg.expiry);
            if let Some((mut previous, last)) = tick.farewell {
                for m in last {
                    let _ = previous.send(m).await;
                }
            }
            if let Some(name) = tick.silent {
                tracing::warn!(transmitter = %name, room = ?s.room, "transmitter silent; moving");
            }
            if let Some(link) = s.sender(Via::Current) {
                if let Some(credit) = tick.credit {
                    let _ = link.send(credit).await;
                }
                if let Some(ping) = tick.ping {
                    // Never wait on a full link for a ping: silence is what it tests.
                    let _ = link.send(ping).now_or_never();
                }
            }
            if let Some(room) = key {
                let unused = s.settled()
                    && s.waiting.is_empty()
                    && !s.confirm.any_waiting()
                    && !self.subs.shard.keys().any(|c| room_of(c) == &room[..]);
                if unused && now.duration_since(s.last_used) > ROOM_IDLE {
                    idle.push(key.clone());
                    continue;
                }
            }
            if s.needs_link() {
                reconnect.push(key.clone());
            }
        }
        for (client, token) in released {
            self.confirmed(client, token);
        }
        for key in idle {
            if let Some(mut s) = self.sessions.remove(&key) {
                tracing::debug!(room = ?s.room, "closing an idle room session");
                let last = s.goodbye();
                if let Some(link) = s.sender(Via::Current) {
                    for m in last {
                        let _ = link.send(m).await;
                    }
                }
            }
            self.metrics.rooms.set(self.sessions.len() as i64 - 1);
        }
        for key in reconnect {
            self.start_connect(key);
        }
    }

    pub(super) async fn flush(&mut self) {
        let mut out = std::mem::take(&mut self.outbox);
        for s in self.sessions.values_mut() {
            s.outgoing(&mut out);
            for (via, m) in out.drain(..) {
                if let Some(link) = s.sender(via) {
                    let _ = link.send(m).await;
                }
            }
        }
        self.outbox = out;
    }
}

/// Whether an `ERRR` says the transmitter does not know the session ("unknown cell").
fn is_unknown_cell(frame: &CommandFrame) -> bool {
    frame
        .decode_json::<wire::ErrorReply>()
        .is_ok_and(|e| e.error.starts_with("unknown cell"))
}

/// The session's `HELO`.
fn hello(cfg: &HubConfig, s: &Session) -> ZmqMessage {
    let hello = wire::Hello {
        id: s.id,
        service: cfg.service.clone(),
        rules: cfg.rules.clone(),
        events: wire::Events::Dealer,
        token: None,
        room: s.room.clone(),
    };
    json_frame(cmd::HELO, &hello)
}

/// Every subscription of the session `key`, as its link's first `SUBS` carries them.
fn snapshot<'a>(subs: &'a Subscriptions, key: &SessionKey) -> Vec<(Op, Interest, &'a [u8])> {
    match key {
        None => subs
            .channels
            .keys()
            .map(|c| (Op::Add, Interest::Channel, &c[..]))
            .chain(
                subs.patterns
                    .keys()
                    .map(|p| (Op::Add, Interest::Pattern, &p[..])),
            )
            .collect(),
        Some(room) => subs
            .shard
            .keys()
            .filter(|c| room_of(c) == &room[..])
            .map(|c| (Op::Add, Interest::ShardChannel, &c[..]))
            .collect(),
    }
}
