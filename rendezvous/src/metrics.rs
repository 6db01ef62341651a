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
    pub answers: IntCounterVec,
    pub answer_bytes: IntCounterVec,
}

/// How an announcement's membership was answered: its view still holds (unchanged),
/// what changed since it (changed), or every transmitter (full).
pub const ANSWERS: [&str; 3] = ["unchanged", "changed", "full"];

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
            answers: counter_vec(
                &r,
                "thynapse_rendezvous_membership_answers_total",
                "Announcements answered with the mesh's membership, by kind: the asker's view still holds (unchanged), what changed since that view (changed), or every live transmitter, in pages (full: a first announcement, or a view this point no longer remembers).",
                "kind",
            ),
            answer_bytes: counter_vec(
                &r,
                "thynapse_rendezvous_membership_answer_bytes_total",
                "Bytes of those answers (before sealing), by kind.",
                "kind",
            ),
            registry: r,
        };
        for kind in ANSWERS {
            m.answers.with_label_values(&[kind]);
            m.answer_bytes.with_label_values(&[kind]);
        }
        for limit in REFUSALS {
            m.refused.with_label_values(&[limit]);
        }
        m
    }

    pub fn refused(&self, limit: &str) {
        self.refused.with_label_values(&[limit]).inc();
    }

    pub fn answer(&self, kind: &str, datagrams: &[Vec<u8>]) {
        self.answers.with_label_values(&[kind]).inc();
        let bytes: usize = datagrams.iter().map(Vec::len).sum();
        self.answer_bytes
            .with_label_values(&[kind])
            .inc_by(bytes as u64);
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
