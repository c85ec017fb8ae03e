//! The kernel's TCP socket table, read through NETLINK_SOCK_DIAG (inet_diag), and which process
//! holds a socket inode (/proc/<pid>/fd).
//!
//! Never /proc/net/tcp: the kernel formats that file one socket at a time under the hash bucket
//! locks, and readers stall at tens of thousands of TIME_WAIT sockets (node_exporter hung at
//! 65k). inet_diag filters by state in the kernel and hands over binary records, a few hundred
//! per datagram.
//!
//! The byte-level parts are pure ([`build_request`], [`parse_datagram`]) and tested with
//! buffers built in code; nothing here trusts a length it did not check.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use crate::kernel::decode::Conn;

/// One socket as inet_diag lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    /// Local first; IPv4-mapped IPv6 addresses turned into IPv4 (as `decode` does).
    pub conn: Conn,
    /// Kernel TCP state number. Timewait sockets report their substate: TIME_WAIT (6), or
    /// FIN_WAIT2 (5) for an orphaned socket whose FIN was acked but whose peer has not closed.
    pub state: u8,
    /// idiag_timer: which timer is pending; `TIMER_TIMEWAIT` (3) for a timewait socket, which
    /// tells a FIN_WAIT2-substate timewait socket from a full socket in FIN_WAIT2.
    pub timer: u8,
    /// idiag_expires: ms until the socket's pending timer fires (for a timewait socket, the ms
    /// it has left).
    pub expires_ms: u32,
    /// idiag_inode: 0 for sockets no file refers to (timewait and request sockets, children
    /// still in the accept queue).
    pub inode: u32,
    pub uid: u32,
}

/// TCP state numbers, as the kernel reports them.
pub use twtrace_common::tcp_state as state;

/// idiag_timer of a timewait socket (inet_diag's `inet_twsk_diag_fill` reports 3).
pub const TIMER_TIMEWAIT: u8 = 3;

impl DiagSocket {
    /// A timewait socket, in either substate (TIME_WAIT, or FIN_WAIT2 waiting for the peer's
    /// FIN), not a full socket.
    pub fn is_timewait(&self) -> bool {
        self.state == state::TIME_WAIT
            || (self.state == state::FIN_WAIT2 && self.timer == TIMER_TIMEWAIT)
    }
}

/// Every TCP socket (IPv4 and IPv6) whose state is in `states`, as the kernel lists them now.
///
/// The kernel applies the state filter itself (a timewait socket by its substate). States above
/// 31 cannot be expressed in idiag_states and are ignored. Sockets are read from the network
/// namespace of the calling thread.
pub fn dump(states: &[u8]) -> io::Result<Vec<DiagSocket>> {
    let mask = state_mask(states);
    let mut out = Vec::new();
    if mask == 0 {
        return Ok(out);
    }
    let sock = NetlinkSocket::open()?;
    // An AF_INET dump lists only AF_INET sockets and an AF_INET6 dump only AF_INET6 ones (the
    // kernel compares sk_family), so a dual-stack socket carrying IPv4 appears once, v4-mapped.
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        sock.dump_family(family, mask, seq, &mut out)?;
    }
    Ok(out)
}

/// Each of `conns` as the kernel has it now (None: no such socket), looked up one by one by
/// its 4-tuple (inet_diag's exact lookup, `inet_diag_find_one_icsk`: a hash lookup that finds
/// timewait sockets too, not a walk of the table). An IPv4 4-tuple also finds a dual-stack
/// socket carrying it (the lookup of a v4-mapped address is the IPv4 one). Read from the
/// network namespace of the calling thread.
pub fn lookup(conns: &[Conn]) -> io::Result<Vec<Option<DiagSocket>>> {
    let sock = NetlinkSocket::open()?;
    let mut out = Vec::with_capacity(conns.len());
    for (seq, conn) in (1u32..).zip(conns) {
        let mut found = Vec::with_capacity(1);
        match sock.exchange(&build_lookup(conn, seq), seq, &mut found) {
            Ok(()) => out.push(found.pop()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => out.push(None),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The local ports with a listening TCP socket (any address, both families).
pub fn listening_ports() -> io::Result<HashSet<u16>> {
    Ok(dump(&[state::LISTEN])?
        .into_iter()
        .map(|s| s.conn.local.port())
        .collect())
}

/// Which process holds each socket inode: scans the /proc/<pid>/fd/* symlinks
/// (`socket:[INODE]`), skipping processes that vanish or cannot be read; comm from
/// /proc/<pid>/comm. Only inodes in `inodes` are reported. A socket shared by several
/// processes (inherited across fork, passed over a unix socket) goes to the first found in
/// /proc order, the lowest pid.
pub fn socket_owners(inodes: &HashSet<u32>) -> HashMap<u32, (u32, String)> {
    owners_under(Path::new("/proc"), inodes)
}

// ---------------------------------------------------------------------------------------------
// Protocol constants (include/uapi/linux/{netlink,sock_diag,inet_diag}.h)

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_ROOT: u16 = 0x100;
const NLM_F_MATCH: u16 = 0x200;
const NLM_F_DUMP: u16 = NLM_F_ROOT | NLM_F_MATCH;

/// struct nlmsghdr: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDRLEN: usize = 16;
/// struct inet_diag_req_v2: family, protocol, ext, pad, states u32, inet_diag_sockid (48).
const REQ_V2_LEN: usize = 56;
/// struct inet_diag_msg: family, state, timer, retrans, inet_diag_sockid (48), expires, rqueue,
/// wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 72;
/// The full request datagram.
pub(crate) const REQUEST_LEN: usize = NLMSG_HDRLEN + REQ_V2_LEN;

/// A dump datagram is never larger than this: the kernel sizes each dump skb from the reader's
/// previous recv length, capped at SKB_WITH_OVERHEAD(32768) (net/netlink/af_netlink.c).
const RECV_BUF: usize = 32 * 1024;

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn state_mask(states: &[u8]) -> u32 {
    states
        .iter()
        .filter(|&&s| s < 32)
        .fold(0u32, |m, &s| m | (1u32 << s))
}

// ---------------------------------------------------------------------------------------------
// Pure byte-level parts

/// The SOCK_DIAG_BY_FAMILY dump request for TCP sockets of `family` in the states of `mask`.
///
/// The socket id stays zeroed: in a dump the kernel treats a non-zero idiag_sport/idiag_dport
/// as a port filter.
pub(crate) fn build_request(family: u8, mask: u32, seq: u32) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in the sender's port id.
    b[16] = family;
    b[17] = IPPROTO_TCP;
    // idiag_ext 0: no extensions asked (the kernel still appends a few attributes, skipped).
    b[20..24].copy_from_slice(&mask.to_ne_bytes());
    b
}

/// The SOCK_DIAG_BY_FAMILY request for the one TCP socket of `conn`. Not a dump: the kernel
/// answers with that socket's inet_diag_msg, then (NLM_F_ACK) an acknowledgement, or with
/// ENOENT. The cookie is INET_DIAG_NOCOOKIE (any socket with that 4-tuple); the interface 0.
pub(crate) fn build_lookup(conn: &Conn, seq: u32) -> [u8; REQUEST_LEN] {
    let family = if conn.local.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    let mut b = build_request(family, u32::MAX, seq);
    b[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    // inet_diag_sockid at 24: sport, dport (network order), src[16], dst[16], if, cookie[2].
    b[24..26].copy_from_slice(&conn.local.port().to_be_bytes());
    b[26..28].copy_from_slice(&conn.remote.port().to_be_bytes());
    for (at, ip) in [(28, conn.local.ip()), (44, conn.remote.ip())] {
        match ip {
            IpAddr::V4(v4) => b[at..at + 4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b[at..at + 16].copy_from_slice(&v6.octets()),
        }
    }
    b[64..72].copy_from_slice(&[0xff; 8]);
    b
}

/// What a datagram left the dump in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The dump goes on in the next datagram.
    More,
    /// NLMSG_DONE seen: the dump is complete.
    Done,
}

fn malformed(what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("sock_diag: {}", what.into()),
    )
}

fn u16_ne(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u16_be(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_ne(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn i32_ne(b: &[u8], off: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Parses one received datagram of the dump numbered `seq`, appending its sockets to `out`.
///
/// Messages of another sequence number are skipped. Errors: NLMSG_ERROR (its errno), a
/// negative NLMSG_DONE status, NLMSG_OVERRUN, and anything malformed (a length that does not
/// fit, a record shorter than inet_diag_msg, an unknown address family).
pub(crate) fn parse_datagram(
    buf: &[u8],
    seq: u32,
    out: &mut Vec<DiagSocket>,
) -> io::Result<Progress> {
    let mut off = 0usize;
    while off < buf.len() {
        let rest = buf.get(off..).unwrap_or_default();
        if rest.len() < NLMSG_HDRLEN {
            return Err(malformed(format!(
                "{} trailing bytes, shorter than a message header",
                rest.len()
            )));
        }
        let len = u32_ne(rest, 0).ok_or_else(|| malformed("header"))? as usize;
        let ty = u16_ne(rest, 4).ok_or_else(|| malformed("header"))?;
        let msg_seq = u32_ne(rest, 8).ok_or_else(|| malformed("header"))?;
        if len < NLMSG_HDRLEN {
            return Err(malformed(format!("message length {len}")));
        }
        let Some(msg) = rest.get(..len) else {
            return Err(malformed(format!(
                "message of {len} bytes truncated to {}",
                rest.len()
            )));
        };
        let payload = msg.get(NLMSG_HDRLEN..).unwrap_or_default();
        // The last message of a datagram may lack its alignment padding.
        off = off.saturating_add(align4(len));
        if msg_seq != seq {
            continue;
        }
        match ty {
            NLMSG_NOOP => {}
            NLMSG_DONE => {
                // The kernel puts the dump callback's final status in NLMSG_DONE: a negative
                // errno when the dump failed part way.
                return match i32_ne(payload, 0) {
                    Some(e) if e < 0 => Err(io::Error::from_raw_os_error(e.saturating_neg())),
                    _ => Ok(Progress::Done),
                };
            }
            NLMSG_ERROR => {
                let e = i32_ne(payload, 0).ok_or_else(|| malformed("short NLMSG_ERROR"))?;
                // Error 0 is an acknowledgement, which ends the exchange as well.
                return if e == 0 {
                    Ok(Progress::Done)
                } else {
                    Err(io::Error::from_raw_os_error(e.saturating_abs()))
                };
            }
            NLMSG_OVERRUN => return Err(malformed("NLMSG_OVERRUN: data lost")),
            SOCK_DIAG_BY_FAMILY => out.push(parse_diag_msg(payload)?),
            // Any other type is not part of an inet_diag dump: skipped.
            _ => {}
        }
    }
    Ok(Progress::More)
}

/// One inet_diag_msg (attributes after it are ignored).
fn parse_diag_msg(p: &[u8]) -> io::Result<DiagSocket> {
    if p.len() < DIAG_MSG_LEN {
        return Err(malformed(format!(
            "inet_diag_msg of {} bytes, expected {DIAG_MSG_LEN}",
            p.len()
        )));
    }
    let short = || malformed("inet_diag_msg");
    let family = *p.first().ok_or_else(short)?;
    let state = *p.get(1).ok_or_else(short)?;
    let timer = *p.get(2).ok_or_else(short)?;
    // inet_diag_sockid at 4: sport, dport (network order), src[4], dst[4] (network order).
    let sport = u16_be(p, 4).ok_or_else(short)?;
    let dport = u16_be(p, 6).ok_or_else(short)?;
    let src = p.get(8..24).ok_or_else(short)?;
    let dst = p.get(24..40).ok_or_else(short)?;
    let local = SocketAddr::new(ip(family, src)?, sport);
    let remote = SocketAddr::new(ip(family, dst)?, dport);
    Ok(DiagSocket {
        conn: Conn { local, remote },
        state,
        timer,
        expires_ms: u32_ne(p, 52).ok_or_else(short)?,
        uid: u32_ne(p, 64).ok_or_else(short)?,
        inode: u32_ne(p, 68).ok_or_else(short)?,
    })
}

/// An address from the 16 bytes of an inet_diag_sockid field (IPv4 uses the first 4).
fn ip(family: u8, b: &[u8]) -> io::Result<IpAddr> {
    match family {
        AF_INET => {
            let o: [u8; 4] = b
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| malformed("address"))?;
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        AF_INET6 => {
            let o: [u8; 16] = b
                .get(..16)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| malformed("address"))?;
            let v6 = Ipv6Addr::from(o);
            Ok(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        other => Err(malformed(format!("address family {other}"))),
    }
}

/// The inode of an fd link target `socket:[INODE]`.
fn socket_inode(target: &OsStr) -> Option<u32> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn owners_under(proc: &Path, inodes: &HashSet<u32>) -> HashMap<u32, (u32, String)> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(entries) = fs::read_dir(proc) else {
        return found;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc.join(pid.to_string());
        // A process that exited, or a kernel thread: no fd directory to read.
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let mut comm: Option<String> = None;
        for fd in fds.flatten() {
            let Some(inode) = fs::read_link(fd.path())
                .ok()
                .and_then(|t| socket_inode(t.as_os_str()))
            else {
                continue;
            };
            if !inodes.contains(&inode) || found.contains_key(&inode) {
                continue;
            }
            if comm.is_none() {
                comm = fs::read_to_string(dir.join("comm"))
                    .ok()
                    .map(|c| c.trim_end_matches('\n').to_owned());
            }
            // No comm: the process exited between its fds and its comm; its sockets closed.
            let Some(c) = &comm else { break };
            found.insert(inode, (pid, c.clone()));
        }
        if found.len() == inodes.len() {
            break;
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The netlink socket

struct NetlinkSocket(libc::c_int);

impl Drop for NetlinkSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

impl NetlinkSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = NetlinkSocket(fd);
        // A kernel dump always ends with NLMSG_DONE; the timeout only turns a kernel that
        // stops answering into an error instead of a hung caller.
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: valid option pointer and length.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    fn dump_family(
        &self,
        family: u8,
        mask: u32,
        seq: u32,
        out: &mut Vec<DiagSocket>,
    ) -> io::Result<()> {
        self.exchange(&build_request(family, mask, seq), seq, out)
    }

    /// Sends `req` and reads the answers numbered `seq` until NLMSG_DONE or an
    /// acknowledgement.
    fn exchange(&self, req: &[u8], seq: u32, out: &mut Vec<DiagSocket>) -> io::Result<()> {
        // SAFETY: all zeroes is a valid sockaddr_nl; pid 0 addresses the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: req and `to` are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    self.0,
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                if n as usize != req.len() {
                    return Err(malformed(format!(
                        "request sent {n} of {} bytes",
                        req.len()
                    )));
                }
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // MSG_TRUNC makes netlink return the datagram's real length, so a datagram larger
            // than the buffer is detected instead of silently cut.
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "sock_diag: empty datagram before NLMSG_DONE",
                ));
            }
            let Some(data) = buf.get(..n) else {
                return Err(malformed(format!(
                    "datagram of {n} bytes exceeds the {RECV_BUF} byte buffer"
                )));
            };
            if parse_datagram(data, seq, out)? == Progress::Done {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NLM_F_MULTI: u16 = 0x2;

    /// A netlink message, padded to 4 bytes.
    fn msg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut b = Vec::with_capacity(align4(len));
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(align4(len), 0);
        b
    }

    fn addr16(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&v4.octets());
                a
            }
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    struct Rec {
        family: u8,
        state: u8,
        local: &'static str,
        remote: &'static str,
        expires: u32,
        uid: u32,
        inode: u32,
    }

    /// An inet_diag_msg, followed by an INET_DIAG_SHUTDOWN attribute as the kernel appends.
    fn diag(r: &Rec) -> Vec<u8> {
        let local: SocketAddr = r.local.parse().unwrap();
        let remote: SocketAddr = r.remote.parse().unwrap();
        // idiag_timer: 3 for a timewait socket, as inet_twsk_diag_fill sets it.
        let timer = if r.state == state::TIME_WAIT {
            TIMER_TIMEWAIT
        } else {
            0
        };
        let mut p = vec![r.family, r.state, timer, 0];
        p.extend_from_slice(&local.port().to_be_bytes());
        p.extend_from_slice(&remote.port().to_be_bytes());
        p.extend_from_slice(&addr16(local.ip()));
        p.extend_from_slice(&addr16(remote.ip()));
        p.extend_from_slice(&0u32.to_ne_bytes()); // if
        p.extend_from_slice(&[0xff; 8]); // cookie
        p.extend_from_slice(&r.expires.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes()); // rqueue
        p.extend_from_slice(&0u32.to_ne_bytes()); // wqueue
        p.extend_from_slice(&r.uid.to_ne_bytes());
        p.extend_from_slice(&r.inode.to_ne_bytes());
        assert_eq!(p.len(), DIAG_MSG_LEN);
        // struct rtattr { len u16, type u16 } + u8 value, padded.
        p.extend_from_slice(&5u16.to_ne_bytes());
        p.extend_from_slice(&8u16.to_ne_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        p
    }

    fn diag_msg(seq: u32, r: &Rec) -> Vec<u8> {
        msg(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, seq, &diag(r))
    }

    fn done(seq: u32, status: i32) -> Vec<u8> {
        msg(NLMSG_DONE, NLM_F_MULTI, seq, &status.to_ne_bytes())
    }

    fn tw4() -> Rec {
        Rec {
            family: AF_INET,
            state: state::TIME_WAIT,
            local: "127.0.0.1:40000",
            remote: "127.0.0.2:8080",
            expires: 59_870,
            uid: 0,
            inode: 0,
        }
    }

    fn est6() -> Rec {
        Rec {
            family: AF_INET6,
            state: state::CLOSE_WAIT,
            local: "[2001:db8::1]:443",
            remote: "[2001:db8::2]:51234",
            expires: 0,
            uid: 1000,
            inode: 123_456,
        }
    }

    fn sock(r: &Rec) -> DiagSocket {
        DiagSocket {
            conn: Conn {
                local: r.local.parse().unwrap(),
                remote: r.remote.parse().unwrap(),
            },
            state: r.state,
            timer: if r.state == state::TIME_WAIT {
                TIMER_TIMEWAIT
            } else {
                0
            },
            expires_ms: r.expires,
            inode: r.inode,
            uid: r.uid,
        }
    }

    #[test]
    fn request_bytes() {
        let mask = state_mask(&[state::TIME_WAIT, state::FIN_WAIT2]);
        let b = build_request(AF_INET6, mask, 7);
        assert_eq!(b.len(), 72);
        assert_eq!(u32_ne(&b, 0), Some(72));
        assert_eq!(u16_ne(&b, 4), Some(20));
        assert_eq!(u16_ne(&b, 6), Some(0x301));
        assert_eq!(u32_ne(&b, 8), Some(7));
        assert_eq!(u32_ne(&b, 12), Some(0));
        assert_eq!(&b[16..20], &[10, 6, 0, 0]);
        assert_eq!(u32_ne(&b, 20), Some((1 << 6) | (1 << 5)));
        assert!(b[24..].iter().all(|&x| x == 0), "socket id zeroed");
    }

    #[test]
    fn lookup_request_bytes() {
        let v4 = Conn {
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
        };
        let b = build_lookup(&v4, 3);
        assert_eq!(u32_ne(&b, 0), Some(72));
        assert_eq!(
            u16_ne(&b, 6),
            Some(0x5),
            "a request with an ack, not a dump"
        );
        assert_eq!(u32_ne(&b, 8), Some(3));
        assert_eq!(&b[16..18], &[2, 6]);
        assert_eq!(u32_ne(&b, 20), Some(u32::MAX));
        assert_eq!(&b[24..28], &[0x9c, 0x40, 0, 80], "ports in network order");
        assert_eq!(&b[28..32], &[127, 0, 0, 1]);
        assert!(b[32..44].iter().all(|&x| x == 0));
        assert_eq!(&b[44..48], &[10, 0, 0, 2]);
        assert_eq!(&b[60..64], &[0; 4], "any interface");
        assert_eq!(&b[64..72], &[0xff; 8], "INET_DIAG_NOCOOKIE");
        let v6 = Conn {
            local: "[fd00::1]:1".parse().unwrap(),
            remote: "[fd00::2]:2".parse().unwrap(),
        };
        let b = build_lookup(&v6, 4);
        assert_eq!(b[16], 10);
        assert_eq!(b[28], 0xfd);
        assert_eq!(b[43], 1);
        assert_eq!(b[59], 2);
    }

    #[test]
    fn state_mask_ignores_states_beyond_31() {
        assert_eq!(state_mask(&[]), 0);
        assert_eq!(state_mask(&[10, 10, 8]), (1 << 10) | (1 << 8));
        assert_eq!(state_mask(&[31, 32, 255]), 1 << 31);
    }

    #[test]
    fn two_messages_then_done_in_one_datagram() {
        let mut buf = diag_msg(1, &tw4());
        buf.extend(diag_msg(1, &est6()));
        buf.extend(done(1, 0));
        let mut out = Vec::new();
        assert_eq!(parse_datagram(&buf, 1, &mut out).unwrap(), Progress::Done);
        assert_eq!(out, vec![sock(&tw4()), sock(&est6())]);
        assert_eq!(out[0].conn.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(out[0].conn.remote.port(), 8080);
    }

    #[test]
    fn multi_part_dump_spans_datagrams() {
        let mut first = diag_msg(2, &tw4());
        first.extend(diag_msg(2, &est6()));
        let second = [diag_msg(2, &tw4()), done(2, 0)].concat();
        let mut out = Vec::new();
        assert_eq!(parse_datagram(&first, 2, &mut out).unwrap(), Progress::More);
        assert_eq!(out.len(), 2);
        assert_eq!(
            parse_datagram(&second, 2, &mut out).unwrap(),
            Progress::Done
        );
        assert_eq!(out.len(), 3);
        // A bare NLMSG_DONE (no status) ends the dump too.
        let bare = msg(NLMSG_DONE, NLM_F_MULTI, 2, &[]);
        assert_eq!(parse_datagram(&bare, 2, &mut out).unwrap(), Progress::Done);
    }

    #[test]
    fn nlmsg_error_carries_the_errno() {
        let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
        payload.extend_from_slice(&build_request(AF_INET, 1 << 6, 1)[..NLMSG_HDRLEN]);
        let buf = msg(NLMSG_ERROR, 0, 1, &payload);
        let e = parse_datagram(&buf, 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // Error 0 is an ack.
        let ack = msg(NLMSG_ERROR, 0, 1, &0i32.to_ne_bytes());
        assert_eq!(
            parse_datagram(&ack, 1, &mut Vec::new()).unwrap(),
            Progress::Done
        );
        // An NLMSG_ERROR too short for its errno is malformed.
        let short = msg(NLMSG_ERROR, 0, 1, &[1, 2]);
        let e = parse_datagram(&short, 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn failed_dump_status_in_done_is_an_error() {
        let buf = [diag_msg(1, &tw4()), done(1, -libc::ENOMEM)].concat();
        let e = parse_datagram(&buf, 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn overrun_is_an_error() {
        let buf = msg(NLMSG_OVERRUN, 0, 1, &[]);
        assert!(parse_datagram(&buf, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn truncated_message_is_an_error() {
        let full = [diag_msg(1, &tw4()), done(1, 0)].concat();
        // Cut inside the first message: its length points past the end.
        let e = parse_datagram(&full[..40], 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Cut inside the header of the second message.
        let first_len = diag_msg(1, &tw4()).len();
        let e = parse_datagram(&full[..first_len + 6], 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // A header whose length is consistent but too short for an inet_diag_msg.
        let short = msg(SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, 1, &diag(&tw4())[..60]);
        let e = parse_datagram(&short, 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn length_below_header_size_is_an_error_not_a_loop() {
        let mut buf = done(1, 0);
        buf[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert!(parse_datagram(&buf, 1, &mut Vec::new()).is_err());
        buf[0..4].copy_from_slice(&15u32.to_ne_bytes());
        assert!(parse_datagram(&buf, 1, &mut Vec::new()).is_err());
        buf[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_datagram(&buf, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn unpadded_last_message_is_accepted() {
        // A NLMSG_NOOP whose payload is 3 bytes: not a multiple of 4, no padding after it.
        let mut buf = diag_msg(1, &tw4());
        let mut d = msg(NLMSG_NOOP, 0, 1, &[0, 0, 0]);
        d.truncate(NLMSG_HDRLEN + 3);
        buf.extend(d);
        let mut out = Vec::new();
        assert_eq!(parse_datagram(&buf, 1, &mut out).unwrap(), Progress::More);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn other_sequence_numbers_are_skipped() {
        let buf = [diag_msg(9, &tw4()), done(9, 0), diag_msg(1, &est6())].concat();
        let mut out = Vec::new();
        assert_eq!(parse_datagram(&buf, 1, &mut out).unwrap(), Progress::More);
        assert_eq!(out, vec![sock(&est6())]);
    }

    #[test]
    fn ipv4_ipv6_and_v4_mapped_addresses() {
        let mapped = Rec {
            family: AF_INET6,
            state: state::TIME_WAIT,
            local: "[::ffff:10.0.0.1]:80",
            remote: "[::ffff:10.0.0.2]:50000",
            expires: 1,
            uid: 0,
            inode: 0,
        };
        let buf = [
            diag_msg(1, &tw4()),
            diag_msg(1, &est6()),
            diag_msg(1, &mapped),
        ]
        .concat();
        let mut out = Vec::new();
        parse_datagram(&buf, 1, &mut out).unwrap();
        assert_eq!(out[0].conn.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(out[1].conn.local, "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(out[1].conn.remote, "[2001:db8::2]:51234".parse().unwrap());
        assert_eq!(out[1].inode, 123_456);
        assert_eq!(out[1].uid, 1000);
        assert_eq!(out[2].conn.local, "10.0.0.1:80".parse().unwrap());
        assert_eq!(out[2].conn.remote, "10.0.0.2:50000".parse().unwrap());
        assert_eq!(out[2].conn.family(), 4);
    }

    #[test]
    fn unknown_family_is_an_error() {
        let mut r = tw4();
        r.family = 1;
        let e = parse_datagram(&diag_msg(1, &r), 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn no_input_panics() {
        let full = [
            diag_msg(1, &tw4()),
            diag_msg(1, &est6()),
            msg(NLMSG_ERROR, 0, 1, &(-1i32).to_ne_bytes()),
            done(1, 0),
        ]
        .concat();
        for end in 0..=full.len() {
            for start in 0..end.min(24) {
                let _ = parse_datagram(&full[start..end], 1, &mut Vec::new());
            }
        }
        // Every single-byte corruption of a valid datagram.
        for i in 0..full.len() {
            for v in [0u8, 1, 2, 3, 0x7f, 0xff] {
                let mut b = full.clone();
                b[i] = v;
                let _ = parse_datagram(&b, 1, &mut Vec::new());
            }
        }
        // Pseudo-random datagrams.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 300) as usize;
            let b: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 % 64) & 0xff) as u8)
                .collect();
            let _ = parse_datagram(&b, (x >> 60) as u32, &mut Vec::new());
        }
    }

    #[test]
    fn socket_link_targets() {
        assert_eq!(socket_inode(OsStr::new("socket:[12345]")), Some(12345));
        assert_eq!(
            socket_inode(OsStr::new("socket:[4294967295]")),
            Some(u32::MAX)
        );
        assert_eq!(socket_inode(OsStr::new("socket:[4294967296]")), None);
        assert_eq!(socket_inode(OsStr::new("pipe:[12345]")), None);
        assert_eq!(socket_inode(OsStr::new("/dev/null")), None);
        assert_eq!(socket_inode(OsStr::new("socket:[12345")), None);
        assert_eq!(socket_inode(OsStr::new("socket:[]")), None);
    }

    #[test]
    fn owners_from_a_proc_tree() {
        use std::os::unix::fs::symlink;
        let root = std::env::temp_dir().join(format!("twtrace-sockdiag-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let proc_dir = |pid: &str, comm: Option<&str>, links: &[(&str, &str)]| {
            let d = root.join(pid);
            fs::create_dir_all(d.join("fd")).unwrap();
            if let Some(c) = comm {
                fs::write(d.join("comm"), format!("{c}\n")).unwrap();
            }
            for (fd, target) in links {
                symlink(target, d.join("fd").join(fd)).unwrap();
            }
        };
        proc_dir(
            "42",
            Some("nginx"),
            &[
                ("0", "/dev/null"),
                ("3", "socket:[100]"),
                ("4", "socket:[101]"),
            ],
        );
        proc_dir("7", Some("init"), &[("5", "socket:[102]")]);
        // Shares inode 100 (a forked child): the lower pid, 42, keeps it.
        proc_dir("4242", Some("worker"), &[("3", "socket:[100]")]);
        // Vanished between its fds and its comm.
        proc_dir("99", None, &[("3", "socket:[103]")]);
        // Not a process.
        proc_dir("self", Some("x"), &[("3", "socket:[104]")]);
        fs::create_dir_all(root.join("sys")).unwrap();
        // A process whose fd directory is gone.
        fs::create_dir_all(root.join("55")).unwrap();

        let want: HashSet<u32> = [100, 101, 102, 103, 104, 999].into();
        let got = owners_under(&root, &want);
        let _ = fs::remove_dir_all(&root);
        let expect: HashMap<u32, (u32, String)> = [
            (100, (42, "nginx".to_owned())),
            (101, (42, "nginx".to_owned())),
            (102, (7, "init".to_owned())),
        ]
        .into();
        assert_eq!(got, expect);
        assert!(owners_under(Path::new("/nonexistent-proc"), &want).is_empty());
        assert!(owners_under(Path::new("/proc"), &HashSet::new()).is_empty());
    }
}
