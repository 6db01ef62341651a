//! The contract between Thynapse's processes. Each component (transmitter, sidecar,
//! rendezvous point) takes one typed set of flags ([`TransmitterArgs`], [`SidecarArgs`],
//! [`RendezvousArgs`]): the component parses it, and whoever starts one (`thynapse up`,
//! the operator's StatefulSet and rendezvous builders, the sidecar injector) fills it
//! and writes it back with [`ToArgs::to_args`], never by hand. Once up, a component
//! prints status lines on stdout ([`Status`]: `READY {json}`, and `MOVED`/`LINKED`),
//! which `thynapse up` reads back as the same types.

mod args;
mod status;

pub use args::{DeliveryRules, RendezvousArgs, SidecarArgs, ToArgs, TransmitterArgs};
pub use status::{Linked, Ready, RendezvousReady, SidecarReady, Status, TransmitterReady};
