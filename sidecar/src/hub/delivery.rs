//! Delivery: the messages of a `DLVR` frame written as RESP pushes, straight from the
//! frame into one buffer per client, handed to each client once per frame.

use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashSet};
use std::time::Instant;
use thynapse_protocol::batch::{Envelopes, Kind};

use thynapse_protocol::dedup::SeqWindow;
use thynapse_protocol::glob;
use thynapse_protocol::wire::Interest;
use thynapse_protocol::Thid;

use super::Hub;
use crate::api::{now_us, ClientId, Out, SubKind};
use crate::resp::write_push;

/// The cell's subscriptions, each with the clients that hold it.
#[derive(Default)]
pub(super) struct Subscriptions {
    pub(super) channels: HashMap<Bytes, HashSet<ClientId>>,
    pub(super) patterns: HashMap<Bytes, HashSet<ClientId>>,
    pub(super) shard: HashMap<Bytes, HashSet<ClientId>>,
}

impl Subscriptions {
    /// The subscriptions of one kind, and what the transmitter calls that kind.
    pub(super) fn of(
        &mut self,
        kind: SubKind,
    ) -> (&mut HashMap<Bytes, HashSet<ClientId>>, Interest) {
        match kind {
            SubKind::Channel => (&mut self.channels, Interest::Channel),
            SubKind::Pattern => (&mut self.patterns, Interest::Pattern),
            SubKind::Shard => (&mut self.shard, Interest::ShardChannel),
        }
    }

    /// The clients a message on `channel` goes to, and as what.
    pub(super) fn targets_of<'a>(
        &'a self,
        kind: Kind,
        channel: &[u8],
        targets: &mut Vec<(ClientId, Target<'a>)>,
    ) {
        match kind {
            Kind::Shard => {
                if let Some(set) = self.shard.get(channel) {
                    targets.extend(set.iter().map(|c| (*c, Target::Shard)));
                }
            }
            Kind::Mesh => {
                if let Some(set) = self.channels.get(channel) {
                    targets.extend(set.iter().map(|c| (*c, Target::Channel)));
                }
                for (pattern, set) in &self.patterns {
                    if glob::matches(pattern, channel) {
                        targets.extend(set.iter().map(|c| (*c, Target::Pattern(pattern))));
                    }
                }
            }
        }
    }
}

/// Which kind of message a client gets for a delivery.
pub(super) enum Target<'a> {
    Channel,
    Shard,
    Pattern(&'a Bytes),
}

/// The pushes being written for one client during a delivery.
pub(super) struct Pushes {
    pub(super) client: ClientId,
    pub(super) resp3: bool,
    pub(super) bytes: BytesMut,
    pub(super) messages: u64,
    pub(super) payload_bytes: u64,
}

impl Pushes {
    fn new(client: ClientId, resp3: bool, capacity: usize) -> Self {
        Pushes {
            client,
            resp3,
            bytes: BytesMut::with_capacity(capacity),
            messages: 0,
            payload_bytes: 0,
        }
    }

    /// Writes one message as the push `target` calls for.
    fn write(&mut self, target: &Target, channel: &[u8], payload: &[u8]) {
        match target {
            Target::Channel => {
                write_push(&mut self.bytes, self.resp3, &[b"message", channel, payload])
            }
            Target::Shard => write_push(
                &mut self.bytes,
                self.resp3,
                &[b"smessage", channel, payload],
            ),
            Target::Pattern(pattern) => write_push(
                &mut self.bytes,
                self.resp3,
                &[b"pmessage", pattern, channel, payload],
            ),
        }
        self.messages += 1;
        self.payload_bytes += payload.len() as u64;
    }

    /// Hands the pushes to their client (or disconnects it, past its output limit).
    pub(super) fn send(self, hub: &mut Hub) {
        let out = Out::Pushes {
            resp3: self.resp3,
            bytes: self.bytes.freeze(),
        };
        if hub.send_to(self.client, out) {
            hub.metrics.messages_out.inc_by(self.messages);
            hub.metrics.bytes_out.inc_by(self.payload_bytes);
        }
    }
}

impl Hub {
    /// Hands the messages of one DLVR frame to the clients subscribed to them, written
    /// straight from the frame into each client's pushes.
    pub(super) fn deliver(&mut self, envelopes: Envelopes, frame_len: usize) {
        let now = now_us();
        let at = Instant::now();
        // Each client's pushes in one buffer, handed over once per frame.
        let mut pushes = std::mem::take(&mut self.pushes);
        let mut index = std::mem::take(&mut self.push_index);
        let mut last: Option<(Thid, &mut SeqWindow)> = None;
        let mut targets: Vec<(ClientId, Target)> = Vec::new();
        // Whether each target's subscription is still waiting for its confirmation.
        let mut held: Vec<bool> = Vec::new();
        let mut routed_for: Option<(Kind, &[u8])> = None;
        for e in envelopes {
            // Frames mostly carry runs from one origin: look its window up once per run.
            if last.as_ref().is_none_or(|(origin, _)| *origin != e.origin) {
                last = Some((e.origin, self.seen.window(e.origin, at)));
            }
            let (_, window) = last.as_mut().expect("set above");
            if !window.accept(e.seq) {
                self.metrics.duplicates.inc();
                continue;
            }
            self.latency.observe(now.saturating_sub(e.ts) as f64 / 1e6);
            // Frames mostly carry runs of one channel: its clients are found once per run.
            let same_channel = routed_for
                .as_ref()
                .is_some_and(|(kind, channel)| *kind == e.kind && *channel == e.channel);
            if !same_channel {
                routed_for = Some((e.kind, e.channel));
                targets.clear();
                self.subs.targets_of(e.kind, e.channel, &mut targets);
                // Messages of a subscription not confirmed yet wait for the confirmation.
                held.clear();
                held.extend(targets.iter().map(|(client, target)| {
                    let (kind, name) = match target {
                        Target::Channel => (SubKind::Channel, e.channel),
                        Target::Shard => (SubKind::Shard, e.channel),
                        Target::Pattern(p) => (SubKind::Pattern, &p[..]),
                    };
                    !self.joining.is_empty()
                        && self
                            .joining
                            .contains_key(&(*client, kind, Bytes::copy_from_slice(name)))
                }));
            }
            for ((client, target), held) in targets.iter().zip(&held) {
                if *held {
                    let Some(h) = self.clients.get(client) else {
                        continue;
                    };
                    let p = self
                        .held_pushes
                        .entry(*client)
                        .or_insert_with(|| Pushes::new(*client, h.resp3, 0));
                    p.write(target, e.channel, e.payload);
                    continue;
                }
                let i = match index.get(client) {
                    Some(&i) => i,
                    None => {
                        let Some(h) = self.clients.get(client) else {
                            continue;
                        };
                        index.insert(*client, pushes.len());
                        // Pushes take about as much room as the frame's records.
                        pushes.push(Pushes::new(*client, h.resp3, frame_len));
                        pushes.len() - 1
                    }
                };
                pushes[i].write(target, e.channel, e.payload);
            }
        }
        self.latency.flush();
        index.clear();
        self.push_index = index;
        for p in pushes.drain(..) {
            p.send(self);
        }
        self.pushes = pushes;
        // Held messages count against the output limit like queued ones.
        let limit = self.cfg.client_output_buffer_bytes;
        let over: Vec<ClientId> = self
            .held_pushes
            .iter()
            .filter(|(_, p)| p.bytes.len() > limit)
            .map(|(c, _)| *c)
            .collect();
        for client in over {
            if let Some(p) = self.held_pushes.remove(&client) {
                p.send(self);
            }
        }
    }
}
