//! Sizes every process checks what it reads against, so that no peer, well-meaning or
//! not, makes one reserve memory without bound (docs/architecture.md, "Limits").

/// Writers close a batch (`PUBS` parts, `DLVR`, `FWRD`, interest lists) once it holds this
/// many bytes: a frame is at most this plus one message.
pub const BATCH_BYTES: usize = 256 * 1024;

/// The longest channel, pattern or room name (Redis has no limit; a name travels with
/// every message on it, and becomes a routing-table key).
pub const MAX_NAME_BYTES: usize = 16 * 1024;

/// The most a cell (a sidecar session) may subscribe to, counted as the wire carries
/// subscriptions (each name and 6 bytes): a cell's whole interest travels to every peer
/// as one `CELL` message, which must stay under the wire limit.
pub const MAX_INTEREST_BYTES: usize = 512 * 1024;

/// The largest ZeroMQ message (all frames) a process accepts from a peer: one batch, one
/// message of `max_message_bytes` with the longest name, and their headers, with room to
/// spare. Everything a process of the same mesh writes stays under it.
pub fn wire_limit(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_add(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_limit_holds_a_full_batch_and_a_largest_message() {
        let largest_record = 1024 * 1024 + MAX_NAME_BYTES + 64;
        assert!(BATCH_BYTES + 64 * 1024 + largest_record <= wire_limit(1024 * 1024));
        assert_eq!(wire_limit(usize::MAX), usize::MAX);
    }
}
