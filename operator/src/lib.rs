//! The Thynapse operator: reconciles `TransmitterMesh`, `Service` and `Room` resources
//! (kube-runtime controllers, server-side apply, status conditions, Events, leader
//! election on a Lease) and serves the webhook that injects the sidecar into cell pods.
//!
//! Pure logic — the desired objects (`builders`), conditions, the injection patch
//! (`inject`) — is kept apart from the I/O in `controller`, `webhook` and `leader`.

pub mod builders;
pub mod conditions;
pub mod controller;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod rendezvous;
pub mod webhook;
