//! Cell sessions: a cell (a sidecar's session, or any libzmq client) says HELO, changes
//! its interest (SUBS), publishes (PUBS, EVNT), credits deliveries (CRED) and leaves
//! (QUIT, or silence past the expiry).

use std::sync::Arc;

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use thynapse_protocol::permissions::Permissions;

use bytes::Bytes;
use thynapse_protocol::batch::{decode_publish_records, decode_publishes, Kind};
use thynapse_protocol::frame::{CommandFrame, Encoding, FrameError};
use thynapse_protocol::limits::MAX_INTEREST_BYTES;
use thynapse_protocol::room::room_of;
use thynapse_protocol::wire::{self, cmd, Events, Interest, Op};
use thynapse_protocol::Thid;

use super::dispatch::{HeldBatch, Message};
use super::redeliver::Gone;
use super::{error_reply, reply_json, Transmitter};
use crate::backpressure::{Link, Progress};
use crate::metrics::DropReason;
use crate::outbox::Outbox;
use crate::routing::Location;

pub(super) struct LocalCell {
    pub(super) identity: Bytes,
    pub(super) events: Events,
    pub(super) outbox: Outbox,
    pub(super) last_seen: Instant,
    /// Highest sequence number this cell used, so EVNT numbers continue after PUBS ones.
    pub(super) last_seq: u64,
    /// A room session carries the shard channels of this room only.
    pub(super) room: Option<String>,
    /// What its Service may publish and subscribe to, as its connection proved; None:
    /// everything.
    pub(super) permissions: Option<Arc<Permissions>>,
}

/// Why a cell left (logged; only a loss is counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Leaving {
    /// It said QUIT: nothing it was sent is lost with it.
    Quit,
    /// Silent past the expiry.
    Expired,
    /// It said HELO under another id on the same connection.
    Replaced,
    /// Its connection could not be written to.
    Unreachable,
}

/// The answer to a session this transmitter does not know: it greets again (HELO, or
/// PEER for a transmitter's link).
pub(super) const UNKNOWN_CELL: &str = "unknown cell: send J HELO first";

/// A Service's name (a Kubernetes name) and its delivery rules, at most.
const MAX_SERVICE_NAME: usize = 253;
const MAX_RULES_BYTES: usize = 64 * 1024;

impl Transmitter {
    /// A command on our ROUTER from a connection that is not a known peer's: a cell's, or
    /// a peer introducing itself. `more` holds the frames after the body (the further
    /// parts of a multipart `PUBS`).
    pub(super) fn on_cell(
        &mut self,
        identity: &Bytes,
        frame: CommandFrame,
        body: Option<Bytes>,
        more: VecDeque<Bytes>,
    ) -> Result<(), FrameError> {
        match &frame.cmd {
            cmd::HELO => return self.on_hello(identity, frame.decode_json()?),
            cmd::PEER => return self.on_peer_hello(identity, frame.decode_json()?),
            _ => {}
        }
        let Some(&id) = self.identities.get(identity) else {
            if &frame.cmd == cmd::PUBS || &frame.cmd == cmd::EVNT {
                self.metrics.drop(DropReason::UnknownSender, 1);
            }
            self.replies.push(error_reply(identity, UNKNOWN_CELL));
            return Ok(());
        };
        let now = Instant::now();
        if let Some(cell) = self.cells.get_mut(&id) {
            if now.duration_since(cell.last_seen) > self.expiry {
                // Silent past the expiry (it or we were paused), read before the expiry
                // check ran: it is dropped as it would have been. It has moved on or will
                // greet again, and sends again what was not acknowledged, so this is not
                // routed (another transmitter may have routed it already).
                self.drop_cell(id, Leaving::Expired);
                self.replies.push(error_reply(identity, UNKNOWN_CELL));
                return Ok(());
            }
            cell.last_seen = now;
        }
        match &frame.cmd {
            cmd::PING => self
                .replies
                .push(reply_json(identity, cmd::PONG, &serde_json::json!({}))),
            cmd::SUBS => {
                let body = body.ok_or_else(|| FrameError::MissingPayload("SUBS".into()))?;
                self.on_subs(id, identity, frame.decode_json()?, body)?;
            }
            cmd::PUBS => {
                let body = body.ok_or_else(|| FrameError::MissingPayload("PUBS".into()))?;
                self.on_publishes(id, identity, body, more)?;
            }
            cmd::EVNT => self.on_event(id, identity, &frame, body)?,
            cmd::CRED => {
                let credit: wire::Credit = frame.decode_json()?;
                if let Some(cell) = self.cells.get_mut(&id) {
                    cell.outbox.credit(credit.batch);
                }
            }
            cmd::QUIT => self.drop_cell(id, Leaving::Quit),
            _ => return Err(FrameError::UnknownCommand(frame.cmd_str().to_string())),
        }
        Ok(())
    }

    /// Removes the subscriptions of local cell `id` that `p` does not allow.
    fn retain_permitted(&mut self, id: Thid, p: &Permissions) {
        let Some((_, _, subs)) = self.table.interest_of(&id) else {
            return;
        };
        let removals: Vec<_> = subs
            .into_iter()
            .filter(|(_, kind, name)| match kind {
                Interest::Pattern => !p.may_psubscribe(name),
                _ => !p.may_subscribe(name),
            })
            .map(|(_, kind, name)| (Op::Remove, kind, name))
            .collect();
        if !removals.is_empty() {
            self.table.apply(Location::Local, id, &removals);
        }
    }

    /// Subscriptions or publishes the connection's Service may not make: counted, and
    /// the connection told (`ERRR`), as Redis ACL words it.
    fn refuse_permission(&mut self, identity: &Bytes, refused: usize, what: &str) {
        self.metrics
            .refused
            .with_label_values(&["permission"])
            .inc_by(refused as u64);
        let error = format!(
            "NOPERM {refused} {what} refused: this Service may not make them (spec.permissions)"
        );
        self.replies.push(error_reply(identity, &error));
    }

    pub(super) fn on_hello(
        &mut self,
        identity: &Bytes,
        hello: wire::Hello,
    ) -> Result<(), FrameError> {
        if !self.proved(identity, Some(&hello.service)) {
            self.refuse(
                identity,
                "HELO refused: this connection proved another Service's key (AUTH)",
            );
            return Ok(());
        }
        if self.draining.is_some() {
            let reason = "draining".to_string();
            self.replies
                .push(reply_json(identity, cmd::MOVE, &wire::Reason { reason }));
            return Ok(());
        }
        if let Some(room) = hello.room.as_ref().filter(|r| !self.rooms.contains_key(*r)) {
            // Placement moved on (or this is a new instance): ask again.
            let reason = format!("room {room:?} is not hosted here");
            self.replies
                .push(reply_json(identity, cmd::MOVE, &wire::Reason { reason }));
            return Ok(());
        }
        let rules_bytes: usize = hello.rules.iter().map(|r| r.pattern.len() + 16).sum();
        if hello.service.len() > MAX_SERVICE_NAME || rules_bytes > MAX_RULES_BYTES {
            // Both travel in the cell's `CELL` to every peer, which must stay under the
            // wire limit.
            self.metrics.refused.with_label_values(&["hello"]).inc();
            self.replies.push(error_reply(
                identity,
                &format!("HELO refused: a service name is at most {MAX_SERVICE_NAME} bytes, its delivery rules at most {MAX_RULES_BYTES} bytes of patterns"),
            ));
            return Ok(());
        }
        if !self.cells.contains_key(&hello.id) && self.cells.len() >= self.args.max_cells {
            self.metrics.refused.with_label_values(&["cells"]).inc();
            let reason = format!("transmitter full ({} cells)", self.args.max_cells);
            self.replies
                .push(reply_json(identity, cmd::MOVE, &wire::Reason { reason }));
            return Ok(());
        }
        if self.gate.enabled() && self.id_of_another_service(&hello.id, &hello.service) {
            // Ids are not secret (every delivery carries its origin's): a cell of another
            // Service must not take one over, here or anywhere in the mesh.
            self.refuse(
                identity,
                "HELO refused: this cell id belongs to another Service",
            );
            return Ok(());
        }
        if self.gate.enabled() && hello.events == Events::Pub {
            // The PUB socket cannot authenticate its subscribers (the zeromq crate has no
            // CURVE): anyone reaching it would read these deliveries.
            self.refuse(identity, "HELO refused: events \"pub\" is not available in an authenticated mesh; use \"dealer\"");
            return Ok(());
        }
        if self.gate.enabled() {
            // A cell id belongs to the connection that proved it while that one is alive:
            // another connection may take it over only once it fell silent (a sidecar
            // reconnecting has stopped using its old link by then).
            let live_elsewhere = self.cells.get(&hello.id).is_some_and(|c| {
                c.identity != *identity
                    && Instant::now().duration_since(c.last_seen) < self.heartbeat * 2
            });
            if live_elsewhere {
                self.refuse(
                    identity,
                    "HELO refused: this cell id is in use on another live connection",
                );
                return Ok(());
            }
        }
        let permissions = self.permissions_of(identity);
        if let Some(old) = self.identities.insert(identity.clone(), hello.id) {
            if old != hello.id {
                self.drop_cell(old, Leaving::Replaced);
            }
        }
        let now = Instant::now();
        let cell = self.cells.entry(hello.id).or_insert_with(|| LocalCell {
            identity: identity.clone(),
            events: hello.events,
            outbox: Outbox::default(),
            last_seen: now,
            last_seq: 0,
            room: hello.room.clone(),
            permissions: None,
        });
        if cell.identity != *identity {
            // The same cell on a new connection.
            self.identities.remove(&cell.identity);
            cell.identity = identity.clone();
            // What was in flight on the old one is sent again on the new one: the cell
            // drops what it had already taken (receivers drop copies).
            cell.outbox.resend_unconfirmed();
        }
        cell.events = hello.events;
        cell.permissions = permissions.clone();
        cell.last_seen = now;
        cell.room = hello.room.clone();
        self.table
            .upsert_cell(Location::Local, hello.id, &hello.service, &hello.rules);
        self.table.rejoined(Location::Local, &hello.id);
        if let Some(p) = permissions {
            // A cell id taken over keeps its subscriptions: only those this connection's
            // permissions allow.
            self.retain_permitted(hello.id, &p);
        }
        self.dirty.insert(hello.id);
        self.metrics.cells.set(self.cells.len() as i64);
        tracing::info!(cell = %hello.id, service = %hello.service, "cell joined");
        let welcome = wire::Welcome {
            id: self.id,
            name: self.args.name.clone(),
            pub_endpoint: self.pub_endpoint.clone(),
            max_message_bytes: self.args.max_message_bytes,
            heartbeat_ms: self.heartbeat.as_millis() as u64,
        };
        self.replies.push(reply_json(identity, cmd::WLCM, &welcome));
        Ok(())
    }

    /// Interest changes; with a sync number, answered `SUBD` once every live peer has
    /// applied them (see `crate::interest_sync`).
    pub(super) fn on_subs(
        &mut self,
        id: Thid,
        identity: &Bytes,
        sync: wire::SubsSync,
        body: Bytes,
    ) -> Result<(), FrameError> {
        let mut changes = wire::decode_interest(body)?;
        let room = self.cells.get(&id).and_then(|c| c.room.clone());
        if let Some(p) = self.cells.get(&id).and_then(|c| c.permissions.clone()) {
            // Only a client bypassing its sidecar (which answers -NOPERM) gets here.
            let before = changes.len();
            changes.retain(|(op, kind, name)| {
                *op == Op::Remove
                    || match kind {
                        Interest::Pattern => p.may_psubscribe(name),
                        _ => p.may_subscribe(name),
                    }
            });
            let refused = before - changes.len();
            if refused > 0 {
                self.refuse_permission(identity, refused, "subscriptions");
            }
        }
        let before = changes.len();
        changes.retain(|(_, kind, name)| {
            *kind != Interest::ShardChannel
                || room
                    .as_deref()
                    .is_some_and(|r| room_of(name) == r.as_bytes())
        });
        if changes.len() != before {
            self.replies.push(error_reply(
                identity,
                "shard channels belong on the session of their room (HELO with \"room\")",
            ));
        }
        let refused = self
            .table
            .apply_within(Location::Local, id, &changes, MAX_INTEREST_BYTES)
            .unwrap_or(0);
        if refused > 0 {
            self.metrics
                .refused
                .with_label_values(&["interest_bytes"])
                .inc_by(refused as u64);
            self.replies.push(error_reply(
                identity,
                &format!(
                    "{refused} subscriptions refused: a cell subscribes to at most {MAX_INTEREST_BYTES} bytes of names"
                ),
            ));
        }
        self.dirty.insert(id);
        if let Some(n) = sync.sync {
            self.interest_sync.request(identity, n);
        }
        Ok(())
    }

    /// Whether `id` is known, here or at a peer, as a cell of another Service than `service`.
    fn id_of_another_service(&self, id: &Thid, service: &str) -> bool {
        std::iter::once(Location::Local)
            .chain(self.peers.keys().map(|p| Location::Peer(*p)))
            .filter_map(|at| self.table.service_of(at, id))
            .any(|s| s != service)
    }

    /// A publish batch. It may come in parts (each of whole records): all are checked
    /// before any message is routed, and what has no room is held.
    pub(super) fn on_publishes(
        &mut self,
        id: Thid,
        identity: &Bytes,
        body: Bytes,
        more: VecDeque<Bytes>,
    ) -> Result<(), FrameError> {
        let (first, head) = decode_publishes(&body)?;
        let mut records = vec![head];
        for part in &more {
            records.push(decode_publish_records(part)?);
        }
        // Sequence numbers are the sender's: every one of the batch must be a u64.
        let count: usize = records.iter().map(ExactSizeIterator::len).sum();
        if first.checked_add(count as u64).is_none() {
            return Err(FrameError::BadBatch("sequence numbers past 2^64"));
        }
        if let Some(p) = self.cells.get(&id).and_then(|c| c.permissions.clone()) {
            // The whole batch or nothing (a sidecar never sends what it may not).
            let refused = records
                .iter()
                .flat_map(|r| r.clone())
                .filter(|m| !p.may_publish(m.channel))
                .count();
            if refused > 0 {
                self.refuse_permission(identity, refused, "publishes");
                return Ok(());
            }
        }
        let source = Link::Cell(id);
        let mut progress = Progress::default();
        let routed = !self.held.is_holding(source)
            && self
                .route_publishes(
                    id,
                    identity,
                    first,
                    records.into_iter().flatten(),
                    &mut progress,
                    false,
                )
                .is_ok();
        if !routed {
            let mut parts = Vec::with_capacity(1 + more.len());
            parts.push(body);
            parts.extend(more);
            self.hold(source, identity, HeldBatch::Publish(parts), progress);
        }
        Ok(())
    }

    /// The seed protocol's single event (`J EVNT` with text, `B EVNT` with a payload
    /// frame), acknowledged `ACKD` with its THID and the cells it reached.
    pub(super) fn on_event(
        &mut self,
        id: Thid,
        identity: &Bytes,
        frame: &CommandFrame,
        body: Option<Bytes>,
    ) -> Result<(), FrameError> {
        let event: wire::Event = frame.decode_json()?;
        let payload = match (frame.enc, event.data, body) {
            (Encoding::Json, Some(data), _) => Bytes::from(data),
            (Encoding::Binary, _, Some(body)) => body,
            (Encoding::Binary, _, None) => return Err(FrameError::MissingPayload("B EVNT".into())),
            (Encoding::Json, None, _) => Bytes::new(),
        };
        let channel = Bytes::from(event.channel);
        if let Some(p) = self.cells.get(&id).and_then(|c| c.permissions.clone()) {
            if !p.may_publish(&channel) {
                self.refuse_permission(identity, 1, "publishes");
                return Ok(());
            }
        }
        let seq = self.cells.get_mut(&id).map_or(0, |c| {
            c.last_seq += 1;
            c.last_seq
        });
        let mut dests = Vec::new();
        self.table.start_batch();
        let message = Message {
            kind: Kind::Mesh,
            origin: &id,
            seq,
            ts: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            channel: &channel,
            payload: &payload,
        };
        let receivers = self.publish(&message, &mut dests, false).unwrap_or(0);
        let ack = wire::EventAck {
            thid: Thid::of_parts(&[&channel, &payload]),
            receivers,
        };
        self.ack_when_clear(identity, reply_json(identity, cmd::ACKD, &ack), dests);
        Ok(())
    }

    pub(super) fn drop_cell(&mut self, id: Thid, why: Leaving) {
        // Its held batches go too: its sidecar sends what was not acknowledged again.
        self.forget_held(Link::Cell(id));
        let mut redelivery = None;
        if let Some(mut cell) = self.cells.remove(&id) {
            self.identities.remove(&cell.identity);
            let unconfirmed = cell.outbox.take_unconfirmed();
            redelivery = Some(self.plan_redelivery(Gone::Cell(id), unconfirmed));
            tracing::info!(cell = %id, ?why, "cell left");
        }
        self.table.remove_cell(Location::Local, id);
        if let Some(r) = redelivery {
            let reason = match why {
                Leaving::Quit => DropReason::CellQuit,
                _ => DropReason::CellLost,
            };
            self.redeliver(r, reason);
        }
        self.dirty.insert(id);
        self.metrics.cells.set(self.cells.len() as i64);
    }

    /// Cells silent for one expiry are dropped.
    pub(super) fn expire_cells(&mut self, now: Instant) {
        let silent: Vec<Thid> = self
            .cells
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_seen) > self.expiry)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            self.drop_cell(id, Leaving::Expired);
        }
    }
}
