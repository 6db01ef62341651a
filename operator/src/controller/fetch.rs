//! Fetch: everything a reconcile reads from the API server, and nothing else.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use thynapse_resources::{Room, Service, TransmitterMesh};

use crate::builders::{self, Inputs};
use crate::inject;

/// What a mesh's desired objects depend on besides the mesh: its declared Rooms (for the
/// rendezvous) and its token, kept from the existing Secret or made once.
pub(super) async fn mesh_inputs(
    client: &Client,
    mesh: &TransmitterMesh,
    default_image: &str,
) -> Result<Inputs, kube::Error> {
    let ns = mesh.namespace().unwrap_or_else(|| "default".into());
    let name = mesh.name_any();
    let rooms: Api<Room> = Api::namespaced(client.clone(), &ns);
    let declared: BTreeMap<String, u32> = rooms
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|r| r.spec.mesh == name)
        // An invalid Room (a CRD without its schema) must not reach the rendezvous' flags;
        // its own reconcile reports it.
        .filter(|r| r.spec.validate().is_ok())
        .map(|r| {
            let replicas = r.spec.replicas.unwrap_or(mesh.spec.rooms.default_replicas);
            (r.name_any(), replicas)
        })
        .collect();
    let token = mesh_token(client, &ns, &name)
        .await?
        .unwrap_or_else(random_token);
    Ok(Inputs {
        default_image: default_image.to_string(),
        rooms: declared,
        token,
    })
}

/// The token a mesh's Secret holds, if the mesh's reconcile made it already (or the user
/// created it first).
pub(super) async fn mesh_token(
    client: &Client,
    ns: &str,
    mesh: &str,
) -> Result<Option<String>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(secrets
        .get_opt(&builders::secret_name(mesh))
        .await?
        .and_then(|s| {
            s.data?
                .get("token")
                .map(|t| String::from_utf8_lossy(&t.0).into_owned())
        }))
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Transmitters of `mesh` ready now (0 when the StatefulSet cannot be read).
pub(super) async fn ready_transmitters(client: &Client, ns: &str, mesh: &str) -> i32 {
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    sts.get_opt(&builders::transmitter_name(mesh))
        .await
        .ok()
        .flatten()
        .and_then(|s| s.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

pub(super) async fn mesh(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<TransmitterMesh>, kube::Error> {
    let meshes: Api<TransmitterMesh> = Api::namespaced(client.clone(), ns);
    meshes.get_opt(name).await
}

/// Cells of `service` running now: its pods with a sidecar, in phase Running.
pub(super) async fn running_cells(
    client: &Client,
    ns: &str,
    service: &Service,
) -> Result<i32, kube::Error> {
    let selector = inject::selector_of(service)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let cells = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .into_iter()
        .filter(inject::already_injected)
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    Ok(cells as i32)
}
