//! `twtrace::kernel::decode::decode`: ring buffer records, trusted for nothing. Never panics.
//!
//! Input: a mode byte, then
//! * mode 0: the record itself, raw;
//! * mode 1: the fields of a `SockEvent`, in declaration order, little-endian (kind, version and
//!   family are mostly forced to valid values so that the fuzzer gets past the checks; see
//!   `Fields`), then one byte that may truncate or extend the record;
//! * mode 2: the same for a `TimerEvent`.
//!
//! Records built in modes 1 and 2 are checked against what they must decode to.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use twtrace::kernel::decode::{DecodeError, KernelEvent, decode};
use twtrace_common::{
    AF_INET, AF_INET6, EVENT_VERSION, Header, Owner, SockEvent, TimerEvent, Tuple, flags, kind,
};

/// Reads the fuzz bytes as fields; zeros once they run out.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    /// One of `valid` most of the time, any byte otherwise.
    fn pick(&mut self, valid: &[u8]) -> u8 {
        let b = self.u8();
        if b >= 0xf0 {
            b
        } else {
            valid[b as usize % valid.len()]
        }
    }

    fn header(&mut self, kinds: &[u8]) -> Header {
        let kind = self.pick(kinds);
        let b = self.u8();
        let version = if b >= 0xf0 { b } else { EVENT_VERSION };
        let family = self.pick(&[AF_INET, AF_INET6, AF_INET6, 0]);
        Header {
            kind,
            version,
            family,
            flags: self.u8(),
            cpu: self.u32(),
            ts_ns: self.u64(),
        }
    }

    fn tuple(&mut self, family: u8) -> Tuple {
        let mut saddr = self.bytes::<16>();
        let mut daddr = self.bytes::<16>();
        // Now and then an IPv4-mapped IPv6 address, which must come out as IPv4.
        if family == AF_INET6 && saddr[0] == 0xff {
            saddr = Ipv4Addr::from(u32::from_le_bytes(saddr[12..].try_into().unwrap()))
                .to_ipv6_mapped()
                .octets();
            daddr = Ipv4Addr::from(u32::from_le_bytes(daddr[12..].try_into().unwrap()))
                .to_ipv6_mapped()
                .octets();
        }
        Tuple {
            saddr,
            daddr,
            sport: self.u16(),
            dport: self.u16(),
            netns: self.u32(),
        }
    }

    fn owner(&mut self) -> Owner {
        Owner {
            tgid: self.u32(),
            pid: self.u32(),
            cgroup_id: self.u64(),
            comm: self.bytes(),
        }
    }

    /// The last byte: 0xf8.. drops 1 to 8 bytes of the record, 0xf0..0xf7 adds 1 to 8.
    fn resize(&mut self, mut rec: Vec<u8>) -> Vec<u8> {
        let b = self.u8();
        let n = (b & 7) as usize + 1;
        if b >= 0xf8 {
            rec.truncate(rec.len() - n);
        } else if b >= 0xf0 {
            rec.resize(rec.len() + n, b);
        }
        rec
    }
}

/// The bytes of a `#[repr(C)]` record of twtrace-common.
fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: SockEvent and TimerEvent are #[repr(C)] integers and byte arrays whose padding is
    // spelled out as fields (twtrace-common asserts their sizes), so every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn ip(family: u8, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]).into()),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*raw);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// What a record built from valid parts must decode to, or the error it must give.
fn expect_header(h: &Header, len: usize, want_len: usize) -> Option<DecodeError> {
    if h.version != EVENT_VERSION {
        Some(DecodeError::Version(h.version))
    } else if len != want_len {
        Some(DecodeError::Length { kind: h.kind, len })
    } else {
        None
    }
}

fn check_tuple(family: u8, t: &Tuple, conn: &twtrace::kernel::decode::Conn) {
    let (mut local, mut remote) = (ip(family, &t.saddr).unwrap(), ip(family, &t.daddr).unwrap());
    // v4-mapped addresses become IPv4 only when both ends are: one family per connection.
    if local.is_ipv4() != remote.is_ipv4() {
        local = IpAddr::V6(Ipv6Addr::from(t.saddr));
        remote = IpAddr::V6(Ipv6Addr::from(t.daddr));
    }
    assert_eq!(conn.local.ip(), local);
    assert_eq!(conn.remote.ip(), remote);
    assert_eq!(conn.local.is_ipv4(), conn.remote.is_ipv4());
    assert_eq!((conn.local.port(), conn.remote.port()), (t.sport, t.dport));
}

fn sock(f: &mut Fields) {
    let kinds = [kind::STATE, kind::TW_BIRTH, kind::CONNECT_FAIL];
    let header = f.header(&kinds);
    let ev = SockEvent {
        header,
        tuple: f.tuple(header.family),
        owner: f.owner(),
        skaddr: f.u64(),
        timer: f.u64(),
        timeout_jiffies: f.u32(),
        old_state: f.u8(),
        new_state: f.u8(),
        role: f.u8(),
        substate: f.u8(),
        err: f.u32(),
        _pad: f.u32(),
    };
    let rec = f.resize(bytes_of(&ev));
    let got = decode(&rec);
    let h = &ev.header;
    if !kinds.contains(&h.kind) {
        return; // an arbitrary kind byte: covered by mode 0
    }
    if let Some(e) = expect_header(h, rec.len(), size_of::<SockEvent>()) {
        assert_eq!(got, Err(e));
        return;
    }
    if ip(h.family, &[0; 16]).is_none() {
        assert_eq!(got, Err(DecodeError::Family(h.family)));
        return;
    }
    let owner_known = h.flags & flags::OWNER_KNOWN != 0;
    match got.expect("a valid SockEvent decodes") {
        KernelEvent::State {
            cpu,
            ts_ns,
            conn,
            old_state,
            new_state,
            owner,
            skaddr,
            netns,
            ..
        } => {
            assert_eq!(h.kind, kind::STATE);
            assert_eq!(netns, ev.tuple.netns);
            assert_eq!((cpu, ts_ns, skaddr), (h.cpu, h.ts_ns, ev.skaddr));
            assert_eq!((old_state, new_state), (ev.old_state, ev.new_state));
            assert_eq!(owner.is_some(), owner_known);
            check_tuple(h.family, &ev.tuple, &conn);
        }
        KernelEvent::Birth {
            cpu,
            ts_ns,
            timer,
            conn,
            owner,
            timeout_jiffies,
            substate,
            bound,
            netns,
            ..
        } => {
            assert_eq!(h.kind, kind::TW_BIRTH);
            assert_eq!((cpu, ts_ns, timer), (h.cpu, h.ts_ns, ev.timer));
            assert_eq!(timeout_jiffies, ev.timeout_jiffies);
            assert_eq!(substate, ev.substate);
            assert_eq!(bound, h.flags & flags::BOUND != 0);
            assert_eq!(netns, ev.tuple.netns);
            if let Some(o) = owner {
                assert!(owner_known);
                assert_eq!(
                    (o.pid, o.tid, o.cgroup_id),
                    (ev.owner.tgid, ev.owner.pid, ev.owner.cgroup_id)
                );
                assert!(
                    o.comm.len() <= 15,
                    "comm {:?} longer than the kernel's",
                    o.comm
                );
                assert!(!o.comm.contains('\0'));
            } else {
                assert!(!owner_known);
            }
            check_tuple(h.family, &ev.tuple, &conn);
        }
        KernelEvent::ConnectFail {
            cpu,
            ts_ns,
            conn,
            err,
            bound,
            netns,
            ..
        } => {
            assert_eq!(h.kind, kind::CONNECT_FAIL);
            assert_eq!((cpu, ts_ns, err), (h.cpu, h.ts_ns, ev.err));
            assert_eq!(bound, h.flags & flags::BOUND != 0);
            assert_eq!(netns, ev.tuple.netns);
            check_tuple(h.family, &ev.tuple, &conn);
        }
        other => panic!("a SockEvent decoded as {other:?}"),
    }
}

fn timer(f: &mut Fields) {
    let kinds = [
        kind::TW_CANCEL,
        kind::TW_EXPIRE,
        kind::TW_REARM,
        kind::TW_SYN,
    ];
    let header = f.header(&kinds);
    let ev = TimerEvent {
        header,
        timer: f.u64(),
        tuple: f.tuple(header.family),
        timeout_jiffies: f.u32(),
        substate: f.u8(),
        _pad: f.bytes(),
    };
    let rec = f.resize(bytes_of(&ev));
    let got = decode(&rec);
    let h = &ev.header;
    if !kinds.contains(&h.kind) {
        return;
    }
    if let Some(e) = expect_header(h, rec.len(), size_of::<TimerEvent>()) {
        assert_eq!(got, Err(e));
        return;
    }
    let has_tuple = h.flags & flags::HAS_TUPLE != 0;
    let tuple_read =
        has_tuple && matches!(h.kind, kind::TW_CANCEL | kind::TW_EXPIRE | kind::TW_REARM);
    // A cancel inside a connect() carries the connect()'s destination in the tuple.
    let in_connect = h.kind == kind::TW_CANCEL && h.flags & flags::IN_CONNECT != 0;
    if (tuple_read || in_connect) && ip(h.family, &[0; 16]).is_none() {
        assert_eq!(got, Err(DecodeError::Family(h.family)));
        return;
    }
    let got = got.expect("a valid TimerEvent decodes");
    assert_eq!(got.cpu(), h.cpu);
    let conn = match got {
        KernelEvent::Cancel {
            ts_ns,
            timer,
            conn,
            reuse,
            in_connect_to,
            ..
        } => {
            assert_eq!(h.kind, kind::TW_CANCEL);
            assert_eq!((ts_ns, timer), (h.ts_ns, ev.timer));
            assert_eq!(reuse, h.flags & flags::REUSE != 0);
            assert_eq!(in_connect_to.is_some(), in_connect);
            conn
        }
        KernelEvent::Expire {
            ts_ns, timer, conn, ..
        } => {
            assert_eq!(h.kind, kind::TW_EXPIRE);
            assert_eq!((ts_ns, timer), (h.ts_ns, ev.timer));
            conn
        }
        KernelEvent::Rearm {
            ts_ns,
            timer,
            timeout_jiffies,
            substate,
            conn,
            ..
        } => {
            assert_eq!(h.kind, kind::TW_REARM);
            assert_eq!((ts_ns, timer), (h.ts_ns, ev.timer));
            assert_eq!(timeout_jiffies, ev.timeout_jiffies);
            assert_eq!(substate, ev.substate);
            conn
        }
        KernelEvent::SynTakeover { ts_ns, timer, .. } => {
            assert_eq!(h.kind, kind::TW_SYN);
            assert_eq!((ts_ns, timer), (h.ts_ns, ev.timer));
            None
        }
        other => panic!("a TimerEvent decoded as {other:?}"),
    };
    assert_eq!(conn.is_some(), tuple_read);
    if let Some(c) = conn {
        check_tuple(h.family, &ev.tuple, &c);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        let _ = decode(data);
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(ev) = decode(rest) {
                assert!(
                    rest.len() == size_of::<SockEvent>() || rest.len() == size_of::<TimerEvent>()
                );
                assert_eq!(rest[1], EVENT_VERSION);
                let _ = ev.cpu();
            }
        }
        1 => sock(&mut Fields(rest)),
        _ => timer(&mut Fields(rest)),
    }
});
