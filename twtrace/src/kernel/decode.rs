//! Ring buffer records -> typed kernel events. Pure: no kernel, no allocation per event.
//!
//! A record is trusted for nothing: its length must match its kind exactly, its version must be
//! ours. Anything else is counted by the caller as malformed, never panicked on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use twtrace_common::{
    AF_INET, AF_INET6, EVENT_VERSION, Header, Owner, SockEvent, TimerEvent, Tuple, flags, kind,
    role,
};

/// A connection's two ends, local first. IPv4-mapped IPv6 addresses are shown as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Conn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Conn {
    /// 4 or 6, after v4-mapped addresses became IPv4.
    pub fn family(&self) -> u8 {
        if self.local.is_ipv4() { 4 } else { 6 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Unknown,
    Connected,
    Accepted,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Connected => "connected",
            Role::Accepted => "accepted",
        }
    }
}

/// A process name as the kernel keeps it (at most 15 bytes), stored inline: one is kept per
/// live TIME_WAIT socket, so no heap allocation each.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Comm {
    bytes: [u8; 16],
    len: u8,
}

impl Comm {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl From<&str> for Comm {
    /// Keeps what fits in 15 bytes, cut at a character boundary.
    fn from(s: &str) -> Self {
        let mut len = s.len().min(15);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0u8; 16];
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        Comm {
            bytes,
            len: len as u8,
        }
    }
}

impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl PartialEq<str> for Comm {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A process as recorded by the kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Process {
    /// Thread group id: what users call the pid.
    pub pid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
}

/// What the kernel programs report. `netns` is the inode number of the socket's network
/// namespace (`readlink /proc/PID/ns/net`), 0 when the kernel could not say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    State {
        cpu: u32,
        ts_ns: u64,
        conn: Conn,
        netns: u32,
        old_state: u8,
        new_state: u8,
        owner: Option<Process>,
        role: Role,
        skaddr: u64,
    },
    Birth {
        cpu: u32,
        ts_ns: u64,
        timer: u64,
        conn: Conn,
        netns: u32,
        owner: Option<Process>,
        role: Role,
        timeout_jiffies: u32,
        /// `tcp_state::TIME_WAIT`, or `FIN_WAIT2` while the peer has not sent its FIN.
        substate: u8,
        /// The local port was bound before connect() (see `twtrace_common::flags::BOUND`).
        bound: bool,
    },
    Cancel {
        cpu: u32,
        ts_ns: u64,
        timer: u64,
        conn: Option<Conn>,
        netns: u32,
        reuse: bool,
        /// The destination of the connect() this cancel happened in, when the kernel could not
        /// tell reuse itself (`flags::IN_CONNECT`): reuse if it is the socket's remote end.
        in_connect_to: Option<std::net::SocketAddr>,
    },
    Expire {
        cpu: u32,
        ts_ns: u64,
        timer: u64,
        conn: Option<Conn>,
        netns: u32,
    },
    Rearm {
        cpu: u32,
        ts_ns: u64,
        timer: u64,
        conn: Option<Conn>,
        netns: u32,
        timeout_jiffies: u32,
        /// The substate after the re-arm (TIME_WAIT once the peer's FIN came).
        substate: u8,
    },
    SynTakeover {
        cpu: u32,
        ts_ns: u64,
        timer: u64,
    },
    /// A connect() that never connected: `conn.local` has port 0 when no local port was free.
    ConnectFail {
        cpu: u32,
        ts_ns: u64,
        conn: Conn,
        netns: u32,
        owner: Option<Process>,
        role: Role,
        /// `sk_err` (ECONNREFUSED, ETIMEDOUT, ...), 0 when none was set.
        err: u32,
        bound: bool,
    },
}

impl KernelEvent {
    pub fn cpu(&self) -> u32 {
        match self {
            Self::State { cpu, .. }
            | Self::Birth { cpu, .. }
            | Self::Cancel { cpu, .. }
            | Self::Expire { cpu, .. }
            | Self::Rearm { cpu, .. }
            | Self::SynTakeover { cpu, .. }
            | Self::ConnectFail { cpu, .. } => *cpu,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownKind(u8),
    Version(u8),
    Length { kind: u8, len: usize },
    Family(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "empty record"),
            Self::UnknownKind(k) => write!(f, "unknown event kind {k}"),
            Self::Version(v) => write!(f, "event version {v}, expected {EVENT_VERSION}"),
            Self::Length { kind, len } => write!(f, "event kind {kind} with {len} bytes"),
            Self::Family(fam) => write!(f, "unknown address family {fam}"),
        }
    }
}

/// Reads a plain-old-data record of exactly `size_of::<T>()` bytes.
fn read_exact<T: Copy>(bytes: &[u8], kind: u8) -> Result<T, DecodeError> {
    if bytes.len() != size_of::<T>() {
        return Err(DecodeError::Length {
            kind,
            len: bytes.len(),
        });
    }
    // SAFETY: the length matches and T (from twtrace-common) is made of integers and byte
    // arrays only, for which every bit pattern is valid; read_unaligned needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn ip(family: u8, raw: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*raw);
            Ok(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        other => Err(DecodeError::Family(other)),
    }
}

pub fn conn(family: u8, t: &Tuple) -> Result<Conn, DecodeError> {
    let (mut local, mut remote) = (ip(family, &t.saddr)?, ip(family, &t.daddr)?);
    // Both ends or neither: an IPv6 socket talking IPv4 has both addresses v4-mapped. A record
    // mixing them is not the kernel's, but must not give a connection of two families.
    if local.is_ipv4() != remote.is_ipv4() {
        local = IpAddr::V6(Ipv6Addr::from(t.saddr));
        remote = IpAddr::V6(Ipv6Addr::from(t.daddr));
    }
    Ok(Conn {
        local: SocketAddr::new(local, t.sport),
        remote: SocketAddr::new(remote, t.dport),
    })
}

/// The kernel's NUL-padded comm; bytes that are not UTF-8 become `?`.
pub fn comm(raw: &[u8; 16]) -> Comm {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(15).min(15);
    match std::str::from_utf8(&raw[..end]) {
        Ok(s) => Comm::from(s),
        Err(_) => Comm::from(
            String::from_utf8_lossy(&raw[..end])
                .replace('\u{fffd}', "?")
                .as_str(),
        ),
    }
}

fn process(h: &Header, o: &Owner) -> Option<Process> {
    (h.flags & flags::OWNER_KNOWN != 0).then(|| Process {
        pid: o.tgid,
        tid: o.pid,
        comm: comm(&o.comm),
        cgroup_id: o.cgroup_id,
    })
}

fn role_of(raw: u8) -> Role {
    match raw {
        role::CONNECTED => Role::Connected,
        role::ACCEPTED => Role::Accepted,
        _ => Role::Unknown,
    }
}

fn timer_conn(ev: &TimerEvent) -> Result<Option<Conn>, DecodeError> {
    if ev.header.flags & flags::HAS_TUPLE == 0 {
        return Ok(None);
    }
    conn(ev.header.family, &ev.tuple).map(Some)
}

/// The connect() destination an `IN_CONNECT` cancel carries in its tuple's remote half.
fn connect_destination(ev: &TimerEvent) -> Result<Option<std::net::SocketAddr>, DecodeError> {
    if ev.header.flags & flags::IN_CONNECT == 0 {
        return Ok(None);
    }
    conn(ev.header.family, &ev.tuple).map(|c| Some(c.remote))
}

pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let &k = bytes.first().ok_or(DecodeError::Empty)?;
    if let Some(&v) = bytes.get(1)
        && v != EVENT_VERSION
    {
        return Err(DecodeError::Version(v));
    }
    match k {
        kind::STATE | kind::TW_BIRTH | kind::CONNECT_FAIL => {
            let ev: SockEvent = read_exact(bytes, k)?;
            let h = ev.header;
            let conn = conn(h.family, &ev.tuple)?;
            let netns = ev.tuple.netns;
            let owner = process(&h, &ev.owner);
            let role = role_of(ev.role);
            let bound = h.flags & flags::BOUND != 0;
            Ok(match k {
                kind::STATE => KernelEvent::State {
                    cpu: h.cpu,
                    ts_ns: h.ts_ns,
                    conn,
                    netns,
                    old_state: ev.old_state,
                    new_state: ev.new_state,
                    owner,
                    role,
                    skaddr: ev.skaddr,
                },
                kind::TW_BIRTH => KernelEvent::Birth {
                    cpu: h.cpu,
                    ts_ns: h.ts_ns,
                    timer: ev.timer,
                    conn,
                    netns,
                    owner,
                    role,
                    timeout_jiffies: ev.timeout_jiffies,
                    substate: ev.substate,
                    bound,
                },
                _ => KernelEvent::ConnectFail {
                    cpu: h.cpu,
                    ts_ns: h.ts_ns,
                    conn,
                    netns,
                    owner,
                    role,
                    err: ev.err,
                    bound,
                },
            })
        }
        kind::TW_CANCEL | kind::TW_EXPIRE | kind::TW_REARM | kind::TW_SYN => {
            let ev: TimerEvent = read_exact(bytes, k)?;
            let (cpu, ts_ns, timer, netns) =
                (ev.header.cpu, ev.header.ts_ns, ev.timer, ev.tuple.netns);
            Ok(match k {
                kind::TW_CANCEL => KernelEvent::Cancel {
                    cpu,
                    ts_ns,
                    timer,
                    conn: timer_conn(&ev)?,
                    netns,
                    reuse: ev.header.flags & flags::REUSE != 0,
                    in_connect_to: connect_destination(&ev)?,
                },
                kind::TW_EXPIRE => KernelEvent::Expire {
                    cpu,
                    ts_ns,
                    timer,
                    conn: timer_conn(&ev)?,
                    netns,
                },
                kind::TW_REARM => KernelEvent::Rearm {
                    cpu,
                    ts_ns,
                    timer,
                    conn: timer_conn(&ev)?,
                    netns,
                    timeout_jiffies: ev.timeout_jiffies,
                    substate: ev.substate,
                },
                _ => KernelEvent::SynTakeover { cpu, ts_ns, timer },
            })
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// Builders of raw records, for the unit tests of this and later stages.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    pub fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a #[repr(C)] plain struct with explicit padding fields.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    pub fn tuple_v4(s: [u8; 4], sport: u16, d: [u8; 4], dport: u16) -> Tuple {
        let mut t = Tuple {
            sport,
            dport,
            ..Tuple::default()
        };
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
        t
    }

    pub fn owner(tgid: u32, comm: &str) -> Owner {
        let mut o = Owner {
            tgid,
            pid: tgid,
            cgroup_id: 1,
            comm: [0; 16],
        };
        o.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        o
    }

    pub fn header(kind: u8, cpu: u32, ts_ns: u64, family: u8, flags: u8) -> Header {
        Header {
            kind,
            version: EVENT_VERSION,
            family,
            flags,
            cpu,
            ts_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn decodes_a_birth_with_owner() {
        let ev = SockEvent {
            header: header(
                kind::TW_BIRTH,
                1,
                99,
                AF_INET,
                flags::OWNER_KNOWN | flags::HAS_TUPLE,
            ),
            tuple: Tuple {
                netns: 4026532281,
                ..tuple_v4([127, 0, 0, 1], 40000, [127, 0, 0, 2], 80)
            },
            owner: owner(42, "curl"),
            skaddr: 7,
            timer: 0xffff_8880_0000_1000,
            timeout_jiffies: 15000,
            old_state: 5,
            new_state: 7,
            role: role::CONNECTED,
            substate: twtrace_common::tcp_state::FIN_WAIT2,
            err: 0,
            _pad: 0,
        };
        let got = decode(&bytes_of(&ev)).unwrap();
        assert_eq!(
            got,
            KernelEvent::Birth {
                netns: 4026532281,
                cpu: 1,
                ts_ns: 99,
                timer: 0xffff_8880_0000_1000,
                conn: Conn {
                    local: "127.0.0.1:40000".parse().unwrap(),
                    remote: "127.0.0.2:80".parse().unwrap(),
                },
                owner: Some(Process {
                    pid: 42,
                    tid: 42,
                    comm: "curl".into(),
                    cgroup_id: 1
                }),
                role: Role::Connected,
                timeout_jiffies: 15000,
                substate: twtrace_common::tcp_state::FIN_WAIT2,
                bound: false,
            }
        );
    }

    #[test]
    fn v4_mapped_v6_becomes_v4_and_v6_stays_v6() {
        let mut t = Tuple {
            sport: 1,
            dport: 2,
            ..Tuple::default()
        };
        t.saddr = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        t.daddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let c = conn(AF_INET6, &t).unwrap();
        // Mixed (not something the kernel produces): both stay IPv6, one family per connection.
        assert_eq!(c.local, "[::ffff:10.0.0.1]:1".parse().unwrap());
        assert_eq!(c.remote, "[2001:db8::1]:2".parse().unwrap());
        t.daddr = "::ffff:10.0.0.2".parse::<Ipv6Addr>().unwrap().octets();
        let c = conn(AF_INET6, &t).unwrap();
        assert_eq!(c.local, "10.0.0.1:1".parse().unwrap());
        assert_eq!(c.remote, "10.0.0.2:2".parse().unwrap());
    }

    #[test]
    fn cancel_carries_reuse_flag_and_optional_tuple() {
        let ev = TimerEvent {
            header: header(
                kind::TW_CANCEL,
                0,
                5,
                AF_INET,
                flags::HAS_TUPLE | flags::REUSE,
            ),
            timer: 9,
            tuple: tuple_v4([1, 2, 3, 4], 5, [6, 7, 8, 9], 10),
            timeout_jiffies: 0,
            substate: 0,
            _pad: [0; 3],
        };
        match decode(&bytes_of(&ev)).unwrap() {
            KernelEvent::Cancel { reuse, conn, .. } => {
                assert!(reuse);
                assert_eq!(conn.unwrap().remote, "6.7.8.9:10".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        let rearm = TimerEvent {
            header: header(kind::TW_REARM, 0, 5, 0, 0),
            ..ev
        };
        assert!(matches!(
            decode(&bytes_of(&rearm)),
            Ok(KernelEvent::Rearm { timer: 9, .. })
        ));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode(&[99, EVENT_VERSION]),
            Err(DecodeError::UnknownKind(99))
        );
        assert_eq!(decode(&[kind::STATE, 200]), Err(DecodeError::Version(200)));
        assert_eq!(
            decode(&[kind::STATE, EVENT_VERSION, 0]),
            Err(DecodeError::Length {
                kind: kind::STATE,
                len: 3
            })
        );
        let ev = SockEvent {
            header: header(kind::STATE, 0, 0, 77, 0),
            ..SockEvent::default()
        };
        assert_eq!(decode(&bytes_of(&ev)), Err(DecodeError::Family(77)));
    }

    #[test]
    fn comm_is_inline_and_safe() {
        assert_eq!(comm(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(comm(b"0123456789abcdef").as_str(), "0123456789abcde");
        assert_eq!(comm(&[0xff; 16]).as_str(), "???????????????");
        // Cut at a character boundary, never inside one.
        assert_eq!(Comm::from("aaaaaaaaaaaaaaé").as_str(), "aaaaaaaaaaaaaa");
        assert_eq!(size_of::<Process>(), 40);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic sweep; the fuzz target goes further.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..200 {
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if len > 1 {
                buf[1] = EVENT_VERSION;
                buf[0] = (len % 8) as u8;
            }
            let _ = decode(&buf);
        }
    }
}
