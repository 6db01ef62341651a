//! The rendezvous point's Prometheus metrics: what it keeps, and what it refused.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use thynapse_telemetry::{counter, counter_vec, gauge};

use crate::placement::PlaceError;

pub struct Metrics {
    pub registry: Registry,
    pub transmitters: IntGauge,
    pub rooms: IntGauge,
    pub refused: IntCounterVec,
    pub rooms_forgotten: IntCounter,
}

/// Why a datagram was refused (the sender got an `error` answer).
pub const REFUSALS: [&str; 7] = [
    "auth",
    "announce",
    "transmitters",
    "rooms",
    "undeclared",
    "room_name",
    "malformed",
];

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Metrics {
            transmitters: gauge(
                &r,
                "thynapse_rendezvous_transmitters",
                "Live transmitters this rendezvous point knows.",
            ),
            rooms: gauge(&r, "thynapse_rendezvous_rooms", "Rooms placed (declared and on demand)."),
            refused: counter_vec(
                &r,
                "thynapse_rendezvous_refused_total",
                "Datagrams refused with an error answer, by reason: not a sealed request of this mesh, stale or replayed, or an announcement sealed by a cell (auth), an announcement out of bounds (announce), the directory full (transmitters), the mesh's rooms full (rooms), an undeclared room where they are forbidden (undeclared), a bad room name (room_name), an unreadable datagram (malformed).",
                "limit",
            ),
            rooms_forgotten: counter(
                &r,
                "thynapse_rendezvous_rooms_forgotten_total",
                "On-demand rooms forgotten as idle (spec.rooms.forgetIdleAfterSeconds).",
            ),
            registry: r,
        };
        for limit in REFUSALS {
            m.refused.with_label_values(&[limit]);
        }
        m
    }

    pub fn refused(&self, limit: &str) {
        self.refused.with_label_values(&[limit]).inc();
    }

    pub fn place_error(&self, e: &PlaceError) {
        self.refused(match e {
            PlaceError::Undeclared(..) => "undeclared",
            PlaceError::BadName => "room_name",
            PlaceError::Full(_) => "rooms",
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
