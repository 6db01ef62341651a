//! The mesh's ConfigMap (its spec, for reference) and token Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::ResourceExt;
use thynapse_resources::TransmitterMesh;

use super::{meta, secret_name, Inputs};

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
