//! The transmitters: their StatefulSet, the headless Service peers and cells find them by,
//! and the PodDisruptionBudget that drains one at a time.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec, Service, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use thynapse_process::ToArgs;
use thynapse_resources::{flags, TransmitterMesh};

use super::{
    any_interface, field_env, image, labels, meta, port, rendezvous_addresses, restricted,
    selector, service_port, tcp_probe, token_pod_annotations, transmitter_name, Inputs,
    COMMAND_PORT, EVENT_PORT, METRICS_PORT, TOKEN_DIR,
};

/// The transmitters: a StatefulSet of peers, started and stopped all at once.
pub(super) fn stateful_set(mesh: &TransmitterMesh, inputs: &Inputs) -> StatefulSet {
    let name = mesh.name_any();
    let spec = &mesh.spec;
    let image = image(mesh, inputs);
    let rendezvous = rendezvous_addresses(mesh);
    let mut transmitter_args = flags::transmitter(&name, "$(POD_NAME)", spec, &rendezvous);
    transmitter_args.command_bind = format!("tcp://0.0.0.0:{COMMAND_PORT}");
    transmitter_args.event_bind = format!("tcp://0.0.0.0:{EVENT_PORT}");
    transmitter_args.advertise_host = "$(POD_IP)".into();
    transmitter_args.metrics_bind = any_interface(METRICS_PORT);
    // The mesh token, from its Secret (a file, never an environment variable or a flag).
    transmitter_args.token_file = Some(format!("{TOKEN_DIR}/token"));
    let (token_volume, token_mount) = super::token_volume(&name);
    let transmitter_labels = labels(&name, "transmitter");
    StatefulSet {
        metadata: meta(mesh, transmitter_name(&name), "transmitter"),
        spec: StatefulSetSpec {
            replicas: Some(spec.replicas as i32),
            service_name: Some(transmitter_name(&name)),
            // Transmitters are peers: start and stop them all at once, not one by one.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector(&name, "transmitter")),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(transmitter_labels),
                    annotations: Some(token_pod_annotations(METRICS_PORT, &inputs.token)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // A drain moves cells away within a few expiries (see docs).
                    termination_grace_period_seconds: Some(
                        (spec.rendezvous.expiry_ms() * 5 / 1000 + 5) as i64,
                    ),
                    containers: vec![Container {
                        name: "transmitter".into(),
                        image: Some(image.clone()),
                        command: Some(vec!["thynapse".into()]),
                        args: Some(transmitter_args.to_args()),
                        env: Some(vec![
                            field_env("POD_NAME", "metadata.name"),
                            field_env("POD_IP", "status.podIP"),
                        ]),
                        ports: Some(vec![
                            port("command", COMMAND_PORT, "TCP"),
                            port("event", EVENT_PORT, "TCP"),
                            port("metrics", METRICS_PORT, "TCP"),
                        ]),
                        readiness_probe: Some(tcp_probe(COMMAND_PORT, 5)),
                        liveness_probe: Some(tcp_probe(COMMAND_PORT, 10)),
                        resources: spec.resources.clone(),
                        security_context: Some(restricted()),
                        volume_mounts: Some(vec![token_mount]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![token_volume]),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

/// The headless Service: stable names for the transmitters, before they are ready.
pub(super) fn headless(mesh: &TransmitterMesh) -> Service {
    let name = mesh.name_any();
    Service {
        metadata: meta(mesh, transmitter_name(&name), "transmitter"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Peers must find each other before they are ready.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(&name, "transmitter")),
            ports: Some(vec![
                service_port("command", COMMAND_PORT, "TCP"),
                service_port("event", EVENT_PORT, "TCP"),
                service_port("metrics", METRICS_PORT, "TCP"),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub(super) fn disruption_budget(mesh: &TransmitterMesh) -> PodDisruptionBudget {
    let name = mesh.name_any();
    PodDisruptionBudget {
        metadata: meta(mesh, transmitter_name(&name), "transmitter"),
        spec: Some(PodDisruptionBudgetSpec {
            // One transmitter drains at a time; its cells move to the others.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(&name, "transmitter")),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
