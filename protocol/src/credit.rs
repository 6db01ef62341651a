//! Credits for received batches (CRED from a sidecar for DLVR, FACK from a transmitter
//! for FWRD) are cumulative: crediting batch n credits every batch before it. So a
//! receiver need not answer each batch at once; at low rates that would double the
//! wake-ups of both ends for every message. It credits once enough is owed, and on every
//! heartbeat, so a sender's view is never more than one heartbeat old.

/// How much a receiver may owe before it credits: below the smallest congestion mark a
/// transmitter can have (a quarter of the 64 KiB minimum link buffer), so crediting late
/// never makes a sender hold acknowledgements back.
pub const CREDIT_BYTES: usize = 8 * 1024;
pub const CREDIT_BATCHES: u32 = 16;

/// What a receiver owes one link.
#[derive(Debug, Default)]
pub struct CreditOwed {
    batch: Option<u64>,
    bytes: usize,
    batches: u32,
}

impl CreditOwed {
    pub fn received(&mut self, batch: u64, bytes: usize) {
        self.batch = Some(batch);
        self.bytes += bytes;
        self.batches += 1;
    }

    /// The batch to credit now, if enough is owed (or anything is, when `all`).
    pub fn take(&mut self, all: bool) -> Option<u64> {
        let due = self.bytes >= CREDIT_BYTES || self.batches >= CREDIT_BATCHES;
        if !(all || due) {
            return None;
        }
        self.bytes = 0;
        self.batches = 0;
        self.batch.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_sent_once_enough_is_owed_or_when_asked() {
        let mut c = CreditOwed::default();
        assert_eq!(c.take(true), None, "nothing owed");
        for b in 1..CREDIT_BATCHES as u64 {
            c.received(b, 100);
            assert_eq!(c.take(false), None);
        }
        c.received(CREDIT_BATCHES as u64, 100);
        assert_eq!(c.take(false), Some(CREDIT_BATCHES as u64), "enough batches");
        assert_eq!(c.take(true), None, "credited already");
        c.received(40, CREDIT_BYTES);
        assert_eq!(c.take(false), Some(40), "enough bytes");
        c.received(41, 10);
        assert_eq!(c.take(false), None);
        assert_eq!(c.take(true), Some(41), "the heartbeat credits what is owed");
    }
}
