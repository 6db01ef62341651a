//! Apply: the desired objects with server-side apply under one field manager, the
//! pruning of what a scale-down left behind, and the status subresource.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service as CoreService};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Context;
use crate::builders::{Desired, COMPONENT_LABEL, MANAGER, MESH_LABEL};

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = PatchParams::apply(MANAGER).force();
    api.patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?;
    Ok(())
}

/// A Secret the operator owns (a Service's key).
pub(super) async fn secret(client: &Client, ns: &str, secret: &Secret) -> Result<(), kube::Error> {
    apply(client, ns, secret).await
}

/// Every object of a mesh, then the rendezvous points beyond its replicas removed.
pub(super) async fn mesh(
    client: &Client,
    ns: &str,
    mesh: &str,
    d: &Desired,
) -> Result<(), kube::Error> {
    apply(client, ns, &d.config).await?;
    apply(client, ns, &d.secret).await?;
    apply(client, ns, &d.headless).await?;
    apply(client, ns, &d.transmitters).await?;
    for (deployment, service) in &d.rendezvous {
        apply(client, ns, deployment).await?;
        apply(client, ns, service).await?;
    }
    apply(client, ns, &d.network_policy).await?;
    apply(client, ns, &d.pdb).await?;
    prune_rendezvous(client, ns, mesh, d).await
}

/// Deletes rendezvous points beyond the mesh's replicas (after a scale-down): their
/// Deployments and Services.
async fn prune_rendezvous(
    client: &Client,
    ns: &str,
    mesh: &str,
    d: &Desired,
) -> Result<(), kube::Error> {
    let keep: Vec<String> = d.rendezvous.iter().map(|(dep, _)| dep.name_any()).collect();
    let selector = format!("{MESH_LABEL}={mesh},{COMPONENT_LABEL}=rendezvous");
    let lp = ListParams::default().labels(&selector);
    delete_others::<Deployment>(client, ns, &lp, &keep).await?;
    delete_others::<CoreService>(client, ns, &lp, &keep).await
}

/// Deletes the objects of kind `K` that `lp` selects and `keep` does not name.
async fn delete_others<K>(
    client: &Client,
    ns: &str,
    lp: &ListParams,
    keep: &[String],
) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    for obj in api.list(lp).await? {
        if !keep.contains(&obj.name_any()) {
            api.delete(&obj.name_any(), &DeleteParams::default())
                .await?;
        }
    }
    Ok(())
}

/// Writes `status` into `obj`'s status subresource.
pub(super) async fn status<K, S>(client: &Client, obj: &K, status: &S) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
    S: Serialize,
{
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Records a Kubernetes Event on `obj` (best effort: an Event lost is only logged).
pub(super) async fn event<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::debug!("publishing an event: {e}");
    }
}
