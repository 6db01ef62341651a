use prometheus::local::LocalIntCounter;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use thynapse_telemetry::{counter, counter_vec, gauge};

/// The transmitter's Prometheus metrics (`thynapse_transmitter_*`).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub messages_in: IntCounterVec,
    pub messages_out: IntCounterVec,
    pub bytes_in: IntCounterVec,
    pub bytes_out: IntCounterVec,
    pub drops: IntCounterVec,
    pub redelivered: IntCounter,
    pub malformed: IntCounter,
    pub cells: IntGauge,
    pub peers: IntGauge,
    pub peer_reconnects: IntCounter,
    pub peers_forgotten: IntCounterVec,
    pub room_messages: IntCounterVec,
    pub rooms: IntGauge,
    pub held_bytes: IntGauge,
    pub sync_gave_up: IntCounterVec,
    pub refused: IntCounterVec,
}

/// Why a peer was forgotten: the `reason` label of
/// `thynapse_transmitter_peers_forgotten_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgotten {
    /// It said LEAV.
    Left,
    /// Both its links closed (killed, restarted, or cut off by a reset).
    Closed,
    /// Something waited on it and it said nothing for an expiry.
    Silent,
    /// No rendezvous point listed it for an expiry, and it said nothing.
    Unlisted,
    /// This transmitter was paused past the expiry: every peer is forgotten.
    Paused,
}

impl Forgotten {
    pub const ALL: [Forgotten; 5] = [
        Forgotten::Left,
        Forgotten::Closed,
        Forgotten::Silent,
        Forgotten::Unlisted,
        Forgotten::Paused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Forgotten::Left => "left",
            Forgotten::Closed => "closed",
            Forgotten::Silent => "silent",
            Forgotten::Unlisted => "unlisted",
            Forgotten::Paused => "paused",
        }
    }
}

/// Where a message was dropped, and why: the `reason` label of
/// `thynapse_transmitter_drops_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Larger than `maxMessageBytes`.
    TooLarge,
    /// A cell's link buffer was full past the expiry.
    CellBacklog,
    /// A peer's link buffer was full past the expiry.
    PeerBacklog,
    /// Sent to a cell that left without taking it.
    CellLost,
    /// Sent to a cell that said QUIT before taking it: after a move, most of these are
    /// copies it got through its new transmitter (counted apart from `CellLost`).
    CellQuit,
    /// Sent to a peer whose link was lost before it took it.
    PeerLost,
    /// Published on a connection that never said HELO.
    UnknownSender,
    /// A shard message for a room this transmitter does not host.
    RoomNotHosted,
    /// Forwarded by a peer for a cell that has left here (the peer had not heard yet):
    /// an anycatch target not here any more, or a mesh message with no cell here for it.
    CellGone,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::TooLarge,
        DropReason::CellBacklog,
        DropReason::PeerBacklog,
        DropReason::CellLost,
        DropReason::CellQuit,
        DropReason::PeerLost,
        DropReason::UnknownSender,
        DropReason::RoomNotHosted,
        DropReason::CellGone,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::CellBacklog => "cell_backlog",
            DropReason::PeerBacklog => "peer_backlog",
            DropReason::CellLost => "cell_lost",
            DropReason::CellQuit => "cell_quit",
            DropReason::PeerLost => "peer_lost",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::RoomNotHosted => "room_not_hosted",
            DropReason::CellGone => "cell_gone",
        }
    }
}

impl Metrics {
    /// Counts `n` messages dropped for `reason`.
    pub fn drop(&self, reason: DropReason, n: u64) {
        self.drops.with_label_values(&[reason.label()]).inc_by(n);
    }
}

/// The per-message counters (labelled handles looked up once: a label lookup hashes and
/// locks), as local (non-atomic) counters: the transmitter counts into them and flushes
/// them once per loop turn, not one atomic add per message.
pub struct Hot {
    pub in_cell: LocalIntCounter,
    pub in_peer: LocalIntCounter,
    pub bytes_in_cell: LocalIntCounter,
    pub bytes_in_peer: LocalIntCounter,
    pub out_cell: LocalIntCounter,
    pub out_peer: LocalIntCounter,
    pub out_pub: LocalIntCounter,
    pub bytes_out_cell: LocalIntCounter,
    pub bytes_out_peer: LocalIntCounter,
    pub bytes_out_pub: LocalIntCounter,
}

impl Hot {
    pub fn new(m: &Metrics) -> Self {
        let local =
            |family: &IntCounterVec, label: &str| family.with_label_values(&[label]).local();
        Hot {
            in_cell: local(&m.messages_in, "cell"),
            in_peer: local(&m.messages_in, "peer"),
            bytes_in_cell: local(&m.bytes_in, "cell"),
            bytes_in_peer: local(&m.bytes_in, "peer"),
            out_cell: local(&m.messages_out, "cell"),
            out_peer: local(&m.messages_out, "peer"),
            out_pub: local(&m.messages_out, "pub"),
            bytes_out_cell: local(&m.bytes_out, "cell"),
            bytes_out_peer: local(&m.bytes_out, "peer"),
            bytes_out_pub: local(&m.bytes_out, "pub"),
        }
    }

    pub fn flush(&self) {
        for c in [
            &self.in_cell,
            &self.in_peer,
            &self.bytes_in_cell,
            &self.bytes_in_peer,
            &self.out_cell,
            &self.out_peer,
            &self.out_pub,
            &self.bytes_out_cell,
            &self.bytes_out_peer,
            &self.bytes_out_pub,
        ] {
            c.flush();
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let messages_in = counter_vec(
            &r,
            "thynapse_transmitter_messages_in_total",
            "Messages received, by source (cell or peer).",
            "source",
        );
        let messages_out = counter_vec(
            &r,
            "thynapse_transmitter_messages_out_total",
            "Messages sent, by destination (cell, peer or pub).",
            "dest",
        );
        let bytes_in = counter_vec(
            &r,
            "thynapse_transmitter_bytes_in_total",
            "Payload bytes received, by source.",
            "source",
        );
        let bytes_out = counter_vec(
            &r,
            "thynapse_transmitter_bytes_out_total",
            "Payload bytes sent, by destination.",
            "dest",
        );
        let m = Metrics {
            messages_in,
            messages_out,
            bytes_in,
            bytes_out,
            drops: counter_vec(
                &r,
                "thynapse_transmitter_drops_total",
                "Messages dropped, by reason.",
                "reason",
            ),
            refused: counter_vec(
                &r,
                "thynapse_transmitter_refused_total",
                "Requests refused for going over a limit (the sender gets an ERRR), by limit; send_queue: connections dropped for not reading their replies and deliveries; auth: messages refused for want of a valid proof (AUTH), and rendezvous datagrams that did not open; permission: subscriptions and publishes its Service may not make (spec.permissions).",
                "limit",
            ),
            redelivered: counter(
                &r,
                "thynapse_transmitter_anycatch_redelivered_total",
                "Anycatch messages sent again, to another cell of their Service, because the cell they went to left (or its transmitter was lost) before taking them.",
            ),
            malformed: counter(
                &r,
                "thynapse_transmitter_malformed_frames_total",
                "Frames that could not be read; each got an ERRR reply.",
            ),
            cells: gauge(
                &r,
                "thynapse_transmitter_cells",
                "Cells connected to this transmitter.",
            ),
            peers: gauge(
                &r,
                "thynapse_transmitter_peers",
                "Peer transmitters this one forwards to.",
            ),
            peer_reconnects: counter(
                &r,
                "thynapse_transmitter_peer_reconnects_total",
                "Times a link to a peer transmitter was rebuilt.",
            ),
            peers_forgotten: counter_vec(
                &r,
                "thynapse_transmitter_peers_forgotten_total",
                "Peer transmitters forgotten (their cells with them), by why: it said LEAV (left), both its links closed (closed: killed or restarted), it did not answer while something waited on it (silent), no rendezvous point listed it (unlisted), or this transmitter was paused past the expiry (paused).",
                "reason",
            ),
            room_messages: counter_vec(
                &r,
                "thynapse_transmitter_room_messages_total",
                "Room (shard channel) messages routed by this transmitter, by room.",
                "room",
            ),
            rooms: gauge(
                &r,
                "thynapse_transmitter_rooms",
                "Rooms this transmitter hosts.",
            ),
            held_bytes: gauge(
                &r,
                "thynapse_transmitter_held_bytes",
                "Bytes of inbound batches waiting for room on the links they go to.",
            ),
            sync_gave_up: counter_vec(
                &r,
                "thynapse_transmitter_interest_sync_gave_up_total",
                "Subscription confirmations (SUBD) sent without every live peer's answer: a peer slower than one expiry (timeout), or one whose link was lost first (peer_lost).",
                "reason",
            ),
            registry: r,
        };
        for limit in [
            "interest_bytes",
            "cells",
            "hello",
            "peers",
            "wire_message_bytes",
            "send_queue",
            "auth",
            "permission",
        ] {
            m.refused.with_label_values(&[limit]);
        }
        for reason in ["timeout", "peer_lost"] {
            m.sync_gave_up.with_label_values(&[reason]);
        }
        for reason in Forgotten::ALL {
            m.peers_forgotten.with_label_values(&[reason.label()]);
        }
        for reason in DropReason::ALL {
            m.drops.with_label_values(&[reason.label()]);
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
