use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thynapse_protocol::permissions::Permissions;
use thynapse_protocol::DeliveryRule;

/// A mesh of transmitters with its rendezvous point(s).
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "thynapse.io",
    version = "v1alpha1",
    kind = "TransmitterMesh",
    namespaced,
    shortname = "tmesh",
    status = "TransmitterMeshStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}"#,
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.readyTransmitters"}"#,
    printcolumn = r#"{"name": "Rendezvous", "type": "string", "jsonPath": ".status.rendezvous"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.limits.clientOutputBufferBytes >= self.limits.maxMessageBytes").message("spec.limits.clientOutputBufferBytes must hold at least one message of maxMessageBytes"))]
#[x_kube(validation = Rule::new("self.limits.linkBufferBytes >= self.limits.maxMessageBytes").message("spec.limits.linkBufferBytes must hold at least one message of maxMessageBytes"))]
pub struct TransmitterMeshSpec {
    /// How many transmitters run the mesh: at most 240, the largest mesh measured to
    /// serve well (every transmitter links to every other; docs/architecture.md, "Scale").
    #[schemars(range(min = 1, max = 240))]
    pub replicas: u32,
    #[serde(default)]
    pub rendezvous: RendezvousSpec,
    #[serde(default)]
    pub rooms: RoomsSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Container image of the transmitters, rendezvous and sidecars (cluster mode); the
    /// operator's default image when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Compute resources of each transmitter pod (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The sidecar injected into cell pods (cluster mode).
    #[serde(default)]
    pub sidecar: SidecarSpec,
    /// Who may scrape the transmitters' and rendezvous points' metrics (cluster mode).
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub security: SecuritySpec,
}

/// How the mesh protects its traffic beyond authentication (docs/security.md).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecuritySpec {
    /// Encrypt every connection to a transmitter (ChaCha20-Poly1305, keys per connection
    /// from an X25519 exchange and the token): transmitters refuse the ones that do not
    /// ask, sidecars ask. Not needed where the cluster encrypts pod traffic already (a
    /// CNI with WireGuard or IPsec); a change reaches cells as their pods restart.
    #[serde(default)]
    pub encryption: bool,
}

/// The metrics port, as the mesh's NetworkPolicy opens it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSpec {
    /// Namespaces whose pods may reach the metrics port (where Prometheus runs); the
    /// mesh's own namespace always may. Nothing else can: metrics name rooms and channels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_from_namespaces: Vec<String>,
}

/// The sidecar the webhook injects into the cell pods of the mesh's Services.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarSpec {
    /// Compute resources of the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Loopback port the cell's Redis clients use.
    #[serde(default = "default_resp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        SidecarSpec {
            resources: None,
            port: default_resp_port(),
        }
    }
}

/// What the operator reports of a mesh.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransmitterMeshStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Transmitter pods ready (from the StatefulSet).
    #[serde(default)]
    pub ready_transmitters: i32,
    /// Address cells and transmitters use to reach the rendezvous point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
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
    /// An on-demand room that no cell used for this long (no session in it, nobody
    /// asking for it) is forgotten: its placement and metric series go, and it is placed
    /// again when next used. Declared rooms are never forgotten.
    #[serde(default = "ten_minutes")]
    #[schemars(range(min = 1, max = 2_592_000))]
    pub forget_idle_after_seconds: u64,
}

fn ten_minutes() -> u64 {
    600
}

impl Default for RoomsSpec {
    fn default() -> Self {
        Self {
            default_replicas: 2,
            allow_undeclared: true,
            forget_idle_after_seconds: ten_minutes(),
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
    /// Per cell or peer link of a transmitter: bytes sent but not yet taken. Beyond it,
    /// what goes to that link waits for the receiver (holding its publishers back) for up
    /// to one expiry, then is dropped for that link (and counted).
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
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "thynapse.io",
    version = "v1alpha1",
    kind = "Service",
    namespaced,
    shortname = "tsvc",
    status = "ServiceStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name": "Mesh", "type": "string", "jsonPath": ".spec.mesh"}"#,
    printcolumn = r#"{"name": "Cells", "type": "integer", "jsonPath": ".status.cells"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// The TransmitterMesh (same namespace) the cells join; cannot be changed.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.mesh is immutable"))]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub mesh: String,
    /// How messages reach this service's cells; the first matching rule decides, and a
    /// channel no rule matches is multicatch.
    #[serde(default)]
    pub delivery: Vec<DeliveryRule>,
    /// Labels selecting the cell pods; by default `thynapse.io/service: <name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// What the cells may publish and subscribe to (globs; an absent list allows
    /// everything). Enforced by the transmitters, answered `-NOPERM` as Redis ACL does;
    /// a change takes effect as the cells restart (docs/security.md).
    #[serde(default, skip_serializing_if = "Permissions::unrestricted")]
    pub permissions: Permissions,
}

/// What the operator reports of a Service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Running cell pods selected by the Service.
    #[serde(default)]
    pub cells: i32,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A room: sharded pub/sub hosted by `replicas` transmitters.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "thynapse.io",
    version = "v1alpha1",
    kind = "Room",
    namespaced,
    shortname = "room",
    status = "RoomStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name": "Mesh", "type": "string", "jsonPath": ".spec.mesh"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}"#,
    printcolumn = r#"{"name": "Transmitters", "type": "string", "jsonPath": ".status.transmitters"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoomSpec {
    /// The TransmitterMesh (same namespace) hosting the room; cannot be changed.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.mesh is immutable"))]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub mesh: String,
    /// Transmitters hosting the room; the mesh's `rooms.defaultReplicas` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: Option<u32>,
}

/// What the operator reports of a Room.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Transmitters hosting the room, as the mesh's rendezvous placed it.
    #[serde(default)]
    pub transmitters: Vec<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
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
fn default_resp_port() -> u16 {
    6379
}
