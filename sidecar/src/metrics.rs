use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Registry};
use thynapse_telemetry::{counter, counter_vec, gauge};

/// The sidecar's Prometheus metrics (`thynapse_sidecar_*`).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Messages published by this cell's clients.
    pub messages_in: IntCounter,
    pub bytes_in: IntCounter,
    /// Messages written to this cell's clients (one per client and subscription matched).
    pub messages_out: IntCounter,
    pub bytes_out: IntCounter,
    pub drops: IntCounterVec,
    pub refused: IntCounterVec,
    pub duplicates: IntCounter,
    pub clients: IntGauge,
    pub subscriptions: IntGauge,
    pub disconnects: IntCounterVec,
    pub reconnects: IntCounter,
    pub confirm_timeouts: IntCounter,
    pub rooms: IntGauge,
    pub latency: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "thynapse_sidecar_delivery_latency_seconds",
                "From the publishing sidecar taking a message to this sidecar receiving it.",
            )
            .buckets(prometheus::exponential_buckets(10e-6, 2.0, 18).expect("valid buckets")),
        )
        .expect("valid metric");
        r.register(Box::new(latency.clone()))
            .expect("unique metric");
        let m = Metrics {
            messages_in: counter(
                &r,
                "thynapse_sidecar_messages_in_total",
                "Messages published by this cell's clients.",
            ),
            bytes_in: counter(
                &r,
                "thynapse_sidecar_bytes_in_total",
                "Payload bytes published by this cell's clients.",
            ),
            messages_out: counter(
                &r,
                "thynapse_sidecar_messages_out_total",
                "Messages delivered to this cell's clients.",
            ),
            bytes_out: counter(
                &r,
                "thynapse_sidecar_bytes_out_total",
                "Payload bytes delivered to this cell's clients.",
            ),
            drops: counter_vec(
                &r,
                "thynapse_sidecar_drops_total",
                "Messages dropped, by reason.",
                "reason",
            ),
            refused: counter_vec(
                &r,
                "thynapse_sidecar_refused_total",
                "Commands refused with an error for going over a limit, or (permission) for what the Service may not publish or subscribe to (-NOPERM), by limit.",
                "limit",
            ),
            duplicates: counter(
                &r,
                "thynapse_sidecar_duplicates_suppressed_total",
                "Messages received twice (while moving between transmitters) and delivered once.",
            ),
            clients: gauge(&r, "thynapse_sidecar_clients", "Connected Redis clients."),
            subscriptions: gauge(
                &r,
                "thynapse_sidecar_subscriptions",
                "Distinct channels and patterns subscribed by this cell.",
            ),
            disconnects: counter_vec(
                &r,
                "thynapse_sidecar_client_disconnects_total",
                "Clients disconnected by the sidecar, by reason.",
                "reason",
            ),
            reconnects: counter(
                &r,
                "thynapse_sidecar_transmitter_reconnects_total",
                "Times this cell moved to another transmitter.",
            ),
            confirm_timeouts: counter(
                &r,
                "thynapse_sidecar_subscribe_confirm_timeouts_total",
                "(P|S)SUBSCRIBE confirmations answered before the mesh confirmed the subscription (transmitter unreachable or slow past two expiries).",
            ),
            rooms: gauge(
                &r,
                "thynapse_sidecar_room_sessions",
                "Rooms this cell has a session in (SSUBSCRIBE/SPUBLISH).",
            ),
            latency,
            registry: r,
        };
        for reason in [
            "slow_subscriber",
            "too_large",
            "no_transmitter",
            "stale_link",
        ] {
            m.drops.with_label_values(&[reason]);
        }
        m.disconnects.with_label_values(&["slow_subscriber"]);
        for limit in [
            "message_size",
            "name_length",
            "interest_bytes",
            "wire_message_bytes",
            "permission",
        ] {
            m.refused.with_label_values(&[limit]);
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
