//! Rooms address sharded pub/sub: the room of a shard channel is its Redis Cluster hash
//! tag (`{lobby}chat` is in room `lobby`), else the whole channel name.

/// The room a shard channel belongs to, by the Redis Cluster hash-tag rule: the bytes
/// between the first `{` and the next `}` when that is non-empty.
pub fn room_of(channel: &[u8]) -> &[u8] {
    if let Some(open) = channel.iter().position(|&b| b == b'{') {
        if let Some(len) = channel[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &channel[open + 1..open + 1 + len];
            }
        }
    }
    channel
}

#[cfg(test)]
mod tests {
    use super::room_of;

    #[test]
    fn hash_tags_like_redis_cluster() {
        assert_eq!(room_of(b"{lobby}chat"), b"lobby");
        assert_eq!(room_of(b"chat{lobby}"), b"lobby");
        assert_eq!(room_of(b"plain"), b"plain");
        assert_eq!(room_of(b"{}x"), b"{}x");
        assert_eq!(room_of(b"{a}{b}"), b"a");
        assert_eq!(room_of(b"x{open"), b"x{open");
    }
}
