//! Subscription confirmations held until the mesh knows the subscription.
//!
//! Redis promises that once SUBSCRIBE has answered, every later PUBLISH reaches the
//! subscriber. In the mesh the interest travels from the cell's transmitter to its peers,
//! so a confirmation written at once would let a publish on another transmitter overtake
//! it (request/reply over pub/sub loses its first reply). Each `SUBS` therefore carries a
//! number; the transmitter answers `SUBD` with it once every linked peer applied the
//! change, and the confirmations queued up to that number are released then.
//!
//! Pure bookkeeping for one session; the hub sends the numbers and passes the answers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::api::ClientId;

/// A confirmation waiting: the client, its reply slot, the `SUBS` number that covers it.
#[derive(Debug)]
struct Waiter {
    client: ClientId,
    token: u64,
    needs: u64,
    since: Instant,
}

#[derive(Debug, Default)]
pub struct Confirmations {
    /// The number of the last `SUBS` sent (on any link of the session).
    sent: u64,
    /// The highest number the current link's transmitter confirmed.
    confirmed: u64,
    /// Oldest first; `needs` never decreases along the queue.
    waiting: VecDeque<Waiter>,
}

impl Confirmations {
    /// Holds the confirmation `token` of `client` until the mesh knows every change queued
    /// so far: the next `SUBS`'s if one is due (`pending`), else the last one sent. Returns
    /// true when that is known already (answer at once).
    pub fn wait(&mut self, client: ClientId, token: u64, pending: bool, now: Instant) -> bool {
        let needs = self.sent + u64::from(pending);
        if needs <= self.confirmed {
            return true;
        }
        self.waiting.push_back(Waiter {
            client,
            token,
            needs,
            since: now,
        });
        false
    }

    /// The number for a `SUBS` about to be sent (changes, or a new link's snapshot).
    pub fn next_number(&mut self) -> u64 {
        self.sent += 1;
        self.sent
    }

    /// Whether anything waits (a new link's greeting must then ask for a confirmation even
    /// with no subscription left to send).
    pub fn any_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The transmitter confirmed `number`: releases what it covers into `out`.
    pub fn confirm(&mut self, number: u64, out: &mut Vec<(ClientId, u64)>) {
        // A number never sent is a lying or confused peer: it confirms nothing beyond.
        let number = number.min(self.sent);
        self.confirmed = self.confirmed.max(number);
        while self
            .waiting
            .front()
            .is_some_and(|w| w.needs <= self.confirmed)
        {
            let w = self.waiting.pop_front().expect("checked");
            out.push((w.client, w.token));
        }
    }

    /// Releases what waited longer than `bound` (the mesh unreachable or slow): those
    /// clients are answered without the guarantee. Returns how many.
    pub fn expire(
        &mut self,
        now: Instant,
        bound: Duration,
        out: &mut Vec<(ClientId, u64)>,
    ) -> usize {
        let before = out.len();
        while self
            .waiting
            .front()
            .is_some_and(|w| now.duration_since(w.since) > bound)
        {
            let w = self.waiting.pop_front().expect("checked");
            out.push((w.client, w.token));
        }
        out.len() - before
    }

    /// Releases everything (the session is gone: nothing will confirm it).
    pub fn release_all(&mut self, out: &mut Vec<(ClientId, u64)>) {
        out.extend(self.waiting.drain(..).map(|w| (w.client, w.token)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_waits_for_the_subs_that_carries_it() {
        let now = Instant::now();
        let mut c = Confirmations::default();
        let mut out = Vec::new();
        assert!(!c.wait(1, 10, true, now));
        let n = c.next_number();
        c.confirm(n - 1, &mut out);
        assert!(out.is_empty());
        c.confirm(n, &mut out);
        assert_eq!(out, [(1, 10)]);
        // Nothing pending and everything confirmed: answered at once.
        assert!(c.wait(2, 11, false, now));
    }

    #[test]
    fn a_second_client_of_a_pending_subscription_waits_too() {
        let now = Instant::now();
        let mut c = Confirmations::default();
        let mut out = Vec::new();
        // Client 1's SUBSCRIBE is sent; client 2 subscribes the same channel (no new
        // change) before the transmitter confirmed it.
        assert!(!c.wait(1, 1, true, now));
        let n = c.next_number();
        assert!(!c.wait(2, 1, false, now));
        c.confirm(n, &mut out);
        assert_eq!(out, [(1, 1), (2, 1)]);
    }

    #[test]
    fn a_new_link_confirms_what_the_old_one_never_did() {
        let now = Instant::now();
        let mut c = Confirmations::default();
        let mut out = Vec::new();
        assert!(!c.wait(1, 1, true, now));
        let _lost = c.next_number(); // sent on a link that then died
        assert!(!c.wait(2, 5, false, now));
        let snapshot = c.next_number(); // the new link's greeting
        c.confirm(snapshot, &mut out);
        assert_eq!(out, [(1, 1), (2, 5)]);
    }

    #[test]
    fn numbers_never_sent_confirm_nothing_beyond() {
        let now = Instant::now();
        let mut c = Confirmations::default();
        let mut out = Vec::new();
        assert!(!c.wait(1, 1, true, now));
        c.confirm(u64::MAX, &mut out);
        assert!(out.is_empty());
        let n = c.next_number();
        c.confirm(n, &mut out);
        assert_eq!(out, [(1, 1)]);
    }

    #[test]
    fn waiting_is_bounded_in_time() {
        let t0 = Instant::now();
        let mut c = Confirmations::default();
        let mut out = Vec::new();
        c.wait(1, 1, true, t0);
        c.wait(1, 2, true, t0 + Duration::from_secs(2));
        assert_eq!(
            c.expire(
                t0 + Duration::from_secs(3),
                Duration::from_secs(2),
                &mut out
            ),
            1
        );
        assert_eq!(out, [(1, 1)]);
        c.release_all(&mut out);
        assert_eq!(out, [(1, 1), (1, 2)]);
        assert!(!c.any_waiting());
    }
}
