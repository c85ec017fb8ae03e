//! The kernel's own accounting and the settings that govern TIME_WAIT, read from /proc.
//! These are the ground truth twtrace's figures are shown beside, and what `doctor` reasons on.
//! Parsing is pure and unit-tested; reading is a thin layer over it.

use std::{
    collections::{HashMap, HashSet},
    fs,
};

use crate::sockdiag::{self, state};

/// TcpExt counters that concern TIME_WAIT (/proc/net/netstat). On Linux 6.x, `TW` counts
/// timewait sockets *created* (not expired); `TWKilled` those created with a timeout of 4 s or
/// less; `TWRecycled` local reuse by tcp_tw_reuse; `TCPTimeWaitOverflow` TIME_WAIT skipped
/// because tcp_max_tw_buckets was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TwCounters {
    pub created: u64,
    pub killed: u64,
    pub recycled: u64,
    pub overflow: u64,
    /// `TCPAbortOnData`: closes that sent a reset (zero SO_LINGER, or unread data at close).
    pub abort_on_data: u64,
}

impl TwCounters {
    pub fn since(&self, start: &TwCounters) -> TwCounters {
        TwCounters {
            created: self.created.saturating_sub(start.created),
            killed: self.killed.saturating_sub(start.killed),
            recycled: self.recycled.saturating_sub(start.recycled),
            overflow: self.overflow.saturating_sub(start.overflow),
            abort_on_data: self.abort_on_data.saturating_sub(start.abort_on_data),
        }
    }
}

/// Sysctls that decide how much TIME_WAIT a host can hold and how it is reused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// net.ipv4.tcp_tw_reuse: 0 off, 1 on, 2 loopback only (the default).
    pub tw_reuse: Option<u32>,
    pub max_tw_buckets: Option<u64>,
    /// net.ipv4.ip_local_port_range.
    pub port_range: Option<(u16, u16)>,
    /// net.ipv4.ip_local_reserved_ports, as ranges.
    pub reserved_ports: Vec<(u16, u16)>,
    pub fin_timeout: Option<u32>,
    pub timestamps: Option<u32>,
    /// Present only on kernels before 4.12 (the setting was removed).
    pub tw_recycle: Option<u32>,
}

impl Settings {
    /// Ports `connect()` can pick from: the range minus the reserved ports inside it.
    pub fn ephemeral_ports(&self) -> Option<u32> {
        let (lo, hi) = self.port_range?;
        if hi < lo {
            return Some(0);
        }
        let reserved: u32 = merge_ranges(&self.reserved_ports)
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(lo), b.min(hi));
                if a <= b { (b - a) as u32 + 1 } else { 0 }
            })
            .sum();
        Some((hi - lo) as u32 + 1 - reserved)
    }
}

fn merge_ranges(ranges: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut v: Vec<(u16, u16)> = ranges.iter().copied().filter(|(a, b)| a <= b).collect();
    v.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

pub fn parse_netstat(text: &str, prefix: &str) -> HashMap<String, u64> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    let mut out = HashMap::new();
    if let [names, values, ..] = lines.as_slice() {
        for (k, v) in names
            .split_whitespace()
            .skip(1)
            .zip(values.split_whitespace().skip(1))
        {
            if let Ok(v) = v.parse() {
                out.insert(k.to_owned(), v);
            }
        }
    }
    out
}

pub fn tw_counters_from(netstat: &str) -> TwCounters {
    let m = parse_netstat(netstat, "TcpExt:");
    let get = |k: &str| m.get(k).copied().unwrap_or(0);
    TwCounters {
        created: get("TW"),
        killed: get("TWKilled"),
        recycled: get("TWRecycled"),
        overflow: get("TCPTimeWaitOverflow"),
        abort_on_data: get("TCPAbortOnData"),
    }
}

/// `tw` of /proc/net/sockstat: timewait sockets alive now (this network namespace).
pub fn sockstat_tw_from(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|&x| x == "tw")?;
    f.get(i + 1)?.parse().ok()
}

pub fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// `1000-1010,2000` -> [(1000, 1010), (2000, 2000)].
pub fn parse_reserved(s: &str) -> Vec<(u16, u16)> {
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| match p.split_once('-') {
            Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
            None => {
                let v = p.trim().parse().ok()?;
                Some((v, v))
            }
        })
        .collect()
}

fn sysctl(name: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn settings() -> Settings {
    let num = |n: &str| sysctl(n).and_then(|v| v.parse().ok());
    Settings {
        tw_reuse: num("net.ipv4.tcp_tw_reuse"),
        max_tw_buckets: sysctl("net.ipv4.tcp_max_tw_buckets").and_then(|v| v.parse().ok()),
        port_range: sysctl("net.ipv4.ip_local_port_range").and_then(|v| parse_port_range(&v)),
        reserved_ports: sysctl("net.ipv4.ip_local_reserved_ports")
            .map(|v| parse_reserved(&v))
            .unwrap_or_default(),
        fin_timeout: num("net.ipv4.tcp_fin_timeout"),
        timestamps: num("net.ipv4.tcp_timestamps"),
        tw_recycle: num("net.ipv4.tcp_tw_recycle"),
    }
}

/// CLOSE_WAIT sockets held by one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseWait {
    pub pid: u32,
    pub comm: String,
    pub sockets: u64,
}

/// CLOSE_WAIT sockets per process now (sock_diag, then /proc/*/fd for the holders), largest
/// first. A CLOSE_WAIT socket is one whose peer closed and whose process has not called
/// close(): only the process that holds it can say. Sockets no process holds yet (not yet
/// accepted: inode 0) and sockets whose holder cannot be seen (another user's process, once
/// `serve` runs unprivileged) are shown as pid 0 with a name that says which.
pub fn close_wait_by_process() -> Vec<CloseWait> {
    let Ok(sockets) = sockdiag::dump(&[state::CLOSE_WAIT]) else {
        return Vec::new();
    };
    let inodes: HashSet<u32> = sockets
        .iter()
        .map(|s| s.inode)
        .filter(|&i| i != 0)
        .collect();
    let owners = sockdiag::socket_owners(&inodes);
    let mut by_pid: HashMap<(u32, String), u64> = HashMap::new();
    for s in &sockets {
        let key = match owners.get(&s.inode) {
            Some(o) => o.clone(),
            None if s.inode == 0 => (0, "(not accepted)".to_owned()),
            None => (0, "(holder not visible)".to_owned()),
        };
        *by_pid.entry(key).or_default() += 1;
    }
    let mut out: Vec<CloseWait> = by_pid
        .into_iter()
        .map(|((pid, comm), sockets)| CloseWait { pid, comm, sockets })
        .collect();
    out.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));
    out
}

pub fn tw_counters() -> TwCounters {
    fs::read_to_string("/proc/net/netstat")
        .map(|t| tw_counters_from(&t))
        .unwrap_or_default()
}

pub fn sockstat_tw() -> Option<u64> {
    fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|t| sockstat_tw_from(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "TcpExt: SyncookiesSent TW TWRecycled TWKilled TCPTimeWaitOverflow\n\
                           TcpExt: 0 81713 4 2 3\n\
                           IpExt: InNoRoutes\nIpExt: 0\n";

    #[test]
    fn counters_from_netstat() {
        let c = tw_counters_from(NETSTAT);
        assert_eq!(
            c,
            TwCounters {
                created: 81713,
                killed: 2,
                recycled: 4,
                overflow: 3,
                abort_on_data: 0,
            }
        );
        let later = TwCounters {
            created: 81720,
            ..c
        };
        assert_eq!(later.since(&c).created, 7);
        assert_eq!(tw_counters_from(""), TwCounters::default());
    }

    #[test]
    fn sockstat() {
        let t = "sockets: used 200\nTCP: inuse 5 orphan 0 tw 23 alloc 8 mem 1\nUDP: inuse 1\n";
        assert_eq!(sockstat_tw_from(t), Some(23));
        assert_eq!(sockstat_tw_from("TCP: inuse 5\n"), None);
    }

    #[test]
    fn ephemeral_ports_minus_reserved() {
        let mut s = Settings {
            port_range: parse_port_range("32768\t60999"),
            ..Settings::default()
        };
        assert_eq!(s.ephemeral_ports(), Some(28232));
        s.reserved_ports = parse_reserved("32768-32777,40000,1000-2000,32770-32780\n");
        // 32768..=32780 (13) and 40000 (1) inside the range.
        assert_eq!(s.ephemeral_ports(), Some(28232 - 14));
        assert_eq!(parse_reserved(""), vec![]);
        assert_eq!(Settings::default().ephemeral_ports(), None);
    }
}
