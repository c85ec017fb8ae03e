//! How the lifecycle keeps what is alive in little memory: a live TIME_WAIT socket in one
//! 64-byte record (its 4-tuple packed, its owner an index into a shared, counted table).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use foldhash::HashMap;

use crate::kernel::decode::{Conn, Process, Role};

use super::events::Substate;

/// One live TIME_WAIT socket, kept small: there can be hundreds of thousands (64 bytes: the
/// 4-tuple packed, the owner interned).
#[derive(Debug, Clone, Copy)]
pub(super) struct Live {
    pub(super) birth_ts: u64,
    pub(super) conn: PackedConn,
    pub(super) netns: u32,
    /// Index in `Owners`, or `NO_OWNER`.
    pub(super) owner: u32,
    pub(super) role: Role,
    pub(super) substate: Substate,
    /// The last cancel that turned out to be a re-arm (0: none), and whether it was a reuse;
    /// see `on_birth`.
    pub(super) last_cancel_ts: u64,
    pub(super) last_cancel_reuse: bool,
}

pub(super) const NO_OWNER: u32 = u32::MAX;

const _: () = assert!(size_of::<Live>() <= 64);

/// The TIME_WAIT sockets alive, by timer address: records in a slab, and an index of 16-byte
/// slots. Every birth inserts at a random kernel address; a small index keeps that insert
/// within cache far longer than a table of whole records would (and reuses freed records).
#[derive(Default)]
pub(super) struct LiveSet {
    pub(super) index: HashMap<u64, u32>,
    pub(super) slab: Vec<Live>,
    pub(super) free: Vec<u32>,
}

impl LiveSet {
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// Returns the record this one replaces, if the timer was alive already.
    pub(super) fn insert(&mut self, timer: u64, live: Live) -> Option<Live> {
        use std::collections::hash_map::Entry;
        match self.index.entry(timer) {
            Entry::Occupied(e) => Some(std::mem::replace(&mut self.slab[*e.get() as usize], live)),
            Entry::Vacant(e) => {
                let i = match self.free.pop() {
                    Some(i) => {
                        self.slab[i as usize] = live;
                        i
                    }
                    None => {
                        self.slab.push(live);
                        (self.slab.len() - 1) as u32
                    }
                };
                e.insert(i);
                None
            }
        }
    }

    pub(super) fn remove(&mut self, timer: u64) -> Option<Live> {
        let i = self.index.remove(&timer)?;
        self.free.push(i);
        Some(self.slab[i as usize])
    }

    pub(super) fn get(&self, timer: u64) -> Option<&Live> {
        let i = *self.index.get(&timer)?;
        Some(&self.slab[i as usize])
    }

    pub(super) fn get_mut(&mut self, timer: u64) -> Option<&mut Live> {
        let i = *self.index.get(&timer)?;
        Some(&mut self.slab[i as usize])
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &Live)> + '_ {
        self.index
            .iter()
            .map(|(&timer, &i)| (timer, &self.slab[i as usize]))
    }
}

/// A connection's two ends in 36 bytes (`Conn` takes 64). IPv4 addresses are kept v4-mapped:
/// `decode` shows every v4-mapped address as IPv4, so no IPv6 address here is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PackedConn {
    pub(super) local: [u8; 16],
    pub(super) remote: [u8; 16],
    pub(super) lport: u16,
    pub(super) rport: u16,
}

impl From<Conn> for PackedConn {
    fn from(c: Conn) -> Self {
        let octets = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        PackedConn {
            local: octets(c.local.ip()),
            remote: octets(c.remote.ip()),
            lport: c.local.port(),
            rport: c.remote.port(),
        }
    }
}

impl From<PackedConn> for Conn {
    fn from(p: PackedConn) -> Self {
        let ip = |o: [u8; 16]| -> IpAddr {
            let v6 = Ipv6Addr::from(o);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        };
        Conn {
            local: SocketAddr::new(ip(p.local), p.lport),
            remote: SocketAddr::new(ip(p.remote), p.rport),
        }
    }
}

/// Owners interned: the sockets of one process share one entry, counted.
#[derive(Debug, Default)]
pub(super) struct Owners {
    pub(super) list: Vec<(Process, u32)>,
    pub(super) index: HashMap<Process, u32>,
    pub(super) free: Vec<u32>,
}

impl Owners {
    pub(super) fn intern(&mut self, p: Option<Process>) -> u32 {
        let Some(p) = p else { return NO_OWNER };
        if let Some(&i) = self.index.get(&p) {
            self.list[i as usize].1 += 1;
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.list[i as usize] = (p, 1);
                i
            }
            None => {
                self.list.push((p, 1));
                (self.list.len() - 1) as u32
            }
        };
        self.index.insert(p, i);
        i
    }

    pub(super) fn get(&self, i: u32) -> Option<Process> {
        self.list.get(i as usize).map(|(p, _)| *p)
    }

    pub(super) fn release(&mut self, i: u32) -> Option<Process> {
        let (p, n) = self.list.get_mut(i as usize)?;
        let p = *p;
        *n -= 1;
        if *n == 0 {
            self.index.remove(&p);
            self.free.push(i);
        }
        Some(p)
    }
}
