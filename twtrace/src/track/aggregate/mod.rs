//! TIME_WAIT lifecycles -> who makes them: per port, peer, process, service and network
//! namespace, with rates, lifetimes and reasons. Pure: fed `lifecycle::Event`s and times,
//! unit-tested with events built in code.
//!
//! Every group belongs to one network namespace: ports, peers and services are only meaningful
//! within one (each has its own ephemeral ports and settings), so `10.0.0.2:6379` seen from two
//! pods is two groups. All five groupings are kept at once, so a view can switch between them without losing
//! history. Each grouping keeps at most `cap` groups: once a second (and at once when twice the
//! cap is reached) the smallest are folded into one `other` group. A TIME_WAIT socket remembers
//! the slot of each of its groups; a folded slot keeps only a reference count, so the socket's
//! end is then charged to `other`, where its birth went. Totals never depend on folding.
//!
//! Memory (documented in ARCHITECTURE.md, checked by `memory_stays_bounded_with_200k_peers`):
//! at most `2 * cap` groups per grouping of about `GROUP_BYTES` each, plus about
//! `LIVE_TW_BYTES` per TIME_WAIT socket alive (the kernel bounds those by tcp_max_tw_buckets).

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

// Every birth and end looks up the live map and four group maps: a fast seeded hash rather than
// SipHash. The live map's keys are kernel addresses; the group maps hold at most 2 * cap keys.
use foldhash::{HashMap, HashMapExt as _};

use crate::{
    kernel::decode::{Comm, Conn, Process, Role},
    track::lifecycle::{ConnectFailure, Event, Substate, TwEnter, TwExit, TwRearm},
};

mod group;
mod table;

use group::reason_index;
pub use group::{Group, Lifetimes, REASONS, merge};
use table::Table;

/// Default number of groups kept per grouping before the smallest are folded into `other`.
pub const DEFAULT_CAP: usize = 2000;
/// Bytes of one group at most, all included (key, counters, rate ring, histogram, owners, its
/// entry in the key map).
pub const GROUP_BYTES: usize = 1536;
/// Bytes per live TIME_WAIT socket at most: its entry in the live map (timer address, six slot
/// references and its substate, at the hash map's worst load) and, in the worst case where each
/// socket has a folded group of its own in every grouping, six 12-byte slots.
pub const LIVE_TW_BYTES: usize = 160;
/// Owners remembered per group (the most recent distinct ones).
pub(super) const OWNERS_PER_GROUP: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum By {
    Port,
    Peer,
    Process,
    Service,
    /// The network namespace itself.
    Netns,
    /// The owner's command name, whatever its pid: short-lived processes (a script running
    /// curl in a loop) add up under one name.
    Comm,
}

/// How many groupings there are (`By::ALL.len()`).
const GROUPINGS: usize = 6;

impl By {
    pub const ALL: [By; GROUPINGS] = [
        By::Service,
        By::Peer,
        By::Port,
        By::Process,
        By::Comm,
        By::Netns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            By::Port => "port",
            By::Peer => "peer",
            By::Process => "process",
            By::Service => "service",
            By::Netns => "netns",
            By::Comm => "comm",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for By {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for By {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "port" => Ok(By::Port),
            "peer" => Ok(By::Peer),
            "process" => Ok(By::Process),
            "service" => Ok(By::Service),
            "netns" => Ok(By::Netns),
            "comm" => Ok(By::Comm),
            _ => Err(format!(
                "'{s}' is not a grouping (service, peer, port, process, comm or netns)"
            )),
        }
    }
}

/// A group's identity: what it is, in which network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Inode number of the network namespace (0: unknown).
    pub netns: u32,
    pub id: Id,
}

/// What a group is, within its namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Id {
    /// Local port (`port`), or a listening port the host accepted on (`service`).
    Port(u16),
    /// Remote address and port (`peer`), or a destination the host connected to (`service`).
    Peer(SocketAddr),
    /// Owner process; pid 0 when unknown (`comm` then says why).
    Process { pid: u32, comm: Comm },
    /// The namespace as a whole (`netns`).
    Netns,
    /// Owner command name (`comm`); `(unknown)` or `(before start)` when there is none.
    Comm(Comm),
}

impl Key {
    pub fn new(netns: u32, id: Id) -> Self {
        Key { netns, id }
    }
}

/// Owner shown for TIME_WAIT sockets that existed before twtrace started.
pub const BEFORE_START: &str = "(before start)";
/// Owner shown when no process was recorded (the socket was opened and closed unseen).
pub const UNKNOWN_OWNER: &str = "(unknown)";

/// The key as `twtrace report` shows it: `8080`, `10.0.0.2:6379`, `nginx[1234]`, and for a
/// namespace its inode number (the namespace of the other groupings is shown apart).
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Id::Port(p) => write!(f, "{p}"),
            Id::Peer(a) => write!(f, "{a}"),
            Id::Process { pid: 0, comm } => f.write_str(comm.as_str()),
            Id::Process { pid, comm } => write!(f, "{comm}[{pid}]"),
            Id::Netns => write!(f, "{}", self.netns),
            Id::Comm(c) => f.write_str(c.as_str()),
        }
    }
}

/// Upper bounds (seconds) of the host-wide lifetime histogram (`serve`'s
/// twtrace_timewait_lifetime_seconds): early ends below a minute, and the expiries, which the
/// timer wheel spreads over 60 to about 61.5 s.
pub const LIFETIME_BOUNDS_S: [f64; 12] = [
    0.1, 1.0, 5.0, 10.0, 30.0, 59.0, 60.0, 60.5, 61.0, 62.0, 65.0, 120.0,
];

/// Host-wide figures, exact whatever the folding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Births seen since start.
    pub entered: u64,
    /// Ends seen since start (including sockets born before start).
    pub exited: u64,
    /// Indexed like `REASONS`.
    pub exits: [u64; 4],
    /// Timewait sockets alive now that twtrace knows of (born since start, or seeded), in the
    /// TIME_WAIT substate, and in the FIN_WAIT2 substate.
    pub in_time_wait: u64,
    pub in_fin_wait2: u64,
    /// Of those, how many were seeded at start.
    pub seeded: u64,
    /// connect() calls that never connected, indexed like `FailReason::ALL`.
    pub connect_failures: [u64; 6],
    /// Ends with a known lifetime, counted per `LIFETIME_BOUNDS_S` bucket (not cumulative; the
    /// last slot is above the last bound), and their sum.
    pub lifetime_buckets: [u64; LIFETIME_BOUNDS_S.len() + 1],
    pub lifetime_sum_ms: u64,
}

impl Totals {
    /// (upper bound in seconds, cumulative count) pairs, then +Inf; and the count.
    pub fn lifetime_histogram(&self) -> (Vec<(f64, u64)>, u64) {
        let mut cum = 0;
        let mut out = Vec::with_capacity(self.lifetime_buckets.len());
        for (i, n) in self.lifetime_buckets.iter().enumerate() {
            cum += n;
            out.push((
                LIFETIME_BOUNDS_S.get(i).copied().unwrap_or(f64::INFINITY),
                cum,
            ));
        }
        (out, cum)
    }

    fn record_lifetime(&mut self, ms: u64) {
        let s = ms as f64 / 1000.0;
        let i = LIFETIME_BOUNDS_S
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LIFETIME_BOUNDS_S.len());
        self.lifetime_buckets[i] += 1;
        self.lifetime_sum_ms += ms;
    }
}

#[derive(Debug)]
pub struct Aggregator {
    tables: [Table; GROUPINGS],
    /// Live TIME_WAIT sockets born since start, by timer address: their slot in each table,
    /// and their substate.
    live: HashMap<u64, Held>,
    /// Seeded at start (sock_diag): no timer address known; the namespace and 4-tuple are unique
    /// while alive.
    seeded: HashMap<(u32, Conn), Held>,
    totals: Totals,
    /// Timewait sockets alive now per network namespace (TIME_WAIT, FIN_WAIT2 substates),
    /// exact whatever the folding: the set of namespaces twtrace has seen, which the kernel's
    /// own figures are summed over.
    namespaces: HashMap<u32, [u64; 2]>,
    /// (namespace, local port) with a listener: tells accepted from connected when the kernel
    /// programs did not see the connection open (sockets born before start).
    listening: HashSet<(u32, u16)>,
    /// When tracked (`track_ports`, serve): outgoing TIME_WAIT alive now per (namespace,
    /// source address, destination), exact whatever the folding. Each (source, destination)
    /// pair has the namespace's ephemeral ports to itself; at most one entry per live socket.
    ports: Option<HashMap<(u32, IpAddr, SocketAddr), u32>>,
    cap: usize,
}

/// One outgoing destination's ports: its busiest source address and how many TIME_WAIT
/// sockets that source holds towards it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestinationPorts {
    pub netns: u32,
    pub destination: SocketAddr,
    pub source: IpAddr,
    pub in_time_wait: u32,
}

fn sec_of(ts_ns: u64) -> u64 {
    ts_ns / 1_000_000_000
}

/// What the aggregate keeps per live timewait socket: its slot in each grouping's table and
/// its substate (which counter of those groups it is in).
#[derive(Clone, Copy, Debug)]
struct Held {
    slots: [u32; GROUPINGS],
    substate: Substate,
}

fn substate_index(s: Substate) -> usize {
    match s {
        Substate::TimeWait => 0,
        Substate::FinWait2 => 1,
    }
}

impl Aggregator {
    pub fn new(cap: usize) -> Self {
        Self {
            tables: [cap; GROUPINGS].map(Table::new),
            live: HashMap::new(),
            seeded: HashMap::new(),
            totals: Totals::default(),
            namespaces: HashMap::new(),
            listening: HashSet::new(),
            ports: None,
            cap,
        }
    }

    /// Counts, from now on, the outgoing TIME_WAIT per (source address, destination): see
    /// `destinations`.
    pub fn track_ports(&mut self) {
        self.ports.get_or_insert_with(HashMap::new);
    }

    /// The (namespace, source, destination) a socket holds a local port towards, when it was
    /// opened by this host (an accepted connection's port is the listener's, not ephemeral).
    fn port_key(&self, role: Role, netns: u32, conn: &Conn) -> Option<(u32, IpAddr, SocketAddr)> {
        (self.role_of(role, netns, conn) == Role::Connected)
            .then(|| (netns, conn.local.ip(), conn.remote))
    }

    fn count_port(&mut self, role: Role, netns: u32, conn: &Conn, up: bool) {
        if self.ports.is_none() {
            return;
        }
        let Some(key) = self.port_key(role, netns, conn) else {
            return;
        };
        let ports = self.ports.as_mut().expect("tracked");
        if up {
            *ports.entry(key).or_default() += 1;
        } else if let Some(n) = ports.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                ports.remove(&key);
            }
        }
    }

    /// Every outgoing destination with TIME_WAIT now, with its busiest source (None unless
    /// `track_ports`): a destination runs out of ports when one of its sources does.
    pub fn destinations(&self) -> Vec<DestinationPorts> {
        let Some(ports) = &self.ports else {
            return Vec::new();
        };
        let mut worst: HashMap<(u32, SocketAddr), (IpAddr, u32)> = HashMap::new();
        for (&(netns, source, destination), &n) in ports {
            let e = worst.entry((netns, destination)).or_insert((source, n));
            if (n, std::cmp::Reverse(source)) > (e.1, std::cmp::Reverse(e.0)) {
                *e = (source, n);
            }
        }
        worst
            .into_iter()
            .map(
                |((netns, destination), (source, in_time_wait))| DestinationPorts {
                    netns,
                    destination,
                    source,
                    in_time_wait,
                },
            )
            .collect()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// (namespace, port) pairs with a listening socket.
    pub fn set_listening_ports(&mut self, ports: HashSet<(u32, u16)>) {
        self.listening = ports;
    }

    fn role_of(&self, role: Role, netns: u32, conn: &Conn) -> Role {
        match role {
            Role::Unknown if self.listening.contains(&(netns, conn.local.port())) => Role::Accepted,
            Role::Unknown => Role::Connected,
            known => known,
        }
    }

    /// The group of a socket in one grouping.
    fn key(
        &self,
        by: By,
        conn: &Conn,
        netns: u32,
        owner: Option<&Process>,
        role: Role,
        seeded: bool,
    ) -> Key {
        let id = match by {
            By::Port => Id::Port(conn.local.port()),
            By::Peer => Id::Peer(conn.remote),
            By::Process => match owner {
                Some(p) => Id::Process {
                    pid: p.pid,
                    comm: p.comm,
                },
                None => Id::Process {
                    pid: 0,
                    comm: if seeded { BEFORE_START } else { UNKNOWN_OWNER }.into(),
                },
            },
            By::Service => match self.role_of(role, netns, conn) {
                Role::Accepted => Id::Port(conn.local.port()),
                _ => Id::Peer(conn.remote),
            },
            By::Netns => Id::Netns,
            By::Comm => Id::Comm(match owner {
                Some(p) => p.comm,
                None => if seeded { BEFORE_START } else { UNKNOWN_OWNER }.into(),
            }),
        };
        Key { netns, id }
    }

    pub fn on_event(&mut self, ev: &Event) {
        match ev {
            Event::Enter(e) => self.enter(e),
            Event::Exit(x) => self.exit(x),
            Event::Rearm(r) => self.rearm(r),
            Event::ConnectFail(f) => self.fail(f),
            Event::State(_) => {}
        }
    }

    /// A FIN_WAIT2-substate socket became TIME_WAIT (or a TIME_WAIT restarted its 60 s).
    fn rearm(&mut self, r: &TwRearm) {
        let held = if r.seeded {
            self.seeded.get_mut(&(r.netns, r.conn))
        } else {
            self.live.get_mut(&r.timer)
        };
        let Some(held) = held else { return };
        let from = std::mem::replace(&mut held.substate, r.to);
        if from == r.to {
            return;
        }
        let slots = held.slots;
        for by in By::ALL {
            self.tables[by.index()].rearm(slots[by.index()], from, r.to);
        }
        self.count(r.netns, from, -1);
        self.count(r.netns, r.to, 1);
    }

    /// A connect() that never connected: counted in each of its groups and in the totals.
    fn fail(&mut self, f: &ConnectFailure) {
        self.totals.connect_failures[f.reason.index()] += 1;
        for by in By::ALL {
            let key = self.key(
                by,
                &f.conn,
                f.netns,
                f.owner.as_ref(),
                Role::Connected,
                false,
            );
            let t = &mut self.tables[by.index()];
            let s = t.slot_for(key);
            if let Some(g) = t.group_at(s) {
                g.fail(f.reason, f.owner.as_ref());
            }
        }
    }

    /// Adds `by` (+1, -1) to the timewait sockets counted in `substate`, in the totals and in
    /// the namespace.
    fn count(&mut self, netns: u32, substate: Substate, by: i64) {
        let total = match substate {
            Substate::TimeWait => &mut self.totals.in_time_wait,
            Substate::FinWait2 => &mut self.totals.in_fin_wait2,
        };
        *total = total.saturating_add_signed(by);
        if by > 0 {
            self.namespaces.entry(netns).or_default()[substate_index(substate)] += 1;
        } else if let Some(n) = self.namespaces.get_mut(&netns) {
            let c = &mut n[substate_index(substate)];
            *c = c.saturating_sub(1);
        }
    }

    /// A TIME_WAIT socket alive before this aggregate started (a new filtered view in `serve`):
    /// counted now, not as a birth.
    pub fn adopt(&mut self, e: &TwEnter) {
        self.insert(e, false);
    }

    fn enter(&mut self, e: &TwEnter) {
        self.insert(e, !e.seeded);
    }

    /// `counted`: a birth seen during this aggregate (entered, rates); else only "now".
    fn insert(&mut self, e: &TwEnter, counted: bool) {
        if e.seeded {
            if self.seeded.contains_key(&(e.netns, e.conn)) {
                return;
            }
        } else {
            if self.live.contains_key(&e.timer) {
                return;
            }
            // Born between attach and the seeding dump: the birth replaces the seed.
            if !self.seeded.is_empty()
                && let Some(held) = self.seeded.remove(&(e.netns, e.conn))
            {
                for by in By::ALL {
                    self.tables[by.index()].forget(held.slots[by.index()], held.substate);
                }
                self.count(e.netns, held.substate, -1);
                self.totals.seeded -= 1;
                // The seed was counted with the role sock_diag gave it.
                let seed_role = if self.listening.contains(&(e.netns, e.conn.local.port())) {
                    Role::Accepted
                } else {
                    Role::Connected
                };
                self.count_port(seed_role, e.netns, &e.conn, false);
            }
        }
        let sec = sec_of(e.ts_ns);
        let mut slots = [0u32; GROUPINGS];
        for by in By::ALL {
            let key = self.key(by, &e.conn, e.netns, e.owner.as_ref(), e.role, e.seeded);
            let t = &mut self.tables[by.index()];
            let s = t.slot_for(key);
            t.enter(s, sec, e.owner.as_ref(), counted, e.substate);
            slots[by.index()] = s;
        }
        let held = Held {
            slots,
            substate: e.substate,
        };
        if e.seeded {
            self.seeded.insert((e.netns, e.conn), held);
            self.totals.seeded += 1;
        } else {
            self.live.insert(e.timer, held);
        }
        self.count(e.netns, e.substate, 1);
        self.count_port(e.role, e.netns, &e.conn, true);
        if counted {
            self.totals.entered += 1;
        }
    }

    fn exit(&mut self, x: &TwExit) {
        self.totals.exited += 1;
        self.totals.exits[reason_index(x.reason)] += 1;
        if let Some(ns) = x.lifetime_ns {
            self.totals.record_lifetime(ns / 1_000_000);
        }
        let held = match (x.seeded, x.conn) {
            (true, Some(c)) => self.seeded.remove(&(x.netns, c)),
            _ => self.live.remove(&x.timer),
        };
        let Some(held) = held else {
            // Born before start and not seeded: counted in the totals only.
            return;
        };
        self.count(x.netns, held.substate, -1);
        if x.seeded {
            self.totals.seeded -= 1;
        }
        if let Some(c) = &x.conn {
            self.count_port(x.role, x.netns, c, false);
        }
        let lifetime_ms = x.lifetime_ns.map(|ns| ns / 1_000_000);
        for by in By::ALL {
            self.tables[by.index()].exit(
                held.slots[by.index()],
                x.reason,
                lifetime_ms,
                held.substate,
            );
        }
    }

    /// The network namespaces seen (a timewait socket born or seeded there, and not forgotten),
    /// with the timewait sockets alive in each now (both substates).
    pub fn namespaces(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.namespaces.iter().map(|(&ns, n)| (ns, n[0] + n[1]))
    }

    /// The timewait sockets alive in a namespace now: (TIME_WAIT, FIN_WAIT2 substates).
    pub fn in_netns(&self, netns: u32) -> (u64, u64) {
        self.namespaces.get(&netns).map_or((0, 0), |n| (n[0], n[1]))
    }

    /// A namespace that no longer exists: its groups are folded into `other` in every grouping
    /// (their counts stay in the totals and in `other`, so exported counters never go back) and
    /// it leaves the set of namespaces. Its TIME_WAIT sockets were killed with it (the kernel
    /// purges them when the namespace is dismantled); any still counted are kept until their end.
    pub fn forget_netns(&mut self, netns: u32) {
        self.namespaces.remove(&netns);
        if let Some(ports) = &mut self.ports {
            ports.retain(|k, _| k.0 != netns);
        }
        for t in &mut self.tables {
            t.fold_netns(netns);
        }
    }

    /// Once a second: fold the smallest groups of each grouping beyond the cap.
    pub fn tick(&mut self) {
        for t in &mut self.tables {
            t.compact();
        }
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// The groups of one grouping, unsorted, and the `other` group (None while nothing folded).
    pub fn groups(&self, by: By) -> (Vec<(&Key, &Group)>, Option<&Group>) {
        let t = &self.tables[by.index()];
        let other = (t.folded_groups > 0).then_some(&t.other);
        (t.groups().collect(), other)
    }

    /// Keeps the group of `key` from ever being folded (it is created if missing). At most
    /// `cap` keys can be pinned per grouping; returns whether this one is.
    pub fn pin(&mut self, by: By, key: &Key) -> bool {
        let t = &mut self.tables[by.index()];
        if t.pinned.contains(key) {
            return true;
        }
        if t.pinned.len() >= t.cap {
            return false;
        }
        t.slot_for(key.clone());
        t.pinned.insert(key.clone());
        true
    }

    /// Lets the group of `key` be folded again (it is no longer exported).
    pub fn unpin(&mut self, by: By, key: &Key) {
        self.tables[by.index()].pinned.remove(key);
    }

    /// The group of `key`, when it has one of its own.
    pub fn group(&self, by: By, key: &Key) -> Option<&Group> {
        let t = &self.tables[by.index()];
        let &s = t.map.get(key)?;
        t.groups.get(s as usize)?.as_ref().map(|b| &b.1)
    }

    /// How many groups were folded into `other` so far.
    pub fn folded_groups(&self, by: By) -> u64 {
        self.tables[by.index()].folded_groups
    }

    /// Heap bytes held, approximately (for the memory bound's test and the benchmark).
    pub fn approx_bytes(&self) -> usize {
        self.tables.iter().map(Table::approx_bytes).sum::<usize>()
            + self.live.capacity() * (8 + size_of::<Held>() + 1)
            + self.seeded.capacity() * (4 + size_of::<Conn>() + size_of::<Held>() + 1)
            + self.namespaces.capacity() * (4 + 16 + 1)
            + self.ports.as_ref().map_or(0, |p| {
                p.capacity() * (size_of::<(u32, IpAddr, SocketAddr)>() + 4 + 1)
            })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::group::{bucket_of, bucket_range};
    use super::*;
    use crate::track::lifecycle::Reason;

    const S: u64 = 1_000_000_000;

    fn conn(local: &str, remote: &str) -> Conn {
        Conn {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    fn owner(pid: u32, comm: &str) -> Option<Process> {
        Some(Process {
            pid,
            tid: pid,
            comm: comm.into(),
            cgroup_id: 7,
        })
    }

    fn enter(timer: u64, ts: u64, c: Conn, o: Option<Process>, role: Role) -> Event {
        Event::Enter(TwEnter {
            netns: 0,
            ts_ns: ts,
            timer,
            conn: c,
            owner: o,
            role,
            timeout_jiffies: 15000,
            substate: crate::track::lifecycle::Substate::TimeWait,
            bound: false,
            seeded: false,
        })
    }

    fn exit(timer: u64, ts: u64, c: Conn, reason: Reason, life_ms: u64) -> Event {
        Event::Exit(TwExit {
            netns: 0,
            ts_ns: ts,
            timer,
            conn: Some(c),
            owner: None,
            role: Role::Unknown,
            reason,
            lifetime_ns: Some(life_ms * 1_000_000),
            substate: crate::track::lifecycle::Substate::TimeWait,
            seeded: false,
        })
    }

    /// Peer 10.0.1.i:80 gets i births at second 1, timers and local ports counted up from 1 and
    /// 30001; returns the last timer.
    fn births_by_peer_number(a: &mut Aggregator, peers: std::ops::RangeInclusive<u16>) -> u64 {
        let mut timer = 0;
        for i in peers {
            for _ in 0..i {
                timer += 1;
                let c = conn(
                    &format!("10.0.0.1:{}", 30000 + timer),
                    &format!("10.0.1.{i}:80"),
                );
                a.on_event(&enter(timer, S, c, None, Role::Connected));
            }
        }
        timer
    }

    fn find<'a>(a: &'a Aggregator, by: By, key: &str) -> &'a Group {
        a.groups(by)
            .0
            .into_iter()
            .find(|(k, _)| k.to_string() == key)
            .map(|(_, g)| g)
            .unwrap_or_else(|| panic!("no group {key} by {by}"))
    }

    #[test]
    fn groups_by_each_key_at_once() {
        let mut a = Aggregator::new(100);
        let redis = conn("10.0.0.1:40000", "10.0.0.2:6379");
        let redis2 = conn("10.0.0.1:40001", "10.0.0.2:6379");
        let web_in = conn("10.0.0.1:443", "10.9.9.9:50000");
        a.on_event(&enter(1, 10 * S, redis, owner(5, "api"), Role::Connected));
        a.on_event(&enter(
            2,
            10 * S,
            redis2,
            owner(6, "worker"),
            Role::Connected,
        ));
        a.on_event(&enter(3, 11 * S, web_in, owner(7, "nginx"), Role::Accepted));
        assert_eq!(find(&a, By::Peer, "10.0.0.2:6379").in_time_wait, 2);
        assert_eq!(find(&a, By::Port, "443").entered, 1);
        assert_eq!(find(&a, By::Process, "api[5]").entered, 1);
        // service: outgoing by destination, incoming by listening port.
        assert_eq!(find(&a, By::Service, "10.0.0.2:6379").entered, 2);
        assert_eq!(find(&a, By::Service, "443").entered, 1);
        let g = find(&a, By::Peer, "10.0.0.2:6379");
        assert_eq!(g.owners, vec![(5, "api".into()), (6, "worker".into())]);

        a.on_event(&exit(1, 70 * S, redis, Reason::Expired, 60_300));
        a.on_event(&exit(3, 12 * S, web_in, Reason::Syn, 1_000));
        let g = find(&a, By::Peer, "10.0.0.2:6379");
        assert_eq!((g.in_time_wait, g.exited), (1, 1));
        assert_eq!(g.exits_by(Reason::Expired), 1);
        assert_eq!(g.lifetimes.max_ms(), Some(60_300));
        assert_eq!(find(&a, By::Port, "443").exits_by(Reason::Syn), 1);
        let t = a.totals();
        assert_eq!(
            (t.entered, t.exited, t.exits, t.in_time_wait, t.seeded),
            (3, 2, [1, 0, 1, 0], 1, 0)
        );
        assert_eq!(t.lifetime_sum_ms, 61_300);
    }

    #[test]
    fn rates_over_1_10_and_60_seconds() {
        let mut a = Aggregator::new(10);
        let c = |i: u16| conn(&format!("127.0.0.1:{}", 30000 + i), "127.0.0.1:80");
        let mut timer = 0;
        // 10 births a second for 60 s, then 30 in the 61st second.
        for sec in 100..160u64 {
            for _ in 0..10 {
                timer += 1;
                a.on_event(&enter(
                    timer,
                    sec * S,
                    c(timer as u16),
                    None,
                    Role::Connected,
                ));
            }
        }
        for _ in 0..30 {
            timer += 1;
            a.on_event(&enter(
                timer,
                160 * S + 5,
                c(timer as u16),
                None,
                Role::Connected,
            ));
        }
        let g = find(&a, By::Peer, "127.0.0.1:80");
        assert_eq!(g.rate(161, 1), 30.0);
        assert_eq!(g.rate(161, 10), (9.0 * 10.0 + 30.0) / 10.0);
        assert_eq!(g.rate(160, 59), 10.0);
        // The whole minute 100..159, while second 160 is being counted.
        assert_eq!(g.rate(160, 60), 10.0);
        assert_eq!(g.rate(161, 60), (59.0 * 10.0 + 30.0) / 60.0);
        // A minute of silence empties the window.
        assert_eq!(g.rate(300, 60), 0.0);
    }

    #[test]
    fn lifetime_quantiles_are_within_two_percent() {
        let mut l = Lifetimes::default();
        for ms in 1..=1000u64 {
            l.record(60_000 + ms);
        }
        l.record(5);
        let p50 = l.quantile_ms(0.5).unwrap() as f64;
        let p99 = l.quantile_ms(0.99).unwrap() as f64;
        assert!((p50 - 60_500.0).abs() / 60_500.0 < 0.02, "{p50}");
        assert!((p99 - 60_990.0).abs() / 60_990.0 < 0.02, "{p99}");
        assert_eq!(l.max_ms(), Some(61_000));
        assert_eq!(l.quantile_ms(0.0), Some(5));
        assert_eq!(Lifetimes::default().quantile_ms(0.5), None);
        assert_eq!(l.count_le(63), 1);
        for ms in [0u64, 1, 63, 64, 65, 127, 128, 1000, 60_000, 1 << 40] {
            let (lo, hi) = bucket_range(bucket_of(ms));
            assert!(lo <= ms.min(hi) && ms.min(hi) <= hi, "{ms}: {lo}..{hi}");
        }
    }

    #[test]
    fn folding_keeps_the_largest_and_totals_exact() {
        let mut a = Aggregator::new(3);
        let mut timer = births_by_peer_number(&mut a, 1..=6);
        a.tick();
        let (groups, other) = a.groups(By::Peer);
        let mut keys: Vec<String> = groups.iter().map(|(k, _)| k.to_string()).collect();
        keys.sort();
        assert_eq!(keys, vec!["10.0.1.4:80", "10.0.1.5:80", "10.0.1.6:80"]);
        let other = other.expect("folded");
        assert_eq!(other.in_time_wait, 1 + 2 + 3);
        assert_eq!(a.folded_groups(By::Peer), 3);
        // An end of a socket born in a folded group goes to `other`.
        let first = conn("10.0.0.1:30001", "10.0.1.1:80");
        a.on_event(&exit(1, 2 * S, first, Reason::Killed, 1000));
        let (_, other) = a.groups(By::Peer);
        assert_eq!(other.unwrap().in_time_wait, 5);
        assert_eq!(other.unwrap().exits_by(Reason::Killed), 1);
        assert_eq!(a.totals().in_time_wait, 21 - 1);
        // The folded key comes back as a new group of its own.
        timer += 1;
        a.on_event(&enter(
            timer,
            3 * S,
            conn("10.0.0.1:39999", "10.0.1.1:80"),
            None,
            Role::Connected,
        ));
        assert_eq!(find(&a, By::Peer, "10.0.1.1:80").in_time_wait, 1);
    }

    /// A new group made from a folded group's box starts from nothing: no counts, owners,
    /// rates or lifetimes of the group it was.
    #[test]
    fn a_reused_group_starts_empty() {
        let mut a = Aggregator::new(1);
        let big = conn("10.0.0.1:30001", "10.0.1.1:80");
        let small = conn("10.0.0.1:30002", "10.0.1.2:80");
        a.on_event(&enter(1, S, big, owner(5, "api"), Role::Connected));
        a.on_event(&enter(2, S, big, owner(5, "api"), Role::Connected));
        a.on_event(&enter(3, S, small, owner(6, "old"), Role::Connected));
        a.on_event(&exit(3, 2 * S, small, Reason::Killed, 1_000));
        // Cap 1: the peer 10.0.1.2:80 (no TIME_WAIT left) is folded; its box is kept.
        a.tick();
        assert!(!a.tables[By::Peer.index()].spare.is_empty(), "a box kept");
        let fresh = conn("10.0.0.1:30003", "10.0.1.3:80");
        a.on_event(&enter(4, 3 * S, fresh, owner(7, "new"), Role::Connected));
        let g = find(&a, By::Peer, "10.0.1.3:80");
        assert_eq!((g.entered, g.exited, g.in_time_wait), (1, 0, 1));
        assert_eq!(g.exits, [0; 4]);
        assert_eq!(g.owners, vec![(7, "new".into())]);
        assert_eq!(g.lifetimes.quantile_ms(0.5), None);
        assert_eq!(
            g.rate(4, 10),
            0.1,
            "one birth in the last 10 s, none inherited"
        );
    }

    /// `slot_for` first compares with the slot it returned last: once that group is folded and
    /// its slot taken by another key, the first key must get a group of its own again, never
    /// count in the other key's.
    #[test]
    fn the_last_used_slot_given_to_another_key_is_not_taken_for_the_first() {
        let mut a = Aggregator::new(2);
        let y = conn("10.0.0.1:30001", "10.0.1.1:80");
        let w = conn("10.0.0.1:30004", "10.0.1.4:80");
        let x = conn("10.0.0.1:30002", "10.0.1.2:80");
        for (timer, c) in [(1, y), (2, y), (7, w), (8, w), (3, x)] {
            a.on_event(&enter(timer, S, c, None, Role::Connected));
        }
        a.on_event(&exit(3, 2 * S, x, Reason::Killed, 1_000));
        // Cap 2: 10.0.1.2:80, the slot used last, is folded and its slot freed.
        a.tick();
        assert_eq!(a.folded_groups(By::Peer), 1);
        let z = conn("10.0.0.1:30003", "10.0.1.3:80");
        a.on_event(&enter(4, 3 * S, z, None, Role::Connected));
        a.on_event(&enter(5, 3 * S, x, None, Role::Connected));
        a.on_event(&enter(6, 3 * S, x, None, Role::Connected));
        let gz = find(&a, By::Peer, "10.0.1.3:80");
        assert_eq!((gz.entered, gz.in_time_wait), (1, 1));
        let gx = find(&a, By::Peer, "10.0.1.2:80");
        assert_eq!((gx.entered, gx.exited, gx.in_time_wait), (2, 0, 2));
        assert_eq!(find(&a, By::Peer, "10.0.1.1:80").in_time_wait, 2);
    }

    #[test]
    fn memory_stays_bounded_with_200k_peers() {
        const N: u32 = 200_000;
        const CAP: usize = 1000;
        let mut a = Aggregator::new(CAP);
        for i in 0..N {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let c = Conn {
                local: "10.255.0.1:40000".parse().unwrap(),
                remote: SocketAddr::new(ip, 443),
            };
            a.on_event(&enter(
                i as u64 + 1,
                (i / 1000) as u64 * S,
                c,
                owner(1 + i % 3, "client"),
                Role::Connected,
            ));
            if i % 1000 == 999 {
                a.tick();
            }
        }
        a.tick();
        let t = a.totals().clone();
        assert_eq!((t.entered, t.in_time_wait), (N as u64, N as u64));
        let (groups, other) = a.groups(By::Peer);
        assert!(groups.len() <= CAP);
        let kept: u64 = groups.iter().map(|(_, g)| g.in_time_wait).sum();
        assert_eq!(
            kept + other.unwrap().in_time_wait,
            N as u64,
            "nothing lost by folding"
        );
        let bound = By::ALL.len() * 2 * CAP * GROUP_BYTES + N as usize * LIVE_TW_BYTES;
        eprintln!(
            "aggregator holds {} bytes for {N} sockets (bound {bound})",
            a.approx_bytes()
        );
        assert!(
            a.approx_bytes() <= bound,
            "{} bytes > documented bound {bound}",
            a.approx_bytes()
        );
        // Every socket ends: every count returns to zero, every folded slot is freed.
        for i in 0..N {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let c = Conn {
                local: "10.255.0.1:40000".parse().unwrap(),
                remote: SocketAddr::new(ip, 443),
            };
            a.on_event(&exit(i as u64 + 1, 300 * S, c, Reason::Expired, 60_000));
        }
        assert_eq!(a.totals().in_time_wait, 0);
        assert_eq!(a.totals().exited, N as u64);
        let (groups, other) = a.groups(By::Peer);
        assert!(groups.iter().all(|(_, g)| g.in_time_wait == 0));
        assert_eq!(other.unwrap().in_time_wait, 0);
        assert_eq!(
            groups.iter().map(|(_, g)| g.exited).sum::<u64>() + other.unwrap().exited,
            N as u64
        );
    }

    /// The same destination seen from two namespaces is two groups; the netns grouping and the
    /// per-namespace counts follow each; a namespace that is gone folds into `other` without
    /// changing any total.
    #[test]
    fn each_namespace_has_groups_of_its_own() {
        let (pod_a, pod_b) = (4026532281u32, 4026532282u32);
        let mut a = Aggregator::new(100);
        let in_ns = |timer, netns, port: u16| {
            Event::Enter(TwEnter {
                ts_ns: S,
                timer,
                conn: conn(&format!("127.0.0.1:{port}"), "127.0.0.1:6379"),
                netns,
                owner: owner(10, "api"),
                role: Role::Connected,
                timeout_jiffies: 15000,
                substate: crate::track::lifecycle::Substate::TimeWait,
                bound: false,
                seeded: false,
            })
        };
        a.on_event(&in_ns(1, pod_a, 40000));
        a.on_event(&in_ns(2, pod_a, 40001));
        // The very same 4-tuple, in another namespace.
        a.on_event(&in_ns(3, pod_b, 40000));
        let peer = |netns| Key::new(netns, Id::Peer("127.0.0.1:6379".parse().unwrap()));
        assert_eq!(a.group(By::Peer, &peer(pod_a)).unwrap().in_time_wait, 2);
        assert_eq!(a.group(By::Peer, &peer(pod_b)).unwrap().in_time_wait, 1);
        assert_eq!(
            a.groups(By::Port).0.len(),
            3,
            "port 40000 twice, one per namespace"
        );
        let ns = |n| Key::new(n, Id::Netns);
        assert_eq!(a.group(By::Netns, &ns(pod_a)).unwrap().entered, 2);
        assert_eq!(ns(pod_b).to_string(), "4026532282");
        let mut per_ns: Vec<(u32, u64)> = a.namespaces().collect();
        per_ns.sort();
        assert_eq!(per_ns, vec![(pod_a, 2), (pod_b, 1)]);

        // pod_b goes: its socket was killed with it; its groups fold into `other`.
        a.on_event(&Event::Exit(TwExit {
            ts_ns: 2 * S,
            timer: 3,
            conn: Some(conn("127.0.0.1:40000", "127.0.0.1:6379")),
            netns: pod_b,
            owner: None,
            role: Role::Connected,
            reason: Reason::Killed,
            lifetime_ns: Some(S),
            substate: crate::track::lifecycle::Substate::TimeWait,
            seeded: false,
        }));
        let totals = a.totals().clone();
        a.forget_netns(pod_b);
        assert!(a.group(By::Peer, &peer(pod_b)).is_none());
        assert_eq!(
            a.groups(By::Peer).1.unwrap().entered,
            1,
            "folded into other"
        );
        assert_eq!(a.groups(By::Peer).1.unwrap().exits_by(Reason::Killed), 1);
        assert_eq!(*a.totals(), totals);
        assert_eq!(a.namespaces().collect::<Vec<_>>(), vec![(pod_a, 2)]);
        // A pinned (exported) group of a gone namespace is folded too.
        assert!(a.pin(By::Peer, &peer(pod_a)));
        a.forget_netns(pod_a);
        assert!(a.group(By::Peer, &peer(pod_a)).is_none());
    }

    #[test]
    fn seeded_sockets_count_now_not_as_births() {
        let mut a = Aggregator::new(10);
        a.set_listening_ports([(0, 8080)].into_iter().collect());
        let c_in = conn("127.0.0.1:8080", "127.0.0.1:50000");
        let c_out = conn("127.0.0.1:50001", "127.0.0.1:5432");
        for c in [c_in, c_out] {
            a.on_event(&Event::Enter(TwEnter {
                netns: 0,
                ts_ns: 0,
                timer: 0,
                conn: c,
                owner: None,
                role: Role::Unknown,
                timeout_jiffies: 0,
                substate: crate::track::lifecycle::Substate::TimeWait,
                bound: false,
                seeded: true,
            }));
        }
        assert_eq!(a.totals().in_time_wait, 2);
        assert_eq!(a.totals().entered, 0);
        assert_eq!(find(&a, By::Service, "8080").in_time_wait, 1);
        assert_eq!(find(&a, By::Service, "127.0.0.1:5432").in_time_wait, 1);
        assert_eq!(find(&a, By::Process, BEFORE_START).in_time_wait, 2);
        a.on_event(&Event::Exit(TwExit {
            netns: 0,
            ts_ns: 5,
            timer: 77,
            conn: Some(c_in),
            owner: None,
            role: Role::Unknown,
            reason: Reason::Expired,
            lifetime_ns: None,
            substate: crate::track::lifecycle::Substate::TimeWait,
            seeded: true,
        }));
        assert_eq!(a.totals().in_time_wait, 1);
        assert_eq!(
            a.totals().seeded,
            1,
            "the seeded one that ended is no longer counted"
        );
        assert_eq!(find(&a, By::Service, "8080").in_time_wait, 0);
    }

    #[test]
    fn pinned_groups_are_never_folded() {
        let mut a = Aggregator::new(2);
        let small = Key::new(0, Id::Peer("10.0.1.1:80".parse().unwrap()));
        assert!(a.pin(By::Peer, &small));
        births_by_peer_number(&mut a, 2..=5);
        a.tick();
        assert!(a.group(By::Peer, &small).is_some(), "pinned, though empty");
        assert!(
            a.group(
                By::Peer,
                &Key::new(0, Id::Peer("10.0.1.5:80".parse().unwrap()))
            )
            .is_some()
        );
        assert!(
            a.group(
                By::Peer,
                &Key::new(0, Id::Peer("10.0.1.2:80".parse().unwrap()))
            )
            .is_none()
        );
        // The cap bounds the pins too.
        assert!(a.pin(
            By::Peer,
            &Key::new(0, Id::Peer("10.0.1.4:80".parse().unwrap()))
        ));
        assert!(!a.pin(
            By::Peer,
            &Key::new(0, Id::Peer("10.0.1.3:80".parse().unwrap()))
        ));
    }

    #[test]
    fn lifetime_histogram_is_cumulative() {
        let mut a = Aggregator::new(10);
        let c = conn("10.0.0.1:1", "10.0.0.2:2");
        for (t, ms) in [(1u64, 50u64), (2, 60_400), (3, 60_700), (4, 500_000)] {
            a.on_event(&enter(t, 0, c, None, Role::Connected));
            a.on_event(&exit(t, S, c, Reason::Expired, ms));
        }
        let (buckets, count) = a.totals().lifetime_histogram();
        assert_eq!(count, 4);
        assert_eq!(buckets[0], (0.1, 1));
        assert_eq!(buckets[7], (60.5, 2));
        assert_eq!(buckets[8], (61.0, 3));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 4)));
        assert_eq!(a.totals().lifetime_sum_ms, 50 + 60_400 + 60_700 + 500_000);
    }

    #[test]
    fn by_parses_strictly() {
        assert_eq!("peer".parse::<By>(), Ok(By::Peer));
        assert!("Peer".parse::<By>().unwrap_err().contains("'Peer'"));
    }
}
