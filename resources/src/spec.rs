use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thynapse_protocol::DeliveryRule;

/// A mesh of transmitters with its rendezvous point(s).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransmitterMeshSpec {
    /// How many transmitters run the mesh.
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: u32,
    #[serde(default)]
    pub rendezvous: RendezvousSpec,
    #[serde(default)]
    pub rooms: RoomsSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Container image of the transmitters, rendezvous and sidecars (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Discovery: transmitters announce themselves every `announceIntervalMs`; an
/// announcement not renewed within `announceIntervalMs × expiryMultiplier` expires, and
/// so does a transmitter or cell that stops answering heartbeats for that long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RendezvousSpec {
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: u32,
    #[serde(default = "default_announce_ms")]
    #[schemars(range(min = 50, max = 60000))]
    pub announce_interval_ms: u64,
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 2, max = 20))]
    pub expiry_multiplier: u32,
}

impl Default for RendezvousSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            announce_interval_ms: default_announce_ms(),
            expiry_multiplier: default_multiplier(),
        }
    }
}

impl RendezvousSpec {
    pub fn expiry_ms(&self) -> u64 {
        self.announce_interval_ms * self.expiry_multiplier as u64
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoomsSpec {
    /// Transmitters hosting a room that declares no `replicas` (or is created on demand).
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 1000))]
    pub default_replicas: u32,
    /// Whether a room used but not declared by a `Room` is created on demand.
    #[serde(default = "yes")]
    pub allow_undeclared: bool,
}

impl Default for RoomsSpec {
    fn default() -> Self {
        Self {
            default_replicas: 2,
            allow_undeclared: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    /// Largest message payload accepted; larger ones are refused with an error.
    #[serde(default = "default_max_message")]
    #[schemars(range(min = 1, max = 536870912))]
    pub max_message_bytes: u64,
    /// Per Redis client of a sidecar: queued output beyond this disconnects the client,
    /// like Redis' `client-output-buffer-limit pubsub` hard limit.
    #[serde(default = "default_client_buffer")]
    #[schemars(range(min = 65536))]
    pub client_output_buffer_bytes: u64,
    /// Per cell or peer link of a transmitter: bytes sent but not yet taken beyond which
    /// messages for that link are dropped (and counted).
    #[serde(default = "default_link_buffer")]
    #[schemars(range(min = 65536))]
    pub link_buffer_bytes: u64,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message(),
            client_output_buffer_bytes: default_client_buffer(),
            link_buffer_bytes: default_link_buffer(),
        }
    }
}

/// A service whose cells (pods) talk to the mesh through their sidecars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// The TransmitterMesh (same namespace) the cells join.
    pub mesh: String,
    /// How messages reach this service's cells; the first matching rule decides, and a
    /// channel no rule matches is multicatch.
    #[serde(default)]
    pub delivery: Vec<DeliveryRule>,
    /// Labels selecting the cell pods; by default `thynapse.io/service: <name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
}

/// A room: sharded pub/sub hosted by `replicas` transmitters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoomSpec {
    pub mesh: String,
    /// Transmitters hosting the room; the mesh's `rooms.defaultReplicas` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: Option<u32>,
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn yes() -> bool {
    true
}
fn default_announce_ms() -> u64 {
    500
}
fn default_multiplier() -> u32 {
    3
}
fn default_max_message() -> u64 {
    thynapse_protocol::DEFAULT_MAX_MESSAGE_BYTES as u64
}
fn default_client_buffer() -> u64 {
    32 * 1024 * 1024
}
fn default_link_buffer() -> u64 {
    32 * 1024 * 1024
}
