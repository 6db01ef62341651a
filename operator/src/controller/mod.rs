//! The reconcilers, each a pipeline in the shape of Stackable's operators: fetch what
//! the desired state depends on (`fetch`), validate the spec (`validate`), build the
//! desired objects with the pure builders (`crate::builders`), apply them with
//! server-side apply under one field manager (`apply`), then write what was observed
//! into `status` (`status`, pure) and an Event when it changed.

mod apply;
mod fetch;
mod status;
mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service as CoreService};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use thynapse_protocol::auth::tokens_from;
use thynapse_protocol::seal::Sealer;
use thynapse_resources::{Room, Service, TransmitterMesh};

use crate::builders::{self, COMPONENT_LABEL, MANAGER, MESH_LABEL};
use crate::conditions::MeshObservation;
use crate::inject;
use crate::metrics::Metrics;
use crate::rendezvous;
use status::RoomLookup;

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
    /// The error back-off of each object failing in a row.
    failures: Mutex<HashMap<String, ExponentialBackoff>>,
}

/// 5 s, 10 s, 20 s … up to 5 minutes between retries of an object that keeps failing.
const RETRIES: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(5))
    .with_max_delay(Duration::from_secs(300))
    .without_max_times();

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

    fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().expect("not poisoned");
        let retries = f.entry(key.to_string()).or_insert_with(|| RETRIES.build());
        retries.next().unwrap_or(Duration::from_secs(300))
    }

    fn observe(&self, controller: &str, started: Instant) {
        self.metrics
            .durations
            .with_label_values(&[controller])
            .observe(started.elapsed().as_secs_f64());
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

    let inputs = fetch::mesh_inputs(client, &mesh, &ctx.settings.default_image).await?;
    let invalid = validate::mesh(&mesh).err();
    let applied = match &invalid {
        Some(e) => Err(e.clone()),
        None => {
            let desired = builders::desired(&mesh, &inputs);
            apply::mesh(client, &ns, &name, &desired)
                .await
                .map_err(|e| e.to_string())
        }
    };

    let ready = fetch::ready_transmitters(client, &ns, &name).await;
    let observation = MeshObservation {
        generation: mesh.metadata.generation,
        desired: mesh.spec.replicas as i32,
        ready,
        error: applied.as_ref().err().cloned(),
        invalid: invalid.is_some(),
    };
    let old = mesh.status.clone().unwrap_or_default();
    let addresses = builders::rendezvous_addresses(&mesh);
    let new = status::mesh(&old, &observation, &addresses, Timestamp::now());
    if new != old {
        apply::status(client, mesh.as_ref(), &new).await?;
        let (type_, reason, note) = match &observation.error {
            Some(e) if invalid.is_some() => (EventType::Warning, "InvalidSpec", e.clone()),
            Some(e) => (EventType::Warning, "ApplyFailed", e.clone()),
            None => {
                let note = format!("{}/{} transmitters ready", ready, mesh.spec.replicas);
                (EventType::Normal, "Reconciled", note)
            }
        };
        apply::event(&ctx, mesh.as_ref(), type_, reason, note).await;
    }
    ctx.observe("transmittermesh", started);
    if invalid.is_some() {
        // Nothing to do until the spec changes.
        return Ok(Action::await_change());
    }
    applied.map_err(Error::Apply)?;
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
    let mesh = fetch::mesh(&ctx.client, &ns, &room.spec.mesh).await?;
    let lookup = match (validate::room(&room), mesh) {
        (Err(e), _) => RoomLookup::Invalid(e),
        (Ok(()), None) => RoomLookup::MeshNotFound {
            mesh: room.spec.mesh.clone(),
            ns: ns.clone(),
        },
        (Ok(()), Some(mesh)) => {
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
            // Asked as the mesh: sealed with its token (read from the mesh's Secret).
            let tokens = fetch::mesh_token(&ctx.client, &ns, &mesh.name_any())
                .await?
                .map(|t| tokens_from(&t))
                .unwrap_or_default();
            let sealer = Sealer::peer(&tokens, &mesh.name_any());
            match rendezvous::locate(
                &addresses,
                &mesh.name_any(),
                &room.name_any(),
                sealer.as_ref(),
            )
            .await
            {
                Ok(hosts) => RoomLookup::Located { hosts, replicas },
                Err(e) => RoomLookup::Unreachable(e),
            }
        }
    };
    let old = room.status.clone().unwrap_or_default();
    let new = status::room(&old, lookup, room.metadata.generation, Timestamp::now());
    if new != old {
        apply::status(&ctx.client, room.as_ref(), &new).await?;
        if new.transmitters != old.transmitters && !new.transmitters.is_empty() {
            let note = format!("placed on {}", new.transmitters.join(", "));
            apply::event(&ctx, room.as_ref(), EventType::Normal, "Placed", note).await;
        }
    }
    ctx.observe("room", started);
    // Placements follow failovers: look again now and then.
    let again = if new.transmitters.is_empty() { 5 } else { 30 };
    Ok(Action::requeue(Duration::from_secs(again)))
}

/// Service → how many running cells it has. Its delivery rules reach its sidecars with
/// the injection (pods created after a change of rules get the new ones).
pub async fn reconcile_service(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = service.namespace().unwrap_or_else(|| "default".into());
    let mesh = fetch::mesh(&ctx.client, &ns, &service.spec.mesh).await?;
    let cells = fetch::running_cells(&ctx.client, &ns, &service).await?;
    let problem = match (validate::service(&service), mesh) {
        (Err(e), _) => Some(("InvalidSpec", e)),
        (Ok(()), None) => {
            let message = format!("no TransmitterMesh {:?} in {ns}", service.spec.mesh);
            Some(("MeshNotFound", message))
        }
        (Ok(()), Some(_)) => None,
    };
    // The Service's key, derived from the mesh's token once the mesh has one.
    let mut requeue = Duration::from_secs(60);
    if problem.is_none() {
        match fetch::mesh_token(&ctx.client, &ns, &service.spec.mesh).await? {
            Some(token) => {
                apply::secret(
                    &ctx.client,
                    &ns,
                    &builders::service_key_secret(&service, &token),
                )
                .await?
            }
            None => requeue = Duration::from_secs(2),
        }
    }
    let old = service.status.clone().unwrap_or_default();
    let generation = service.metadata.generation;
    let new = status::service(&old, problem, cells, generation, Timestamp::now());
    if new != old {
        apply::status(&ctx.client, service.as_ref(), &new).await?;
    }
    ctx.observe("service", started);
    Ok(Action::requeue(requeue))
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
    let by_mesh = store.clone();
    let services = services
        // A mesh token changed (a rotation): every Service of the mesh derives its key again.
        .watches(
            api::<Secret>(&client, &namespace),
            watcher::Config::default().labels(&format!("{COMPONENT_LABEL}=token")),
            move |secret| {
                let ns = secret.namespace();
                let mesh = secret.labels().get(MESH_LABEL).cloned();
                by_mesh
                    .state()
                    .into_iter()
                    .filter(|s| Some(&s.spec.mesh) == mesh.as_ref() && s.namespace() == ns)
                    .map(|s| ObjectRef::from_obj(s.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
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
