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
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Metrics {
            messages_in: counter_vec(
                &r,
                "thynapse_transmitter_messages_in_total",
                "Messages received, by source (cell or peer).",
                "source",
            ),
            messages_out: counter_vec(
                &r,
                "thynapse_transmitter_messages_out_total",
                "Messages sent, by destination (cell, peer or pub).",
                "dest",
            ),
            bytes_in: counter_vec(
                &r,
                "thynapse_transmitter_bytes_in_total",
                "Payload bytes received, by source.",
                "source",
            ),
            bytes_out: counter_vec(
                &r,
                "thynapse_transmitter_bytes_out_total",
                "Payload bytes sent, by destination.",
                "dest",
            ),
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
