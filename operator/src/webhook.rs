//! The mutating admission webhook that injects the sidecar into cell pods, served over
//! HTTPS (axum behind tokio-rustls). The decision and the patch are `inject`'s pure
//! functions; this module reads the Services and mesh they need and speaks AdmissionReview.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use kube::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thynapse_resources::{Service, TransmitterMesh};
use tokio_rustls::TlsAcceptor;

use crate::builders::Inputs;
use crate::inject;
use crate::metrics::Metrics;

pub struct WebhookState {
    pub client: Client,
    pub default_image: String,
    pub metrics: Metrics,
}

/// A certificate and key in PEM.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl Tls {
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Tls> {
        Ok(Tls {
            cert_pem: std::fs::read(cert)?,
            key_pem: std::fs::read(key)?,
        })
    }

    /// The certificate every replica serves when none is mounted: generated once, by
    /// whichever replica comes first, into the Secret `name` (type `kubernetes.io/tls`);
    /// the others read it. Were each to generate its own, the webhook configuration's CA
    /// bundle could trust only one, and requests reaching another would fail TLS (with
    /// `failurePolicy: Ignore`, pods would start without their sidecar).
    pub async fn shared(
        client: &Client,
        namespace: &str,
        name: &str,
        dns_names: &[String],
    ) -> anyhow::Result<Tls> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        for _ in 0..5 {
            if let Some(secret) = api.get_opt(name).await? {
                return Tls::from_secret(&secret)
                    .with_context(|| format!("Secret {namespace}/{name}"));
            }
            let tls = Tls::generate(dns_names)?;
            match api
                .create(&PostParams::default(), &tls.to_secret(name))
                .await
            {
                Ok(_) => {
                    tracing::info!(%namespace, %name, "webhook certificate generated into a Secret");
                    return Ok(tls);
                }
                // Another replica created it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("Secret {namespace}/{name} neither readable nor creatable")
    }

    fn from_secret(secret: &Secret) -> anyhow::Result<Tls> {
        let field = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| b.0.clone())
                .with_context(|| format!("no {key} in it"))
        };
        Ok(Tls {
            cert_pem: field("tls.crt")?,
            key_pem: field("tls.key")?,
        })
    }

    fn to_secret(&self, name: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "thynapse-operator".to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    ("tls.crt".to_string(), ByteString(self.cert_pem.clone())),
                    ("tls.key".to_string(), ByteString(self.key_pem.clone())),
                ]
                .into(),
            ),
            ..Secret::default()
        }
    }

    /// A self-signed certificate for the webhook's Service names (or IP addresses).
    pub fn generate(dns_names: &[String]) -> anyhow::Result<Tls> {
        let certified = rcgen::generate_simple_self_signed(dns_names.to_vec())?;
        Ok(Tls {
            cert_pem: certified.cert.pem().into_bytes(),
            key_pem: certified.signing_key.serialize_pem().into_bytes(),
        })
    }

    fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&self.cert_pem).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)?;
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Puts a generated certificate into the webhook configuration, so the API server trusts
/// it (with a mounted certificate the chart sets the caBundle itself).
pub async fn publish_ca_bundle(
    client: &Client,
    configuration: &str,
    tls: &Tls,
) -> anyhow::Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    // Replicas starting together write the same bundle: a conflict is retried.
    for _ in 0..10 {
        let mut config = api.get(configuration).await?;
        let bundle = Some(ByteString(tls.cert_pem.clone()));
        if config
            .webhooks
            .iter()
            .flatten()
            .all(|w| w.client_config.ca_bundle == bundle)
        {
            return Ok(());
        }
        for webhook in config.webhooks.iter_mut().flatten() {
            webhook.client_config.ca_bundle = bundle.clone();
        }
        match api
            .replace(configuration, &PostParams::default(), &config)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("{configuration}: conflicting updates")
}

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Serves `router` over TLS until the task is dropped; returns the bound address.
pub async fn serve(addr: SocketAddr, tls: &Tls, router: Router) -> anyhow::Result<SocketAddr> {
    let acceptor = TlsAcceptor::from(Arc::new(tls.server_config()?));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                };
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, "webhook connection: {e}");
                }
            });
        }
    });
    Ok(local)
}

async fn mutate(
    State(state): State<Arc<WebhookState>>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<serde_json::Value> {
    let started = Instant::now();
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            state.metrics.admissions.with_label_values(&["error"]).inc();
            let review = AdmissionResponse::invalid(e.to_string()).into_review();
            return Json(wire_form(review));
        }
    };
    let (response, outcome) = decide(&state, &request).await;
    state.metrics.admissions.with_label_values(&[outcome]).inc();
    state
        .metrics
        .admission_latency
        .observe(started.elapsed().as_secs_f64());
    Json(wire_form(response.into_review()))
}

/// The review as the API server documents it: kube-core serialises the patch bytes as a
/// JSON array of numbers, which Go happens to accept; the documented form, and what
/// other webhooks send, is a base64 string.
fn wire_form(review: AdmissionReview<DynamicObject>) -> serde_json::Value {
    use base64::Engine as _;
    let mut value = serde_json::to_value(review).expect("reviews serialise");
    if let Some(patch) = value.pointer_mut("/response/patch") {
        if let Ok(bytes) = serde_json::from_value::<Vec<u8>>(patch.clone()) {
            *patch = base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into();
        }
    }
    value
}

/// Never refuses a pod: at worst it is admitted without a sidecar, and says why.
async fn decide(
    state: &WebhookState,
    request: &AdmissionRequest<Pod>,
) -> (AdmissionResponse, &'static str) {
    let response = AdmissionResponse::from(request);
    let Some(mut pod) = request.object.clone() else {
        return (response, "skipped");
    };
    let Some(ns) = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
    else {
        return (response, "skipped");
    };
    pod.metadata.namespace = Some(ns.clone());
    if inject::already_injected(&pod) {
        return (response, "skipped");
    }
    let services: Api<Service> = Api::namespaced(state.client.clone(), &ns);
    let services = match services.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            tracing::warn!("webhook: listing Services in {ns}: {e}");
            return (response, "error");
        }
    };
    let Some(service) = inject::service_for(&pod, &services) else {
        return (response, "skipped");
    };
    let meshes: Api<TransmitterMesh> = Api::namespaced(state.client.clone(), &ns);
    let mesh = match meshes.get_opt(&service.spec.mesh).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            tracing::warn!(service = %service.metadata.name.as_deref().unwrap_or(""), "webhook: no TransmitterMesh {:?}; pod admitted without a sidecar", service.spec.mesh);
            return (response, "no_mesh");
        }
        Err(e) => {
            tracing::warn!("webhook: reading the mesh: {e}");
            return (response, "error");
        }
    };
    let inputs = Inputs {
        default_image: state.default_image.clone(),
        ..Inputs::default()
    };
    match inject::patch(&pod, &mesh, service, &inputs) {
        Some(patch) => match response.clone().with_patch(patch) {
            Ok(r) => (r, "injected"),
            Err(e) => {
                tracing::warn!("webhook: serialising the patch: {e}");
                (response, "error")
            }
        },
        None => (response, "skipped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_travel_as_base64() {
        let response = AdmissionResponse::invalid("x");
        let response = response
            .with_patch(json_patch::Patch(vec![]))
            .expect("an empty patch serialises");
        let value = wire_form(response.into_review());
        assert_eq!(value["response"]["patch"], "W10=", "{value}");
    }
}
