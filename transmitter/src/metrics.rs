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
    pub malformed: IntCounter,
    pub cells: IntGauge,
    pub peers: IntGauge,
    pub peer_reconnects: IntCounter,
    pub room_messages: IntCounterVec,
    pub rooms: IntGauge,
    /// Labelled handles of the per-message counters, looked up once: a label lookup hashes
    /// and locks, too much to do per message.
    pub hot: Hot,
}

/// The per-message counters, as local (non-atomic) counters of `Hot`'s: the transmitter
/// counts into them and flushes them once per loop turn, not one atomic add per message.
pub struct HotLocal {
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

impl HotLocal {
    pub fn new(hot: &Hot) -> Self {
        HotLocal {
            in_cell: hot.in_cell.local(),
            in_peer: hot.in_peer.local(),
            bytes_in_cell: hot.bytes_in_cell.local(),
            bytes_in_peer: hot.bytes_in_peer.local(),
            out_cell: hot.out_cell.local(),
            out_peer: hot.out_peer.local(),
            out_pub: hot.out_pub.local(),
            bytes_out_cell: hot.bytes_out_cell.local(),
            bytes_out_peer: hot.bytes_out_peer.local(),
            bytes_out_pub: hot.bytes_out_pub.local(),
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

#[derive(Clone)]
pub struct Hot {
    pub in_cell: IntCounter,
    pub in_peer: IntCounter,
    pub bytes_in_cell: IntCounter,
    pub bytes_in_peer: IntCounter,
    pub out_cell: IntCounter,
    pub out_peer: IntCounter,
    pub out_pub: IntCounter,
    pub bytes_out_cell: IntCounter,
    pub bytes_out_peer: IntCounter,
    pub bytes_out_pub: IntCounter,
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
        // Looked up once here; the per-message paths use these handles.
        let hot = Hot {
            in_cell: messages_in.with_label_values(&["cell"]),
            in_peer: messages_in.with_label_values(&["peer"]),
            bytes_in_cell: bytes_in.with_label_values(&["cell"]),
            bytes_in_peer: bytes_in.with_label_values(&["peer"]),
            out_cell: messages_out.with_label_values(&["cell"]),
            out_peer: messages_out.with_label_values(&["peer"]),
            out_pub: messages_out.with_label_values(&["pub"]),
            bytes_out_cell: bytes_out.with_label_values(&["cell"]),
            bytes_out_peer: bytes_out.with_label_values(&["peer"]),
            bytes_out_pub: bytes_out.with_label_values(&["pub"]),
        };
        let m = Metrics {
            messages_in,
            messages_out,
            bytes_in,
            bytes_out,
            hot,
            drops: counter_vec(
                &r,
                "thynapse_transmitter_drops_total",
                "Messages dropped, by reason.",
                "reason",
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
            registry: r,
        };
        for reason in [
            "too_large",
            "cell_backlog",
            "peer_backlog",
            "cell_lost",
            "peer_lost",
            "unknown_sender",
            "room_not_hosted",
        ] {
            m.drops.with_label_values(&[reason]);
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
