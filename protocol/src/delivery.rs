//! Delivery rules: receivers, not senders, decide how a message reaches a Service.
//! A Service lists `{pattern, mode}` rules; the first rule whose glob matches the channel
//! decides, and a channel no rule matches is multicatch.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::glob;

/// How a message that matches a rule reaches the cells of one Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every subscribed cell of the Service gets the message.
    #[default]
    Multicatch,
    /// Exactly one subscribed cell of the Service gets the message.
    Anycatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct DeliveryRule {
    /// A glob pattern as in Redis PSUBSCRIBE (`orders.*`, `jobs.[ab]?`).
    pub pattern: String,
    #[serde(default)]
    pub mode: Mode,
}

impl DeliveryRule {
    pub fn new(pattern: impl Into<String>, mode: Mode) -> Self {
        Self {
            pattern: pattern.into(),
            mode,
        }
    }
}

/// The mode a Service with `rules` wants for a message on `channel`.
pub fn mode_for(rules: &[DeliveryRule], channel: &[u8]) -> Mode {
    rules
        .iter()
        .find(|r| glob::matches(r.pattern.as_bytes(), channel))
        .map_or(Mode::Multicatch, |r| r.mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_decides() {
        let rules = vec![
            DeliveryRule::new("jobs.audit", Mode::Multicatch),
            DeliveryRule::new("jobs.*", Mode::Anycatch),
        ];
        assert_eq!(mode_for(&rules, b"jobs.build"), Mode::Anycatch);
        assert_eq!(mode_for(&rules, b"jobs.audit"), Mode::Multicatch);
        assert_eq!(mode_for(&rules, b"other"), Mode::Multicatch);
        assert_eq!(mode_for(&[], b"jobs.build"), Mode::Multicatch);
    }

    #[test]
    fn mode_defaults_to_multicatch_in_json() {
        let r: DeliveryRule = serde_json::from_str(r#"{"pattern":"a.*"}"#).unwrap();
        assert_eq!(r.mode, Mode::Multicatch);
        let r: DeliveryRule =
            serde_json::from_str(r#"{"pattern":"a.*","mode":"anycatch"}"#).unwrap();
        assert_eq!(r.mode, Mode::Anycatch);
        assert!(serde_json::from_str::<DeliveryRule>(r#"{"pattern":"a","mode":"some"}"#).is_err());
    }
}
