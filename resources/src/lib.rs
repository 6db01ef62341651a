//! The resources users write — `TransmitterMesh`, `Service` and `Room`, group
//! `thynapse.io`, version `v1alpha1` — with their defaults and validation, and the loading
//! of manifest files as `kubectl apply -f` would read them. Local mode (`thynapse up`) and
//! the operator both start from these types.
//!
//! No I/O here but reading manifest files.

pub mod flags;
mod load;
mod spec;
mod validate;

pub use load::{load_path, parse_manifests, Document, LoadError, MeshConfig};
pub use spec::*;
pub use validate::{validate_name, ValidationError};

pub const GROUP: &str = "thynapse.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "thynapse.io/v1alpha1";

/// The CustomResourceDefinitions of the three resources, as `crds/` holds them.
pub fn crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![TransmitterMesh::crd(), Service::crd(), Room::crd()]
}

/// One CRD as the YAML file committed under `crds/` (and the Helm chart's `crds/`).
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    format!(
        "# Generated from the Rust types in resources/ by `cargo test -p thynapse-resources`\n# (THYNAPSE_WRITE_CRDS=1 rewrites it). Do not edit.\n{}",
        serde_yaml::to_string(crd).expect("CRDs serialise")
    )
}
