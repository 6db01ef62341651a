//! Asking a mesh's rendezvous where a room lives (which also places a new one), over the
//! same UDP datagrams the sidecars use.

use std::time::{Duration, Instant};

use thynapse_protocol::discovery::{Datagram, MAX_DATAGRAM};

/// The transmitters hosting `room`, asking each rendezvous address in turn; waits up to
/// two seconds for a new placement to be confirmed.
pub async fn locate(addresses: &[String], mesh: &str, room: &str) -> Result<Vec<String>, String> {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| format!("opening a UDP socket: {e}"))?;
    let request = Datagram::Locate {
        mesh: mesh.into(),
        room: room.into(),
    }
    .to_bytes();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last_error = "no rendezvous answered".to_string();
    let mut answered = false;
    loop {
        for address in addresses {
            let target = address.trim_start_matches("udp://");
            if let Err(e) = socket.send_to(&request, target).await {
                last_error = format!("{target}: {e}");
                continue;
            }
            let answer =
                tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await;
            match answer {
                Ok(Ok((n, _))) => match Datagram::parse(&buf[..n]) {
                    Ok(Datagram::Room { transmitters, .. }) if !transmitters.is_empty() => {
                        return Ok(transmitters.into_iter().map(|t| t.name).collect())
                    }
                    // Being placed: not confirmed yet.
                    Ok(Datagram::Room { .. }) => answered = true,
                    Ok(Datagram::Error { error }) => return Err(error),
                    Ok(_) => last_error = "unexpected answer".into(),
                    Err(e) => last_error = format!("unreadable answer: {e}"),
                },
                Ok(Err(e)) => last_error = format!("{target}: {e}"),
                Err(_) => last_error = format!("{target}: no answer"),
            }
        }
        if Instant::now() >= deadline {
            return if answered {
                Ok(Vec::new())
            } else {
                Err(last_error)
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
