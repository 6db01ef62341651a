//! What a Service's cells may publish and subscribe to (`Service.spec.permissions`), and
//! how the permissions are bound to the Service's key (docs/security.md, "Permissions").
//!
//! A cell's identity is its Service's name, followed, when the Service is restricted, by
//! a space and its permissions as compact JSON: `orders {"publish":["orders.*"]}`. The
//! Service's key is derived from the token and that whole identity, so a cell can prove
//! only the permissions it was given: claiming wider ones needs another key.
//!
//! The rules are Redis ACL's: a channel (SUBSCRIBE, SSUBSCRIBE, PUBLISH, SPUBLISH) is
//! allowed when one of the globs matches it; a PSUBSCRIBE pattern only when it is exactly
//! one of the subscribe globs, as Redis compares patterns literally (so a pattern never
//! reaches more than what was granted).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::glob;

/// The bytes a Service's permissions may take written out (globs and their JSON), so that
/// an identity fits in a sealed datagram (`seal::MAX_CONTEXT_BYTES`).
pub const MAX_PERMISSIONS_BYTES: usize = 1_536;

/// A Service's permissions; an absent list allows everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Permissions {
    /// Channels (and shard channels) its cells may publish to, as globs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Channels its cells may subscribe to, as globs; a pattern must be one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
}

impl Permissions {
    /// Whether everything is allowed (no list given).
    pub fn unrestricted(&self) -> bool {
        self.publish.is_none() && self.subscribe.is_none()
    }

    pub fn may_publish(&self, channel: &[u8]) -> bool {
        allowed(&self.publish, channel)
    }

    pub fn may_subscribe(&self, channel: &[u8]) -> bool {
        allowed(&self.subscribe, channel)
    }

    pub fn may_psubscribe(&self, pattern: &[u8]) -> bool {
        match &self.subscribe {
            None => true,
            Some(globs) => globs.iter().any(|g| g.as_bytes() == pattern || g == "*"),
        }
    }

    /// Why these permissions cannot be used, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        let written = serde_json::to_string(self).expect("permissions always serialise");
        // As a seal carries them: a JSON string of the JSON (quotes escaped).
        let in_a_seal = serde_json::to_string(&written).expect("strings always serialise");
        if in_a_seal.len() > MAX_PERMISSIONS_BYTES {
            return Err(format!(
                "permissions take {} bytes written as JSON (escaped); at most {MAX_PERMISSIONS_BYTES}",
                in_a_seal.len()
            ));
        }
        let globs = self.publish.iter().chain(&self.subscribe).flatten();
        if let Some(bad) = globs.clone().find(|g| g.is_empty()) {
            return Err(format!("an empty glob in permissions: {bad:?}"));
        }
        Ok(())
    }

    /// The identity a cell of `service` proves (see the module's documentation).
    pub fn identity(&self, service: &str) -> String {
        if self.unrestricted() {
            service.to_string()
        } else {
            let written = serde_json::to_string(self).expect("permissions always serialise");
            format!("{service} {written}")
        }
    }

    /// The Service and permissions an identity names, if it is well formed.
    pub fn of_identity(identity: &str) -> Result<(&str, Permissions), String> {
        match identity.split_once(' ') {
            None => Ok((identity, Permissions::default())),
            Some((service, written)) => {
                let p: Permissions = serde_json::from_str(written)
                    .map_err(|e| format!("unreadable permissions in {identity:?}: {e}"))?;
                // Only the one way of writing them: the key was derived from exactly it.
                if p.identity(service) != identity {
                    return Err(format!(
                        "permissions not written as the mesh writes them: {identity:?}"
                    ));
                }
                Ok((service, p))
            }
        }
    }
}

fn allowed(globs: &Option<Vec<String>>, channel: &[u8]) -> bool {
    match globs {
        None => true,
        Some(globs) => globs.iter().any(|g| glob::matches(g.as_bytes(), channel)),
    }
}

/// The error a refused command gets, as Redis ACL words it (and counts it).
pub fn refusal(service: &str, channel: &[u8]) -> String {
    format!(
        "NOPERM User {service} has no permissions to access the '{}' channel",
        String::from_utf8_lossy(channel)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> Permissions {
        Permissions {
            publish: Some(vec![]),
            subscribe: Some(vec!["news.*".into(), "alerts".into()]),
        }
    }

    #[test]
    fn globs_allow_channels_and_patterns_only_literally() {
        let p = reader();
        assert!(!p.may_publish(b"news.x"), "an empty list allows nothing");
        assert!(p.may_subscribe(b"news.sport") && p.may_subscribe(b"alerts"));
        assert!(!p.may_subscribe(b"secret"));
        assert!(p.may_psubscribe(b"news.*"));
        assert!(
            !p.may_psubscribe(b"news.s*"),
            "narrower, but not literally granted"
        );
        assert!(!p.may_psubscribe(b"*"));
        let all = Permissions::default();
        assert!(all.unrestricted() && all.may_publish(b"x") && all.may_psubscribe(b"*"));
        let star = Permissions {
            subscribe: Some(vec!["*".into()]),
            ..Permissions::default()
        };
        assert!(star.may_psubscribe(b"any.*"));
    }

    #[test]
    fn an_identity_names_the_service_and_its_permissions_one_way_only() {
        assert_eq!(Permissions::default().identity("orders"), "orders");
        let id = reader().identity("reader");
        assert_eq!(
            id,
            r#"reader {"publish":[],"subscribe":["news.*","alerts"]}"#
        );
        assert_eq!(Permissions::of_identity(&id).unwrap(), ("reader", reader()));
        assert_eq!(
            Permissions::of_identity("orders").unwrap(),
            ("orders", Permissions::default())
        );
        let spaced = r#"reader {"publish": [], "subscribe": ["news.*","alerts"]}"#;
        assert!(
            Permissions::of_identity(spaced).is_err(),
            "written another way"
        );
        assert!(Permissions::of_identity("reader {").is_err());
    }

    #[test]
    fn permissions_are_bounded() {
        assert!(reader().check().is_ok());
        let long = Permissions {
            publish: Some(vec!["x".repeat(MAX_PERMISSIONS_BYTES)]),
            subscribe: None,
        };
        assert!(long.check().is_err());
        let empty = Permissions {
            publish: Some(vec![String::new()]),
            subscribe: None,
        };
        assert!(empty.check().is_err());
    }

    #[test]
    fn a_refusal_reads_as_redis_acl_words_it() {
        assert_eq!(
            refusal("reader", b"news.x"),
            "NOPERM User reader has no permissions to access the 'news.x' channel"
        );
    }
}
