use thynapse_protocol::discovery::{ANNOUNCE_INTERVAL_MS, EXPIRY_MULTIPLIER};

use crate::spec::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("metadata.name {0:?} must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters")]
    Name(String),
    #[error("{0}")]
    Field(String),
}

pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::Name(name.to_string()))
    }
}

/// Transmitters a mesh may have (`spec.replicas`, the CRD's maximum too).
pub const MAX_TRANSMITTERS: u32 = 240;

fn field(msg: String) -> ValidationError {
    ValidationError::Field(msg)
}

impl TransmitterMeshSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=MAX_TRANSMITTERS).contains(&self.replicas) {
            return Err(field(format!(
                "spec.replicas must be between 1 and {MAX_TRANSMITTERS}, got {}: every transmitter links to every other, and {MAX_TRANSMITTERS} is the largest mesh measured to serve well (docs/architecture.md, \"Scale\")",
                self.replicas
            )));
        }
        if !(1..=5).contains(&self.rendezvous.replicas) {
            return Err(field(
                "spec.rendezvous.replicas must be between 1 and 5".into(),
            ));
        }
        if !ANNOUNCE_INTERVAL_MS.contains(&self.rendezvous.announce_interval_ms) {
            return Err(field(
                "spec.rendezvous.announceIntervalMs must be between 50 and 60000".into(),
            ));
        }
        if !EXPIRY_MULTIPLIER.contains(&self.rendezvous.expiry_multiplier) {
            return Err(field(
                "spec.rendezvous.expiryMultiplier must be between 2 and 20".into(),
            ));
        }
        if self.rooms.default_replicas < 1 {
            return Err(field(
                "spec.rooms.defaultReplicas must be at least 1".into(),
            ));
        }
        if self.limits.max_message_bytes < 1 || self.limits.max_message_bytes > 512 << 20 {
            return Err(field(
                "spec.limits.maxMessageBytes must be between 1 and 536870912".into(),
            ));
        }
        if self.limits.client_output_buffer_bytes < 65536 || self.limits.link_buffer_bytes < 65536 {
            return Err(field(
                "spec.limits buffers must be at least 65536 bytes".into(),
            ));
        }
        Ok(())
    }
}

impl ServiceSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name(&self.mesh).map_err(|_| {
            field(format!(
                "spec.mesh {:?} is not a valid mesh name",
                self.mesh
            ))
        })?;
        for (i, rule) in self.delivery.iter().enumerate() {
            if rule.pattern.is_empty() {
                return Err(field(format!(
                    "spec.delivery[{i}].pattern must not be empty"
                )));
            }
        }
        self.permissions
            .check()
            .map_err(|e| field(format!("spec.permissions: {e}")))?;
        Ok(())
    }
}

impl RoomSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name(&self.mesh).map_err(|_| {
            field(format!(
                "spec.mesh {:?} is not a valid mesh name",
                self.mesh
            ))
        })?;
        if self.replicas == Some(0) {
            return Err(field("spec.replicas must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("demo-0").is_ok());
        for bad in ["", "Demo", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
