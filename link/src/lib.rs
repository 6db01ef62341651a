//! The client end of a link to a transmitter (docs/protocol.md, "Authentication" and
//! "Encryption"): the exchange [`ClientAuth`] describes, run over a DEALER socket, and
//! the two halves of the link after it, which seal and open every message when the
//! connection is encrypted. Sidecars run it with their Service's key, transmitters with
//! the mesh key when they dial a peer, and tools (the benchmark) as either.

use std::time::Duration;

use bytes::Bytes;
use thynapse_protocol::auth::ClientAuth;
use thynapse_protocol::crypt::{Channel, Decrypt, Encrypt};
use thynapse_protocol::frame::CommandFrame;
use thynapse_protocol::wire::{cmd, ErrorReply};
use zeromq::{DealerRecvHalf, DealerSendHalf, DealerSocket, SocketRecv, SocketSend, ZmqMessage};

/// Proves who we are to the transmitter at the other end of `socket` and checks that it
/// holds the mesh token too (one posing as it could not); `wait` bounds each answer.
/// Returns the connection's channel when `auth` asked for encryption.
pub async fn authenticate(
    socket: &mut DealerSocket,
    mut auth: ClientAuth,
    wait: Duration,
) -> anyhow::Result<Option<Channel>> {
    socket.send(ZmqMessage::from(auth.hello())).await?;
    let challenge = receive(socket, wait).await?;
    socket
        .send(ZmqMessage::from(auth.on_challenge(&challenge)?))
        .await?;
    Ok(auth.on_done(&receive(socket, wait).await?)?)
}

async fn receive(socket: &mut DealerSocket, wait: Duration) -> anyhow::Result<Vec<u8>> {
    let m = tokio::time::timeout(wait, socket.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no answer to AUTH within {wait:?}"))??;
    Ok(m.get(0).map(|f| f.to_vec()).unwrap_or_default())
}

/// The halves of an open link: what is sent is sealed and what is read opened when
/// `channel` is (an encrypted connection), as is.
pub fn split(socket: DealerSocket, channel: Option<Channel>) -> (LinkSender, LinkReceiver) {
    let (send, recv) = socket.split();
    let (seal, open) = match channel {
        // Boxed: a key schedule is large next to the socket half, in every event that
        // carries a link.
        Some(c) => (Some(Box::new(c.seal)), Some(Box::new(c.open))),
        None => (None, None),
    };
    (
        LinkSender { half: send, seal },
        LinkReceiver { half: recv, open },
    )
}

/// What a link sends on.
pub struct LinkSender {
    half: DealerSendHalf,
    seal: Option<Box<Encrypt>>,
}

impl LinkSender {
    pub async fn send(&mut self, m: ZmqMessage) -> anyhow::Result<()> {
        let m = match &mut self.seal {
            None => m,
            Some(seal) => ZmqMessage::from(seal.seal(m.iter().map(|f| &f[..]))?),
        };
        Ok(self.half.send(m).await?)
    }
}

/// What a link reads from.
pub struct LinkReceiver {
    half: DealerRecvHalf,
    open: Option<Box<Decrypt>>,
}

impl LinkReceiver {
    /// The next message; an error ends the link (closed, or a message that does not
    /// open, such as the transmitter's `ERRR` in clear once it forgot the connection).
    pub async fn recv(&mut self) -> anyhow::Result<ZmqMessage> {
        let m = self.half.recv().await?;
        let Some(open) = &mut self.open else {
            return Ok(m);
        };
        let sealed = m.get(0).cloned().unwrap_or_default();
        match open.open(&sealed) {
            Ok(frames) if !frames.is_empty() => Ok(ZmqMessage::try_from(frames)
                .map_err(|_| anyhow::anyhow!("an empty sealed message"))?),
            Ok(_) => anyhow::bail!("an empty sealed message"),
            Err(e) => match in_clear_error(&sealed) {
                Some(said) => anyhow::bail!("the transmitter said, in clear: {said}"),
                None => anyhow::bail!("{e}"),
            },
        }
    }
}

/// The text of an `ERRR` sent unencrypted, if that is what `frame` is.
fn in_clear_error(frame: &Bytes) -> Option<String> {
    let f = CommandFrame::parse(frame).ok()?;
    (&f.cmd == cmd::ERRR)
        .then(|| f.decode_json::<ErrorReply>().ok().map(|e| e.error))
        .flatten()
}
