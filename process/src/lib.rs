//! The contract between Thynapse's processes. Each component (transmitter, sidecar,
//! rendezvous point) takes one typed set of flags ([`TransmitterArgs`], [`SidecarArgs`],
//! [`RendezvousArgs`]): the component parses it, and whoever starts one (`thynapse up`,
//! the operator's StatefulSet and rendezvous builders, the sidecar injector) fills it
//! and writes it back with [`ToArgs::to_args`], never by hand. Once up, a component
//! prints status lines on stdout ([`Status`]: `READY {json}`, and `MOVED`/`LINKED`),
//! which `thynapse up` reads back as the same types.

mod args;
mod status;

pub use args::{
    DeliveryRules, PermissionsArg, RendezvousArgs, SidecarArgs, ToArgs, TransmitterArgs,
};
pub use status::{Linked, Ready, RendezvousReady, SidecarReady, Status, TransmitterReady};

/// The mesh tokens in a token file (`--token-file`): one per non-empty line, two during
/// a rotation (the first is the one a process proves itself with); at least one.
pub fn read_tokens(path: &str) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the mesh token from {path}: {e}"))?;
    let tokens = thynapse_protocol::auth::tokens_from(&text);
    if tokens.is_empty() {
        return Err(format!("{path} holds no token"));
    }
    Ok(tokens)
}
