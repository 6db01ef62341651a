//! `thynapse`: the command-line entry point. `thynapse up` runs a whole mesh on this
//! machine from the same manifests a cluster takes; the other subcommands run one
//! component each (what `up` starts, and what the container images run).

mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "thynapse",
    version,
    about = "Thynapse: an event mesh with a Redis face"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a mesh locally from TransmitterMesh, Service and Room manifests.
    Up(up::Args),
    /// Check manifests as `thynapse up` would read them, and print what they describe.
    Validate(up::ValidateArgs),
    /// Run one transmitter.
    Transmitter(thynapse_transmitter::Args),
    /// Run one rendezvous point.
    Rendezvous(thynapse_rendezvous::Args),
    /// Run one cell sidecar.
    Sidecar(thynapse_sidecar::Args),
}

fn main() {
    thynapse_telemetry::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Validate(args) => up::validate(args),
        Command::Transmitter(args) => thynapse_transmitter::run(args),
        Command::Rendezvous(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(thynapse_rendezvous::run(args))),
        Command::Sidecar(args) => thynapse_sidecar::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
