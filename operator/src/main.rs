//! `thynapse-operator`: starts with nothing but a kubeconfig (in-cluster, or `KUBECONFIG`),
//! like any kube-rs controller; everything else has a flag, an environment variable and a
//! default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use thynapse_operator::controller::{self, Context, Settings};
use thynapse_operator::leader::Elector;
use thynapse_operator::metrics::Metrics;
use thynapse_operator::webhook::{self, Tls, WebhookState};

#[derive(Parser, Debug)]
#[command(name = "thynapse-operator", version, about)]
struct Args {
    /// Watch only this namespace (all namespaces when absent).
    #[arg(long, env = "THYNAPSE_NAMESPACE")]
    namespace: Option<String>,
    /// Image of transmitters, rendezvous points and sidecars when a mesh names none.
    #[arg(long, env = "THYNAPSE_IMAGE", default_value = concat!("thynapse/thynapse:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// Prometheus /metrics (reconcile counts and durations, admissions, leadership).
    #[arg(long, env = "THYNAPSE_METRICS_BIND", default_value = "0.0.0.0:8080")]
    metrics_bind: SocketAddr,
    /// HTTPS address of the sidecar-injection webhook.
    #[arg(long, env = "THYNAPSE_WEBHOOK_BIND", default_value = "0.0.0.0:8443")]
    webhook_bind: SocketAddr,
    /// Do not serve the webhook.
    #[arg(long, env = "THYNAPSE_NO_WEBHOOK")]
    no_webhook: bool,
    /// Webhook certificate and key (PEM); a self-signed pair is generated when absent.
    #[arg(long, env = "THYNAPSE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "THYNAPSE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// DNS names of a generated certificate (the webhook Service's names).
    #[arg(
        long,
        env = "THYNAPSE_WEBHOOK_DNS_NAMES",
        value_delimiter = ',',
        default_value = "thynapse-operator.thynapse.svc,thynapse-operator.thynapse.svc.cluster.local"
    )]
    webhook_dns_names: Vec<String>,
    /// Secret (in the operator's namespace) that holds the generated certificate, shared
    /// by every replica.
    #[arg(
        long,
        env = "THYNAPSE_WEBHOOK_SECRET",
        default_value = "thynapse-operator-webhook-tls"
    )]
    webhook_secret: String,
    /// MutatingWebhookConfiguration to give a generated certificate's CA bundle.
    #[arg(long, env = "THYNAPSE_WEBHOOK_CONFIGURATION")]
    webhook_configuration: Option<String>,
    /// Elect a leader among replicas (on a Lease); only the leader reconciles.
    #[arg(long, env = "THYNAPSE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(long, env = "THYNAPSE_LEASE_NAME", default_value = "thynapse-operator")]
    lease_name: String,
    /// Namespace of the Lease and of the webhook Secret (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Rendezvous address of a mesh, `MESH=udp://host:port`, for an operator running outside
    /// the cluster (development and tests); in a cluster the mesh's Services are used.
    #[arg(long = "rendezvous-override", value_parser = parse_override)]
    rendezvous_override: Vec<(String, String)>,
    /// Print the CustomResourceDefinitions as YAML and exit.
    #[arg(long)]
    print_crds: bool,
}

fn parse_override(s: &str) -> Result<(String, String), String> {
    let (mesh, addr) = s.split_once('=').ok_or("expected MESH=udp://host:port")?;
    Ok((mesh.to_string(), addr.to_string()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_crds {
        for crd in thynapse_resources::crds() {
            print!("---\n{}", thynapse_resources::crd_yaml(&crd));
        }
        return Ok(());
    }
    thynapse_telemetry::init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration: in-cluster service account or KUBECONFIG")?;
    let metrics = Metrics::new();
    let metrics_addr =
        thynapse_telemetry::serve_metrics(args.metrics_bind, metrics.registry.clone()).await?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("thynapse-operator-{}", std::process::id()));

    if !args.no_webhook {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                Tls::from_files(cert, key).context("reading the webhook certificate")?
            }
            _ => {
                let tls = Tls::shared(
                    &client,
                    &args.lease_namespace,
                    &args.webhook_secret,
                    &args.webhook_dns_names,
                )
                .await
                .context("the webhook certificate")?;
                if let Some(name) = &args.webhook_configuration {
                    webhook::publish_ca_bundle(&client, name, &tls)
                        .await
                        .with_context(|| format!("setting the caBundle of {name}"))?;
                    // A `helm upgrade` renders the configuration without it: put it back.
                    let (client, name, tls) = (client.clone(), name.clone(), tls.clone());
                    tokio::spawn(async move {
                        let mut every = tokio::time::interval(Duration::from_secs(60));
                        loop {
                            every.tick().await;
                            if let Err(e) = webhook::publish_ca_bundle(&client, &name, &tls).await {
                                tracing::warn!(%name, "keeping the caBundle: {e:#}");
                            }
                        }
                    });
                }
                tls
            }
        };
        let state = Arc::new(WebhookState {
            client: client.clone(),
            default_image: args.image.clone(),
            metrics: metrics.clone(),
        });
        let addr = webhook::serve(args.webhook_bind, &tls, webhook::router(state)).await?;
        tracing::info!(%addr, "webhook serving");
        println!("WEBHOOK https://{addr}/mutate");
    }
    println!("METRICS http://{metrics_addr}/metrics");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "thynapse-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    let mut overrides: HashMap<String, Vec<String>> = HashMap::new();
    for (mesh, addr) in &args.rendezvous_override {
        overrides
            .entry(mesh.clone())
            .or_default()
            .push(addr.clone());
    }
    let ctx = Arc::new(Context::new(
        client.clone(),
        recorder,
        metrics.clone(),
        Settings {
            default_image: args.image.clone(),
            rendezvous_override: overrides,
        },
    ));

    if !args.leader_election {
        metrics.leader.set(1);
        controller::run(ctx, args.namespace).await;
        return Ok(());
    }
    let elector = Elector::new(
        client,
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(15),
    );
    tracing::info!(%identity, lease = %args.lease_name, "waiting to lead");
    elector.acquire().await;
    tracing::info!(%identity, "leading");
    metrics.leader.set(1);
    tokio::select! {
        _ = controller::run(ctx, args.namespace) => Ok(()),
        _ = elector.keep() => {
            metrics.leader.set(0);
            // Another replica leads now; start again as a follower.
            anyhow::bail!("lost the leader lease")
        }
    }
}
