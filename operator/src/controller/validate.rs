//! Validate: specs the builders can trust. The CRDs' schemas check the same ranges where
//! the API server has them; this also catches what a schema cannot (a mesh name must be
//! a DNS label: it names StatefulSet pods) and a CRD installed without its schema. The
//! rules are `thynapse_resources`' own, the ones `thynapse up` applies to manifests.

use kube::ResourceExt;
use thynapse_resources::{validate_name, Room, Service, TransmitterMesh};

pub(super) fn mesh(mesh: &TransmitterMesh) -> Result<(), String> {
    validate_name(&mesh.name_any())
        .and_then(|()| mesh.spec.validate())
        .map_err(|e| e.to_string())
}

pub(super) fn service(service: &Service) -> Result<(), String> {
    service.spec.validate().map_err(|e| e.to_string())
}

pub(super) fn room(room: &Room) -> Result<(), String> {
    room.spec.validate().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn specs_outside_the_contract_are_refused_with_the_field() {
        let ok: TransmitterMesh = parse("apiVersion: thynapse.io/v1alpha1\nkind: TransmitterMesh\nmetadata: {name: m}\nspec: {replicas: 3}");
        assert_eq!(mesh(&ok), Ok(()));
        let bad: TransmitterMesh = parse("apiVersion: thynapse.io/v1alpha1\nkind: TransmitterMesh\nmetadata: {name: m}\nspec: {replicas: 0}");
        assert!(mesh(&bad).unwrap_err().contains("spec.replicas"));
        let dotted: TransmitterMesh = parse("apiVersion: thynapse.io/v1alpha1\nkind: TransmitterMesh\nmetadata: {name: a.b}\nspec: {replicas: 1}");
        assert!(mesh(&dotted).unwrap_err().contains("DNS-1123"));
        let s: Service = parse("apiVersion: thynapse.io/v1alpha1\nkind: Service\nmetadata: {name: s}\nspec: {mesh: m, delivery: [{pattern: ''}]}");
        assert!(service(&s)
            .unwrap_err()
            .contains("spec.delivery[0].pattern"));
        let r: Room = parse("apiVersion: thynapse.io/v1alpha1\nkind: Room\nmetadata: {name: r}\nspec: {mesh: m, replicas: 0}");
        assert!(room(&r).unwrap_err().contains("spec.replicas"));
    }
}
