//! The reconcilers, in the fetch → build → apply shape: read what the desired state
//! depends on, compute it with the pure builders, apply it with server-side apply under
//! one field manager, then write what was observed into `status`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service as CoreService};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thynapse_resources::{
    Room, RoomStatus, Service, ServiceStatus, TransmitterMesh, TransmitterMeshStatus,
};

use crate::builders::{self, Desired, Inputs, COMPONENT_LABEL, MANAGER, MESH_LABEL};
use crate::conditions::{self, MeshObservation};
use crate::inject;
use crate::metrics::Metrics;
use crate::rendezvous;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Apply(String),
}

/// Settings shared by the controllers.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub default_image: String,
    /// Rendezvous addresses to use instead of the in-cluster ones, by mesh name: for an
    /// operator running outside the cluster (development, tests).
    pub rendezvous_override: HashMap<String, Vec<String>>,
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Consecutive failures per object, for the error back-off.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, recorder: Recorder, metrics: Metrics, settings: Settings) -> Self {
        Context {
            client,
            recorder,
            metrics,
            settings,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().expect("not poisoned").remove(key);
    }

    /// 5 s, 10 s, 20 s … up to 5 minutes.
    fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().expect("not poisoned");
        let n = f.entry(key.to_string()).or_insert(0);
        *n = (*n + 1).min(10);
        Duration::from_secs((5u64 << (*n - 1)).min(300))
    }
}

fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
}

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

async fn apply_all(client: &Client, ns: &str, d: &Desired) -> Result<(), kube::Error> {
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
    Ok(())
}

/// Deletes rendezvous points beyond the mesh's replicas (after a scale-down).
async fn prune_rendezvous(
    client: &Client,
    ns: &str,
    mesh: &str,
    d: &Desired,
) -> Result<(), kube::Error> {
    let keep: Vec<String> = d.rendezvous.iter().map(|(dep, _)| dep.name_any()).collect();
    let selector = format!("{MESH_LABEL}={mesh},{COMPONENT_LABEL}=rendezvous");
    let lp = ListParams::default().labels(&selector);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for dep in deployments.list(&lp).await? {
        if !keep.contains(&dep.name_any()) {
            deployments
                .delete(&dep.name_any(), &DeleteParams::default())
                .await?;
        }
    }
    let services: Api<CoreService> = Api::namespaced(client.clone(), ns);
    for svc in services.list(&lp).await? {
        if !keep.contains(&svc.name_any()) {
            services
                .delete(&svc.name_any(), &DeleteParams::default())
                .await?;
        }
    }
    Ok(())
}

async fn patch_status<K>(
    client: &Client,
    obj: &K,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
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

async fn publish<K: Resource<DynamicType = ()>>(
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

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// TransmitterMesh → its StatefulSet, Services, rendezvous points, config, Secret,
/// NetworkPolicy and PodDisruptionBudget.
pub async fn reconcile_mesh(
    mesh: Arc<TransmitterMesh>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = mesh.namespace().unwrap_or_else(|| "default".into());
    let name = mesh.name_any();
    let client = &ctx.client;

    // Fetch: the mesh's Rooms (for the rendezvous) and its token, if it has one.
    let rooms: Api<Room> = Api::namespaced(client.clone(), &ns);
    let declared: BTreeMap<String, u32> = rooms
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|r| r.spec.mesh == name)
        .map(|r| {
            let replicas = r.spec.replicas.unwrap_or(mesh.spec.rooms.default_replicas);
            (r.name_any(), replicas)
        })
        .collect();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let token = secrets
        .get_opt(&builders::secret_name(&name))
        .await?
        .and_then(|s| {
            s.data?
                .get("token")
                .map(|t| String::from_utf8_lossy(&t.0).into_owned())
        })
        .unwrap_or_else(random_token);

    // Build, then apply.
    let inputs = Inputs {
        default_image: ctx.settings.default_image.clone(),
        rooms: declared,
        token,
    };
    let desired = builders::desired(&mesh, &inputs);
    let applied = match apply_all(client, &ns, &desired).await {
        Ok(()) => prune_rendezvous(client, &ns, &name, &desired).await,
        Err(e) => Err(e),
    };

    // Observe and report.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let ready = sts
        .get_opt(&builders::transmitter_name(&name))
        .await
        .ok()
        .flatten()
        .and_then(|s| s.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let observation = MeshObservation {
        generation: mesh.metadata.generation,
        desired: mesh.spec.replicas as i32,
        ready,
        error: applied.as_ref().err().map(|e| e.to_string()),
    };
    let old = mesh.status.clone().unwrap_or_default();
    let status = TransmitterMeshStatus {
        observed_generation: mesh.metadata.generation,
        ready_transmitters: ready,
        rendezvous: Some(builders::rendezvous_addresses(&mesh).join(",")),
        conditions: conditions::merge(
            &old.conditions,
            conditions::mesh_conditions(&observation, Timestamp::now()),
        ),
    };
    if status != old {
        patch_status(
            client,
            mesh.as_ref(),
            serde_json::to_value(&status).expect("status serialises"),
        )
        .await?;
        match &observation.error {
            Some(e) => {
                publish(
                    &ctx,
                    mesh.as_ref(),
                    EventType::Warning,
                    "ApplyFailed",
                    e.clone(),
                )
                .await
            }
            None => {
                let note = format!("{}/{} transmitters ready", ready, mesh.spec.replicas);
                publish(&ctx, mesh.as_ref(), EventType::Normal, "Reconciled", note).await
            }
        }
    }
    ctx.metrics
        .durations
        .with_label_values(&["transmittermesh"])
        .observe(started.elapsed().as_secs_f64());
    applied?;
    // Pods come up on their own; look again soon while they do.
    Ok(if ready < mesh.spec.replicas as i32 {
        Action::requeue(Duration::from_secs(10))
    } else {
        Action::requeue(Duration::from_secs(300))
    })
}

/// Room → where the mesh's rendezvous placed it, in `status.transmitters`.
pub async fn reconcile_room(room: Arc<Room>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = room.namespace().unwrap_or_else(|| "default".into());
    let meshes: Api<TransmitterMesh> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Timestamp::now();
    let generation = room.metadata.generation;
    let status = match meshes.get_opt(&room.spec.mesh).await? {
        None => RoomStatus {
            observed_generation: generation,
            transmitters: vec![],
            conditions: conditions::ready(
                false,
                "MeshNotFound",
                format!("no TransmitterMesh {:?} in {ns}", room.spec.mesh),
                generation,
                now,
            ),
        },
        Some(mesh) => {
            let addresses = ctx
                .settings
                .rendezvous_override
                .get(&mesh.name_any())
                .cloned()
                .unwrap_or_else(|| builders::rendezvous_addresses(&mesh));
            let replicas = room
                .spec
                .replicas
                .unwrap_or(mesh.spec.rooms.default_replicas);
            match rendezvous::locate(&addresses, &mesh.name_any(), &room.name_any()).await {
                Ok(hosts) => {
                    let placed = hosts.len() as u32 >= replicas;
                    let message = format!("on {} of {replicas} transmitters", hosts.len());
                    RoomStatus {
                        observed_generation: generation,
                        conditions: conditions::ready(
                            placed,
                            if placed { "Placed" } else { "Placing" },
                            message,
                            generation,
                            now,
                        ),
                        transmitters: hosts,
                    }
                }
                Err(e) => RoomStatus {
                    observed_generation: generation,
                    transmitters: room
                        .status
                        .as_ref()
                        .map(|s| s.transmitters.clone())
                        .unwrap_or_default(),
                    conditions: conditions::ready(
                        false,
                        "RendezvousUnreachable",
                        e,
                        generation,
                        now,
                    ),
                },
            }
        }
    };
    let old = room.status.clone().unwrap_or_default();
    let status = RoomStatus {
        conditions: conditions::merge(&old.conditions, status.conditions),
        ..status
    };
    if status != old {
        patch_status(
            &ctx.client,
            room.as_ref(),
            serde_json::to_value(&status).expect("status serialises"),
        )
        .await?;
        if status.transmitters != old.transmitters && !status.transmitters.is_empty() {
            let note = format!("placed on {}", status.transmitters.join(", "));
            publish(&ctx, room.as_ref(), EventType::Normal, "Placed", note).await;
        }
    }
    ctx.metrics
        .durations
        .with_label_values(&["room"])
        .observe(started.elapsed().as_secs_f64());
    // Placements follow failovers: look again now and then.
    Ok(Action::requeue(Duration::from_secs(
        if status.transmitters.is_empty() {
            5
        } else {
            30
        },
    )))
}

/// Service → how many running cells it has. Its delivery rules reach its sidecars with
/// the injection (pods created after a change of rules get the new ones).
pub async fn reconcile_service(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = service.namespace().unwrap_or_else(|| "default".into());
    let now = Timestamp::now();
    let generation = service.metadata.generation;
    let meshes: Api<TransmitterMesh> = Api::namespaced(ctx.client.clone(), &ns);
    let mesh_found = meshes.get_opt(&service.spec.mesh).await?.is_some();
    let selector = inject::selector_of(&service)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let cells = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .into_iter()
        .filter(inject::already_injected)
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count() as i32;
    let (ok, reason, message) = if mesh_found {
        (true, "MeshFound", format!("{cells} cells running"))
    } else {
        (
            false,
            "MeshNotFound",
            format!("no TransmitterMesh {:?} in {ns}", service.spec.mesh),
        )
    };
    let old = service.status.clone().unwrap_or_default();
    let status = ServiceStatus {
        observed_generation: generation,
        cells,
        conditions: conditions::merge(
            &old.conditions,
            conditions::ready(ok, reason, message, generation, now),
        ),
    };
    if status != old {
        patch_status(
            &ctx.client,
            service.as_ref(),
            serde_json::to_value(&status).expect("status serialises"),
        )
        .await?;
    }
    ctx.metrics
        .durations
        .with_label_values(&["service"])
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn error_policy<K: Resource<DynamicType = ()>>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, error, ctx| {
        let wait = ctx.backoff(&key(obj.as_ref()));
        tracing::warn!(controller, object = %key(obj.as_ref()), ?wait, "reconcile failed: {error}");
        Action::requeue(wait)
    }
}

/// Runs the three controllers until the process stops. `namespace` limits them to one
/// namespace; all namespaces otherwise.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let wc = watcher::Config::default();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));

    let meshes = Controller::new(api::<TransmitterMesh>(&client, &namespace), wc.clone())
        .owns(api::<StatefulSet>(&client, &namespace), owned.clone())
        .owns(api::<Deployment>(&client, &namespace), owned.clone())
        .owns(api::<CoreService>(&client, &namespace), owned.clone())
        .owns(api::<ConfigMap>(&client, &namespace), owned.clone())
        .owns(api::<Secret>(&client, &namespace), owned.clone())
        .owns(api::<NetworkPolicy>(&client, &namespace), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned)
        // A Room changes the rendezvous' declared rooms.
        .watches(api::<Room>(&client, &namespace), wc.clone(), |room| {
            Some(ObjectRef::<TransmitterMesh>::new(&room.spec.mesh).within(&room.namespace()?))
        })
        .run(reconcile_mesh, error_policy("transmittermesh"), ctx.clone())
        .for_each(counted(ctx.clone(), "transmittermesh"));

    let rooms = Controller::new(api::<Room>(&client, &namespace), wc.clone())
        .run(reconcile_room, error_policy("room"), ctx.clone())
        .for_each(counted(ctx.clone(), "room"));

    let services = Controller::new(api::<Service>(&client, &namespace), wc.clone());
    let store = services.store();
    let services = services
        // Cells coming and going change a Service's count.
        .watches(
            api::<Pod>(&client, &namespace),
            watcher::Config::default().labels(MESH_LABEL),
            move |pod| {
                let all = store.state();
                let found = inject::service_for(&pod, all.iter().map(|s| s.as_ref()))?;
                Some(ObjectRef::from_obj(found))
            },
        )
        .run(reconcile_service, error_policy("service"), ctx.clone())
        .for_each(counted(ctx.clone(), "service"));

    futures::join!(meshes, rooms, services);
}

type Outcome<K> =
    Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<Error, watcher::Error>>;

fn counted<K: Resource<DynamicType = ()>>(
    ctx: Arc<Context>,
    controller: &'static str,
) -> impl FnMut(Outcome<K>) -> futures::future::Ready<()> {
    move |outcome| {
        match outcome {
            Ok((obj, _)) => {
                ctx.succeeded(&format!(
                    "{}/{}/{}",
                    K::kind(&()),
                    obj.namespace.as_deref().unwrap_or(""),
                    obj.name
                ));
                ctx.metrics
                    .reconciles
                    .with_label_values(&[controller, "ok"])
                    .inc();
            }
            Err(e) => {
                ctx.metrics
                    .reconciles
                    .with_label_values(&[controller, "error"])
                    .inc();
                tracing::debug!(controller, "{e}");
            }
        }
        futures::future::ready(())
    }
}
