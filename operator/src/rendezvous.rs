//! Asking a mesh's rendezvous where a room lives (which also places a new one), over the
//! same UDP datagrams the sidecars use.

use std::time::{Duration, Instant};

use thynapse_protocol::discovery::Datagram;
use thynapse_protocol::seal::Sealer;

/// The transmitters hosting `room`, asking each rendezvous address in turn; waits up to
/// two seconds for a new placement to be confirmed (an empty list if it is not by then).
pub async fn locate(
    addresses: &[String],
    mesh: &str,
    room: &str,
    sealer: Option<&Sealer>,
) -> Result<Vec<String>, String> {
    let request = Datagram::Locate {
        mesh: mesh.into(),
        room: room.into(),
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut answered = false;
    loop {
        match thynapse_rendezvous::ask(addresses, &request, Duration::from_millis(500), sealer)
            .await
        {
            Some(Datagram::Room { transmitters, .. }) if !transmitters.is_empty() => {
                return Ok(transmitters.into_iter().map(|t| t.name).collect())
            }
            // Being placed: not confirmed yet.
            Some(Datagram::Room { .. }) => answered = true,
            Some(Datagram::Error { error }) => return Err(error),
            Some(_) => return Err("unexpected answer from the rendezvous".into()),
            None => {}
        }
        if Instant::now() >= deadline {
            return if answered {
                Ok(Vec::new())
            } else {
                Err(format!(
                    "no rendezvous answered at {}",
                    addresses.join(", ")
                ))
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
