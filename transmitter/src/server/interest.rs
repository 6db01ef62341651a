//! What peers must hear of this transmitter's cells, before any batch for them: each
//! changed cell's whole interest (`CELL`) or its leaving (`CGON`), a snapshot of every
//! cell on a new link, and the confirmation rounds (`SYNC`) that let a cell's `SUBS` be
//! answered once every live peer applied it (see `crate::interest_sync`).

use std::time::Instant;

use thynapse_protocol::frame::CommandFrame;
use thynapse_protocol::wire::{self, cmd};
use thynapse_protocol::Thid;
use zeromq::ZmqMessage;

use super::{reply_json, Transmitter};
use crate::routing::PeerId;

impl Transmitter {
    /// What peers must hear, before any batch: changed interest of local cells, the
    /// introduction and whole snapshot on a new link, the confirmation rounds, heartbeats.
    pub(super) async fn send_interest(&mut self) {
        if !self.dirty.is_empty() {
            let dirty: Vec<Thid> = self.dirty.drain().collect();
            let mut updates = Vec::with_capacity(dirty.len());
            for id in dirty {
                updates.push(self.interest_message(id));
            }
            for p in self.peers.values_mut() {
                if let Some(out) = p.synced_out() {
                    for m in &updates {
                        let _ = out.sender.send(m.clone()).await;
                    }
                }
            }
        }
        // Peers connected since the last flush: introduce ourselves and send a snapshot.
        let unsynced: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.out.as_ref().is_some_and(|o| !o.synced))
            .map(|(id, _)| *id)
            .collect();
        for peer in unsynced {
            let hello = CommandFrame::json(cmd::PEER, &self.peer_hello());
            let mut msgs = vec![ZmqMessage::from(hello.to_bytes())];
            msgs.extend(
                self.table
                    .local_cells()
                    .map(|id| self.interest_message(*id)),
            );
            let out = self
                .peers
                .get_mut(&peer)
                .and_then(|p| p.out.as_mut())
                .expect("listed above");
            // Confirmations waiting for this peer are answered by the snapshot.
            let round = self.interest_sync.round();
            if !self.interest_sync.is_idle() && round > 0 {
                msgs.push(ZmqMessage::from(
                    CommandFrame::json(cmd::SYNC, &wire::SyncRound { round }).to_bytes(),
                ));
            }
            for m in msgs {
                let _ = out.sender.send(m).await;
            }
            out.synced = true;
        }
        self.sync_interest().await;
        self.report_linked();
        let ping =
            ZmqMessage::from(CommandFrame::json(cmd::PING, &serde_json::json!({})).to_bytes());
        for p in self.peers.values_mut() {
            if let Some(out) = p.synced_out().filter(|o| o.ping_due) {
                out.ping_due = false;
                let _ = out.sender.send(ping.clone()).await;
            }
        }
    }

    /// What peers must hear of local cell `id`: its whole interest (CELL), or that it is
    /// gone (CGON).
    pub(super) fn interest_message(&self, id: Thid) -> ZmqMessage {
        match self.table.interest_of(&id) {
            Some((service, rules, subs)) => {
                let info = wire::CellInfo {
                    id,
                    service: service.to_string(),
                    rules: rules.to_vec(),
                };
                let mut m = ZmqMessage::from(CommandFrame::json(cmd::CELL, &info).to_bytes());
                m.push_back(wire::encode_interest(
                    subs.iter().map(|(op, k, n)| (*op, *k, &n[..])),
                ));
                m
            }
            None => {
                ZmqMessage::from(CommandFrame::json(cmd::CGON, &wire::CellGone { id }).to_bytes())
            }
        }
    }

    /// Prints `LINKED {"peers": n}` when the number of peers with a ready link changes:
    /// `thynapse up` calls the mesh up once every transmitter is linked to every other.
    pub(super) fn report_linked(&mut self) {
        let n = self
            .peers
            .values()
            .filter(|p| p.out.as_ref().is_some_and(|o| o.synced))
            .count();
        if self.linked_reported != Some(n) {
            self.linked_reported = Some(n);
            thynapse_process::Status::Linked(thynapse_process::Linked { peers: n }).print();
        }
    }

    /// Asks every linked peer to confirm this turn's interest updates (they went out just
    /// before), and answers the cells whose updates every live peer has confirmed.
    pub(super) async fn sync_interest(&mut self) {
        if self.interest_sync.is_idle() {
            return;
        }
        let now = Instant::now();
        let mut done = Vec::new();
        if self.interest_sync.has_requests() {
            // Every live peer: one whose link is still being built can already route to
            // this cell (over its own link to us) and learns the change from the snapshot.
            let live: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, p)| p.is_live())
                .map(|(id, _)| *id)
                .collect();
            if let Some(round) = self.interest_sync.start_round(live, now, &mut done) {
                let ask = ZmqMessage::from(
                    CommandFrame::json(cmd::SYNC, &wire::SyncRound { round }).to_bytes(),
                );
                for p in self.peers.values_mut() {
                    if let Some(out) = p.out.as_mut().filter(|o| o.synced) {
                        let _ = out.sender.send(ask.clone()).await;
                    }
                }
            }
        }
        let peers = &self.peers;
        let mut gave_up = Vec::new();
        self.interest_sync.complete(
            |peer| peers.get(&peer).is_some_and(|p| p.is_live()),
            now,
            self.expiry,
            &mut done,
            &mut gave_up,
        );
        for why in gave_up {
            tracing::warn!(
                reason = why.label(),
                "subscription confirmed without every peer's answer"
            );
            self.metrics
                .sync_gave_up
                .with_label_values(&[why.label()])
                .inc();
        }
        for (identity, sync) in done {
            let answer = wire::SubsSync { sync: Some(sync) };
            self.replies.push(reply_json(&identity, cmd::SUBD, &answer));
        }
    }
}
