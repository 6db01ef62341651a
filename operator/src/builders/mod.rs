//! The desired Kubernetes objects of a TransmitterMesh, computed from the resource alone
//! (and the few facts the caller fetched: its rooms, its token). Pure: no I/O, so each
//! object is tested field by field; the controller only applies what this returns.

mod config;
pub use config::{service_key_secret, service_key_secret_name, SERVICE_KEY_DIR};
mod network_policy;
mod rendezvous;
mod transmitters;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, Probe,
    SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use thynapse_resources::TransmitterMesh;

/// Ports inside the pods.
pub const COMMAND_PORT: i32 = 7000;
pub const EVENT_PORT: i32 = 7001;
pub const METRICS_PORT: i32 = 9090;
pub const RENDEZVOUS_PORT: i32 = 7400;
/// Field manager of every server-side apply.
pub const MANAGER: &str = "thynapse-operator";
/// Label carried by every pod of a mesh: transmitters, rendezvous and injected cells.
pub const MESH_LABEL: &str = "thynapse.io/mesh";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// Facts about the world the builders need besides the mesh itself.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Image when the mesh names none (the operator's own version).
    pub default_image: String,
    /// Declared Rooms of the mesh: name → replicas (defaulted).
    pub rooms: BTreeMap<String, u32>,
    /// The mesh token, kept from the existing Secret (or freshly made once).
    pub token: String,
}

/// Everything one TransmitterMesh owns.
#[derive(Clone, Debug)]
pub struct Desired {
    pub config: ConfigMap,
    pub secret: Secret,
    pub transmitters: StatefulSet,
    pub headless: Service,
    pub rendezvous: Vec<(Deployment, Service)>,
    pub network_policy: NetworkPolicy,
    pub pdb: PodDisruptionBudget,
}

pub fn transmitter_name(mesh: &str) -> String {
    format!("{mesh}-transmitter")
}

pub fn rendezvous_name(mesh: &str, i: u32) -> String {
    format!("{mesh}-rendezvous-{i}")
}

pub fn secret_name(mesh: &str) -> String {
    format!("{mesh}-token")
}

/// Addresses of the mesh's rendezvous points, as transmitters and sidecars are given them.
/// `0.0.0.0:port`: a pod's component listens on every interface.
/// The container security context of every process the operator runs (transmitters,
/// rendezvous points, injected sidecars): the image's non-root user, a read-only root
/// filesystem (they write nothing), no privilege escalation, no capabilities, the
/// runtime's default seccomp profile: Kubernetes' "restricted" Pod Security Standard.
pub fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// Mode of the files of a mounted Secret: readable by the container's non-root user (only
/// the containers that mount the volume see it).
pub const SECRET_FILE_MODE: i32 = 0o444;

/// Where the mesh token is mounted in transmitter and rendezvous pods.
pub const TOKEN_DIR: &str = "/var/run/thynapse/mesh";

/// The mesh token Secret as a volume, and its read-only mount at [`TOKEN_DIR`]: a file,
/// never an environment variable or a flag.
pub fn token_volume(mesh: &str) -> (Volume, VolumeMount) {
    let volume = Volume {
        name: "mesh-token".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name(mesh)),
            default_mode: Some(SECRET_FILE_MODE),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: "mesh-token".into(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    (volume, mount)
}

pub fn any_interface(port: i32) -> std::net::SocketAddr {
    let port = u16::try_from(port).expect("ports are 16 bits");
    std::net::SocketAddr::from(([0, 0, 0, 0], port))
}

pub fn rendezvous_addresses(mesh: &TransmitterMesh) -> Vec<String> {
    let ns = mesh.namespace().unwrap_or_else(|| "default".into());
    (0..mesh.spec.rendezvous.replicas)
        .map(|i| {
            format!(
                "udp://{}.{ns}.svc:{RENDEZVOUS_PORT}",
                rendezvous_name(&mesh.name_any(), i)
            )
        })
        .collect()
}

pub fn labels(mesh: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "thynapse".to_string()),
        ("app.kubernetes.io/instance".to_string(), mesh.to_string()),
        (COMPONENT_LABEL.to_string(), component.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
        (MESH_LABEL.to_string(), mesh.to_string()),
    ])
}

fn selector(mesh: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MESH_LABEL.to_string(), mesh.to_string()),
        (COMPONENT_LABEL.to_string(), component.to_string()),
    ])
}

fn meta(mesh: &TransmitterMesh, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: mesh.namespace(),
        labels: Some(labels(&mesh.name_any(), component)),
        owner_references: Some(vec![owner(mesh)]),
        ..ObjectMeta::default()
    }
}

/// The mesh as controller owner, so deleting it deletes everything it owns.
pub fn owner(mesh: &TransmitterMesh) -> OwnerReference {
    mesh.controller_owner_ref(&())
        .expect("a stored mesh has a name and uid")
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn port(name: &str, port: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some(protocol.into()),
        ..ContainerPort::default()
    }
}

fn service_port(name: &str, port: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some(protocol.into()),
        ..ServicePort::default()
    }
}

fn tcp_probe(port: i32, period: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(port),
            ..TCPSocketAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

/// Pod-template annotation naming the mesh token's version (a truncated SHA-256, which
/// tells nothing of the token): a token changed in its Secret changes the pod templates,
/// so Kubernetes rolls the transmitters and rendezvous points onto it, one at a time.
pub const TOKEN_VERSION: &str = "thynapse.io/token-version";

fn token_version(token: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(token.as_bytes())[..8])
}

/// The annotations of a pod that reads the mesh token (transmitters, rendezvous points).
fn token_pod_annotations(port: i32, token: &str) -> BTreeMap<String, String> {
    let mut a = prometheus_annotations(port);
    a.insert(TOKEN_VERSION.into(), token_version(token));
    a
}

fn prometheus_annotations(port: i32) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), port.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ])
}

pub fn image(mesh: &TransmitterMesh, inputs: &Inputs) -> String {
    mesh.spec
        .image
        .clone()
        .unwrap_or_else(|| inputs.default_image.clone())
}

/// Everything the mesh owns, from the mesh alone; one builder per object.
pub fn desired(mesh: &TransmitterMesh, inputs: &Inputs) -> Desired {
    Desired {
        config: config::config(mesh),
        secret: config::secret(mesh, inputs),
        transmitters: transmitters::stateful_set(mesh, inputs),
        headless: transmitters::headless(mesh),
        rendezvous: rendezvous::rendezvous_points(mesh, inputs),
        network_policy: network_policy::network_policy(mesh),
        pdb: transmitters::disruption_budget(mesh),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use thynapse_resources::TransmitterMeshSpec;

    pub(crate) fn mesh(yaml_spec: &str) -> TransmitterMesh {
        let spec: TransmitterMeshSpec = serde_yaml::from_str(yaml_spec).unwrap();
        let mut m = TransmitterMesh::new("demo", spec);
        m.metadata.namespace = Some("apps".into());
        m.metadata.uid = Some("1234".into());
        m
    }

    fn inputs() -> Inputs {
        Inputs {
            default_image: "thynapse:test".into(),
            rooms: BTreeMap::from([("lobby".to_string(), 2)]),
            token: "s3cret".into(),
        }
    }

    fn arg_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_new_token_rolls_the_transmitters_and_rendezvous_points() {
        let m = mesh("replicas: 3\nrendezvous: {replicas: 2}");
        let version = |d: &Desired| {
            let sts = d.transmitters.spec.template.metadata.clone();
            let rv = d.rendezvous[0].0.spec.template.metadata.clone();
            let of = |m: Option<ObjectMeta>| m.unwrap().annotations.unwrap()[TOKEN_VERSION].clone();
            (of(sts), of(rv))
        };
        let before = version(&desired(&m, &inputs()));
        assert_eq!(before, version(&desired(&m, &inputs())), "stable");
        let rotated = Inputs {
            token: "s3cret\nn3w".into(),
            ..inputs()
        };
        let after = version(&desired(&m, &rotated));
        assert!(after.0 != before.0 && after.1 != before.1, "both roll");
        assert!(!after.0.contains("s3cret") && after.0.len() == 16);
    }

    #[test]
    fn statefulset_of_transmitters() {
        let d = desired(&mesh("replicas: 3\nrendezvous: {replicas: 2}"), &inputs());
        let sts = &d.transmitters;
        assert_eq!(sts.metadata.name.as_deref(), Some("demo-transmitter"));
        assert_eq!(sts.metadata.namespace.as_deref(), Some("apps"));
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("TransmitterMesh", "demo", "1234")
        );
        assert_eq!(owner.controller, Some(true));
        let spec = &sts.spec;
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(spec.service_name.as_deref(), Some("demo-transmitter"));
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
            assert_eq!(template_labels.get(k), Some(v), "selector matches the pods");
        }
        let pod = spec.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("thynapse:test"));
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[0], "transmitter");
        assert_eq!(arg_after(args, "--name"), ["$(POD_NAME)"]);
        assert_eq!(arg_after(args, "--advertise-host"), ["$(POD_IP)"]);
        assert_eq!(
            arg_after(args, "--rendezvous"),
            [
                "udp://demo-rendezvous-0.apps.svc:7400",
                "udp://demo-rendezvous-1.apps.svc:7400"
            ]
        );
        assert_eq!(arg_after(args, "--announce-interval-ms"), ["500"]);
        assert_eq!(arg_after(args, "--max-message-bytes"), ["1048576"]);
        assert!(c.readiness_probe.as_ref().unwrap().tcp_socket.is_some());
        assert!(c.liveness_probe.is_some());
        let annotations = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(annotations["prometheus.io/port"], "9090");
        assert_eq!(pod.termination_grace_period_seconds, Some(12));
    }

    #[test]
    fn headless_service_publishes_not_ready_peers() {
        let d = desired(&mesh("replicas: 2"), &inputs());
        let spec = d.headless.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports: Vec<i32> = spec.ports.unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, [7000, 7001, 9090]);
    }

    #[test]
    fn a_rendezvous_point_per_replica_with_the_room_policy() {
        let d = desired(
            &mesh("replicas: 2\nrendezvous: {replicas: 2}\nrooms: {allowUndeclared: false, defaultReplicas: 3}"),
            &inputs(),
        );
        assert_eq!(d.rendezvous.len(), 2);
        let (dep, svc) = &d.rendezvous[1];
        assert_eq!(dep.metadata.name.as_deref(), Some("demo-rendezvous-1"));
        let c = &dep.spec.template.spec.as_ref().unwrap().containers[0];
        let args = c.args.as_ref().unwrap();
        assert_eq!(arg_after(args, "--room"), ["lobby=2"]);
        assert_eq!(arg_after(args, "--default-replicas"), ["3"]);
        assert!(args.contains(&"--forbid-undeclared".to_string()));
        let s = svc.spec.as_ref().unwrap();
        assert_eq!(
            s.ports.as_ref().unwrap()[0].protocol.as_deref(),
            Some("UDP")
        );
        assert_eq!(
            s.selector
                .as_ref()
                .unwrap()
                .get("thynapse.io/rendezvous")
                .map(String::as_str),
            Some("demo-rendezvous-1"),
            "each Service reaches its own point only"
        );
    }

    #[test]
    fn network_policy_lets_in_the_mesh_the_operator_and_prometheus() {
        let d = desired(&mesh("replicas: 1"), &inputs());
        let spec = d.network_policy.spec.unwrap();
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        let rules = spec.ingress.unwrap();
        assert_eq!(rules.len(), 3);
        let from_mesh = rules[0].from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap();
        assert_eq!(
            from_mesh.match_labels.as_ref().unwrap()["thynapse.io/mesh"],
            "demo"
        );
        assert!(rules[0].ports.is_none());
        assert_eq!(
            rules[2].ports.as_ref().unwrap()[0].port,
            Some(IntOrString::Int(9090))
        );
        // Metrics: this namespace's pods only, by default; not anyone.
        let from = rules[2].from.as_ref().expect("not from anywhere");
        assert_eq!(from.len(), 1);
        assert!(from[0].namespace_selector.is_none(), "this namespace");
        let d = desired(
            &mesh("replicas: 1\nmetrics: {allowFromNamespaces: [monitoring]}"),
            &inputs(),
        );
        let from = d.network_policy.spec.unwrap().ingress.unwrap()[2]
            .from
            .clone()
            .unwrap();
        let named = from[1]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(named["kubernetes.io/metadata.name"], "monitoring");
    }

    #[test]
    fn pdb_secret_and_config() {
        let d = desired(&mesh("replicas: 4"), &inputs());
        let pdb = d.pdb.spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            d.secret.data.unwrap()["token"],
            ByteString(b"s3cret".to_vec())
        );
        let yaml = &d.config.data.unwrap()["mesh.yaml"];
        assert!(yaml.contains("replicas: 4"));
        // The transmitters read the token from the Secret, mounted as a file.
        let pod = d.transmitters.spec.template.spec.unwrap();
        let volume = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("demo-token")
        );
        let c = &pod.containers[0];
        let args = c.args.as_ref().unwrap();
        let at = args.iter().position(|a| a == "--token-file").unwrap();
        let mount = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(args[at + 1], format!("{}/token", mount.mount_path));
        assert!(
            c.env.iter().flatten().all(|e| !e.name.contains("TOKEN")),
            "never in the environment"
        );
    }

    #[test]
    fn encryption_reaches_the_transmitters_and_the_injected_sidecars() {
        for (spec, on) in [
            ("replicas: 2", false),
            ("replicas: 2\nsecurity: {encryption: true}", true),
        ] {
            let m = mesh(spec);
            let d = desired(&m, &inputs());
            let pod = d.transmitters.spec.template.spec.unwrap();
            let args = pod.containers[0].args.clone().unwrap();
            assert_eq!(args.iter().any(|a| a == "--encrypt"), on, "{spec}");
            let service = thynapse_resources::Service::new(
                "workers",
                serde_json::from_str(r#"{"mesh": "demo"}"#).unwrap(),
            );
            let sidecar = crate::inject::sidecar(&m, &service, &inputs());
            let args = sidecar.args.unwrap();
            assert_eq!(args.iter().any(|a| a == "--encrypt"), on, "{spec}");
        }
    }

    #[test]
    fn every_container_runs_non_root_read_only_without_privileges() {
        let d = desired(&mesh("replicas: 2"), &inputs());
        let mut containers = d.transmitters.spec.template.spec.unwrap().containers;
        for (deployment, _) in d.rendezvous {
            containers.extend(deployment.spec.template.spec.unwrap().containers);
        }
        assert_eq!(containers.len(), 2);
        for c in containers {
            let sc = c.security_context.expect("a security context");
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
            assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        }
    }

    #[test]
    fn a_services_key_secret_holds_its_key_and_not_the_token() {
        let spec = serde_yaml::from_str("mesh: demo").unwrap();
        let mut service = thynapse_resources::Service::new("workers", spec);
        service.metadata.namespace = Some("apps".into());
        service.metadata.uid = Some("u-1".into());
        let secret = service_key_secret(&service, "s3cret");
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some("workers-thynapse-key")
        );
        let key = String::from_utf8(secret.data.unwrap()["key"].0.clone()).unwrap();
        let expected = thynapse_protocol::auth::Key::service(b"s3cret", "workers");
        assert_eq!(key, expected.to_hex());
        assert!(!key.contains("s3cret"));
        let owner = &secret.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Service", "u-1"),
            "goes with its Service"
        );
        // A restricted Service's key is derived with its permissions.
        let spec = serde_yaml::from_str("{mesh: demo, permissions: {publish: []}}").unwrap();
        let reader = thynapse_resources::Service::new("reader", spec);
        let secret = service_key_secret(&reader, "s3cret");
        let key = String::from_utf8(secret.data.unwrap()["key"].0.clone()).unwrap();
        let identity = r#"reader {"publish":[]}"#;
        let expected = thynapse_protocol::auth::Key::service(b"s3cret", identity);
        assert_eq!(key, expected.to_hex());
    }

    #[test]
    fn image_and_resources_come_from_the_spec() {
        let d = desired(
            &mesh("replicas: 1\nimage: my/thynapse:1\nresources: {limits: {memory: 64Mi}}"),
            &inputs(),
        );
        let c = &d.transmitters.spec.template.spec.unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("my/thynapse:1"));
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"].0, "64Mi");
    }
}
