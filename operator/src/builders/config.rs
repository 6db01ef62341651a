//! The mesh's ConfigMap (its spec, for reference) and token Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};
use thynapse_protocol::auth::{tokens_from, Key};
use thynapse_resources::{Service, TransmitterMesh};

use super::{meta, secret_name, Inputs, COMPONENT_LABEL, MANAGER, MESH_LABEL};

pub(super) fn config(mesh: &TransmitterMesh) -> ConfigMap {
    let name = mesh.name_any();
    let spec = &mesh.spec;
    ConfigMap {
        metadata: meta(mesh, format!("{name}-config"), "config"),
        data: Some(BTreeMap::from([(
            "mesh.yaml".to_string(),
            serde_yaml::to_string(&spec).expect("specs serialise"),
        )])),
        ..ConfigMap::default()
    }
}

pub(super) fn secret(mesh: &TransmitterMesh, inputs: &Inputs) -> Secret {
    let name = mesh.name_any();
    Secret {
        metadata: meta(mesh, secret_name(&name), "token"),
        data: Some(BTreeMap::from([(
            "token".to_string(),
            ByteString(inputs.token.clone().into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// Where a pod's Service key is mounted, and the sidecar's flag reads it.
pub const SERVICE_KEY_DIR: &str = "/var/run/thynapse/service";

/// The Secret holding one Service's key, derived from the mesh token: all a cell's pod
/// needs to authenticate, so the token itself never leaves the transmitters
/// (docs/security.md). Owned by the Service, so it goes with it.
pub fn service_key_secret(service: &Service, token: &str) -> Secret {
    let name = service.name_any();
    // The first line: during a rotation the Secret holds the new token, then the old one.
    let first = tokens_from(token).into_iter().next().unwrap_or_default();
    // Derived with the Service's permissions: its cells can prove no wider ones.
    let key = Key::service(&first, &service.spec.permissions.identity(&name));
    let mut labels = BTreeMap::from([
        (MESH_LABEL.to_string(), service.spec.mesh.clone()),
        (COMPONENT_LABEL.to_string(), "service-key".to_string()),
    ]);
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    Secret {
        metadata: ObjectMeta {
            name: Some(service_key_secret_name(&name)),
            namespace: service.namespace(),
            labels: Some(labels),
            owner_references: service.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "key".to_string(),
            ByteString(key.to_hex().into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

pub fn service_key_secret_name(service: &str) -> String {
    format!("{service}-thynapse-key")
}
