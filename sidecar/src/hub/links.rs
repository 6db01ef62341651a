//! The hub's side of its sessions' links: finding and opening one (in a task, see
//! `session::connect`), the greeting on a new link, what the transmitter sends back,
//! liveness and moves, and flushing what each session owes its transmitter.

use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use thynapse_protocol::batch::{decode_acks, decode_envelopes};
use thynapse_protocol::frame::CommandFrame;
use thynapse_protocol::room::room_of;
use thynapse_protocol::wire::{self, cmd, Interest, Op};
use thynapse_protocol::Thid;
use zeromq::{SocketSend, ZmqMessage};

use super::{binary_frame, binary_frame_with, json_frame, Hub, CONFIRM_BOUND_EXPIRIES, ROOM_IDLE};
use crate::api::Out;
use crate::session::{self, ConnectPlan, Link, LinkEvent, SessionKey};

impl Hub {
    /// Starts a task that finds a transmitter for the session and links to it.
    pub(super) fn start_connect(&mut self, key: SessionKey) {
        self.generation += 1;
        let generation = self.generation;
        let wait_for_preferred = !self.ready_printed && self.started.elapsed() < self.cfg.expiry;
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        if s.connecting.is_some() {
            return;
        }
        s.connecting = Some(generation);
        let plan = ConnectPlan {
            key: key.clone(),
            generation,
            mesh: self.cfg.mesh.clone(),
            rendezvous: self.cfg.rendezvous.clone(),
            heartbeat: self.cfg.heartbeat,
            expiry: self.cfg.expiry,
            avoid: s.avoid.clone(),
            prefer: if key.is_none() {
                self.cfg.prefer.clone()
            } else {
                None
            },
            wait_for_preferred,
            spread: {
                let mix = Thid::of_parts(&[&self.id.0, key.as_deref().unwrap_or_default()]);
                u64::from_le_bytes(mix.0[..8].try_into().expect("8 bytes"))
            },
        };
        tokio::spawn(session::connect(plan, self.link_tx.clone()));
    }

    pub(super) fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Admitted(key, generation) => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    if s.connecting == Some(generation) {
                        s.admit(Ok(()));
                    }
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
                if s.link.as_ref().is_some_and(|l| l.generation == generation) {
                    let name = s.link.take().map(|l| l.name).unwrap_or_default();
                    tracing::warn!(transmitter = %name, room = ?s.room, "link to transmitter closed");
                    s.avoid = vec![name];
                    self.start_connect(key);
                }
            }
            LinkEvent::Message(key, generation, msg) => self.on_message(key, generation, msg),
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
        if s.connecting != Some(generation) {
            return;
        }
        s.connecting = None;
        if let Some(name) = avoid {
            s.avoid = vec![name];
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
        sender: zeromq::DealerSendHalf,
    ) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        if s.connecting != Some(generation) {
            return;
        }
        s.connecting = None;
        let hello = wire::Hello {
            id: s.id,
            service: self.cfg.service.clone(),
            rules: self.cfg.rules.clone(),
            events: wire::Events::Dealer,
            token: None,
            room: s.room.clone(),
        };
        let mut msgs = vec![json_frame(cmd::HELO, &hello)];
        let subs: Vec<(Op, Interest, &[u8])> = match &key {
            None => self
                .subs
                .channels
                .keys()
                .map(|c| (Op::Add, Interest::Channel, &c[..]))
                .chain(
                    self.subs
                        .patterns
                        .keys()
                        .map(|p| (Op::Add, Interest::Pattern, &p[..])),
                )
                .collect(),
            Some(room) => self
                .subs
                .shard
                .keys()
                .filter(|c| room_of(c) == &room[..])
                .map(|c| (Op::Add, Interest::ShardChannel, &c[..]))
                .collect(),
        };
        // The snapshot confirms every subscription held so far on this new link.
        if !subs.is_empty() || s.confirm.any_waiting() {
            let sync = wire::SubsSync {
                sync: Some(s.confirm.next_number()),
            };
            msgs.push(binary_frame_with(
                cmd::SUBS,
                &sync,
                wire::encode_interest(subs),
            ));
        }
        // Changes queued for the old link are part of the snapshot just sent.
        s.interest.clear();
        s.unsent_from = 0;
        if key.is_none() && self.ready_printed {
            self.metrics.reconnects.inc();
        }
        s.link = Some(Link {
            generation,
            name,
            sender,
            last_heard: Instant::now(),
            credit: Default::default(),
            greeting: msgs,
        });
    }

    pub(super) fn on_message(&mut self, key: SessionKey, generation: u64, msg: ZmqMessage) {
        let Some(s) = self.sessions.get_mut(&key) else {
            return;
        };
        let is_current = s.link.as_ref().is_some_and(|l| l.generation == generation);
        let link = if is_current {
            s.link.as_mut()
        } else {
            s.old_link
                .as_mut()
                .filter(|(l, _)| l.generation == generation)
                .map(|(l, _)| l)
        };
        let Some(link) = link else { return };
        link.last_heard = Instant::now();
        let Some(frame) = msg.get(0).and_then(|f| CommandFrame::parse(f).ok()) else {
            tracing::warn!("unreadable frame from the transmitter");
            return;
        };
        match &frame.cmd {
            cmd::DLVR => {
                let Some(body) = msg.get(1).cloned() else {
                    return;
                };
                match decode_envelopes(&body) {
                    Ok((batch, envelopes)) => {
                        link.credit.received(batch, body.len());
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
                if let Ok(w) = frame.decode_json::<wire::Welcome>() {
                    if key.is_some() {
                        tracing::debug!(transmitter = %w.name, room = ?s.room, "room session linked");
                        return;
                    }
                    tracing::info!(transmitter = %w.name, "connected to transmitter");
                    let info = serde_json::json!({"transmitter": w.name, "resp": self.cfg.resp.to_string(), "metrics": self.cfg.metrics_url, "id": self.id});
                    if !self.ready_printed {
                        self.ready_printed = true;
                        println!("READY {info}");
                    } else {
                        println!("MOVED {info}");
                    }
                }
            }
            cmd::MOVE if is_current => {
                tracing::info!(room = ?s.room, "transmitter asks this session to move");
                if let Some(link) = s.link.take() {
                    s.avoid = vec![link.name.clone()];
                    // Keep reading the old link for one expiry: peers learn where this
                    // session went before the old transmitter stops delivering to it.
                    s.old_link = Some((link, Instant::now() + self.cfg.expiry));
                }
                self.start_connect(key);
            }
            cmd::SUBD if is_current => {
                if let Ok(wire::SubsSync { sync: Some(n) }) = frame.decode_json() {
                    let mut released = Vec::new();
                    s.confirm.confirm(n, &mut released);
                    for (client, token) in released {
                        self.confirmed(client, token);
                    }
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

    pub(super) async fn housekeeping(&mut self) {
        let now = Instant::now();
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
            if let Some((old, until)) = s.old_link.as_mut() {
                if now >= *until {
                    let _ = old
                        .sender
                        .send(json_frame(cmd::QUIT, &serde_json::json!({})))
                        .await;
                    s.old_link = None;
                }
            }
            if let Some(link) = s.link.as_mut() {
                if now.duration_since(link.last_heard) > self.cfg.expiry {
                    tracing::warn!(transmitter = %link.name, room = ?s.room, "transmitter silent; moving");
                    s.avoid = vec![link.name.clone()];
                    s.link = None;
                } else {
                    credit(link, true).await;
                    let _ = link
                        .sender
                        .send(json_frame(cmd::PING, &serde_json::json!({})))
                        .now_or_never();
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
            if s.link.is_none() && s.connecting.is_none() {
                reconnect.push(key.clone());
            }
        }
        for (client, token) in released {
            self.confirmed(client, token);
        }
        for key in idle {
            if let Some(mut s) = self.sessions.remove(&key) {
                tracing::debug!(room = ?s.room, "closing an idle room session");
                if let Some(link) = s.link.as_mut() {
                    let _ = link
                        .sender
                        .send(json_frame(cmd::QUIT, &serde_json::json!({})))
                        .await;
                }
            }
            self.metrics.rooms.set(self.sessions.len() as i64 - 1);
        }
        for key in reconnect {
            self.start_connect(key);
        }
    }

    pub(super) async fn flush(&mut self) {
        for s in self.sessions.values_mut() {
            if let Some((old, _)) = s.old_link.as_mut() {
                credit(old, true).await;
            }
            if s.link.is_some() {
                s.close();
            }
            let Some(link) = s.link.as_mut() else {
                continue;
            };
            for m in std::mem::take(&mut link.greeting) {
                let _ = link.sender.send(m).await;
            }
            if !s.interest.is_empty() {
                let body =
                    wire::encode_interest(s.interest.iter().map(|(op, k, n)| (*op, *k, &n[..])));
                s.interest.clear();
                let sync = wire::SubsSync {
                    sync: Some(s.confirm.next_number()),
                };
                let _ = link
                    .sender
                    .send(binary_frame_with(cmd::SUBS, &sync, body))
                    .await;
            }
            while s.unsent_from < s.unacked.len() {
                let batch = &s.unacked[s.unsent_from];
                let mut m = binary_frame(
                    cmd::PUBS,
                    Bytes::copy_from_slice(&batch.first_seq.to_le_bytes()),
                );
                for part in &batch.parts {
                    m.push_back(part.clone());
                }
                if link.sender.send(m).await.is_err() {
                    break;
                }
                s.unsent_from += 1;
            }
            credit(link, false).await;
        }
    }
}

/// Sends the credit owed on `link` if enough is (or anything is, when `all`).
async fn credit(link: &mut Link, all: bool) {
    if let Some(batch) = link.credit.take(all) {
        let _ = link
            .sender
            .send(json_frame(cmd::CRED, &wire::Credit { batch }))
            .await;
    }
}
