//! The rendezvous points: one Deployment and Service each.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec, Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt;
use thynapse_process::ToArgs;
use thynapse_resources::{flags, TransmitterMesh};

use super::{
    any_interface, image, labels, meta, port, rendezvous_name, selector, service_port,
    token_pod_annotations, Inputs, METRICS_PORT, RENDEZVOUS_PORT, TOKEN_DIR,
};

/// One Deployment and Service per rendezvous point: UDP announcements must all reach
/// the same point, which a load-balanced Service over several pods would not do.
pub(super) fn rendezvous_points(
    mesh: &TransmitterMesh,
    inputs: &Inputs,
) -> Vec<(Deployment, Service)> {
    let name = mesh.name_any();
    let spec = &mesh.spec;
    let image = image(mesh, inputs);
    (0..spec.rendezvous.replicas)
        .map(|i| {
            let point = rendezvous_name(&name, i);
            let component = "rendezvous";
            let mut pod_labels = labels(&name, component);
            pod_labels.insert("thynapse.io/rendezvous".into(), point.clone());
            let mut select = selector(&name, component);
            select.insert("thynapse.io/rendezvous".into(), point.clone());
            let rooms = inputs.rooms.iter().map(|(r, n)| (r.as_str(), Some(*n)));
            let mut args = flags::rendezvous(&name, spec, rooms);
            args.bind = any_interface(RENDEZVOUS_PORT);
            args.metrics_bind = any_interface(METRICS_PORT);
            // It opens and seals every datagram with the mesh token.
            args.token_file = Some(format!("{TOKEN_DIR}/token"));
            let (token_volume, token_mount) = super::token_volume(&name);
            let deployment = Deployment {
                metadata: meta(mesh, point.clone(), component),
                spec: DeploymentSpec {
                    replicas: Some(1),
                    selector: LabelSelector {
                        match_labels: Some(select.clone()),
                        ..LabelSelector::default()
                    },
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(pod_labels),
                            annotations: Some(token_pod_annotations(METRICS_PORT, &inputs.token)),
                            ..ObjectMeta::default()
                        }),
                        spec: Some(PodSpec {
                            containers: vec![Container {
                                name: "rendezvous".into(),
                                security_context: Some(super::restricted()),
                                image: Some(image.clone()),
                                command: Some(vec!["thynapse".into()]),
                                args: Some(args.to_args()),
                                ports: Some(vec![
                                    port("discovery", RENDEZVOUS_PORT, "UDP"),
                                    port("metrics", METRICS_PORT, "TCP"),
                                ]),
                                volume_mounts: Some(vec![token_mount]),
                                ..Container::default()
                            }],
                            volumes: Some(vec![token_volume]),
                            ..PodSpec::default()
                        }),
                    },
                    ..DeploymentSpec::default()
                },
                ..Deployment::default()
            };
            let service = Service {
                metadata: meta(mesh, point, component),
                spec: Some(ServiceSpec {
                    selector: Some(select),
                    ports: Some(vec![service_port("discovery", RENDEZVOUS_PORT, "UDP")]),
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            };
            (deployment, service)
        })
        .collect()
}
