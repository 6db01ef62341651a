//! What a receiver that is gone was sent and never credited. An anycatch message promises
//! one cell of its Service, not a particular cell: it goes to another cell of the Service
//! when there is one (the seed's "delivered to precisely one cell"; a cell that did take
//! it and died before crediting makes this at least once). The rest is counted lost, once
//! per cell that loses it (a PUBLISH's count is in cells, and so are drops).
//!
//! A copy forwarded to a peer for its anycatch target also reaches that peer's multicatch
//! cells for the channel, which drop it as a second copy of `(origin, seq)`.

use std::sync::Arc;

use bytes::Bytes;
use thynapse_protocol::batch::decode_envelopes;
use thynapse_protocol::Thid;

use super::dispatch::Message;
use super::Transmitter;
use crate::metrics::DropReason;
use crate::routing::{Location, PeerId};

/// Who was to take the messages: a local cell, or every cell behind a peer.
#[derive(Clone, Copy)]
pub(super) enum Gone {
    Cell(Thid),
    Peer(PeerId),
}

/// For one message: the Services whose anycatch pick it was, and how many cells (the
/// multicatch cells there) lose it whatever happens.
struct Plan {
    services: Vec<Arc<str>>,
    lost: u64,
}

impl Transmitter {
    /// Reads what `gone` was never credited for, while the table still knows its cells.
    /// Call [`Transmitter::redeliver`] with the result once they are removed.
    pub(super) fn plan_redelivery(&mut self, gone: Gone, frames: Vec<Bytes>) -> Redelivery {
        let mut plans = Vec::new();
        for frame in &frames {
            let Ok((_, envelopes)) = decode_envelopes(frame) else {
                continue; // Written by us; cannot happen.
            };
            for e in envelopes {
                let plan = match gone {
                    Gone::Cell(id) => {
                        let service = self.table.anycatch_service(Location::Local, &id, e.channel);
                        Plan {
                            lost: u64::from(service.is_none()),
                            services: service.into_iter().collect(),
                        }
                    }
                    Gone::Peer(peer) => {
                        let at = Location::Peer(peer);
                        let (mut services, mut lost) = (Vec::new(), 0u64);
                        for t in e.targets() {
                            match self.table.anycatch_service(at, &t, e.channel) {
                                Some(service) => services.push(service),
                                None => lost += 1,
                            }
                        }
                        let cells = u64::from(self.table.multicatch_at(e.kind, e.channel, peer));
                        // Sent for multicatch cells that have all left since: one, at least.
                        lost += if e.targets().len() == 0 {
                            cells.max(1)
                        } else {
                            cells
                        };
                        Plan { services, lost }
                    }
                };
                plans.push(plan);
            }
        }
        Redelivery { frames, plans }
    }

    /// Sends each anycatch message of `r` to another cell of its Service, and counts under
    /// `reason` every cell that loses a message.
    pub(super) fn redeliver(&mut self, r: Redelivery, reason: DropReason) {
        let mut plans = r.plans.into_iter();
        let mut dests = Vec::new();
        let (mut lost, mut again) = (0u64, 0u64);
        self.table.start_batch();
        for frame in &r.frames {
            let Ok((_, envelopes)) = decode_envelopes(frame) else {
                continue;
            };
            for e in envelopes {
                let Some(plan) = plans.next() else { break };
                let m = Message::of(&e);
                lost += plan.lost;
                for service in &plan.services {
                    // Queued, or dropped and counted where it failed (or no cell left).
                    let queued = match self.table.pick_again(e.kind, e.channel, service) {
                        Some((Location::Local, cell)) => self.deliver_local(cell, &m, &mut dests),
                        Some((Location::Peer(p), cell)) => {
                            self.forward(p, &m, &[cell], false, &mut dests)
                        }
                        None => {
                            lost += 1;
                            false
                        }
                    };
                    again += u64::from(queued);
                }
            }
        }
        self.metrics.drop(reason, lost);
        self.metrics.redelivered.inc_by(again);
        if again > 0 {
            tracing::info!(
                again,
                lost,
                "anycatch messages of a receiver that is gone sent to other cells"
            );
        }
    }
}

/// Messages never credited by a receiver that is gone, and what to do with each.
pub(super) struct Redelivery {
    frames: Vec<Bytes>,
    plans: Vec<Plan>,
}
