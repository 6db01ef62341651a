//! The client end of a link to a transmitter (docs/protocol.md, "Authentication"): the
//! exchange [`ClientAuth`] describes, run over a DEALER socket. Sidecars run it with their
//! Service's key, transmitters with the mesh key when they dial a peer, and tools (the
//! benchmark) as either.

use std::time::Duration;

use thynapse_protocol::auth::ClientAuth;
use zeromq::{DealerSocket, SocketRecv, SocketSend, ZmqMessage};

/// Proves who we are to the transmitter at the other end of `socket` and checks that it
/// holds the mesh token too (one posing as it could not); `wait` bounds each answer.
pub async fn authenticate(
    socket: &mut DealerSocket,
    auth: &ClientAuth,
    wait: Duration,
) -> anyhow::Result<()> {
    socket.send(ZmqMessage::from(auth.hello())).await?;
    let challenge = receive(socket, wait).await?;
    socket
        .send(ZmqMessage::from(auth.on_challenge(&challenge)?))
        .await?;
    auth.on_done(&receive(socket, wait).await?)?;
    Ok(())
}

async fn receive(socket: &mut DealerSocket, wait: Duration) -> anyhow::Result<Vec<u8>> {
    let m = tokio::time::timeout(wait, socket.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no answer to AUTH within {wait:?}"))??;
    Ok(m.get(0).map(|f| f.to_vec()).unwrap_or_default())
}
