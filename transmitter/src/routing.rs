//! The routing table of one transmitter: what every known cell of the mesh is subscribed
//! to, where it is (here, or behind which peer transmitter), and its Service's delivery
//! rules. Pure: no sockets, testable as data.
//!
//! Delivery is decided where a message enters the mesh. The transmitter of the publishing
//! cell computes, for the message's channel, every multicatch cell (delivered here or by
//! the peers that host them) and, for each Service whose rules say anycatch, the one cell
//! chosen to receive it, which travels with the message as an explicit target. A peer
//! receiving a forwarded message delivers it to its own multicatch cells and to the
//! targets it hosts, and never chooses again: so each anycatch message reaches exactly
//! one cell of its Service, wherever the cells are.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
// foldhash: a fast, seeded hasher (the per-message maps are keyed by ids and channel
// names; SipHash was a visible share of the hot path).
use foldhash::{HashMap, HashMapExt, HashSet};
use thynapse_protocol::batch::Kind;
use thynapse_protocol::delivery::{mode_for, DeliveryRule, Mode};
use thynapse_protocol::wire::{Interest, Op};
use thynapse_protocol::{glob, Thid};

/// A cell's Service, delivery rules and subscriptions, as a CELL message carries them.
pub type CellInterest = (Arc<str>, Arc<[DeliveryRule]>, Vec<(Op, Interest, Bytes)>);

/// A peer transmitter, numbered by this transmitter.
pub type PeerId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    Local,
    Peer(PeerId),
}

#[derive(Debug, Default)]
struct Cell {
    service: Arc<str>,
    rules: Arc<[DeliveryRule]>,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    /// Shard channels (room messages): their own namespace, without patterns, as in Redis.
    shard: HashSet<Bytes>,
    /// The size of all of them as the wire carries them (name and 6 bytes each).
    bytes: usize,
    /// When it became known there (a number counting up per table): of two places a
    /// cell is known at, the later one is where it went.
    joined: u64,
}

/// Where a message on one channel goes, before anycatch picks.
#[derive(Debug, Default, PartialEq)]
pub struct Route {
    /// Local cells that take every matching message.
    pub local: Vec<Thid>,
    /// Peers hosting at least one multicatch cell for the channel.
    pub peers: Vec<PeerId>,
    /// How many multicatch cells each of `peers` hosts (same order).
    pub peer_cells: Vec<u32>,
    /// One group per Service that wants anycatch here: the candidates to pick from.
    pub anycatch: Vec<AnycatchGroup>,
    /// How many multicatch cells there are mesh-wide.
    pub multicatch_cells: u32,
}

#[derive(Debug, PartialEq)]
pub struct AnycatchGroup {
    pub service: Arc<str>,
    pub candidates: Vec<(Location, Thid)>,
}

/// The result of routing one message that entered the mesh here.
#[derive(Debug, Default)]
pub struct Dispatch {
    pub local: Vec<Thid>,
    /// Peers to forward to (the first `used`), each with the anycatch targets it must
    /// deliver. Entries past `used` keep their target lists' memory for the next message.
    peers: Vec<(PeerId, Vec<Thid>)>,
    used: usize,
    /// Cells reached (the PUBLISH reply).
    pub receivers: u32,
}

impl Dispatch {
    fn clear(&mut self) {
        self.local.clear();
        self.used = 0;
        self.receivers = 0;
    }

    /// Peers to forward to, each with the anycatch targets it must deliver.
    pub fn peers(&self) -> &[(PeerId, Vec<Thid>)] {
        &self.peers[..self.used]
    }

    /// The targets for `peer`, adding the peer when it is not listed yet.
    pub fn peer_entry(&mut self, peer: PeerId) -> &mut Vec<Thid> {
        let i = match self.peers().iter().position(|(p, _)| *p == peer) {
            Some(i) => i,
            None => {
                if self.used == self.peers.len() {
                    self.peers.push((peer, Vec::new()));
                } else {
                    let entry = &mut self.peers[self.used];
                    entry.0 = peer;
                    entry.1.clear();
                }
                self.used += 1;
                self.used - 1
            }
        };
        &mut self.peers[i].1
    }
}

/// Routes are cached per channel until the next interest change; a bound keeps a flood
/// of distinct channel names from growing the cache without end.
const ROUTE_CACHE_LIMIT: usize = 65_536;

#[derive(Default)]
pub struct Table {
    cells: HashMap<(Location, Thid), Cell>,
    by_channel: HashMap<Bytes, HashSet<(Location, Thid)>>,
    by_shard: HashMap<Bytes, HashSet<(Location, Thid)>>,
    with_patterns: HashSet<(Location, Thid)>,
    cache: HashMap<Bytes, Rc<Route>>,
    shard_cache: HashMap<Bytes, Rc<Route>>,
    /// The last route looked up: batches mostly hold runs of one channel, and comparing
    /// a name is cheaper than hashing it.
    last: Option<(Kind, Rc<Route>)>,
    last_channel: Vec<u8>,
    rotation: HashMap<Arc<str>, Turn>,
    /// Cells that became known so far (see `Cell::joined`).
    joins: u64,
    /// Counts incoming batches: anycatch stays on one cell for a short run of messages
    /// only within one batch.
    batch: u64,
}

/// Consecutive messages of one incoming batch that anycatch gives the same cell (as
/// Kafka's sticky partitioner does per batch): under load the cells get runs instead of
/// every fourth message, so they are woken and written to a quarter as often; messages
/// that arrive one by one still go to one cell after another.
pub const ANYCATCH_RUN: u32 = 32;

/// Candidates compared when a run starts: the next ones in turn, so that choosing costs
/// the same for a Service of any size.
const ANYCATCH_WINDOW: usize = 8;

/// How far a candidate may fall behind the most given in the window: a cell that joins
/// (at 0) takes this much more than the others until it is level, not everything.
const ANYCATCH_CATCH_UP: u64 = 2 * ANYCATCH_RUN as u64;

/// Where one Service's anycatch spreading stands. A run starts on the candidate given the
/// fewest messages among the next few in turn. Plain turns are not enough: the end of a
/// batch cuts a run short, and the cell whose turn it was got the short tail of every
/// batch (two cells and batches of 40 split 32 to 8, every time).
#[derive(Default)]
struct Turn {
    /// Messages given per candidate position.
    given: Vec<u64>,
    /// The position of the current run, and its length so far.
    at: usize,
    run: u32,
    batch: u64,
}

impl Turn {
    /// The position, among `candidates`, of the cell for the next message of incoming
    /// batch `batch`.
    fn pick(&mut self, batch: u64, candidates: usize) -> usize {
        if self.given.len() < candidates {
            self.given.resize(candidates, 0);
        }
        if self.batch != batch || self.run == 0 || self.run >= ANYCATCH_RUN || self.at >= candidates
        {
            self.at = self.least_given((self.at + 1) % candidates, candidates);
            self.batch = batch;
            self.run = 0;
        }
        self.run += 1;
        self.given[self.at] += 1;
        self.at
    }

    /// Of the window of positions from `from` on, the first given the fewest messages;
    /// lifts those far behind to `ANYCATCH_CATCH_UP` below the most given first.
    fn least_given(&mut self, from: usize, candidates: usize) -> usize {
        let window = candidates.min(ANYCATCH_WINDOW);
        let positions = (0..window).map(|k| (from + k) % candidates);
        let top = positions.clone().map(|i| self.given[i]).max().unwrap_or(0);
        let floor = top.saturating_sub(ANYCATCH_CATCH_UP);
        let mut best = from;
        for i in positions {
            self.given[i] = self.given[i].max(floor);
            if self.given[i] < self.given[best] {
                best = i;
            }
        }
        best
    }
}

impl Table {
    /// Adds a cell (or changes its Service and rules), keeping its subscriptions.
    pub fn upsert_cell(&mut self, at: Location, id: Thid, service: &str, rules: &[DeliveryRule]) {
        let joins = &mut self.joins;
        let cell = self.cells.entry((at, id)).or_insert_with(|| {
            *joins += 1;
            Cell {
                joined: *joins,
                ..Cell::default()
            }
        });
        if &*cell.service != service {
            cell.service = service.into();
        }
        if *cell.rules != *rules {
            cell.rules = rules.into();
        }
        self.invalidate();
    }

    /// The cell (already known at `at`) joined there again (a new HELO): of the places
    /// it is known at, this is now the later one.
    pub fn rejoined(&mut self, at: Location, id: &Thid) {
        if let Some(cell) = self.cells.get_mut(&(at, *id)) {
            self.joins += 1;
            cell.joined = self.joins;
            self.invalidate();
        }
    }

    pub fn has_cell(&self, at: Location, id: &Thid) -> bool {
        self.cells.contains_key(&(at, *id))
    }

    pub fn service_of(&self, at: Location, id: &Thid) -> Option<&str> {
        self.cells.get(&(at, *id)).map(|c| &*c.service)
    }

    /// Applies subscription changes to a known cell; false when the cell is unknown.
    pub fn apply(&mut self, at: Location, id: Thid, changes: &[(Op, Interest, Bytes)]) -> bool {
        self.apply_within(at, id, changes, usize::MAX).is_some()
    }

    /// As `apply`, but refuses additions that would take the cell's subscriptions past
    /// `max_bytes` (each name and 6 bytes, as the wire carries them): how many were
    /// refused, or `None` for an unknown cell.
    pub fn apply_within(
        &mut self,
        at: Location,
        id: Thid,
        changes: &[(Op, Interest, Bytes)],
        max_bytes: usize,
    ) -> Option<usize> {
        let key = (at, id);
        let cell = self.cells.get_mut(&key)?;
        let mut refused = 0;
        for (op, kind, name) in changes {
            let cost = name.len() + 6;
            let (set, index) = match kind {
                Interest::Channel => (&mut cell.channels, Some(&mut self.by_channel)),
                Interest::Pattern => (&mut cell.patterns, None),
                Interest::ShardChannel => (&mut cell.shard, Some(&mut self.by_shard)),
            };
            match op {
                Op::Add if set.contains(name) => {}
                Op::Add if cell.bytes + cost > max_bytes => refused += 1,
                Op::Add => {
                    set.insert(name.clone());
                    cell.bytes += cost;
                    if let Some(index) = index {
                        index.entry(name.clone()).or_default().insert(key);
                    }
                }
                Op::Remove => {
                    if set.remove(name) {
                        cell.bytes -= cost;
                        if let Some(index) = index {
                            remove_index(index, name, &key);
                        }
                    }
                }
            }
        }
        if cell.patterns.is_empty() {
            self.with_patterns.remove(&key);
        } else {
            self.with_patterns.insert(key);
        }
        self.invalidate();
        Some(refused)
    }

    /// Replaces everything known of a cell's subscriptions.
    pub fn replace(
        &mut self,
        at: Location,
        id: Thid,
        service: &str,
        rules: &[DeliveryRule],
        subs: &[(Op, Interest, Bytes)],
    ) {
        // A CELL comes from where the cell is now: that place becomes the later one.
        self.remove_cell(at, id);
        self.upsert_cell(at, id, service, rules);
        self.apply(at, id, subs);
    }

    pub fn remove_cell(&mut self, at: Location, id: Thid) -> bool {
        let key = (at, id);
        let Some(cell) = self.cells.remove(&key) else {
            return false;
        };
        for ch in &cell.channels {
            remove_index(&mut self.by_channel, ch, &key);
        }
        for ch in &cell.shard {
            remove_index(&mut self.by_shard, ch, &key);
        }
        self.with_patterns.remove(&key);
        self.invalidate();
        true
    }

    /// Forgets every cell behind a peer (it left or died).
    pub fn remove_location(&mut self, at: Location) -> usize {
        let gone: Vec<Thid> = self
            .cells
            .keys()
            .filter(|(l, _)| *l == at)
            .map(|(_, id)| *id)
            .collect();
        for id in &gone {
            self.remove_cell(at, *id);
        }
        gone.len()
    }

    /// The interest of a local cell, as a CELL message to peers carries it.
    pub fn interest_of(&self, id: &Thid) -> Option<CellInterest> {
        let cell = self.cells.get(&(Location::Local, *id))?;
        let subs = cell
            .channels
            .iter()
            .map(|c| (Op::Add, Interest::Channel, c.clone()))
            .chain(
                cell.patterns
                    .iter()
                    .map(|p| (Op::Add, Interest::Pattern, p.clone())),
            )
            .chain(
                cell.shard
                    .iter()
                    .map(|c| (Op::Add, Interest::ShardChannel, c.clone())),
            )
            .collect();
        Some((cell.service.clone(), cell.rules.clone(), subs))
    }

    pub fn local_cells(&self) -> impl Iterator<Item = &Thid> {
        self.cells
            .keys()
            .filter(|(l, _)| *l == Location::Local)
            .map(|(_, id)| id)
    }

    pub fn cell_count(&self, at: Location) -> usize {
        self.cells.keys().filter(|(l, _)| *l == at).count()
    }

    /// The route for messages of `kind` on `channel` (cached).
    pub fn route(&mut self, kind: Kind, channel: &[u8]) -> Rc<Route> {
        if let Some((k, route)) = &self.last {
            if *k == kind && self.last_channel == channel {
                return route.clone();
            }
        }
        let route = self.lookup(kind, channel);
        self.last = Some((kind, route.clone()));
        self.last_channel.clear();
        self.last_channel.extend_from_slice(channel);
        route
    }

    fn lookup(&mut self, kind: Kind, channel: &[u8]) -> Rc<Route> {
        let cached = match kind {
            Kind::Mesh => self.cache.get(channel),
            Kind::Shard => self.shard_cache.get(channel),
        };
        if let Some(r) = cached {
            return r.clone();
        }
        let route = Rc::new(self.compute(kind, channel));
        let cache = match kind {
            Kind::Mesh => &mut self.cache,
            Kind::Shard => &mut self.shard_cache,
        };
        if cache.len() >= ROUTE_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(Bytes::copy_from_slice(channel), route.clone());
        route
    }

    fn invalidate(&mut self) {
        self.last = None;
        self.cache.clear();
        self.shard_cache.clear();
    }

    fn compute(&self, kind: Kind, channel: &[u8]) -> Route {
        // Every matching cell once, by id: a cell moving between transmitters is briefly
        // known at two places; the later is where it went (the other may be dead).
        let mut matching: Vec<(Location, Thid)> = Vec::new();
        let index = match kind {
            Kind::Mesh => &self.by_channel,
            Kind::Shard => &self.by_shard,
        };
        if let Some(set) = index.get(channel) {
            matching.extend(set.iter().copied());
        }
        // Redis has no pattern subscriptions for shard channels.
        let patterned = (kind == Kind::Mesh)
            .then_some(&self.with_patterns)
            .into_iter()
            .flatten();
        for key in patterned {
            let cell = &self.cells[key];
            if !cell.channels.contains(channel)
                && cell.patterns.iter().any(|p| glob::matches(p, channel))
            {
                matching.push(*key);
            }
        }
        matching.sort_by(|a, b| {
            let joined = |k| self.cells[k].joined;
            a.1.cmp(&b.1).then(joined(b).cmp(&joined(a)))
        });
        matching.dedup_by(|later, first| later.1 == first.1);

        let mut route = Route::default();
        let mut groups: HashMap<Arc<str>, Vec<(Location, Thid)>> = HashMap::new();
        for (at, id) in matching {
            let cell = &self.cells[&(at, id)];
            match mode_for(&cell.rules, channel) {
                Mode::Multicatch => {
                    route.multicatch_cells += 1;
                    match at {
                        Location::Local => route.local.push(id),
                        Location::Peer(p) => match route.peers.iter().position(|q| *q == p) {
                            Some(i) => route.peer_cells[i] += 1,
                            None => {
                                route.peers.push(p);
                                route.peer_cells.push(1);
                            }
                        },
                    }
                }
                Mode::Anycatch => groups
                    .entry(cell.service.clone())
                    .or_default()
                    .push((at, id)),
            }
        }
        let mut anycatch: Vec<AnycatchGroup> = groups
            .into_iter()
            .map(|(service, candidates)| AnycatchGroup {
                service,
                candidates,
            })
            .collect();
        anycatch.sort_by(|a, b| a.service.cmp(&b.service));
        route.anycatch = anycatch;
        route
    }

    /// The Service of a cell whose rules deliver `channel` anycatch (one cell of the
    /// Service takes each message); `None` for multicatch or an unknown cell.
    pub fn anycatch_service(&self, at: Location, id: &Thid, channel: &[u8]) -> Option<Arc<str>> {
        let cell = self.cells.get(&(at, *id))?;
        (mode_for(&cell.rules, channel) == Mode::Anycatch).then(|| cell.service.clone())
    }

    /// How many cells behind `peer` take every message on `channel` (multicatch): the
    /// deliveries a message forwarded there is worth, as the PUBLISH count has them.
    pub fn multicatch_at(&mut self, kind: Kind, channel: &[u8], peer: PeerId) -> u32 {
        let route = self.route(kind, channel);
        let at = route.peers.iter().position(|p| *p == peer);
        at.map_or(0, |i| route.peer_cells[i])
    }

    /// Another pick of `service`'s anycatch cells for a message whose first pick is gone
    /// (already removed from the table), in the same turn as new messages.
    pub fn pick_again(
        &mut self,
        kind: Kind,
        channel: &[u8],
        service: &str,
    ) -> Option<(Location, Thid)> {
        let route = self.route(kind, channel);
        let group = route.anycatch.iter().find(|g| &*g.service == service)?;
        let turn = self.rotation.entry(group.service.clone()).or_default();
        Some(group.candidates[turn.pick(self.batch, group.candidates.len())])
    }

    /// Marks the start of a new incoming batch: anycatch runs end with their batch.
    pub fn start_batch(&mut self) {
        self.batch += 1;
    }

    /// Routes one message entering the mesh here into `out`, choosing anycatch cells in
    /// runs within a batch (see [`ANYCATCH_RUN`]), each run on the cell furthest behind
    /// of the next few, so that load spreads evenly over a Service's cells.
    pub fn dispatch(&mut self, kind: Kind, channel: &[u8], out: &mut Dispatch) {
        out.clear();
        let route = self.route(kind, channel);
        out.local.extend_from_slice(&route.local);
        for p in &route.peers {
            out.peer_entry(*p);
        }
        out.receivers = route.multicatch_cells;
        for group in &route.anycatch {
            let turn = match self.rotation.get_mut(&*group.service) {
                Some(turn) => turn,
                None => self.rotation.entry(group.service.clone()).or_default(),
            };
            let (at, id) = group.candidates[turn.pick(self.batch, group.candidates.len())];
            out.receivers += 1;
            match at {
                Location::Local => out.local.push(id),
                Location::Peer(p) => out.peer_entry(p).push(id),
            }
        }
    }

    /// Local cells that take a message forwarded by a peer: this transmitter's multicatch
    /// cells for the channel, plus the anycatch targets it hosts.
    pub fn deliver_forwarded(
        &mut self,
        kind: Kind,
        channel: &[u8],
        targets: impl IntoIterator<Item = Thid>,
        out: &mut Vec<Thid>,
    ) {
        out.clear();
        let route = self.route(kind, channel);
        out.extend_from_slice(&route.local);
        for t in targets {
            if self.cells.contains_key(&(Location::Local, t)) && !out.contains(&t) {
                out.push(t);
            }
        }
    }
}

fn remove_index(
    index: &mut HashMap<Bytes, HashSet<(Location, Thid)>>,
    name: &Bytes,
    key: &(Location, Thid),
) {
    if let Some(set) = index.get_mut(name) {
        set.remove(key);
        if set.is_empty() {
            index.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn sub(
        t: &mut Table,
        at: Location,
        service: &str,
        rules: &[DeliveryRule],
        channel: &str,
    ) -> Thid {
        let id = Thid::random();
        t.upsert_cell(at, id, service, rules);
        let kind = if glob::is_pattern(channel.as_bytes()) {
            Interest::Pattern
        } else {
            Interest::Channel
        };
        assert!(t.apply(at, id, &[(Op::Add, kind, ch(channel))]));
        id
    }

    #[test]
    fn a_cell_subscribes_to_at_most_its_budget() {
        let mut t = Table::default();
        let id = Thid::random();
        t.upsert_cell(Location::Local, id, "s", &[]);
        let adds = |names: &[&str]| -> Vec<(Op, Interest, Bytes)> {
            names
                .iter()
                .map(|n| (Op::Add, Interest::Channel, ch(n)))
                .collect()
        };
        // 3 names of 4 bytes cost 30 bytes: a budget of 25 takes two.
        assert_eq!(
            t.apply_within(Location::Local, id, &adds(&["aaaa", "bbbb", "cccc"]), 25),
            Some(1)
        );
        let mut d = Dispatch::default();
        t.dispatch(Kind::Mesh, &ch("cccc"), &mut d);
        assert!(d.local.is_empty(), "the refused one is not routed");
        // Again the same ones: nothing new, nothing refused; a removal frees room.
        assert_eq!(
            t.apply_within(Location::Local, id, &adds(&["aaaa", "bbbb"]), 25),
            Some(0)
        );
        let remove = [(Op::Remove, Interest::Channel, ch("aaaa"))];
        assert_eq!(t.apply_within(Location::Local, id, &remove, 25), Some(0));
        assert_eq!(
            t.apply_within(Location::Local, id, &adds(&["cccc"]), 25),
            Some(0)
        );
        t.dispatch(Kind::Mesh, &ch("cccc"), &mut d);
        assert_eq!(d.local, [id]);
        assert_eq!(
            t.apply_within(Location::Local, Thid::random(), &remove, 25),
            None
        );
    }

    #[test]
    fn multicatch_reaches_every_cell_once() {
        let mut t = Table::default();
        let a = sub(&mut t, Location::Local, "s", &[], "news");
        let id_b = Thid::random();
        t.upsert_cell(Location::Local, id_b, "s", &[]);
        // Channel and matching pattern on one cell: still one delivery to the cell.
        t.apply(
            Location::Local,
            id_b,
            &[
                (Op::Add, Interest::Channel, ch("news")),
                (Op::Add, Interest::Pattern, ch("n*")),
            ],
        );
        sub(&mut t, Location::Peer(1), "s", &[], "ne?s");
        sub(&mut t, Location::Peer(1), "t", &[], "news");
        sub(&mut t, Location::Peer(2), "t", &[], "other");
        let mut d = Dispatch::default();
        t.dispatch(Kind::Mesh, &ch("news"), &mut d);
        let mut local = d.local.clone();
        local.sort();
        let mut want = vec![a, id_b];
        want.sort();
        assert_eq!(local, want);
        assert_eq!(d.peers(), [(1, vec![])]);
        assert_eq!(d.receivers, 4);
    }

    #[test]
    fn anycatch_picks_one_cell_in_turn_across_transmitters() {
        let rules = [DeliveryRule::new("jobs.*", Mode::Anycatch)];
        let mut t = Table::default();
        let mut cells = [
            sub(&mut t, Location::Local, "workers", &rules, "jobs.*"),
            sub(&mut t, Location::Peer(1), "workers", &rules, "jobs.*"),
            sub(&mut t, Location::Peer(2), "workers", &rules, "jobs.build"),
        ];
        let audit = sub(&mut t, Location::Local, "audit", &[], "jobs.*");
        let mut got = Vec::new();
        let mut d = Dispatch::default();
        for _ in 0..6 {
            t.start_batch();
            t.dispatch(Kind::Mesh, &ch("jobs.build"), &mut d);
            assert_eq!(d.receivers, 2);
            assert!(d.local.contains(&audit));
            let mut picked: Vec<Thid> = d.local.iter().copied().filter(|c| *c != audit).collect();
            for (_, targets) in d.peers() {
                picked.extend(targets);
            }
            assert_eq!(picked.len(), 1, "exactly one worker per message");
            got.push(picked[0]);
        }
        got.sort();
        cells.sort();
        let expected: Vec<Thid> = cells.iter().flat_map(|c| [*c, *c]).collect();
        assert_eq!(got, expected, "each worker got its share");
        // Outside the anycatch rule the service is multicatch again.
        t.apply(Location::Peer(2), cells[2], &[]);
        t.dispatch(Kind::Mesh, &ch("jobs"), &mut d);
        assert_eq!(d.receivers, 0);
    }

    #[test]
    fn anycatch_keeps_a_cell_for_a_short_run_within_one_batch() {
        let rules = [DeliveryRule::new("*", Mode::Anycatch)];
        let mut t = Table::default();
        let a = sub(&mut t, Location::Local, "w", &rules, "x");
        let b = sub(&mut t, Location::Peer(1), "w", &rules, "x");
        let mut d = Dispatch::default();
        let mut pick = |t: &mut Table| {
            t.dispatch(Kind::Mesh, &ch("x"), &mut d);
            let peer: Vec<Thid> = d.peers().iter().flat_map(|(_, v)| v.clone()).collect();
            assert_eq!(d.local.len() + peer.len(), 1, "exactly one cell");
            d.local.first().copied().unwrap_or_else(|| peer[0])
        };
        t.start_batch();
        let first = pick(&mut t);
        let other = if first == a { b } else { a };
        for _ in 1..ANYCATCH_RUN {
            assert_eq!(pick(&mut t), first, "a run stays on one cell");
        }
        assert_eq!(pick(&mut t), other, "a full run moves on");
        // A new batch moves on at once: to the cell behind until it is level, then in
        // turn, so messages arriving one by one alternate.
        for _ in 1..ANYCATCH_RUN {
            t.start_batch();
            assert_eq!(pick(&mut t), other, "the cell behind catches up");
        }
        let mut counts = [0, 0];
        for _ in 0..10 {
            t.start_batch();
            counts[usize::from(pick(&mut t) == a)] += 1;
        }
        assert_eq!(counts, [5, 5]);
    }

    /// How many messages each of `n` anycatch cells gets from batches of `sizes`.
    fn spread(n: usize, sizes: impl IntoIterator<Item = usize>) -> Vec<u64> {
        let rules = [DeliveryRule::new("*", Mode::Anycatch)];
        let mut t = Table::default();
        let cells: Vec<Thid> = (0..n)
            .map(|_| sub(&mut t, Location::Local, "w", &rules, "x"))
            .collect();
        let mut counts = vec![0; n];
        let mut d = Dispatch::default();
        for size in sizes {
            t.start_batch();
            for _ in 0..size {
                t.dispatch(Kind::Mesh, &ch("x"), &mut d);
                assert_eq!(d.local.len(), 1, "exactly one cell");
                counts[cells.iter().position(|c| *c == d.local[0]).unwrap()] += 1;
            }
        }
        counts
    }

    #[test]
    fn anycatch_spreads_evenly_whatever_the_batch_sizes() {
        // Batches of one size, sizes that leave a short tail after full runs, alternating
        // with lone messages, and pseudo-random sizes.
        let mut seed = 7u64;
        let random: Vec<usize> = (0..200)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) as usize % 100 + 1
            })
            .collect();
        let patterns = [
            vec![1],
            vec![40],
            vec![33],
            vec![64],
            vec![100],
            vec![33, 1],
            vec![40, 1, 1],
            vec![7, 65],
            random,
        ];
        for n in 1..=5 {
            for pattern in &patterns {
                let sizes = pattern.iter().copied().cycle().take(pattern.len().max(300));
                let counts = spread(n, sizes);
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(
                    hi - lo <= u64::from(ANYCATCH_RUN),
                    "{n} cells, batches of {pattern:?}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn a_cell_that_joins_a_busy_service_takes_its_share_not_everything() {
        let rules = [DeliveryRule::new("*", Mode::Anycatch)];
        let mut t = Table::default();
        let mut cells: Vec<Thid> = (0..2)
            .map(|_| sub(&mut t, Location::Local, "w", &rules, "x"))
            .collect();
        let mut d = Dispatch::default();
        let mut batches = |t: &mut Table, cells: &[Thid], n: usize| {
            let mut counts = vec![0u64; cells.len()];
            for _ in 0..n {
                t.start_batch();
                for _ in 0..40 {
                    t.dispatch(Kind::Mesh, &ch("x"), &mut d);
                    counts[cells.iter().position(|c| *c == d.local[0]).unwrap()] += 1;
                }
            }
            counts
        };
        batches(&mut t, &cells, 500);
        cells.push(sub(&mut t, Location::Local, "w", &rules, "x"));
        let counts = batches(&mut t, &cells, 300);
        let share = 300 * 40 / 3;
        let newcomer = counts[2];
        assert!(
            newcomer <= share + ANYCATCH_CATCH_UP + u64::from(ANYCATCH_RUN),
            "{counts:?}"
        );
        assert!(newcomer + u64::from(ANYCATCH_RUN) >= share, "{counts:?}");
    }

    #[test]
    fn an_anycatch_message_whose_cell_left_is_picked_again_within_its_service() {
        let mut t = Table::default();
        let rules = [DeliveryRule {
            pattern: "work.*".into(),
            mode: Mode::Anycatch,
        }];
        let a = sub(&mut t, Location::Local, "svc", &rules, "work.1");
        let b = sub(&mut t, Location::Peer(3), "svc", &rules, "work.1");
        sub(&mut t, Location::Local, "svc2", &rules, "work.1");
        assert_eq!(
            t.anycatch_service(Location::Local, &a, b"work.1")
                .as_deref(),
            Some("svc")
        );
        assert_eq!(
            t.anycatch_service(Location::Local, &a, b"logs"),
            None,
            "multicatch"
        );
        t.remove_cell(Location::Local, a);
        for _ in 0..3 {
            assert_eq!(
                t.pick_again(Kind::Mesh, b"work.1", "svc"),
                Some((Location::Peer(3), b)),
                "only the Service's remaining cell, never another Service's"
            );
        }
        t.remove_cell(Location::Peer(3), b);
        assert_eq!(t.pick_again(Kind::Mesh, b"work.1", "svc"), None);
        assert_eq!(t.multicatch_at(Kind::Mesh, b"work.1", 3), 0);
    }

    #[test]
    fn forwarded_messages_go_to_local_multicatch_and_targets_only() {
        let rules = [DeliveryRule::new("*", Mode::Anycatch)];
        let mut t = Table::default();
        let w1 = sub(&mut t, Location::Local, "w", &rules, "x");
        let w2 = sub(&mut t, Location::Local, "w", &rules, "x");
        let m = sub(&mut t, Location::Local, "m", &[], "x");
        let mut out = Vec::new();
        t.deliver_forwarded(Kind::Mesh, &ch("x"), [], &mut out);
        assert_eq!(out, vec![m]);
        t.deliver_forwarded(Kind::Mesh, &ch("x"), [w2, Thid::random()], &mut out);
        assert_eq!(out, vec![m, w2]);
        let _ = w1;
    }

    #[test]
    fn a_cell_known_twice_is_routed_once() {
        let mut t = Table::default();
        let id = Thid::random();
        for at in [Location::Peer(3), Location::Local] {
            t.upsert_cell(at, id, "s", &[]);
            t.apply(at, id, &[(Op::Add, Interest::Channel, ch("c"))]);
        }
        let mut d = Dispatch::default();
        t.dispatch(Kind::Mesh, &ch("c"), &mut d);
        assert_eq!(d.local, vec![id]);
        assert!(d.peers().is_empty());
        assert_eq!(d.receivers, 1);
        // It went from here to peer 5 (whatever the numbers): routed there, once.
        t.upsert_cell(Location::Peer(5), id, "s", &[]);
        t.apply(
            Location::Peer(5),
            id,
            &[(Op::Add, Interest::Channel, ch("c"))],
        );
        t.dispatch(Kind::Mesh, &ch("c"), &mut d);
        assert!(d.local.is_empty());
        assert_eq!(d.peers(), &[(5, vec![])]);
        assert_eq!(d.receivers, 1);
        // It greets here again (peer 5 died, say): here is the later place.
        t.rejoined(Location::Local, &id);
        t.dispatch(Kind::Mesh, &ch("c"), &mut d);
        assert_eq!(d.local, vec![id]);
        assert!(d.peers().is_empty());
    }

    #[test]
    fn shard_channels_are_their_own_namespace() {
        let mut t = Table::default();
        let mesh = sub(&mut t, Location::Local, "s", &[], "{r}c");
        let pat = sub(&mut t, Location::Local, "s", &[], "*");
        let room = Thid::random();
        t.upsert_cell(Location::Peer(2), room, "s", &[]);
        t.apply(
            Location::Peer(2),
            room,
            &[(Op::Add, Interest::ShardChannel, ch("{r}c"))],
        );
        let mut d = Dispatch::default();
        t.dispatch(Kind::Shard, &ch("{r}c"), &mut d);
        assert!(
            d.local.is_empty(),
            "mesh and pattern subscribers get no room messages"
        );
        assert_eq!((d.peers().to_vec(), d.receivers), (vec![(2, vec![])], 1));
        t.dispatch(Kind::Mesh, &ch("{r}c"), &mut d);
        assert_eq!(d.local.len(), 2);
        assert!(d.local.contains(&mesh) && d.local.contains(&pat));
        let (_, _, subs) = t.interest_of(&mesh).unwrap();
        assert_eq!(subs.len(), 1);
        t.remove_cell(Location::Peer(2), room);
        t.dispatch(Kind::Shard, &ch("{r}c"), &mut d);
        assert_eq!(d.receivers, 0);
    }

    #[test]
    fn removals_and_cache_invalidation() {
        let mut t = Table::default();
        let a = sub(&mut t, Location::Peer(1), "s", &[], "c");
        let mut d = Dispatch::default();
        t.dispatch(Kind::Mesh, &ch("c"), &mut d);
        assert_eq!(d.receivers, 1);
        assert_eq!(t.remove_location(Location::Peer(1)), 1);
        t.dispatch(Kind::Mesh, &ch("c"), &mut d);
        assert_eq!(d.receivers, 0);
        assert!(!t.has_cell(Location::Peer(1), &a));
        assert!(!t.apply(Location::Peer(1), a, &[]));
    }
}
