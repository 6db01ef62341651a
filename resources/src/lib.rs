//! The resources users write — `TransmitterMesh`, `Service` and `Room`, group
//! `thynapse.io`, version `v1alpha1` — with their defaults and validation, and the loading
//! of manifest files as `kubectl apply -f` would read them. Local mode (`thynapse up`) and
//! the operator both start from these types.
//!
//! No I/O here but reading manifest files.

mod load;
mod spec;
mod validate;

pub use load::{load_path, parse_manifests, Document, LoadError, MeshConfig};
pub use spec::*;
pub use validate::{validate_name, ValidationError};

pub const GROUP: &str = "thynapse.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "thynapse.io/v1alpha1";
