//! Sidecar injection as a pure function: which Service selects a pod, and the JSON patch
//! that adds the sidecar to it as a native sidecar (an init container with
//! `restartPolicy: Always`, Kubernetes ≥ 1.29). The webhook only wraps this in HTTPS.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, Pod, Probe,
    SecretVolumeSource, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use thynapse_process::ToArgs;
use thynapse_resources::{flags, Service, TransmitterMesh};

use crate::builders::{self, Inputs, MESH_LABEL};

pub const SIDECAR: &str = "thynapse-sidecar";
pub const INJECTED: &str = "thynapse.io/injected";
pub const SERVICE_LABEL: &str = "thynapse.io/service";
/// Port of the sidecar's metrics (all interfaces; its Redis port stays on loopback).
pub const SIDECAR_METRICS_PORT: i32 = 9091;

/// The labels a Service selects its cell pods by.
pub fn selector_of(service: &Service) -> BTreeMap<String, String> {
    service
        .spec
        .selector
        .clone()
        .unwrap_or_else(|| BTreeMap::from([(SERVICE_LABEL.to_string(), service.name_any())]))
}

/// The Service (of the pod's namespace) selecting the pod; by name when several do.
pub fn service_for<'a>(
    pod: &Pod,
    services: impl IntoIterator<Item = &'a Service>,
) -> Option<&'a Service> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.as_deref();
    let mut matching: Vec<&Service> = services
        .into_iter()
        .filter(|s| s.namespace().as_deref() == ns || ns.is_none())
        .filter(|s| selector_of(s).iter().all(|(k, v)| labels.get(k) == Some(v)))
        .collect();
    matching.sort_by_key(|s| s.name_any());
    matching.into_iter().next()
}

pub fn already_injected(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let has =
        |cs: Option<&Vec<Container>>| cs.is_some_and(|cs| cs.iter().any(|c| c.name == SIDECAR));
    has(spec.and_then(|s| s.init_containers.as_ref()))
        || has(spec.map(|s| &s.containers))
        || pod.annotations().contains_key(INJECTED)
}

/// The sidecar container for a cell of `service` in `mesh`.
pub fn sidecar(mesh: &TransmitterMesh, service: &Service, inputs: &Inputs) -> Container {
    let spec = &mesh.spec;
    let mut args = flags::sidecar(
        &mesh.name_any(),
        &service.name_any(),
        "$(POD_NAME)",
        &service.spec,
        spec,
        &builders::rendezvous_addresses(mesh),
    );
    args.resp_bind = std::net::SocketAddr::from(([127, 0, 0, 1], spec.sidecar.port));
    args.metrics_bind = builders::any_interface(SIDECAR_METRICS_PORT);
    // Its Service's key, from the Secret the Service's reconcile keeps (never the token).
    args.service_key_file = Some(format!("{}/key", builders::SERVICE_KEY_DIR));
    Container {
        name: SIDECAR.into(),
        image: Some(builders::image(mesh, inputs)),
        command: Some(vec!["thynapse".into()]),
        args: Some(args.to_args()),
        // A native sidecar: starts before the app's containers and lives as long as they do.
        restart_policy: Some("Always".into()),
        env: Some(vec![EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("thynapse-metrics".into()),
            container_port: SIDECAR_METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // The app starts once the sidecar serves (its metrics port opens with it).
        startup_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(SIDECAR_METRICS_PORT),
                ..TCPSocketAction::default()
            }),
            period_seconds: Some(1),
            failure_threshold: Some(30),
            ..Probe::default()
        }),
        resources: spec.sidecar.resources.clone(),
        security_context: Some(builders::restricted()),
        volume_mounts: Some(vec![VolumeMount {
            name: KEY_VOLUME.into(),
            mount_path: builders::SERVICE_KEY_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// The pod volume holding its Service's key.
const KEY_VOLUME: &str = "thynapse-service-key";

fn key_volume(service: &Service) -> Volume {
    Volume {
        name: KEY_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(builders::service_key_secret_name(&service.name_any())),
            default_mode: Some(builders::SECRET_FILE_MODE),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// `key` under `parent`, escaped as RFC 6901 asks (`/` is `~1`).
fn pointer(parent: &str, key: &str) -> String {
    format!("{parent}/{}", key.replace('~', "~0").replace('/', "~1"))
}

fn add(path: &str, value: serde_json::Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: path.parse().expect("static JSON pointers are valid"),
        value,
    })
}

/// The patch that injects the sidecar into `pod`, or None when it already has one.
pub fn patch(
    pod: &Pod,
    mesh: &TransmitterMesh,
    service: &Service,
    inputs: &Inputs,
) -> Option<Patch> {
    if already_injected(pod) {
        return None;
    }
    let container =
        serde_json::to_value(sidecar(mesh, service, inputs)).expect("containers serialise");
    let mut ops = Vec::new();
    match pod.spec.as_ref().and_then(|s| s.init_containers.as_ref()) {
        // First, so init containers after it can use the mesh too.
        Some(_) => ops.push(add("/spec/initContainers/0", container)),
        None => ops.push(add("/spec/initContainers", serde_json::json!([container]))),
    }
    let volume = serde_json::to_value(key_volume(service)).expect("volumes serialise");
    match pod.spec.as_ref().and_then(|s| s.volumes.as_ref()) {
        Some(_) => ops.push(add("/spec/volumes/-", volume)),
        None => ops.push(add("/spec/volumes", serde_json::json!([volume]))),
    }
    if pod.metadata.labels.is_none() {
        ops.push(add("/metadata/labels", serde_json::json!({})));
    }
    // The NetworkPolicy lets the mesh's labelled pods reach its transmitters.
    ops.push(add(
        &pointer("/metadata/labels", MESH_LABEL),
        mesh.name_any().into(),
    ));
    if pod.metadata.annotations.is_none() {
        ops.push(add("/metadata/annotations", serde_json::json!({})));
    }
    ops.push(add(
        &pointer("/metadata/annotations", INJECTED),
        "true".into(),
    ));
    Some(Patch(ops))
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_resources::ServiceSpec;

    fn service(name: &str, selector: Option<&[(&str, &str)]>) -> Service {
        let spec: ServiceSpec =
            serde_yaml::from_str("mesh: demo\ndelivery: [{pattern: 'jobs.*', mode: anycatch}]")
                .unwrap();
        let mut s = Service::new(name, spec);
        s.spec.selector = selector.map(|l| {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        s.metadata.namespace = Some("apps".into());
        s
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "apps", "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "spec": {"containers": [{"name": "app", "image": "app"}]}
        }))
        .unwrap()
    }

    fn mesh() -> TransmitterMesh {
        let mut m = TransmitterMesh::new("demo", serde_yaml::from_str("replicas: 2").unwrap());
        m.metadata.namespace = Some("apps".into());
        m
    }

    #[test]
    fn services_select_pods_by_label() {
        let services = [
            service("workers", None),
            service("custom", Some(&[("tier", "jobs")])),
        ];
        assert_eq!(
            service_for(&pod(&[("thynapse.io/service", "workers")]), &services)
                .unwrap()
                .name_any(),
            "workers"
        );
        assert_eq!(
            service_for(&pod(&[("tier", "jobs"), ("x", "y")]), &services)
                .unwrap()
                .name_any(),
            "custom"
        );
        assert!(service_for(&pod(&[("tier", "web")]), &services).is_none());
    }

    #[test]
    fn the_patch_adds_a_native_sidecar_once() {
        let m = mesh();
        let s = service("workers", None);
        let inputs = Inputs {
            default_image: "thynapse:test".into(),
            ..Inputs::default()
        };
        let mut p = serde_json::to_value(pod(&[("thynapse.io/service", "workers")])).unwrap();
        let patch = patch(&serde_json::from_value(p.clone()).unwrap(), &m, &s, &inputs).unwrap();
        json_patch::patch(&mut p, &patch).unwrap();
        let patched: Pod = serde_json::from_value(p).unwrap();
        let init = patched
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .unwrap();
        assert_eq!(init.len(), 1);
        let c = &init[0];
        assert_eq!(c.name, SIDECAR);
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        let args = c.args.as_ref().unwrap();
        let after = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(
            after("--resp-bind"),
            "127.0.0.1:6379",
            "the Redis port stays on loopback"
        );
        assert_eq!(after("--service"), "workers");
        assert_eq!(
            after("--rules"),
            r#"[{"pattern":"jobs.*","mode":"anycatch"}]"#
        );
        assert_eq!(
            after("--rendezvous"),
            "udp://demo-rendezvous-0.apps.svc:7400"
        );
        assert_eq!(patched.labels()["thynapse.io/mesh"], "demo");
        assert_eq!(patched.annotations()[INJECTED], "true");
        // Its Service's key, mounted from the Service's Secret, and read from the file.
        assert_eq!(after("--service-key-file"), "/var/run/thynapse/service/key");
        assert!(
            !args.iter().any(|a| a == "--token-file"),
            "a cell never holds the token"
        );
        let volumes = patched.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        let secret = volumes[0].secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("workers-thynapse-key"));
        let mount = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.name.as_str(), mount.read_only),
            (volumes[0].name.as_str(), Some(true))
        );
        assert_eq!(
            patched.spec.as_ref().unwrap().containers.len(),
            1,
            "the app is untouched"
        );
        // Idempotent: a second admission of the same pod changes nothing.
        assert!(super::patch(&patched, &m, &s, &inputs).is_none());
    }

    #[test]
    fn existing_init_containers_run_after_the_sidecar() {
        let mut p = serde_json::to_value(pod(&[])).unwrap();
        p["spec"]["initContainers"] = serde_json::json!([{"name": "migrate", "image": "m"}]);
        p["metadata"].as_object_mut().unwrap().remove("labels");
        let patch = patch(
            &serde_json::from_value(p.clone()).unwrap(),
            &mesh(),
            &service("workers", None),
            &Inputs::default(),
        )
        .unwrap();
        json_patch::patch(&mut p, &patch).unwrap();
        let names: Vec<&str> = p["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [SIDECAR, "migrate"]);
        assert_eq!(p["metadata"]["labels"]["thynapse.io/mesh"], "demo");
    }
}
