//! The mesh's NetworkPolicy.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use thynapse_resources::TransmitterMesh;

use super::{meta, COMPONENT_LABEL, MESH_LABEL, METRICS_PORT, RENDEZVOUS_PORT};

/// Who may reach the mesh's pods: its cells and its own pods, the operator (rendezvous,
/// UDP), and Prometheus (metrics port).
pub(super) fn network_policy(mesh: &TransmitterMesh) -> NetworkPolicy {
    let name = mesh.name_any();
    let mesh_pods = |extra: Option<(&str, &str)>| {
        let mut labels = BTreeMap::from([(MESH_LABEL.to_string(), name.clone())]);
        if let Some((k, v)) = extra {
            labels.insert(k.into(), v.into());
        }
        labels
    };
    NetworkPolicy {
        metadata: meta(mesh, name.clone(), "network-policy"),
        spec: Some(NetworkPolicySpec {
            // The mesh's own pods: transmitters and rendezvous points.
            pod_selector: Some(LabelSelector {
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: COMPONENT_LABEL.into(),
                        operator: "In".into(),
                        values: Some(vec!["transmitter".into(), "rendezvous".into()]),
                    },
                ]),
                match_labels: Some(mesh_pods(None)),
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                // Cells (labelled by the webhook) and the mesh's own pods, in this namespace.
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(mesh_pods(None)),
                            ..LabelSelector::default()
                        }),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ..NetworkPolicyIngressRule::default()
                },
                // The operator asks the rendezvous where rooms live.
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(LabelSelector::default()),
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/name".to_string(),
                                "thynapse-operator".to_string(),
                            )])),
                            ..LabelSelector::default()
                        }),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(RENDEZVOUS_PORT)),
                        protocol: Some("UDP".into()),
                        ..NetworkPolicyPort::default()
                    }]),
                },
                // Prometheus, on the metrics port only: from this namespace and the ones
                // the mesh names (`spec.metrics.allowFromNamespaces`), not from anywhere.
                NetworkPolicyIngressRule {
                    from: Some(metrics_sources(mesh)),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::Int(METRICS_PORT)),
                        protocol: Some("TCP".into()),
                        ..NetworkPolicyPort::default()
                    }]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// The pods that may scrape: every pod of the mesh's namespace, and of each namespace
/// named in `spec.metrics.allowFromNamespaces` (by the label Kubernetes gives every
/// namespace, `kubernetes.io/metadata.name`).
fn metrics_sources(mesh: &TransmitterMesh) -> Vec<NetworkPolicyPeer> {
    let own = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector::default()),
        ..NetworkPolicyPeer::default()
    };
    let named = mesh
        .spec
        .metrics
        .allow_from_namespaces
        .iter()
        .map(|ns| NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    ns.clone(),
                )])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        });
    std::iter::once(own).chain(named).collect()
}
