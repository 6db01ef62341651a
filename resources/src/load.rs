use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

use crate::spec::*;
use crate::validate::{validate_name, ValidationError};
use crate::API_VERSION;

/// One of our resources, read from a manifest.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    TransmitterMesh {
        name: String,
        // Boxed: it is several times the size of the other specs.
        spec: Box<TransmitterMeshSpec>,
    },
    Service {
        name: String,
        spec: ServiceSpec,
    },
    Room {
        name: String,
        spec: RoomSpec,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{source_name}: {error}")]
    Io {
        source_name: String,
        error: std::io::Error,
    },
    #[error("{source_name}: document {index}: not valid YAML: {error}")]
    Yaml {
        source_name: String,
        index: usize,
        error: serde_yaml::Error,
    },
    #[error("{source_name}: document {index} ({kind} {name:?}): {error}")]
    Invalid {
        source_name: String,
        index: usize,
        kind: String,
        name: String,
        error: String,
    },
    #[error("{0}")]
    Mesh(String),
}

/// Reads every resource of group thynapse.io from a YAML stream (`---`-separated
/// documents). Documents of other API groups are skipped, as a folder of manifests may
/// hold Deployments too.
pub fn parse_manifests(text: &str, source_name: &str) -> Result<Vec<Document>, LoadError> {
    let mut out = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|error| LoadError::Yaml {
            source_name: source_name.to_string(),
            index,
            error,
        })?;
        if value.is_null() {
            continue;
        }
        let invalid = |kind: &str, name: &str, error: String| LoadError::Invalid {
            source_name: source_name.to_string(),
            index,
            kind: kind.to_string(),
            name: name.to_string(),
            error,
        };
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        if !api_version.starts_with("thynapse.io/") {
            if api_version.is_empty() || kind.is_empty() {
                return Err(invalid(kind, "", "apiVersion and kind are required".into()));
            }
            continue;
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if api_version != API_VERSION {
            return Err(invalid(
                kind,
                &name,
                format!("unsupported apiVersion {api_version}, expected {API_VERSION}"),
            ));
        }
        validate_name(&name).map_err(|e| invalid(kind, &name, e.to_string()))?;
        let spec = value.get("spec").cloned().unwrap_or(Value::Null);
        let doc = match kind {
            "TransmitterMesh" => {
                let spec: TransmitterMeshSpec = parse_spec(spec, kind, &name, &invalid)?;
                spec.validate()
                    .map_err(|e| invalid(kind, &name, e.to_string()))?;
                Document::TransmitterMesh {
                    name,
                    spec: Box::new(spec),
                }
            }
            "Service" => {
                let spec: ServiceSpec = parse_spec(spec, kind, &name, &invalid)?;
                spec.validate()
                    .map_err(|e| invalid(kind, &name, e.to_string()))?;
                Document::Service { name, spec }
            }
            "Room" => {
                let spec: RoomSpec = parse_spec(spec, kind, &name, &invalid)?;
                spec.validate()
                    .map_err(|e| invalid(kind, &name, e.to_string()))?;
                Document::Room { name, spec }
            }
            other => {
                return Err(invalid(
                    other,
                    &name,
                    "unknown kind: expected TransmitterMesh, Service or Room".into(),
                ))
            }
        };
        out.push(doc);
    }
    Ok(out)
}

fn parse_spec<T: serde::de::DeserializeOwned>(
    spec: Value,
    kind: &str,
    name: &str,
    invalid: &dyn Fn(&str, &str, String) -> LoadError,
) -> Result<T, LoadError> {
    if spec.is_null() {
        return Err(invalid(kind, name, "spec is required".into()));
    }
    serde_yaml::from_value(spec).map_err(|e| invalid(kind, name, format!("spec: {e}")))
}

/// Reads a manifest file, or every `*.yaml`, `*.yml` and `*.json` file of a folder in name
/// order, as `kubectl apply -f` does.
pub fn load_path(path: &Path) -> Result<Vec<Document>, LoadError> {
    let io = |p: &Path, error| LoadError::Io {
        source_name: p.display().to_string(),
        error,
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files = std::fs::read_dir(path)
            .map_err(|e| io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect::<Vec<_>>();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| io(&file, e))?;
        docs.extend(parse_manifests(&text, &file.display().to_string())?);
    }
    Ok(docs)
}

/// One mesh and what belongs to it, as local mode runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshConfig {
    pub name: String,
    pub spec: TransmitterMeshSpec,
    pub services: Vec<(String, ServiceSpec)>,
    pub rooms: Vec<(String, RoomSpec)>,
}

impl MeshConfig {
    /// Picks the mesh named `mesh` (or the only one) and the Services and Rooms that
    /// refer to it. A Service or Room naming a mesh that is not there is an error.
    pub fn from_documents(docs: &[Document], mesh: Option<&str>) -> Result<MeshConfig, LoadError> {
        let meshes: Vec<(&String, &TransmitterMeshSpec)> = docs
            .iter()
            .filter_map(|d| match d {
                Document::TransmitterMesh { name, spec } => Some((name, spec.as_ref())),
                _ => None,
            })
            .collect();
        let (name, spec) = match (mesh, meshes.as_slice()) {
            (_, []) => {
                return Err(LoadError::Mesh(
                    "no TransmitterMesh in the manifests".into(),
                ))
            }
            (None, [one]) => *one,
            (None, _) => {
                return Err(LoadError::Mesh(format!(
                    "several TransmitterMeshes ({}); choose one with --mesh",
                    meshes
                        .iter()
                        .map(|m| m.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            (Some(want), all) => *all
                .iter()
                .find(|m| m.0 == want)
                .ok_or_else(|| LoadError::Mesh(format!("no TransmitterMesh named {want:?}")))?,
        };
        let mut services = Vec::new();
        let mut rooms = Vec::new();
        let known: Vec<&String> = meshes.iter().map(|m| m.0).collect();
        for d in docs {
            let (kind, item_name, item_mesh) = match d {
                Document::Service { name, spec } => ("Service", name, &spec.mesh),
                Document::Room { name, spec } => ("Room", name, &spec.mesh),
                Document::TransmitterMesh { .. } => continue,
            };
            if !known.contains(&item_mesh) {
                return Err(LoadError::Mesh(format!(
                    "{kind} {item_name:?} refers to TransmitterMesh {item_mesh:?}, which is not in the manifests"
                )));
            }
            if item_mesh != name {
                continue;
            }
            match d {
                Document::Service { name, spec } => {
                    if services.iter().any(|(n, _)| n == name) {
                        return Err(LoadError::Mesh(format!(
                            "Service {name:?} is declared twice"
                        )));
                    }
                    services.push((name.clone(), spec.clone()))
                }
                Document::Room { name, spec } => {
                    if rooms.iter().any(|(n, _)| n == name) {
                        return Err(LoadError::Mesh(format!("Room {name:?} is declared twice")));
                    }
                    rooms.push((name.clone(), spec.clone()))
                }
                Document::TransmitterMesh { .. } => {}
            }
        }
        Ok(MeshConfig {
            name: name.clone(),
            spec: spec.clone(),
            services,
            rooms,
        })
    }
}

impl From<ValidationError> for LoadError {
    fn from(e: ValidationError) -> Self {
        LoadError::Mesh(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_protocol::Mode;

    const DEMO: &str = r#"
apiVersion: thynapse.io/v1alpha1
kind: TransmitterMesh
metadata: {name: demo}
spec: {replicas: 3}
---
apiVersion: thynapse.io/v1alpha1
kind: Service
metadata: {name: orders}
spec:
  mesh: demo
  delivery:
    - {pattern: "orders.*", mode: anycatch}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: unrelated}
---
apiVersion: thynapse.io/v1alpha1
kind: Room
metadata: {name: lobby}
spec: {mesh: demo}
"#;

    #[test]
    fn reads_a_mesh_with_defaults() {
        let docs = parse_manifests(DEMO, "demo.yaml").unwrap();
        assert_eq!(docs.len(), 3);
        let cfg = MeshConfig::from_documents(&docs, None).unwrap();
        assert_eq!(cfg.name, "demo");
        assert_eq!(cfg.spec.replicas, 3);
        assert_eq!(cfg.spec.rendezvous.announce_interval_ms, 500);
        assert_eq!(cfg.spec.rooms.default_replicas, 2);
        assert_eq!(cfg.services[0].1.delivery[0].mode, Mode::Anycatch);
        assert_eq!(cfg.rooms[0].0, "lobby");
    }

    fn err(text: &str) -> String {
        match parse_manifests(text, "x.yaml") {
            Ok(docs) => MeshConfig::from_documents(&docs, None)
                .unwrap_err()
                .to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn invalid_manifests_get_clear_errors() {
        let mesh = "apiVersion: thynapse.io/v1alpha1\nkind: TransmitterMesh\nmetadata: {name: m}\n";
        assert!(err(&format!("{mesh}spec: {{replicas: 0}}")).contains("spec.replicas"));
        assert!(err(&format!("{mesh}spec: {{replicas: 1, bogus: 2}}"))
            .contains("unknown field `bogus`"));
        assert!(err(&format!("{mesh}spec: {{}}")).contains("missing field `replicas`"));
        assert!(err(mesh).contains("spec is required"));
        assert!(err("apiVersion: thynapse.io/v1alpha1\nkind: TransmitterMesh\nmetadata: {name: Bad_Name}\nspec: {replicas: 1}").contains("DNS-1123"));
        assert!(err(
            "apiVersion: thynapse.io/v1\nkind: Room\nmetadata: {name: r}\nspec: {mesh: m}"
        )
        .contains("unsupported apiVersion"));
        assert!(err(
            "apiVersion: thynapse.io/v1alpha1\nkind: Widget\nmetadata: {name: r}\nspec: {}"
        )
        .contains("unknown kind"));
        assert!(err("a: [").contains("not valid YAML"));
        assert!(err(&format!("{mesh}spec: {{replicas: 1}}\n---\napiVersion: thynapse.io/v1alpha1\nkind: Service\nmetadata: {{name: s}}\nspec: {{mesh: other}}")).contains("not in the manifests"));
        assert!(err("apiVersion: thynapse.io/v1alpha1\nkind: Service\nmetadata: {name: s}\nspec: {mesh: m, delivery: [{pattern: a, mode: sometimes}]}").contains("unknown variant"));
        assert!(err("kind: Service").contains("apiVersion and kind are required"));
    }
}
